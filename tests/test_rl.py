"""GRPO on Ray: a rollout pool and a learner pool as separate actors, weight sync, resume.

One local Ray (loopback) serves the module; every run uses the tiny model directly as the
policy (the SFT stage is tested elsewhere), 2 pairs x G=2 per step, short completions.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rollout.pool import _split, prompt_seed
from umerl.config import load_recipe


def test_prompt_seeds_do_not_depend_on_pool_sizes() -> None:
    seeds = {prompt_seed(0, step, i, side) for step in (1, 2) for i in range(4)
             for side in ("query", "target")}
    assert len(seeds) == 16  # distinct per (step, pair, side)
    assert prompt_seed(0, 3, 1, "query") == prompt_seed(0, 3, 1, "query")
    assert prompt_seed(1, 3, 1, "query") != prompt_seed(0, 3, 1, "query")
    assert _split(5, 2) == [(0, 3), (3, 5)] and _split(2, 3) == [(0, 1), (1, 2), (2, 2)]


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from umerl.driver import worker_env

    ray.init(_node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False,
             object_store_memory=512 << 20, runtime_env={"env_vars": worker_env()})
    yield ray
    ray.shutdown()


def rl_config(out: Path, benchmark: Path, *overrides: str):
    from umerl.driver import absolute_paths

    cfg = load_recipe(None, [
        f"output_dir={out}", f"data.benchmark_dir={benchmark}",
        "rl.enabled=true", "rl.max_steps=2", "rl.pairs_per_step=2", "rl.group_size=2",
        "rl.max_new_tokens=8", "rl.lr=1e-3", "rl.save_every=1", "wandb.mode=disabled",
        "rl.data=[]", *overrides,
    ])
    cfg.rl.data = [str(benchmark / "digits_cls" / "rl_pairs.jsonl")]
    return absolute_paths(cfg)


def metrics_log(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("[rl] step")]


def test_rl_steps_with_separate_pools(local_ray, tiny_model_dir, benchmark_manifest, tmp_path,
                                      capsys):
    from umerl.rl import run_rl

    cfg = rl_config(tmp_path / "a", benchmark_manifest.parent)
    final = run_rl(cfg, str(tiny_model_dir), str(tiny_model_dir))
    out = capsys.readouterr().out
    steps = metrics_log(out)
    assert len(steps) == 2
    for key in ("total", "format", "embedding", "rank_score", "kl", "clip_fraction",
                "rollout", "learner", "weight_sync"):
        assert f" {key} " in steps[-1], (key, steps[-1])
    assert final.name == "step_00000002"
    from safetensors.torch import load_file

    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(final / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)


def test_rollout_pool_size_does_not_change_rewards(local_ray, tiny_model_dir,
                                                   benchmark_manifest, tmp_path, capsys):
    from umerl.rl import run_rl

    rewards = {}
    for n in (1, 2):
        cfg = rl_config(tmp_path / f"r{n}", benchmark_manifest.parent,
                        f"rollout.num_workers={n}")
        run_rl(cfg, str(tiny_model_dir), str(tiny_model_dir))
        rewards[n] = [line.split("| ")[0] for line in metrics_log(capsys.readouterr().out)]
    assert rewards[1] == rewards[2]


def test_weight_sync_makes_rollout_weights_bit_equal(local_ray, tiny_model_dir,
                                                     benchmark_manifest, tmp_path):
    from rollout.engine import SamplingParams
    from rollout.pool import RolloutPool
    from umerl.learner import LearnerPool
    from umerl.rl import load_rl_datasets, rl_step
    from umerl.sft_data import ContrastiveBatcher

    cfg = rl_config(tmp_path / "sync", benchmark_manifest.parent, "learner.num_workers=1",
                    "rollout.num_workers=1")
    learners = LearnerPool(cfg, str(tiny_model_dir), str(tiny_model_dir))
    rollout = RolloutPool(cfg.rollout, str(tiny_model_dir))
    try:
        names = learners.trainable_names()
        assert rollout.digests(names) == [learners.digest()]  # same starting checkpoint
        sampler = ContrastiveBatcher(load_rl_datasets(cfg, str(tiny_model_dir)), 2, seed=0)
        sampling = SamplingParams(max_new_tokens=8)
        metrics = rl_step(cfg, 1, sampler, rollout, learners, sampling)
        assert rollout.digests(names) == [learners.digest()]
        assert metrics["weight_sync/bytes"] > 0 and metrics["timing/weight_sync"] > 0
        # without a sync the two would now differ: step the learners alone once more
        before = learners.digest()
        from umerl.learner import StepShard

        _, pairs = sampler.next_batch()
        shard = StepShard(2, pairs, 0, [[[5, 6]] * 2] * 2, [[[7, 8]] * 2] * 2)
        learners.step([shard])
        assert learners.digest() != before
        assert rollout.digests(names) != [learners.digest()]
    finally:
        rollout.shutdown()
        learners.shutdown()


def test_resume_continues_at_the_right_step_with_the_right_data(
        local_ray, tiny_model_dir, benchmark_manifest, tmp_path, capsys):
    from umerl.rl import run_rl

    straight = rl_config(tmp_path / "straight", benchmark_manifest.parent, "rl.max_steps=3")
    run_rl(straight, str(tiny_model_dir), str(tiny_model_dir))
    uninterrupted = metrics_log(capsys.readouterr().out)

    stopped = rl_config(tmp_path / "stopped", benchmark_manifest.parent, "rl.max_steps=2")
    run_rl(stopped, str(tiny_model_dir), str(tiny_model_dir))
    capsys.readouterr()
    resumed_cfg = rl_config(tmp_path / "stopped", benchmark_manifest.parent, "rl.max_steps=3")
    run_rl(resumed_cfg, str(tiny_model_dir), str(tiny_model_dir))
    out = capsys.readouterr().out
    assert "resumed from" in out and "step_00000002" in out
    resumed = metrics_log(out)
    assert len(resumed) == 1 and resumed[0].startswith("[rl] step 3/3")
    # same weights after step 2, same pairs and seeds at step 3: the same rewards
    assert resumed[0].split("| ")[0] == uninterrupted[2].split("| ")[0]


def test_learner_pool_size_does_not_change_rewards(local_ray, tiny_model_dir,
                                                   benchmark_manifest, tmp_path, capsys):
    """The reverse: 1 or 2 learner ranks (rollout pool fixed) score the same rollouts alike.
    After one update the two runs' weights differ by float rounding (the data-parallel
    reduction order), so the comparison is on the first step, from identical weights."""
    from umerl.rl import run_rl

    rewards = {}
    for n in (1, 2):
        cfg = rl_config(tmp_path / f"l{n}", benchmark_manifest.parent,
                        f"learner.num_workers={n}", "rl.max_steps=1")
        run_rl(cfg, str(tiny_model_dir), str(tiny_model_dir))
        rewards[n] = [line.split("| ")[0] for line in metrics_log(capsys.readouterr().out)]
    one, two = rewards[1][0].split(), rewards[2][0].split()
    keep = [i for i, word in enumerate(one) if word in ("total", "format", "embedding",
                                                        "rank_score")]
    assert [one[i + 1] for i in keep] == [two[i + 1] for i in keep]


def test_zero3_learners_sync_save_and_resume(local_ray, tiny_model_dir, benchmark_manifest,
                                             tmp_path, capsys):
    """2 ZeRO-3 learner ranks: the rollout actor's weights equal the gathered (not the sharded)
    learner weights bit for bit (run_rl checks the digests at start and end, and raises
    otherwise), checkpoints hold full tensors, and a resumed run continues exactly."""
    from safetensors.torch import load_file

    from umerl.rl import run_rl

    zero3 = ("learner.num_workers=2", "learner.zero_stage=3", "rollout.num_workers=1")
    straight = rl_config(tmp_path / "z3", benchmark_manifest.parent, "rl.max_steps=3", *zero3)
    run_rl(straight, str(tiny_model_dir), str(tiny_model_dir))
    uninterrupted = metrics_log(capsys.readouterr().out)
    stopped = rl_config(tmp_path / "z3s", benchmark_manifest.parent, "rl.max_steps=2", *zero3)
    final = run_rl(stopped, str(tiny_model_dir), str(tiny_model_dir))
    capsys.readouterr()
    exported = load_file(final / "model.safetensors")
    start = load_file(tiny_model_dir / "model.safetensors")
    assert all(t.numel() > 0 for t in exported.values())  # not the (0,)-shaped shards
    # (the embedding rows grow by the two embedding tokens added on load)
    assert all(exported[k].shape == start[k].shape for k in start
               if k in exported and "embed_tokens" not in k and "lm_head" not in k)
    assert any(not torch.equal(exported[k], start[k]) for k in start if k in exported)
    resumed = rl_config(tmp_path / "z3s", benchmark_manifest.parent, "rl.max_steps=3", *zero3)
    run_rl(resumed, str(tiny_model_dir), str(tiny_model_dir))
    out = metrics_log(capsys.readouterr().out)
    assert len(out) == 1 and out[0].split("| ")[0] == uninterrupted[2].split("| ")[0]
