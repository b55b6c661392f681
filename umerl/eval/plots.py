"""PNG pictures of a run, written into ``RUN_DIR/plots/``:

    sft.png   per SFT step: the loss and its parts, the learning rate
    rl.png    per GRPO step: reward parts, KL, completion length, the time of each phase
    eval.png  the before / sft / rl headline scores per task and overall, one panel per mode

The step metrics come from ``RUN_DIR/metrics/<stage>.jsonl`` (``umerl.runtime.tracking.Tracker``),
the scores from ``<eval dir>/<label>/summary.json``; a picture whose inputs are missing is skipped.
Figures are drawn on matplotlib's Agg canvas directly (no pyplot): no display, no global state.

    umerl plot RUN_DIR [--eval-dir DIR]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from umerl.runtime.tracking import metrics_path

if TYPE_CHECKING:  # matplotlib is imported when drawing: a run never needs it to import this
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

EVAL_LABELS = ("before", "sft", "rl")
# Logged under reward/ but not a part of the reward: the share of groups with no signal.
NOT_REWARD_PARTS = ("reward/zero_advantage_groups",)
SFT_NOT_LOSSES = ("sft/lr", "sft/epoch")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file by step, ascending. A step logged twice (a resumed
    or restarted stage) keeps its last line; an unfinished last line (a crash mid-write) is
    dropped."""
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    lines = lines[:-1]  # the text after the last newline: empty, or a line cut short
    by_step: dict[int, dict[str, Any]] = {}
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            by_step[int(record["step"])] = record
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{n}: not a metrics record ({err})") from None
    return [by_step[s] for s in sorted(by_step)]


def series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, skipping the steps that did not log it (or logged null)."""
    pairs = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [s for s, _ in pairs], [float(v) for _, v in pairs]


def _keys(records: Sequence[dict[str, Any]], prefix: str, levels: int = 1) -> list[str]:
    """Metric names ``prefix<name>`` with exactly ``levels`` parts after the prefix, in order
    of first appearance."""
    seen: dict[str, None] = {}
    for record in records:
        for key in record:
            if key.startswith(prefix) and len(key[len(prefix):].split("/")) == levels:
                seen.setdefault(key)
    return list(seen)


def _lines(ax: Axes, records: Sequence[dict[str, Any]], keys: Sequence[str], title: str,
           ylabel: str) -> None:
    drawn = 0
    for key in keys:
        steps, values = series(records, key)
        if steps:
            ax.plot(steps, values, label=key.split("/", 1)[1], linewidth=1.2)
            drawn += 1
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 2.5
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    else:  # an empty panel says so rather than looking like a flat line
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def rl_figure(records: Sequence[dict[str, Any]]) -> Figure:
    fig = _figure(10, 7)
    ax = fig.subplots(2, 2)
    parts = [k for k in _keys(records, "reward/") if k not in NOT_REWARD_PARTS]
    _lines(ax[0, 0], records, parts, "reward parts (mean over rollouts)", "reward")
    _lines(ax[0, 1], records, ["actor/kl"], "KL to the reference (k3)", "KL")
    _lines(ax[1, 0], records, ["rollout/completion_len_mean", "rollout/completion_len_max"],
           "completion length", "tokens")
    _lines(ax[1, 1], records, _keys(records, "timing/"), "time per phase", "seconds")
    fig.suptitle("GRPO, per step")
    return fig


def sft_figure(records: Sequence[dict[str, Any]]) -> Figure:
    fig = _figure(10, 3.8)
    ax = fig.subplots(1, 2)
    losses = [k for k in _keys(records, "sft/") if k not in SFT_NOT_LOSSES]
    _lines(ax[0], records, losses, "loss and its parts", "loss")
    _lines(ax[1], records, ["sft/lr"], "learning rate", "lr")
    fig.suptitle("SFT, per step")
    return fig


def eval_figure(summaries: dict[str, dict[str, Any]]) -> Figure:
    """Grouped bars: per mode, each task's headline score (and the overall mean) for every
    labelled evaluation, in the order given."""
    labels = list(summaries)
    last = summaries[labels[-1]]
    modes = [m for m in last["modes"] if not m.startswith("pass@")
             and all(m in summaries[label]["modes"] for label in labels)]
    tasks = list(last["tasks"])
    fig = _figure(4.2 * max(1, len(modes)), 4.2)
    # One scale for every mode, so that panels compare at a glance.
    axes = fig.subplots(1, max(1, len(modes)), squeeze=False, sharey=True)[0]
    width = 0.8 / len(labels)
    for ax, mode in zip(axes, modes):
        for i, label in enumerate(labels):
            summary = summaries[label]
            scores = [summary["tasks"].get(t, {}).get("scores", {}).get(mode) for t in tasks]
            scores.append(summary["modes"][mode]["overall"])
            xs = [x + (i - (len(labels) - 1) / 2) * width for x in range(len(scores))]
            ax.bar(xs, [100 * (s or 0.0) for s in scores], width, label=label)
        ax.set_xticks(range(len(tasks) + 1), [*tasks, "overall"], rotation=45, ha="right",
                      fontsize=8)
        ax.set_title(f"{mode} (headline metric, %)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(" -> ".join(labels))
    return fig


def save(fig: Figure, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(path))
    return path


def read_summaries(eval_dir: Path) -> dict[str, dict[str, Any]]:
    """The evaluations of a run by label, in the order before, sft, rl (those present)."""
    out = {}
    for label in EVAL_LABELS:
        path = eval_dir / label / "summary.json"
        if path.is_file():
            out[label] = json.loads(path.read_text(encoding="utf-8"))
    return out


def plot_run(run_dir: str | Path, eval_dir: str | Path | None = None) -> list[Path]:
    """Write every picture whose inputs exist; returns the paths written."""
    run = Path(run_dir)
    out = run / "plots"
    written = []
    for stage, draw in (("sft", sft_figure), ("rl", rl_figure)):
        path = metrics_path(run, stage)
        records = read_metrics(path) if path.is_file() else []
        if records:
            written.append(save(draw(records), out / f"{stage}.png"))
    summaries = read_summaries(Path(eval_dir) if eval_dir else run / "eval")
    if summaries:
        written.append(save(eval_figure(summaries), out / "eval.png"))
    return written


def write_plots(run_dir: str | Path, eval_dir: str | Path | None = None) -> list[Path]:
    """:func:`plot_run` at the end of a finished run, where a failure is a warning: the run's
    checkpoints and scores stand without their pictures."""
    try:
        written = plot_run(run_dir, eval_dir)
    except Exception as err:  # any: no matplotlib, a full disk, an odd record
        print(f"warning: plots not written: {type(err).__name__}: {err}", flush=True)
        return []
    if written:
        print(f"plots: {', '.join(str(p) for p in written)}", flush=True)
    return written
