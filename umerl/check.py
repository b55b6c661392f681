"""``umerl check``: everything a run would check before its first step, without running it.

The schema (done by the recipe loader), the preflight (checkpoint, resume, data, evaluation
tasks), each configured reward called once on a small synthetic step built from the recipe's
own RL data (so a plug-in that raises, or returns the wrong shape, fails here and not at step
1 on the cluster), and with ``cluster=True`` the live cluster's resources and ``output_dir``.
Without ``cluster`` Ray is never started.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from omegaconf import DictConfig

from umerl.config.origins import ConfigError, Sources
from umerl.data.answers import gold_answer
from umerl.driver import prepare
from umerl.preflight import (
    check_output_dir,
    check_rewards,
    finished_stages,
    preflight,
    rewards_notice,
)

# The synthetic step: this many pairs (2: the embedding reward needs another pair's rollouts
# as negatives) and an embedding size; the group size is the recipe's.
SYNTHETIC_PAIRS = 2
SYNTHETIC_DIM = 16


def check_recipe(cfg: DictConfig, sources: Sources, cluster: bool = False) -> list[str]:
    """Raise ``ConfigError`` (or ``DataError``, ``CheckpointError``) on the first problem;
    returns what was checked (also printed)."""
    start = time.perf_counter()
    if (notice := rewards_notice(cfg)) is not None:
        print(notice, flush=True)
    check_output_dir(cfg.output_dir, sources.describe("output_dir"))
    cfg, model = prepare(cfg, sources)
    done = ["schema", "checkpoint"]
    finished = finished_stages(cfg, sources)
    if finished is not None:
        print("[check] a run would have nothing to do: " + "; ".join(finished), flush=True)
    checked = preflight(cfg, model, sources)
    done.append("data")
    if cfg.rl.enabled:
        done.append(call_rewards(cfg, checked["rl"], sources))
    if cluster:
        _check_cluster(cfg, sources)
        done.append("cluster")
    print(f"[check] ok: {', '.join(done)} ({time.perf_counter() - start:.1f} s)", flush=True)
    return done


def call_rewards(cfg: DictConfig, datasets: dict[str, list], sources: Sources) -> str:
    """Call every reward once on a synthetic step; a failure names the reward's entry."""
    from rewards import RewardError, run_guarded

    reward_set = check_rewards(cfg.rewards, sources)
    ctx = synthetic_step(datasets, int(cfg.rl.group_size), int(cfg.seed),
                         bool(cfg.rl.mask_shared_targets))
    for index, entry in enumerate(reward_set.rewards):
        try:
            run_guarded(entry.reward, ctx)
        except RewardError as err:
            key = f"rewards[{index}]"
            raise ConfigError(f"{key} (from {sources.of(key)}): {err} (called once by umerl "
                              f"check on a synthetic step of {ctx.num_pairs} pairs x "
                              f"G={ctx.group_size} from the recipe's rl.data)") from None
    return f"{len(reward_set.rewards)} rewards called on a synthetic step"


def synthetic_step(datasets: dict[str, list], group_size: int, seed: int,
                   mask_shared_targets: bool = False) -> Any:
    """A ``RewardContext`` over the first pairs of the first RL dataset: per group, samples
    alternate between a completion in the UME-R1 format and a bare one (so the group's rewards
    can differ), with random unit embeddings."""
    from rewards import RewardContext

    pairs = next(iter(datasets.values()))[:SYNTHETIC_PAIRS]
    rows = len(pairs) * group_size
    completions = [_completion(pair, sample) for _ in ("query", "target")
                   for pair in pairs for sample in range(group_size)]
    generator = torch.Generator().manual_seed(seed)

    def unit(n: int) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(n, SYNTHETIC_DIM, generator=generator),
                                             dim=1)

    return RewardContext.from_pairs(
        pairs, completions=completions,
        completion_ids=[list(range(1, len(c.split()) + 1)) for c in completions],
        query_embeddings=unit(rows), target_embeddings=unit(rows), group_size=group_size,
        disc_query_embeddings=unit(len(pairs)), disc_target_embeddings=unit(len(pairs)),
        mask_shared_targets=mask_shared_targets)


def _completion(pair: Any, sample: int) -> str:
    if sample % 2:
        return "no reasoning here"
    answer = gold_answer(pair.task, pair.meta) or "something"
    return (f"<think>A synthetic check of the rewards.</think>\n<answer>{answer}</answer>"
            "<gen_emb>")


def _check_cluster(cfg: DictConfig, sources: Sources) -> None:
    import ray

    from umerl.config.cluster import check_cluster, check_shared_output_dir, nodes_from_ray
    from umerl.runtime.ray_start import init_ray

    init_ray(cfg)
    try:
        check_cluster(cfg, nodes_from_ray(), sources)
        check_shared_output_dir(cfg.output_dir, name=sources.describe("output_dir"))
    finally:
        ray.shutdown()
