"""The GPU install path's guards, checked on CPU: the Makefile's GPU targets run without the CPU
targets' DS_ACCELERATOR=cpu (even one exported by the calling shell), and scripts/gpu_env.py
refuses a CPU torch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def fake_venv(tmp_path: Path) -> tuple[Path, Path]:
    """A bin folder whose `python` prints DS_ACCELERATOR and its arguments, and a stamp newer
    than pyproject.toml (so make installs nothing)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python"
    python.write_text('#!/bin/sh\necho "DS_ACCELERATOR=${DS_ACCELERATOR-unset} ARGS=$*"\n')
    python.chmod(0o755)
    stamp = tmp_path / "stamp"
    stamp.touch()
    return bin_dir, stamp


def make(target: str, *overrides: str) -> str:
    # as a shell that sourced the CPU settings; not an outer make's flags (`make test ARGS=...`)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env["DS_ACCELERATOR"] = "cpu"
    done = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), target, *overrides],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
def test_gpu_targets_do_not_inherit_the_cpu_accelerator(tmp_path: Path) -> None:
    bin_dir, stamp = fake_venv(tmp_path)
    gpu = make("gpu-check", f"GPU_BIN={bin_dir}", f"GPU_STAMP={stamp}", "ARGS=--device cuda")
    assert "DS_ACCELERATOR=unset ARGS=scripts/gpu_check.py --device cuda" in gpu, gpu
    cpu = make("test", f"BIN={bin_dir}", f"STAMP={stamp}", "ARGS=-k nothing")
    assert "DS_ACCELERATOR=cpu ARGS=-m pytest -q --durations=25 -k nothing" in cpu, cpu


def test_gpu_env_refuses_a_cpu_torch() -> None:
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_env.py")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "is a CPU build" in done.stdout and "torch==2.13.0" in done.stdout, done.stdout
