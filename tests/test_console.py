"""The RL stage's console line, the one place a test reads it: the other RL tests read the
recorded metrics (umerl.runtime.tracking.MemoryTracker), whatever the console prints."""

from __future__ import annotations

from umerl.rl import CONSOLE_KEYS, COUNTS, _console_line

TIMED = "rollout 0.3s learner 1.0s weight_sync 0.0s step 1.4s"
TIMINGS = {"timing/rollout": 0.31, "timing/learner": 1.04, "timing/weight_sync": 0.02,
           "timing/step": 1.37}


def test_the_rl_step_line_shows_every_console_metric_then_timings_and_idle():
    metrics = {**{key: 0.1234 + n for n, key in enumerate(CONSOLE_KEYS)}, **TIMINGS,
               "rollout/idle_ratio": 0.456, "learner/idle_ratio": 0.0,
               "actor/lr": 1e-3}  # logged, not shown
    values = " ".join(f"{label} {n + 0.1234:.0f}" if key in COUNTS else
                      f"{label} {n + 0.123:.3f}"
                      for n, (key, label) in enumerate(CONSOLE_KEYS.items()))
    assert _console_line(3, 5, metrics) == (
        f"[rl] step 3/5 {values} | {TIMED} rollout_idle 0.46 learner_idle 0.00")


def test_a_metric_the_step_did_not_log_is_left_out():
    line = _console_line(1, 1, {"reward/total": 0.5, **TIMINGS})
    assert line == f"[rl] step 1/1 total 0.500 | {TIMED}"


def test_a_skipped_update_is_said_on_its_step_line():
    """A step whose loss or gradient was not finite applied no update: its line says so (the
    reward columns alone would look like an ordinary step)."""
    skipped = {"reward/total": 0.5, **TIMINGS, "actor/update_skipped": 1.0,
               "actor/skipped_steps": 2.0}
    assert _console_line(4, 9, skipped) == (
        f"[rl] step 4/9 total 0.500 | {TIMED} | update skipped: loss or gradient not finite "
        "(2 so far)")
    applied = {**skipped, "actor/update_skipped": 0.0}
    assert _console_line(4, 9, applied) == f"[rl] step 4/9 total 0.500 | {TIMED}"


def test_the_rollout_pool_size_is_on_the_step_line():
    """An elastic pool's size per step, as a count, after the staleness."""
    line = _console_line(2, 4, {"reward/total": 0.5, "rollout/staleness": 0.0,
                                "rollout/pool_size": 3.0, **TIMINGS})
    assert line == f"[rl] step 2/4 total 0.500 stale 0.000 pool 3 | {TIMED}"
