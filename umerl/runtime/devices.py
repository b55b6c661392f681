"""What a recipe's ``auto`` means on the machine at hand.

``rollout.engine`` / ``serve.engine: auto`` and ``sft.bf16`` / ``learner.bf16: auto`` are
resolved here only, so the schema, the pools, the learners and the service cannot disagree.
The config layer imports this module: torch is imported only when a device is asked about.
"""

from __future__ import annotations

ENGINES = ("transformers", "vllm")


def engine_for(setting: str, gpus: float) -> str:
    """The generation engine an ``engine`` setting names: ``auto`` is vLLM for workers that
    hold GPUs, transformers' ``generate`` for CPU workers."""
    if setting != "auto":
        return str(setting)
    return "vllm" if float(gpus) > 0 else "transformers"


def use_bf16(setting: str | bool) -> bool:
    """A ``bf16`` setting: ``auto`` is on where this process's GPU computes in bfloat16. Ask
    on the device that runs the model (a rollout actor asks on its own)."""
    if str(setting).lower() == "auto":
        import torch

        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(setting)


def training_dtype(bf16: str | bool, model_dtype: str) -> str:
    """The dtype the learners train in (bfloat16 under ``bf16``, else ``model.dtype``): the
    rollout engines generate in it too, so a weight sync gives them the learners' bits."""
    return "bfloat16" if use_bf16(bf16) else model_dtype


def use_reserved_cpus(cpus: float) -> int:
    """Give torch the CPUs a Ray worker reserved (the floor, at least 1) as intra-op threads;
    returns the count. Every Ray worker starts with ``OMP_NUM_THREADS=1``
    (``umerl.runtime.ray_start.worker_env``, so that processes reserving nothing do not
    oversubscribe a node): without this, a learner reserving 8 CPUs computes on one."""
    import math

    import torch

    threads = max(1, math.floor(float(cpus)))
    torch.set_num_threads(threads)
    return threads
