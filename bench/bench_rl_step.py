"""Where a GRPO step's time goes on the CPU recipe, before and after the shared prefill, and
against the bare single-process floor of the same work.

    .venv/bin/python bench/bench_rl_step.py [--steps 6] [--checkpoint PATH] [--floor]
                                            [key=value ...]

Runs the CPU recipe's RL stage (2 rollout actors, 2 learner actors on a local Ray) for
``--steps`` steps from ``--checkpoint`` (default: the newest SFT checkpoint under runs/, else
the tiny model), in this process, once per ``--runs`` entry (default ``before now``): with each
prompt prefilled once per sample (``rollout.share_prefill=false``, the engine before: ``before``),
once for its samples (``now``), and once for its samples with the next step's rollouts generated
while the learners update (``rl.max_staleness=1``: ``off``).
Over the steps after the first it prints, side by side: the rollout phase, the learner phase,
the weight sync and the step (mean seconds), each pool's idle share, each phase's share of the
step, and the weight-sync bandwidth (the transport ``rl.weight_sync_transport`` picks: shm here)
as a ratio to a plain in-process ``torch`` copy of the same bytes.

``--floor`` also times, in this process after the two runs, the bare floor of the same work:
the same model, pairs and budgets, no Ray, no DeepSpeed, no weight sync, on ``--floor-threads``
torch threads (default 1, as each of the recipe's actors). Each step: one batched ``generate``
of all the step's sides x ``rl.group_size`` samples (each prompt prefilled once), a no-grad
policy forward (the rewards' embeddings) and a reference forward per side, the rewards, then a
forward/backward per side and one AdamW step. It prints the recipe's step as a multiple of the
floor's.

``--work`` runs no Ray: on one thread in this process, each pool's work per step (the step's
rollouts with each prompt prefilled per sample and once, and ``Learner.step`` on one rank for
the whole step), and the split of the recipe's CPUs between the pools that balances them (with
``--floor``, the floor too).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RUNS = {"prefill per sample (before)": ["rollout.share_prefill=false"],
        "prefill once (now)": ["rollout.share_prefill=true"],
        # The same, the next step's rollouts generated while the learners update (one step
        # off-policy): the two pools busy at once.
        "prefill once, one step off (off)": ["rollout.share_prefill=true",
                                             "rl.max_staleness=1"]}
PHASES = ("rollout", "learner", "weight_sync", "step")


def plain_copy_seconds(num_bytes: int, repeats: int = 5) -> float:
    import torch

    src = torch.empty(num_bytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def recipe(overrides: list[str]) -> Any:
    from umerl.config.recipe import load_recipe
    from umerl.driver import absolute_paths

    return absolute_paths(load_recipe(REPO / "recipes" / "cpu_tiny.yaml", [
        "output_dir=/tmp/umerl-bench-rl", "rl.resume=null", *overrides]))


def run_recipe(cfg: Any, checkpoint: str, steps: int) -> tuple[list[dict[str, float]], str]:
    """``steps`` RL steps of the recipe on Ray: each step's metrics and the sync transport."""
    import ray

    from rollout.pool import RolloutPool
    from umerl.rl import (
        RolloutStream,
        WeightSync,
        load_rl_datasets,
        rl_step,
        rollout_sampling,
    )
    from umerl.runtime.ray_start import init_ray
    from umerl.train.learner import LearnerPool
    from umerl.train.sft_data import ContrastiveBatcher

    init_ray(cfg)
    learners = LearnerPool(cfg, checkpoint, checkpoint)
    rollout = RolloutPool(cfg.rollout, checkpoint)
    link = WeightSync.connect(cfg, learners, rollout)
    link.sync(digest=True)
    r = cfg.rl
    sampler = ContrastiveBatcher(load_rl_datasets(cfg, checkpoint), int(r.pairs_per_step))
    sampling = rollout_sampling(cfg)
    stream = RolloutStream(cfg, sampler, rollout, sampling)
    rows = []
    try:
        for step in range(1, steps + 1):
            rows.append(rl_step(cfg, step, stream, learners, link))
            print(f"  step {step}: {rows[-1]['timing/step']:.2f} s", flush=True)
    finally:
        stream.close()
        rollout.shutdown()
        learners.shutdown()
        ray.shutdown()
    return rows, link.transport


class Floor:
    """The step's work in this process, nothing around it (see the module docstring)."""

    def __init__(self, cfg: Any, checkpoint: str):
        import torch

        from rewards import rewards_from_config
        from rollout.transformers_engine import TransformersEngine
        from umerl.model.loading import load_policy
        from umerl.rl import load_rl_datasets, rollout_sampling
        from umerl.train.engine import policy_module, set_trainable
        from umerl.train.reference import build_reference
        from umerl.train.sft_data import ContrastiveBatcher

        self.cfg, r = cfg, cfg.rl
        self.bundle = load_policy(checkpoint, dtype=cfg.model.dtype,
                                  max_pixels=cfg.model.max_pixels)
        set_trainable(self.bundle.model, dict(cfg.learner.train))
        self.module = policy_module(self.bundle, 0, int(cfg.learner.logprob_chunk_tokens))
        self.reference = build_reference(cfg, checkpoint, "cpu")
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=float(r.lr),
                                           weight_decay=float(r.weight_decay))
        self.rewards = rewards_from_config(cfg.rewards, base_dir=os.getcwd(),
                                           timeout_s=float(r.reward_timeout_s))
        self.G = int(r.group_size)
        # All of a step's sides in one generate call.
        self.engine = TransformersEngine(self.bundle, batch_size=2 * int(r.pairs_per_step) * self.G)
        self.sampling = rollout_sampling(cfg)
        self.sampler = ContrastiveBatcher(load_rl_datasets(cfg, checkpoint),
                                          int(r.pairs_per_step))

    def step(self, step: int) -> float:
        import torch

        from rewards import RewardContext
        from umerl.train.grpo import group_advantages, grpo_side_loss

        start = time.perf_counter()
        _, pairs = self.sampler.next_batch()
        encoder, G, r = self.bundle.encoder, self.G, self.cfg.rl
        sides = {"query": [encoder.encode(p.query) for p in pairs],
                 "target": [encoder.encode(p.target) for p in pairs]}
        self.module.eval()
        completions = self.engine.generate_encoded(sides["query"] + sides["target"], G,
                                                   self.sampling)
        flat = {"query": [c for group in completions[:len(pairs)] for c in group],
                "target": [c for group in completions[len(pairs):] for c in group]}
        inputs = {name: encoder.shared_prompt_inputs(sides[name], flat[name]) for name in sides}
        with torch.no_grad():
            scored = {name: self.module(**inputs[name], with_logprobs=False) for name in sides}
            ref = {name: self.reference(**inputs[name]).logprobs for name in sides}
        ids = flat["query"] + flat["target"]
        ctx = RewardContext.from_pairs(
            pairs, completions=self.bundle.tokenizer.batch_decode(ids, skip_special_tokens=True),
            completion_ids=ids, query_embeddings=scored["query"].gen,
            target_embeddings=scored["target"].gen, disc_query_embeddings=scored["query"].disc,
            disc_target_embeddings=scored["target"].disc, group_size=G, step=step,
            mask_shared_targets=bool(r.mask_shared_targets))
        advantages = group_advantages(self.rewards(ctx)[0], G, eps=float(r.adv_eps),
                                      norm_by_std=bool(r.norm_adv_by_std))
        half = advantages.shape[0] // 2
        self.module.train()
        self.optimizer.zero_grad()
        for name, rows in (("query", advantages[:half]), ("target", advantages[half:])):
            out = self.module(**inputs[name])
            loss, _ = grpo_side_loss(
                out.logprobs, None, ref[name], rows, out.completion_mask,
                int(r.max_completion_length or r.max_new_tokens), kl_beta=float(r.kl_beta),
                eps_low=float(r.clip_eps_low), eps_high=float(r.clip_eps_high),
                loss_agg_mode=str(r.loss_agg_mode))
            (loss / 2).backward()
        torch.nn.utils.clip_grad_norm_(
            [p for p in self.module.parameters() if p.requires_grad], float(r.grad_clip))
        self.optimizer.step()
        return time.perf_counter() - start


def floor_steps(cfg: Any, checkpoint: str, steps: int, threads: int) -> list[float]:
    import torch

    torch.set_num_threads(threads)
    floor = Floor(cfg, checkpoint)
    times = []
    for step in range(1, steps + 1):
        times.append(floor.step(step))
        print(f"  floor step {step}: {times[-1]:.2f} s", flush=True)
    return times


def pool_work(cfg: Any, checkpoint: str, steps: int) -> dict[str, list[float]]:
    """Each pool's work per step on one thread in this process (no Ray): the rollout pool's
    (every side of the step through the transformers engine, each prompt prefilled per sample
    and once, alternating which runs first) and the learner pool's (``Learner.step`` on one
    rank for the whole step: the recipe's two ranks' work less their all-reduce)."""
    import torch

    from rollout.pool import prompt_seed
    from rollout.transformers_engine import TransformersEngine
    from umerl.rl import load_rl_datasets, rollout_sampling
    from umerl.train import dist as udist
    from umerl.train.learner import Learner, StepShard
    from umerl.train.sft_data import ContrastiveBatcher

    torch.set_num_threads(1)
    udist.init_single_process()
    cfg = recipe(["learner.num_workers=1"])
    learner = Learner(cfg, checkpoint, checkpoint)
    r, G = cfg.rl, int(cfg.rl.group_size)
    engines = {"rollout, prefill per sample": TransformersEngine(learner.bundle,
                                                                 share_prefill=False),
               "rollout, prefill once": TransformersEngine(learner.bundle)}
    sampling = rollout_sampling(cfg)
    sampler = ContrastiveBatcher(load_rl_datasets(cfg, checkpoint), int(r.pairs_per_step))
    times: dict[str, list[float]] = {name: [] for name in [*engines, "learner"]}
    for step in range(1, steps + 1):
        _, pairs = sampler.next_batch()
        sides = [p.query for p in pairs] + [p.target for p in pairs]
        seeds = [prompt_seed(int(cfg.seed), step, i, side) for side in ("query", "target")
                 for i in range(len(pairs))]
        learner.bundle.model.eval()
        for name, engine in (engines.items() if step % 2 else reversed(engines.items())):
            start = time.perf_counter()
            completions = engine.generate(sides, G, sampling, seeds)
            times[name].append(time.perf_counter() - start)
        learner.bundle.model.train()
        start = time.perf_counter()
        learner.step(StepShard(step, pairs, 0, completions[:len(pairs)],
                               completions[len(pairs):]))
        times["learner"].append(time.perf_counter() - start)
        print(f"  step {step}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
              flush=True)
    return times


def report_work(times: dict[str, list[float]], cpus: float) -> None:
    """Each pool's single-thread seconds per step and the CPU split that balances them."""
    means = {name: statistics.fmean(t[1:] or t) for name, t in times.items()}
    print("\neach pool's work per step, one thread, no Ray (mean over steps after the first):")
    for name, seconds in means.items():
        print(f"  {name:30s} {seconds:6.2f} s")
    for name in list(means)[:2]:
        share = means[name] / (means[name] + means["learner"])
        print(f"  with {name}: the rollouts are {share:.0%} of the work: of {cpus:g} CPUs, "
              f"{share * cpus:.2f} to the rollout pool balances the two")


def report(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """The side-by-side table over the steps after the first (warm-up); the means."""
    measured = {label: rows[1:] or rows for label, rows in runs.items()}
    means = {label: {p: statistics.fmean(m[f"timing/{p}"] for m in rows) for p in PHASES}
             | {f"{pool}_idle": statistics.fmean(m[f"{pool}/idle_ratio"] for m in rows)
                for pool in ("rollout", "learner")}
             for label, rows in measured.items()}
    steps = len(next(iter(measured.values())))
    print(f"\nmean over {steps} steps after the first, 2 rollout + 2 learner actors:")
    print(f"{'':30s} {'rollout s':>9s} {'learner s':>9s} {'sync s':>7s} {'step s':>7s} "
          f"{'rollout idle':>12s} {'learner idle':>12s}")
    for label, m in means.items():
        print(f"{label:30s} {m['rollout']:9.2f} {m['learner']:9.2f} {m['weight_sync']:7.3f} "
              f"{m['step']:7.2f} {m['rollout_idle']:12.1%} {m['learner_idle']:12.1%}")
    by_key = {label.split("(")[1].rstrip(")"): m for label, m in means.items()}
    if "before" in by_key and "now" in by_key:
        before, now = by_key["before"], by_key["now"]
        print(f"now vs before: rollout phase {before['rollout'] / now['rollout']:.2f}x faster, "
              f"step {before['step'] / now['step']:.2f}x faster")
    if "now" in by_key and "off" in by_key:
        print(f"one step off vs now: step {by_key['now']['step'] / by_key['off']['step']:.2f}x "
              "faster")
    for label, m in means.items():
        shares = ", ".join(f"{p} {m[p] / m['step']:.1%}" for p in PHASES[:-1])
        print(f"  {label}: share of the step: {shares}, other (driver) "
              f"{1 - sum(m[p] for p in PHASES[:-1]) / m['step']:.1%}")
    return means


def sync_bandwidth(rows: list[dict[str, float]], workers: int, transport: str) -> None:
    sync_bytes = rows[-1]["weight_sync/bytes"]
    sync_seconds = statistics.median(m["timing/weight_sync"] for m in rows[1:] or rows)
    copy_seconds = plain_copy_seconds(int(sync_bytes))
    print(f"\nweight sync: {sync_bytes / 1e6:.1f} MB in {sync_seconds * 1e3:.1f} ms "
          f"({sync_bytes / sync_seconds / 1e9:.3f} GB/s) to {workers} actors over {transport}; "
          f"plain in-process copy of the same bytes: {copy_seconds * 1e3:.2f} ms "
          f"({sync_bytes / copy_seconds / 1e9:.2f} GB/s); ratio "
          f"{sync_seconds / copy_seconds:.0f}x the copy time")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--runs", nargs="+", choices=["before", "now", "off"],
                        default=["before", "now"], help="which runs: the prefill per sample "
                        "(before), once (now), once and one step off-policy (off)")
    parser.add_argument("--floor", action="store_true")
    parser.add_argument("--work", action="store_true",
                        help="only each pool's work per step in this process, no Ray")
    # One: on a shared 2-core machine two threads spin against the other jobs (a floor step
    # took 40-70 s on 2 threads at load 6.7, 2.6 s on one).
    parser.add_argument("--floor-threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from bench.bench_async import default_checkpoint
    from umerl.driver import ensure_tiny_model

    cfg = recipe(args.overrides)
    checkpoint = (args.checkpoint or default_checkpoint()
                  or ensure_tiny_model(cfg.model.tiny))
    print(f"from {checkpoint}; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs", flush=True)
    if args.work:
        report_work(pool_work(cfg, checkpoint, args.steps),
                    float(cfg.rollout.num_workers * cfg.rollout.cpus_per_worker
                          + cfg.learner.num_workers * cfg.learner.cpus_per_worker))
        if args.floor:
            floor = floor_steps(cfg, checkpoint, args.steps, args.floor_threads)
            print(f"floor step {statistics.fmean(floor[1:] or floor):.2f} s "
                  f"(mean over steps after the first)")
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
        return
    runs, transport = {}, ""
    for label, switch in RUNS.items():
        if label.split("(")[1].rstrip(")") not in args.runs:
            continue
        print(label, flush=True)
        runs[label], transport = run_recipe(recipe([*args.overrides, *switch]), checkpoint,
                                            args.steps)
    means = report(runs)
    sync_bandwidth(runs[list(runs)[-1]], int(cfg.rollout.num_workers), transport)
    if args.floor:
        threads = args.floor_threads
        print(f"\nbare floor, one process, {threads} torch thread(s):", flush=True)
        floor = statistics.fmean(floor_steps(cfg, checkpoint, args.steps, threads)[1:])
        print(f"floor step {floor:.2f} s (mean over steps 2..{args.steps})")
        for label, m in means.items():
            print(f"  {label}: step {m['step']:.2f} s = {m['step'] / floor:.2f}x the floor "
                  f"(floor / step {floor / m['step']:.2f})")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
