"""Process-group helpers shared by the SFT workers and the RL learners."""

from __future__ import annotations

import os
import random
import socket
from contextlib import closing

import numpy as np
import torch
import torch.distributed as dist


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group(rank: int, world_size: int, master_addr: str, master_port: int,
                       backend: str | None = None) -> None:
    """Join (or create) the default group; a no-op when one already exists (Ray Train)."""
    if dist.is_initialized():
        return
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"))
    dist.init_process_group(backend or default_backend(), rank=rank, world_size=world_size)


def init_single_process() -> None:
    """World size 1 on loopback: the same code paths as a cluster, in one process."""
    init_process_group(0, 1, "127.0.0.1", free_port())


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def collective_device() -> torch.device:
    """Where a collective's tensors must live: NCCL only moves CUDA tensors."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduced(value: float, op: dist.ReduceOp, dtype: torch.dtype) -> float:
    """``value`` all-reduced over the ranks with ``op`` (a collective: every rank calls it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=dtype, device=collective_device())
    dist.all_reduce(tensor, op=op)
    return tensor.item()


def all_reduce_sum(value: float) -> float:
    return float(_reduced(float(value), dist.ReduceOp.SUM, torch.float64))


def largest_on_any_rank(value: int) -> int:
    """The largest ``value`` over the ranks (a collective: every rank must call it)."""
    return int(_reduced(int(value), dist.ReduceOp.MAX, torch.int64))


def on_every_rank(flag: bool) -> bool:
    """True when ``flag`` holds on every rank (a collective: every rank must call it)."""
    return bool(_reduced(int(flag), dist.ReduceOp.MIN, torch.int32))


def configure_accelerator() -> str:
    """DeepSpeed's accelerator for THIS worker, from its own devices (a CPU-only head node
    must not give GPU learners the CPU accelerator). An explicit DS_ACCELERATOR wins where it
    fits the worker: ``cpu`` on a worker with a GPU (e.g. inherited from the Makefile's shell
    through a local Ray) becomes ``cuda``, ``cuda`` on one without becomes ``cpu``.
    Call before importing deepspeed."""
    own = "cuda" if torch.cuda.is_available() else "cpu"
    if os.environ.get("DS_ACCELERATOR") in (None, "", "cpu", "cuda"):
        os.environ["DS_ACCELERATOR"] = own
    return os.environ["DS_ACCELERATOR"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Tuples, numbers and tensors only, so that it loads with ``torch.load(weights_only=True)``
    (numpy's key array becomes a tensor)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss),
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


def disable_deepspeed_jit_ops() -> None:
    """DeepSpeed JIT-builds a shared-memory comm op on first init (about a minute on CPU);
    gloo does the same job here, so mark the op unavailable before ``initialize``."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
