"""Chaos run: the CPU recipe's RL stage with a rollout actor SIGKILLed every few steps.

    .venv/bin/python bench/bench_faults.py [--steps 20] [--every 5] [key=value ...]

Runs ``--steps`` GRPO steps of recipes/cpu_tiny.yaml (2 rollout actors, 2 learner actors, a
local Ray) from the tiny model with ``faults.kill`` set to kill a rollout actor every
``--every`` steps, alternating actors and phases (mid-generation, mid-weight-sync), then the
same steps without faults, and prints: kills survived, steps lost (steps the faulty run did
not finish, or whose rewards differ from the clean run's: must be 0), and each recovery's time
(``fault/recovery_s``) as a share of the clean run's median step.
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
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

REWARD_KEYS = ("reward/total", "reward/format", "reward/embedding", "reward/rank_score")


def run(cfg, checkpoint: str, label: str) -> tuple[MemoryTracker, float]:
    from umerl.rl import run_rl
    from umerl.runtime.tracking import MemoryTracker

    recorder = MemoryTracker()
    start = time.perf_counter()
    run_rl(cfg, checkpoint, checkpoint, tracker=recorder)
    seconds = time.perf_counter() - start
    print(f"{label}: {len(recorder.steps)} steps in {seconds:.0f} s", flush=True)
    return recorder, seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import ray

    from umerl.config.recipe import load_recipe
    from umerl.driver import absolute_paths, ensure_tiny_model
    from umerl.runtime.ray_start import init_ray

    kills = [f"rollout/{k % 2}/{step}/{'generate' if k % 2 == 0 else 'weight_sync'}"
             for k, step in enumerate(range(args.every, args.steps + 1, args.every))]

    def recipe(out: str, faults: list[str]):
        return absolute_paths(load_recipe(REPO / "recipes" / "cpu_tiny.yaml", [
            f"output_dir={out}", "rl.resume=null", f"rl.max_steps={args.steps}",
            f"rl.save_every={args.steps}", f"rollout.max_restarts={len(kills)}",
            f"faults.kill=[{','.join(faults)}]", *args.overrides]))

    clean_cfg = recipe("/tmp/umerl-bench-faults/clean", [])
    init_ray(clean_cfg)
    try:
        checkpoint = ensure_tiny_model(clean_cfg.model.tiny)
        print(f"faults: {', '.join(kills)}", flush=True)
        faulty, _ = run(recipe("/tmp/umerl-bench-faults/faulty", kills), checkpoint, "faulty")
        clean, _ = run(clean_cfg, checkpoint, "clean")
    finally:
        ray.shutdown()
    lost = [s for s in clean.steps if s not in faulty.steps or any(
        faulty.steps[s].get(k) != clean.steps[s].get(k) for k in REWARD_KEYS)]
    step_s = statistics.median(m["timing/step"] for m in clean.steps.values())
    restarts = int(max(m["fault/rollout_restarts"] for m in faulty.steps.values()))
    print(f"\nkills survived: {restarts} of {len(kills)}; steps lost: {len(lost)}"
          f"{' ' + str(lost) if lost else ''}; clean median step {step_s:.2f} s")
    for fault in kills:
        step = int(fault.split("/")[2])
        m = faulty.steps[step]
        print(f"  {fault:26s} recovery {m['fault/recovery_s']:6.2f} s = "
              f"{m['fault/recovery_s'] / step_s:5.2f} steps; that step took "
              f"{m['timing/step']:.2f} s")


if __name__ == "__main__":
    main()
