"""Reward plug-ins inside a real learner step (DeepSpeed engine, world size 1, CPU)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from rewards import RewardError
from umerl.config import load_recipe

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def plugin_module(tmp_path, monkeypatch) -> str:
    package = tmp_path / "my_rewards"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "lengths.py").write_text(textwrap.dedent("""
        import torch

        def completion_length(ctx, scale=1.0):
            return torch.tensor([scale * len(ids) for ids in ctx.completion_ids])

        class Exploding:
            def __init__(self):
                self.calls = 0

            def __call__(self, ctx):
                self.calls += 1
                raise RuntimeError("judge model is offline")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards.lengths"


def learner_and_shard(tiny_model_dir, benchmark_manifest, tmp_path, rewards):
    from rollout.transformers_engine import TransformersEngine
    from umerl import dist as udist
    from umerl.data import read_rl_pairs
    from umerl.learner import Learner, StepShard
    from umerl.sampling import SamplingParams

    udist.init_single_process()
    cfg = load_recipe(None, [
        f"output_dir={tmp_path}", "rl.pairs_per_step=2", "rl.group_size=2",
        "rl.max_new_tokens=6", "learner.num_workers=1", "wandb.mode=disabled",
    ])
    cfg.rewards = rewards
    learner = Learner(cfg, str(tiny_model_dir), str(tiny_model_dir))
    pairs, _ = read_rl_pairs(benchmark_manifest.parent / "digits_cls" / "rl_pairs.jsonl")
    pairs = pairs[:2]
    engine = TransformersEngine(learner.bundle)
    sampling = SamplingParams(max_new_tokens=6, seed=0)
    q = engine.generate([p.query for p in pairs], 2, sampling, seeds=[1, 2])
    t = engine.generate([p.target for p in pairs], 2, sampling, seeds=[3, 4])
    return learner, StepShard(1, pairs, 0, q, t)


def test_file_and_module_plugins_run_inside_a_learner_step(
        tiny_model_dir, benchmark_manifest, tmp_path, plugin_module):
    rewards = [
        {"name": "format", "weight": 1.0},
        {"name": "embedding", "weight": 1.0},
        {"name": str(REPO / "recipes" / "rewards_example.py") + ":short_reasoning",
         "weight": 0.1, "kwargs": {"target_tokens": 4}},
        {"name": f"{plugin_module}:completion_length", "weight": 0.01, "kwargs": {"scale": 2.0}},
    ]
    learner, shard = learner_and_shard(tiny_model_dir, benchmark_manifest, tmp_path, rewards)
    metrics = learner.step(shard)
    for label in ("format", "embedding", "short_reasoning", "completion_length"):
        assert f"reward/{label}" in metrics
        assert f"timing_s/reward/{label}" in metrics
    lengths = [len(c) for side in (shard.query_completions, shard.target_completions)
               for group in side for c in group]
    assert metrics["reward/completion_length"] == pytest.approx(2.0 * sum(lengths) / 8)
    assert "actor/kl" in metrics and "reward/rank_score" in metrics


def test_a_failing_plugin_stops_the_step_before_any_update(
        tiny_model_dir, benchmark_manifest, tmp_path, plugin_module):
    from rollout.weight_sync import BucketPlan, Digest

    rewards = [{"name": "format"}, {"name": f"{plugin_module}:Exploding", "label": "judge"}]
    learner, shard = learner_and_shard(tiny_model_dir, benchmark_manifest, tmp_path, rewards)
    params = dict(learner.bundle.model.named_parameters())
    plan = BucketPlan.of(learner.trainable_named_parameters(), 1 << 20)
    before = Digest.of(plan, params)
    with pytest.raises(RewardError) as err:
        learner.step(shard)
    message = str(err.value)
    assert "judge" in message and "my_rewards" in message
    assert "judge model is offline" in message and "RuntimeError" in message
    assert Digest.of(plan, params) == before  # nothing was updated
