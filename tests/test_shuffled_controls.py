"""The learnability bench's control rewards (bench/shuffled_reward.py): each is its reward's
values permuted within every group, the same permutation for the embedding and answer parts."""

from __future__ import annotations

import torch

from bench.shuffled_reward import shuffled_answer, shuffled_embedding
from rewards import RewardContext


def answered(label: str) -> str:
    return f"<think>a</think><answer>{label}</answer><gen_emb>"


def digits_ctx(step: int) -> RewardContext:
    """3 pairs x G=4; pair p's gold label is DIGITS[p]; rollout r answers right where the
    hand-written table RIGHT says so (query side first, then target side)."""
    group, labels = 4, ["zero", "one", "two"]
    right = [1, 0, 0, 1,  0, 0, 0, 0,  1, 1, 1, 0,   # query side, pairs 0..2
             1, 1, 0, 1,  1, 0, 1, 1,  0, 0, 0, 1]   # target side
    completions = [answered(labels[(r // group) % 3] if ok else "nine")
                   for r, ok in enumerate(right)]
    embs = torch.nn.functional.normalize(torch.randn(24, 8, generator=torch.Generator()
                                                     .manual_seed(step)), dim=1)
    ctx = RewardContext.build(
        completions=completions, completion_ids=[[1]] * 24, query_embeddings=embs[:12],
        target_embeddings=embs[12:], group_size=group, step=step,
        meta=[{"id": f"p{p}", "task": "digits_cls", "meta": {"label": labels[p]}}
              for p in range(3)])
    ctx.right = torch.tensor(right, dtype=torch.float32)  # the table, for the test only
    return ctx


def test_shuffled_answer_permutes_each_group_like_shuffled_embedding(monkeypatch) -> None:
    import bench.shuffled_reward as controls

    # Distinct embedding "rewards" 0..23 make shuffled_embedding's output its permutation.
    monkeypatch.setattr(controls, "embedding", lambda ctx: torch.arange(24, dtype=torch.float32))
    moved = False
    for step in (1, 2, 7):
        ctx = digits_ctx(step)
        shuffled = shuffled_answer(ctx).view(-1, 4)
        truth = ctx.right.view(-1, 4)
        # Same values per group (a permutation of the hand-written table's).
        assert torch.equal(shuffled.sort(dim=1).values, truth.sort(dim=1).values)
        order = shuffled_embedding(ctx).view(-1, 4).long() % 4  # column within the group
        assert sorted(order[0].tolist()) == [0, 1, 2, 3]
        assert torch.equal(shuffled, truth.gather(1, order))
        moved |= not torch.equal(shuffled, truth)
    assert moved  # the control does shuffle
