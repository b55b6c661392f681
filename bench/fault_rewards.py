"""Reward plug-ins that misbehave at one step, for ``bench/bench_faults.py``.

Both add 0 to every rollout's reward before their step, so a run with them logs the same
rewards as one without until the fault. Each prints a ``[faults]`` line stamped with the
wall-clock time, which the bench times the run's reaction from.
"""

from __future__ import annotations

import os
import time

import torch
from torch import Tensor


def _stamp(what: str, step: int) -> None:
    print(f"[faults] reward {what} in pid {os.getpid()} at step {step} "
          f"(at unix time {time.time():.3f})", flush=True)


def hang_at(ctx, step: int, seconds: float = 3600.0) -> Tensor:
    """Never returns (within ``seconds``) at ``step``: a judge model behind a dead socket."""
    if ctx.step == step:
        _stamp("hanging", step)
        time.sleep(seconds)
    return torch.zeros(ctx.num_rollouts)


def overflow_from(ctx, step: int) -> Tensor:
    """Finite rewards from ``step`` on whose advantages overflow the loss to inf (every step
    from there is non-finite, so the learners skip it until ``learner.max_skipped_steps``)."""
    if ctx.step < step:
        return torch.zeros(ctx.num_rollouts)
    if ctx.step == step:
        _stamp("overflowing", step)
    return torch.tensor([(-1.0) ** i * 3e38 for i in range(ctx.num_rollouts)])
