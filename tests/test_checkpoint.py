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
    (staging / "config.json").write_text("{}")
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
    assert ckpt.resolve_resume(None, tmp_path) is None  # fresh, into an empty root
    done = write_checkpoint(tmp_path, 5)
    assert ckpt.resolve_resume("auto", tmp_path) == done
    assert ckpt.resolve_resume(str(done), tmp_path) == done
    with pytest.raises(ValueError, match="not a complete umerl checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "nope"), tmp_path)


def test_a_fresh_start_refuses_a_root_holding_checkpoints(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 30)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.resolve_resume(None, tmp_path, "sft.resume")
    assert str(tmp_path) in str(err.value) and "step_00000030" in str(err.value)
    assert "sft.resume=auto" in str(err.value) and "output_dir" in str(err.value)


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        write_checkpoint(tmp_path, step)
    removed = ckpt.prune(tmp_path, keep_last=2, written=4)
    assert [p.name for p in removed] == ["step_00000001", "step_00000002"]
    assert ckpt.latest(tmp_path).name == "step_00000004"
    assert ckpt.prune(tmp_path, keep_last=5, written=4) == []


def test_prune_never_deletes_the_checkpoint_just_written(tmp_path: Path) -> None:
    """Issue 24: a run writing steps 10 and 20 beside another run's 30 and 40 deleted its own
    new checkpoints (retention kept the highest step numbers) and then found step 40."""
    for step in (30, 40):
        write_checkpoint(tmp_path, step)
    for step in (10, 20):
        write_checkpoint(tmp_path, step)
        ckpt.prune(tmp_path, keep_last=2, written=step)
        assert ckpt.is_complete(ckpt.step_dir(tmp_path, step))
        assert ckpt.latest(tmp_path) == ckpt.step_dir(tmp_path, step)
    # the other run's checkpoints above it are not this run's history: left alone
    assert ckpt.is_complete(ckpt.step_dir(tmp_path, 40))


def test_manifest_records_a_sha256_per_file(tmp_path: Path) -> None:
    import hashlib

    done = write_checkpoint(tmp_path, 1)
    files = ckpt.read_manifest(done)["files"]
    state = (done / "train_state" / "state.pt").read_bytes()
    assert files["train_state/state.pt"] == {"bytes": len(state),
                                             "sha256": hashlib.sha256(state).hexdigest()}


def test_a_same_size_corruption_is_caught_by_verify_and_resume(tmp_path: Path) -> None:
    done = write_checkpoint(tmp_path, 1)
    damaged = done / "train_state" / "state.pt"
    damaged.write_bytes(b"t" + damaged.read_bytes()[1:])  # same size, one byte differs
    assert ckpt.is_complete(done)  # sizes match: picking the latest does not hash
    for check in (lambda: ckpt.verify(done), lambda: ckpt.verify(tmp_path),
                  lambda: ckpt.resolve_resume("auto", tmp_path),
                  lambda: ckpt.resolve_resume(str(done), tmp_path)):
        with pytest.raises(ckpt.CheckpointError, match="SHA-256") as err:
            check()
        assert str(damaged) in str(err.value)


def test_a_manifest_without_hashes_evaluates_but_does_not_resume(tmp_path: Path) -> None:
    """Checkpoints written before hashes were recorded (a manifest of sizes) still load for
    evaluation; resuming, which unpickles DeepSpeed state, needs the hashes."""
    import json

    done = write_checkpoint(tmp_path, 1)
    manifest = ckpt.read_manifest(done)
    manifest["files"] = {name: (done / name).stat().st_size for name in manifest["files"]}
    (done / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert ckpt.is_complete(done) and ckpt.verify(done) == done
    with pytest.raises(ckpt.CheckpointError, match="records no SHA-256") as err:
        ckpt.resolve_resume("auto", tmp_path)
    assert str(done) in str(err.value)


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
