"""Reward plug-ins inside a real learner step (DeepSpeed engine, world size 1, CPU)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from rewards import RewardError
from umerl.config.recipe import load_recipe

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

        SEEN = []

        def record_disc(ctx):
            SEEN.append((ctx.disc_query_embeddings, ctx.disc_target_embeddings))
            return torch.zeros(ctx.num_rollouts)

        RUNAWAY = [True]

        def runaway_scale(ctx):
            # Finite (reward validation passes), but its advantages overflow the loss to inf.
            signs = torch.tensor([(-1.0) ** i for i in range(ctx.num_rollouts)])
            return signs * (3e38 if RUNAWAY[0] else 1.0)

        class Exploding:
            def __init__(self):
                self.calls = 0

            def __call__(self, ctx):
                self.calls += 1
                raise RuntimeError("judge model is offline")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards.lengths"


def learner_and_shard(tiny_model_dir, benchmark_manifest, tmp_path, rewards, *overrides):
    from rollout.transformers_engine import TransformersEngine
    from umerl.data.formats import read_rl_pairs
    from umerl.model.sampling import SamplingParams
    from umerl.train import dist as udist
    from umerl.train.learner import Learner, StepShard

    udist.init_single_process()
    cfg = load_recipe(None, [
        f"output_dir={tmp_path}", "rl.pairs_per_step=2", "rl.group_size=2",
        "rl.max_new_tokens=6", "learner.num_workers=1", "wandb.mode=disabled", *overrides,
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
    plan = BucketPlan.build(learner.weight_specs(), 1 << 20)
    before = Digest.of(plan, params)
    with pytest.raises(RewardError) as err:
        learner.step(shard)
    message = str(err.value)
    assert "judge" in message and "my_rewards" in message
    assert "judge model is offline" in message and "RuntimeError" in message
    assert Digest.of(plan, params) == before  # nothing was updated


def test_rewards_see_the_disc_embeddings_and_disc_agreement_rewards_them(
        tiny_model_dir, benchmark_manifest, tmp_path, plugin_module):
    """The scoring pass's disc embeddings reach every reward: equal to what ``umerl.model.embed``
    computes for the same prompts, so the example DiscAgreement reward is no longer zero."""
    import importlib

    import torch

    from umerl.model.embed import disc_embeddings

    rewards = [{"name": f"{plugin_module}:record_disc", "label": "seen"},
               {"name": str(REPO / "recipes" / "rewards_example.py") + ":DiscAgreement",
                "label": "agree", "kwargs": {"missing": "error"}}]
    learner, shard = learner_and_shard(tiny_model_dir, benchmark_manifest, tmp_path, rewards)
    learner.bundle.model.eval()  # reference: umerl.model.embed, weights before the update
    expect_q = disc_embeddings(learner.bundle, [p.query for p in shard.pairs])
    expect_t = disc_embeddings(learner.bundle, [p.target for p in shard.pairs])
    learner.bundle.model.train()
    metrics = learner.step(shard)
    disc_q, disc_t = importlib.import_module(plugin_module).SEEN[-1]
    assert torch.allclose(disc_q, expect_q, atol=1e-5)
    assert torch.allclose(disc_t, expect_t, atol=1e-5)
    assert metrics["reward/agree"] != 0.0
    assert metrics["reward/agree/group_std"] > 0.0  # differs between a group's rollouts
    assert metrics["reward/zero_advantage_groups"] == 0.0


def test_groups_whose_rewards_are_all_equal_are_counted(tiny_model_dir, benchmark_manifest,
                                                         tmp_path, plugin_module):
    rewards = [{"name": f"{plugin_module}:record_disc", "label": "zero"}]  # 0 for every rollout
    learner, shard = learner_and_shard(tiny_model_dir, benchmark_manifest, tmp_path, rewards)
    metrics = learner.step(shard)
    assert metrics["reward/zero_advantage_groups"] == 1.0
    assert metrics["reward/zero/group_std"] == 0.0


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_non_finite_updates_are_skipped_counted_and_stop_the_run(
        tiny_model_dir, benchmark_manifest, tmp_path, plugin_module, zero_stage):
    """A reward whose advantages overflow the loss: the step is skipped (weights unchanged,
    counted); a good step in between resets the run of skips; max_skipped_steps in a row stop
    it, naming the step. fp32 ZeRO-0 is the path where DeepSpeed applies a NaN step itself."""
    import importlib

    import torch

    from rollout.weight_sync import BucketPlan, Digest

    runaway = importlib.import_module(plugin_module).RUNAWAY
    rewards = [{"name": f"{plugin_module}:runaway_scale", "label": "runaway"}]
    learner, shard = learner_and_shard(
        tiny_model_dir, benchmark_manifest, tmp_path, rewards, "rl.norm_adv_by_std=false",
        f"learner.zero_stage={zero_stage}", "learner.max_skipped_steps=2")
    plan = BucketPlan.build(learner.weight_specs(), 1 << 20)

    def digest() -> str:  # of the full weights (ZeRO-3: gathered, as a weight sync does)
        out = Digest()
        for bucket, tensors in zip(plan.buckets, learner.weight_buckets(plan)):
            assert all(torch.isfinite(t).all() for t in tensors)
            out.update((m.name, t) for m, t in zip(bucket, tensors))
        return out.hexdigest()

    before, steps = digest(), []
    for step, overflow in enumerate([True, False, True, True], start=1):
        runaway[0] = overflow
        shard.step = step
        if step == 4:
            with pytest.raises(RuntimeError) as err:
                learner.step(shard)
            break
        steps.append(learner.step(shard))
        after = digest()
        assert (after != before) != overflow  # a skipped step leaves every weight as it was
        before = after
    assert [m["actor/skipped_steps"] for m in steps] == [1.0, 1.0, 2.0]
    assert [m["actor/update_skipped"] for m in steps] == [1.0, 0.0, 1.0]
    assert digest() == before  # step 4 was not applied either
    message = str(err.value)
    assert message.startswith("step 4:") and "2 steps in a row (3..4" in message
    assert "learner.max_skipped_steps = 2" in message and "after step 2" in message


def _guard_rank(rank: int, port: int, out_dir: str) -> None:
    """One of two gloo ranks stepping a FiniteStepAdamW; only rank 1 saw a non-finite loss."""
    import torch

    from umerl.train import dist as udist
    from umerl.train.engine import FiniteStepAdamW

    udist.init_process_group(rank, 2, "127.0.0.1", port, backend="gloo")
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = FiniteStepAdamW([weight], lr=0.1)
    optimizer.begin_step()
    optimizer.note_loss(torch.tensor(float("nan") if rank == 1 else 1.0))
    weight.grad = torch.ones(3)  # finite on both ranks
    optimizer.step()
    torch.save({"weight": weight.detach(), "skipped": optimizer.skipped},
               Path(out_dir) / f"rank{rank}.pt")
    # Both ranks' results are on disk once both pass the barrier. Then leave without tearing
    # gloo down: a rank that exits with its group alive (CI, once) or destroys it while the
    # other rank, the store's client, is still tearing down (the full suite, once) can abort
    # in gloo's C++ threads ("terminate called without an active exception", SIGABRT).
    udist.barrier()
    os._exit(0)


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """ZeRO ranks hold different partitions and see different losses: the skip is agreed, so
    no rank applies an update another refused (the weights would part ways)."""
    import torch
    from test_zero3 import _spawn_bounded

    from umerl.train.dist import free_port

    _spawn_bounded(_guard_rank, (free_port(), str(tmp_path)))
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["skipped"] is True
        assert torch.equal(result["weight"], torch.ones(3))


def test_the_share_of_completions_cut_at_the_budget_is_logged(tiny_model_dir, benchmark_manifest,
                                                               tmp_path, plugin_module):
    rewards = [{"name": f"{plugin_module}:record_disc", "label": "zero"}]
    learner, shard = learner_and_shard(tiny_model_dir, benchmark_manifest, tmp_path, rewards)
    ids = [c for side in (shard.query_completions, shard.target_completions)
           for group in side for c in group]
    cut = sum(len(c) == 6 for c in ids) / len(ids)  # rl.max_new_tokens=6
    assert cut > 0  # the untrained tiny model seldom stops within 6 tokens
    assert learner.step(shard)["rollout/truncated"] == pytest.approx(cut)
