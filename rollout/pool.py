"""The rollout pool: Ray actors that only generate, placed in their own placement group.

Each actor holds one engine (transformers generate on CPU, vLLM on GPU) over its own copy of
the policy. The pool splits a step's prompts contiguously across actors; every prompt carries
its own seed, so the completions do not depend on how many actors there are, or on which actor
generates them.

Supervision. An actor that dies (or exceeds ``rollout.call_timeout_s`` on a generate call,
counted from when it starts the share) is replaced by the pool itself in the same placement-
group bundle, and its share of the step is re-dispatched to the healthy actors: the step's
completions are exactly those of an uncrashed run. The replacement is *stale* (it loaded the
checkpoint the run started from) and gets no prompts until the RL loop has re-formed the
weight-sync group and a sync to it has matched the learners' digest (``mark_synced``). The pool
respawns instead of using Ray's actor restarts because a restarted actor would come back stale
without the loop knowing, into a weight-sync group that still counts its dead predecessor; here
every replacement is an event the loop sees, logs and re-syncs. At most
``rollout.max_restarts`` per run.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

from umerl.data.formats import Side
from umerl.model.sampling import SamplingParams
from umerl.runtime.devices import engine_for, training_dtype, use_reserved_cpus
from umerl.runtime.faults import Fault, for_actor, kill_if, stall_if
from umerl.runtime.remote import WorkerError, gather, summarize


def prompt_seed(seed: int, step: int, pair_index: int, side: str) -> int:
    """A seed per (run, step, pair, side), independent of pool sizes and sharding."""
    text = f"{seed}/{step}/{pair_index}/{side}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=4).digest(), "little")


class RolloutActor:
    """One rollout worker; ``ray.remote`` is applied by ``RolloutPool``."""

    def __init__(self, checkpoint: str, engine_kind: str, bf16: str | bool = False,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.6,
                 model_dtype: str = "float32", vllm_options: dict[str, Any] | None = None,
                 faults: Sequence[Fault] = (), max_pixels: int | None = None,
                 cpus: float | None = None):
        self.faults = list(faults)
        if cpus is not None:  # a Ray actor (None: in this process, its threads as they are)
            use_reserved_cpus(cpus)
        # The learners' training dtype; bf16: auto is asked on this actor's own device.
        self.dtype = training_dtype(bf16, model_dtype)
        if engine_kind == "vllm":
            from rollout.vllm_engine import VllmEngine

            # vLLM resizes images with its own processor: the same bound as the learners'.
            extra = {"mm_processor_kwargs": {"max_pixels": int(max_pixels)}} if max_pixels else {}
            self.engine = VllmEngine(checkpoint, tensor_parallel_size=tensor_parallel_size,
                                     gpu_memory_utilization=gpu_memory_utilization,
                                     dtype=self.dtype, **(vllm_options or {}), **extra)
            self.model = None
        else:
            from rollout.transformers_engine import TransformersEngine
            from umerl.model.loading import load_policy

            bundle = load_policy(checkpoint, dtype=self.dtype, max_pixels=max_pixels)
            self.engine = TransformersEngine(bundle)
            self.model = bundle.model

    def generate(self, sides: list[Side], seeds: list[int], n: int, sampling: SamplingParams,
                 step: int = 0, logprobs: bool = False
                 ) -> tuple[list[list[list[int]]], list[list[list[float]]]]:
        """[side][sample] completions and, with ``logprobs``, their tokens' log-probs under
        the weights that sampled them (an off-policy step's importance-ratio denominator)."""
        stall_if(self.faults, step, "generate")
        if not any(f.step == step and f.phase == "generate" and not f.stall_s
                   for f in self.faults):
            if logprobs:
                return self.engine.generate_with_logprobs(sides, n, sampling, seeds)
            return self.engine.generate(sides, n, sampling, seeds), []
        half = max(1, len(sides) // 2)  # the injected fault: die halfway through the share
        self.engine.generate(sides[:half], n, sampling, seeds[:half])
        kill_if(self.faults, step, "generate")
        raise AssertionError("unreachable: the process was killed")

    def sync_ranks(self) -> dict[str, Any]:
        """This actor's node and how many ranks it takes in the sync group (its vLLM workers:
        every tensor-parallel rank receives the full weights)."""
        import ray

        ranks = self.engine.weight_sync_ranks() if self.model is None else 1
        return {"node": ray.util.get_node_ip_address(), "ranks": ranks}

    def open_weight_sync(self, spec: Any, plan: Any, rank: int, source_model_type: str) -> None:
        """Join the sync group at ``rank`` (its first rank); the names, shapes and dtypes of
        the plan are checked against the model before any weight moves. The learners' names
        are their model class's (``source_model_type``): the same class here, vLLM maps them."""
        from rollout.weight_sync import WeightReceiver, load_into, open_channel

        if self.model is None:  # vLLM: every worker process joins
            self.engine.open_weight_sync(spec, plan, rank, source_model_type)
            return
        targets = dict(self.model.named_parameters())
        plan.check_targets(targets, "the rollout model")
        device = next(self.model.parameters()).device
        load = load_into(targets)
        self.step = 0

        def sink(views: list) -> None:
            load(views)
            kill_if(self.faults, self.step, "weight_sync")  # after the first bucket

        if getattr(self, "receiver", None) is not None:
            self.receiver.close()
        self.receiver = WeightReceiver(open_channel(spec, rank, device), plan, sink)
        self.plan = plan

    def receive_weights(self, digest: bool, step: int = 0) -> dict[str, Any]:
        """One sync (the one after ``step``). With ``digest``: the transformers engine's is of
        the parameters its model now holds; vLLM's of the bytes its workers received (its fused,
        repacked parameters are not the learners' tensors: see ``VllmEngine.receive_weights``)."""
        if self.model is None:
            kill_if(self.faults, step, "weight_sync")  # (vLLM: before its workers receive)
            return self.engine.receive_weights(digest)
        self.step = step
        stats = self.receiver.receive().as_dict()
        if digest:  # of the model's own parameters: proves the load, not only the bytes
            from rollout.weight_sync import Digest

            stats["digest"] = Digest.of(self.plan, dict(self.model.named_parameters()))
        return stats


class RolloutPool:
    """``num_workers`` rollout actors in one placement group (their own GPUs on a cluster)."""

    def __init__(self, cfg: Any, checkpoint: str, bf16: str | bool = False,
                 model_dtype: str = "float32", faults: Sequence[Fault] = (),
                 max_pixels: int | None = None):
        import ray
        from ray.util.placement_group import placement_group

        self.cfg = cfg
        gpus = float(cfg.gpus_per_worker)
        self.engine_kind = engine_for(cfg.engine, gpus)  # the name; each actor holds an engine
        bundle = {"CPU": float(cfg.cpus_per_worker)} | ({"GPU": gpus} if gpus else {})
        self.placement_group = placement_group([bundle] * int(cfg.num_workers), strategy="PACK")
        ray.get(self.placement_group.ready(), timeout=600)
        self._actor_args = (checkpoint, self.engine_kind, bf16, int(cfg.tensor_parallel_size),
                            float(cfg.gpu_memory_utilization), model_dtype,
                            {"enforce_eager": bool(cfg.enforce_eager),
                             "max_model_len": cfg.max_model_len})
        self.faults = list(faults)
        self.max_pixels = max_pixels
        self.actors = [self._spawn(i, 0) for i in range(int(cfg.num_workers))]
        self.names = [f"rollout actor {i}" for i in range(len(self.actors))]
        self.stale: set[int] = set()  # replacements not yet holding the learners' weights
        self.restarts = 0
        self.recovery_s = 0.0  # time spent replacing actors since the loop last read it

    def _spawn(self, index: int, after_step: int) -> Any:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        gpus = float(self.cfg.gpus_per_worker)
        return ray.remote(RolloutActor).options(
            num_cpus=float(self.cfg.cpus_per_worker), num_gpus=gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, index),
        ).remote(*self._actor_args, faults=for_actor(self.faults, "rollout", index, after_step),
                 max_pixels=self.max_pixels, cpus=float(self.cfg.cpus_per_worker))

    def replace(self, index: int, cause: str, step: int, phase: str) -> None:
        """A dead (or hung) actor out, a stale replacement in, in the same bundle."""
        import ray

        limit = int(self.cfg.max_restarts)
        if self.restarts >= limit:
            raise WorkerError(self.names[index], f"{cause} during {phase} at step {step}; "
                              f"rollout.max_restarts={limit} replacements already used", "")
        self.restarts += 1
        ray.kill(self.actors[index], no_restart=True)
        self.actors[index] = self._spawn(index, step)
        self.stale.add(index)
        print(f"[rollout] {self.names[index]} failed during {phase} at step {step} ({cause}); "
              f"replaced in its bundle (restart {self.restarts} of {limit}), stale until the "
              "next weight sync", flush=True)

    def mark_synced(self) -> None:
        """Every actor now holds the learners' weights (a digest-checked sync reached them)."""
        self.stale.clear()

    def generate(self, sides: Sequence[Side], seeds: Sequence[int], n: int,
                 sampling: SamplingParams, step: int = 0, logprobs: bool = False
                 ) -> tuple[list[list[list[int]]], list[list[list[float]]] | None]:
        """``n`` samples per side (and, with ``logprobs``, their tokens' log-probs, else None);
        each healthy actor generates a contiguous share. A share whose actor dies or exceeds
        rollout.call_timeout_s goes to the next healthy actor that is free.

        Each actor holds one share at a time: a share waiting for an actor waits here, not in
        the actor's queue. So a call's clock starts when it is sent to an idle actor, that is
        when the actor starts it, and a share re-dispatched behind a busy (slow, but healthy)
        actor is not charged for the wait: one death cannot get a healthy actor killed."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        ready = [i for i in range(len(self.actors)) if i not in self.stale]
        waiting = [(a, b) for a, b in _split(len(sides), len(ready)) if b > a]
        results: dict[int, tuple[list, list]] = {}
        pending: dict[Any, tuple[int, int, int]] = {}
        deadline: dict[Any, float] = {}
        failed_at: dict[int, float] = {}  # share start -> when its first actor failed

        def dispatch_waiting() -> None:
            busy = {i for i, _, _ in pending.values()}
            for i in (j for j in range(len(self.actors)) if j not in self.stale | busy):
                if not waiting:
                    return
                a, b = waiting.pop(0)
                ref = self.actors[i].generate.remote(list(sides[a:b]), list(seeds[a:b]), n,
                                                     sampling, step, logprobs)
                pending[ref] = (i, a, b)
                deadline[ref] = time.monotonic() + float(self.cfg.call_timeout_s)

        dispatch_waiting()
        while pending:
            wait_s = max(0.0, min(deadline.values()) - time.monotonic())
            done, _ = ray.wait(list(pending), num_returns=1, timeout=wait_s)
            if done:
                ref = done[0]
                i, a, b = pending.pop(ref)
                deadline.pop(ref)
                try:
                    results[a] = ray.get(ref)
                    if a in failed_at:
                        self.recovery_s += time.perf_counter() - failed_at.pop(a)
                    dispatch_waiting()  # actor i is free
                    continue
                except (RayActorError, GetTimeoutError) as err:
                    cause = summarize(err)
                except Exception:  # a bug or bad input in the engine: not a restart
                    gather([ref], [self.names[i]])  # raises it as the one-line WorkerError
                    raise
            else:  # the oldest call is over its time: treat the actor as hung
                ref = min(deadline, key=deadline.get)
                i, a, b = pending.pop(ref)
                deadline.pop(ref)
                cause = f"no answer within rollout.call_timeout_s={self.cfg.call_timeout_s:g} s"
            failed_at.setdefault(a, time.perf_counter())
            self.replace(i, cause, step, "generate")
            if len(self.stale) == len(self.actors):
                raise WorkerError(self.names[i], f"{cause}; no healthy rollout actor is left "
                                  "to take its prompts", "")
            waiting.append((a, b))
            dispatch_waiting()
        completions = [samples for a in sorted(results) for samples in results[a][0]]
        if not logprobs:
            return completions, None
        return completions, [samples for a in sorted(results) for samples in results[a][1]]

    def sync_ranks(self) -> list[dict[str, Any]]:
        return gather([actor.sync_ranks.remote() for actor in self.actors], self.names,
                      timeout_s=float(self.cfg.call_timeout_s),
                      timeout_key="rollout.call_timeout_s")

    def async_open_weight_sync(self, spec: Any, plan: Any, first_ranks: Sequence[int],
                               source_model_type: str) -> tuple[list[Any], list[str]]:
        """The calls (refs, worker names) joining the sync group, actor i from rank
        ``first_ranks[i]``; they complete together with the learner side's."""
        return ([a.open_weight_sync.remote(spec, plan, r, source_model_type)
                 for a, r in zip(self.actors, first_ranks, strict=True)], self.names)

    def async_receive_weights(self, digest: bool, step: int = 0
                              ) -> tuple[list[Any], list[str]]:
        """The calls (refs, worker names) of one sync; they complete with the learner side's."""
        return [a.receive_weights.remote(digest, step) for a in self.actors], self.names

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.placement_group)


def _split(total: int, parts: int) -> list[tuple[int, int]]:
    base, extra = divmod(total, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds
