"""The processes of one session: what a test started with ``start_new_session=True`` (a job's
driver and the local Ray it started, or a ``ray start`` head), found and killed without touching
any other Ray on the machine (``ray stop`` would stop them all)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def session_pids(sid: int) -> list[int]:
    """The live processes of session ``sid`` (zombies, already dead, left out)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z" and os.getsid(int(entry.name)) == sid:
                pids.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return pids


def kill_session(sid: int, timeout_s: float = 20) -> None:
    """SIGKILL every process of session ``sid`` at once and wait until none is left: Ray gives
    each worker a process group of its own, so killing one group would leave the others a
    moment to go on working."""
    deadline = time.monotonic() + timeout_s
    while pids := session_pids(sid):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes {pids} of session {sid} outlived SIGKILL")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
