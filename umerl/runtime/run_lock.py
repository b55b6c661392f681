"""One run per folder: a lock file in ``output_dir`` for as long as a job writes there.

The lock (``output_dir/.umerl.lock``, created with ``O_EXCL``: of two runs starting at once only
one creates it) records the holder's host, pid, start time and a heartbeat, which a daemon
thread refreshes every ``HEARTBEAT_S``. A lock is stale when its holder is gone: on this host,
its pid is not running (or is a newer process that reused the pid); on another host (a shared
filesystem), its heartbeat is older than ``STALE_AFTER_S``. A stale lock is taken over with a
message; a live one raises ``FolderLocked``. The lock is released when the job ends, also on an
exception; a SIGKILLed job leaves it behind, stale, for the next run to take over.

Two runs taking over one stale lock at once: each removes it only under an exclusive
``flock`` on ``.umerl.lock.takeover`` and only after reading it again and finding the same dead
holder; so the second finds the first's new lock (live) or none (then ``O_EXCL`` decides).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOCK_FILE = ".umerl.lock"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0
HALF_WRITTEN_S = 5.0  # an empty or unparsable lock older than this was left by a crash


class FolderLocked(Exception):
    """Another live run holds the folder; the message names the folder and the holder."""


@contextmanager
def run_lock(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder``'s lock for the ``with`` block (the folder is created if needed)."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    mine = _acquire(path)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, mine, stop), daemon=True,
                            name="umerl-run-lock")
    beat.start()
    try:
        yield path
    finally:
        stop.set()
        beat.join()
        if _same(_read(path), mine):  # never remove a lock another run has taken over since
            path.unlink(missing_ok=True)


def holder_text(holder: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
    return f"pid {holder['pid']} on {holder['host']}, started {started}"


def is_stale(holder: dict[str, Any], now: float | None = None) -> bool:
    if holder["host"] != socket.gethostname():
        return (now or time.time()) - float(holder["heartbeat"]) > STALE_AFTER_S
    return not _running_since(int(holder["pid"]), float(holder["started"]))


def _acquire(path: Path) -> dict[str, Any]:
    now = time.time()
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now}
    for _ in range(30):  # a holder may release, or a taker create, between the steps
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if holder is None and _age(path) < HALF_WRITTEN_S:  # being written: look again
                time.sleep(0.2)
                continue
            if holder is None:  # a holder killed between creating and writing it
                path.unlink(missing_ok=True)
                continue
            if not is_stale(holder):
                raise FolderLocked(f"{path.parent} is in use by another umerl run "
                                   f"({holder_text(holder)}; lock file {path}): wait for it to "
                                   "end, or give this run another output_dir") from None
            _take_over(path, holder)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(mine, handle)
        return mine
    raise FolderLocked(f"{path.parent}: could not take its lock file {path} (other runs keep "
                       "taking it); try again")


def _take_over(path: Path, stale: dict[str, Any]) -> None:
    """Remove ``path`` if it still names the dead holder ``stale``. Under an exclusive flock:
    another run judging the same lock stale at the same moment reads it again after this one
    has replaced it, so it cannot remove the new holder's lock."""
    guard = path.with_name(path.name + ".takeover")
    with open(guard, "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            if _same(_read(path), stale):
                print(f"[lock] taking over {path}: its holder ({holder_text(stale)}) is gone",
                      flush=True)
                path.unlink(missing_ok=True)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _heartbeat(path: Path, mine: dict[str, Any], stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        if not _same(_read(path), mine):  # taken over (judged dead): stop claiming it
            return
        mine["heartbeat"] = time.time()
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(mine), encoding="utf-8")
        os.replace(tmp, path)


def _same(a: dict[str, Any] | None, b: dict[str, Any]) -> bool:
    return a is not None and all(a[k] == b[k] for k in ("host", "pid", "started"))


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _read(path: Path) -> dict[str, Any] | None:
    """The lock's content, or None if there is none or it is half-written."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        return holder if {"host", "pid", "started", "heartbeat"} <= holder.keys() else None
    except (OSError, ValueError, AttributeError):
        return None


def _running_since(pid: int, started: float) -> bool:
    """``pid`` is a live process that was already running at ``started`` (a newer process
    with the same pid is not the holder)."""
    import psutil

    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and process.create_time() <= started + 1
    except psutil.NoSuchProcess:
        return False
