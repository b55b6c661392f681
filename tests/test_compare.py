"""`umerl compare`: paired differences with bootstrap intervals, checked against scipy's."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from umerl.eval.compare import compare, paired_differences


def summary(per_task: dict[str, dict[str, list[float]]]) -> dict:
    return {"tasks": {name: {"per_query": modes} for name, modes in per_task.items()}}


def test_task_interval_matches_scipys_percentile_bootstrap():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, 200).astype(float)  # hit@1 per query
    b = np.clip(a + rng.choice([0, 0, 1, -1], 200), 0, 1)
    result = compare(summary({"t": {"gen": list(a)}}), summary({"t": {"gen": list(b)}}),
                     resamples=5000, seed=0)
    entry = result["tasks"]["t"]["gen"]
    assert entry["diff"] == pytest.approx(float(np.mean(b - a)))
    ref = stats.bootstrap((b - a,), np.mean, n_resamples=5000, method="percentile",
                          random_state=0).confidence_interval
    assert entry["low"] == pytest.approx(ref.low, abs=0.01)
    assert entry["high"] == pytest.approx(ref.high, abs=0.01)
    assert result["overall"]["gen"]["diff"] == pytest.approx(entry["diff"])


def test_overall_is_the_mean_over_tasks_and_certain_gains_have_tight_intervals():
    a = {"x": {"disc": [0.0] * 10, "gen": [0.0, 1.0] * 5},
         "y": {"disc": [1.0] * 30, "gen": [0.0] * 30}}
    b = {"x": {"disc": [1.0] * 10, "gen": [0.0, 1.0] * 5},  # +1 on every query of x
         "y": {"disc": [1.0] * 30, "gen": [0.0] * 30}}
    result = compare(summary(a), summary(b), resamples=500)
    assert result["tasks"]["x"]["disc"] == {"diff": 1.0, "low": 1.0, "high": 1.0, "n": 10}
    assert result["overall"]["disc"]["diff"] == pytest.approx(0.5)  # (1 + 0) / 2 tasks
    assert result["overall"]["disc"]["low"] == pytest.approx(0.5)
    assert result["overall"]["gen"] == {"diff": 0.0, "low": 0.0, "high": 0.0, "tasks": 2}


def test_only_the_same_queries_can_be_paired():
    with pytest.raises(ValueError, match="3 vs 4 queries"):
        paired_differences(summary({"t": {"gen": [1, 0, 1]}}),
                           summary({"t": {"gen": [1, 0, 1, 1]}}))
    with pytest.raises(ValueError, match="share no task"):
        paired_differences(summary({"t": {"gen": [1]}}), summary({"u": {"gen": [1]}}))


def test_cli_compare_prints_the_table(tmp_path, capsys):
    from umerl.cli import main

    for name, values in (("a", [0.0, 0.0, 1.0, 0.0]), ("b", [1.0, 0.0, 1.0, 1.0])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(summary({"t": {"gen": values}})))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "B - A" in out and "overall" in out and "+50.0 [" in out
