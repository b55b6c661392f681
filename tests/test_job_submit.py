"""`ray job submit` of the CPU recipe to a cluster started with `ray start --head` on loopback,
exactly as the README shows (shortened: a few SFT and GRPO steps, two tasks evaluated)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def cluster_env() -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture()
def head_node():
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.fail("the ray CLI is missing from the virtual environment")
    env = cluster_env()
    # Ray puts unix sockets under its temp dir: keep the path short (sockets max ~107 chars).
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    start = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
             "--port", "6391", "--dashboard-host", "127.0.0.1", "--dashboard-port", "8271",
             "--num-cpus", "2", "--include-dashboard", "true", "--disable-usage-stats",
             "--temp-dir", temp_dir]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
    try:
        yield "http://127.0.0.1:8271"
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True,
                       timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_recipe(head_node, tiny_model_dir, benchmark_manifest,
                                        tmp_path):
    out = tmp_path / "job"
    command = [
        str(BIN / "ray"), "job", "submit", "--address", head_node, "--working-dir", str(REPO),
        "--", "python", "-m", "umerl.cli", "train", "recipes/cpu_tiny.yaml",
        f"output_dir={out}", f"model.path={tiny_model_dir}",
        f"data.benchmark_dir={benchmark_manifest.parent}", "sft.max_steps=2",
        "sft.micro_batch_size=4", "rl.max_steps=2", "rl.pairs_per_step=2", "rl.group_size=2",
        "rl.max_new_tokens=8", "eval.tasks=[digits_cls]", "eval.max_new_tokens=8",
        "eval.before=false", "eval.pass_k=[1]",
    ]
    proc = subprocess.run(command, env=cluster_env(), capture_output=True, text=True,
                          timeout=1200)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert "succeeded" in output
    assert "[driver] RL checkpoint" in output
    logged = [json.loads(line)["step"] for line in
              (out / "metrics" / "rl.jsonl").read_text().splitlines()]
    assert logged == [1, 2]
    assert (out / "rl" / "latest").is_file() and (out / "sft" / "latest").is_file()
