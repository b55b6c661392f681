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
    assert len(checks) == 21 and all(line.startswith("[ok]") for line in checks), checks
    for part in ("ZeRO-2 SFT loss finite and falling", "ZeRO-3 SFT export equals the live",
                 "checkpointing recomputes layers", "learner reference on the policy's device",
                 "ZeRO-3 learner weights for rollouts",
                 "ZeRO-3 reference log-probs equal the full copy",
                 "ZeRO-2 shared prompt shared-prompt forward equals whole rows"):
        assert any(part in line for line in checks), part
    assert "21 passed, 0 failed" in lines[-1]


def test_gpu_check_without_cuda_checks_nothing_and_says_so() -> None:
    done = run()
    assert done.returncode == 0
    assert "no CUDA device here; nothing checked" in done.stdout
