"""The rollout pool: Ray actors that only generate, placed in their own placement group.

Each actor holds one engine (transformers generate on CPU, vLLM on GPU) over its own copy of
the policy. The pool splits a step's prompts contiguously across actors; every prompt carries
its own seed, so the completions do not depend on how many actors there are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from rollout.engine import SamplingParams
from umerl.data import Side
from umerl.remote import gather


def prompt_seed(seed: int, step: int, pair_index: int, side: str) -> int:
    """A seed per (run, step, pair, side), independent of pool sizes and sharding."""
    text = f"{seed}/{step}/{pair_index}/{side}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=4).digest(), "little")


class RolloutActor:
    """One rollout worker; ``ray.remote`` is applied by ``RolloutPool``."""

    def __init__(self, checkpoint: str, engine: str, dtype: str = "float32",
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.6,
                 model_dtype: str = "float32"):
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
                                     gpu_memory_utilization=gpu_memory_utilization, dtype=dtype)
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

    def load_weights(self, payload: Any) -> dict[str, float]:
        """Receive the learners' trainable weights (object-store buckets) into the engine."""
        from rollout.weight_sync import receive

        if self.model is None:  # vLLM: the engine pushes them into its worker processes
            stats = self.engine.load_weights_from_payload(payload)
        else:
            stats = receive(payload, self.model)
        return {"bytes": stats.bytes, "seconds": stats.seconds}

    def digest(self, names: list[str]) -> str:
        from rollout.weight_sync import weights_digest

        if self.model is None:
            return self.engine.weights_digest(names)
        return weights_digest(self.model, names)


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
                     float(cfg.gpu_memory_utilization), model_dtype)
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

    def load_weights(self, payload: Any) -> list[dict[str, float]]:
        return gather([actor.load_weights.remote(payload) for actor in self.actors], self.names)

    def digests(self, names: list[str]) -> list[str]:
        return gather([actor.digest.remote(names) for actor in self.actors], self.names)

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
