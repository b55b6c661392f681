"""Failure handling with real Ray actors and real SIGKILLs (``faults.kill``): a dead rollout
actor costs the run nothing (same rewards as an uncrashed run), the restart budget is enforced,
and a dead learner restarts the stage from its last complete checkpoint. Stalls
(``faults.stall``): a hung learner is killed and restarted the same way, and a slow rollout
actor is not charged for the share it queues."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from test_rl import determined, rl_config, run_logged

from umerl.runtime.faults import Fault, for_actor, parse_fault
from umerl.runtime.remote import WorkerError


def test_fault_specs_parse_and_name_what_is_wrong():
    assert parse_fault("rollout/1/3/generate") == Fault("rollout", 1, 3, "generate")
    assert str(parse_fault("learner/0/4/save")) == "learner/0/4/save"
    for bad, words in [("rollout/1/3", "ACTOR/INDEX/STEP/PHASE"), ("gpu/0/1/update", "actor"),
                       ("rollout/x/1/generate", "INDEX"), ("rollout/0/0/generate", "STEP"),
                       ("learner/0/2/generate", "learner phase")]:
        with pytest.raises(ValueError, match=words):
            parse_fault(bad)
    faults = [parse_fault(t) for t in ("rollout/1/3/generate", "rollout/1/6/generate",
                                       "rollout/0/2/weight_sync")]
    assert for_actor(faults, "rollout", 1, after_step=3) == [faults[1]]  # fired ones drop out


def test_a_bad_fault_spec_is_a_config_error_naming_the_key(tmp_path):
    from umerl.config.origins import ConfigError
    from umerl.config.recipe import load_recipe

    with pytest.raises(ConfigError, match=r"faults\.kill.*entry \[0\].*rollout phase"):
        load_recipe(None, [f"output_dir={tmp_path}", "faults.kill=[rollout/0/2/update]"])
    with pytest.raises(ConfigError, match=r"rollout 5, but rollout.num_workers = 2"):
        load_recipe(None, [f"output_dir={tmp_path}", "faults.kill=[rollout/5/2/generate]"])
    with pytest.raises(ConfigError, match=r"after rl.max_steps = 3"):
        load_recipe(None, [f"output_dir={tmp_path}", "rl.max_steps=3",
                           "faults.kill=[learner/0/9/save]"])
    with pytest.raises(ConfigError, match=r"faults\.stall.*learner stall fires in update only"):
        load_recipe(None, [f"output_dir={tmp_path}", "faults.stall=[learner/0/2/save]"])
    for key in ("learner.step_timeout_s", "rl.reward_timeout_s", "faults.stall_s"):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_recipe(None, [f"output_dir={tmp_path}", f"{key}=0"])
    # A driver-side timeout must outlast a failed sync's own (which names the stuck worker).
    for key in ("learner.step_timeout_s", "rollout.call_timeout_s"):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.") + r"=300'\) = 300 must "
                           r"be above 'rl\.weight_sync_timeout_s' \(from defaults .*\) = 300"):
            load_recipe(None, [f"output_dir={tmp_path}", f"{key}=300"])
    load_recipe(None, [f"output_dir={tmp_path}", "rollout.call_timeout_s=301"])


RUN = ("rl.max_steps=6", "rl.save_every=2", "rollout.num_workers=2", "learner.num_workers=2")


@pytest.fixture(scope="module")
def uncrashed(local_ray, tiny_model_dir, benchmark_manifest, tmp_path_factory):
    cfg = rl_config(tmp_path_factory.mktemp("uncrashed"), benchmark_manifest.parent, *RUN)
    logged = determined(run_logged(cfg, tiny_model_dir)[0])
    assert [step for step, _ in logged] == [1, 2, 3, 4, 5, 6]
    return logged


@pytest.mark.parametrize("fault", ["rollout/1/3/generate", "rollout/0/3/weight_sync"])
def test_a_rollout_actor_killed_mid_step_costs_nothing(local_ray, tiny_model_dir,
                                                      benchmark_manifest, tmp_path, capsys,
                                                      uncrashed, fault):
    cfg = rl_config(tmp_path, benchmark_manifest.parent, *RUN, f"faults.kill=[{fault}]")
    tracker, _ = run_logged(cfg, tiny_model_dir)
    out = capsys.readouterr().out
    actor = fault.split("/")[1]
    phase = fault.split("/")[3]
    assert f"rollout actor {actor} failed during {phase} at step 3" in out
    assert "restart 1 of 3" in out
    assert [m["fault/rollout_restarts"] for _, m in tracker.logged] == [0, 0, 1, 1, 1, 1]
    assert determined(tracker) == uncrashed  # all 6 steps, each with the uncrashed run's rewards


def test_more_kills_than_max_restarts_is_a_clear_error(local_ray, tiny_model_dir,
                                                       benchmark_manifest, tmp_path):
    from umerl.rl import run_rl

    cfg = rl_config(tmp_path, benchmark_manifest.parent, *RUN, "rollout.max_restarts=1",
                    "faults.kill=[rollout/1/2/generate,rollout/0/4/generate]")
    with pytest.raises(WorkerError) as err:
        run_rl(cfg, str(tiny_model_dir), str(tiny_model_dir))
    assert str(err.value).startswith("rollout actor 0")
    assert "rollout.max_restarts=1" in str(err.value) and "step 4" in str(err.value)


@pytest.mark.parametrize("fault", ["learner/1/4/update", "learner/0/4/save"])
def test_a_dead_learner_restarts_the_stage_from_its_last_checkpoint(
        local_ray, tiny_model_dir, benchmark_manifest, tmp_path, capsys,
        uncrashed, fault):
    """Killed in step 4's update, or halfway through step 4's checkpoint (which must not be
    used): the stage restarts from step 2's checkpoint and steps 3-6 repeat the uncrashed
    run's rewards exactly."""
    from umerl.train import checkpoint as ckpt

    cfg = rl_config(tmp_path, benchmark_manifest.parent, *RUN, "rl.max_failures=1",
                    f"faults.kill=[{fault}]")
    tracker, final = run_logged(cfg, tiny_model_dir)
    out = capsys.readouterr().out
    assert "restarting the RL stage from its last complete checkpoint (restart 1 of 1)" in out
    assert "resumed from" in out and "step_00000002" in out
    logged = determined(tracker)
    # a kill in the update comes before step 4 is logged; one in the save, after
    before = [1, 2, 3] if fault.endswith("update") else [1, 2, 3, 4]
    assert [step for step, _ in logged] == [*before, 3, 4, 5, 6]
    assert logged[:len(before)] == uncrashed[:len(before)]  # before the kill
    assert logged[len(before):] == uncrashed[2:]  # after the restart, from step 3: identical
    assert final.name == "step_00000006" and ckpt.verify(final) == final


def test_a_learner_death_beyond_max_failures_fails_the_stage(
        local_ray, tiny_model_dir, benchmark_manifest, tmp_path):
    from umerl.rl import run_rl

    cfg = rl_config(tmp_path, benchmark_manifest.parent, "rl.max_steps=2",
                    "rl.max_failures=0", "faults.kill=[learner/0/1/update]")
    with pytest.raises(WorkerError) as err:
        run_rl(cfg, str(tiny_model_dir), str(tiny_model_dir))
    assert str(err.value).startswith("learner rank 0") and "rl.max_failures=0" in str(err.value)


def within(seconds: float, run: Callable[[], Any]) -> Any:
    """``run()``'s result, or a failed test if it has not returned after ``seconds`` (a hang
    is a failure, not a stuck test run)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = run()
        except BaseException as err:  # noqa: BLE001 - re-raised below
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds:g} s: a hang"
    if "error" in box:
        raise box["error"]
    return box["result"]


def test_a_hung_learner_is_killed_and_the_stage_restarts_from_its_checkpoint(
        local_ray, tiny_model_dir, benchmark_manifest, tmp_path, capsys, uncrashed):
    """Learner rank 1 sleeps an hour in step 4's update (rank 0 waits for it in the update's
    collective): after learner.step_timeout_s the driver kills both and restarts the stage
    from step 2's checkpoint, as for a learner that died; steps 3-6 repeat the uncrashed
    run's rewards exactly."""
    cfg = rl_config(tmp_path, benchmark_manifest.parent, *RUN, "rl.max_failures=1",
                    "learner.step_timeout_s=30", "rl.weight_sync_timeout_s=20",
                    "faults.stall=[learner/1/4/update]")
    start = time.monotonic()
    tracker, final = within(400, lambda: run_logged(cfg, tiny_model_dir))
    out = capsys.readouterr().out
    assert "no answer within learner.step_timeout_s=30 s" in out
    assert "restarting the RL stage from its last complete checkpoint (restart 1 of 1)" in out
    logged = determined(tracker)
    assert [step for step, _ in logged] == [1, 2, 3, 3, 4, 5, 6]
    assert logged[:3] == uncrashed[:3] and logged[3:] == uncrashed[2:]
    assert final.name == "step_00000006"
    print(f"hung learner: run with restart took {time.monotonic() - start:.0f} s")


def test_a_share_queued_behind_a_slow_actor_is_not_charged_for_the_wait(
        local_ray, tiny_model_dir, benchmark_manifest, tmp_path):
    """Step 2: rollout actor 0 dies, and actor 1 is slow (each generate call of step 2 sleeps
    8 s before generating: slow, not hung). Actor 0's share goes to actor 1, behind its own.
    Counted from dispatch, it would pass rollout.call_timeout_s=14 (dispatched ~0 s, done
    ~16 s) and actor 1 would be killed too, leaving no healthy actor; counted from when actor
    1 starts it, each call takes ~8 s: one restart, the run completes. (6 s for the generation
    itself: 3 s failed once on a loaded machine.)"""
    cfg = rl_config(tmp_path, benchmark_manifest.parent, "rl.max_steps=2",
                    "rollout.num_workers=2", "learner.num_workers=1",
                    "rollout.call_timeout_s=14", "rl.weight_sync_timeout_s=5",
                    "faults.kill=[rollout/0/2/generate]",
                    "faults.stall=[rollout/1/2/generate]", "faults.stall_s=8")
    tracker, _ = within(300, lambda: run_logged(cfg, tiny_model_dir))
    assert [m["fault/rollout_restarts"] for _, m in tracker.logged] == [0, 1]
    assert tracker.logged[1][1]["timing/rollout"] >= 16  # both shares ran on actor 1, in turn
