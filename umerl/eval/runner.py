"""Evaluation jobs: the settings from a recipe, a checkpoint evaluated in this process or in a
Ray task with GPUs, MMEB-V2 from a local copy, and the router fit. Used by the driver and the
CLI."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from umerl.data.tasks import TaskSpec, recipe_tasks
from umerl.eval.evaluate import EvalSettings, parse_modes, write_json
from umerl.runtime.devices import use_reserved_cpus
from umerl.runtime.ray_start import init_ray
from umerl.runtime.remote import gather, reported_failures

# Beside an evaluation's summary.json: what it scored (evaluation_stamp), written after it.
STAMP = "evaluated.json"


def eval_settings(cfg: DictConfig) -> EvalSettings:
    e = cfg.eval
    return EvalSettings(
        modes=parse_modes(list(e.modes)), pass_k=tuple(e.pass_k), batch_size=int(e.batch_size),
        max_new_tokens=int(e.max_new_tokens), temperature=float(e.temperature),
        top_k=int(e.top_k), seed=int(cfg.seed), save_embeddings=bool(e.save_embeddings),
        skip_invalid=bool(cfg.data.skip_invalid),
        max_prompt_tokens=None if cfg.data.max_prompt_tokens == "auto"
        else int(cfg.data.max_prompt_tokens),
        max_pixels=None if cfg.model.max_pixels is None else int(cfg.model.max_pixels),
    )


def evaluate_checkpoint(cfg: DictConfig, checkpoint: str, label: str) -> dict[str, Any]:
    """The driver's evaluation of a stage's checkpoint into ``<eval out>/<label>``; a rerun
    (a resumed run) reuses the scores there when they are of the same checkpoint, settings
    and task files (``STAMP``), instead of evaluating again: on GPUs, at the paper's 512 new
    tokens and with pass@k, an evaluation is long."""
    specs = recipe_tasks(list(cfg.eval.tasks), cfg.eval.split, cfg.data)
    out = Path(cfg.eval.out_dir or Path(cfg.output_dir) / "eval") / label
    settings = eval_settings(cfg)
    stamp = evaluation_stamp(checkpoint, specs, settings, str(cfg.model.dtype))
    if (earlier := earlier_evaluation(out, stamp)) is not None:
        print(f"\n[driver] evaluation ({label}): {checkpoint} was evaluated with these settings "
              f"before; its scores are reused ({out / 'summary.json'})", flush=True)
        return earlier
    (out / STAMP).unlink(missing_ok=True)  # stale until this evaluation has written its scores
    summary = run_eval_work(cfg, label, run_eval, checkpoint, specs, settings, out,
                            cfg.model.dtype)
    write_json(out / STAMP, stamp)
    return summary


def evaluation_stamp(checkpoint: str, specs: list[TaskSpec], settings: EvalSettings,
                     dtype: str) -> dict[str, Any]:
    """What an evaluation's scores depend on: the checkpoint's folder and its files' sizes and
    modification times (a checkpoint is never rewritten in place; another run's at the same
    path differs), the settings, the dtype, and each task file with its size and time."""
    folder = Path(checkpoint).resolve()
    return {"checkpoint": str(folder), "dtype": dtype,
            "files": {f.name: _size_and_time(f) for f in sorted(folder.iterdir()) if f.is_file()},
            "settings": dataclasses.asdict(settings),
            "tasks": [[spec.name, str(spec.path), *_size_and_time(spec.path)] for spec in specs]}


def _size_and_time(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def earlier_evaluation(out: Path, stamp: dict[str, Any]) -> dict[str, Any] | None:
    """The summary in ``out`` if its stamp is ``stamp`` (JSON's lists for tuples), else None."""
    try:
        if json.loads((out / STAMP).read_text(encoding="utf-8")) != json.loads(
                json.dumps(stamp)):
            return None
        return json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_eval_work(cfg: DictConfig, label: str, work: Callable[..., dict], checkpoint: str,
                  *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``work(checkpoint, *args, **kwargs, device=...)``, an evaluation's model work: with
    ``eval.gpus_per_worker`` > 0 in a Ray task with those GPUs (joining ``ray.address`` or
    starting a local Ray: a head node's CPU would take hours over the paper's 512 new tokens
    and pass@k), else in this process, on CPU. Paths in the arguments must be absolute."""
    gpus = float(cfg.eval.gpus_per_worker)
    where = f"a Ray task with {gpus:g} GPU(s)" if gpus > 0 else "this process, on CPU"
    print(f"\n[driver] evaluating ({label}) {checkpoint} in {where}", flush=True)
    if gpus <= 0:
        return work(checkpoint, *args, **kwargs, device="cpu")
    import ray

    init_ray(cfg)
    cpus = float(cfg.eval.cpus_per_worker)
    task = ray.remote(num_gpus=gpus, num_cpus=cpus)(_with_reserved_cpus)
    ref = task.remote(cpus, work, checkpoint, *args, **kwargs, device="auto")
    with reported_failures(cfg.output_dir, f"evaluation ({label})"):
        return gather([ref], [f"evaluation task ({label})"])[0]


def _with_reserved_cpus(cpus: float, work: Callable[..., dict], *args: Any, **kwargs: Any
                        ) -> dict:
    """``work`` in a Ray task, on the CPUs the task reserved (``eval.cpus_per_worker``)."""
    use_reserved_cpus(cpus)
    return work(*args, **kwargs)


def run_eval(checkpoint: str | Path, specs, settings: EvalSettings, out_dir: str | Path,
             dtype: str = "float32", device: str = "cpu") -> dict:
    """Load, evaluate, write JSON, print the table; returns the summary (plus, under
    ``worker``, the process and device that ran it). ``device="auto"``: CUDA if this process
    has a GPU."""
    from umerl.eval.evaluate import evaluate, summary_table

    bundle, engine, device = policy_and_engine(checkpoint, dtype, device, settings.batch_size,
                                               settings.max_pixels)
    summary = evaluate(bundle, engine, specs, settings, out_dir)
    print(f"\n{checkpoint} on {len(specs)} task(s), {summary['seconds']:.0f} s")
    print(summary_table(summary))
    print(f"scores: {Path(out_dir) / 'summary.json'}")
    return {**summary, "worker": {"pid": os.getpid(), "device": device}}


def run_mmeb_v2_eval(checkpoint: str, root: str, tasks: list, settings: EvalSettings,
                     out_dir: str, dtype: str = "float32", device: str = "cpu",
                     chunk_size: int = 256) -> dict:
    """``umerl eval --mmeb-v2``: the policy is loaded only if a task still needs it (a
    finished evaluation resumes without it)."""
    import torch

    from umerl.eval.evaluate import Evaluator
    from umerl.eval.mmeb_v2 import run_mmeb_v2

    def load() -> Evaluator:
        torch.manual_seed(settings.seed)
        bundle, engine, _ = policy_and_engine(checkpoint, dtype, device, settings.batch_size,
                                              settings.max_pixels)
        return Evaluator(bundle, engine, settings)

    return run_mmeb_v2(checkpoint, root, tasks, settings, out_dir, load, chunk_size)


def fit_router_on(checkpoint: str | Path, specs, settings: EvalSettings, folds: int = 5,
                  dtype: str = "float32"):
    """``umerl route fit``: evaluate ``specs`` with the checkpoint (CPU) and fit a router."""
    from umerl.eval.evaluate import fit_on_tasks

    bundle, engine, _ = policy_and_engine(checkpoint, dtype, "cpu", settings.batch_size,
                                          settings.max_pixels)
    router = fit_on_tasks(bundle, engine, specs, settings, folds)
    router.meta["checkpoint"] = str(checkpoint)
    return router


def policy_and_engine(checkpoint: str | Path, dtype: str, device: str, batch_size: int,
                      max_pixels: int | None = None) -> tuple[Any, Any, str]:
    """An evaluation's policy on ``device`` (``auto``: CUDA if this process has a GPU) and the
    transformers engine over it, with the device it resolved to; ``max_pixels``: the
    processor's largest image area (None: the checkpoint's own)."""
    import torch

    from rollout.transformers_engine import TransformersEngine
    from umerl.model.loading import load_policy

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    bundle = load_policy(checkpoint, dtype=dtype, device=device, max_pixels=max_pixels)
    return bundle, TransformersEngine(bundle, batch_size), device
