"""How long UME-R1's embedding reward takes at a paper-sized step, next to one matmul.

    .venv/bin/python bench/bench_embedding_reward.py [--pairs 256] [--group 8] [--dim 1536]

Times ``rewards.embedding_reward`` on random L2-normalised float32 embeddings of
``pairs * group`` query and target rollouts, and one ``[2048, 1536] x [1536, 2048]`` float32
matrix product in the same run (same process, same threads), each as the median of several runs
after warm-up, and prints both and their ratio. The reward computes one similarity matrix of
exactly that size, so the ratio can not go far below 1; a GRPO step runs a forward and backward
pass of a multi-billion-parameter model over every rollout, i.e. millions of such products.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rewards import embedding_reward  # noqa: E402


def median_seconds(fns, repeats: int, warmup: int) -> list[float]:
    """Median time of each function; runs are interleaved so both see the same machine load."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", type=float, default=2e9,
                        help="policy size for the step-cost estimate (UME-R1-2B)")
    parser.add_argument("--tokens", type=int, default=512,
                        help="prompt + completion tokens per rollout, for the estimate")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(args.seed)
    rows = args.pairs * args.group
    query = torch.nn.functional.normalize(torch.randn(rows, args.dim, generator=gen), dim=1)
    target = torch.nn.functional.normalize(
        query + torch.randn(rows, args.dim, generator=gen), dim=1
    )
    a = torch.randn(2048, 1536, generator=gen)
    b = torch.randn(1536, 2048, generator=gen)

    with torch.inference_mode():
        t_reward, t_matmul = median_seconds(
            [lambda: embedding_reward(query, target, args.group), lambda: a @ b],
            args.repeats, args.warmup,
        )

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU; "
          f"median of {args.repeats} interleaved runs after {args.warmup} warm-up")
    print(f"embedding_reward  {args.pairs} pairs x {args.group} samples x {args.dim} dims "
          f"({rows} query + {rows} target rollouts): {t_reward * 1e3:8.2f} ms")
    print(f"matmul            [2048, 1536] x [1536, 2048]:                    "
          f"{t_matmul * 1e3:8.2f} ms")
    print(f"ratio             embedding_reward / matmul = {t_reward / t_matmul:.2f}")
    # Context, an estimate (not measured): the learner's forward + backward alone costs about
    # 6 * params * tokens FLOP over the step's 2 * pairs * group rollouts.
    matmul_flop = 2 * 2048 * 1536 * 2048
    step_flop = 6 * args.params * 2 * rows * args.tokens
    print(f"estimate          a {args.params:.0e}-parameter learner's forward+backward over "
          f"{2 * rows} rollouts x {args.tokens} tokens = {step_flop:.1e} FLOP "
          f"= {step_flop / matmul_flop:.1e} such matmuls; the reward is "
          f"{t_reward / t_matmul * matmul_flop / step_flop:.1e} of that")


if __name__ == "__main__":
    main()
