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

import copy
import time
import uuid
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from rollout.pool import RolloutPool, prompt_seed
from rollout.weight_sync import BucketPlan, ChannelSpec, shm_free_bytes
from umerl import checkpoint as ckpt
from umerl.console import Progress
from umerl.data import Pair, read_rl_pairs
from umerl.faults import parse_faults
from umerl.learner import LearnerPool, StepShard
from umerl.remote import WorkerError, gather
from umerl.sampling import SamplingParams
from umerl.sft_data import ContrastiveBatcher, load_pair_datasets

# metric -> its console label
CONSOLE_KEYS = {"reward/total": "total", "reward/format": "format",
                "reward/embedding": "embedding", "reward/rank_score": "rank_score",
                "reward/format/group_std": "format_sd", "reward/embedding/group_std": "emb_sd",
                "reward/zero_advantage_groups": "zero_adv", "actor/kl": "kl",
                "actor/clip_fraction": "clip_fraction",
                "rollout/completion_len_mean": "completion_len_mean"}


def load_rl_datasets(cfg: DictConfig, policy: str) -> dict[str, list[Pair]]:
    """The RL pairs, with the same line and prompt-length checks as the preflight."""
    from umerl.model import load_encoder, prompt_limit

    return load_pair_datasets(list(cfg.rl.data), read_rl_pairs, bool(cfg.data.skip_invalid),
                              load_encoder(policy),
                              prompt_limit(cfg.data.max_prompt_tokens, policy), key="rl.data")


def run_rl(cfg: DictConfig, policy: str, reference: str, tracker: Any = None,
           datasets: dict[str, list[Pair]] | None = None) -> Path:
    """GRPO from ``policy`` (KL to the frozen ``reference``); returns the last checkpoint.
    ``datasets``: RL pairs already read and checked (the driver's preflight), else read here.

    A dead rollout actor is replaced inside the step (``RolloutPool``, ``WeightSync``). A dead
    learner cannot be: its shard of the optimizer state is gone. So the stage restarts from its
    last complete checkpoint (model, optimizer, data cursor, RNG: the run continues exactly as
    an uninterrupted one from there), at most ``rl.max_failures`` times; injected faults fire
    in the first attempt only."""
    datasets = datasets or load_rl_datasets(cfg, policy)
    limit = int(cfg.rl.max_failures)
    failures = 0
    while True:
        try:
            return _run_rl(cfg, policy, reference, tracker, datasets)
        except WorkerError as err:
            learner_died = any(name.startswith("learner") for name in err.dead)
            if not learner_died:
                raise
            if failures >= limit:
                err.summary += f"; rl.max_failures={limit} restarts already used"
                raise
            failures += 1
            print(f"[rl] {err}: restarting the RL stage from its last complete checkpoint "
                  f"(restart {failures} of {limit})", flush=True)
            cfg = copy.deepcopy(cfg)
            cfg.rl.resume = "auto"  # this run's own checkpoints
            cfg.faults.kill = []


def _run_rl(cfg: DictConfig, policy: str, reference: str, tracker: Any,
            datasets: dict[str, list[Pair]]) -> Path:
    r = cfg.rl
    sampler = ContrastiveBatcher(datasets, int(r.pairs_per_step), seed=int(cfg.seed))
    learners = LearnerPool(cfg, policy, reference)
    resumed, client = learners.resume()
    first = int(client.get("step", 0)) + 1
    if resumed:
        sampler.load_state_dict(client["data"])
    rollout = RolloutPool(cfg.rollout, resumed or policy, rollout_dtype(cfg), cfg.model.dtype,
                          parse_faults(cfg.faults.kill))
    link = WeightSync.connect(cfg, learners, rollout)
    link.sync(digest=True)  # every engine starts from the learners' (bf16-rounded) weights
    print(f"[rl] {'resumed from ' + resumed if resumed else 'from ' + policy}: steps "
          f"{first}..{r.max_steps}, {r.pairs_per_step} pairs x G={r.group_size} per step, "
          f"rollout {cfg.rollout.num_workers} x {rollout.engine}, learner "
          f"{cfg.learner.num_workers} x DeepSpeed ZeRO-{cfg.learner.zero_stage}, weight sync "
          f"{link.transport} ({link.plan.bytes / 2**20:.1f} MB in {len(link.plan.buckets)} "
          "buckets)", flush=True)
    sampling = SamplingParams(max_new_tokens=int(r.max_new_tokens),
                              temperature=float(r.temperature), top_k=int(r.top_k),
                              top_p=float(r.top_p))
    last = resumed
    progress = Progress(int(r.max_steps), "steps", done=first - 1)
    step = first
    try:
        for step in range(first, int(r.max_steps) + 1):
            metrics = rl_step(cfg, step, sampler, rollout, learners, sampling, link)
            if step % int(r.log_every) == 0 or step == int(r.max_steps):
                print(f"{_console_line(step, int(r.max_steps), metrics)} | "
                      f"{progress.line(step)}", flush=True)
            if tracker is not None:
                tracker.log(metrics, step)
            if step % int(r.save_every) == 0 or step == int(r.max_steps):
                last = learners.save(step, {"data": sampler.state_dict()})
    except WorkerError as err:
        err.context = f"step {step}"
        raise
    finally:
        rollout.shutdown()
        learners.shutdown()
    final = ckpt.latest(Path(cfg.output_dir) / r.output_subdir)
    return final or Path(last)


def rl_step(cfg: DictConfig, step: int, sampler: ContrastiveBatcher, rollout: RolloutPool,
            learners: LearnerPool, sampling: SamplingParams, link: WeightSync
            ) -> dict[str, float]:
    r = cfg.rl
    G = int(r.group_size)
    t0 = time.perf_counter()
    _, pairs = sampler.next_batch()
    sides = [p.query for p in pairs] + [p.target for p in pairs]
    seeds = ([prompt_seed(int(cfg.seed), step, i, "query") for i in range(len(pairs))]
             + [prompt_seed(int(cfg.seed), step, i, "target") for i in range(len(pairs))])
    completions = rollout.generate(sides, seeds, G, sampling, step)
    t1 = time.perf_counter()
    per_rank = len(pairs) // int(cfg.learner.num_workers)
    shards = [
        StepShard(step, pairs[a:a + per_rank], a, completions[a:a + per_rank],
                  completions[len(pairs) + a:len(pairs) + a + per_rank])
        for a in range(0, len(pairs), per_rank)
    ]
    per_learner = learners.step(shards)
    t2 = time.perf_counter()
    every = int(r.weight_sync_verify_every)
    sync = link.sync(step == int(r.max_steps) or (every > 0 and step % every == 0), step)
    t3 = time.perf_counter()
    metrics = {k: v for k, v in per_learner[0].items() if not k.startswith("actor/")}
    for key in per_learner[0]:
        if key.startswith("actor/"):
            metrics[key] = sum(m[key] for m in per_learner) / len(per_learner)
    metrics.pop("timing/learner_rank", None)
    metrics.update(sync)
    metrics["fault/rollout_restarts"] = float(rollout.restarts)
    metrics["fault/recovery_s"] = rollout.recovery_s
    rollout.recovery_s = 0.0
    metrics.update({
        "timing/rollout": t1 - t0, "timing/learner": t2 - t1, "timing/weight_sync": t3 - t2,
        "timing/step": t3 - t0, "weight_sync/gb_per_s": sync["weight_sync/bytes"]
        / max(t3 - t2, 1e-9) / 1e9,
    })
    return metrics


@dataclass
class WeightSync:
    """The run's weight-sync group: learner rank 0 -> every rollout worker, over the
    transport ``rl.weight_sync_transport`` names (protocol: ``rollout/weight_sync.py``)."""

    cfg: DictConfig
    learners: Any
    rollout: Any
    plan: BucketPlan
    transport: str
    timeout_s: float
    digest: str | None = None  # of the weights of the last sync that compared digests

    @classmethod
    def connect(cls, cfg: DictConfig, learners: Any, rollout: Any) -> WeightSync:
        """Plan the buckets once, pick the transport, and join every rank to the group."""
        r = cfg.rl
        plan = BucketPlan.build(learners.weight_specs(),
                                int(float(r.weight_sync_bucket_mb) * (1 << 20)))
        address, port = learners.endpoint()
        receivers = rollout.sync_ranks()
        transport = choose_transport(str(r.weight_sync_transport), learners.info[0]["device"],
                                     address, [x["node"] for x in receivers], plan.largest)
        counts = [int(x["ranks"]) for x in receivers]
        spec = ChannelSpec(transport, address, int(port), 1 + sum(counts),
                           float(r.weight_sync_timeout_s), plan.largest,
                           shm_prefix=f"/dev/shm/umerl-weights-{uuid.uuid4().hex[:12]}")
        link = cls(cfg, learners, rollout, plan, transport, spec.timeout_s)
        first_ranks = list(accumulate([1] + counts))[:-1]
        link._wait(learners.open_weight_sync(spec, plan),
                   rollout.open_weight_sync(spec, plan, first_ranks,
                                            learners.info[0]["model_type"]))
        return link

    def sync(self, digest: bool = False, step: int = 0) -> dict[str, float]:
        """One sync (the one after ``step``); with ``digest``, every rollout engine must hold
        the learners' weights bit for bit (the sender's fingerprint of what it sent vs each
        engine's of what it holds). A rollout actor that dies mid-sync is replaced, the group
        re-formed and the sync repeated; a replacement is always synced with the digest."""
        while True:
            if self.rollout.stale:
                start = time.perf_counter()
                self.reconnect()
                self.rollout.recovery_s += time.perf_counter() - start
                digest = True
            try:
                start = time.perf_counter()
                return self._sync(digest, step)
            except WorkerError as err:
                dead = [i for i, name in enumerate(self.rollout.names) if name in err.dead]
                if not dead or any(n in err.dead for n in self.learners.names):
                    raise
                for i in dead:
                    self.rollout.replace(i, err.summary if err.worker == self.rollout.names[i]
                                         else "actor died", step, "weight_sync")
                self.rollout.recovery_s += time.perf_counter() - start

    def reconnect(self) -> None:
        """A new group for the current actors (a replacement takes its predecessor's ranks)."""
        fresh = WeightSync.connect(self.cfg, self.learners, self.rollout)
        self.transport, self.plan = fresh.transport, fresh.plan

    def _sync(self, digest: bool, step: int) -> dict[str, float]:
        sent, received = self._wait(self.learners.send_weights(digest),
                                    self.rollout.receive_weights(digest, step))
        sender = sent[0]
        if digest:
            for name, got in zip(self.rollout.names, received, strict=True):
                if got["digest"] != sender["digest"]:
                    raise RuntimeError(f"weight sync: {name} holds weights that differ from the "
                                       f"learners' ({got['digest'][:12]} vs "
                                       f"{sender['digest'][:12]}, transport {self.transport})")
            self.digest = sender["digest"]
            self.rollout.mark_synced()
        return {"weight_sync/bytes": float(sender["bytes"]),
                "weight_sync/send_s": float(sender["seconds"])}

    def _wait(self, *calls: tuple[list[Any], list[str]]) -> list[list[Any]]:
        """Both sides of a collective at once, bounded by rl.weight_sync_timeout_s."""
        refs = [ref for side, _ in calls for ref in side]
        names = [name for _, side in calls for name in side]
        results = gather(refs, names, timeout_s=self.timeout_s,
                         timeout_key="rl.weight_sync_timeout_s")
        out, start = [], 0
        for side, _ in calls:
            out.append(results[start:start + len(side)])
            start += len(side)
        return out


def choose_transport(requested: str, learner_device: str, learner_node: str,
                     rollout_nodes: list[str], largest_bucket: int) -> str:
    """``auto``: NCCL when the learners are on GPUs; on CPU, shared memory when every rollout
    actor is on learner rank 0's node (and /dev/shm has room for two buckets), else gloo."""
    cuda = learner_device.startswith("cuda")
    local = all(node == learner_node for node in rollout_nodes)
    room = shm_free_bytes() > 2 * largest_bucket + (64 << 20)
    if requested == "auto":
        return "nccl" if cuda else ("shm" if local and room else "gloo")
    key = "rl.weight_sync_transport"
    if requested == "nccl" and not cuda:
        raise ValueError(f"{key}=nccl needs learners on CUDA; they run on {learner_device}")
    if requested == "shm" and not local:
        raise ValueError(f"{key}=shm needs every rollout actor on learner rank 0's node "
                         f"({learner_node}); they are on {sorted(set(rollout_nodes))}")
    if requested == "shm" and not room:
        raise ValueError(f"{key}=shm needs {2 * largest_bucket >> 20} MB free in /dev/shm")
    return requested


def rollout_dtype(cfg: DictConfig) -> str:
    """The rollout engines generate in the learners' training dtype: bit-equal weights after
    every sync. ``learner.bf16: auto`` is resolved by each rollout actor on its own device."""
    bf16 = str(cfg.learner.bf16).lower()
    if bf16 == "auto":
        return "auto"
    return "bfloat16" if bf16 == "true" else str(cfg.model.dtype)


def _console_line(step: int, total: int, m: dict[str, float]) -> str:
    parts = " ".join(f"{label} {m[k]:.3f}" for k, label in CONSOLE_KEYS.items() if k in m)
    timing = " ".join(f"{k.split('/')[-1]} {m[k]:.1f}s" for k in
                      ("timing/rollout", "timing/learner", "timing/weight_sync", "timing/step"))
    return f"[rl] step {step}/{total} {parts} | {timing}"
