"""The metrics record (umerl/runtime/tracking.py) and the run's pictures (umerl/eval/plots.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from umerl.eval import plots
from umerl.runtime.tracking import Tracker

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TASKS = ("digits_cls", "lee_text")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def rl_record(step: int) -> dict:
    return {"step": step, "reward/total": 0.1 * step, "reward/format": 0.05 * step,
            "reward/embedding": 0.02 * step, "reward/rank_score": 0.5,
            "reward/format/group_std": 0.1, "reward/embedding/group_std": 0.01,
            "reward/zero_advantage_groups": 0.25, "rollout/answer_accuracy/query": 0.125,
            "rollout/truncated": 0.5, "actor/clip_fraction": 0.01, "actor/kl": 0.001 * step,
            "rollout/idle_ratio": 0.3, "learner/idle_ratio": 0.6,
            "rollout/completion_len_mean": 40.0 + step,
            "rollout/completion_len_max": 48.0, "timing/rollout": 1.0, "timing/learner": 0.7,
            "timing/weight_sync": 0.01, "timing/step": 1.8}


# Per-query headline scores of 4 queries per task; rl scores every query 0.25 above sft, so
# rl - sft is +25 points in every task and mode, and every bootstrap resample agrees.
PER_QUERY = {"before": [0.0, 0.0, 0.0, 0.0], "sft": [0.25, 0.5, 0.0, 0.25],
             "rl": [0.5, 0.75, 0.25, 0.5]}


def summary(scale: float, label: str) -> dict:
    """A summary.json as umerl.eval.evaluate writes it, with the fields the bar chart reads."""
    tasks = {t: {"scores": {"disc": scale * (i + 1) / 4, "gen": scale / 2, "oracle": scale},
                 "per_query": {m: PER_QUERY[label] for m in ("disc", "gen", "oracle")}}
             for i, t in enumerate(TASKS)}
    modes = {m: {"overall": float(np.mean([tasks[t]["scores"][m] for t in TASKS]))}
             for m in ("disc", "gen", "oracle")}
    modes["pass@1"] = {"overall": scale}
    return {"tasks": tasks, "modes": modes}


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "metrics" / "rl.jsonl", [rl_record(s) for s in range(1, 6)])
    write_jsonl(tmp_path / "metrics" / "sft.jsonl", [
        {"step": s, "sft/loss": 4.0 / s, "sft/gen_nce": 2.0 / s, "sft/disc_nce": 1.0 / s,
         "sft/query_ce": 0.5 / s, "sft/target_ce": 0.5 / s, "sft/lr": 1e-3, "sft/epoch": 0,
         "timing/step": 0.4} for s in range(1, 11)])
    for label, scale in (("before", 0.1), ("sft", 0.5), ("rl", 0.6)):
        path = tmp_path / "eval" / label / "summary.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(summary(scale, label)), encoding="utf-8")
    return tmp_path


def assert_png(path: Path, size: tuple[int, int]) -> None:
    raw = path.read_bytes()
    assert raw.startswith(PNG_SIGNATURE) and len(raw) > 10_000, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size == size
        # Something is drawn: a blank canvas has a single colour.
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 50


def test_plots_of_a_run_are_valid_pngs(run_dir: Path) -> None:
    written = plots.plot_run(run_dir)
    folder = run_dir / "plots"
    assert written == [folder / "sft.png", folder / "rl.png", folder / "eval.png"]
    # figsize x 100 dpi: rl 16 x 9.5 in; sft 14 in x 3.4 in per row of 3 panels (5 losses +
    # lr: 2 rows); eval 4.6 in per mode (3) x 4.4 in per row (scores, then rl - sft)
    assert_png(folder / "rl.png", (1600, 950))
    assert_png(folder / "sft.png", (1400, 680))
    assert_png(folder / "eval.png", (1380, 880))


def test_only_the_pictures_whose_inputs_exist(run_dir: Path, tmp_path_factory) -> None:
    (run_dir / "metrics" / "sft.jsonl").unlink()
    for label in ("before", "sft", "rl"):
        (run_dir / "eval" / label / "summary.json").unlink()
    assert plots.plot_run(run_dir) == [run_dir / "plots" / "rl.png"]
    assert plots.plot_run(tmp_path_factory.mktemp("empty")) == []


def panel_lines(fig, title: str) -> dict[str, list]:
    """legend label -> the panel's lines of that colour (raw first, then smoothed)."""
    (ax,) = [a for a in fig.get_axes() if a.get_title() == title]
    labelled = {line.get_label(): line for line in ax.get_lines()
                if not line.get_label().startswith("_")}
    return {label: [ln for ln in ax.get_lines() if ln.get_color() == line.get_color()]
            for label, line in labelled.items()}


def test_smoothing_is_a_centred_moving_mean() -> None:
    assert plots.smooth([0.0, 0.0, 3.0, 0.0, 0.0], 3) == [0.0, 1.0, 1.0, 1.0, 0.0]
    # at the ends, the mean of what the window covers: (6 + 0 + 0) / 3, (6 + 0 + 0 + 3) / 4 ...
    assert plots.smooth([6.0, 0.0, 0.0, 3.0], 5) == [2.0, 2.25, 2.25, 1.0]
    assert [plots.smoothing_window(n) for n in (5, 6, 20, 100, 1000)] == [1, 3, 3, 5, 41]


def test_rl_figure_separates_scales_and_shows_the_signals() -> None:
    records = [rl_record(s) for s in range(1, 9)]
    fig = plots.rl_figure(records)
    titles = [ax.get_title() for ax in fig.get_axes()]
    for wanted in ("format reward", "embedding reward", "answer accuracy (sampled)",
                   "zero-advantage groups", "completions", "KL to the reference (k3)",
                   "clip fraction", "idle share of the step", "time per phase"):
        assert wanted in titles, titles
    # The embedding reward (~0.1) is not drawn on the format reward's axes.
    assert set(panel_lines(fig, "format reward")) == {"mean", "within-group sd"}
    emb = panel_lines(fig, "embedding reward")
    # smoothed over 3 steps: (0.02 + 0.04) / 2, (0.02 + 0.04 + 0.06) / 3, ...
    assert list(emb["mean"][1].get_ydata()[:3]) == pytest.approx([0.03, 0.04, 0.06])
    assert list(emb["within-group sd"][1].get_ydata()) == pytest.approx([0.01] * 8)
    assert set(panel_lines(fig, "completions")) == {"truncated (hit max_new_tokens)"}
    assert set(panel_lines(fig, "idle share of the step")) == {"rollout pool", "learner pool"}


def test_raw_curves_are_faint_and_smoothed_ones_solid() -> None:
    records = [{"step": s, "actor/kl": v} for s, v in enumerate([0.0, 0.0, 3.0, 0.0, 0.0,
                                                                   0.0], start=1)]
    (raw, smoothed) = panel_lines(plots.rl_figure(records), "KL to the reference (k3)")["KL"]
    assert list(raw.get_ydata()) == [0.0, 0.0, 3.0, 0.0, 0.0, 0.0]
    assert list(smoothed.get_ydata()) == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]  # window 3
    assert raw.get_alpha() < 0.5 and smoothed.get_alpha() in (None, 1.0)


def test_sft_loss_parts_each_on_their_own_panel(run_dir: Path) -> None:
    records = plots.read_metrics(run_dir / "metrics" / "sft.jsonl")
    fig = plots.sft_figure(records)
    titles = [ax.get_title() for ax in fig.get_axes() if ax.axison]
    assert titles == ["loss", "loss part: gen_nce", "loss part: disc_nce",
                      "loss part: query_ce", "loss part: target_ce", "learning rate"]
    for title in titles[:5]:
        assert len(panel_lines(fig, title)) == 1


def test_eval_figure_has_one_panel_per_mode_and_bars_per_label(run_dir: Path) -> None:
    summaries = plots.read_summaries(run_dir / "eval")
    assert list(summaries) == ["before", "sft", "rl"]
    fig = plots.eval_figure(summaries)
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == [
        *(f"{m} (headline metric, %)" for m in ("disc", "gen", "oracle")),
        *(f"{m}: rl - sft, points (95% interval)" for m in ("disc", "gen", "oracle"))]
    disc = axes[0]
    # 3 labels x (2 tasks + overall) bars; the rl bars are the last three, in percent.
    heights = [round(p.get_height(), 6) for p in disc.patches]
    assert len(heights) == 9
    assert heights[6:] == [round(100 * 0.6 * 1 / 4, 6), round(100 * 0.6 * 2 / 4, 6),
                           round(100 * 0.6 * 3 / 8, 6)]


def effect_intervals(ax) -> list[tuple[float, float]]:
    """(low, high) of each error bar of an rl - sft panel, in points."""
    from matplotlib.container import ErrorbarContainer

    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    segments = bars.lines[2][0].get_segments()
    return [(float(s[0][1]), float(s[1][1])) for s in segments]


def test_eval_figure_draws_rl_minus_sft_with_its_interval(run_dir: Path) -> None:
    summaries = plots.read_summaries(run_dir / "eval")
    effect = plots.eval_figure(summaries).get_axes()[4]  # gen: rl - sft
    # every query gains 0.25: +25 points per task and overall, an interval of zero width
    assert [round(p.get_height(), 6) for p in effect.patches] == [25.0, 25.0, 25.0]
    assert effect_intervals(effect) == [pytest.approx((25.0, 25.0))] * 3


def test_eval_figure_interval_is_compares(run_dir: Path) -> None:
    from umerl.eval.compare import compare

    summaries = plots.read_summaries(run_dir / "eval")
    summaries["rl"]["tasks"]["lee_text"]["per_query"]["gen"] = [1.0, 0.0, 1.0, 0.0]
    result = compare(summaries["sft"], summaries["rl"])["tasks"]["lee_text"]["gen"]
    assert result["low"] < result["diff"] < result["high"]  # a real interval
    effect = plots.eval_figure(summaries).get_axes()[4]
    assert effect_intervals(effect)[1] == pytest.approx((100 * result["low"],
                                                         100 * result["high"]))


def test_eval_figure_without_per_query_scores_has_no_effect_row(run_dir: Path) -> None:
    summaries = plots.read_summaries(run_dir / "eval")
    for s in summaries.values():
        for task in s["tasks"].values():
            task["per_query"] = {}
    assert len(plots.eval_figure(summaries).get_axes()) == 3


def test_read_metrics_keeps_the_last_line_of_a_step(tmp_path: Path) -> None:
    path = tmp_path / "rl.jsonl"
    # step 2 logged again after a restart; the last line was cut short by a crash
    path.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n{"step": 3, "a": 3.0}\n'
                    '{"step": 2, "a": 20.0}\n{"step": 4, "a"', encoding="utf-8")
    records = plots.read_metrics(path)
    assert [(r["step"], r["a"]) for r in records] == [(1, 1.0), (2, 20.0), (3, 3.0)]
    assert plots.series([*records, {"step": 5, "a": None}], "a") == ([1, 2, 3], [1.0, 20.0, 3.0])


def test_read_metrics_names_a_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "rl.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"rl.jsonl:2: not a metrics record"):
        plots.read_metrics(path)


def test_write_plots_turns_a_failure_into_a_warning(run_dir: Path, monkeypatch,
                                                    capsys) -> None:
    def broken(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(plots, "plot_run", broken)
    assert plots.write_plots(run_dir) == []
    assert "warning: plots not written: OSError: disk full" in capsys.readouterr().out


def test_tracker_writes_what_was_logged_as_json_lines(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = OmegaConf.create({"output_dir": str(tmp_path / "run"),
                            "wandb": {"mode": "disabled", "project": "umerl-test", "name": None}})
    tracker = Tracker(cfg, stage="rl")
    logged = [({"reward/total": 0.5, "actor/kl": np.float32(0.25), "count": 3}, 1),
              ({"reward/total": float("nan"), "timing/step": np.float64(1.5)}, 2)]
    try:
        for metrics, step in logged:
            tracker.log(metrics, step)
    finally:
        tracker.finish()
    path = tmp_path / "run" / "metrics" / "rl.jsonl"
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    # NaN has no JSON spelling: it is recorded as null; numpy scalars as plain numbers.
    assert lines == [{"step": 1, "reward/total": 0.5, "actor/kl": 0.25, "count": 3},
                     {"step": 2, "reward/total": None, "timing/step": 1.5}]
    assert not math.isnan(lines[0]["actor/kl"]) and type(lines[0]["count"]) is int
    # A second tracker of the same stage (a resumed run) appends.
    again = Tracker(cfg, stage="rl")
    again.log({"reward/total": 0.75}, 3)
    again.finish()
    assert len(path.read_text(encoding="utf-8").splitlines()) == 3


def test_plot_command(run_dir: Path, tmp_path_factory, capsys) -> None:
    from umerl.cli import main

    assert main(["plot", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert str(run_dir / "plots" / "eval.png") in out
    empty = tmp_path_factory.mktemp("nothing")
    assert main(["plot", str(empty)]) == 2
    assert "nothing to plot" in capsys.readouterr().err
