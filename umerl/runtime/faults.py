"""Fault injection: kill a chosen actor's process at a chosen step and phase (``faults.kill``).

Each entry is ``ACTOR/INDEX/STEP/PHASE``, e.g. ``rollout/1/3/generate``:

    rollout/I/S/generate      rollout actor I, halfway through its share of step S's prompts
    rollout/I/S/weight_sync   rollout actor I, after the first bucket of the sync after step S
    learner/I/S/update        learner rank I, between scoring and the update of step S
    learner/I/S/save          learner rank I, halfway through writing step S's checkpoint

The process is killed with SIGKILL (no Python cleanup, as a preempted node or an OOM kill), so
what the tests and ``bench/bench_faults.py`` survive is a real process death. A fault fires
once: a replacement actor gets only the faults of later steps, and a restarted RL stage none.

``faults.stall`` entries (same form; phases ``rollout/I/S/generate`` and ``learner/I/S/update``)
make the actor sleep ``faults.stall_s`` seconds there instead, on every such call of step S: a
slow actor, or (with a long sleep) a hung one that answers nothing, as a deadlock would.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

PHASES = {"rollout": ("generate", "weight_sync"), "learner": ("update", "save")}
STALL_PHASES = {"rollout": ("generate",), "learner": ("update",)}  # where a stall can fire


@dataclass(frozen=True)
class Fault:
    actor: str  # "rollout" | "learner"
    index: int
    step: int
    phase: str
    stall_s: float = 0.0  # > 0: a stall (faults.stall): sleep this long there, not a kill

    def __str__(self) -> str:
        return f"{self.actor}/{self.index}/{self.step}/{self.phase}"


def parse_fault(text: str) -> Fault:
    """``"rollout/1/3/generate"`` -> Fault; a ValueError says what is wrong and what is valid."""
    parts = str(text).split("/")
    if len(parts) != 4:
        raise ValueError(f"{text!r} is not ACTOR/INDEX/STEP/PHASE (e.g. rollout/1/3/generate)")
    actor, index, step, phase = parts
    if actor not in PHASES:
        raise ValueError(f"{text!r}: actor must be one of {', '.join(PHASES)}")
    if not (index.isdigit() and step.isdigit() and int(step) >= 1):
        raise ValueError(f"{text!r}: INDEX must be >= 0 and STEP >= 1, both integers")
    if phase not in PHASES[actor]:
        raise ValueError(f"{text!r}: a {actor} phase is one of {', '.join(PHASES[actor])}")
    return Fault(actor, int(index), int(step), phase)


def parse_faults(texts: Iterable[str], stalls: Iterable[str] = (), stall_s: float = 0.0
                 ) -> list[Fault]:
    """The kills ``texts`` and the stalls ``stalls`` (each ``stall_s`` seconds long)."""
    return ([parse_fault(t) for t in texts]
            + [dataclasses.replace(parse_fault(t), stall_s=float(stall_s)) for t in stalls])


def recipe_faults(cfg: Any) -> list[Fault]:
    """A recipe's ``faults`` section: its kills and its stalls."""
    return parse_faults(cfg.kill, cfg.stall, float(cfg.stall_s))


def for_actor(faults: Sequence[Fault], actor: str, index: int, after_step: int = 0
              ) -> list[Fault]:
    """The faults meant for one actor, of steps after ``after_step`` (those not fired yet)."""
    return [f for f in faults if f.actor == actor and f.index == index and f.step > after_step]


def kill_if(faults: Sequence[Fault], step: int, phase: str) -> None:
    """SIGKILL this process when one of ``faults`` (already this actor's) names step and phase."""
    if any(f.step == step and f.phase == phase and not f.stall_s for f in faults):
        # The wall-clock time: the chaos bench measures detection from it (this line reaches
        # the driver's console through Ray's log monitor, a moment late).
        print(f"[faults] killing pid {os.getpid()} at step {step} during {phase} "
              f"(at unix time {time.time():.3f})", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def stall_if(faults: Sequence[Fault], step: int, phase: str) -> None:
    """Sleep here when one of ``faults`` (already this actor's) is a stall of step and phase."""
    seconds = max((f.stall_s for f in faults if f.step == step and f.phase == phase), default=0)
    if seconds:
        print(f"[faults] stalling pid {os.getpid()} for {seconds:g} s at step {step} during "
              f"{phase} (at unix time {time.time():.3f})", flush=True)
        time.sleep(seconds)
