"""Example reward plug-ins: copy this file, edit it, and name it in a recipe.

A recipe lists rewards with weights (the total reward is the weighted sum; each part is logged
on its own)::

    rewards:
      - {name: format, weight: 1.0}
      - {name: embedding, weight: 1.0}
      - {name: recipes/rewards_example.py:short_reasoning, weight: 0.1,
         kwargs: {target_tokens: 64}}
      - {name: recipes/rewards_example.py:DiscAgreement, weight: 0.1,
         kwargs: {missing: zero}}

How to write one:

- A *function* reward is ``fn(ctx, **kwargs)``; the recipe's ``kwargs`` are passed at every
  step (checked against the signature when the recipe is loaded).
- A *class* reward is instantiated once per learner process as ``Cls(**kwargs)``, then called
  ``instance(ctx)`` every step: load models, open files and keep running statistics in
  ``__init__``.
- ``ctx`` is a ``rewards.RewardContext`` holding the whole step: ``ctx.completions``,
  ``ctx.completion_ids``, ``ctx.side`` / ``ctx.pair_index`` / ``ctx.sample_index`` per rollout,
  ``ctx.query_embeddings`` / ``ctx.target_embeddings`` ``[P*G, d]``, ``ctx.meta`` per pair, ...
  Rollouts are ordered queries first, then targets, each pair-major:
  ``ctx.query_slice`` and ``ctx.target_slice`` select the two halves.
- Return one float per rollout (``ctx.num_rollouts`` of them) as a tensor, numpy array or list.
  Raising, a wrong length, NaN or inf stops the step with an error naming this file.
- Keep it vectorised where the step is large: 256 pairs x 8 samples is 4096 rollouts.
"""

from __future__ import annotations

import logging
import re

import torch

from rewards import QUERY, RewardContext, embedding_reward

logger = logging.getLogger(__name__)

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def short_reasoning(ctx: RewardContext, target_tokens: int = 64) -> torch.Tensor:
    """Rewards concise reasoning: 1.0 up to ``target_tokens`` completion tokens, then less.

    A completion with a closed ``<think>…</think>`` section scores ``min(1, target / length)``
    where ``length`` is its token count (``ctx.completion_ids``; the think section is most of
    it). A completion with no think section scores 0, so skipping the reasoning never pays.
    """
    if target_tokens < 1:
        raise ValueError(f"target_tokens must be >= 1, got {target_tokens}")
    lengths = torch.tensor([max(len(ids), 1) for ids in ctx.completion_ids], dtype=torch.float32)
    has_think = torch.tensor([_THINK.search(text) is not None for text in ctx.completions])
    score = (target_tokens / lengths).clamp(max=1.0)
    return torch.where(has_think, score, torch.zeros_like(score))


class DiscAgreement:
    """Rewards a generative embedding that agrees with the other side's discriminative one.

    Query rollout i of pair p scores ``cos(gen_query_i, disc_target_p)``; target rollouts the
    reverse, ``cos(gen_target_j, disc_query_p)``: the reasoning should not take the generative
    embedding away from what the one-pass embedding already retrieves. With
    ``contrastive=True`` the UME-R1 rank x margin is used instead, with the other side's disc
    embeddings (repeated G times) as the candidates.

    The class keeps state across steps: a running mean of the agreement (``self.mean``, for
    logs) and whether the missing-embedding warning was already given.

    Args:
        missing: what to do when the step has no discriminative embeddings: ``"zero"``
            returns zeros (with one warning), ``"error"`` raises.
        contrastive: use rank x margin against the disc embeddings instead of the cosine.
        momentum: of the running mean.
    """

    def __init__(self, missing: str = "zero", contrastive: bool = False, momentum: float = 0.9):
        if missing not in ("zero", "error"):
            raise ValueError(f"missing must be 'zero' or 'error', got {missing!r}")
        self.missing = missing
        self.contrastive = contrastive
        self.momentum = momentum
        self.mean: float | None = None
        self.calls = 0
        self._warned = False

    def __call__(self, ctx: RewardContext) -> torch.Tensor:
        self.calls += 1
        disc_q, disc_t = ctx.disc_query_embeddings, ctx.disc_target_embeddings
        if disc_q is None or disc_t is None:
            if self.missing == "error":
                raise ValueError("the step has no discriminative embeddings")
            if not self._warned:
                logger.warning("DiscAgreement: no discriminative embeddings; rewarding 0")
                self._warned = True
            return torch.zeros(ctx.num_rollouts)
        group = ctx.group_size
        # One disc embedding per pair; repeat it for the pair's G rollouts (pair-major).
        disc_q_rows = disc_q.float().repeat_interleave(group, dim=0)
        disc_t_rows = disc_t.float().repeat_interleave(group, dim=0)
        gen_q, gen_t = ctx.query_embeddings.float(), ctx.target_embeddings.float()
        if self.contrastive:
            query_scores, _ = embedding_reward(gen_q, disc_t_rows, group)
            target_scores, _ = embedding_reward(gen_t, disc_q_rows, group)
        else:
            query_scores = (gen_q * disc_t_rows).sum(dim=1)
            target_scores = (gen_t * disc_q_rows).sum(dim=1)
        scores = torch.cat([query_scores, target_scores])
        agreement = float(scores[ctx.side == QUERY].mean())
        self.mean = agreement if self.mean is None else (
            self.momentum * self.mean + (1 - self.momentum) * agreement
        )
        return scores
