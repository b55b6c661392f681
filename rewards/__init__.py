"""The reward API: built-in UME-R1 rewards and plug-in rewards that see the whole RL step.

    from rewards import RewardContext, rewards_from_config

    reward_set = rewards_from_config([
        {"name": "format", "weight": 1.0},
        {"name": "embedding", "weight": 1.0},
        {"name": "recipes/rewards_example.py:short_reasoning", "weight": 0.1,
         "kwargs": {"target_tokens": 64}},
    ])
    total, parts, timings = reward_set(ctx)  # ctx: RewardContext of one step

See docs/rewards.md ("Writing a reward").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

from rewards.builtin import (
    BUILTIN_REWARDS,
    RankMargin,
    embedding_reward,
    matches_format,
    rank_and_margin,
)
from rewards.context import QUERY, TARGET, RewardContext, pair_meta
from rewards.registry import (
    Reward,
    RewardError,
    RewardSet,
    RewardSpec,
    WeightedReward,
    load_reward,
    reward_metrics,
    run_guarded,
)

__all__ = [
    "BUILTIN_REWARDS",
    "DEFAULT_REWARDS",
    "QUERY",
    "TARGET",
    "RankMargin",
    "Reward",
    "RewardContext",
    "RewardError",
    "RewardSet",
    "RewardSpec",
    "WeightedReward",
    "embedding_reward",
    "load_reward",
    "matches_format",
    "pair_meta",
    "rank_and_margin",
    "reward_metrics",
    "rewards_from_config",
    "run_guarded",
]

# UME-R1's total reward: format + R_emb, both with weight 1.
DEFAULT_REWARDS = [{"name": "format", "weight": 1.0}, {"name": "embedding", "weight": 1.0}]

_ENTRY_KEYS = {"name", "weight", "kwargs", "label"}


def rewards_from_config(entries: Sequence[Mapping[str, Any]] | Any,
                        base_dir: str | Path | None = None,
                        slow_seconds: float = 30.0, timeout_s: float | None = None
                        ) -> RewardSet:
    """Build a ``RewardSet`` from recipe entries ``{name, weight=1.0, kwargs={}, label=None}``.

    ``entries`` may be plain lists/dicts or OmegaConf containers. Relative plug-in file paths
    are tried from the working directory, then from ``base_dir`` (e.g. the recipe's folder).
    Every problem raises ``RewardError`` whose message starts with ``rewards[i]``.
    ``timeout_s``: each reward's limit per step (the learners pass ``rl.reward_timeout_s``).
    """
    entries = _to_plain(entries)
    if not isinstance(entries, list) or not entries:
        raise RewardError("?", "recipe", "expected a non-empty list of {name, weight, kwargs} "
                          f"entries, got {entries!r}", "rewards")
    loaded = []
    for index, entry in enumerate(entries):
        spec = _parse_entry(index, entry)
        try:
            reward = load_reward(spec.name, spec.kwargs, base_dir=base_dir)
        except RewardError as err:
            raise RewardError(err.reward, err.origin, err.problem, f"rewards[{index}]") from err
        if spec.label:
            reward.label = spec.label
        loaded.append(WeightedReward(reward, spec.weight))
    try:
        return RewardSet(loaded, slow_seconds=slow_seconds, timeout_s=timeout_s)
    except ValueError as err:
        raise RewardError("?", "recipe", str(err), "rewards") from None


def _parse_entry(index: int, entry: Any) -> RewardSpec:
    where = f"rewards[{index}]"
    name = entry.get("name", "?") if isinstance(entry, Mapping) else "?"
    if isinstance(entry, str):  # shorthand: a bare name, weight 1
        entry = {"name": entry}
    if not isinstance(entry, Mapping):
        raise RewardError(str(entry), "recipe", "expected a mapping with 'name'", where)
    unknown = sorted(set(entry) - _ENTRY_KEYS)
    if unknown:
        raise RewardError(str(name), "recipe",
                          f"unknown keys {unknown} (allowed: {sorted(_ENTRY_KEYS)})", where)
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RewardError(str(name), "recipe", f"missing or empty 'name' in {dict(entry)}", where)
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, Real):
        raise RewardError(name, "recipe", f"'weight' must be a number, got {weight!r}", where)
    kwargs = entry.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise RewardError(name, "recipe", f"'kwargs' must be a mapping, got {kwargs!r}", where)
    label = entry.get("label")
    if label is not None and (not isinstance(label, str) or not label):
        raise RewardError(name, "recipe", f"'label' must be a string, got {label!r}", where)
    return RewardSpec(name=name.strip(), weight=float(weight), kwargs=dict(kwargs), label=label)


def _to_plain(value: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value
