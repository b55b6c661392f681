"""The whole job killed (driver and its local Ray, SIGKILL, no cleanup) mid-SFT and again mid-RL,
then the same command run again: each stage continues from its last checkpoint and every step's
losses and rewards equal those of a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from processes import kill_session, session_pids

REPO = Path(__file__).resolve().parent.parent
# What each stage must reproduce exactly after the kill (timings and throughput may differ).
SFT_KEYS = ("sft/loss", "sft/gen_nce", "sft/disc_nce", "sft/query_ce", "sft/target_ce",
            "sft/lr")
RL_KEYS = ("reward/total", "reward/format", "reward/embedding", "reward/rank_score",
           "actor/kl", "actor/policy_loss")


def command(out: Path, tiny_model_dir: Path, benchmark_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "umerl.cli", "train", str(REPO / "recipes" / "cpu_tiny.yaml"),
        f"output_dir={out}", f"model.path={tiny_model_dir}", f"data.benchmark_dir={benchmark_dir}",
        "data.benchmark_rl_extra.digits_cls=0",
        "eval.enabled=false", "ray.num_cpus=2", "sft.max_steps=6", "sft.save_every=3",
        "sft.log_every=1", "sft.micro_batch_size=4", "rl.max_steps=6", "rl.save_every=3",
        "rl.pairs_per_step=2", "rl.group_size=2", "rl.max_new_tokens=8",
    ]


def env() -> dict[str, str]:
    out = {**os.environ, "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu",
           "PYTHONUNBUFFERED": "1"}
    out.pop("RAY_ADDRESS", None)
    return out


def logged_steps(out: Path, stage: str) -> list[dict]:
    path = out / "metrics" / f"{stage}.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_to_end(out: Path, argv: list[str]) -> None:
    proc = subprocess.run(argv, cwd=out.parent, env=env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


def run_and_kill(out: Path, argv: list[str], stage: str, after_step: int) -> None:
    """Start the job in its own session and SIGKILL every process of that session once
    ``stage`` has logged ``after_step``: the driver, the local Ray it started and every Ray
    worker at once."""
    proc = subprocess.Popen(argv, cwd=out.parent, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while not any(m["step"] >= after_step for m in logged_steps(out, stage)):
            assert proc.poll() is None, f"the job ended before {stage} step {after_step}"
            assert time.monotonic() < deadline, f"{stage} step {after_step} never came"
            time.sleep(0.05)
    finally:
        kill_session(proc.pid)  # every process gone, so the rerun starts a local Ray of its own
        proc.wait(timeout=60)


def last_per_step(lines: list[dict], keys: tuple[str, ...]) -> dict[int, tuple]:
    return {m["step"]: tuple(m.get(k) for k in keys) for m in lines}


def test_a_killed_job_run_again_continues_exactly(tmp_path, tiny_model_dir, benchmark_manifest):
    bench = benchmark_manifest.parent
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    run_to_end(clean, command(clean, tiny_model_dir, bench))
    argv = command(killed, tiny_model_dir, bench)
    run_and_kill(killed, argv, "sft", after_step=4)  # SFT checkpoint at step 3
    run_and_kill(killed, argv, "rl", after_step=4)  # RL checkpoint at step 3
    run_to_end(killed, argv)

    sft, rl = logged_steps(killed, "sft"), logged_steps(killed, "rl")
    # Each rerun took up where the last checkpoint left off, not from step 1.
    sft_order, rl_order = [m["step"] for m in sft], [m["step"] for m in rl]
    assert sft_order[:4] == [1, 2, 3, 4] and sft_order.count(1) == 1, sft_order
    assert 4 in sft_order[4:] and sft_order[-1] == 6, sft_order
    assert rl_order[:4] == [1, 2, 3, 4] and rl_order.count(1) == 1, rl_order
    assert 4 in rl_order[4:] and rl_order[-1] == 6, rl_order
    # ... and every step equals the uninterrupted run's.
    assert last_per_step(sft, SFT_KEYS) == last_per_step(logged_steps(clean, "sft"), SFT_KEYS)
    assert last_per_step(rl, RL_KEYS) == last_per_step(logged_steps(clean, "rl"), RL_KEYS)


def interrupt(out: Path, argv: list[str], stage: str, after_step: int) -> int:
    """Start the job in its own session, press Ctrl-C (SIGINT to its process group, as a
    terminal sends it) once ``stage`` has logged ``after_step``; assert it exits with 130
    within 30 s and leaves no process behind (its local Ray and every worker gone). Returns
    the stage's last logged step."""
    proc = subprocess.Popen(argv, cwd=out.parent, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not any(m["step"] >= after_step for m in logged_steps(out, stage)):
            assert proc.poll() is None, f"the job ended before {stage} step {after_step}"
            assert time.monotonic() < deadline, f"{stage} step {after_step} never came"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        sent = time.monotonic()
        assert proc.wait(timeout=60) == 130
        assert time.monotonic() - sent < 30
        while session_pids(proc.pid):
            assert time.monotonic() - sent < 60, f"left running: {session_pids(proc.pid)}"
            time.sleep(0.2)
    finally:
        kill_session(proc.pid)
    return max(m["step"] for m in logged_steps(out, stage))


def resumed_from_a_checkpoint(steps: list[int], stopped_at: int, every: int) -> bool:
    """The run logged 1..stopped_at, then (rerun) went on from a checkpoint's next step."""
    first, rest = steps[:stopped_at], steps[stopped_at:]
    return (first == list(range(1, stopped_at + 1)) and bool(rest) and rest[0] > 1
            and (rest[0] - 1) % every == 0 and rest[0] <= stopped_at + 1)


def test_ctrl_c_stops_the_job_promptly_and_a_rerun_resumes(tmp_path, tiny_model_dir,
                                                           benchmark_manifest):
    """Ctrl-C mid-SFT and again mid-RL of one ``umerl train``: each time the job exits with
    130 and takes its local Ray with it, and the same command continues from the stage's last
    checkpoint. (Ray Train's fit() used to keep its own SIGINT handler after SFT, so Ctrl-C
    mid-RL was lost and the run went on to its end, exit 0.)"""
    out = tmp_path / "run"
    argv = [*command(out, tiny_model_dir, benchmark_manifest.parent), "sft.max_steps=60",
            "rl.max_steps=12"]
    sft_stop = interrupt(out, argv, "sft", after_step=4)
    assert sft_stop < 60  # stopped mid-stage, not after it
    rl_stop = interrupt(out, argv, "rl", after_step=4)
    assert rl_stop < 12
    run_to_end(out, argv)
    sft = [m["step"] for m in logged_steps(out, "sft")]
    rl = [m["step"] for m in logged_steps(out, "rl")]
    assert resumed_from_a_checkpoint(sft, sft_stop, every=3) and sft[-1] == 60, sft
    assert resumed_from_a_checkpoint(rl, rl_stop, every=3) and rl[-1] == 12, rl
