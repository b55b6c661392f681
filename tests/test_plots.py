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
            "reward/format/group_std": 0.1, "reward/zero_advantage_groups": 0.25,
            "actor/kl": 0.001 * step, "rollout/completion_len_mean": 40.0 + step,
            "rollout/completion_len_max": 48.0, "timing/rollout": 1.0, "timing/learner": 0.7,
            "timing/weight_sync": 0.01, "timing/step": 1.8}


def summary(scale: float) -> dict:
    """A summary.json as umerl.eval.evaluate writes it, with the fields the bar chart reads."""
    tasks = {t: {"scores": {"disc": scale * (i + 1) / 4, "gen": scale / 2, "oracle": scale},
                 "per_query": {}} for i, t in enumerate(TASKS)}
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
        path.write_text(json.dumps(summary(scale)), encoding="utf-8")
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
    # figsize x 100 dpi: rl 10 x 7 in, sft 10 x 3.8 in, eval 4.2 in per mode (3) x 4.2 in
    assert_png(folder / "rl.png", (1000, 700))
    assert_png(folder / "sft.png", (1000, 380))
    assert_png(folder / "eval.png", (1260, 420))


def test_only_the_pictures_whose_inputs_exist(run_dir: Path, tmp_path_factory) -> None:
    (run_dir / "metrics" / "sft.jsonl").unlink()
    for label in ("before", "sft", "rl"):
        (run_dir / "eval" / label / "summary.json").unlink()
    assert plots.plot_run(run_dir) == [run_dir / "plots" / "rl.png"]
    assert plots.plot_run(tmp_path_factory.mktemp("empty")) == []


def test_reward_parts_exclude_diagnostics_of_other_levels() -> None:
    records = [rl_record(1)]
    parts = [k for k in plots._keys(records, "reward/") if k not in plots.NOT_REWARD_PARTS]
    assert parts == ["reward/total", "reward/format", "reward/embedding", "reward/rank_score"]
    assert plots._keys(records, "timing/") == ["timing/rollout", "timing/learner",
                                               "timing/weight_sync", "timing/step"]


def test_eval_figure_has_one_panel_per_mode_and_bars_per_label(run_dir: Path) -> None:
    summaries = plots.read_summaries(run_dir / "eval")
    assert list(summaries) == ["before", "sft", "rl"]
    fig = plots.eval_figure(summaries)
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == [f"{m} (headline metric, %)"
                                               for m in ("disc", "gen", "oracle")]
    disc = axes[0]
    # 3 labels x (2 tasks + overall) bars; the rl bars are the last three, in percent.
    heights = [round(p.get_height(), 6) for p in disc.patches]
    assert len(heights) == 9
    assert heights[6:] == [round(100 * 0.6 * 1 / 4, 6), round(100 * 0.6 * 2 / 4, 6),
                           round(100 * 0.6 * 3 / 8, 6)]


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
