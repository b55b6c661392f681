"""Does GRPO raise what it rewards? GRPO on one task's RL pairs from an SFT checkpoint, several
seeds, beside a control whose embedding reward is shuffled within each group; the share of
sampled completions naming the gold answer step by step, and the task's test split before and
after (greedy gen and sampled pass@1, paired bootstrap intervals).

    .venv/bin/python bench/bench_learnability.py --checkpoint runs/cpu_tiny/sft \\
        [--task digits_cls] [--steps 200] [--seeds 0,1,2] [--out /tmp/umerl-learnability] \\
        [--recipe recipes/cpu_tiny.yaml] [--variants reward,shuffled] \\
        [key=value ...]

The checkpoint is evaluated once on the task's test split (``umerl eval``: mode gen, pass@1
from ``eval.pass_k``'s samples, the recipe's eval settings); then each (variant, seed) is one
``umerl rl`` run on its own local Ray with the recipe's RL settings, ``rl.data`` the task's RL
pairs, ``rl.max_steps`` the steps, evaluated the same way after RL. Printed: per seed, the
query-side answer accuracy (``rollout/answer_accuracy/query``) of the first and last 10% of
steps and its change, with the mean and a 95% t-interval over seeds; the mean embedding reward
likewise; then greedy gen and pass@1 after RL minus before, per seed with 95% paired bootstrap
intervals over the test queries (``umerl.eval.compare``), and for the seeds' mean (per-query
scores averaged over the seeds: an interval over queries, not over seeds). A PNG of the curves
goes to OUT/learnability.png.

The RL pairs are the task's rl split in the recipe's build of the bundled benchmark: with
``recipes/cpu_tiny.yaml``'s ``data.benchmark_rl_extra`` ({digits_cls: 880}), 960 digits_cls
pairs drawn from images no split uses (its train, test and SFT files are byte-identical to the
default build's, tests/test_benchmark.py); ``data.benchmark_rl_extra={digits_cls: 0}`` gives the
80-pair default split.

The sampler visits every RL pair once per epoch, so when each 10% window is a whole number of
epochs (steps a multiple of ten epochs' steps) the first and last windows score the same
queries and their change is paired; otherwise each window is its own draw of queries, whose
spread in difficulty adds about 2 points of noise to a seed's change at 16 pairs x 24 steps. The
bench says which at its start. ``data.benchmark_rl_extra.digits_cls=400 --steps 300`` (480
pairs, 30 steps an epoch) makes the windows whole epochs at 16 pairs a step.

The ``+answer`` variants add the verifiable answer reward (``answer``, 1 when the answer names
the gold label) beside the embedding reward, weight ``--answer-weight``; their control
shuffles both within each group.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ACCURACY = "rollout/answer_accuracy/query"
REWARD = "reward/embedding"
ANSWER = "reward/answer"
VARIANTS = {  # label -> the rewards list; the control's part keeps the label "embedding"
    "reward": "[{name: format, weight: 1.0}, {name: embedding, weight: 1.0}]",
    "shuffled": "[{name: format, weight: 1.0}, {name: 'bench/shuffled_reward.py:"
                "shuffled_embedding', label: embedding, weight: 1.0}]",
    # Not run by default: the verifiable answer reward (1 when the answer names the gold
    # label) beside the embedding reward, logged but unweighted: what the loop does with a
    # signal that pays exactly for correct answers.
    "answer": "[{name: format, weight: 1.0}, {name: answer, weight: 1.0}, "
              "{name: embedding, weight: 0.0}]",
    # The answer reward beside the embedding reward, weight {answer} (--answer-weight); its
    # control shuffles both parts within each group (the same permutation for both).
    "reward+answer": "[{{name: format, weight: 1.0}}, {{name: embedding, weight: 1.0}}, "
                     "{{name: answer, weight: {answer}}}]",
    "shuffled+answer": "[{{name: format, weight: 1.0}}, {{name: 'bench/shuffled_reward.py:"
                       "shuffled_embedding', label: embedding, weight: 1.0}}, "
                       "{{name: 'bench/shuffled_reward.py:shuffled_answer', label: answer, "
                       "weight: {answer}}}]",
}
TEMPLATED = {"reward+answer", "shuffled+answer"}  # str.format'ed with --answer-weight
DEFAULT_VARIANTS = "reward,shuffled"
T_975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def run(args: argparse.Namespace, checkpoint: Path, variant: str, seed: int) -> Path:
    """One ``umerl rl`` run into OUT/<variant>-seed<seed> (replaced); returns the folder."""
    out = Path(args.out) / f"{variant}-seed{seed}"
    if args.reuse and (out / "eval" / "rl" / "summary.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rewards = VARIANTS[variant]
    if variant in TEMPLATED:
        rewards = rewards.format(answer=args.answer_weight)
    command = [
        sys.executable, "-m", "umerl.cli", "rl", str(args.recipe), "--checkpoint",
        str(checkpoint), f"output_dir={out}", f"seed={seed}",
        f"data.benchmark_dir={args.benchmark}", f"rl.data=[umerl-mini/{args.task}]",
        f"rl.max_steps={args.steps}", f"rl.save_every={args.steps}", f"rewards={rewards}",
        f"eval.tasks=[{args.task}]", "eval.modes=[gen:gen]", "eval.before=false",
        *args.overrides,
    ]
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    env.pop("RAY_ADDRESS", None)
    start = time.perf_counter()
    with open(out / "run.log", "w", encoding="utf-8") as log:
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = (out / "run.log").read_text(encoding="utf-8").splitlines()[-20:]
        raise SystemExit(f"{variant} seed {seed}: umerl rl failed (exit {proc.returncode}); "
                         f"log {out / 'run.log'}:\n" + "\n".join(tail))
    print(f"[learnability] {variant} seed {seed}: {time.perf_counter() - start:.0f} s, {out}",
          flush=True)
    return out


def evaluate_start(args: argparse.Namespace, checkpoint: Path) -> dict:
    """The checkpoint's scores on the task's test split, with the recipe's eval settings."""
    from umerl.config.recipe import load_recipe
    from umerl.data.tasks import recipe_tasks
    from umerl.eval.runner import eval_settings, run_eval

    cfg = load_recipe(args.recipe, [*args.overrides, "eval.modes=[gen:gen]",
                                    f"data.benchmark_dir={args.benchmark}"])
    specs = recipe_tasks([args.task], cfg.eval.split, cfg.data)
    out = Path(args.out) / "before"
    if args.reuse and (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    return run_eval(checkpoint, specs, eval_settings(cfg), out, cfg.model.dtype)


def curve(out: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics" / "rl.jsonl").read_text().splitlines()]
    values = [row[key] for row in rows if key in row]
    if len(values) != len(rows):
        raise SystemExit(f"{out}: {key} missing from {len(rows) - len(values)} steps")
    return values


def first_last(values: list[float]) -> tuple[float, float]:
    """Means of the first and last 10% of steps (at least one step each)."""
    n = max(1, len(values) // 10)
    return sum(values[:n]) / n, sum(values[-n:]) / n


def epochs_per_window(steps: int, pairs: int, pairs_per_step: int) -> int:
    """How many whole epochs of the task's RL pairs each 10% window is; 0 when it is not whole
    epochs. The sampler visits every pair once per epoch (ContrastiveBatcher), so whole-epoch
    windows hold the same queries and their change is paired; otherwise each window is its own
    draw of queries, and the queries' spread in difficulty adds to the change's noise."""
    per_epoch = pairs // pairs_per_step
    window = max(1, steps // 10)
    if per_epoch and window % per_epoch == 0 and steps % per_epoch == 0:
        return window // per_epoch
    return 0


def window_note(steps: int, pairs: int, pairs_per_step: int) -> str:
    per_epoch, whole = pairs // pairs_per_step, epochs_per_window(steps, pairs, pairs_per_step)
    if whole:
        return (f"each 10% window is {whole} whole epoch(s) of {per_epoch} steps: the first "
                "and last windows score the same queries (a paired change)")
    return (f"the 10% windows ({max(1, steps // 10)} steps) are not whole epochs ({per_epoch} "
            "steps): they score different queries, whose spread adds to the change's noise")


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval (mean, low, high); a single value has no interval."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T_975.get(n - 1, 1.96) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def curve_rows(runs: dict[tuple[str, int], Path], key: str) -> list[dict]:
    rows = []
    for (variant, seed), out in runs.items():
        first, last = first_last(curve(out, key))
        rows.append({"variant": variant, "seed": str(seed), "first 10%": f"{100 * first:.1f}",
                     "last 10%": f"{100 * last:.1f}", "change": f"{100 * (last - first):+.1f}",
                     "_change": 100 * (last - first)})
    for variant in sorted({v for v, _ in runs}, key=list(VARIANTS).index):
        changes = [r["_change"] for r in rows if r["variant"] == variant]
        mean, low, high = t_interval(changes)
        rows.append({"variant": variant, "seed": "mean", "change": f"{mean:+.1f} "
                     f"[{low:+.1f}, {high:+.1f}]"})
    return rows


def eval_rows(before: dict, runs: dict[tuple[str, int], Path], resamples: int) -> list[dict]:
    from umerl.eval.compare import compare

    def row(variant: str, seed: str, after: dict, effect: dict) -> dict:
        cells = {"variant": variant, "seed": seed}
        for mode in ("gen", "pass@1"):
            e = effect[mode]
            cells[f"{mode} before"] = f"{100 * before['modes'][mode]['overall']:.1f}"
            cells[f"{mode} after"] = f"{100 * after['modes'][mode]['overall']:.1f}"
            cells[f"{mode} change"] = (f"{100 * e['diff']:+.1f} [{100 * e['low']:+.1f}, "
                                       f"{100 * e['high']:+.1f}]")
        return cells

    rows, afters = [], {}
    for (variant, seed), out in runs.items():
        after = json.loads((out / "eval" / "rl" / "summary.json").read_text())
        afters.setdefault(variant, []).append(after)
        rows.append(row(variant, str(seed), after, compare(before, after, resamples=resamples,
                                                           seed=seed)["overall"]))
    for variant, summaries in afters.items():
        if len(summaries) > 1:
            mean = seed_mean(summaries)
            rows.append(row(variant, "mean", mean, compare(before, mean, resamples=resamples)
                            ["overall"]))
    return rows


def seed_mean(summaries: list[dict]) -> dict:
    """One summary whose per-query scores (and headline scores) are the mean over the seeds'
    runs: compared with the start, its interval is over the test queries for these seeds' mean
    effect (the spread between seeds is in the per-seed rows, not in this interval)."""
    first = summaries[0]
    tasks = {}
    for name, task in first["tasks"].items():
        per_query = {mode: [sum(values) / len(summaries) for values in zip(
            *(s["tasks"][name]["per_query"][mode] for s in summaries))]
            for mode in task["per_query"]}
        tasks[name] = {**task, "per_query": per_query}
    modes = {mode: {"overall": sum(s["modes"][mode]["overall"] for s in summaries)
                    / len(summaries)} for mode in first["modes"]}
    return {"tasks": tasks, "modes": modes}


def greedy_answer_rows(args: argparse.Namespace, before_dir: Path,
                       runs: dict[tuple[str, int], Path]) -> list[dict]:
    """Greedy query answers on the test split: the share naming the gold label, and the share
    of the most frequent answer (a greedy mode collapsing onto a few labels shows there while
    sampled answers improve). The gold label is the test line's positive candidate text."""
    from collections import Counter

    from umerl.data.answers import answer_text, normalise

    test = Path(args.benchmark) / args.task / "test.jsonl"
    lines = [json.loads(line) for line in test.read_text(encoding="utf-8").splitlines()]
    gold = [normalise(t["tgt_text"][t["rel_scores"].index(max(t["rel_scores"]))]) for t in lines]
    rows = []
    for label, folder in [("before", before_dir)] + [
            (f"{v} seed {s}", out / "eval" / "rl") for (v, s), out in runs.items()]:
        completions = json.loads((folder / "completions" / f"{args.task}.json").read_text())
        answers = [normalise(answer_text(c) or "") for c in completions["query_gen"]]
        right = sum(a == g for a, g in zip(answers, gold))
        top, count = Counter(answers).most_common(1)[0]
        rows.append({"run": label, "answer right": f"{100 * right / len(gold):.1f}",
                     "most frequent answer": f"{top} ({100 * count / len(gold):.1f}%)",
                     "distinct answers": str(len(set(answers)))})
    return rows


def plot(runs: dict[tuple[str, int], Path], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4))
    for column, (key, title) in enumerate(((ACCURACY, "sampled answers naming the gold label"),
                                           (REWARD, "mean embedding reward"))):
        axes = figure.add_subplot(1, 2, column + 1)
        for (variant, seed), out in runs.items():
            values = curve(out, key)
            window = max(1, len(values) // 20)  # a moving mean: single steps are noisy
            smooth = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(
                0, i - window + 1):i + 1]) for i in range(len(values))]
            axes.plot(range(1, len(values) + 1), smooth, label=f"{variant} seed {seed}",
                      color="tab:grey" if variant.startswith("shuffled") else "tab:blue",
                      alpha=0.5 + 0.15 * seed)
        axes.set_title(title)
        axes.set_xlabel("GRPO step")
        axes.legend(fontsize=7)
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="the SFT checkpoint (or sft/ root)")
    parser.add_argument("--task", default="digits_cls")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="/tmp/umerl-learnability")
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "cpu_tiny.yaml"))
    parser.add_argument("--benchmark", default=None,
                        help="the bundled benchmark folder (default: built or found as the "
                        "recipe's data.benchmark_dir says)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--answer-weight", type=float, default=1.0,
                        help="the answer reward's weight in the +answer variants")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--reuse", action="store_true",
                        help="keep finished runs found in OUT (and OUT/before): report again")
    parser.add_argument("overrides", nargs="*", help="recipe key=value overrides")
    args = parser.parse_args()

    from umerl.config.recipe import load_recipe
    from umerl.data.tasks import ensure_benchmark
    from umerl.eval.metrics import format_table
    from umerl.train import checkpoint as ckpt

    cfg = load_recipe(args.recipe, args.overrides)
    args.benchmark = str(ensure_benchmark(args.benchmark or cfg.data.benchmark_dir, int(
        cfg.data.benchmark_seed), dict(cfg.data.benchmark_rl_extra)).parent)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)} (known: {', '.join(VARIANTS)})")
    start = Path(args.checkpoint).resolve()
    checkpoint = ckpt.latest(start) or start
    pairs = sum(1 for _ in open(Path(args.benchmark) / args.task / "rl_pairs.jsonl"))
    print(f"[learnability] {args.task}, {args.steps} steps from {checkpoint}, {pairs} RL pairs",
          flush=True)
    print(f"[learnability] {window_note(args.steps, pairs, int(cfg.rl.pairs_per_step))}",
          flush=True)
    before = evaluate_start(args, checkpoint)
    runs = {(variant, int(seed)): run(args, checkpoint, variant, int(seed))
            for variant in args.variants.split(",") for seed in args.seeds.split(",")}
    print(f"\nquery-side answer accuracy ({ACCURACY}), %:")
    print(format_table(curve_rows(runs, ACCURACY),
                       ["variant", "seed", "first 10%", "last 10%", "change"]))
    print(f"\nmean embedding reward ({REWARD}), x100:")
    print(format_table(curve_rows(runs, REWARD),
                       ["variant", "seed", "first 10%", "last 10%", "change"]))
    answered = {k: v for k, v in runs.items() if k[0].endswith("answer")}
    if answered:
        print(f"\nmean answer reward ({ANSWER}), x100:")
        print(format_table(curve_rows(answered, ANSWER),
                           ["variant", "seed", "first 10%", "last 10%", "change"]))
    print(f"\n{args.task} test split, after RL - before, points [95% paired bootstrap]:")
    columns = ["variant", "seed"] + [f"{m} {c}" for m in ("gen", "pass@1")
                                     for c in ("before", "after", "change")]
    print(format_table(eval_rows(before, runs, args.resamples), columns))
    print(f"\n{args.task} test split, greedy query answers (gold share %, collapse):")
    print(format_table(greedy_answer_rows(args, Path(args.out) / "before", runs),
                       ["run", "answer right", "most frequent answer", "distinct answers"]))
    plot(runs, Path(args.out) / "learnability.png")
    print(f"\ncurves: {Path(args.out) / 'learnability.png'}")


if __name__ == "__main__":
    main()
