"""`make run`'s evaluation, before and after a change, side by side: where its time goes.

    .venv/bin/python bench/bench_eval.py [--before main] [--runs 2] [--queries 0]
        [--checkpoint runs/cpu_tiny/sft] [--recipe recipes/cpu_tiny.yaml]

Runs the recipe's evaluation (``eval.*``: its tasks, modes, pass@k, batch size and token
budget) of ``--checkpoint`` with this tree's code ("now") and with the code of git revision
``--before`` (extracted with ``git archive`` into a temporary folder: "before"), each in its own
process on one torch thread, alternating before/now ``--runs`` times. Each process times the
phases of every task: disc embeddings (``Evaluator.embed`` in mode disc), greedy gen
(``Evaluator.embed`` in mode gen: decoding and reading the embeddings), pass@k sampling
(``Evaluator.sample_queries``) and the rest (scoring, reading the task). Prints per phase the
median over runs of wall and CPU seconds for both, their ratio, and whether both gave the same
scores (greedy modes, and pass@k, which the change may resample). ``--queries N`` keeps the
first N queries of each task (0: all), for a shorter run. On a shared machine the CPU seconds
(one thread: the process's own work) are the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PHASES = ("disc", "greedy gen", "pass@k", "rest", "total")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", default="main", help="git revision of the 'before' code")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--queries", type=int, default=0)
    parser.add_argument("--checkpoint", default=str(REPO / "runs/cpu_tiny/sft"))
    parser.add_argument("--recipe", default=str(REPO / "recipes/cpu_tiny.yaml"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        before = extract(args.before, Path(tmp))
        runs: dict[str, list[dict]] = {"before": [], "now": []}
        for i in range(args.runs):
            for name, tree in (("before", before), ("now", REPO)):
                result = run_child(tree, args)
                runs[name].append(result)
                print(f"run {i + 1} {name}: {result['phases']['total']['wall']:.1f} s wall, "
                      f"{result['phases']['total']['cpu']:.1f} s CPU; {json.dumps(result)}",
                      flush=True)
    report(runs)


def extract(revision: str, into: Path) -> Path:
    """The tree of ``revision``, as a folder."""
    archive = into / "before.tar"
    subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(archive), revision], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "before", filter="data")
    return into / "before"


def run_child(tree: Path, args: argparse.Namespace) -> dict:
    """One evaluation in its own process, importing ``tree``'s code."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", "--queries",
         str(args.queries), "--checkpoint", args.checkpoint, "--recipe", args.recipe],
        env=env, cwd=tree, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(args: argparse.Namespace) -> dict:
    """The evaluation with per-phase timers around the Evaluator's methods."""
    import torch

    import umerl.eval.evaluate as evaluate
    from umerl.config.recipe import load_recipe
    from umerl.data.tasks import recipe_tasks
    from umerl.eval.runner import eval_settings, policy_and_engine

    torch.set_num_threads(1)
    cfg = load_recipe(args.recipe, [])
    specs = recipe_tasks(list(cfg.eval.tasks), cfg.eval.split, cfg.data)
    if args.queries:
        specs = [shortened(spec, args.queries) for spec in specs]
    settings = eval_settings(cfg)
    bundle, engine, _ = policy_and_engine(args.checkpoint, cfg.model.dtype, "cpu",
                                          settings.batch_size, settings.max_pixels)
    spent = {phase: {"wall": 0.0, "cpu": 0.0} for phase in PHASES}

    def timed(method, phase_of):
        def wrapper(*a, **kw):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return method(*a, **kw)
            finally:
                phase = spent[phase_of(a)]
                phase["wall"] += time.perf_counter() - wall
                phase["cpu"] += time.process_time() - cpu
        return wrapper

    evaluate.Evaluator.embed = timed(
        evaluate.Evaluator.embed, lambda a: "disc" if a[2] == "disc" else "greedy gen")
    evaluate.Evaluator.sample_queries = timed(evaluate.Evaluator.sample_queries,
                                              lambda a: "pass@k")
    run = timed(evaluate.evaluate, lambda a: "total")
    summary = run(bundle, engine, specs, settings, None)
    spent["rest"] = {k: spent["total"][k] - sum(spent[p][k] for p in
                                                ("disc", "greedy gen", "pass@k"))
                     for k in ("wall", "cpu")}
    scores = {name: {**task["scores"], **task["pass_at_k"]}
              for name, task in summary["tasks"].items()}
    return {"phases": spent, "scores": scores}


def shortened(spec, queries: int):
    """``spec`` with its first ``queries`` queries only: a copy of its file, in a folder that
    links to the original folder's media (paths in the file are relative to it)."""
    from dataclasses import replace

    source = Path(spec.path)
    folder = Path(tempfile.mkdtemp(prefix="bench-eval-task-"))
    for entry in source.parent.iterdir():
        if entry != source:
            (folder / entry.name).symlink_to(entry)
    lines = source.read_text(encoding="utf-8").splitlines()[:queries]
    (folder / source.name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return replace(spec, path=folder / source.name)


def report(runs: dict[str, list[dict]]) -> None:
    print(f"\nmedian of {len(runs['now'])} runs each (seconds; ratio = before / now)")
    print(f"{'phase':12s} {'wall before':>12s} {'wall now':>9s} {'ratio':>6s} "
          f"{'CPU before':>11s} {'CPU now':>8s} {'ratio':>6s}")
    for phase in PHASES:
        cells = []
        for kind in ("wall", "cpu"):
            before = statistics.median(r["phases"][phase][kind] for r in runs["before"])
            now = statistics.median(r["phases"][phase][kind] for r in runs["now"])
            cells += [f"{before:.1f}", f"{now:.1f}", f"{before / now:.2f}x" if now else "-"]
        print(f"{phase:12s} {cells[0]:>12s} {cells[1]:>9s} {cells[2]:>6s} "
              f"{cells[3]:>11s} {cells[4]:>8s} {cells[5]:>6s}")
    for kind in ("wall", "cpu"):
        ratios = [b["phases"]["total"][kind] / n["phases"]["total"][kind]
                  for b, n in zip(runs["before"], runs["now"])]
        print(f"total {kind} ratio per run: {', '.join(f'{r:.2f}x' for r in ratios)}")
    before, now = runs["before"][0]["scores"], runs["now"][0]["scores"]
    for label, keep in (("greedy modes", lambda k: not k.startswith("pass@")),
                        ("pass@k", lambda k: k.startswith("pass@"))):
        differ = {(task, key): (before[task][key], now[task].get(key))
                  for task in before for key in before[task]
                  if keep(key) and before[task][key] != now[task].get(key)}
        print(f"{label}: " + ("same scores" if not differ else
                             "differ: " + ", ".join(f"{t} {k} {b:.4f} -> {n:.4f}"
                                                    for (t, k), (b, n) in differ.items())))
    repeat = all(r["scores"] == runs["now"][0]["scores"] for r in runs["now"])
    print(f"now, every run the same scores: {repeat}")


if __name__ == "__main__":
    main()
