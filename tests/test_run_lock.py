"""One run per folder: a held lock refuses a second run, a dead holder's lock is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from umerl.runtime import run_lock as rl
from umerl.runtime.run_lock import LOCK_FILE, FolderLocked, run_lock


def write_lock(folder: Path, pid: int, host: str | None = None, started: float | None = None,
               heartbeat: float | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    path = folder / LOCK_FILE
    path.write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid,
                                "started": started or now, "heartbeat": heartbeat or now}))
    return path


def holder_pid(folder: Path) -> int:
    return json.loads((folder / LOCK_FILE).read_text())["pid"]


def test_a_second_run_on_a_held_folder_is_refused_naming_folder_and_holder(tmp_path: Path):
    with run_lock(tmp_path) as lock:
        assert holder_pid(tmp_path) == os.getpid()
        with pytest.raises(FolderLocked) as err, run_lock(tmp_path):
            pass
        assert str(tmp_path) in str(err.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in str(err.value)
        assert lock.is_file()  # the refused run did not remove the holder's lock
    assert not lock.exists()  # released on exit
    with run_lock(tmp_path):  # and free again
        pass


def test_the_lock_is_released_when_the_run_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), run_lock(tmp_path):
        raise RuntimeError("a stage failed")
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path: Path) -> None:
    """A SIGKILLed driver leaves its lock: the next run finds its pid dead and takes it."""
    started = time.time()
    dead = subprocess.Popen(["sleep", "60"])
    dead.kill()
    dead.wait()
    write_lock(tmp_path, dead.pid, started=started)
    with run_lock(tmp_path):
        assert holder_pid(tmp_path) == os.getpid()


def test_a_reused_pid_is_not_the_holder(tmp_path: Path) -> None:
    """The lock's pid now belongs to a process that started after the lock was written."""
    newer = subprocess.Popen(["sleep", "60"])
    try:
        write_lock(tmp_path, newer.pid, started=time.time() - 3600)
        with run_lock(tmp_path):
            assert holder_pid(tmp_path) == os.getpid()
    finally:
        newer.kill()
        newer.wait()


def test_a_holder_on_another_host_is_judged_by_its_heartbeat(tmp_path: Path) -> None:
    write_lock(tmp_path, 1, host="node-7", heartbeat=time.time() - 5)
    with pytest.raises(FolderLocked, match="pid 1 on node-7"), run_lock(tmp_path):
        pass
    write_lock(tmp_path, 1, host="node-7", heartbeat=time.time() - rl.STALE_AFTER_S - 1)
    with run_lock(tmp_path):
        assert holder_pid(tmp_path) == os.getpid()


def test_the_heartbeat_keeps_a_long_run_live(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(rl, "HEARTBEAT_S", 0.05)
    with run_lock(tmp_path) as lock:
        first = json.loads(lock.read_text())["heartbeat"]
        time.sleep(0.5)
        holder = json.loads(lock.read_text())
        assert holder["heartbeat"] > first and holder["pid"] == os.getpid()
        assert not rl.is_stale({**holder, "host": "another-host"})


def _race_to_take_over(folder: str, barrier, late: bool, results) -> None:
    """One of two runs that judge the same dead holder's lock stale at the same moment; the
    ``late`` one reaches the removal 0.5 s after the other has put its own lock in place."""
    judge = rl.is_stale
    judged = []

    def is_stale(holder, now=None):
        stale = judge(holder, now)
        if stale and not judged:  # the first judgement only: both runs have judged it
            judged.append(True)
            barrier.wait(timeout=30)
            if late:
                time.sleep(0.5)
        return stale

    rl.is_stale = is_stale
    try:
        with run_lock(folder):
            results.put("held")
            time.sleep(1.5)  # hold it while the other run decides
    except FolderLocked:
        results.put("refused")


def test_two_runs_taking_over_one_stale_lock_at_once_leave_one_holder(tmp_path: Path) -> None:
    """Without the guarded takeover the late run removed the early one's fresh lock (which it
    had judged stale as the dead holder's) and both held the folder."""
    import multiprocessing

    dead = subprocess.Popen(["true"])
    dead.wait()
    write_lock(tmp_path, dead.pid, started=time.time() - 5)
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    runs = [context.Process(target=_race_to_take_over, args=(str(tmp_path), barrier, late,
                                                             results)) for late in (False, True)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=60)
    assert sorted(results.get(timeout=5) for _ in runs) == ["held", "refused"]
