"""One step off-policy against the synchronous loop, on the same resources.

    .venv/bin/python bench/bench_async.py [--steps 12] [--checkpoint PATH] [key=value ...]
    .venv/bin/python bench/bench_async.py --curve --steps 40 --seeds 0 1 2

Runs the CPU recipe's RL stage (recipes/cpu_tiny.yaml) with ONE rollout actor and ONE learner
actor, each one CPU and one thread (the CPU stand-in for two separate GPU pools), from
``--checkpoint`` (default: the newest SFT checkpoint under runs/, else the tiny model), three
ways, one after the other in this process:

    sync, two-pass       rl.max_staleness=0, single_forward=false, shared_prompt=false
                         (the loop before)
    sync, one forward    rl.max_staleness=0, single_forward=true,  shared_prompt=false
    sync, 1 fwd, shared  rl.max_staleness=0, single_forward=true,  shared_prompt=true
    one step off         rl.max_staleness=1, single_forward=true,  shared_prompt=false
    off, 1 fwd, shared   rl.max_staleness=1, single_forward=true,  shared_prompt=true
    sync, shared, per-sample    as sync, 1 fwd, shared, rollout.share_prefill=false
    off, shared, per-sample     as off, 1 fwd, shared, rollout.share_prefill=false

(the last two: each prompt prefilled once per sample, the rollout engine before; the learner
keys are under learner.) and prints, per run, steps/s over all steps (the
pipeline's first, unoverlapped step included), the learner phase's mean time, and each pool's
mean idle ratio over all steps and in the steady state (steps 2..N-1: the off-policy loop's
first step has nothing generated ahead and its last has nothing left to generate, so its
rollout pool idles through them); then the ratios: off-policy vs sync steps/s (with whole
rows and with the shared prompt), and each learner mode's phase time against the two-pass
loop's; and the shared prefill's rollout phase and steps/s against the per-sample prefill's.
``--modes LABEL ...`` runs only those modes.

``--curve``: instead, the mean reward per step over ``--seeds`` for max_staleness 0 and 1,
with the seed-to-seed spread (min..max of the seeds' mean reward per step).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported at run time after sys.path has the repository
    from umerl.runtime.tracking import MemoryTracker

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ["UMERL_WORKER_THREADS"] = "1"  # every Ray worker: one torch thread
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ONE_EACH = ["rollout.num_workers=1", "rollout.cpus_per_worker=1", "learner.num_workers=1",
            "learner.cpus_per_worker=1", "rl.resume=null", "rl.log_every=1000"]
WHOLE_ROWS, SHARED = "learner.shared_prompt=false", "learner.shared_prompt=true"
PER_SAMPLE = "rollout.share_prefill=false"
MODES = {
    "sync, two-pass": ["rl.max_staleness=0", "learner.single_forward=false", WHOLE_ROWS],
    "sync, one forward": ["rl.max_staleness=0", "learner.single_forward=true", WHOLE_ROWS],
    "sync, 1 fwd, shared": ["rl.max_staleness=0", "learner.single_forward=true", SHARED],
    "one step off": ["rl.max_staleness=1", "learner.single_forward=true", WHOLE_ROWS],
    "off, 1 fwd, shared": ["rl.max_staleness=1", "learner.single_forward=true", SHARED],
    # The last two again with each prompt prefilled once per sample (the rollout engine before).
    "sync, shared, per-sample": ["rl.max_staleness=0", "learner.single_forward=true", SHARED,
                                 PER_SAMPLE],
    "off, shared, per-sample": ["rl.max_staleness=1", "learner.single_forward=true", SHARED,
                                PER_SAMPLE],
}


def default_checkpoint() -> str | None:
    from umerl.train import checkpoint as ckpt

    found = [ckpt.latest(d) for d in (REPO / "runs").glob("*/sft")]
    found = [p for p in found if p is not None]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


def run(label: str, overrides: list[str], checkpoint: str | None) -> MemoryTracker:
    from umerl.config.recipe import load_recipe
    from umerl.driver import absolute_paths, ensure_tiny_model
    from umerl.rl import run_rl
    from umerl.runtime.ray_start import init_ray
    from umerl.runtime.tracking import MemoryTracker

    out = f"/tmp/umerl-bench-async/{label.replace(' ', '_').replace(',', '')}"
    cfg = absolute_paths(load_recipe(REPO / "recipes" / "cpu_tiny.yaml",
                                     [f"output_dir={out}", *ONE_EACH, *overrides]))
    init_ray(cfg)
    policy = checkpoint or ensure_tiny_model(cfg.model.tiny)
    recorder = MemoryTracker()
    start = time.perf_counter()
    run_rl(cfg, policy, policy, recorder)
    print(f"  {label}: {len(recorder.steps)} steps in {time.perf_counter() - start:.0f} s "
          "(with start-up)", flush=True)
    return recorder


def mean(rec: MemoryTracker, key: str, steady: bool = False) -> float:
    steps = sorted(rec.steps)
    if steady and len(steps) > 2:
        steps = steps[1:-1]
    return statistics.fmean(rec.steps[s][key] for s in steps)


def throughput(args: argparse.Namespace) -> None:
    modes = {label: MODES[label] for label in args.modes or MODES}
    runs = {label: run(label, [f"rl.max_steps={args.steps}", *extra, *args.overrides],
                       args.checkpoint) for label, extra in modes.items()}
    print(f"\n{args.steps} RL steps each, 1 rollout actor + 1 learner actor, one thread each:")
    print(f"{'':26s} {'steps/s':>8s} {'step s':>7s} {'learner s':>9s} {'rollout s':>9s} "
          f"{'rollout idle':>12s} {'learner idle':>12s} {'(steady state)':>16s}")
    for label, rec in runs.items():
        total = sum(m["timing/step"] for m in rec.steps.values())
        steady = (f"{mean(rec, 'rollout/idle_ratio', True):.1%} / "
                  f"{mean(rec, 'learner/idle_ratio', True):.1%}")
        print(f"{label:26s} {len(rec.steps) / total:8.3f} {total / len(rec.steps):7.2f} "
              f"{mean(rec, 'timing/learner'):9.2f} {mean(rec, 'timing/rollout'):9.2f} "
              f"{mean(rec, 'rollout/idle_ratio'):12.1%} {mean(rec, 'learner/idle_ratio'):12.1%}"
              f" {steady:>16s}")
    rate = {label: len(r.steps) / sum(m["timing/step"] for m in r.steps.values())
            for label, r in runs.items()}
    print()
    for off, sync in (("one step off", "sync, one forward"),
                      ("off, 1 fwd, shared", "sync, 1 fwd, shared"),
                      ("off, shared, per-sample", "sync, shared, per-sample")):
        if off in rate and sync in rate:
            base = (f"; / sync, two-pass: {rate[off] / rate['sync, two-pass']:.2f}x"
                    if "sync, two-pass" in rate else "")
            print(f"{off} / {sync}: {rate[off] / rate[sync]:.2f}x steps/s{base}")
    for now, before in (("sync, 1 fwd, shared", "sync, shared, per-sample"),
                        ("off, 1 fwd, shared", "off, shared, per-sample")):
        if now in runs and before in runs:
            print(f"prefill once, {now} vs {before}: rollout phase "
                  f"{mean(runs[before], 'timing/rollout') / mean(runs[now], 'timing/rollout'):.2f}"
                  f"x faster, {rate[now] / rate[before]:.2f}x steps/s")
    if "sync, two-pass" in runs:
        before_s = mean(runs["sync, two-pass"], "timing/learner")
        for label in ("sync, one forward", "sync, 1 fwd, shared"):
            if label in runs:
                cut = 1 - mean(runs[label], "timing/learner") / before_s
                print(f"learner phase, {label} vs sync, two-pass: {cut:.1%} shorter")


def curve(args: argparse.Namespace) -> None:
    table: dict[int, dict[int, list[float]]] = {0: {}, 1: {}}
    for staleness in (0, 1):
        for seed in args.seeds:
            rec = run(f"curve s{staleness} seed{seed}",
                      [f"rl.max_steps={args.steps}", f"seed={seed}",
                       f"rl.max_staleness={staleness}", *args.overrides], args.checkpoint)
            for step, m in rec.steps.items():
                table[staleness].setdefault(step, []).append(m["reward/total"])
    print(f"\nreward/total per step, mean over seeds {args.seeds} [min..max over seeds]:")
    print(f"{'step':>4s} {'staleness 0':>24s} {'staleness 1':>24s}")
    for step in sorted(table[0]):
        cells = []
        for staleness in (0, 1):
            values = table[staleness][step]
            cells.append(f"{statistics.fmean(values):.3f} [{min(values):.3f}..{max(values):.3f}]")
        print(f"{step:4d} {cells[0]:>24s} {cells[1]:>24s}")
    for staleness in (0, 1):
        per_seed = [statistics.fmean(table[staleness][s][i] for s in table[staleness])
                    for i in range(len(args.seeds))]
        print(f"staleness {staleness}: mean reward over all steps per seed "
              f"{', '.join(f'{v:.4f}' for v in per_seed)}; mean {statistics.fmean(per_seed):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--curve", action="store_true")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), metavar="LABEL",
                        help="run these modes only (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    args.checkpoint = args.checkpoint or default_checkpoint()
    print(f"from {args.checkpoint or 'the tiny model (untrained)'}", flush=True)
    import ray

    try:
        (curve if args.curve else throughput)(args)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
