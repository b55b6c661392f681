"""`ray job submit` of the CPU recipe to a cluster started with `ray start --head` on loopback,
exactly as docs/cluster.md shows (shortened: a few SFT and GRPO steps, two tasks evaluated); and a
job whose driver is SIGKILLed mid-RL, submitted again, continuing exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from processes import kill_session

from umerl.train.dist import free_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def cluster_env() -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def head_node():
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.fail("the ray CLI is missing from the virtual environment")
    env = cluster_env()
    # Ray puts unix sockets under its temp dir: keep the path short (sockets max ~107 chars).
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    # Free ports, not Ray's fixed defaults: with another Ray on the machine holding the
    # dashboard agent's 52365, this head's agent could not listen and every job submission
    # was answered "No available agent to submit job".
    gcs, dashboard, agent = free_port(), free_port(), free_port()
    start = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
             "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port",
             str(dashboard), "--dashboard-agent-listen-port", str(agent), "--num-cpus", "2",
             "--include-dashboard", "true", "--disable-usage-stats", "--temp-dir", temp_dir]
    # Its own session: the teardown stops this cluster's processes only (`ray stop` would
    # stop every Ray on the machine, a user's job beside the tests included).
    head = subprocess.Popen(start, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert head.wait(timeout=180) == 0, "ray start --head failed"
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        kill_session(head.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def clean_job(head_node, tiny_model_dir, benchmark_manifest, tmp_path_factory
              ) -> Path:
    """One uninterrupted job through `ray job submit`, with an evaluation at the end: the
    first test checks what it wrote, the killed job's test compares its steps to it."""
    out = tmp_path_factory.mktemp("clean-job") / "job"
    submit(head_node, out, tiny_model_dir, benchmark_manifest.parent,
           "eval.enabled=true", "eval.tasks=[digits_cls]", "eval.max_new_tokens=8",
           "eval.before=false", "eval.pass_k=[1]")
    return out


def test_ray_job_submit_runs_the_recipe(head_node, clean_job):
    from ray.job_submission import JobSubmissionClient

    out = clean_job
    jobs = [job for job in JobSubmissionClient(head_node).list_jobs()
            if f"output_dir={out} " in job.entrypoint]
    assert [job.status for job in jobs] == ["SUCCEEDED"]
    assert [m["step"] for m in rl_lines(out)] == [1, 2, 3, 4, 5, 6]
    assert (out / "rl" / "latest").is_file() and (out / "sft" / "latest").is_file()
    summary = json.loads((out / "eval" / "rl" / "summary.json").read_text())
    assert set(summary["tasks"]) == {"digits_cls"}


def submit(head: str, out: Path, tiny_model_dir: Path, benchmark_dir: Path, *overrides: str,
           wait: bool = True) -> subprocess.CompletedProcess:
    command = [
        str(BIN / "ray"), "job", "submit", "--address", head, "--working-dir", str(REPO),
        *([] if wait else ["--no-wait"]), "--", "python", "-m", "umerl.cli", "train",
        "recipes/cpu_tiny.yaml", f"output_dir={out}", f"model.path={tiny_model_dir}",
        f"data.benchmark_dir={benchmark_dir}",
        "data.benchmark_rl_extra.digits_cls=0", "sft.max_steps=2", "sft.micro_batch_size=4",
        "rl.max_steps=6", "rl.save_every=3", "rl.pairs_per_step=2", "rl.group_size=2",
        "rl.max_new_tokens=8", "eval.enabled=false", *overrides,
    ]
    proc = subprocess.run(command, env=cluster_env(), capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc


def rl_lines(out: Path) -> list[dict]:
    path = out / "metrics" / "rl.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def kill_driver_after(head: str, out: Path, rl_step: int) -> None:
    """SIGKILL the driver of the job writing ``out`` once its RL stage has logged ``rl_step``."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head)
    deadline = time.monotonic() + 600
    driver = None
    while not any(m["step"] >= rl_step for m in rl_lines(out)):
        assert time.monotonic() < deadline, f"RL step {rl_step} never came"
        if driver is None:  # found before the kill, which then comes at once
            running = [job for job in client.list_jobs() if job.status == "RUNNING"
                       and str(out) in job.entrypoint and job.driver_info]
            driver = running[0] if running else None
        time.sleep(0.05)
    assert driver is not None, "no running job writes " + str(out)
    os.kill(int(driver.driver_info.pid), signal.SIGKILL)
    while client.get_job_status(driver.submission_id) == "RUNNING":
        assert time.monotonic() < deadline, "the killed job still reads as running"
        time.sleep(0.5)


def test_a_killed_job_submitted_again_continues_exactly(head_node, clean_job, tiny_model_dir,
                                                        benchmark_manifest, tmp_path):
    bench = benchmark_manifest.parent
    clean, killed = clean_job, tmp_path / "killed"
    submit(head_node, killed, tiny_model_dir, bench, wait=False)
    kill_driver_after(head_node, killed, rl_step=4)  # RL checkpoint at step 3
    submit(head_node, killed, tiny_model_dir, bench)
    steps = [m["step"] for m in rl_lines(killed)]
    assert steps[:4] == [1, 2, 3, 4] and steps.count(1) == 1 and 4 in steps[4:], steps
    keys = ("reward/total", "reward/format", "reward/embedding", "reward/rank_score",
            "actor/kl", "actor/policy_loss")
    assert ({m["step"]: [m[k] for k in keys] for m in rl_lines(killed)}
            == {m["step"]: [m[k] for k in keys] for m in rl_lines(clean)})
