"""MMEB-V2-style retrieval metrics: per-query ranking scores, pass@k, oracle and aggregation.

Protocol (as in MMEB-V2 / VLM2Vec ``RankingMetrics``): query and candidate embeddings are
L2-normalised, the score is their dot product, and each query ranks its candidates by
descending score. A candidate is relevant when its relevance grade is > 0; grades may be
graded (0, 1, 2, ...) for nDCG.

Two deliberate departures from the MMEB reference code, both so results are reproducible:

* Ties. MMEB ranks with ``np.argsort(-scores)``, numpy's default quicksort, which is not a
  stable sort, so the order of equal-scored candidates is an implementation detail. We break
  ties deterministically and pessimistically: among equal scores, less relevant candidates
  come first, then lower candidate index. MMEB files list the positive first, so a
  "lower index first" rule alone would hand a collapsed model (all scores equal) a perfect
  Hit@1; with this rule ties never help a model.
* Grade alignment. VLM2Vec builds ``true_labels = list(set(labels))`` and zips it with
  ``rel_scores`` kept in the original order. Set iteration order depends on string hashing, so
  with graded relevance each grade can end up attached to a different candidate and nDCG
  changes with ``PYTHONHASHSEED``. Here relevance is an array indexed like the scores, so each
  grade always stays with its own candidate.

Task score = mean over the task's queries; modality score = unweighted mean over that
modality's tasks; overall = unweighted mean over all tasks (big tasks do not count more).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)

# Order of the metric families in every result dict (keys are f"{name}@{k}").
METRIC_NAMES = ("hit", "ndcg_linear", "ndcg_exponential", "precision", "recall", "mrr", "map")


def rank(scores: np.ndarray, relevance: np.ndarray | None = None) -> np.ndarray:
    """Candidate indices best first; equal scores keep the lower index first.

    With ``relevance`` (aligned with ``scores``), ties put the less relevant candidate first,
    so a tie can never improve a score. A 1-D array is one query; a 2-D
    ``[queries, candidates]`` array ranks each row.
    """
    s = np.asarray(scores)
    if s.ndim not in (1, 2):
        raise ValueError(f"scores must be 1-D or 2-D, got shape {s.shape}")
    # float64 first: negating unsigned or bool scores would wrap around or fail.
    s = s.astype(np.float64, copy=False)
    if np.isnan(s).any():
        # NaN has no place in a descending order; it usually means a broken embedding.
        raise ValueError("scores contain NaN")
    if relevance is None:
        return np.argsort(-s, axis=-1, kind="stable")
    rel = np.broadcast_to(np.asarray(relevance, dtype=np.float64), s.shape)
    if s.ndim == 1:
        return np.lexsort((rel, -s))  # lexsort is stable: equal keys keep index order
    return np.stack([np.lexsort((r, -row)) for row, r in zip(s, rel)])


def metric_keys(ks: Iterable[int] = DEFAULT_KS) -> list[str]:
    """The result keys produced for ``ks``, in output order."""
    return [f"{name}@{k}" for name in METRIC_NAMES for k in ks]


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must not be empty")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"every k must be a positive integer, got {k!r}")
    return tuple(int(k) for k in ks)


def _dcg(gains: np.ndarray) -> float:
    # Position i (0-based) is discounted by log2(i + 2), i.e. rank 1 -> log2(2) = 1.
    return float(np.sum(gains / np.log2(np.arange(2, gains.size + 2))))


def query_metrics(
    scores: np.ndarray,
    relevance: np.ndarray,
    ks: Iterable[int] = DEFAULT_KS,
    *,
    query_index: int | None = None,
) -> dict[str, float]:
    """All metrics at every k for one query.

    ``scores`` and ``relevance`` are 1-D and aligned by candidate. ``query_index`` only
    names the query in error messages. Raises ValueError when no candidate is relevant:
    every MMEB query has a positive, so that is a data error, not a zero score.
    """
    ks = _check_ks(ks)
    s = np.asarray(scores)
    rel = np.asarray(relevance, dtype=np.float64)
    where = "query" if query_index is None else f"query {query_index}"
    if s.ndim != 1 or rel.ndim != 1 or s.shape != rel.shape:
        raise ValueError(
            f"{where}: scores and relevance must be 1-D of equal length, "
            f"got {s.shape} and {rel.shape}"
        )
    if np.isnan(rel).any() or (rel < 0).any():
        raise ValueError(f"{where}: relevance grades must be non-negative numbers")
    num_relevant = int(np.count_nonzero(rel > 0))
    if num_relevant == 0:
        raise ValueError(f"{where} has no relevant candidate (all relevance grades are 0)")

    ranked_rel = rel[rank(s, rel)]
    is_rel = ranked_rel > 0
    hits_so_far = np.cumsum(is_rel)
    first_rank = int(np.argmax(is_rel)) + 1  # exists: num_relevant > 0
    ideal_rel = np.sort(rel)[::-1]
    # Precision at each relevant position; summing them over the top k gives AP@k's numerator.
    precision_at_hits = np.where(is_rel, hits_so_far / np.arange(1, rel.size + 1), 0.0)

    out: dict[str, float] = {}
    per_k: dict[int, dict[str, float]] = {}
    for k in ks:
        top = min(k, rel.size)
        found = int(hits_so_far[top - 1])
        per_k[k] = {
            "hit": float(found > 0),
            "ndcg_linear": _dcg(ranked_rel[:top]) / _dcg(ideal_rel[:top]),
            "ndcg_exponential": (
                _dcg(np.exp2(ranked_rel[:top]) - 1.0) / _dcg(np.exp2(ideal_rel[:top]) - 1.0)
            ),
            # Divide by k, not by the pool size: a pool smaller than k cannot fill the list.
            "precision": found / k,
            "recall": found / num_relevant,
            "mrr": 1.0 / first_rank if first_rank <= k else 0.0,
            # Normalised by min(R, k) so a perfect top-k list scores 1 even when R > k.
            "map": float(np.sum(precision_at_hits[:top])) / min(num_relevant, k),
        }
    for name in METRIC_NAMES:
        for k in ks:
            out[f"{name}@{k}"] = per_k[k][name]
    return out


def score_queries(
    scores: Sequence[np.ndarray] | np.ndarray,
    relevance: Sequence[np.ndarray] | np.ndarray,
    ks: Iterable[int] = DEFAULT_KS,
) -> dict[str, np.ndarray]:
    """Per-query metric values, one array of length ``n_queries`` per key.

    Accepts a 2-D ``[queries, candidates]`` matrix (global candidate pool) or lists of 1-D
    arrays whose lengths may differ per query (local pools, as in most MMEB tasks).
    """
    ks = _check_ks(ks)
    if len(scores) != len(relevance):
        raise ValueError(f"got scores for {len(scores)} queries but relevance for {len(relevance)}")
    if len(scores) == 0:
        raise ValueError("no queries to score")
    rows = [
        query_metrics(s, r, ks, query_index=i)
        for i, (s, r) in enumerate(zip(scores, relevance, strict=True))
    ]
    return {key: np.array([row[key] for row in rows]) for key in metric_keys(ks)}


def mean_metrics(per_query: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Mean over queries of every per-query metric (the task score)."""
    out = {}
    for key, values in per_query.items():
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            raise ValueError(f"{key}: no queries to average")
        out[key] = float(values.mean())
    return out


def first_hit(scores: np.ndarray, relevance: np.ndarray) -> bool:
    """Whether the top-ranked candidate (pessimistic tie-break) is relevant."""
    s = np.asarray(scores)
    rel = np.asarray(relevance)
    if s.ndim != 1 or s.shape != rel.shape or s.size == 0:
        raise ValueError(f"need non-empty 1-D scores and relevance, got {s.shape}, {rel.shape}")
    return bool(rel[rank(s, rel)[0]] > 0)


def num_first_hits(sample_scores: np.ndarray, relevance: np.ndarray) -> int:
    """``c`` for pass@k: how many of one query's sampled embeddings rank a positive first.

    ``sample_scores`` is ``[n_samples, candidates]``: one score row per sampled generation.
    """
    s = np.asarray(sample_scores)
    if s.ndim != 2:
        raise ValueError(f"sample_scores must be [n_samples, candidates], got {s.shape}")
    return sum(first_hit(row, relevance) for row in s)


def pass_at_k(num_correct: np.ndarray, num_samples: int, k: int) -> float:
    """Mean over queries of the unbiased pass@k estimator (``pass_at_k_per_query``)."""
    return float(np.mean(pass_at_k_per_query(num_correct, num_samples, k)))


def pass_at_k_per_query(num_correct: np.ndarray, num_samples: int, k: int) -> np.ndarray:
    """The unbiased pass@k estimator 1 - C(n-c, k) / C(n, k) of each query.

    ``num_correct[q]`` is ``c``, the number of the ``n = num_samples`` sampled embeddings of
    query q whose ranking puts a relevant candidate first (Chen et al. 2021). With k == n this
    is the fraction of queries where any sample hits.
    """
    c = np.asarray(num_correct)
    n = num_samples
    if c.ndim != 1 or c.size == 0:
        raise ValueError(f"num_correct must be a non-empty 1-D array, got shape {c.shape}")
    if not np.issubdtype(c.dtype, np.integer) and not np.all(c == np.round(c)):
        raise ValueError("num_correct must hold whole numbers")
    if n < 1 or k < 1:
        raise ValueError(f"num_samples and k must be >= 1, got n={n}, k={k}")
    if k > n:
        raise ValueError(f"pass@k needs k <= num_samples, got k={k} > n={n}")
    if (c < 0).any() or (c > n).any():
        raise ValueError(f"num_correct must lie in [0, {n}]")
    # Exact integer binomials: the float product form loses precision for large n.
    total = math.comb(n, k)
    return np.array([1.0 - math.comb(n - int(ci), k) / total for ci in c])


def oracle(
    per_query_a: Mapping[str, np.ndarray], per_query_b: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Per query, the better of two modes (e.g. discriminative vs generative embeddings).

    Upper bound of a perfect per-query mode selector; only meaningful when both dicts score
    the same queries in the same order.
    """
    if set(per_query_a) != set(per_query_b):
        raise ValueError(f"metric keys differ: {sorted(set(per_query_a) ^ set(per_query_b))}")
    out = {}
    for key, a in per_query_a.items():
        a = np.asarray(a)
        b = np.asarray(per_query_b[key])
        if a.shape != b.shape:
            raise ValueError(f"{key}: per-query arrays differ in shape, {a.shape} vs {b.shape}")
        out[key] = np.maximum(a, b)
    return out


def summarize(task_scores: Mapping[str, float], task_modality: Mapping[str, str]) -> dict:
    """Per-modality and overall scores as unweighted means over tasks.

    ``task_modality`` may list more tasks than were scored (a lookup table for the whole
    benchmark); only tasks in ``task_scores`` count. Modalities appear in first-seen order.
    """
    if not task_scores:
        raise ValueError("no task scores to summarize")
    missing = [t for t in task_scores if t not in task_modality]
    if missing:
        raise KeyError(f"no modality for tasks: {missing}")
    by_modality: dict[str, list[float]] = {}
    for task, value in task_scores.items():
        by_modality.setdefault(task_modality[task], []).append(float(value))
    return {
        "per_modality": {m: float(np.mean(v)) for m, v in by_modality.items()},
        # Over tasks, not modalities: matches MMEB's "overall" column.
        "overall": float(np.mean([float(v) for v in task_scores.values()])),
        "num_tasks": len(task_scores),
    }


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, (float, int, np.floating, np.integer)) and not isinstance(value, bool):
        return f"{100.0 * float(value):.1f}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    """A plain aligned text table; scores in [0, 1] are shown as percentages (1 decimal).

    The first column holds names and is left-aligned; the rest are right-aligned. ``None``
    or a missing key shows as "-" (e.g. a model not evaluated on some modality).
    """
    if not columns:
        raise ValueError("need at least one column")
    body = [
        [str(row.get(columns[0], "-"))] + [_cell(row.get(c)) for c in columns[1:]] for row in rows
    ]
    header = list(columns)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(columns))]

    def line(cells: list[str]) -> str:
        parts = [cells[0].ljust(widths[0])]
        parts += [cell.rjust(w) for cell, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])
