"""Where a GRPO step's time goes on the CPU recipe, and what weight sync costs.

    .venv/bin/python bench/bench_rl_step.py [--steps 6] [--checkpoint PATH] [key=value ...]

Runs the CPU recipe's RL stage (2 rollout actors, 2 learner actors on a local Ray) for a few
steps from ``--checkpoint`` (default: the tiny model, untrained) and prints, over the steps after
the first: each phase's share of the step time (rollout, learner, weight sync, the rest), and
the weight-sync bandwidth (the transport ``rl.weight_sync_transport`` picks: shm here) as a
ratio to a plain in-process ``torch`` copy of the same bytes, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def plain_copy_seconds(num_bytes: int, repeats: int = 5) -> float:
    import torch

    src = torch.empty(num_bytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import ray

    from rollout.pool import RolloutPool
    from umerl.config.recipe import load_recipe
    from umerl.driver import absolute_paths, ensure_tiny_model
    from umerl.model.sampling import SamplingParams
    from umerl.rl import RolloutStream, WeightSync, load_rl_datasets, rl_step
    from umerl.runtime.ray_start import init_ray
    from umerl.train.learner import LearnerPool
    from umerl.train.sft_data import ContrastiveBatcher

    cfg = absolute_paths(load_recipe(REPO / "recipes" / "cpu_tiny.yaml", [
        "output_dir=/tmp/umerl-bench-rl", "rl.resume=null", *args.overrides]))
    init_ray(cfg)
    checkpoint = args.checkpoint or ensure_tiny_model(cfg.model.tiny)
    learners = LearnerPool(cfg, checkpoint, checkpoint)
    rollout = RolloutPool(cfg.rollout, checkpoint)
    link = WeightSync.connect(cfg, learners, rollout)
    link.sync(digest=True)
    r = cfg.rl
    sampler = ContrastiveBatcher(load_rl_datasets(cfg, checkpoint), int(r.pairs_per_step))
    sampling = SamplingParams(max_new_tokens=int(r.max_new_tokens), top_k=int(r.top_k))
    stream = RolloutStream(cfg, sampler, rollout, sampling)
    rows = []
    try:
        for step in range(1, args.steps + 1):
            rows.append(rl_step(cfg, step, stream, learners, link))
            print(f"step {step}: {rows[-1]['timing/step']:.2f} s", flush=True)
    finally:
        stream.close()
        rollout.shutdown()
        learners.shutdown()
        ray.shutdown()
    measured = rows[1:] or rows  # the first step pays one-off warm-up costs
    total = sum(m["timing/step"] for m in measured)
    print(f"\nphase shares of the step time over {len(measured)} steps "
          f"(mean step {total / len(measured):.2f} s):")
    shares = {phase: sum(m[f"timing/{phase}"] for m in measured) / total
              for phase in ("rollout", "learner", "weight_sync")}
    shares["other (driver)"] = 1 - sum(shares.values())
    for phase, share in shares.items():
        print(f"  {phase:15s} {100 * share:5.1f} %")
    sync_bytes = measured[-1]["weight_sync/bytes"]
    sync_seconds = statistics.median(m["timing/weight_sync"] for m in measured)
    copy_seconds = plain_copy_seconds(int(sync_bytes))
    print(f"\nweight sync: {sync_bytes / 1e6:.1f} MB in {sync_seconds * 1e3:.1f} ms "
          f"({sync_bytes / sync_seconds / 1e9:.3f} GB/s) to {cfg.rollout.num_workers} actors "
          f"over {link.transport}; "
          f"plain in-process copy of the same bytes: {copy_seconds * 1e3:.2f} ms "
          f"({sync_bytes / copy_seconds / 1e9:.2f} GB/s); ratio "
          f"{sync_seconds / copy_seconds:.0f}x the copy time")


if __name__ == "__main__":
    main()
