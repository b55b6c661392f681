"""The GRPO loop, run by the driver: sample pairs -> rollout -> learn -> sync weights -> log.

    for each step:
        pairs      <- the RL sampler (one sub-dataset per step, resumable cursor)
        rollout    G completions per query prompt AND per target prompt (rollout pool)
        learner    score, reward, advantages, clipped loss + KL, optimizer step (learner pool)
        sync       trainable weights: learner rank 0 -> every rollout actor
        log        reward parts, rank score, KL, clip fraction, lengths, phase timings
        checkpoint every rl.save_every steps (learners write it; resume=auto continues)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from rollout.engine import SamplingParams
from rollout.pool import RolloutPool, prompt_seed
from umerl import checkpoint as ckpt
from umerl.console import Progress
from umerl.data import Pair, read_rl_pairs
from umerl.learner import LearnerPool, StepShard
from umerl.remote import WorkerError
from umerl.sft_data import ContrastiveBatcher, load_pair_datasets

CONSOLE_KEYS = ("reward/total", "reward/format", "reward/embedding", "reward/rank_score",
                "actor/kl", "actor/clip_fraction", "rollout/completion_len_mean")


def load_rl_datasets(cfg: DictConfig, policy: str) -> dict[str, list[Pair]]:
    """The RL pairs, with the same line and prompt-length checks as the preflight."""
    from umerl.model import load_encoder, prompt_limit

    return load_pair_datasets(list(cfg.rl.data), read_rl_pairs, bool(cfg.data.skip_invalid),
                              load_encoder(policy),
                              prompt_limit(cfg.data.max_prompt_tokens, policy), key="rl.data")


def run_rl(cfg: DictConfig, policy: str, reference: str, tracker: Any = None,
           datasets: dict[str, list[Pair]] | None = None) -> Path:
    """GRPO from ``policy`` (KL to the frozen ``reference``); returns the last checkpoint.
    ``datasets``: RL pairs already read and checked (the driver's preflight), else read here."""
    r = cfg.rl
    sampler = ContrastiveBatcher(datasets or load_rl_datasets(cfg, policy), int(r.pairs_per_step),
                                 seed=int(cfg.seed))
    learners = LearnerPool(cfg, policy, reference)
    resumed, client = learners.resume()
    first = int(client.get("step", 0)) + 1
    if resumed:
        sampler.load_state_dict(client["data"])
    rollout = RolloutPool(cfg.rollout, resumed or policy, rollout_dtype(cfg), cfg.model.dtype)
    names = learners.trainable_names()
    start_in_sync(learners, rollout, names)
    print(f"[rl] {'resumed from ' + resumed if resumed else 'from ' + policy}: steps "
          f"{first}..{r.max_steps}, {r.pairs_per_step} pairs x G={r.group_size} per step, "
          f"rollout {cfg.rollout.num_workers} x {rollout.engine}, learner "
          f"{cfg.learner.num_workers} x DeepSpeed ZeRO-{cfg.learner.zero_stage}", flush=True)
    sampling = SamplingParams(max_new_tokens=int(r.max_new_tokens),
                              temperature=float(r.temperature), top_k=int(r.top_k),
                              top_p=float(r.top_p))
    last = resumed
    progress = Progress(int(r.max_steps), "steps", done=first - 1)
    step = first
    try:
        for step in range(first, int(r.max_steps) + 1):
            metrics = rl_step(cfg, step, sampler, rollout, learners, sampling)
            if step % int(r.log_every) == 0 or step == int(r.max_steps):
                print(f"{_console_line(step, int(r.max_steps), metrics)} | "
                      f"{progress.line(step)}", flush=True)
            if tracker is not None:
                tracker.log(metrics, step)
            if step % int(r.save_every) == 0 or step == int(r.max_steps):
                last = learners.save(step, {"data": sampler.state_dict()})
        _check_in_sync(learners, rollout, names)
    except WorkerError as err:
        err.context = f"step {step}"
        raise
    finally:
        rollout.shutdown()
        learners.shutdown()
    final = ckpt.latest(Path(cfg.output_dir) / r.output_subdir)
    return final or Path(last)


def rl_step(cfg: DictConfig, step: int, sampler: ContrastiveBatcher, rollout: RolloutPool,
            learners: LearnerPool, sampling: SamplingParams) -> dict[str, float]:
    r = cfg.rl
    G = int(r.group_size)
    t0 = time.perf_counter()
    _, pairs = sampler.next_batch()
    sides = [p.query for p in pairs] + [p.target for p in pairs]
    seeds = ([prompt_seed(int(cfg.seed), step, i, "query") for i in range(len(pairs))]
             + [prompt_seed(int(cfg.seed), step, i, "target") for i in range(len(pairs))])
    completions = rollout.generate(sides, seeds, G, sampling)
    t1 = time.perf_counter()
    per_rank = len(pairs) // int(cfg.learner.num_workers)
    shards = [
        StepShard(step, pairs[a:a + per_rank], a, completions[a:a + per_rank],
                  completions[len(pairs) + a:len(pairs) + a + per_rank])
        for a in range(0, len(pairs), per_rank)
    ]
    per_learner = learners.step(shards)
    t2 = time.perf_counter()
    payload = learners.publish_weights()
    sync = rollout.load_weights(payload)
    t3 = time.perf_counter()
    metrics = {k: v for k, v in per_learner[0].items() if not k.startswith("actor/")}
    for key in per_learner[0]:
        if key.startswith("actor/"):
            metrics[key] = sum(m[key] for m in per_learner) / len(per_learner)
    metrics.pop("timing/learner_rank", None)
    sync_bytes = max(s["bytes"] for s in sync)
    metrics.update({
        "timing/rollout": t1 - t0, "timing/learner": t2 - t1, "timing/weight_sync": t3 - t2,
        "timing/step": t3 - t0, "weight_sync/bytes": float(sync_bytes),
        "weight_sync/gb_per_s": sync_bytes / max(t3 - t2, 1e-9) / 1e9,
    })
    return metrics


def start_in_sync(learners: Any, rollout: Any, names: list[str]) -> None:
    """Every rollout engine starts from the learners' weights: sent, then checked. (A vLLM
    engine can only report the digest of weights it has received; and a DeepSpeed bf16 engine
    holds bf16-rounded weights, which the rollout must generate with.)"""
    rollout.load_weights(learners.publish_weights())
    _check_in_sync(learners, rollout, names)


def rollout_dtype(cfg: DictConfig) -> str:
    """The rollout engines generate in the learners' training dtype: bit-equal weights after
    every sync. ``learner.bf16: auto`` is resolved by each rollout actor on its own device."""
    bf16 = str(cfg.learner.bf16).lower()
    if bf16 == "auto":
        return "auto"
    return "bfloat16" if bf16 == "true" else str(cfg.model.dtype)


def _check_in_sync(learners: LearnerPool, rollout: RolloutPool, names: list[str]) -> None:
    """Rollout actors must hold exactly the learners' trainable weights (bit for bit)."""
    reference = learners.digest()
    digests = rollout.digests(names)
    if any(d != reference for d in digests):
        raise RuntimeError(f"rollout weights differ from the learner's: {digests} vs {reference}")


def _console_line(step: int, total: int, m: dict[str, float]) -> str:
    parts = " ".join(f"{k.split('/')[-1]} {m[k]:.3f}" for k in CONSOLE_KEYS if k in m)
    timing = " ".join(f"{k.split('/')[-1]} {m[k]:.1f}s" for k in
                      ("timing/rollout", "timing/learner", "timing/weight_sync", "timing/step"))
    return f"[rl] step {step}/{total} {parts} | {timing}"
