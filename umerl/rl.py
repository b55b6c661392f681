"""The GRPO loop, run by the driver: sample pairs -> rollout -> learn -> sync weights -> log.

    for each step:
        pairs      <- the RL sampler (one sub-dataset per step, resumable cursor)
        rollout    G completions per query prompt AND per target prompt (rollout pool)
        learner    score, reward, advantages, clipped loss + KL, optimizer step (learner pool)
        sync       trainable weights: learner rank 0 -> every rollout actor
        log        reward parts, rank score, KL, clip fraction, lengths, phase timings, idle
        checkpoint every rl.save_every steps (learners write it; resume=auto continues)

With ``rl.max_staleness: 1`` (one step off-policy) the rollout of step t+1 runs during the
learner phase of step t, with the weights the rollout pool holds (those of step t-1); both
pools meet at the sync. Step t+1's learners are then one update ahead of the weights that
sampled its completions: the clipped ratio takes the rollout engine's log-probs of those
weights. A checkpoint records the rollouts generated ahead, so a resumed run continues
exactly as an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from rollout.pool import RolloutPool, prompt_seed
from rollout.weight_sync import BucketPlan, ChannelSpec, shm_free_bytes
from umerl.data.formats import Pair, Side, read_rl_pairs
from umerl.model.sampling import SamplingParams
from umerl.runtime.console import Progress
from umerl.runtime.faults import recipe_faults
from umerl.runtime.remote import WorkerError, gather
from umerl.train import checkpoint as ckpt
from umerl.train.learner import LearnerPool, StepShard
from umerl.train.sft_data import ContrastiveBatcher, load_pair_datasets

# metric -> its console label
CONSOLE_KEYS = {"reward/total": "total", "reward/format": "format",
                "reward/embedding": "embedding", "reward/rank_score": "rank_score",
                "reward/format/group_std": "format_sd", "reward/embedding/group_std": "emb_sd",
                "reward/zero_advantage_groups": "zero_adv", "actor/kl": "kl",
                "actor/clip_fraction": "clip_fraction", "actor/ratio_mean": "ratio",
                "rollout/staleness": "stale", "rollout/pool_size": "pool",
                "rollout/answer_accuracy/query": "answer_acc",
                "rollout/completion_len_mean": "completion_len_mean"}
COUNTS = {"rollout/pool_size"}  # shown as whole numbers


def load_rl_datasets(cfg: DictConfig, policy: str) -> dict[str, list[Pair]]:
    """The RL pairs, with the same line and prompt-length checks as the preflight."""
    from umerl.model.loading import load_encoder, prompt_limit

    return load_pair_datasets(list(cfg.rl.data), read_rl_pairs, bool(cfg.data.skip_invalid),
                              load_encoder(policy, cfg.model.max_pixels),
                              prompt_limit(cfg.data.max_prompt_tokens, policy), key="rl.data")


def run_rl(cfg: DictConfig, policy: str, reference: str, tracker: Any = None,
           datasets: dict[str, list[Pair]] | None = None) -> Path:
    """GRPO from ``policy`` (KL to the frozen ``reference``); returns the last checkpoint.
    ``datasets``: RL pairs already read and checked (the driver's preflight), else read here.

    A dead rollout actor is replaced inside the step (``RolloutPool``, ``WeightSync``). A dead
    learner cannot be: its shard of the optimizer state is gone. So the stage restarts from its
    last complete checkpoint (model, optimizer, data cursor, RNG: the run continues exactly as
    an uninterrupted one from there), at most ``rl.max_failures`` times; injected faults fire
    in the first attempt only. A hung learner (no answer within ``learner.step_timeout_s``, or
    stuck in a sync past ``rl.weight_sync_timeout_s``) is killed and counts as dead."""
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
            cfg.faults.kill, cfg.faults.stall = [], []


def _run_rl(cfg: DictConfig, policy: str, reference: str, tracker: Any,
            datasets: dict[str, list[Pair]]) -> Path:
    """One attempt. Whatever it started (learners, rollout actors, their placement groups) is
    gone when it returns or raises, whatever failed and where: a restart's new learner group
    must not compete with this attempt's. Left in place, a group whose node was lost is
    re-placed by Ray on the capacity the restart needs, and the restart cannot place its own."""
    with ExitStack() as started:  # shut down in reverse order, each even if another fails
        return _attempt(cfg, policy, reference, tracker, datasets, started)


def _attempt(cfg: DictConfig, policy: str, reference: str, tracker: Any,
             datasets: dict[str, list[Pair]], started: ExitStack) -> Path:
    r = cfg.rl
    sampler = ContrastiveBatcher(datasets, int(r.pairs_per_step), seed=int(cfg.seed))
    learners = LearnerPool(cfg, policy, reference)
    started.callback(learners.shutdown)
    resumed, client = learners.resume()
    first = int(client.get("step", 0)) + 1
    if resumed:
        sampler.load_state_dict(client["data"])
    rollout = RolloutPool(cfg.rollout, resumed or policy, cfg.learner.bf16, cfg.model.dtype,
                          recipe_faults(cfg.faults), max_pixels=cfg.model.max_pixels)
    started.callback(rollout.shutdown)
    link = WeightSync.connect(cfg, learners, rollout)
    # Every engine starts from the learners' (bf16-rounded) weights.
    link.sync(digest=True, step=first - 1)
    print(f"[rl] {'resumed from ' + resumed if resumed else 'from ' + policy}: steps "
          f"{first}..{r.max_steps}, {r.pairs_per_step} pairs x G={r.group_size} per step, "
          f"rollout {len(rollout.actors)}{_elastic(rollout)} x {rollout.engine_kind}, learner "
          f"{cfg.learner.num_workers} x DeepSpeed ZeRO-{cfg.learner.zero_stage} "
          f"({learners.info[0]['passes']}), weight sync "
          f"{link.transport} ({link.plan.bytes / 2**20:.1f} MB in {len(link.plan.buckets)} "
          f"buckets), max_staleness {r.max_staleness}", flush=True)
    sampling = rollout_sampling(cfg)
    ahead = client.get("rollouts_ahead")
    stream = RolloutStream(cfg, sampler, rollout, sampling,
                           Rollouts.from_state(ahead) if ahead else None)
    started.callback(stream.close)  # first: a generation in flight ends before its pool
    last = resumed
    progress = Progress(int(r.max_steps), "steps", done=first - 1)
    step = first
    try:
        for step in range(first, int(r.max_steps) + 1):
            metrics = rl_step(cfg, step, stream, learners, link)
            if step % int(r.log_every) == 0 or step == int(r.max_steps):
                print(f"{_console_line(step, int(r.max_steps), metrics)} | "
                      f"{progress.line(step)}", flush=True)
            if tracker is not None:
                tracker.log(metrics, step)
            if step % int(r.save_every) == 0 or step == int(r.max_steps):
                last = learners.save(step, stream.state_dict())
    except WorkerError as err:
        err.context = f"step {step}"
        raise
    final = ckpt.latest(Path(cfg.output_dir) / r.output_subdir)
    return final or Path(last)


def rollout_sampling(cfg: DictConfig) -> SamplingParams:
    """How the rollouts sample: the rl stage's budget, temperature, top-k and top-p."""
    r = cfg.rl
    return SamplingParams(max_new_tokens=int(r.max_new_tokens), temperature=float(r.temperature),
                          top_k=int(r.top_k), top_p=float(r.top_p))


def rl_step(cfg: DictConfig, step: int, stream: RolloutStream, learners: LearnerPool,
            link: WeightSync) -> dict[str, float]:
    """One step. Its rollouts come from the stream (generated now, or during the previous
    step); with max_staleness 1 the next step's start generating before the learners do."""
    r = cfg.rl
    t0 = time.perf_counter()
    batch = stream.take(step, link.version)
    if int(r.max_staleness) > 0 and step < int(r.max_steps):
        stream.start(step + 1, link.version)
    t1 = time.perf_counter()
    per_learner = learners.step(shards_of(batch, step, int(cfg.learner.num_workers)))
    t2 = time.perf_counter()
    ahead_s = stream.finish()  # the next step's rollouts, if they are being generated
    t3 = time.perf_counter()
    every = int(r.weight_sync_verify_every)
    sync = link.sync(step == int(r.max_steps) or (every > 0 and step % every == 0), step)
    t4 = time.perf_counter()
    metrics = {k: v for k, v in per_learner[0].items() if not k.startswith("actor/")}
    for key in per_learner[0]:
        if key.startswith("actor/"):
            metrics[key] = sum(m[key] for m in per_learner) / len(per_learner)
    metrics.update(sync)
    metrics["fault/rollout_restarts"] = float(stream.rollout.restarts)
    metrics["fault/recovery_s"] = stream.rollout.recovery_s
    stream.rollout.recovery_s = 0.0
    step_s, sync_s = t4 - t0, t4 - t3
    generating = (t1 - t0 if batch.step_generated == step else 0.0) + ahead_s
    metrics.update({
        "timing/rollout": generating, "timing/learner": t2 - t1,
        "timing/rollout_wait": t3 - t2, "timing/weight_sync": sync_s, "timing/step": step_s,
        "weight_sync/gb_per_s": sync["weight_sync/bytes"] / max(sync_s, 1e-9) / 1e9,
        # Share of the step each pool spent waiting for the other (verl's idle ratios).
        "rollout/idle_ratio": max(0.0, 1 - (generating + sync_s) / step_s),
        "learner/idle_ratio": max(0.0, 1 - (t2 - t1 + sync_s) / step_s),
        "rollout/staleness": float(step - 1 - batch.version),
        "rollout/pool_size": float(batch.pool_size),
        "rollout/actors_lost": float(stream.rollout.lost),
        "rollout/actors_added": float(stream.rollout.added),
    })
    return metrics


def shards_of(batch: Rollouts, step: int, num_learners: int) -> list[StepShard]:
    """Each learner rank's contiguous slice of the step's pairs, with their completions (and
    their log-probs if the learners have moved on since the weights that sampled them)."""
    P = len(batch.pairs)
    per_rank = P // num_learners
    staleness = step - 1 - batch.version  # the learners hold the weights after step - 1
    lps = batch.logprobs if staleness > 0 else None
    return [
        StepShard(step, batch.pairs[a:a + per_rank], a, batch.completions[a:a + per_rank],
                  batch.completions[P + a:P + a + per_rank], staleness,
                  None if lps is None else lps[a:a + per_rank],
                  None if lps is None else lps[P + a:P + a + per_rank])
        for a in range(0, P, per_rank)
    ]


@dataclass
class Rollouts:
    """A step's pairs and their G completions per side (all query sides, then all targets)."""

    step: int
    pairs: list[Pair]
    completions: list[list[list[int]]]
    logprobs: list[list[list[float]]] | None  # per token, under the weights that sampled them
    version: int  # the step whose update produced those weights (0: the starting policy)
    step_generated: int  # the step during which they were generated
    seconds: float = 0.0
    pool_size: int = 0  # rollout actors that generated them (healthy at the end)

    def state(self) -> dict[str, Any]:
        """Plain lists and dicts for the checkpoint's client state."""
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Rollouts:
        pairs = [Pair(p["id"], p["task"], Side(**p["query"]), Side(**p["target"]), p["meta"])
                 for p in state["pairs"]]
        return cls(**{**state, "pairs": pairs})


class RolloutStream:
    """Where each step's rollouts come from: generated when the step asks for them, or ahead,
    in a driver thread, while the learners update on the previous step's (``start``)."""

    def __init__(self, cfg: DictConfig, sampler: ContrastiveBatcher, rollout: RolloutPool,
                 sampling: SamplingParams, ready: Rollouts | None = None):
        self.cfg, self.sampler, self.rollout, self.sampling = cfg, sampler, rollout, sampling
        self.ready = ready  # generated ahead (or restored from a checkpoint), not yet used
        self.pending: Future | None = None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="rollout-ahead")

    def generate(self, step: int, version: int, during: int, logprobs: bool) -> Rollouts:
        start = time.perf_counter()
        _, pairs = self.sampler.next_batch()
        seed = int(self.cfg.seed)
        sides = [p.query for p in pairs] + [p.target for p in pairs]
        seeds = ([prompt_seed(seed, step, i, "query") for i in range(len(pairs))]
                 + [prompt_seed(seed, step, i, "target") for i in range(len(pairs))])
        completions, lps = self.rollout.generate(sides, seeds, int(self.cfg.rl.group_size),
                                                 self.sampling, step, logprobs)
        return Rollouts(step, pairs, completions, lps, version, during,
                        time.perf_counter() - start, self.rollout.generated_by)

    def take(self, step: int, version: int) -> Rollouts:
        """Step ``step``'s rollouts: the ones generated ahead, else generated now."""
        batch, self.ready = self.ready, None
        if batch is not None:
            if batch.step != step:
                raise RuntimeError(f"rollouts generated ahead are for step {batch.step}, "
                                   f"not {step}")
            return batch
        return self.generate(step, version, step, logprobs=False)

    def start(self, step: int, version: int) -> None:
        """Generate step ``step``'s rollouts in the background with the weights of ``version``
        (the learners will have moved one update past them: their log-probs come along)."""
        self.pending = self.executor.submit(self.generate, step, version, step - 1, True)

    def finish(self) -> float:
        """Wait for the rollouts being generated ahead; returns their generation time."""
        if self.pending is None:
            return 0.0
        future, self.pending = self.pending, None
        self.ready = future.result()
        return self.ready.seconds

    def state_dict(self) -> dict[str, Any]:
        """The sampler's cursor and the rollouts generated ahead: what a resume needs."""
        return {"data": self.sampler.state_dict(),
                "rollouts_ahead": self.ready.state() if self.ready else None}

    def close(self) -> None:
        """Let a generation in flight end (bounded by rollout.call_timeout_s) before the pool
        goes: killing its actors under it would read as actor deaths to replace."""
        if self.pending is not None:
            self.pending.exception()
            self.pending = None
        self.executor.shutdown(wait=True)


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
    version: int = 0  # the step whose update the rollout engines hold (0: the starting one)

    @classmethod
    def connect(cls, cfg: DictConfig, learners: Any, rollout: Any) -> WeightSync:
        """Plan the buckets once, pick the transport, and join every rank to the group."""
        r = cfg.rl
        plan = BucketPlan.build(learners.weight_specs(),
                                int(float(r.weight_sync_bucket_mb) * (1 << 20)))
        address, port = learners.endpoint()
        receivers = rollout.sync_ranks()
        # Nodes by id: several nodes may share one address (raylets on one machine).
        transport = choose_transport(str(r.weight_sync_transport), learners.info[0]["device"],
                                     learners.info[0]["node_id"],
                                     [x["node"] for x in receivers], plan.largest)
        counts = [int(x["ranks"]) for x in receivers]
        spec = ChannelSpec(transport, address, int(port), 1 + sum(counts),
                           float(r.weight_sync_timeout_s), plan.largest,
                           shm_prefix=f"/dev/shm/umerl-weights-{uuid.uuid4().hex[:12]}")
        link = cls(cfg, learners, rollout, plan, transport, spec.timeout_s)
        first_ranks = list(accumulate([1] + counts))[:-1]
        link._wait(learners.async_open_weight_sync(spec, plan),
                   rollout.async_open_weight_sync(spec, plan, first_ranks,
                                                  learners.info[0]["model_type"]))
        return link

    def sync(self, digest: bool = False, step: int = 0) -> dict[str, float]:
        """One sync (the one after ``step``); with ``digest``, every rollout engine must hold
        the learners' weights bit for bit (the sender's fingerprint of what it sent vs each
        engine's of what it holds). A rollout actor that dies mid-sync is replaced (or, its
        node gone, dropped), the group re-formed and the sync repeated; a replacement is always
        synced with the digest. First the pool resizes (``RolloutPool.resize``): actors added
        at this step boundary get these weights before they generate, digest-checked."""
        while True:
            self.rollout.resize(step)
            if self.rollout.stale or self.rollout.regroup:
                start = time.perf_counter()
                self.reconnect()
                self.rollout.recovery_s += time.perf_counter() - start
                digest = digest or bool(self.rollout.stale)
            try:
                start = time.perf_counter()
                stats = self._sync(digest, step)
                self.version = step
                return stats
            except WorkerError as err:
                dead = [i for i, name in enumerate(self.rollout.names) if name in err.dead]
                if not dead or any(n in err.dead for n in self.learners.names):
                    raise
                for name in [self.rollout.names[i] for i in dead]:
                    i = self.rollout.names.index(name)  # a drop moves the later ones up
                    self.rollout.lose(i, err.summary if err.worker == name else "actor died",
                                      step, "weight_sync", err.details)
                self.rollout.recovery_s += time.perf_counter() - start

    def reconnect(self) -> None:
        """A new group for the current actors (a replacement takes its predecessor's ranks)."""
        fresh = WeightSync.connect(self.cfg, self.learners, self.rollout)
        self.transport, self.plan = fresh.transport, fresh.plan
        self.rollout.regroup = False

    def _sync(self, digest: bool, step: int) -> dict[str, float]:
        sent, received = self._wait(self.learners.async_send_weights(digest),
                                    self.rollout.async_receive_weights(digest, step))
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
        """Both sides of a collective at once, bounded by rl.weight_sync_timeout_s. Learners
        still in it then are hung (their own deadline, from when they started, is later):
        killed and counted as dead, so the stage restarts from its checkpoint."""
        refs = [ref for side, _ in calls for ref in side]
        names = [name for _, side in calls for name in side]
        try:
            results = gather(refs, names, timeout_s=self.timeout_s,
                             timeout_key="rl.weight_sync_timeout_s")
        except WorkerError as err:
            self.learners.kill_hung(err)
            raise
        out, start = [], 0
        for side, _ in calls:
            out.append(results[start:start + len(side)])
            start += len(side)
        return out


def choose_transport(requested: str, learner_device: str, learner_node: str,
                     rollout_nodes: list[str], largest_bucket: int) -> str:
    """``auto``: NCCL when the learners are on GPUs; on CPU, shared memory when every rollout
    actor is on learner rank 0's node (and /dev/shm has room for two buckets), else gloo.
    Nodes are Ray node ids: two nodes on one machine share an address but not a node."""
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


def _elastic(rollout: Any) -> str:
    """`` (elastic 1..4)`` when the pool may shrink or grow, else nothing."""
    low, high = rollout.min_workers, rollout.max_workers
    return "" if low == high == len(rollout.actors) else f" (elastic {low}..{high})"


def _console_line(step: int, total: int, m: dict[str, float]) -> str:
    parts = " ".join(f"{label} {m[k]:.0f}" if k in COUNTS else f"{label} {m[k]:.3f}"
                     for k, label in CONSOLE_KEYS.items() if k in m)
    timing = " ".join(f"{k.split('/')[-1]} {m[k]:.1f}s" for k in
                      ("timing/rollout", "timing/learner", "timing/weight_sync", "timing/step"))
    idle = " ".join(f"{pool}_idle {m[f'{pool}/idle_ratio']:.2f}" for pool in ("rollout", "learner")
                    if f"{pool}/idle_ratio" in m)
    line = f"[rl] step {step}/{total} {parts} | {timing} {idle}".rstrip()
    if m.get("actor/update_skipped"):
        line += (f" | update skipped: loss or gradient not finite "
                 f"({m.get('actor/skipped_steps', 0):.0f} so far)")
    return line
