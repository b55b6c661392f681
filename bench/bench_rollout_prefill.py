"""A GRPO step's rollouts with each prompt prefilled once vs. once per sample, side by side.

    .venv/bin/python bench/bench_rollout_prefill.py [--steps 4] [--threads 1] [--checkpoint PATH]

In one process and one run: the CPU recipe's rollouts of ``--steps`` steps (its RL pairs,
``rl.pairs_per_step`` x 2 sides, ``rl.group_size`` samples each, ``rl.max_new_tokens``, top-k,
each side under its step's seed) through the transformers engine with ``share_prefill`` on and
off, alternating per step, on ``--threads`` torch threads (bench_async's one-thread rollout
actor). From ``--checkpoint`` (default: the newest SFT checkpoint under runs/, else the tiny
model). Prints each path's mean time per step and checks that both sampled the same tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint", default=None)
    args = parser.parse_args()

    import torch

    from bench.bench_async import default_checkpoint
    from rollout.pool import prompt_seed
    from rollout.transformers_engine import TransformersEngine
    from umerl.config.recipe import load_recipe
    from umerl.driver import absolute_paths, ensure_tiny_model
    from umerl.model.loading import load_policy
    from umerl.rl import load_rl_datasets, rollout_sampling
    from umerl.train.sft_data import ContrastiveBatcher

    torch.set_num_threads(args.threads)
    cfg = absolute_paths(load_recipe(REPO / "recipes" / "cpu_tiny.yaml", []))
    checkpoint = args.checkpoint or default_checkpoint() or ensure_tiny_model(cfg.model.tiny)
    bundle = load_policy(checkpoint)
    r = cfg.rl
    sampler = ContrastiveBatcher(load_rl_datasets(cfg, checkpoint), int(r.pairs_per_step))
    sampling = rollout_sampling(cfg)
    engines = {"prefill per sample (before)": TransformersEngine(bundle, share_prefill=False),
               "prefill once (now)": TransformersEngine(bundle)}
    times: dict[str, list[float]] = {name: [] for name in engines}
    tokens = []
    print(f"checkpoint {checkpoint}, {args.threads} thread(s)", flush=True)
    for step in range(args.steps + 1):  # step 0 warms both paths up and is not counted
        _, pairs = sampler.next_batch()
        sides = [p.query for p in pairs] + [p.target for p in pairs]
        seeds = ([prompt_seed(int(cfg.seed), step, i, "query") for i in range(len(pairs))]
                 + [prompt_seed(int(cfg.seed), step, i, "target") for i in range(len(pairs))])
        outputs = []
        for name, engine in (engines.items() if step % 2 else reversed(engines.items())):
            start = time.perf_counter()
            outputs.append(engine.generate_with_logprobs(sides, int(r.group_size), sampling,
                                                         seeds)[0])
            if step:
                times[name].append(time.perf_counter() - start)
        if outputs[0] != outputs[1]:
            raise SystemExit(f"step {step}: the two paths sampled different completions")
        tokens.append(statistics.mean(len(c) for side in outputs[0] for c in side))
        print(f"step {step}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()
                                           if t and step), flush=True)
    before, now = (statistics.mean(t) for t in times.values())
    prompt = statistics.mean(len(bundle.encoder.encode(s).input_ids) for s in sides)
    print(f"\n{len(sides)} prompts x {r.group_size} samples per step, prompts ~{prompt:.0f} "
          f"tokens, completions ~{statistics.mean(tokens[1:]):.0f} tokens: same completions")
    for name, spent in times.items():
        print(f"  {name:28s} {statistics.mean(spent):.2f} s per step")
    print(f"  speed-up {before / now:.2f}x (median per step: "
          f"{statistics.median(times[next(iter(times))]) / statistics.median(spent):.2f}x)")


if __name__ == "__main__":
    main()
