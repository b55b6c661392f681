"""GRPO on Ray: a rollout pool and a learner pool as separate actors, weight sync, resume.

One local Ray (loopback) serves the module; every run uses the tiny model directly as the
policy (the SFT stage is tested elsewhere), 2 pairs x G=2 per step, short completions.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rollout.pool import _split, prompt_seed
from umerl.config.recipe import load_recipe
from umerl.runtime.tracking import MemoryTracker


def test_prompt_seeds_do_not_depend_on_pool_sizes() -> None:
    seeds = {prompt_seed(0, step, i, side) for step in (1, 2) for i in range(4)
             for side in ("query", "target")}
    assert len(seeds) == 16  # distinct per (step, pair, side)
    assert prompt_seed(0, 3, 1, "query") == prompt_seed(0, 3, 1, "query")
    assert prompt_seed(1, 3, 1, "query") != prompt_seed(0, 3, 1, "query")
    assert _split(5, 2) == [(0, 3), (3, 5)] and _split(2, 3) == [(0, 1), (1, 2), (2, 2)]


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


# What a step's data, seeds and weights decide (its timings aside): equal, step by step, in two
# runs that sample the same rollouts from the same weights.
DETERMINED = ("reward/total", "reward/format", "reward/embedding", "reward/rank_score",
              "reward/format/group_std", "reward/embedding/group_std",
              "reward/zero_advantage_groups", "actor/kl", "actor/clip_fraction",
              "actor/ratio_mean", "rollout/staleness", "rollout/completion_len_mean")
REWARDS = ("reward/total", "reward/format", "reward/embedding", "reward/rank_score")


def run_logged(cfg, policy: Path) -> tuple[MemoryTracker, Path]:
    """run_rl from ``policy`` (also the reference), with every step's metrics recorded."""
    from umerl.rl import run_rl

    tracker = MemoryTracker()
    final = run_rl(cfg, str(policy), str(policy), tracker)
    return tracker, final


def determined(tracker: MemoryTracker, keys: tuple[str, ...] = DETERMINED
               ) -> list[tuple[int, dict[str, float]]]:
    """Each logged step with its ``keys`` (a missing key fails: a comparison of what was not
    logged would pass on nothing)."""
    return [(step, {k: m[k] for k in keys}) for step, m in tracker.logged]


class Started:
    """A stand-in pool that says when it starts and shuts down (``events``)."""

    def __init__(self, name: str, events: list[str]):
        self.name, self.events = name, events
        events.append(f"start {name}")

    def resume(self) -> tuple[None, dict]:
        return None, {}

    def shutdown(self) -> None:
        self.events.append(f"shutdown {self.name}")


@pytest.mark.parametrize("fails", ["resume", "weight sync"])
def test_an_attempt_that_fails_early_shuts_down_what_it_started(monkeypatch, tmp_path,
                                                                benchmark_manifest,
                                                                fails) -> None:
    """An RL attempt that fails before its first step (the learners' resume, or the weight-sync
    group: e.g. a learner lost meanwhile) still shuts down the pools it started, the learners
    last: a left learner group whose node was lost is re-placed by Ray on the capacity the
    stage's restart needs. (The real pools: test_multinode's
    test_a_failed_stage_leaves_no_placement_group.)"""
    import umerl.rl as rl

    events: list[str] = []

    def fail(*args, **kwargs):
        raise ValueError(f"{fails} failed")

    if fails == "resume":
        monkeypatch.setattr(Started, "resume", fail)
    monkeypatch.setattr(rl, "LearnerPool", lambda *a, **k: Started("learners", events))
    monkeypatch.setattr(rl, "RolloutPool", lambda *a, **k: Started("rollout", events))
    monkeypatch.setattr(rl.WeightSync, "connect", fail)
    cfg = rl_config(tmp_path, benchmark_manifest.parent)
    with pytest.raises(ValueError, match=f"{fails} failed"):
        rl._run_rl(cfg, "policy", "policy", None, {"toy": [object()] * 4})
    started = ["start learners"] + (["start rollout"] if fails == "weight sync" else [])
    assert events == started + [e.replace("start", "shutdown") for e in reversed(started)]


def test_rl_steps_with_separate_pools(local_ray, tiny_model_dir, benchmark_manifest, tmp_path):
    cfg = rl_config(tmp_path / "a", benchmark_manifest.parent)
    tracker, final = run_logged(cfg, tiny_model_dir)
    assert [step for step, _ in tracker.logged] == [1, 2]
    for key in (*REWARDS, "actor/kl", "actor/clip_fraction", "timing/rollout",
                "timing/learner", "timing/weight_sync"):
        assert all(math.isfinite(m[key]) for _, m in tracker.logged), key
    assert final.name == "step_00000002"
    from safetensors.torch import load_file

    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(final / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)


def test_rollout_pool_size_does_not_change_rewards(local_ray, tiny_model_dir,
                                                   benchmark_manifest, tmp_path):
    logged = {}
    for n in (1, 2):
        cfg = rl_config(tmp_path / f"r{n}", benchmark_manifest.parent,
                        f"rollout.num_workers={n}")
        logged[n] = determined(run_logged(cfg, tiny_model_dir)[0])
    assert [step for step, _ in logged[1]] == [1, 2]
    assert logged[1] == logged[2]


def learner_weights(learners) -> dict[str, torch.Tensor]:
    """The learners' full trainable weights, read the way a sync reads them (every rank takes
    part in the ZeRO-3 gathers), independently of the sync's own code path."""
    import ray

    def read(actor_self, plan):
        buckets = actor_self.learner.weight_buckets(plan)
        out = {m.name: t.detach().cpu().clone() for bucket, group in zip(plan.buckets, buckets)
               for m, t in zip(bucket, group)}
        return out if actor_self.rank == 0 else None

    plan = ray.get(learners.actors[0].__ray_call__.remote(lambda a: a.plan))
    return ray.get([a.__ray_call__.remote(read, plan) for a in learners.actors])[0]


def rollout_weights(rollout, names) -> list[dict[str, torch.Tensor]]:
    import ray

    def read(actor_self):
        params = dict(actor_self.model.named_parameters())
        return {n: params[n].detach().clone() for n in names}

    return ray.get([a.__ray_call__.remote(read) for a in rollout.actors])


@pytest.mark.parametrize("zero,transport", [(2, "shm"), (3, "shm"), (2, "gloo"), (3, "gloo")])
def test_weight_sync_makes_rollout_weights_bit_equal(local_ray, tiny_model_dir,
                                                     benchmark_manifest, tmp_path, zero,
                                                     transport):
    """2 learner ranks (ZeRO-2 or ZeRO-3: full tensors gathered bucket by bucket, not shards)
    -> 2 rollout actors, through the loop's own WeightSync: after a step's sync every rollout
    actor holds the learners' weights bit for bit; after an update without a sync it does not,
    and the digest check says so."""
    from rollout.pool import RolloutPool
    from umerl.model.sampling import SamplingParams
    from umerl.rl import RolloutStream, WeightSync, load_rl_datasets, rl_step
    from umerl.train.learner import LearnerPool, StepShard
    from umerl.train.sft_data import ContrastiveBatcher

    cfg = rl_config(tmp_path / "sync", benchmark_manifest.parent, "learner.num_workers=2",
                    f"learner.zero_stage={zero}", "rollout.num_workers=2",
                    "rollout.cpus_per_worker=0.25", "learner.cpus_per_worker=0.25",
                    f"rl.weight_sync_transport={transport}", "rl.weight_sync_bucket_mb=0.1")
    learners = LearnerPool(cfg, str(tiny_model_dir), str(tiny_model_dir))
    rollout = RolloutPool(cfg.rollout, str(tiny_model_dir))
    try:
        link = WeightSync.connect(cfg, learners, rollout)
        assert link.transport == transport and len(link.plan.buckets) > 2
        link.sync(digest=True)
        sampler = ContrastiveBatcher(load_rl_datasets(cfg, str(tiny_model_dir)), 2, seed=0)
        start = learner_weights(learners)
        stream = RolloutStream(cfg, sampler, rollout, SamplingParams(max_new_tokens=8))
        metrics = rl_step(cfg, 1, stream, learners, link)
        assert metrics["weight_sync/bytes"] == link.plan.bytes > 0
        assert metrics["timing/weight_sync"] > 0 and metrics["weight_sync/gb_per_s"] > 0
        updated = learner_weights(learners)
        assert all(t.numel() > 0 for t in updated.values())  # full tensors, not (0,) shards
        assert any(not torch.equal(updated[n], start[n]) for n in updated)
        for held in rollout_weights(rollout, list(updated)):
            assert all(torch.equal(held[n], updated[n]) for n in updated)
        # an update the rollout never receives: the digests disagree and the check says so
        _, pairs = sampler.next_batch()
        shards = [StepShard(2, pairs[i:i + 1], i, [[[5, 6]] * 2], [[[7, 8]] * 2])
                  for i in (0, 1)]
        learners.step(shards)
        assert any(not torch.equal(learner_weights(learners)[n], updated[n]) for n in updated)
        link.sync(digest=True)  # ... until the next sync, which checks them again
        for held in rollout_weights(rollout, list(updated)):
            assert all(torch.equal(held[n], t) for n, t in learner_weights(learners).items())
    finally:
        rollout.shutdown()
        learners.shutdown()


@pytest.mark.parametrize("restarts", [0, 1])
def test_a_rollout_actor_killed_before_a_sync(local_ray, tiny_model_dir, benchmark_manifest,
                                              tmp_path, restarts):
    """A receiver gone mid-run. With no restart budget the sync raises a one-line WorkerError
    naming the dead actor, within rl.weight_sync_timeout_s, instead of hanging in the
    collective; with one, the actor is replaced, the group re-formed and the replacement
    synced until its digest matches the learners'."""
    import time

    import ray

    from rollout.pool import RolloutPool
    from umerl.rl import WeightSync
    from umerl.runtime.remote import WorkerError
    from umerl.train.learner import LearnerPool

    cfg = rl_config(tmp_path / "kill", benchmark_manifest.parent, "learner.num_workers=1",
                    "rollout.num_workers=2", "rl.weight_sync_timeout_s=20",
                    f"rollout.max_restarts={restarts}")
    learners = LearnerPool(cfg, str(tiny_model_dir), str(tiny_model_dir))
    rollout = RolloutPool(cfg.rollout, str(tiny_model_dir))
    try:
        link = WeightSync.connect(cfg, learners, rollout)
        link.sync(digest=True)
        first = link.digest
        old = rollout.actors[1]
        ray.kill(old)
        start = time.monotonic()
        if restarts == 0:
            with pytest.raises(WorkerError) as err:
                link.sync(step=1)
            assert time.monotonic() - start < 20 + 5
            assert str(err.value).startswith("rollout actor 1: actor died")
            assert "rollout.max_restarts=0" in str(err.value) and "\n" not in str(err.value)
        else:
            link.sync(step=1)
            assert rollout.actors[1] is not old and rollout.restarts == 1
            assert not rollout.stale and link.digest == first  # re-synced, digest-checked
    finally:
        rollout.shutdown()
        learners.shutdown()


def test_resume_continues_at_the_right_step_with_the_right_data(
        local_ray, tiny_model_dir, benchmark_manifest, tmp_path, capsys):
    straight = rl_config(tmp_path / "straight", benchmark_manifest.parent, "rl.max_steps=3")
    uninterrupted = determined(run_logged(straight, tiny_model_dir)[0])
    assert [step for step, _ in uninterrupted] == [1, 2, 3]

    stopped = rl_config(tmp_path / "stopped", benchmark_manifest.parent, "rl.max_steps=2")
    run_logged(stopped, tiny_model_dir)
    capsys.readouterr()
    resumed_cfg = rl_config(tmp_path / "stopped", benchmark_manifest.parent, "rl.max_steps=3")
    resumed, _ = run_logged(resumed_cfg, tiny_model_dir)
    out = capsys.readouterr().out
    assert "resumed from" in out and "step_00000002" in out
    # same weights after step 2, same pairs and seeds at step 3: the same rewards
    assert determined(resumed) == uninterrupted[2:]


def test_learner_pool_size_does_not_change_rewards(local_ray, tiny_model_dir,
                                                   benchmark_manifest, tmp_path):
    """The reverse: 1 or 2 learner ranks (rollout pool fixed) score the same rollouts alike.
    After one update the two runs' weights differ by float rounding (the data-parallel
    reduction order), so the comparison is on the first step, from identical weights."""
    rewards = {}
    for n in (1, 2):
        cfg = rl_config(tmp_path / f"l{n}", benchmark_manifest.parent,
                        f"learner.num_workers={n}", "rl.max_steps=1")
        rewards[n] = determined(run_logged(cfg, tiny_model_dir)[0], REWARDS)
    assert [step for step, _ in rewards[1]] == [step for step, _ in rewards[2]] == [1]
    # One rank embeds all rows in one batch, two embed half each: float32 rounding apart.
    assert rewards[2][0][1] == pytest.approx(rewards[1][0][1], rel=0, abs=1e-6)


def test_zero3_learners_sync_save_and_resume(local_ray, tiny_model_dir, benchmark_manifest,
                                             tmp_path):
    """2 ZeRO-3 learner ranks: the rollout actor's weights equal the gathered (not the sharded)
    learner weights bit for bit (run_rl checks the digests at start and end, and raises
    otherwise), checkpoints hold full tensors, and a resumed run continues exactly."""
    from safetensors.torch import load_file

    zero3 = ("learner.num_workers=2", "learner.zero_stage=3", "rollout.num_workers=1")
    straight = rl_config(tmp_path / "z3", benchmark_manifest.parent, "rl.max_steps=3", *zero3)
    uninterrupted = determined(run_logged(straight, tiny_model_dir)[0])
    assert [step for step, _ in uninterrupted] == [1, 2, 3]
    stopped = rl_config(tmp_path / "z3s", benchmark_manifest.parent, "rl.max_steps=2", *zero3)
    _, final = run_logged(stopped, tiny_model_dir)
    exported = load_file(final / "model.safetensors")
    start = load_file(tiny_model_dir / "model.safetensors")
    assert all(t.numel() > 0 for t in exported.values())  # not the (0,)-shaped shards
    # (the embedding rows grow by the two embedding tokens added on load)
    assert all(exported[k].shape == start[k].shape for k in start
               if k in exported and "embed_tokens" not in k and "lm_head" not in k)
    assert any(not torch.equal(exported[k], start[k]) for k in start if k in exported)
    resumed = rl_config(tmp_path / "z3s", benchmark_manifest.parent, "rl.max_steps=3", *zero3)
    assert determined(run_logged(resumed, tiny_model_dir)[0]) == uninterrupted[2:]
