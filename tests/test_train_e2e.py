"""End to end: `umerl train` on a local Ray: 2 Ray Train workers (DeepSpeed ZeRO-2 on gloo)
run the SFT on the bundled benchmark, write real checkpoints, evaluate before and after, and a
second invocation resumes from the latest checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from umerl.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parent.parent


def umerl_train(tmp: Path, tiny_model_dir: Path, benchmark_dir: Path, *overrides: str) -> str:
    env = {**os.environ, "WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu",
           "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    command = [
        sys.executable, "-m", "umerl.cli", "train", str(REPO / "recipes" / "cpu_tiny.yaml"),
        f"output_dir={tmp / 'run'}", f"model.path={tiny_model_dir}",
        f"data.benchmark_dir={benchmark_dir}",
        "data.benchmark_rl_extra.digits_cls=0", "eval.tasks=[digits_cls,lee_text]",
        "eval.pass_k=[1,2]", "eval.max_new_tokens=8", "sft.micro_batch_size=4",
        "sft.save_every=2", "sft.log_every=1", "ray.num_cpus=2", "rl.max_steps=2",
        "rl.pairs_per_step=2", "rl.group_size=2", "rl.max_new_tokens=8", *overrides,
    ]
    proc = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_model_dir, benchmark_manifest):
    tmp = tmp_path_factory.mktemp("e2e")
    output = umerl_train(tmp, tiny_model_dir, benchmark_manifest.parent, "sft.max_steps=4")
    return tmp, output


def test_sft_on_two_ray_workers_writes_loadable_checkpoints(first_run, tiny_model_dir):
    tmp, output = first_run
    root = tmp / "run" / "sft"
    final = ckpt.latest(root)
    assert final is not None and final.name == "step_00000004"
    manifest = ckpt.read_manifest(final)
    assert manifest["world_size"] == 2 and manifest["stage"] == "sft"
    assert "from scratch: step 0/4, world size 2, contrastive batch 8" in output
    for step in range(1, 5):
        assert f"[sft] step {step}/4 loss" in output
    # the weights moved away from the starting model
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(final / "model.safetensors")
    changed = [k for k in before if k in after and not torch.equal(before[k], after[k])]
    assert changed, "SFT did not change any weight"
    # ZeRO-2 optimizer shards of both ranks are part of the training state
    shards = list((final / "train_state" / "ds").glob("*optim_states.pt"))
    assert len(shards) == 2


def test_before_and_after_tables_and_score_files(first_run):
    tmp, output = first_run
    assert "before -> sft -> rl" in output
    assert "disc before  disc sft  disc rl" in output  # three columns per mode
    for label in ("before", "sft", "rl"):
        summary = json.loads((tmp / "run" / "eval" / label / "summary.json").read_text())
        assert set(summary["tasks"]) == {"digits_cls", "lee_text"}
        assert {"disc", "gen", "oracle", "pass@1", "pass@2"} <= set(summary["modes"])


def test_wandb_offline_run_has_the_loss_parts(first_run):
    tmp, _ = first_run
    runs = list((tmp / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) >= 2, "expected offline wandb runs for the sft and rl stages"
    # one run per stage; look through all of them for the SFT keys
    history = "".join(p.read_text(errors="ignore") for run in runs for p in run.rglob("*.wandb"))
    keys: dict = {}
    for summary in (p for run in runs for p in run.rglob("wandb-summary.json")):
        keys.update(json.loads(summary.read_text()))
    for part in ("sft/gen_nce", "sft/disc_nce", "sft/query_ce", "sft/target_ce", "sft/lr",
                 "perf/samples_per_s", "perf/tokens_per_s"):
        assert part in keys or part in history, part


def test_second_invocation_resumes_from_the_latest_checkpoint(first_run, tiny_model_dir,
                                                              benchmark_manifest):
    tmp, _ = first_run
    output = umerl_train(tmp, tiny_model_dir, benchmark_manifest.parent, "sft.max_steps=6",
                         "eval.before=false")
    assert "resumed from" in output and "step_00000004: step 4/6" in output
    assert "[sft] step 5/6" in output and "[sft] step 1/6" not in output
    assert ckpt.latest(tmp / "run" / "sft").name == "step_00000006"


NOISE = ("Failed to query Ray Train Controller", "Reporting training result",
         "Requesting resources", "Setting up process group", "FutureWarning",
         "Loading weights", "Writing model shards", "core_worker.cc", "wandb: Run summary",
         "Traceback")


def test_console_has_no_library_noise_and_shows_progress(first_run):
    _, output = first_run
    noisy = [line for line in output.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, "\n".join(noisy[:20])
    assert "[preflight] recipe, checkpoint, rewards and data checked" in output
    assert "ETA" in next(line for line in output.splitlines() if "[sft] step 4/4" in line)
    rl_progress = [line for line in output.splitlines()
                   if line.startswith("[rl]") and "steps/s" in line]
    assert len(rl_progress) == 2 and all("ETA" in line for line in rl_progress)
    assert "ETA" in next(line for line in output.splitlines() if "[eval] 2/2 lee_text" in line)
