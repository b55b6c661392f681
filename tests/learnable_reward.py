"""A reward the tiny untrained model can learn in a few dozen GRPO steps, for
``tests/test_learning.py``: 1.0 when a completion's first token is in a fixed set of token ids
(every id divisible by ``MODULUS``), else 0.0. A random policy samples such a token about once
in ``MODULUS`` draws; a working GRPO loop raises that share step by step. ``shuffled`` is the
control: the same values shuffled within each group, so they no longer say which completion
earned them."""

from __future__ import annotations

import torch

from rewards import RewardContext

MODULUS = 4


def first_token(ctx: RewardContext) -> torch.Tensor:
    return torch.tensor([float(bool(ids) and ids[0] % MODULUS == 0)
                         for ids in ctx.completion_ids])


def shuffled(ctx: RewardContext) -> torch.Tensor:
    values = first_token(ctx).view(-1, ctx.group_size)
    generator = torch.Generator().manual_seed(1000 + ctx.step)
    order = torch.stack([torch.randperm(ctx.group_size, generator=generator)
                         for _ in range(values.shape[0])])
    return values.gather(1, order).reshape(-1)
