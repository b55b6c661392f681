"""Adaptive mode selection: a small classifier that decides per input whether reasoning pays off.

UME-R1's oracle (the better of disc and gen per query) sits several points above either mode,
but it needs both outcomes, which exist only offline. The router learns that choice from data
available *before* generation: the input's discriminative embedding (one forward pass, needed
anyway) and cheap features of the input itself (media counts, text length).

Fitting (``fit_router``; ``umerl.eval.evaluate.fit_on_tasks`` gathers the data) uses per-query disc
and gen outcomes on a training split, the same per-query headline scores ``umerl eval`` computes
for the oracle. Queries where both modes score the same carry no signal and get weight zero;
the others are labelled by which mode won and weighted by how much, so the weighted logistic
loss approximates the routed score. The decision threshold is chosen on cross-validated
probabilities (ties go to the higher threshold: fewer inputs pay for generation).

A router file is JSON (standardisation, weights, bias, threshold): loading one runs no code,
and the serving path needs no scikit-learn.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from umerl.data.formats import Side

FORMAT = "umerl-router/1"
CHEAP_FEATURES = ("num_images", "num_frames", "text_only", "log_text_chars", "log_text_words")
C_GRID = (0.01, 0.1, 1.0, 10.0)  # inverse regularisation strengths tried by cross-validation


def cheap_features(side: Side) -> np.ndarray:
    """Features of the raw input, known before any model call."""
    text = side.text or ""
    return np.array([
        len(side.images), len(side.video), float(side.is_text_only),
        math.log1p(len(text)), math.log1p(len(text.split())),
    ], dtype=np.float64)


def router_features(sides: Sequence[Side], disc: np.ndarray) -> np.ndarray:
    """[N, hidden + cheap] features: each input's disc embedding, then its cheap features."""
    disc = np.asarray(disc, dtype=np.float64)
    if disc.ndim != 2 or len(disc) != len(sides):
        raise ValueError(f"need one disc embedding per side: {len(sides)} sides, "
                         f"embeddings of shape {disc.shape}")
    cheap = np.stack([cheap_features(s) for s in sides]) if sides else np.zeros((0, 5))
    return np.hstack([disc, cheap])


@dataclass
class Router:
    """A logistic model of P(gen beats disc) over standardised features, and its threshold."""

    hidden_size: int
    mean: list[float]
    scale: list[float]
    weights: list[float]
    bias: float
    threshold: float
    meta: dict[str, Any] = field(default_factory=dict)

    def gen_probability(self, sides: Sequence[Side], disc: np.ndarray) -> np.ndarray:
        disc = np.asarray(disc)
        if disc.ndim != 2 or disc.shape[1] != self.hidden_size:
            raise ValueError(f"this router was fitted on {self.hidden_size}-d disc embeddings, "
                             f"got shape {disc.shape}: fit it on this checkpoint")
        x = (router_features(sides, disc) - np.asarray(self.mean)) / np.asarray(self.scale)
        return 1.0 / (1.0 + np.exp(-(x @ np.asarray(self.weights) + self.bias)))

    def route(self, sides: Sequence[Side], disc: np.ndarray) -> np.ndarray:
        """[N] bool: True sends the input to the generative (reasoning) path."""
        return self.gen_probability(sides, disc) > self.threshold

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps({"format": FORMAT, **asdict(self)}, indent=1) + "\n",
                       encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Router:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: not a readable router file ({err})") from None
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise ValueError(f"{path}: not a router file (format {FORMAT!r} expected); "
                             "write one with `umerl route fit`")
        try:
            router = cls(**data)
        except TypeError as err:
            raise ValueError(f"{path}: malformed router file ({err})") from None
        width = router.hidden_size + len(CHEAP_FEATURES)
        if not all(len(v) == width for v in (router.mean, router.scale, router.weights)):
            raise ValueError(f"{path}: mean, scale and weights must each have {width} values")
        return router


@dataclass
class RoutingData:
    """Everything a router is fitted on: per query its input, disc embedding and both outcomes."""

    sides: list[Side]
    disc: np.ndarray  # [N, hidden]
    disc_scores: np.ndarray  # [N] headline metric per query in disc mode
    gen_scores: np.ndarray  # [N] the same in gen mode
    tasks: list[str]  # [N] task of each query, for the report

    @property
    def gain(self) -> np.ndarray:
        return self.gen_scores - self.disc_scores

    @property
    def overall_gain(self) -> np.ndarray:
        """Each query's gain scaled by its share of the overall score (the plain mean over
        tasks of each task's mean): a query of a small task counts more. Its mean over queries
        is the overall gain of sending every query to gen."""
        names, index, counts = np.unique(self.tasks, return_inverse=True, return_counts=True)
        return self.gain * len(self.tasks) / (counts[index] * len(names))


def fit_router(data: RoutingData, folds: int = 5, seed: int = 0) -> Router:
    """Fit the classifier and pick C and the threshold by ``folds``-fold cross-validation
    (``cv_gain`` in the meta: the cross-validated gain over disc of the overall score)."""
    from sklearn.preprocessing import StandardScaler

    x = router_features(data.sides, data.disc)
    gain = data.overall_gain  # the fit maximises the overall score, as umerl eval reports it
    scaler = StandardScaler().fit(x)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)  # constant features stay inert
    x = (x - scaler.mean_) / scale
    if not np.any(gain > 0) or not np.any(gain < 0):
        # One mode never loses: nothing to learn, route everything to the winner.
        return _constant_router(x.shape[1], scaler.mean_, scale, bool(np.any(gain > 0)), data)
    best = max(
        ((c, *_best_threshold(_cv_probabilities(x, gain, c, folds, seed), gain))
         for c in C_GRID),
        key=lambda entry: (entry[2], -entry[0]),  # most gain; then the strongest regularisation
    )
    c, threshold, cv_gain = best
    model = _weighted_logistic(x, gain, c)
    return Router(
        hidden_size=int(data.disc.shape[1]), mean=scaler.mean_.tolist(), scale=scale.tolist(),
        weights=model.coef_[0].tolist(), bias=float(model.intercept_[0]),
        threshold=float(threshold),
        meta=_fit_meta(data, c=c, folds=folds, cv_gain=cv_gain),
    )


def _weighted_logistic(x: np.ndarray, gain: np.ndarray, c: float) -> Any:
    from sklearn.linear_model import LogisticRegression

    informative = gain != 0
    model = LogisticRegression(C=c, max_iter=2000)
    model.fit(x[informative], gain[informative] > 0, sample_weight=np.abs(gain[informative]))
    return model


def _cv_probabilities(x: np.ndarray, gain: np.ndarray, c: float, folds: int,
                      seed: int) -> np.ndarray:
    """Out-of-fold P(gen better) for every query (folds stratified by the sign of the gain)."""
    from sklearn.model_selection import StratifiedKFold

    labels = np.sign(gain).astype(int)
    smallest = min(np.bincount(labels + 1)[np.bincount(labels + 1) > 0])
    splitter = StratifiedKFold(n_splits=max(2, min(folds, smallest)), shuffle=True,
                               random_state=seed)
    probs = np.zeros(len(gain))
    for train, held_out in splitter.split(x, labels):
        if not (np.any(gain[train] > 0) and np.any(gain[train] < 0)):
            probs[held_out] = float(np.mean(gain[train] > 0))
            continue
        probs[held_out] = _weighted_logistic(x[train], gain[train], c).predict_proba(
            x[held_out])[:, 1]
    return probs


def _best_threshold(probs: np.ndarray, gain: np.ndarray) -> tuple[float, float]:
    """The threshold that maximises the routed gain over disc (route to gen when p > t);
    among equal gains the highest, so the fewest inputs generate. 1.0: never generate."""
    best_t, best_gain = 1.0, 0.0
    for t in sorted(set(probs.tolist()), reverse=True):
        routed = float(gain[probs > t].sum())
        if routed > best_gain + 1e-12:
            best_t, best_gain = t, routed
    # Below the smallest probability every input generates.
    everything = float(gain.sum())
    if everything > best_gain + 1e-12:
        best_t, best_gain = float(min(probs)) - 1e-9, everything
    return best_t, best_gain / len(gain)


def _constant_router(width: int, mean: np.ndarray, scale: np.ndarray, to_gen: bool,
                     data: RoutingData) -> Router:
    return Router(
        hidden_size=int(data.disc.shape[1]), mean=mean.tolist(), scale=scale.tolist(),
        weights=[0.0] * width, bias=0.0, threshold=-1.0 if to_gen else 1.0,
        meta=_fit_meta(data, c=None, folds=0, cv_gain=None),
    )


def _fit_meta(data: RoutingData, **extra: Any) -> dict[str, Any]:
    gain = data.gain
    return {
        "num_queries": len(gain), "gen_better": int(np.sum(gain > 0)),
        "disc_better": int(np.sum(gain < 0)), "tied": int(np.sum(gain == 0)),
        "disc_score": float(data.disc_scores.mean()), "gen_score": float(data.gen_scores.mean()),
        "oracle_score": float(np.maximum(data.disc_scores, data.gen_scores).mean()),
        "tasks": sorted(set(data.tasks)), "features": ["disc_embedding", *CHEAP_FEATURES],
        **extra,
    }


def describe(router: Router) -> str:
    """One paragraph on what a fitted router learned, for the console."""
    m = router.meta
    cv = m.get("cv_gain")
    cv_text = f"{cv * 100:+.1f} points over disc" if cv is not None else "n/a"
    return (f"{m['num_queries']} queries: gen better on {m['gen_better']}, disc better on "
            f"{m['disc_better']}, tied on {m['tied']} (disc {m['disc_score'] * 100:.1f}, gen "
            f"{m['gen_score'] * 100:.1f}, oracle {m['oracle_score'] * 100:.1f}); C={m['c']}, "
            f"threshold {router.threshold:.3f}, cross-validated routed gain {cv_text}")


def routed(per_query: dict[str, dict[str, np.ndarray]], to_gen: np.ndarray
           ) -> dict[str, np.ndarray]:
    """Per-query metrics of the routed mode: gen's where routed to gen, else disc's (a routed
    query is scored against the index of its own mode)."""
    disc, gen = per_query["disc"], per_query["gen"]
    return {key: np.where(to_gen, gen[key], disc[key]) for key in disc}
