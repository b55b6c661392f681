"""A control reward for ``bench_reward_ablation.py``: UME-R1's embedding reward (rank x margin)
with its values shuffled within each group. Same values, same spread per group, but no longer
tied to the rollout that earned them: what RL does with it is what the reward's information
does not explain."""

from __future__ import annotations

import torch

from rewards import RewardContext
from rewards.builtin import answer_reward, embedding


def shuffled_embedding(ctx: RewardContext) -> torch.Tensor:
    values = embedding(ctx).view(-1, ctx.group_size)  # one row per pair-side group
    generator = torch.Generator().manual_seed(1000 + ctx.step)  # deterministic per step
    order = torch.stack([torch.randperm(ctx.group_size, generator=generator)
                         for _ in range(values.shape[0])])
    return values.gather(1, order).reshape(-1)


def shuffled_answer(ctx: RewardContext) -> torch.Tensor:
    """The built-in ``answer`` reward shuffled within each group, with the same permutation as
    ``shuffled_embedding`` (the same generator seed): the control of a run that pays both."""
    values = answer_reward(ctx).view(-1, ctx.group_size)
    generator = torch.Generator().manual_seed(1000 + ctx.step)
    order = torch.stack([torch.randperm(ctx.group_size, generator=generator)
                         for _ in range(values.shape[0])])
    return values.gather(1, order).reshape(-1)
