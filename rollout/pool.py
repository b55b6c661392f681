"""The rollout pool: Ray actors that only generate, placed in their own placement group.

Each actor holds one engine (transformers generate on CPU, vLLM on GPU) over its own copy of
the policy. The pool splits a step's prompts contiguously across actors; every prompt carries
its own seed, so the completions do not depend on how many actors there are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from umerl.data import Side
from umerl.remote import gather
from umerl.sampling import SamplingParams


def prompt_seed(seed: int, step: int, pair_index: int, side: str) -> int:
    """A seed per (run, step, pair, side), independent of pool sizes and sharding."""
    text = f"{seed}/{step}/{pair_index}/{side}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=4).digest(), "little")


class RolloutActor:
    """One rollout worker; ``ray.remote`` is applied by ``RolloutPool``."""

    def __init__(self, checkpoint: str, engine: str, dtype: str = "float32",
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.6,
                 model_dtype: str = "float32", vllm_options: dict[str, Any] | None = None):
        import torch

        torch.set_num_threads(max(1, torch.get_num_threads()))
        if dtype == "auto":  # as the learners' bf16: auto, on this actor's own device
            dtype = ("bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported()
                     else model_dtype)
        self.dtype = dtype
        self.kind = engine
        if engine == "vllm":
            from rollout.vllm_engine import VllmEngine

            self.engine = VllmEngine(checkpoint, tensor_parallel_size=tensor_parallel_size,
                                     gpu_memory_utilization=gpu_memory_utilization, dtype=dtype,
                                     **(vllm_options or {}))
            self.model = None
        else:
            from rollout.transformers_engine import TransformersEngine
            from umerl.model import load_policy

            bundle = load_policy(checkpoint, dtype=dtype)
            self.engine = TransformersEngine(bundle)
            self.model = bundle.model

    def generate(self, sides: list[Side], seeds: list[int], n: int,
                 sampling: SamplingParams) -> list[list[list[int]]]:
        return self.engine.generate(sides, n, sampling, seeds)

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
        self.receiver = WeightReceiver(open_channel(spec, rank, device), plan,
                                       load_into(targets))
        self.plan = plan

    def receive_weights(self, digest: bool) -> dict[str, Any]:
        """One sync. With ``digest``: the fingerprint of the weights the engine now holds."""
        if self.model is None:
            return self.engine.receive_weights(digest)
        stats = self.receiver.receive().as_dict()
        if digest:  # of the model's own parameters: proves the load, not only the bytes
            from rollout.weight_sync import Digest

            stats["digest"] = Digest.of(self.plan, dict(self.model.named_parameters()))
        return stats


class RolloutPool:
    """``num_workers`` rollout actors in one placement group (their own GPUs on a cluster)."""

    def __init__(self, cfg: Any, checkpoint: str, dtype: str = "float32",
                 model_dtype: str = "float32"):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.cfg = cfg
        gpus = float(cfg.gpus_per_worker)
        engine = cfg.engine if cfg.engine != "auto" else ("vllm" if gpus > 0 else "transformers")
        bundle = {"CPU": float(cfg.cpus_per_worker)} | ({"GPU": gpus} if gpus else {})
        self.placement_group = placement_group([bundle] * int(cfg.num_workers), strategy="PACK")
        ray.get(self.placement_group.ready(), timeout=600)
        actor_cls = ray.remote(RolloutActor)
        self.actors = [
            actor_cls.options(
                num_cpus=float(cfg.cpus_per_worker), num_gpus=gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, i),
            ).remote(checkpoint, engine, dtype, int(cfg.tensor_parallel_size),
                     float(cfg.gpu_memory_utilization), model_dtype,
                     {"enforce_eager": bool(cfg.enforce_eager),
                      "max_model_len": cfg.max_model_len})
            for i in range(int(cfg.num_workers))
        ]
        self.engine = engine
        self.names = [f"rollout actor {i}" for i in range(len(self.actors))]

    def generate(self, sides: Sequence[Side], seeds: Sequence[int], n: int,
                 sampling: SamplingParams) -> list[list[list[int]]]:
        """``n`` samples per side; each actor generates a contiguous share of the sides."""
        shares = [(i, a, b) for i, (a, b) in enumerate(_split(len(sides), len(self.actors)))
                  if b > a]
        refs = [self.actors[i].generate.remote(list(sides[a:b]), list(seeds[a:b]), n, sampling)
                for i, a, b in shares]
        parts = gather(refs, [self.names[i] for i, _, _ in shares])
        return [samples for part in parts for samples in part]

    def sync_ranks(self) -> list[dict[str, Any]]:
        return gather([actor.sync_ranks.remote() for actor in self.actors], self.names)

    def open_weight_sync(self, spec: Any, plan: Any, first_ranks: Sequence[int],
                         source_model_type: str) -> tuple[list[Any], list[str]]:
        """The calls (refs, worker names) joining the sync group, actor i from rank
        ``first_ranks[i]``; they complete together with the learner side's."""
        return ([a.open_weight_sync.remote(spec, plan, r, source_model_type)
                 for a, r in zip(self.actors, first_ranks, strict=True)], self.names)

    def receive_weights(self, digest: bool) -> tuple[list[Any], list[str]]:
        return [a.receive_weights.remote(digest) for a in self.actors], self.names

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
