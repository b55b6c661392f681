"""A failure inside a worker, mid-run, reads as one line naming the stage, the worker and the
cause; the tracebacks go to output_dir/logs/ and the last checkpoint stays loadable."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

from umerl.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "recipes" / "cpu_tiny.yaml")


def umerl(tmp: Path, *args: str, timeout_s: float = 600) -> tuple[int, str]:
    env = {**os.environ, "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu",
           "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "umerl.cli", *args], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    return proc.returncode, proc.stdout + proc.stderr


def rl_args(tmp_path: Path, tiny_model_dir: Path, benchmark_manifest: Path) -> list[str]:
    """`umerl rl` of the CPU recipe from the tiny model into tmp_path/run, no evaluation."""
    return ["rl", RECIPE, "--checkpoint", str(tiny_model_dir), f"output_dir={tmp_path / 'run'}",
            f"data.benchmark_dir={benchmark_manifest.parent}",
            "data.benchmark_rl_extra.digits_cls=0", "eval.enabled=false"]


def error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("umerl: error:")]
    assert len(lines) == 1, output[-4000:]
    return lines[0]


def test_reward_raising_mid_run(tmp_path, tiny_model_dir, benchmark_manifest):
    plugin = tmp_path / "flaky.py"
    plugin.write_text(
        "def flaky(ctx):\n"
        "    if ctx.step == 2:\n"
        "        raise ZeroDivisionError('the reward divided by zero')\n"
        "    return [0.0] * ctx.num_rollouts\n")
    code, output = umerl(
        tmp_path, *rl_args(tmp_path, tiny_model_dir, benchmark_manifest),
        "rl.max_steps=3", "rl.save_every=1", "rl.pairs_per_step=2",
        "rl.group_size=2", "rl.max_new_tokens=6", "rollout.num_workers=1", "ray.num_cpus=2",
        f"rewards=[{{name: format}}, {{name: '{plugin}:flaky'}}]")
    assert code == 1, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    line = error_line(output)
    assert re.search(r"RL failed: learner rank \d \(step 2\): RewardError: reward "
                     r".*flaky\.py:flaky' .* raised ZeroDivisionError at step 2 .*the reward "
                     r"divided by zero", line), line
    log = Path(re.search(r"traceback: (\S+);", line).group(1))
    text = log.read_text()
    assert log.parent == tmp_path / "run" / "logs"
    assert "Traceback" in text and "ZeroDivisionError" in text and "=== learner rank" in text
    root = tmp_path / "run" / "rl"
    assert f"last checkpoint {root / 'step_00000001'} (intact)" in line
    assert ckpt.latest(root) == root / "step_00000001" and ckpt.verify(root / "step_00000001")


def test_non_finite_steps_in_a_row_stop_the_run(tmp_path, tiny_model_dir, benchmark_manifest):
    """From step 2 a reward's (finite) values overflow the loss: steps 2 and 3 are skipped on
    both learner ranks, and with learner.max_skipped_steps=2 the run stops at step 3, naming
    it and the last checkpoint (step 2's, holding step 1's weights)."""
    plugin = tmp_path / "runaway.py"
    plugin.write_text(
        "import torch\n"
        "def runaway(ctx):\n"
        "    scale = 3e38 if ctx.step >= 2 else 1.0\n"
        "    return torch.tensor([scale * (-1) ** i for i in range(ctx.num_rollouts)])\n")
    code, output = umerl(
        tmp_path, *rl_args(tmp_path, tiny_model_dir, benchmark_manifest),
        "rl.max_steps=4", "rl.save_every=1", "rl.pairs_per_step=2",
        "rl.group_size=2", "rl.max_new_tokens=6", "rollout.num_workers=1", "ray.num_cpus=2",
        "rl.norm_adv_by_std=false", "learner.max_skipped_steps=2",
        f"rewards=[{{name: '{plugin}:runaway'}}]")
    assert code == 1, output[-4000:]
    line = error_line(output)
    assert re.search(r"RL failed: learner rank \d \(step 3\): RuntimeError: step 3: the loss or "
                     r"gradient was not finite in 2 steps in a row \(2\.\.3", line), line
    root = tmp_path / "run" / "rl"
    assert f"last checkpoint {root / 'step_00000002'} (intact)" in line
    assert ckpt.latest(root) == root / "step_00000002"


def test_reward_that_never_returns_mid_run(tmp_path, tiny_model_dir, benchmark_manifest):
    """A plug-in that sleeps for ever at step 2: with rl.reward_timeout_s=5 the stage fails
    with one line naming the reward, the step and the key, and the process ends (the stuck
    reward thread dies with the learner actors); the subprocess timeout turns a hang into a
    failure."""
    plugin = tmp_path / "stuck.py"
    plugin.write_text(
        "import time\n\n"
        "def stuck(ctx):\n"
        "    if ctx.step == 2:\n"
        "        time.sleep(3600)\n"
        "    return [0.0] * ctx.num_rollouts\n")
    code, output = umerl(
        tmp_path, *rl_args(tmp_path, tiny_model_dir, benchmark_manifest),
        "rl.max_steps=3", "rl.save_every=1", "rl.pairs_per_step=2",
        "rl.group_size=2", "rl.max_new_tokens=6", "rollout.num_workers=1", "ray.num_cpus=2",
        "rl.reward_timeout_s=5", f"rewards=[{{name: format}}, {{name: '{plugin}:stuck'}}]",
        timeout_s=300)
    assert code == 1, output[-4000:]
    line = error_line(output)
    assert re.search(r"RL failed: learner rank \d \(step 2\): RewardError: reward "
                     r".*stuck\.py:stuck' .*no result within rl\.reward_timeout_s=5 s at "
                     r"step 2", line), line
    root = tmp_path / "run" / "rl"
    assert f"last checkpoint {root / 'step_00000001'} (intact)" in line


def test_sft_worker_data_error_mid_run(tmp_path, tiny_model_dir, benchmark_manifest):
    """A PNG whose header reads but whose pixels are cut off passes the preflight (headers
    only) and fails in an SFT worker: the failure names the worker and the file:line."""
    good = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(good)
    broken = tmp_path / "cut.png"
    broken.write_bytes(good.read_bytes()[:120])
    completion = "<think>t</think><answer>a</answer><gen_emb>"
    pairs = [{"id": f"s{i}", "task": "t",
              "query": {"text": "q", "images": [str(broken if i == 5 else good)],
                        "completion": completion},
              "target": {"text": f"t{i}", "completion": completion}} for i in range(8)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    code, output = umerl(
        tmp_path, "train", RECIPE, f"output_dir={tmp_path / 'run'}",
        f"model.path={tiny_model_dir}", f"data.benchmark_dir={benchmark_manifest.parent}",
        "data.benchmark_rl_extra.digits_cls=0",
        "eval.enabled=false", "rl.enabled=false", f"sft.data=[{data}]", "sft.max_steps=2",
        "sft.micro_batch_size=4", "sft.num_workers=2", "ray.num_cpus=2")
    assert code == 1, output[-4000:]
    line = error_line(output)
    assert re.search(r"SFT failed: SFT worker rank \d: DataError: .*sft\.jsonl:6: cannot decode "
                     r"image .*cut\.png", line), line
    assert "Traceback" not in output, output[-4000:]
    log = Path(re.search(r"traceback: (\S+);", line).group(1))
    assert "Traceback" in log.read_text()
