"""The built-in rewards: UME-R1's embedding reward (rank x margin), its ablation parts, format.

The embedding reward (docs/method.md, 'The embedding reward'). For an anchor rollout i of
pair p (a query rollout, scored against target rollouts; or a target rollout, scored against
query rollouts):

    S[i, :]  similarities of i to ALL P*G rollouts of the other side in the step
    Pos      the G columns of pair p;   Neg  the (P-1)*G columns of the other pairs
    rank     = |topG(S[i]) ∩ Pos| / G
    margin   = mean(S[i, Pos]) - mean(S[i, Neg])
    R_emb    = rank * margin

Definitions where the formula alone is not enough:

- Ties in topG: columns are ordered by similarity, descending, and equal similarities by column
  index, ascending (a stable sort); topG is the first G columns of that order. Exact ties only
  happen between identical rollouts, so this rarely matters, but it is deterministic.
- A single pair (P = 1): there are no negatives; mean over an empty set is taken as 0, so
  margin = mean(Pos). topG is then the G positives, rank = 1 and R_emb = mean(Pos).
- G = 1: rank is 1 when the pair's one positive is the most similar column (ties: lower column
  first), else 0; margin = S[i, pos] - mean(Neg). (GRPO advantages are zero for G = 1 anyway.)
- Shared targets (``shared``, ``rl.mask_shared_targets``; not in the paper): two pairs of a
  step may share a target (two images of a seven, one label "seven"). The formula counts the
  other pair's rollouts as negatives, so a right answer loses rank and margin to rollouts that
  are as right as itself. With ``shared`` those columns are left out: they are neither in topG
  nor in Neg (mean over the remaining negatives; none left: taken as 0, as for P = 1).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rewards.context import RewardContext
from umerl.data.formats import COMPLETION_PATTERN


class RankMargin(NamedTuple):
    """Rank and margin of every rollout, per side, each ``[P*G]`` float32."""

    query_rank: Tensor
    query_margin: Tensor
    target_rank: Tensor
    target_margin: Tensor

    def reward(self) -> tuple[Tensor, Tensor]:
        """R_emb = rank x margin: ``(query_rewards, target_rewards)``."""
        return self.query_rank * self.query_margin, self.target_rank * self.target_margin


def rank_and_margin(query_embs: Tensor, target_embs: Tensor, group_size: int,
                    shared: Tensor | None = None) -> RankMargin:
    """The two factors of the embedding reward for both sides (see the module docstring).

    ``query_embs`` and ``target_embs`` are ``[P*G, d]``, L2-normalised, pair-major. The
    similarity matrix is computed once, in float32, on the inputs' device. ``shared``: an
    optional symmetric ``bool [P, P]``, True where two different pairs share a target; those
    pairs' rollouts are left out of each other's negatives and topG.
    """
    _check_pair_major(query_embs, target_embs, group_size)
    query, target = query_embs.detach().float(), target_embs.detach().float()
    sim = query @ target.T  # [P*G queries, P*G targets]
    if shared is not None and bool(shared.any()):
        left_out = shared.to(sim.device).repeat_interleave(group_size, 0).repeat_interleave(
            group_size, 1)
        query_rank, query_margin = _rank_margin_without(sim, group_size, left_out)
        target_rank, target_margin = _rank_margin_without(
            sim.T.contiguous(), group_size, left_out.T.contiguous())
        return RankMargin(query_rank, query_margin, target_rank, target_margin)
    # Row sums of sim and of sim.T as matrix-vector products (cheaper than summing sim).
    query_rank, query_margin = _rank_margin(sim, group_size, query @ target.sum(dim=0))
    target_rank, target_margin = _rank_margin(
        sim.T.contiguous(), group_size, target @ query.sum(dim=0)
    )
    return RankMargin(query_rank, query_margin, target_rank, target_margin)


def _rank_margin_without(sim: Tensor, group_size: int, left_out: Tensor
                         ) -> tuple[Tensor, Tensor]:
    """``_rank_margin`` with the ``left_out`` columns of each row in neither topG nor Neg."""
    rows, cols = sim.shape
    own = torch.arange(rows, device=sim.device) // group_size
    own_block = sim.view(rows, cols // group_size, group_size)[torch.arange(rows), own]
    pos_sum = own_block.sum(dim=1)
    neg_count = cols - group_size - left_out.sum(dim=1)
    neg_sum = sim.masked_fill(left_out, 0).sum(dim=1) - pos_sum
    margin = pos_sum / group_size - torch.where(
        neg_count > 0, neg_sum / neg_count.clamp(min=1), torch.zeros_like(neg_sum))
    # -inf ranks a left-out column below every other: the own block (never left out) and the
    # remaining negatives compete for topG as before, ties included.
    rank, _ = _rank_margin(sim.masked_fill(left_out, float("-inf")), group_size,
                           torch.zeros(rows, device=sim.device))
    return rank, margin


def embedding_reward(
    query_embs: Tensor, target_embs: Tensor, group_size: int
) -> tuple[Tensor, Tensor]:
    """UME-R1's embedding reward, rank x margin, for every query and every target rollout.

    Args:
        query_embs: ``[P*G, d]`` L2-normalised generative embeddings of the query rollouts,
            pair-major (pair p's rollouts at rows p*G .. p*G+G-1).
        target_embs: ``[P*G, d]`` the same for the target rollouts.
        group_size: G.

    Returns:
        ``(query_rewards, target_rewards)``, each float32 ``[P*G]``. Query rollout i is scored
        against all target rollouts of the step (positives: its own pair's G targets); target
        rollout j against all query rollouts. Ties, P = 1 and G = 1: see the module docstring.
    """
    return rank_and_margin(query_embs, target_embs, group_size).reward()


def step_rank_and_margin(ctx: RewardContext) -> RankMargin:
    """``rank_and_margin`` of a step's rollouts, computed once per context: the embedding, rank
    and margin rewards and the learners' ``reward/rank_score`` all read the same one."""
    if "rank_and_margin" not in ctx._derived:
        shared = ctx.shared_targets() if ctx.mask_shared_targets else None
        ctx._derived["rank_and_margin"] = rank_and_margin(
            ctx.query_embeddings, ctx.target_embeddings, ctx.group_size, shared)
    return ctx._derived["rank_and_margin"]


def _check_pair_major(query_embs: Tensor, target_embs: Tensor, group_size: int) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if query_embs.dim() != 2 or query_embs.shape != target_embs.shape:
        raise ValueError(
            f"query_embs {tuple(query_embs.shape)} and target_embs {tuple(target_embs.shape)} "
            "must both be [P*G, d]"
        )
    rows = query_embs.shape[0]
    if rows == 0 or rows % group_size:
        raise ValueError(f"{rows} rows is not a multiple P*G of group_size={group_size} (P >= 1)")


def _rank_margin(sim: Tensor, group_size: int, row_sum: Tensor) -> tuple[Tensor, Tensor]:
    """Rank and margin of each row of ``sim`` ``[P*G anchors, P*G candidates]``.

    ``row_sum`` is ``sim.sum(dim=1)``, computed by the caller.
    Row i's positives are the G columns of pair i // G. Vectorised over rows; the exact tie
    rule (column order among equal similarities) only runs on rows with a tie at the G-th
    place, which random embeddings never have.
    """
    rows, cols = sim.shape
    num_pairs = cols // group_size
    row = torch.arange(rows, device=sim.device)
    own = row // group_size  # each row's pair
    own_block = sim.view(rows, num_pairs, group_size)[row, own]  # [rows, G]: the positives

    # margin = mean(Pos) - mean(Neg), with mean over an empty Neg taken as 0 (P = 1).
    pos_sum = own_block.sum(dim=1)
    neg_count = cols - group_size
    margin = pos_sum / group_size
    if neg_count:
        margin = margin - (row_sum - pos_sum) / neg_count

    # rank: kth = the G-th largest similarity of the row. Without a tie at that place exactly
    # G columns are >= kth, and they are topG.
    top = sim.topk(min(group_size + 1, cols), dim=1).values
    kth = top[:, group_size - 1:group_size]  # [rows, 1]
    hits = (own_block >= kth).sum(dim=1)
    if cols > group_size:
        tie_rows = (top[:, group_size] == kth[:, 0]).nonzero().flatten()
        if tie_rows.numel():
            hits[tie_rows] = _hits_with_ties(
                sim[tie_rows], own_block[tie_rows], kth[tie_rows], own[tie_rows], group_size
            )
    return hits.float() / group_size, margin


def _hits_with_ties(sim: Tensor, own_block: Tensor, kth: Tensor, own: Tensor,
                    group_size: int) -> Tensor:
    """Positives in topG for rows tied at the G-th place: columns > kth are all in topG; the
    remaining slots go to the columns == kth in column order (other pairs' columns before the
    own block, then the own block, then the rest)."""
    above_all = (sim > kth).sum(dim=1)
    slots = group_size - above_all
    column = torch.arange(sim.shape[1], device=sim.device)
    tied_before = ((sim == kth) & (column < (own * group_size).unsqueeze(1))).sum(dim=1)
    own_tied = (own_block == kth).sum(dim=1)
    from_ties = torch.minimum((slots - tied_before).clamp(min=0), own_tied)
    return (own_block > kth).sum(dim=1) + from_ties


# --- reward functions: (ctx, **kwargs) -> one float per rollout [R] ----------------------------


def embedding(ctx: RewardContext) -> Tensor:
    """Built-in ``embedding``: rank x margin for both sides (queries first, then targets)."""
    return torch.cat(step_rank_and_margin(ctx).reward())


def rank_reward(ctx: RewardContext, threshold: float | None = None) -> Tensor:
    """Built-in ``rank`` (ablation: rank only).

    ``threshold=None`` gives the rank itself, |topG ∩ Pos| / G in [0, 1]. A number gives the
    thresholded reward 1.0 if rank >= threshold else 0.0 (a group that is all-easy or all-hard
    then has zero reward variance, hence zero advantage: the weakness the paper points out).
    """
    parts = step_rank_and_margin(ctx)
    rank = torch.cat([parts.query_rank, parts.target_rank])
    if threshold is None:
        return rank
    return (rank >= float(threshold)).float()


def margin_reward(ctx: RewardContext) -> Tensor:
    """Built-in ``margin`` (ablation: margin only): mean(Pos) - mean(Neg) per rollout."""
    parts = step_rank_and_margin(ctx)
    return torch.cat([parts.query_margin, parts.target_margin])


def matches_format(completion: str) -> bool:
    """True if ``completion`` matches the UME-R1 format regex from its first character.

    The regex is ``umerl.data.formats.COMPLETION_PATTERN``:
    ``<think>.*?</think>.*?\\s*<answer>.*?\\s*<gen_emb>`` (DOTALL), applied with ``re.match``:
    the completion must start with ``<think>``; anything may follow ``<gen_emb>``; the regex
    does not require ``</answer>``.
    """
    return COMPLETION_PATTERN.match(completion) is not None


def format_reward(ctx: RewardContext) -> Tensor:
    """Built-in ``format``: 1.0 if the decoded completion matches the format, else 0.0."""
    return torch.tensor([float(matches_format(text)) for text in ctx.completions])


def answer_reward(ctx: RewardContext) -> Tensor:
    """Built-in ``answer``: 1.0 if the completion's ``<answer>`` names its pair's gold answer
    (``umerl.data.answers``), else 0.0, also where the pair declares no answer."""
    return torch.nan_to_num(ctx.answer_correct(), nan=0.0)


BUILTIN_REWARDS = {
    "embedding": embedding,
    "format": format_reward,
    "rank": rank_reward,
    "margin": margin_reward,
    "answer": answer_reward,
}
