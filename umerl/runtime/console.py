"""A readable console: library noise silenced in the driver and in every Ray worker.

``quiet`` runs in the driver and, as Ray's ``worker_process_setup_hook``, at the start of every
worker process (Ray Train's controller and workers, rollout and learner actors). It silences
what means nothing to a user of umerl: Ray Train's placement-group cleaner, which polls the
state API (absent without the dashboard) and warns every few seconds;
transformers' per-load progress bars; a deprecation warning DeepSpeed triggers in every
all-gather. Errors and warnings from these libraries still show.
"""

from __future__ import annotations

import importlib.util
import logging
import time
import warnings
from pathlib import Path

# Ray Train's own INFO lines (resource requests, worker-group start-up, "Reporting training
# result") are cut by the LoggingConfig the driver gives its RunConfig. These two come from
# loggers outside that config's reach. Filters, not levels: Ray Train's logging dictConfig
# resets the levels of its child loggers, but not their filters.
_DROPPED = {
    # Every few seconds without a dashboard (the state API it polls is absent).
    "ray.train.v2._internal.execution.controller.placement_group_cleaner":
        "Failed to query Ray Train Controller actor state",
    # Each failed SFT worker's traceback: the driver prints the failure in one line and
    # writes the tracebacks to output_dir/logs/.
    "ray.train.v2._internal.util": "Error in training function",
}
# Every SFT worker's final ray.train.report as a dataclass repr, from a logger named by its
# file's path (getLogger(__file__)), which is why no Ray Train setting reaches it.
_DROPPED_BY_FILE = {"train/v2/_internal/execution/context.py": "Reporting training result"}


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet() -> None:
    spec = importlib.util.find_spec("ray")  # where ray lives, without importing it here
    root = Path(spec.origin).parent if spec and spec.origin else None
    by_file = {str(root / f): p for f, p in _DROPPED_BY_FILE.items()} if root else {}
    for name, prefix in {**_DROPPED, **by_file}.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated",
                            category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.* is deprecated",
                            category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


class Progress:
    """A periodic progress line's rate and ETA: ``Progress(total).line(done)``."""

    def __init__(self, total: int, unit: str = "steps", done: int = 0):
        self.total, self.unit, self.start_done = total, unit, done
        self.start = time.perf_counter()

    def line(self, done: int) -> str:
        elapsed = time.perf_counter() - self.start
        rate = (done - self.start_done) / elapsed if elapsed > 0 else 0.0
        left = (self.total - done) / rate if rate > 0 else float("nan")
        return f"{rate:.2f} {self.unit}/s, elapsed {_clock(elapsed)}, ETA {_clock(left)}"


def _clock(seconds: float) -> str:
    if seconds != seconds:  # NaN: no rate yet
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
