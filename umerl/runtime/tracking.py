"""Metrics to wandb (offline by default: no network; online when the recipe or env says so)
and, whatever wandb's mode, one JSON line per logged step in ``output_dir/metrics/<stage>.jsonl``:
a plain record of the run that ``umerl.eval.plots`` reads without wandb's own files."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# What wandb reads from the environment to log in. Not in a Ray runtime env (the dashboard,
# `ray job` and the logs show it): RL's tracker runs in the driver, which has it; SFT's in a
# Ray Train worker, which gets it from the driver as a Ray object (``driver_credentials``).
CREDENTIALS = ("WANDB_API_KEY",)


def driver_credentials() -> Any:
    """The driver's credentials as a Ray object: what travels with a task's arguments is its
    reference, not the value."""
    import ray

    return ray.put({k: os.environ[k] for k in CREDENTIALS if os.environ.get(k)})


def adopt_credentials(ref: Any) -> None:
    """In a worker: the driver's credentials into this process's environment (a key the
    worker's node already sets wins)."""
    import ray

    for key, value in ray.get(ref).items():
        os.environ.setdefault(key, value)


def metrics_path(output_dir: str | Path, stage: str) -> Path:
    return Path(output_dir) / "metrics" / f"{stage}.jsonl"


def _plain(value: Any) -> Any:
    """A JSON value: numpy and torch scalars as Python numbers, NaN and inf as null (JSON has
    neither)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Tracker:
    """One wandb run per stage; ``mode`` comes from ``wandb.mode`` unless WANDB_MODE is set."""

    def __init__(self, cfg: DictConfig, stage: str):
        import wandb

        mode = os.environ.get("WANDB_MODE") or str(cfg.wandb.mode)
        directory = Path(cfg.output_dir).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        name = cfg.wandb.name or f"{Path(cfg.output_dir).name}-{stage}"
        self.run = wandb.init(
            project=str(cfg.wandb.project), name=name, mode=mode, dir=str(directory),
            config=OmegaConf.to_container(cfg, resolve=True), job_type=stage, reinit="create_new",
            # wandb's banner and end-of-run summary would bury the run's own lines.
            settings=wandb.Settings(silent=True),
        )
        self.directory = directory
        # Appended to, never truncated: a resumed run continues the record (a step logged
        # again after a restart appears twice; readers keep its last line).
        self.metrics_file = metrics_path(directory, stage)
        self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
        if mode != "disabled":
            where = f"offline, {self.run.dir} (upload: wandb sync)" if mode == "offline" else mode
            print(f"[wandb] {stage} run {name}: {where}", flush=True)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(dict(metrics), step=step)
        line = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        # One write per step, flushed at once: a crash loses at most the line being written.
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            # default=str: an odd value must not stop a training run over its record.
            f.write(json.dumps(line, default=str) + "\n")

    def finish(self) -> None:
        self.run.finish()


class MemoryTracker:
    """The Tracker's ``log`` in memory, for tests and bench/: every call's step and a
    copy of its metrics, in call order, as the Tracker receives them (a step the stage repeats
    after a restart appears twice, as in the JSONL)."""

    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, Any]]] = []

    def log(self, metrics: dict[str, Any], step: int) -> None:
        # A copy: the caller's dict must not change the record after the call.
        self.logged.append((int(step), dict(metrics)))

    @property
    def steps(self) -> dict[int, dict[str, Any]]:
        """Each step's metrics, its last logged line winning (as ``umerl.eval.plots`` reads
        the JSONL)."""
        return dict(self.logged)
