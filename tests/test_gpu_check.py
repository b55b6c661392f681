"""scripts/gpu_check.py, run here with the device set to CPU: the checks a GPU owner runs cannot
rot unseen (same script, same assertions, DeepSpeed's CPU accelerator instead of CUDA)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.py"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=600, cwd="/")  # from anywhere, not installed


def test_gpu_check_passes_every_check_on_cpu(tmp_path: Path) -> None:
    done = run("--device", "cpu", "--out", str(tmp_path))
    lines = done.stdout.splitlines()
    checks = [line for line in lines if line.startswith(("[ok]", "[FAIL]"))]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(checks) == 23 and all(line.startswith("[ok]") for line in checks), checks
    for part in ("ZeRO-2 SFT loss finite and falling", "ZeRO-3 SFT export equals the live",
                 "checkpointing recomputes layers", "learner reference on the policy's device",
                 "ZeRO-3 learner weights for rollouts",
                 "ZeRO-3 reference log-probs equal the full copy",
                 "ZeRO-2 shared prompt shared-prompt forward equals whole rows",
                 "chunked log-probs fp32 equal the full log_softmax",
                 "ZeRO-2 learner step peak memory"):
        assert any(part in line for line in checks), part
    assert "23 passed, 0 failed" in lines[-1]
    # the one-screen report between two rules: header, column titles, one row per check
    rules = [i for i, line in enumerate(lines) if line.startswith("=" * 40)]
    assert len(rules) == 2 and rules[1] == len(lines) - 2, lines[-30:]
    table = lines[rules[0] + 1:rules[1]]
    assert len(table) == 3 + 23 and all(len(line) <= 120 for line in table), table
    assert table[0].startswith("gpu_check report: CPU, Python") and "deepspeed" in table[0]
    assert "23 checks in" in table[1] and "GiB resident" in table[1]
    rows = table[3:]
    assert all(row.split()[-1] != "FAIL" and "  PASS  " in row for row in rows), rows
    assert rows[0].startswith("ZeRO-2 SFT loss finite and falling") and rows[-1].startswith(
        "ZeRO-2 learner step peak memory")
    chunked = next(row for row in rows if row.startswith("chunked log-probs fp32 equal"))
    assert "512 tokens x vocab 4096" in chunked


def test_gpu_check_without_deepspeed_names_the_bundle() -> None:
    # deepspeed hidden (None in sys.modules: find_spec and import both fail), as on a GPU
    # machine that has only torch and transformers
    code = ("import runpy, sys; sys.modules['deepspeed'] = None; "
            f"sys.argv = [{str(SCRIPT)!r}, '--device', 'cpu']; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300, cwd="/")
    assert done.returncode == 1, done.stdout + done.stderr[-2000:]
    assert "deepspeed not installed here" in done.stdout
    assert "scripts/device_bundle.sh" in done.stdout and "--no-index" in done.stdout
    assert "Traceback" not in done.stderr


def test_gpu_check_refuses_a_transformers_older_than_the_learners_need() -> None:
    """A transformers whose Qwen2-VL forward takes no mm_encoder_outputs (5.17, the device
    machine's own, drops the learners' images) is named, with the bundle that carries a newer
    one, before any check runs. The stand-in forward has 5.17's signature shape."""
    code = ("import runpy, sys, transformers; "
            "transformers.Qwen2VLModel.forward = lambda self, input_ids=None, **kwargs: None; "
            f"sys.argv = [{str(SCRIPT)!r}, '--device', 'cpu']; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300, cwd="/")
    assert done.returncode == 1, (done.stdout + done.stderr[-2000:])
    assert "Qwen2VLModel.forward takes no mm_encoder_outputs" in done.stdout
    assert "transformers>=5.18,<5.20" in done.stdout
    assert "scripts/device_bundle.sh" in done.stdout and "Traceback" not in done.stderr


def test_gpu_check_without_cuda_checks_nothing_and_says_so() -> None:
    done = run()
    assert done.returncode == 0
    assert "no CUDA device here; nothing checked" in done.stdout
