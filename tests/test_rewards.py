"""The reward API: embedding reward against the paper's formula, format regex, registry, guards."""

from __future__ import annotations

import logging
import math
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import rewards
from rewards import (
    BUILTIN_REWARDS,
    RewardContext,
    RewardError,
    RewardSet,
    embedding_reward,
    load_reward,
    matches_format,
    rewards_from_config,
)

REPO = Path(__file__).resolve().parent.parent
GOOD = "<think>a</think><answer>b</answer><gen_emb>"


# --- the paper's formula, written out with Python loops --------------------------------------


def reference_side(anchors: list[list[float]], others: list[list[float]], group: int,
                   shared: set[tuple[int, int]] = frozenset()) -> list:
    """R_emb for each anchor rollout against all rollouts of the other side.

    The definition: docs/method.md, 'The embedding reward'.

    topG: columns sorted by similarity, descending, ties by lower column index first.
    A single pair has no negatives: mean(N) is taken as 0. ``shared``: (p, q) pairs of pairs
    with one target; q's rollouts are dropped from p's candidates (rl.mask_shared_targets).
    """
    n = len(anchors)
    out = []
    for i in range(n):
        pair = i // group
        sims = [sum(a * b for a, b in zip(anchors[i], others[k])) for k in range(n)]
        kept = [k for k in range(n) if (pair, k // group) not in shared]
        order = sorted(kept, key=lambda k: (-sims[k], k))
        top = order[:group]
        positives = [k for k in kept if k // group == pair]
        negatives = [k for k in kept if k // group != pair]
        rank = len([k for k in top if k in positives]) / group
        mean_pos = sum(sims[k] for k in positives) / len(positives)
        mean_neg = sum(sims[k] for k in negatives) / len(negatives) if negatives else 0.0
        out.append(rank * (mean_pos - mean_neg))
    return out


def reference(query: torch.Tensor, target: torch.Tensor, group: int,
              shared: set[tuple[int, int]] = frozenset()) -> tuple[list, list]:
    q, t = query.double().tolist(), target.double().tolist()
    return reference_side(q, t, group, shared), reference_side(t, q, group, shared)


def random_embeddings(pairs: int, group: int, dim: int, seed: int, noise: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.nn.functional.normalize(torch.randn(pairs * group, dim, generator=gen), dim=1)
    # Targets near their own pair's queries, so rank and margin take varied values.
    anchor = query.view(pairs, group, dim).mean(dim=1).repeat_interleave(group, dim=0)
    target = anchor + noise * torch.randn(pairs * group, dim, generator=gen) / math.sqrt(dim)
    return query, torch.nn.functional.normalize(target, dim=1)


@pytest.mark.parametrize("pairs,group", [(1, 1), (1, 4), (1, 8), (2, 1), (5, 1), (2, 2),
                                         (3, 4), (4, 8), (6, 3), (7, 5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_embedding_reward_matches_loop_reference(pairs: int, group: int, seed: int) -> None:
    query, target = random_embeddings(pairs, group, dim=16, seed=seed)
    got_q, got_t = embedding_reward(query, target, group)
    want_q, want_t = reference(query, target, group)
    assert got_q.shape == got_t.shape == (pairs * group,)
    assert got_q.dtype == got_t.dtype == torch.float32
    assert torch.allclose(got_q.double(), torch.tensor(want_q, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(got_t.double(), torch.tensor(want_t, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("pairs,group", [(2, 2), (3, 4), (4, 3), (6, 2), (2, 8)])
@pytest.mark.parametrize("seed", range(6))
def test_embedding_reward_ties_follow_column_order(pairs: int, group: int, seed: int) -> None:
    # Vectors from {-1/2, 0, 1/2} with norm 1 in 4 dims: every dot product is exact in float32,
    # and with few distinct vectors many similarities tie, also at the G-th place.
    gen = torch.Generator().manual_seed(seed)
    choices = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.5, -0.5, 0.5, -0.5], [1.0, 0, 0, 0],
                            [0, 1.0, 0, 0], [-0.5, 0.5, 0.5, -0.5]])
    query = choices[torch.randint(0, len(choices), (pairs * group,), generator=gen)]
    target = choices[torch.randint(0, len(choices), (pairs * group,), generator=gen)]
    got_q, got_t = embedding_reward(query, target, group)
    want_q, want_t = reference(query, target, group)
    assert torch.allclose(got_q.double(), torch.tensor(want_q, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(got_t.double(), torch.tensor(want_t, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("pairs,group", [(2, 2), (3, 4), (4, 8), (6, 3), (7, 1)])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tied", [False, True])
def test_shared_targets_left_out_match_loop_reference(pairs: int, group: int, seed: int,
                                                      tied: bool) -> None:
    """rl.mask_shared_targets: pairs sharing a target drop out of each other's topG and Neg;
    random target labels (a few classes, so some pairs share one, some whole steps all)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (pairs,), generator=gen).tolist()
    shared = {(p, q) for p in range(pairs) for q in range(pairs)
              if p != q and labels[p] == labels[q]}
    if tied:  # exact float32 dot products, many ties at the G-th place
        choices = torch.tensor([[0.5, 0.5, 0.5, 0.5], [1.0, 0, 0, 0], [0, 1.0, 0, 0]])
        query = choices[torch.randint(0, 3, (pairs * group,), generator=gen)]
        target = choices[torch.randint(0, 3, (pairs * group,), generator=gen)]
    else:
        query, target = random_embeddings(pairs, group, dim=16, seed=seed)
    matrix = torch.tensor([[(p, q) in shared for q in range(pairs)] for p in range(pairs)])
    got_q, got_t = rewards.rank_and_margin(query, target, group, matrix).reward()
    want_q, want_t = reference(query, target, group, shared)
    assert torch.allclose(got_q.double(), torch.tensor(want_q, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(got_t.double(), torch.tensor(want_t, dtype=torch.float64), atol=1e-5)


def test_a_right_answer_is_not_marked_down_for_its_twin_pair() -> None:
    """Two pairs with one target (two images of a seven), G = 2, answers all "seven" (one
    embedding): the paper's formula gives the right answers rank 1/2 and margin 0 against
    their twin; with the twin left out, rank 1 and margin = the similarity, 0.8."""
    seven = torch.tensor([[1.0, 0.0]])
    query = torch.tensor([[0.8, 0.6]]).repeat(4, 1)
    target = seven.repeat(4, 1)
    plain = rewards.rank_and_margin(query, target, 2)
    assert plain.query_rank.tolist() == [1.0, 1.0, 0.0, 0.0]  # pair 1 loses topG to pair 0
    assert plain.query_margin.tolist() == pytest.approx([0.0] * 4)
    masked = rewards.rank_and_margin(query, target, 2, torch.tensor([[False, True],
                                                                     [True, False]]))
    assert masked.query_rank.tolist() == [1.0] * 4
    assert masked.query_margin.tolist() == pytest.approx([0.8] * 4)
    assert masked.reward()[1].tolist() == pytest.approx([0.8] * 4)


def test_the_context_finds_shared_targets_and_the_flag_reaches_the_reward() -> None:
    query, target = random_embeddings(3, 2, dim=8, seed=5)
    meta = [{"id": str(p), "target": {"text": text, "images": [], "video": []}}
            for p, text in enumerate(["seven", "two", "seven"])]
    common = dict(completions=[GOOD] * 12, completion_ids=[[1]] * 12, query_embeddings=query,
                  target_embeddings=target, group_size=2, meta=meta)
    ctx = RewardContext.build(**common, mask_shared_targets=True)
    assert ctx.shared_targets().tolist() == [[False, False, True], [False, False, False],
                                             [True, False, False]]
    want_q, want_t = reference(query, target, 2, {(0, 2), (2, 0)})
    got = rewards.load_reward("embedding")(ctx)
    assert torch.allclose(got.double(), torch.tensor(want_q + want_t, dtype=torch.float64),
                          atol=1e-5)
    plain = rewards.load_reward("embedding")(RewardContext.build(**common))
    assert torch.allclose(plain.double(), torch.tensor(sum(reference(query, target, 2), []),
                                                       dtype=torch.float64), atol=1e-5)


def test_embedding_reward_tie_rule_by_hand() -> None:
    # 2 pairs, G = 2; every target identical: all similarities tie. Query rows of pair 0 take
    # columns 0, 1 (their own) -> rank 1; pair 1's take columns 0, 1 (pair 0's) -> rank 0.
    query = torch.eye(4)[[0, 0, 0, 0]]
    target = torch.eye(4)[[1, 1, 1, 1]] * 0.6 + torch.eye(4)[[0, 0, 0, 0]] * 0.8
    q, t = embedding_reward(query, target, 2)
    margin = 0.0  # equal similarities: mean(P) - mean(N) = 0
    assert q.tolist() == pytest.approx([margin] * 4)
    rank_q = rewards.rank_and_margin(query, target, 2).query_rank
    assert rank_q.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert t.shape == (4,)


def test_single_pair_and_single_sample_are_defined() -> None:
    query, target = random_embeddings(1, 4, dim=8, seed=3)
    q, t = embedding_reward(query, target, 4)
    parts = rewards.rank_and_margin(query, target, 4)
    # P = 1: rank 1 and margin = mean similarity to the pair's own G rollouts.
    assert parts.query_rank.tolist() == [1.0] * 4
    assert torch.allclose(q, (query @ target.T).mean(dim=1))
    assert torch.allclose(t, (target @ query.T).mean(dim=1))
    # P = 1, G = 1: the reward is the plain cosine.
    q1, t1 = embedding_reward(query[:1], target[:1], 1)
    assert torch.allclose(q1, query[:1] @ target[0]) and torch.allclose(t1, q1)
    # G = 1: rank is 0 or 1.
    query, target = random_embeddings(5, 1, dim=8, seed=4, noise=3.0)
    rank = rewards.rank_and_margin(query, target, 1).query_rank
    assert set(rank.tolist()) <= {0.0, 1.0}


def test_embedding_reward_rejects_bad_shapes() -> None:
    query, target = random_embeddings(2, 4, dim=8, seed=0)
    with pytest.raises(ValueError, match="multiple"):
        embedding_reward(query[:7], target[:7], 4)
    with pytest.raises(ValueError, match="must both be"):
        embedding_reward(query, target[:4], 4)
    with pytest.raises(ValueError, match="group_size"):
        embedding_reward(query, target, 0)


def test_embedding_reward_at_paper_scale() -> None:
    # 256 pairs x 8 samples (small dim here; bench/bench_embedding_reward.py times 1536 dims).
    query, target = random_embeddings(256, 8, dim=32, seed=0)
    q, t = embedding_reward(query, target, 8)
    assert q.shape == t.shape == (2048,) and torch.isfinite(q).all() and torch.isfinite(t).all()


# --- format ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    GOOD,
    "<think>a</think>\n<answer>b</answer>\n<gen_emb>",
    "<think>a</think>  \n\n  <answer>b</answer> \n <gen_emb>",
    "<think>line one\nline two\n\nline four</think><answer>a\nsummary</answer><gen_emb>",
    "<think></think><answer></answer><gen_emb>",
    "<think>a</think>extra words<answer>b</answer><gen_emb>",
    "<think>a</think><answer>b</answer><gen_emb><|im_end|>",
    "<think>a</think><answer>b<gen_emb>",  # the regex does not require </answer>
])
def test_format_accepts(text: str) -> None:
    assert matches_format(text)


@pytest.mark.parametrize("text", [
    "",
    "<answer>b</answer><gen_emb>",  # missing think
    "<think>a<answer>b</answer><gen_emb>",  # think never closed
    "<think>a</think><gen_emb>",  # missing answer
    "<think>a</think><answer>b</answer>",  # missing gen_emb
    "<think>a</think><gen_emb><answer>b</answer>",  # gen_emb before answer
    "<answer>b</answer><think>a</think><gen_emb>",  # answer before think
    "</think><think>a<answer>b</answer><gen_emb>",  # close tag first
    " <think>a</think><answer>b</answer><gen_emb>",  # text before <think>
    "Sure! <think>a</think><answer>b</answer><gen_emb>",
    "<think>a</think><answer>b</answer><gen_emb_x",
])
def test_format_rejects(text: str) -> None:
    assert not matches_format(text)


def test_format_reward_uses_the_data_pattern() -> None:
    from rewards import builtin
    from umerl.data.formats import COMPLETION_PATTERN

    assert builtin.COMPLETION_PATTERN is COMPLETION_PATTERN
    ctx = make_ctx(2, 2, completions=[GOOD, "", GOOD + " ", "<think>x</think>"] * 2)
    assert BUILTIN_REWARDS["format"](ctx).tolist() == [1.0, 0.0, 1.0, 0.0] * 2


# --- the context ------------------------------------------------------------------------------


def make_ctx(pairs: int, group: int, completions=None, seed: int = 0, **kwargs) -> RewardContext:
    query, target = random_embeddings(pairs, group, dim=8, seed=seed)
    n = 2 * pairs * group
    if completions is None:
        completions = [GOOD] * n
    kwargs.setdefault("completion_ids", [[7] * (1 + r % 5) for r in range(n)])
    return RewardContext.build(
        completions=completions, query_embeddings=query, target_embeddings=target,
        group_size=group, meta=[{"id": f"p{p}", "task": "t"} for p in range(pairs)],
        step=3, **kwargs,
    )


def test_context_layout() -> None:
    ctx = make_ctx(3, 2)
    assert (ctx.num_pairs, ctx.num_rollouts, ctx.group_size) == (3, 12, 2)
    assert ctx.query_slice == slice(0, 6) and ctx.target_slice == slice(6, 12)
    assert ctx.pair_index.tolist() == [0, 0, 1, 1, 2, 2] * 2
    assert ctx.sample_index.tolist() == [0, 1] * 6
    assert ctx.side.tolist() == [0] * 6 + [1] * 6
    assert ctx.side_names[:1] == ["query"] and ctx.side_names[-1] == "target"
    assert ctx.pair_ids == ["p0", "p0", "p1", "p1", "p2", "p2"] * 2
    assert ctx.group_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert ctx.meta_of(9) == {"id": "p1", "task": "t"}
    assert ctx.describe(9) == "target pair 1 (id 'p1') sample 1"
    assert ctx.embeddings().shape == (12, 8)


def test_context_from_pairs_and_disc_embeddings() -> None:
    from umerl.data.formats import Pair, Side

    pairs = [Pair(id="a", task="cls", query=Side(text="q", images=("x.png",)),
                  target=Side(text="t"), meta={"k": 1})]
    query, target = random_embeddings(1, 2, dim=8, seed=0)
    ctx = RewardContext.from_pairs(
        pairs, completions=[GOOD] * 4, completion_ids=[[1]] * 4, query_embeddings=query,
        target_embeddings=target, group_size=2, disc_query_embeddings=query,
        disc_target_embeddings=target[:1],
    )
    assert ctx.meta[0] == {"id": "a", "task": "cls",
                           "query": {"text": "q", "images": ["x.png"], "video": []},
                           "target": {"text": "t", "images": [], "video": []}, "meta": {"k": 1}}
    assert ctx.disc_query_embeddings.shape == (1, 8)  # [P*G, d] -> one row per pair
    assert ctx.disc_target_embeddings.shape == (1, 8)


@pytest.mark.parametrize("change,message", [
    ({"completions": [GOOD] * 3}, "got 3 completions, expected 2 sides x 2 pairs"),
    ({"completion_ids": [[1]] * 9}, "got 9 completion_ids"),
    ({"meta": [{}]}, "got 1 meta entries, expected one per pair"),
    ({"group_size": 3}, "expected P\\*G"),
    ({"group_size": 0}, "group_size must be"),
    ({"target_embeddings": torch.ones(4, 8)}, "L2-normalised"),
    ({"target_embeddings": torch.ones(2, 8) / 8 ** 0.5}, "same shape"),
    ({"query_embeddings": torch.full((4, 8), float("nan"))}, "NaN or inf"),
    ({"disc_query_embeddings": torch.eye(8)[:3]}, "disc_query_embeddings has 3 rows"),
    ({"completions": [GOOD] * 7 + [None]}, "completions\\[7\\] must be str"),
])
def test_context_build_errors(change: dict, message: str) -> None:
    query, target = random_embeddings(2, 2, dim=8, seed=0)
    args = dict(completions=[GOOD] * 8, completion_ids=[[1]] * 8, query_embeddings=query,
                target_embeddings=target, group_size=2, meta=[{}, {}])
    args.update(change)
    with pytest.raises(ValueError, match=message):
        RewardContext.build(**args)


# --- built-in reward functions and the ablation variants --------------------------------------


def test_builtin_reward_functions() -> None:
    ctx = make_ctx(4, 3, seed=1)
    q, t = embedding_reward(ctx.query_embeddings, ctx.target_embeddings, 3)
    emb = BUILTIN_REWARDS["embedding"](ctx)
    assert torch.equal(emb[ctx.query_slice], q) and torch.equal(emb[ctx.target_slice], t)
    rank = BUILTIN_REWARDS["rank"](ctx)
    margin = BUILTIN_REWARDS["margin"](ctx)
    assert torch.allclose(rank * margin, emb)
    assert set((rank * 3).round().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    thresholded = BUILTIN_REWARDS["rank"](ctx, threshold=0.5)
    assert thresholded.tolist() == [float(r >= 0.5) for r in rank.tolist()]


def test_the_builtin_rewards_share_one_rank_and_margin_per_step(monkeypatch) -> None:
    """The embedding, rank and margin rewards (and the learners' rank_score, which reads
    ``step_rank_and_margin``) compute the similarity ranks of a step once."""
    import rewards.builtin as builtin

    ctx = make_ctx(4, 3, seed=2)
    expected = rewards.rank_and_margin(ctx.query_embeddings, ctx.target_embeddings, 3)
    calls = []
    monkeypatch.setattr(builtin, "rank_and_margin",
                        lambda *args: calls.append(1) or expected)
    for name in ("embedding", "rank", "margin"):
        BUILTIN_REWARDS[name](ctx)
    assert builtin.step_rank_and_margin(ctx) is expected and len(calls) == 1
    builtin.step_rank_and_margin(make_ctx(4, 3, seed=2))  # a new step: computed anew
    assert len(calls) == 2


# --- registry and plug-ins ------------------------------------------------------------------

PLUGIN_SOURCE = textwrap.dedent("""
    import torch

    def length_bonus(ctx, scale=1.0):
        return [scale * len(ids) for ids in ctx.completion_ids]

    class Counter:
        def __init__(self, start=0):
            self.calls = start

        def __call__(self, ctx):
            self.calls += 1
            return torch.full((ctx.num_rollouts,), float(self.calls))

    NOT_CALLABLE = 3
""")


def test_plugin_by_file_path(tmp_path: Path) -> None:
    path = tmp_path / "my_rewards.py"
    path.write_text(PLUGIN_SOURCE)
    ctx = make_ctx(2, 2)
    reward = load_reward(f"{path}:length_bonus", {"scale": 2.0})
    assert reward.origin == f"file {path.resolve()}"
    assert reward(ctx) == [2.0 * len(ids) for ids in ctx.completion_ids]
    # Relative to base_dir (e.g. the recipe's folder).
    relative = load_reward("my_rewards.py:length_bonus", {}, base_dir=tmp_path)
    assert relative(ctx) == [float(len(ids)) for ids in ctx.completion_ids]


def test_plugin_by_module_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "acme_rewards"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scoring.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    ctx = make_ctx(2, 2)
    counter = load_reward("acme_rewards.scoring:Counter", {"start": 10})
    assert counter.origin.startswith("module acme_rewards.scoring")
    reward_set = RewardSet([(counter, 1.0)])
    assert reward_set(ctx)[0].tolist() == [11.0] * 8
    assert reward_set(ctx)[0].tolist() == [12.0] * 8  # one instance, state kept across steps


def test_example_plugins_from_recipes() -> None:
    ctx = make_ctx(2, 2, completions=[GOOD, "no think"] * 4,
                   completion_ids=[[1] * n for n in (2, 2, 8, 8, 4, 4, 16, 16)])
    short = load_reward("recipes/rewards_example.py:short_reasoning", {"target_tokens": 4},
                        base_dir=REPO)
    assert short(ctx).tolist() == [1.0, 0.0, 0.5, 0.0, 1.0, 0.0, 0.25, 0.0]
    agreement = load_reward("recipes/rewards_example.py:DiscAgreement", {}, base_dir=REPO)
    assert agreement(ctx).tolist() == [0.0] * 8  # no disc embeddings in this step
    with_disc = make_ctx(2, 2, disc_query_embeddings=torch.eye(8)[:2],
                         disc_target_embeddings=torch.eye(8)[2:4])
    scores = agreement(with_disc)
    expected_q = (with_disc.query_embeddings * torch.eye(8)[[2, 2, 3, 3]]).sum(dim=1)
    assert torch.allclose(scores[with_disc.query_slice], expected_q)
    assert agreement.fn.calls == 2 and agreement.fn.mean is not None
    contrastive = load_reward("recipes/rewards_example.py:DiscAgreement",
                              {"contrastive": True}, base_dir=REPO)
    assert torch.isfinite(contrastive(with_disc)).all()


def test_rewards_from_config_weighted_sum_parts_and_timings(caplog) -> None:
    entries = [
        {"name": "format", "weight": 1.0},
        {"name": "embedding", "weight": 2.0},
        {"name": "recipes/rewards_example.py:short_reasoning", "weight": 0.5,
         "kwargs": {"target_tokens": 2}},
        {"name": "rank", "weight": 0.0, "kwargs": {"threshold": 0.5}, "label": "rank_05"},
    ]
    reward_set = rewards_from_config(entries, base_dir=REPO)
    ctx = make_ctx(3, 2, completions=[GOOD, "x"] * 6)
    with caplog.at_level(logging.DEBUG, logger="umerl.rewards"):
        total, parts, timings = reward_set(ctx)
    assert list(parts) == list(timings) == ["format", "embedding", "short_reasoning", "rank_05"]
    assert reward_set.weights == {"format": 1.0, "embedding": 2.0, "short_reasoning": 0.5,
                                  "rank_05": 0.0}
    expected = parts["format"] + 2.0 * parts["embedding"] + 0.5 * parts["short_reasoning"]
    assert torch.allclose(total, expected)
    assert total.shape == (12,) and total.dtype == torch.float32
    assert all(seconds >= 0 for seconds in timings.values())
    assert "reward 'embedding'" in caplog.text and "took" in caplog.text
    metrics = rewards.reward_metrics(ctx, total, parts, timings)
    assert metrics["reward/total"] == pytest.approx(float(total.mean()))
    assert metrics["reward/format/query"] == 0.5
    assert metrics["timing_s/reward/embedding"] == timings["embedding"]


def test_rewards_from_omegaconf_and_default() -> None:
    from omegaconf import OmegaConf

    entries = OmegaConf.create(rewards.DEFAULT_REWARDS)
    reward_set = rewards_from_config(entries)
    total, parts, _ = reward_set(make_ctx(2, 2))
    assert torch.allclose(total, parts["format"] + parts["embedding"])


def test_slow_reward_is_logged_as_warning(caplog) -> None:
    reward_set = rewards_from_config([{"name": "format"}], slow_seconds=0.0)
    with caplog.at_level(logging.WARNING, logger="umerl.rewards"):
        reward_set(make_ctx(1, 1))
    assert "reward 'format'" in caplog.text and "took" in caplog.text


@pytest.mark.parametrize("entries,message", [
    ([], "non-empty list"),
    ([{"weight": 1.0}], r"rewards\[0\].*missing or empty 'name'"),
    ([{"name": "format"}, {"name": "nope"}], r"rewards\[1\]: reward 'nope'.*unknown reward"),
    ([{"name": "format", "wieght": 2}], r"rewards\[0\].*unknown keys \['wieght'\]"),
    ([{"name": "format", "weight": "heavy"}], r"rewards\[0\].*'weight' must be a number"),
    ([{"name": "format", "kwargs": [1]}], r"rewards\[0\].*'kwargs' must be a mapping"),
    ([{"name": "format"}, {"name": "format"}], "appear twice"),
    ([{"name": "format", "kwargs": {"bogus": 1}}], r"rewards\[0\].*do not fit its signature"),
    ([{"name": "no/such/file.py:fn"}], r"rewards\[0\].*file not found"),
    ([{"name": "no_such_module_xyz:fn"}], r"import failed: ModuleNotFoundError"),
    ([{"name": "recipes/rewards_example.py:nope"}], r"has no attribute 'nope'"),
    ([{"name": "recipes/rewards_example.py:DiscAgreement", "kwargs": {"missing": "?"}}],
     r"constructing DiscAgreement.*ValueError"),
    ([{"name": ":fn"}], "malformed reward name"),
])
def test_config_errors_name_the_entry(entries: list, message: str) -> None:
    with pytest.raises(RewardError, match=message):
        rewards_from_config(entries, base_dir=REPO)


def test_plugin_file_that_fails_to_import(tmp_path: Path) -> None:
    path = tmp_path / "broken.py"
    path.write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(RewardError, match=r"file .*broken.py\): import failed: RuntimeError"):
        load_reward(f"{path}:fn", {})
    path.write_text(PLUGIN_SOURCE)
    with pytest.raises(RewardError, match="is a int, not a function or class"):
        load_reward(f"{path}:NOT_CALLABLE", {})


# --- guarding the step ----------------------------------------------------------------------

BAD_REWARDS = textwrap.dedent("""
    import numpy as np
    import torch

    def raises(ctx):
        raise KeyError("missing_field")

    def too_short(ctx):
        return [0.0] * (ctx.num_rollouts - 1)

    def with_nan(ctx):
        out = torch.zeros(ctx.num_rollouts)
        out[5] = float("nan")
        return out

    def with_inf(ctx):
        out = np.zeros(ctx.num_rollouts)
        out[ctx.num_rollouts // 2] = -np.inf
        return out

    def returns_none(ctx):
        return None

    def returns_strings(ctx):
        return ["1.0"] * ctx.num_rollouts

    def returns_matrix(ctx):
        return torch.zeros(ctx.num_rollouts, 1)

    def fine(ctx):
        return np.arange(ctx.num_rollouts)
""")


@pytest.mark.parametrize("attr,message", [
    ("raises", r"raised KeyError at step 3 \(.*bad_rewards.py:6\): 'missing_field'"),
    ("too_short", r"returned 7 values at step 3, expected 8 \(one per rollout: 2 sides x 2 "
                  r"pairs x 2 samples\)"),
    ("with_nan", r"returned NaN at step 3 for rollouts \[5: target pair 0 \(id 'p0'\) sample 1\]"),
    ("with_inf", r"returned inf at step 3 for rollouts \[4: target pair 0"),
    ("returns_none", r"returned NoneType, expected a 1-D torch.Tensor"),
    ("returns_strings", r"element 0 is str \('1.0'\), expected numbers"),
    ("returns_matrix", r"returned shape \(8, 1\), expected 1-D"),
])
def test_bad_reward_errors_name_reward_file_and_problem(tmp_path: Path, attr: str,
                                                        message: str) -> None:
    path = tmp_path / "bad_rewards.py"
    path.write_text(BAD_REWARDS)
    reward_set = rewards_from_config([{"name": "format"}, {"name": f"{path}:{attr}"}])
    with pytest.raises(RewardError) as info:
        reward_set(make_ctx(2, 2))
    text = str(info.value)
    assert text.startswith(f"reward '{path}:{attr}' (file {path.resolve()}): ")
    assert info.value.origin == f"file {path.resolve()}"
    assert re.search(message, text), text


def test_accepted_output_types(tmp_path: Path) -> None:
    path = tmp_path / "bad_rewards.py"
    path.write_text(BAD_REWARDS)
    reward_set = rewards_from_config([{"name": f"{path}:fine"}])
    total, parts, _ = reward_set(make_ctx(2, 2))
    assert parts["fine"].dtype == torch.float32 and total.tolist() == list(map(float, range(8)))
    for output in ([1, 2.5, True, np.float32(1)] + [0] * 4, tuple(range(8)),
                   torch.arange(8, dtype=torch.float64), [torch.tensor(1.0)] * 8):
        reward = rewards.Reward("x", "test", lambda ctx, out=output: out)
        values = rewards.run_guarded(reward, make_ctx(2, 2))
        assert values.shape == (8,) and values.dtype == torch.float32


def test_reward_error_survives_pickling() -> None:
    """Ray pickles a learner's RewardError to raise it in the driver."""
    import pickle

    from rewards import RewardError

    err = RewardError("flaky", "file /x.py", "raised ZeroDivisionError at step 2", "rewards[1]")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is RewardError and str(back) == str(err)
    assert (back.reward, back.origin, back.problem, back.entry) == (
        "flaky", "file /x.py", "raised ZeroDivisionError at step 2", "rewards[1]")


def test_reward_metrics_report_each_parts_within_group_spread() -> None:
    """group_std: the mean over groups of the unbiased std within each group, computed here
    group by group with numpy as the reference."""
    ctx = make_ctx(3, 4)
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(ctx.num_rollouts, generator=g)
    flat = torch.arange(ctx.num_rollouts // 4).repeat_interleave(4).float()  # no spread
    metrics = rewards.reward_metrics(ctx, wide + flat, {"wide": wide, "flat": flat}, {})
    groups = wide.numpy().reshape(-1, 4)
    expected = np.mean([np.std(row, ddof=1) for row in groups])
    assert metrics["reward/wide/group_std"] == pytest.approx(expected, rel=1e-5)
    assert metrics["reward/flat/group_std"] == 0.0
    assert metrics["reward/total/group_std"] == pytest.approx(expected, rel=1e-5)


def _answer(text: str) -> str:
    return f"<think>r</think><answer>{text}</answer><gen_emb>"


def test_gold_answers_and_the_check() -> None:
    from umerl.data.answers import gold_answer, names_answer

    assert gold_answer("digits_cls", {"label": "nine"}) == "nine"
    assert gold_answer("photo_i2t", {"label": "horse"}) is None  # its answer is a caption
    assert gold_answer("my_task", {"answer": "Paris", "label": "x"}) == "Paris"
    assert names_answer(_answer("  Nine. "), "nine")
    assert names_answer(_answer('"a human face"'), "a  human face")
    assert not names_answer(_answer("eight"), "nine")
    assert not names_answer("<think>nine</think>nine<gen_emb>", "nine")  # no <answer> at all
    assert not names_answer(_answer("ninety"), "nine")


def test_answer_accuracy_metrics_and_reward() -> None:
    """2 pairs x G=2: a labelled digits pair and an unlabelled caption pair; hand-counted."""
    completions = [_answer("nine"), _answer("four"),        # query, pair 0: 1 of 2 right
                   _answer("a dog"), _answer("a cat"),      # query, pair 1: no gold answer
                   _answer("nine"), _answer("Nine"),        # target, pair 0: 2 of 2
                   _answer("x"), _answer("y")]              # target, pair 1: no gold answer
    query, target = random_embeddings(2, 2, dim=8, seed=0)
    ctx = RewardContext.build(
        completions=completions, completion_ids=[[1]] * 8, query_embeddings=query,
        target_embeddings=target, group_size=2, step=1,
        meta=[{"id": "a", "task": "digits_cls", "meta": {"label": "nine"}},
              {"id": "b", "task": "photo_i2t", "meta": {"label": "dog"}}])
    correct = ctx.answer_correct()
    assert correct[[0, 1, 4, 5]].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert torch.isnan(correct[[2, 3, 6, 7]]).all()
    metrics = rewards.reward_metrics(ctx, torch.zeros(8), {}, {})
    assert metrics["rollout/answer_accuracy"] == pytest.approx(3 / 4)
    assert metrics["rollout/answer_accuracy/query"] == pytest.approx(1 / 2)
    assert metrics["rollout/answer_accuracy/target"] == pytest.approx(1.0)
    assert metrics["rollout/answer_accuracy/digits_cls"] == pytest.approx(3 / 4)
    assert "rollout/answer_accuracy/photo_i2t" not in metrics  # nothing to check there
    assert rewards.BUILTIN_REWARDS["answer"](ctx).tolist() == [1, 0, 0, 0, 1, 1, 0, 0]
    # a step without any declared answer logs no accuracy at all
    assert not any(k.startswith("rollout/answer") for k in
                   rewards.reward_metrics(make_ctx(2, 2), torch.zeros(8), {}, {}))


def test_a_reward_that_never_returns_is_a_reward_error_within_its_timeout(tmp_path) -> None:
    """A plug-in that sleeps for ever: with a timeout, the RewardSet raises RewardError naming
    the reward, the step and rl.reward_timeout_s within the timeout plus a little (run in a
    thread here, so that a regression fails the test instead of hanging it)."""
    import threading
    import time

    plugin = tmp_path / "stuck.py"
    plugin.write_text("import time\n\ndef stuck(ctx):\n    time.sleep(3600)\n")
    reward_set = rewards_from_config([{"name": "format"}, {"name": f"{plugin}:stuck"}],
                                     timeout_s=1.0)
    outcome: dict = {}

    def run() -> None:
        start = time.monotonic()
        try:
            reward_set(make_ctx(2, 2))  # step 3
        except RewardError as err:
            outcome["error"], outcome["seconds"] = err, time.monotonic() - start

    caller = threading.Thread(target=run, daemon=True)
    caller.start()
    caller.join(timeout=10)
    assert not caller.is_alive(), "the reward set hangs on a reward that never returns"
    err = outcome["error"]
    assert err.reward == f"{plugin}:stuck" and "rl.reward_timeout_s=1 s at step 3" in str(err)
    assert 1.0 <= outcome["seconds"] < 3.0
    # A reward that answers in time gives what it gives without the timeout.
    total, parts, _ = rewards_from_config([{"name": "format"}], timeout_s=5.0)(make_ctx(2, 2))
    assert torch.equal(total, rewards_from_config([{"name": "format"}])(make_ctx(2, 2))[0])
