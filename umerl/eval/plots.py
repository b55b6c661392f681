"""PNG pictures of a run, written into ``RUN_DIR/plots/``:

    sft.png   per SFT step: the loss and each of its parts on its own panel, the learning rate
    rl.png    per GRPO step: the total, format and embedding rewards (each with its within-group
              spread) and the rank score on separate axes; answer accuracy, zero-advantage
              groups, truncated completions, KL, clip fraction, completion length, the time of
              each phase and each pool's idle share
    eval.png  the before / sft / rl headline scores per task and overall, one panel per mode,
              and under them rl - sft with its 95% paired bootstrap interval (umerl compare)

Step curves are drawn twice: the raw values faint, a centred moving mean over them solid (the
window grows with the run's length), so a trend shows through step-to-step noise without
hiding it. Each panel holds quantities of one scale: a reward of ~0.05 next to one of ~0.8
would read as a flat line.

The step metrics come from ``RUN_DIR/metrics/<stage>.jsonl`` (``umerl.runtime.tracking.Tracker``),
the scores from ``<eval dir>/<label>/summary.json``; a picture whose inputs are missing is skipped,
and a panel whose metrics were not logged says so.
Figures are drawn on matplotlib's Agg canvas directly (no pyplot): no display, no global state.

    umerl plot RUN_DIR [--eval-dir DIR]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from umerl.eval.compare import compare
from umerl.runtime.tracking import metrics_path

if TYPE_CHECKING:  # matplotlib is imported when drawing: a run never needs it to import this
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

EVAL_LABELS = ("before", "sft", "rl")
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


def smoothing_window(n: int) -> int:
    """An odd window of about 1/25 of the steps (3 at least; none below 6 steps)."""
    if n < 6:
        return 1
    return max(3, n // 25) | 1


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Centred moving mean; near the ends, the mean of the values the window still covers."""
    half = window // 2
    out = []
    for i in range(len(values)):
        part = values[max(0, i - half):i + half + 1]
        out.append(sum(part) / len(part))
    return out


# (metric key, legend label) lists per panel; a label None takes the key's last part.
Panel = tuple[str, Sequence[tuple[str, str | None]], str]


def _curves(ax: Axes, records: Sequence[dict[str, Any]], keys: Sequence[tuple[str, str | None]],
            title: str, ylabel: str, log: bool = False, noisy: bool = True) -> None:
    """Each key raw (faint) and smoothed (solid, same colour); a schedule (``noisy`` false)
    as one solid line. Log scale when asked and every value is positive."""
    drawn, lowest, view = 0, float("inf"), []
    for i, (key, label) in enumerate(keys):
        steps, values = series(records, key)
        if not steps:
            continue
        colour = f"C{i}"
        smoothed = smooth(values, smoothing_window(len(values))) if noisy else values
        if noisy:
            ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
        ax.plot(steps, smoothed, color=colour, linewidth=1.6,
                label=label or key.rsplit("/", 1)[-1])
        lowest = min(lowest, *values)
        view.append((values, smoothed))
        drawn += 1
    _style(ax, title, ylabel)
    log = log and drawn > 0 and lowest > 0
    if log:
        ax.set_yscale("log")
    if drawn and len(steps) >= 50:  # long runs: isolated spikes may leave the panel
        ranges = [_view(values, smoothed, log) for values, smoothed in view]
        ax.set_ylim(min(r[0] for r in ranges), max(r[1] for r in ranges))
    if drawn:
        ax.legend(fontsize=7)
    else:  # an empty panel says so rather than looking like a flat line
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)


def _view(values: Sequence[float], smoothed: Sequence[float], log: bool) -> tuple[float, float]:
    """The y range that shows every smoothed value and all but the outer 1% of raw ones on
    each side, with a margin."""
    ordered = sorted(values)
    cut = len(ordered) // 100
    low = min(ordered[cut], *smoothed)
    high = max(ordered[len(ordered) - 1 - cut], *smoothed)
    if log:  # margins by factor
        return low / 1.5, high * 1.5
    margin = 0.05 * (high - low) or abs(high) * 0.05 or 1.0
    return low - margin, high + margin


def _style(ax: Axes, title: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 2.5
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _within_group(part: str) -> list[tuple[str, str | None]]:
    return [(f"reward/{part}", "mean"), (f"reward/{part}/group_std", "within-group sd")]


RL_PANELS: list[Panel] = [
    ("total reward", _within_group("total"), "reward"),
    ("format reward", _within_group("format"), "reward"),
    ("embedding reward", _within_group("embedding"), "reward"),
    ("rank score (embedding reward's)", [("reward/rank_score", "rank score")], "score"),
    ("answer accuracy (sampled)", [("rollout/answer_accuracy/query", "query"),
                                   ("rollout/answer_accuracy/target", "target")], "share"),
    ("zero-advantage groups", [("reward/zero_advantage_groups", "share of groups")], "share"),
    ("completions", [("rollout/truncated", "truncated (hit max_new_tokens)"),
                     ("rollout/gen_emb_found", "<gen_emb> written")], "share"),
    ("KL to the reference (k3)", [("actor/kl", "KL")], "KL"),
    ("clip fraction", [("actor/clip_fraction", "clipped tokens")], "share"),
    ("completion length", [("rollout/completion_len_mean", "mean"),
                           ("rollout/completion_len_max", "max")], "tokens"),
    ("idle share of the step", [("rollout/idle_ratio", "rollout pool"),
                                ("learner/idle_ratio", "learner pool")], "share"),
]


def rl_figure(records: Sequence[dict[str, Any]]) -> Figure:
    fig = _figure(16, 9.5)
    axes = list(fig.subplots(3, 4).flat)
    for ax, (title, keys, ylabel) in zip(axes, RL_PANELS):
        _curves(ax, records, keys, title, ylabel)
    phases = [(k, None) for k in _keys(records, "timing/")]
    _curves(axes[len(RL_PANELS)], records, phases, "time per phase", "seconds")
    fig.suptitle(f"GRPO, per step (faint: raw; solid: moving mean over "
                 f"{smoothing_window(len(records))} steps)")
    return fig


def sft_figure(records: Sequence[dict[str, Any]]) -> Figure:
    """The loss and each of its parts on a panel of its own (log scale: the parts fall by
    orders of magnitude at different times), then the learning rate."""
    losses = sorted((k for k in _keys(records, "sft/") if k not in SFT_NOT_LOSSES),
                    key=lambda k: k != "sft/loss")  # the total first, then the parts
    columns = 3
    rows = -(-(len(losses) + 1) // columns)
    fig = _figure(14, 3.4 * rows)
    axes = list(fig.subplots(rows, columns, squeeze=False).flat)
    for ax, key in zip(axes, losses):
        name = key.split("/", 1)[1]
        _curves(ax, records, [(key, name)], "loss" if name == "loss" else f"loss part: {name}",
                "loss", log=True)
    _curves(axes[len(losses)], records, [("sft/lr", "lr")], "learning rate", "lr",
            noisy=False)
    for ax in axes[len(losses) + 1:]:
        ax.set_axis_off()
    fig.suptitle(f"SFT, per step (faint: raw; solid: moving mean over "
                 f"{smoothing_window(len(records))} steps)")
    return fig


def eval_figure(summaries: dict[str, dict[str, Any]]) -> Figure:
    """Grouped bars: per mode, each task's headline score (and the overall mean) for every
    labelled evaluation, in the order given; with sft and rl both present (and per-query
    scores), a second row: rl - sft per task and overall with its 95% paired bootstrap
    interval (``umerl.eval.compare``)."""
    labels = list(summaries)
    last = summaries[labels[-1]]
    modes = [m for m in last["modes"] if not m.startswith("pass@")
             and all(m in summaries[label]["modes"] for label in labels)]
    tasks = list(last["tasks"])
    effect = _rl_effect(summaries)
    rows = 2 if effect else 1
    fig = _figure(4.6 * max(1, len(modes)), 4.4 * rows)
    # One scale for every mode per row, so that panels compare at a glance.
    axes = fig.subplots(rows, max(1, len(modes)), squeeze=False, sharey="row")
    width = 0.8 / len(labels)
    for ax, mode in zip(axes[0], modes):
        for i, label in enumerate(labels):
            summary = summaries[label]
            scores = [summary["tasks"].get(t, {}).get("scores", {}).get(mode) for t in tasks]
            scores.append(summary["modes"][mode]["overall"])
            xs = [x + (i - (len(labels) - 1) / 2) * width for x in range(len(scores))]
            ax.bar(xs, [100 * (s or 0.0) for s in scores], width, label=label)
        _task_axis(ax, tasks)
        ax.set_title(f"{mode} (headline metric, %)")
        ax.legend(fontsize=8)
    if effect:
        for ax, mode in zip(axes[1], modes):
            _effect_bars(ax, effect, mode, tasks)
    fig.suptitle(" -> ".join(labels))
    return fig


def _rl_effect(summaries: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """compare(sft, rl), or None without both or without per-query scores to pair."""
    if "sft" not in summaries or "rl" not in summaries:
        return None
    try:
        return compare(summaries["sft"], summaries["rl"])
    except ValueError:  # summaries of an older umerl: no per-query scores
        return None


def _effect_bars(ax: Axes, effect: dict[str, Any], mode: str, tasks: list[str]) -> None:
    entries = [effect["tasks"].get(t, {}).get(mode) for t in tasks]
    entries.append(effect["overall"].get(mode))
    xs = [x for x, e in enumerate(entries) if e]
    kept = [e for e in entries if e]
    diffs = [100 * e["diff"] for e in kept]
    below = [100 * (e["diff"] - e["low"]) for e in kept]
    above = [100 * (e["high"] - e["diff"]) for e in kept]
    # An interval wholly above (below) zero is coloured as a gain (loss); one spanning zero grey.
    colours = ["C2" if e["low"] > 0 else "C3" if e["high"] < 0 else "0.6" for e in kept]
    ax.bar(xs, diffs, 0.6, color=colours, yerr=[below, above], capsize=3,
           error_kw={"linewidth": 1})
    ax.axhline(0, color="black", linewidth=0.8)
    _task_axis(ax, tasks)
    ax.set_title(f"{mode}: rl - sft, points (95% interval)")


def _task_axis(ax: Axes, tasks: list[str]) -> None:
    ax.set_xticks(range(len(tasks) + 1), [*tasks, "overall"], rotation=45, ha="right",
                  fontsize=8)
    ax.grid(axis="y", alpha=0.3)


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
