"""Checkpoints are atomic: a save killed at any moment leaves the previous one loadable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from umerl.train import checkpoint as ckpt


def write_checkpoint(root: Path, step: int, payload: bytes = b"x" * 100) -> Path:
    staging = ckpt.begin(root, step)
    (staging / "weights.bin").write_bytes(payload)
    (staging / "train_state").mkdir()
    (staging / "train_state" / "state.pt").write_bytes(b"s" * 10)
    return ckpt.commit(root, step, "sft")


def test_latest_skips_partial_and_damaged_checkpoints(tmp_path: Path) -> None:
    assert ckpt.latest(tmp_path) is None
    first = write_checkpoint(tmp_path, 1)
    second = write_checkpoint(tmp_path, 2)
    assert ckpt.latest(tmp_path) == second
    # a crashed save of step 3: a partial folder, never committed
    staging = ckpt.begin(tmp_path, 3)
    (staging / "weights.bin").write_bytes(b"half")
    assert ckpt.latest(tmp_path) == second
    # a damaged newest checkpoint (truncated file) is not trusted; the pointer falls back
    (second / "weights.bin").write_bytes(b"short")
    assert not ckpt.is_complete(second)
    assert ckpt.latest(tmp_path) == first
    # the pointer itself missing or garbage
    (tmp_path / ckpt.LATEST).write_text("../../etc")
    assert ckpt.latest(tmp_path) == first


def test_resolve_resume(tmp_path: Path) -> None:
    assert ckpt.resolve_resume("auto", tmp_path) is None
    done = write_checkpoint(tmp_path, 5)
    assert ckpt.resolve_resume("auto", tmp_path) == done
    assert ckpt.resolve_resume(None, tmp_path) is None
    assert ckpt.resolve_resume(str(done), tmp_path) == done
    with pytest.raises(ValueError, match="not a complete umerl checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "nope"), tmp_path)


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        write_checkpoint(tmp_path, step)
    removed = ckpt.prune(tmp_path, keep_last=2)
    assert [p.name for p in removed] == ["step_00000001", "step_00000002"]
    assert ckpt.latest(tmp_path).name == "step_00000004"


SAVER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from umerl.train import checkpoint as ckpt
    from umerl.model.loading import load_policy, save_policy

    root, source = Path(sys.argv[1]), sys.argv[2]
    bundle = load_policy(source)
    step = 0
    while True:  # save real HF checkpoints back to back until killed
        step += 1
        staging = ckpt.begin(root, step)
        save_policy(bundle, staging)
        ckpt.commit(root, step, "sft")
        print(step, flush=True)
""")


def test_kill_mid_save_leaves_previous_checkpoint_loadable(tiny_model_dir, tmp_path: Path):
    from umerl.model.loading import load_policy

    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    root = tmp_path / "ckpts"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for delay in (0.05, 0.17, 0.29):  # kill at different points of a save
        proc = subprocess.Popen([sys.executable, str(script), str(root), str(tiny_model_dir)],
                                stdout=subprocess.PIPE, env=env, text=True)
        # wait until one checkpoint is committed (libraries may print other lines first)
        while not proc.stdout.readline().strip().isdigit():
            assert proc.poll() is None, "the saver died before its first checkpoint"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        good = ckpt.latest(root)
        assert good is not None and ckpt.is_complete(good)
        bundle = load_policy(good)  # loads with from_pretrained, tokens intact
        assert bundle.disc_id != bundle.gen_id


def test_crash_while_resaving_a_step_keeps_its_previous_copy(tmp_path: Path) -> None:
    first = write_checkpoint(tmp_path, 1, b"old" * 10)
    # simulate the crash window of a re-save: old copy set aside, new one not yet renamed in
    staging = ckpt.begin(tmp_path, 1)
    (staging / "weights.bin").write_bytes(b"new")
    first.rename(tmp_path / ".step_00000001.replaced")
    found = ckpt.latest(tmp_path)
    assert found == tmp_path / ".step_00000001.replaced" and ckpt.is_complete(found)
    # a completed re-save replaces it and cleans up
    final = write_checkpoint(tmp_path, 1, b"new" * 10)
    assert ckpt.latest(tmp_path) == final and (final / "weights.bin").read_bytes() == b"new" * 10
    assert not (tmp_path / ".step_00000001.replaced").exists()
