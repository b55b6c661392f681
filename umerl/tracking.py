"""Metrics to wandb: offline by default (no network), online when the recipe or env says so."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


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
        if mode != "disabled":
            where = f"offline, {self.run.dir} (upload: wandb sync)" if mode == "offline" else mode
            print(f"[wandb] {stage} run {name}: {where}", flush=True)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def finish(self) -> None:
        self.run.finish()
