"""Waiting on Ray workers so that a failure reads as one line: which worker, what went wrong.

``gather`` waits for one call per worker. When a worker fails, the others get ``grace_s`` to
finish (a rank blocked in a collective with a dead peer never would) and a ``WorkerError``
names the first failed worker and its cause in one line; ``details`` keeps every failed
worker's full traceback for the run's log file (``reported_failures`` writes it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class WorkerError(RuntimeError):
    """A Ray worker failed: ``str(err)`` is one line, ``details`` the tracebacks."""

    def __init__(self, worker: str, summary: str, details: str, dead: Sequence[str] = (),
                 hung: Sequence[str] = ()):
        self.worker, self.summary, self.details = worker, summary, details
        self.dead = list(dead)  # the workers whose process died (not a Python error)
        self.hung = list(hung)  # the workers still running when the wait's timeout passed
        self.context = ""
        super().__init__(f"{worker}: {summary}")

    def __str__(self) -> str:
        where = f" ({self.context})" if self.context else ""
        return f"{self.worker}{where}: {self.summary}"


def gather(refs: Sequence[Any], workers: Sequence[str], grace_s: float = 30.0,
           timeout_s: float | None = None, timeout_key: str = "") -> list[Any]:
    """``ray.get`` of one ref per worker, raising ``WorkerError`` for the first failure, or
    for the first worker still running after ``timeout_s`` (named by ``timeout_key``; the
    error's ``hung`` lists every worker still running)."""
    import ray

    index = {ref: i for i, ref in enumerate(refs)}
    results: dict[int, Any] = {}
    failures: list[tuple[int, BaseException]] = []
    pending = list(refs)
    limit = None if timeout_s is None else time.monotonic() + timeout_s
    deadline: float | None = None
    while pending:
        ends = [t for t in (deadline, limit) if t is not None]
        timeout = None if not ends else max(0.0, min(ends) - time.monotonic())
        done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
        if not done and not failures:
            stuck = [workers[index[ref]] for ref in pending]
            raise WorkerError(stuck[0], f"no answer within {timeout_key}={timeout_s:g} s; "
                              f"still running: {', '.join(stuck)}", "", hung=stuck)
        if not done:
            break  # the grace period is over; the rest are stuck behind the failure
        try:
            results[index[done[0]]] = ray.get(done[0])
        except Exception as err:  # noqa: BLE001 - every failure is reported, none swallowed
            failures.append((index[done[0]], err))
            deadline = deadline or time.monotonic() + grace_s
    if failures:
        from ray.exceptions import RayActorError

        # A dead worker first: its peers' errors (a broken collective) are its consequences.
        failures.sort(key=lambda item: (not isinstance(item[1], RayActorError), item[0]))
        raise _worker_error([(workers[i], err) for i, err in failures],
                            stuck=[workers[index[ref]] for ref in pending])
    return [results[i] for i in range(len(refs))]


def _worker_error(failures: list[tuple[str, BaseException]], stuck: list[str]) -> WorkerError:
    from ray.exceptions import RayActorError

    name, err = failures[0]
    dead = [n for n, e in failures if isinstance(e, RayActorError)]
    details = "\n\n".join(f"=== {n} ===\n{traceback_text(e)}" for n, e in failures)
    if stuck:
        details += ("\n\nno answer within the grace period after the failure (still running "
                    f"when it was reported; the stage ends them): {', '.join(stuck)}")
    return WorkerError(name, summarize(err), details, dead)


def summarize(err: BaseException) -> str:
    """One line for a failure seen through Ray: the user's exception type and message."""
    from ray.exceptions import RayActorError, RayTaskError, UnserializableException

    if isinstance(err, UnserializableException):  # the cause survives only as text
        return _last_error_line(err._original_stack_trace)
    if isinstance(err, RayTaskError) and isinstance(err.cause, UnserializableException):
        return _last_error_line(err.cause._original_stack_trace)
    if isinstance(err, RayTaskError):
        cause = err.cause
        return f"{type(cause).__name__}: {_first_line(str(cause))}"
    if isinstance(err, RayActorError):
        text = getattr(err, "error_msg", "") or str(err)
        if getattr(err, "actor_init_failed", False):
            return f"failed to start: {_last_error_line(text)}"
        return f"actor died: {_first_line(text.replace(chr(9), ' '))}"
    return f"{type(err).__name__}: {_first_line(str(err))}"


def traceback_text(err: BaseException) -> str:
    import traceback

    text = getattr(err, "traceback_str", None)
    if text:
        return str(text)
    return "".join(traceback.format_exception(type(err), err, err.__traceback__))


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "(no message)"


def _last_error_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if ":" in line and line.split(":")[0].endswith(
        ("Error", "Exception", "Exit"))]
    return (errors or lines or ["(no message)"])[-1]


class StageError(RuntimeError):
    """A stage failed inside a worker: one line for the console, the traceback in a log."""


@contextmanager
def reported_failures(output_dir: str | Path, stage: str,
                      last_checkpoint: Callable[[], Path | None] | None = None
                      ) -> Iterator[None]:
    """A worker failure becomes a ``StageError``: stage, worker and cause in one line; every
    traceback goes to ``output_dir/logs/``. A training stage passes ``last_checkpoint``, which
    finds its newest checkpoint (intact: checkpoints are written atomically)."""
    try:
        yield
    except Exception as err:
        if not isinstance(err, WorkerError) and not _is_train_failure(err):
            raise
        summary, details = _failure_text(err)
        logs = Path(output_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        slug = "-".join("".join(c if c.isalnum() else " " for c in stage.lower()).split())
        log = logs / f"{slug}-failure-{time.strftime('%Y%m%d-%H%M%S')}.log"
        log.write_text(details, encoding="utf-8")
        if last_checkpoint is None:
            raise StageError(f"{stage} failed: {summary}; traceback: {log}") from None
        last = last_checkpoint()
        kept = f"last checkpoint {last} (intact)" if last else "no checkpoint was written"
        raise StageError(f"{stage} failed: {summary}; traceback: {log}; {kept}") from None


def _is_train_failure(err: BaseException) -> bool:
    from ray.train import TrainingFailedError

    return isinstance(err, TrainingFailedError)


def _failure_text(err: BaseException) -> tuple[str, str]:
    if isinstance(err, WorkerError):
        return str(err), err.details
    failures = getattr(err, "worker_failures", None) or {}
    if failures:  # Ray Train: {rank: exception}
        rank = min(failures)
        # Ray Train unwraps each worker's exception; its message keeps their tracebacks.
        return f"SFT worker rank {rank}: {summarize(failures[rank])}", str(err)
    cause = getattr(err, "controller_failure", None)  # Ray Train's controller failed
    if cause is not None:
        return f"Ray Train controller: {summarize(cause)}", traceback_text(cause)
    return summarize(err), traceback_text(err)
