"""The rollout pool: Ray actors that only generate, placed in their own placement group.

Each actor holds one engine (transformers generate on CPU, vLLM on GPU) over its own copy of
the policy. The pool splits a step's prompts contiguously across actors; every prompt carries
its own seed, so the completions do not depend on how many actors there are, or on which actor
generates them (their log-probs, to float rounding: rollout/transformers_engine.py).

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
                 cpus: float | None = None, share_prefill: bool = True):
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
            self.engine = TransformersEngine(bundle, share_prefill=share_prefill)
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
        # The node's id, not its address: nodes can share one (several raylets on a machine).
        return {"node": ray.get_runtime_context().get_node_id(),
                "address": ray.util.get_node_ip_address(), "ranks": ranks}

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
    """Rollout actors, each in a placement group of its own (one bundle: its CPUs, GPUs and
    ``rollout.resources``), so that the pool can lose and gain actors one at a time.

    Elastic between ``rollout.min_workers`` and ``rollout.max_workers`` (both default to
    ``num_workers``): an actor whose node is gone is dropped with its placement group (its
    share of the step goes to the others; the pool shrinks), and at each step boundary
    (``resize``, before the weight sync) the pool adds actors where the cluster has room, up
    to ``max_workers``, or waits up to ``rollout.replace_timeout_s`` for room when it is below
    ``min_workers``. An actor that dies on a live node is replaced in its own bundle
    (``replace``). New and replaced actors are stale until a digest-checked sync."""

    def __init__(self, cfg: Any, checkpoint: str, bf16: str | bool = False,
                 model_dtype: str = "float32", faults: Sequence[Fault] = (),
                 max_pixels: int | None = None):
        import ray

        self.cfg = cfg
        gpus = float(cfg.gpus_per_worker)
        self.engine_kind = engine_for(cfg.engine, gpus)  # the name; each actor holds an engine
        self.bundle = ({"CPU": float(cfg.cpus_per_worker)} | ({"GPU": gpus} if gpus else {})
                       | {str(k): float(v) for k, v in (cfg.get("resources") or {}).items()})
        n = int(cfg.num_workers)
        self.min_workers = int(cfg.get("min_workers") or n)
        self.max_workers = int(cfg.get("max_workers") or n)
        self._actor_args = (checkpoint, self.engine_kind, bf16, int(cfg.tensor_parallel_size),
                            float(cfg.gpu_memory_utilization), model_dtype,
                            {"enforce_eager": bool(cfg.enforce_eager),
                             "max_model_len": cfg.max_model_len})
        self.faults = list(faults)
        self.max_pixels = max_pixels
        self.groups = [self._group() for _ in range(n)]
        ray.get([g.ready() for g in self.groups], timeout=600)
        self.ids = list(range(n))  # an actor's number, kept by its replacements (faults name it)
        self.next_number = n  # an added actor's: numbers are never reused
        self.nodes = [_node_of(g) for g in self.groups]
        self.actors = [self._spawn(i, g, 0) for i, g in zip(self.ids, self.groups)]
        self.stale: set[int] = set()  # positions not yet holding the learners' weights
        self.regroup = False  # membership changed: the weight-sync group must be re-formed
        self.restarts = 0
        self.lost = 0  # actors lost with their node
        self.added = 0  # actors added at step boundaries
        self.recovery_s = 0.0  # time spent replacing actors since the loop last read it
        self.generated_by = n  # actors that ended the last generate call healthy

    @property
    def names(self) -> list[str]:
        return [f"rollout actor {i}" for i in self.ids]

    def _group(self) -> Any:
        from ray.util.placement_group import placement_group

        return placement_group([self.bundle])

    def _spawn(self, number: int, group: Any, after_step: int) -> Any:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        gpus = float(self.cfg.gpus_per_worker)
        return ray.remote(RolloutActor).options(
            num_cpus=float(self.cfg.cpus_per_worker), num_gpus=gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, 0),
        ).remote(*self._actor_args, faults=for_actor(self.faults, "rollout", number, after_step),
                 max_pixels=self.max_pixels, cpus=float(self.cfg.cpus_per_worker),
                 share_prefill=bool(self.cfg.get("share_prefill", True)))

    def lose(self, index: int, cause: str, step: int, phase: str, detail: str = "") -> None:
        """Actor ``index`` failed: dropped when its node is gone (the pool shrinks), else
        replaced in its bundle. ``detail``: Ray's full error text (it may name the node)."""
        if _node_dead(self.nodes[index], f"{cause}\n{detail}"):
            self.drop(index, cause, step, phase)
        else:
            self.replace(index, cause, step, phase)

    def drop(self, index: int, cause: str, step: int, phase: str) -> None:
        """Actor ``index`` out with its placement group (left in place, Ray would re-place
        the group elsewhere behind the pool's back)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        name, node = self.names[index], self.nodes[index]
        _quietly(lambda: ray.kill(self.actors[index], no_restart=True))
        _quietly(lambda: remove_placement_group(self.groups[index]))
        for seq in (self.actors, self.groups, self.ids, self.nodes):
            del seq[index]
        self.stale = {j - (j > index) for j in self.stale if j != index}
        self.regroup = True
        self.lost += 1
        print(f"[rollout] {name} lost with its node {node[:12]} during {phase} at step {step} "
              f"({cause}); the pool goes on with {len(self.actors)} "
              f"(rollout.min_workers={self.min_workers})", flush=True)

    def replace(self, index: int, cause: str, step: int, phase: str) -> None:
        """A dead (or hung) actor out, a stale replacement in, in the same bundle."""
        import ray

        limit = int(self.cfg.max_restarts)
        if self.restarts >= limit:
            raise WorkerError(self.names[index], f"{cause} during {phase} at step {step}; "
                              f"rollout.max_restarts={limit} replacements already used", "")
        self.restarts += 1
        ray.kill(self.actors[index], no_restart=True)
        self.actors[index] = self._spawn(self.ids[index], self.groups[index], step)
        self.stale.add(index)
        self.regroup = True
        print(f"[rollout] {self.names[index]} failed during {phase} at step {step} ({cause}); "
              f"replaced in its bundle (restart {self.restarts} of {limit}), stale until the "
              "next weight sync", flush=True)

    def resize(self, step: int) -> None:
        """At a step boundary (before the sync after ``step``): back up to min_workers,
        waiting up to rollout.replace_timeout_s for room (else a WorkerError naming the keys),
        then one more actor at a time while the cluster has room for its bundle, up to
        max_workers. The new actors are stale: the sync that follows reaches them first."""
        start = time.perf_counter()
        timeout = float(self.cfg.get("replace_timeout_s") or 120)
        while len(self.actors) < self.min_workers:
            if not self._add(step, timeout):
                raise WorkerError(
                    "rollout pool", f"{len(self.actors)} rollout actors left at step {step}, "
                    f"below rollout.min_workers={self.min_workers}, and no node had room for "
                    f"another ({_show(self.bundle)}: rollout.cpus_per_worker, "
                    f"rollout.gpus_per_worker, rollout.resources) within "
                    f"rollout.replace_timeout_s={timeout:g} s", "")
        while len(self.actors) < self.max_workers and _room_for(self.bundle):
            if not self._add(step, 2.0):
                break
        if self.regroup:
            self.recovery_s += time.perf_counter() - start

    def _add(self, step: int, timeout_s: float) -> bool:
        """One more (stale) actor, if its bundle can be placed within ``timeout_s``."""
        import ray
        from ray.util.placement_group import remove_placement_group

        group = self._group()
        ready, _ = ray.wait([group.ready()], timeout=timeout_s)
        if not ready:
            remove_placement_group(group)
            return False
        number, self.next_number = self.next_number, self.next_number + 1
        self.groups.append(group)
        self.ids.append(number)
        self.nodes.append(_node_of(group))
        self.actors.append(self._spawn(number, group, step))
        self.stale.add(len(self.actors) - 1)
        self.regroup = True
        self.added += 1
        print(f"[rollout] rollout actor {number} added on node {self.nodes[-1][:12]} after step "
              f"{step}: the pool has {len(self.actors)} (rollout.max_workers="
              f"{self.max_workers}); it generates once a digest-checked sync reached it",
              flush=True)
        return True

    def mark_synced(self) -> None:
        """Every actor now holds the learners' weights (a digest-checked sync reached them)."""
        self.stale.clear()

    def generate(self, sides: Sequence[Side], seeds: Sequence[int], n: int,
                 sampling: SamplingParams, step: int = 0, logprobs: bool = False
                 ) -> tuple[list[list[list[int]]], list[list[list[float]]] | None]:
        """``n`` samples per side (and, with ``logprobs``, their tokens' log-probs, else None);
        each healthy actor generates a contiguous share. A share whose actor dies or exceeds
        rollout.call_timeout_s goes to the next healthy actor that is free; an actor lost with
        its node leaves the pool (``lose``).

        Each actor holds one share at a time: a share waiting for an actor waits here, not in
        the actor's queue. So a call's clock starts when it is sent to an idle actor, that is
        when the actor starts it, and a share re-dispatched behind a busy (slow, but healthy)
        actor is not charged for the wait: one death cannot get a healthy actor killed."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        ready = [i for i in range(len(self.actors)) if i not in self.stale]
        if not ready:
            raise WorkerError("rollout pool", "no rollout actor holds the learners' weights", "")
        waiting = [(a, b) for a, b in _split(len(sides), len(ready)) if b > a]
        results: dict[int, tuple[list, list]] = {}
        pending: dict[Any, tuple[int, int, int]] = {}  # ref -> (actor number, share)
        deadline: dict[Any, float] = {}
        failed_at: dict[int, float] = {}  # share start -> when its first actor failed

        def dispatch_waiting() -> None:
            busy = {number for number, _, _ in pending.values()}
            for i, number in enumerate(list(self.ids)):
                if not waiting:
                    return
                if i in self.stale or number in busy:
                    continue
                a, b = waiting.pop(0)
                ref = self.actors[i].generate.remote(list(sides[a:b]), list(seeds[a:b]), n,
                                                     sampling, step, logprobs)
                pending[ref] = (number, a, b)
                deadline[ref] = time.monotonic() + float(self.cfg.call_timeout_s)

        dispatch_waiting()
        while pending:
            wait_s = max(0.0, min(deadline.values()) - time.monotonic())
            done, _ = ray.wait(list(pending), num_returns=1, timeout=wait_s)
            if done:
                ref = done[0]
                number, a, b = pending.pop(ref)
                deadline.pop(ref)
                try:
                    results[a] = ray.get(ref)
                    if a in failed_at:
                        self.recovery_s += time.perf_counter() - failed_at.pop(a)
                    dispatch_waiting()  # the actor is free
                    continue
                except (RayActorError, GetTimeoutError) as err:
                    cause, detail = summarize(err), str(err)
                except Exception:  # a bug or bad input in the engine: not a restart
                    gather([ref], [f"rollout actor {number}"])  # raises the one-line error
                    raise
            else:  # the oldest call is over its time: treat the actor as hung
                ref = min(deadline, key=deadline.get)
                number, a, b = pending.pop(ref)
                deadline.pop(ref)
                cause = f"no answer within rollout.call_timeout_s={self.cfg.call_timeout_s:g} s"
                detail = ""
            failed_at.setdefault(a, time.perf_counter())
            self.lose(self.ids.index(number), cause, step, "generate", detail)
            if len(self.stale) == len(self.actors):
                raise WorkerError(f"rollout actor {number}", f"{cause}; no healthy rollout "
                                  "actor is left to take its prompts", "")
            waiting.append((a, b))
            dispatch_waiting()
        self.generated_by = len(self.actors) - len(self.stale)
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
            _quietly(lambda actor=actor: ray.kill(actor))
        for group in self.groups:
            _quietly(lambda group=group: remove_placement_group(group))


def _quietly(call: Any) -> None:
    """Clean-up of what may already be gone (a node that left takes its actors along)."""
    try:
        call()
    except Exception:  # noqa: BLE001 - nothing left to clean is not an error
        pass


def _node_of(group: Any) -> str:
    """The id of the node a one-bundle placement group was placed on."""
    from ray.util.placement_group import placement_group_table

    nodes = placement_group_table(group).get("bundles_to_node_id") or {}
    return str(next(iter(nodes.values()), "") or "")


def _node_dead(node_id: str, cause: str) -> bool:
    """Whether an actor's failure was its node's: Ray says so, or the node is no longer alive."""
    import ray

    if "node has died" in cause or "node was terminated" in cause:
        return True
    return not any(n.get("NodeID") == node_id and n.get("Alive") for n in ray.nodes())


def _room_for(bundle: dict[str, float]) -> bool:
    """Whether the cluster has that much of every resource free (a placement may still fail:
    the free amounts may be spread over nodes)."""
    import ray

    free = ray.available_resources()
    return all(float(free.get(r, 0.0)) >= amount - 1e-9 for r, amount in bundle.items())


def _show(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{r}: {a:g}" for r, a in sorted(bundle.items())) + "}"


def _split(total: int, parts: int) -> list[tuple[int, int]]:
    base, extra = divmod(total, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds
