"""Paired comparison of two evaluations of the same tasks, with bootstrap intervals.

    umerl compare A/summary.json B/summary.json [--resamples 2000] [--seed 0]

For each task and mode, the difference B - A of the task's headline score, and a 95% interval
from a paired bootstrap over queries: resample the task's queries with replacement and take the
mean of (B - A) over the same resampled queries. "overall" is the plain mean over tasks (as in
the summary); its interval resamples every task's queries independently (a stratified
bootstrap), so a task with few queries widens it as it should. An interval above zero means B
beats A on these tasks beyond what the choice of queries can explain.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from umerl.eval import metrics


def paired_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, dict]:
    """task -> mode -> per-query differences B - A (both summaries must score the same
    queries: same task names, same query counts)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, task_b in b["tasks"].items():
        task_a = a["tasks"].get(name)
        if task_a is None:
            continue
        for mode, values_b in task_b.get("per_query", {}).items():
            values_a = task_a.get("per_query", {}).get(mode)
            if values_a is None:
                continue
            if len(values_a) != len(values_b):
                raise ValueError(f"task {name}: {len(values_a)} vs {len(values_b)} queries; "
                                 "only evaluations of the same queries can be paired")
            out.setdefault(name, {})[mode] = np.asarray(values_b) - np.asarray(values_a)
    if not out:
        raise ValueError("the two summaries share no task with per-query scores (evaluate "
                         "both with this umerl version)")
    return out


def compare(a: Mapping[str, Any], b: Mapping[str, Any], resamples: int = 2000,
            seed: int = 0) -> dict[str, Any]:
    """{"tasks": {task: {mode: {diff, low, high, n}}}, "overall": {mode: {diff, low, high}}}."""
    diffs = paired_differences(a, b)
    rng = np.random.default_rng(seed)
    modes = sorted({m for per in diffs.values() for m in per})
    result: dict[str, Any] = {"tasks": {}, "overall": {}}
    draws: dict[str, dict[str, np.ndarray]] = {}
    for name, per_mode in diffs.items():
        n = len(next(iter(per_mode.values())))
        picks = rng.integers(0, n, size=(resamples, n))  # the same resample for every mode
        result["tasks"][name] = {}
        for mode, d in per_mode.items():
            boot = d[picks].mean(axis=1)
            draws.setdefault(mode, {})[name] = boot
            low, high = np.percentile(boot, [2.5, 97.5])
            result["tasks"][name][mode] = {"diff": float(d.mean()), "low": float(low),
                                           "high": float(high), "n": n}
    for mode in modes:
        tasks = [t for t in diffs if mode in diffs[t]]
        boot = np.mean([draws[mode][t] for t in tasks], axis=0)
        low, high = np.percentile(boot, [2.5, 97.5])
        result["overall"][mode] = {
            "diff": float(np.mean([diffs[t][mode].mean() for t in tasks])),
            "low": float(low), "high": float(high), "tasks": len(tasks)}
    return result


def _cell(entry: Mapping[str, float] | None) -> str:
    if entry is None:
        return "-"
    return (f"{100 * entry['diff']:+.1f} [{100 * entry['low']:+.1f}, "
            f"{100 * entry['high']:+.1f}]")


def compare_table(result: Mapping[str, Any], modes: list[str] | None = None) -> str:
    """Per task and overall: B - A in points, with the 95% interval, one column per mode."""
    modes = modes or sorted(result["overall"])
    rows = [{"task": name, **{m: _cell(per.get(m)) for m in modes}}
            for name, per in result["tasks"].items()]
    rows.append({"task": "overall", **{m: _cell(result["overall"].get(m)) for m in modes}})
    return metrics.format_table(rows, ["task", *modes])
