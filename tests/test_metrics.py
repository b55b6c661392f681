"""Tests for umerl.eval.metrics: cross-checks against pytrec_eval and sklearn, plus
hand-worked cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import pytrec_eval
from sklearn.metrics import ndcg_score

from umerl.eval.metrics import (
    DEFAULT_KS,
    first_hit,
    format_table,
    mean_metrics,
    metric_keys,
    num_first_hits,
    oracle,
    pass_at_k,
    query_metrics,
    rank,
    score_queries,
    summarize,
)


def _random_task(seed: int, n_queries: int, n_candidates: int | None):
    """Random continuous scores (no ties) and grades in {0..3}, >= 1 relevant per query.

    ``n_candidates=None`` gives ragged local pools of 3..40 candidates.
    """
    rng = np.random.default_rng(seed)
    scores, rels = [], []
    for _ in range(n_queries):
        m = n_candidates if n_candidates is not None else int(rng.integers(3, 41))
        s = rng.standard_normal(m)
        r = rng.integers(0, 4, size=m)
        if not (r > 0).any():
            r[rng.integers(m)] = rng.integers(1, 4)
        assert np.unique(s).size == m  # no ties, so every library orders identically
        scores.append(s)
        rels.append(r)
    return scores, rels


# -- 1. pytrec_eval -------------------------------------------------------------------------


@pytest.mark.parametrize("n_candidates", [40, None], ids=["global-pool", "ragged-pools"])
def test_matches_pytrec_eval(n_candidates):
    scores, rels = _random_task(seed=0, n_queries=50, n_candidates=n_candidates)
    # Zero grades are included in qrels for every query; trec_eval treats them as non-relevant.
    qrels = {
        f"q{i:03d}": {f"d{j:03d}": int(g) for j, g in enumerate(r)} for i, r in enumerate(rels)
    }
    run = {
        f"q{i:03d}": {f"d{j:03d}": float(x) for j, x in enumerate(s)} for i, s in enumerate(scores)
    }
    measures = {
        "ndcg_cut.5,10",
        "success.1,5,10",
        "recip_rank",
        "P.5,10",
        "recall.5,10",
        "map_cut.5,10",
    }
    trec = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    ours = score_queries(scores, rels, ks=(1, 5, 10, 40))

    for i, r in enumerate(rels):
        t = trec[f"q{i:03d}"]
        num_rel = int((r > 0).sum())
        assert ours["hit@1"][i] == pytest.approx(t["success_1"], abs=1e-6)
        for k in (5, 10):
            assert ours[f"ndcg_linear@{k}"][i] == pytest.approx(t[f"ndcg_cut_{k}"], abs=1e-6)
            assert ours[f"hit@{k}"][i] == pytest.approx(t[f"success_{k}"], abs=1e-6)
            assert ours[f"precision@{k}"][i] == pytest.approx(t[f"P_{k}"], abs=1e-6)
            assert ours[f"recall@{k}"][i] == pytest.approx(t[f"recall_{k}"], abs=1e-6)
            # trec's map_cut divides by R; ours by min(R, k). Rescale to compare exactly.
            rescaled = ours[f"map@{k}"][i] * min(num_rel, k) / num_rel
            assert rescaled == pytest.approx(t[f"map_cut_{k}"], abs=1e-6)
        # recip_rank is untruncated; at k >= pool size our mrr is untruncated too.
        assert ours["mrr@40"][i] == pytest.approx(t["recip_rank"], abs=1e-6)

    means = mean_metrics(ours)
    trec_mean = np.mean([trec[q]["ndcg_cut_5"] for q in trec])
    assert means["ndcg_linear@5"] == pytest.approx(trec_mean, abs=1e-6)
    assert means["hit@1"] == pytest.approx(np.mean([trec[q]["success_1"] for q in trec]), abs=1e-6)


# -- 2. sklearn -----------------------------------------------------------------------------


def test_matches_sklearn_ndcg():
    scores, rels = _random_task(seed=1, n_queries=50, n_candidates=40)
    s, r = np.stack(scores), np.stack(rels)
    ours = score_queries(s, r, ks=(5, 10))
    for k in (5, 10):
        assert ours[f"ndcg_linear@{k}"].mean() == pytest.approx(ndcg_score(r, s, k=k), abs=1e-6)
        # Exponential gain is linear nDCG on transformed grades (same ideal order).
        expected_exp = ndcg_score(2.0**r - 1.0, s, k=k)
        assert ours[f"ndcg_exponential@{k}"].mean() == pytest.approx(expected_exp, abs=1e-6)
        for i in range(len(s)):
            expected = ndcg_score(r[i : i + 1], s[i : i + 1], k=k)
            assert ours[f"ndcg_linear@{k}"][i] == pytest.approx(expected, abs=1e-6)


def test_matrix_and_list_inputs_agree():
    scores, rels = _random_task(seed=2, n_queries=20, n_candidates=15)
    as_matrix = score_queries(np.stack(scores), np.stack(rels))
    as_list = score_queries(scores, rels)
    assert list(as_matrix) == list(as_list) == metric_keys(DEFAULT_KS)
    for key in as_list:
        assert as_list[key].shape == (20,)
        np.testing.assert_array_equal(as_matrix[key], as_list[key])


# -- 3. hand-worked cases -------------------------------------------------------------------


def test_hand_worked_graded_query():
    # Ranking is candidates 0, 1, 2, so the ranked grades are 0, 2, 1.
    m = query_metrics(np.array([0.9, 0.5, 0.1]), np.array([0, 2, 1]), ks=(1, 2, 5))
    log2 = math.log2
    dcg = 0 / log2(2) + 2 / log2(3) + 1 / log2(4)
    idcg = 2 / log2(2) + 1 / log2(3) + 0 / log2(4)
    assert m["ndcg_linear@5"] == pytest.approx(dcg / idcg)
    assert m["ndcg_linear@2"] == pytest.approx((2 / log2(3)) / (2 + 1 / log2(3)))
    assert m["ndcg_linear@1"] == 0.0
    dcg_exp = (2**0 - 1) / log2(2) + (2**2 - 1) / log2(3) + (2**1 - 1) / log2(4)
    idcg_exp = (2**2 - 1) / log2(2) + (2**1 - 1) / log2(3)
    assert m["ndcg_exponential@5"] == pytest.approx(dcg_exp / idcg_exp)
    assert (m["hit@1"], m["hit@2"], m["hit@5"]) == (0.0, 1.0, 1.0)
    assert (m["mrr@1"], m["mrr@2"], m["mrr@5"]) == (0.0, 0.5, 0.5)
    assert m["precision@2"] == pytest.approx(1 / 2)
    assert m["precision@5"] == pytest.approx(2 / 5)  # divided by k even though only 3 exist
    assert m["recall@2"] == pytest.approx(1 / 2)
    assert m["recall@5"] == 1.0
    # Relevant at ranks 2 and 3: precisions 1/2 and 2/3, normalised by min(R=2, k).
    assert m["map@2"] == pytest.approx((1 / 2) / 2)
    assert m["map@5"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_hand_worked_truncation():
    # Only relevant candidate is index 6, ranked 7th by descending score.
    scores = np.arange(10, 0, -1, dtype=float)
    rel = np.zeros(10)
    rel[6] = 1
    m = query_metrics(scores, rel, ks=(5, 10))
    assert m["mrr@5"] == 0.0 and m["hit@5"] == 0.0 and m["ndcg_linear@5"] == 0.0
    assert m["mrr@10"] == pytest.approx(1 / 7)
    assert m["ndcg_linear@10"] == pytest.approx(1 / math.log2(8))
    assert m["map@10"] == pytest.approx(1 / 7)

    # More relevant candidates than k: a perfect top-k list gets map@k = 1, recall@k = k / R.
    m = query_metrics(scores, np.ones(10), ks=(5,))
    assert m["map@5"] == 1.0 and m["precision@5"] == 1.0
    assert m["recall@5"] == pytest.approx(5 / 10)


# -- 4. ties and grade alignment ------------------------------------------------------------


def test_ties_break_deterministically_and_never_help():
    np.testing.assert_array_equal(rank(np.full(7, 0.3)), np.arange(7))
    np.testing.assert_array_equal(rank(np.array([0.1, 0.5, 0.5, 0.2, 0.5])), [1, 2, 4, 3, 0])
    np.testing.assert_array_equal(
        rank(np.array([[1.0, 1.0, 2.0], [0.0, 0.0, 0.0]])), [[2, 0, 1], [0, 1, 2]]
    )
    # Many ties in a long array, where numpy's default (unstable) sort does reorder them:
    # expected order is by score descending, then index ascending.
    s = np.random.default_rng(5).integers(0, 3, size=1000).astype(float)
    np.testing.assert_array_equal(rank(s), np.lexsort((np.arange(s.size), -s)))
    # With relevance given, ties put the less relevant candidate first (then lower index):
    # a collapsed model (all scores equal) gains nothing from the positive being listed first.
    np.testing.assert_array_equal(rank(np.zeros(4), np.array([1, 0, 2, 0])), [1, 3, 0, 2])
    np.testing.assert_array_equal(
        rank(np.array([0.9, 0.5, 0.5, 0.5]), np.array([0, 1, 0, 0])), [0, 2, 3, 1])
    for rel in ([1, 0, 0, 0], [0, 0, 1, 0], [2, 1, 0, 0]):
        assert query_metrics(np.zeros(4), np.array(rel), ks=(1,))["hit@1"] == 0.0
        assert not first_hit(np.zeros(4), np.array(rel))
    assert query_metrics(np.zeros(3), np.ones(3), ks=(1,))["hit@1"] == 1.0  # all relevant
    # A strictly better score still wins regardless of listing order.
    assert first_hit(np.array([0.2, 0.1, 0.1]), np.array([1, 0, 0]))
    assert first_hit(np.array([0.1, 0.1, 0.2]), np.array([0, 0, 1]))


def test_grades_stay_with_their_candidates():
    rng = np.random.default_rng(3)
    scores = rng.standard_normal(12)
    rel = np.array([3, 0, 1, 2, 0, 0, 1, 0, 3, 0, 2, 0])
    base = query_metrics(scores, rel)
    for _ in range(20):
        perm = rng.permutation(12)
        shuffled = query_metrics(scores[perm], rel[perm])
        for key in base:
            assert shuffled[key] == pytest.approx(base[key])
    # Grades moved to other candidates (scores kept) must change graded nDCG, or the test above
    # could not catch a misalignment.
    order = rank(scores)
    moved = rel.copy()
    moved[order[0]], moved[order[-1]] = 0, 3
    assert query_metrics(scores, moved)["ndcg_linear@5"] != pytest.approx(base["ndcg_linear@5"])


# -- 5. pass@k ------------------------------------------------------------------------------


def test_pass_at_k_matches_enumeration():
    rng = np.random.default_rng(4)
    for n in range(1, 9):
        hits = rng.random((30, n)) < rng.random((30, 1))  # per-query hit rate varies
        c = hits.sum(axis=1)
        for k in range(1, n + 1):
            brute = [
                np.mean([any(h[list(subset)]) for subset in itertools.combinations(range(n), k)])
                for h in hits
            ]
            assert pass_at_k(c, n, k) == pytest.approx(np.mean(brute), abs=1e-12)
        # k == n: a query passes iff any of its samples hits.
        assert pass_at_k(c, n, n) == pytest.approx(hits.any(axis=1).mean())


def test_pass_at_k_rejects_bad_input():
    with pytest.raises(ValueError, match="k <= num_samples"):
        pass_at_k(np.array([1, 2]), num_samples=3, k=4)
    with pytest.raises(ValueError):
        pass_at_k(np.array([4]), num_samples=3, k=1)


def test_num_first_hits_counts_samples():
    rel = np.array([0, 1, 0])
    sample_scores = np.array(
        [
            [0.9, 0.1, 0.0],  # candidate 0 first: miss
            [0.1, 0.9, 0.0],  # hit
            [0.5, 0.5, 0.0],  # tie -> candidate 0 first: miss
            [0.0, 0.2, 0.1],  # hit
        ]
    )
    assert num_first_hits(sample_scores, rel) == 2


# -- 6. aggregation and oracle --------------------------------------------------------------


def test_summarize_is_plain_mean_over_tasks():
    scores = {"A": 0.5, "B": 0.7, "C": 0.9, "D": 0.2}
    modality = {"A": "image", "B": "image", "C": "video", "D": "visdoc", "unused": "image"}
    out = summarize(scores, modality)
    assert out["per_modality"] == pytest.approx(
        {"image": (0.5 + 0.7) / 2, "video": 0.9, "visdoc": 0.2}
    )
    assert out["overall"] == pytest.approx((0.5 + 0.7 + 0.9 + 0.2) / 4)
    assert out["num_tasks"] == 4
    with pytest.raises(KeyError):
        summarize({"X": 0.1}, modality)


def test_task_mean_not_query_weighted():
    # Task "small": 1 query, hit. Task "big": 3 queries, all miss. Query-weighted would be 1/4.
    small = mean_metrics(score_queries([np.array([1.0, 0.0])], [np.array([1, 0])], ks=(1,)))
    big = mean_metrics(score_queries(np.array([[1.0, 0.0]] * 3), np.array([[0, 1]] * 3), ks=(1,)))
    out = summarize(
        {"small": small["hit@1"], "big": big["hit@1"]}, {"small": "image", "big": "image"}
    )
    assert out["overall"] == pytest.approx(0.5)
    assert out["per_modality"]["image"] == pytest.approx(0.5)


def test_oracle_takes_per_query_max():
    a = {"hit@1": np.array([1.0, 0.0, 0.0]), "ndcg_linear@5": np.array([0.2, 0.9, 0.4])}
    b = {"hit@1": np.array([0.0, 0.0, 1.0]), "ndcg_linear@5": np.array([0.3, 0.1, 0.4])}
    out = oracle(a, b)
    np.testing.assert_array_equal(out["hit@1"], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(out["ndcg_linear@5"], [0.3, 0.9, 0.4])
    with pytest.raises(ValueError):
        oracle(a, {"hit@1": b["hit@1"]})
    with pytest.raises(ValueError):
        oracle({"hit@1": np.zeros(3)}, {"hit@1": np.zeros(2)})


def test_format_table():
    rows = [
        {"model": "UME-R1-2B", "image": 0.6612, "video": None, "overall": 0.5},
        {"model": "x", "image": 1.0, "video": 0.04},
    ]
    table = format_table(rows, ["model", "image", "video", "overall"])
    assert table.splitlines() == [
        "model      image  video  overall",
        "---------  -----  -----  -------",
        "UME-R1-2B   66.1      -     50.0",
        "x          100.0    4.0        -",
    ]


# -- 7. data errors -------------------------------------------------------------------------


def test_query_without_relevant_candidate_raises_with_index():
    scores = [np.array([0.3, 0.2]), np.array([0.1, 0.4, 0.2]), np.array([0.5, 0.6])]
    rels = [np.array([1, 0]), np.array([0, 0, 2]), np.array([0, 0])]
    with pytest.raises(ValueError, match=r"query 2 has no relevant"):
        score_queries(scores, rels)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="query 0"):
        score_queries([np.array([0.1, 0.2])], [np.array([1, 0, 0])])
    with pytest.raises(ValueError):
        score_queries([np.array([0.1])], [np.array([1]), np.array([1])])


def test_pass_at_k_per_query_by_hand() -> None:
    from umerl.eval.metrics import pass_at_k, pass_at_k_per_query

    correct = np.array([0, 1, 4])
    assert pass_at_k_per_query(correct, 4, 1).tolist() == [0.0, 0.25, 1.0]
    # k = 2 of n = 4 with c = 1: 1 - C(3, 2) / C(4, 2) = 1 - 3 / 6
    assert pass_at_k_per_query(correct, 4, 2).tolist() == [0.0, 0.5, 1.0]
    assert pass_at_k(correct, 4, 2) == pytest.approx(0.5)
