"""The single controller: read top to bottom to see what a job does.

    train(cfg):  start or join Ray
                 -> base model (a checkpoint, or the tiny offline one)
                 -> evaluate it ("before")
                 -> SFT warm start on a Ray Train worker group (DeepSpeed inside)
                 -> evaluate the SFT checkpoint ("sft")
                 -> GRPO: rollout pool + learner pool, weight sync each step (umerl/rl.py)
                 -> evaluate the result ("rl") and print the three side by side
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from umerl.config.cluster import check_cluster, check_shared_output_dir, nodes_from_ray
from umerl.config.origins import ConfigError, Sources
from umerl.config.recipe import to_container
from umerl.data.tasks import BUNDLED, ensure_benchmark
from umerl.eval.evaluate import comparison_table
from umerl.eval.runner import evaluate_checkpoint
from umerl.model.loading import prompt_limit
from umerl.preflight import (
    check_checkpoint,
    check_output_dir,
    finished_checkpoint,
    finished_stages,
    preflight,
    rewards_notice,
)
from umerl.runtime.console import quiet
from umerl.runtime.ray_start import init_ray
from umerl.runtime.remote import reported_failures
from umerl.runtime.run_lock import run_lock
from umerl.train import checkpoint as ckpt


def train(cfg: DictConfig, sources: Sources | None = None) -> dict[str, Any]:
    """Run every enabled stage of a recipe; returns the evaluation summaries by label
    (``before``, ``sft``, ``rl``: each written to ``output_dir/eval/<label>/``) and the final
    checkpoint.

    Everything that can be checked without a cluster is checked first (``umerl.preflight``):
    a bad recipe, reward, checkpoint or data line fails here, before Ray starts. Before that,
    the job takes ``output_dir``'s lock (``FolderLocked`` if another run holds it) for its whole
    length: two runs never write into one folder.
    """
    quiet()
    sources = sources or Sources()
    if (notice := rewards_notice(cfg)) is not None:
        print(notice, flush=True)  # the run's first line: a list that drops the defaults
    check_output_dir(cfg.output_dir, sources.describe("output_dir"))  # the lock goes there
    with run_lock(cfg.output_dir):
        return _train(cfg, sources)


def prepare(cfg: DictConfig, sources: Sources) -> tuple[DictConfig, str]:
    """The config as the workers get it (absolute paths, data lists resolved, the prompt limit)
    and the starting checkpoint (the tiny model built once when ``model.path`` is null)."""
    cfg = absolute_paths(cfg, sources)
    if cfg.model.path:
        model = str(check_checkpoint(cfg.model.path, sources.describe("model.path")))
    else:
        model = ensure_tiny_model(cfg.model.tiny)
    cfg.data.max_prompt_tokens = prompt_limit(cfg.data.max_prompt_tokens, model)
    return cfg, model


def _train(cfg: DictConfig, sources: Sources) -> dict[str, Any]:
    cfg, model = prepare(cfg, sources)
    finished = finished_stages(cfg, sources)
    if finished is not None:  # e.g. a finished run re-run with a lower max_steps
        print("[driver] nothing to do: " + "; ".join(finished) + ". Raise max_steps to train "
              "further, or set output_dir to another folder to start over.", flush=True)
        return {"nothing_to_do": finished}
    checked = preflight(cfg, model, sources)
    init_ray(cfg)
    # What only the live cluster can say: enough GPUs/CPUs for each stage, bundles that fit
    # on a node, and an output_dir every node can write and the driver can read.
    check_cluster(cfg, nodes_from_ray(), sources)
    check_shared_output_dir(cfg.output_dir, name=sources.describe("output_dir"))
    results: dict[str, Any] = {}
    if cfg.eval.enabled and cfg.eval.before:
        results["before"] = evaluate_checkpoint(cfg, model, "before")
    if cfg.sft.enabled:
        if (done := finished_checkpoint(cfg, "sft")) is not None:  # a rerun to finish RL
            print(f"[driver] SFT already at sft.max_steps ({cfg.sft.max_steps}): no workers "
                  "started", flush=True)
            model = str(done)
        else:
            with reported_failures(cfg.output_dir, "SFT", lambda: ckpt.latest(
                    Path(cfg.output_dir) / cfg.sft.output_subdir)):
                model = str(run_sft_stage(cfg, model))
        print(f"[driver] SFT checkpoint: {model}", flush=True)
        if cfg.eval.enabled:  # each stage's own effect: before -> sft -> rl
            results["sft"] = evaluate_checkpoint(cfg, model, "sft")
    if cfg.rl.enabled:
        with reported_failures(cfg.output_dir, "RL", lambda: ckpt.latest(
                Path(cfg.output_dir) / cfg.rl.output_subdir)):
            model = str(run_rl_stage(cfg, model, checked.get("rl")))
        print(f"[driver] RL checkpoint: {model}", flush=True)
        if cfg.eval.enabled:
            results["rl"] = evaluate_checkpoint(cfg, model, "rl")
    evaluated = {k: results[k] for k in ("before", "sft", "rl") if k in results}
    if len(evaluated) > 1:
        print(f"\n{' -> '.join(evaluated)} (headline metric per task, %):")
        print(comparison_table(evaluated))
    if "sft" in results and "rl" in results:
        from umerl.eval.compare import compare, compare_table

        effect = compare(results["sft"], results["rl"], seed=int(cfg.seed))
        print("\nRL's effect: rl - sft, points [95% bootstrap interval over queries]:")
        print(compare_table(effect))
        results["rl_vs_sft"] = effect
    from umerl.eval.plots import write_plots  # a failure here is a warning: the run is done

    write_plots(cfg.output_dir, cfg.eval.out_dir or Path(cfg.output_dir) / "eval")
    results["checkpoint"] = model
    return results


def absolute_paths(cfg: DictConfig, sources: Sources | None = None) -> DictConfig:
    """Workers may start in another folder: every path they read is made absolute here (a
    relative plug-in reward file: from the working directory, else from the recipe's folder)."""
    sources = sources or Sources()
    cfg = OmegaConf.create(to_container(cfg))
    cfg.output_dir = str(Path(cfg.output_dir).resolve())
    if cfg.model.path and Path(cfg.model.path).exists():  # else its check names it as given
        cfg.model.path = str(Path(cfg.model.path).resolve())
    cfg.model.tiny.dir = str(Path(cfg.model.tiny.dir).resolve())
    for stage, kind in (("sft", "sft"), ("rl", "rl_pairs")):
        cfg[stage].data = stage_data(cfg, stage, kind, sources)
    for entry in cfg.rewards:
        name = entry.get("name") if isinstance(entry, DictConfig) else None
        where, _, attr = str(name).rpartition(":")
        if not where.endswith(".py"):
            continue
        for base in (Path.cwd(), sources.recipe_dir):
            if base is not None and (base / where).is_file():
                entry.name = f"{(base / where).resolve()}:{attr}"
                break
    return cfg


def on_gpus(cfg: DictConfig, stage: str) -> bool:
    if stage == "sft":
        return float(cfg.sft.gpus_per_worker) > 0
    return float(cfg.learner.gpus_per_worker) > 0 or float(cfg.rollout.gpus_per_worker) > 0


def stage_data(cfg: DictConfig, stage: str, kind: str, sources: Sources) -> list[str]:
    """A stage's data files, absolute. ``umerl-mini`` names the bundled benchmark's files (its
    train split for SFT, rl split for RL), ``umerl-mini/<task>`` one task's; an empty list means
    ``umerl-mini`` too on CPU, but a stage on GPUs with no data is an error: a real model is
    never trained on the toy benchmark unasked."""
    entries, key = [str(p) for p in cfg[stage].data], f"{stage}.data"
    if not entries:
        if cfg[stage].enabled and on_gpus(cfg, stage):
            raise ConfigError(
                f"{sources.describe(key)}: no data given for a stage on GPUs: set {key}=[/path/"
                f"a.jsonl,...] (one JSONL per sub-dataset, docs/data-formats.md), or "
                f"{key}=[{BUNDLED}] to train on the bundled toy benchmark")
        entries = [BUNDLED]
    files: list[str] = []
    for entry in entries:
        if entry == BUNDLED or entry.startswith(f"{BUNDLED}/"):
            manifest = ensure_benchmark(cfg.data.benchmark_dir, int(cfg.data.benchmark_seed),
                                        dict(cfg.data.benchmark_rl_extra))
            tasks = _manifest(manifest)
            chosen = [t for t in tasks if entry in (BUNDLED, f"{BUNDLED}/{t['name']}")]
            if not chosen:
                raise ConfigError(f"{sources.describe(key)}: '{entry}' names no bundled task "
                                  f"(known: {', '.join(t['name'] for t in tasks)})")
            files += [str(manifest.parent / task[kind]) for task in chosen]
        else:
            files.append(str(Path(entry).resolve()))
    return files


def _manifest(path: Path) -> list[dict]:
    import json

    return json.loads(path.read_text(encoding="utf-8"))["tasks"]


def ensure_tiny_model(tiny_cfg: DictConfig) -> str:
    """Build the tiny model once; later runs reuse the folder."""
    from umerl.model.tiny import build_tiny_model

    out = Path(tiny_cfg.dir)
    if (out / "config.json").is_file():
        return str(out)
    print(f"building the tiny {tiny_cfg.family} model into {out} ...", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place: an interrupted build leaves nothing.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        build_tiny_model(staging, family=tiny_cfg.family, seed=tiny_cfg.seed,
                         size=tiny_cfg.size)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(out)


def run_sft_stage(cfg: DictConfig, init_checkpoint: str) -> Path:
    """SFT on ``sft.num_workers`` Ray Train workers; returns the final checkpoint."""
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from umerl.runtime.tracking import driver_credentials
    from umerl.train.sft import sft_worker

    scfg = cfg.sft
    use_gpu = float(scfg.gpus_per_worker) > 0
    resources = {"CPU": float(scfg.cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = float(scfg.gpus_per_worker)
    resources |= {str(k): float(v) for k, v in (scfg.get("resources") or {}).items()}
    trainer = TorchTrainer(
        sft_worker,
        train_loop_config={"cfg": to_container(cfg), "init_checkpoint": str(init_checkpoint),
                           "credentials": driver_credentials()},
        scaling_config=ScalingConfig(num_workers=int(scfg.num_workers), use_gpu=use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(storage_path=str(Path(cfg.output_dir) / "ray_train"), name="sft",
                             # Ray Train's INFO lines to its log files only, not the console.
                             logging_config=LoggingConfig(log_level="WARNING")),
    )
    fit_interruptibly(trainer)  # raises TrainingFailedError with the worker's traceback
    final = ckpt.latest(Path(cfg.output_dir) / scfg.output_subdir)
    if final is None:
        raise RuntimeError(f"SFT finished but wrote no checkpoint under {cfg.output_dir}")
    return final


def fit_interruptibly(trainer: Any) -> None:
    """``trainer.fit()`` where Ctrl-C stops the job, as everywhere in umerl (exit 130). Called
    in the main thread, Ray Train 2.60's ``fit()`` installs a SIGINT handler of its own (abort
    the run, then exit 0) and never puts the previous one back, so every later Ctrl-C, mid-RL,
    went to the finished run's controller and was lost. From another thread it installs none:
    a Ctrl-C reaches the main thread here, which shuts Ray down (the trainer's controller and
    workers go with the driver; checkpoints are atomic, so a rerun resumes) and raises on."""
    import ray

    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # re-raised in the main thread
            failure.append(err)

    thread = threading.Thread(target=fit, name="umerl-sft-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(timeout=0.5)
    except KeyboardInterrupt:
        ray.shutdown()
        raise
    if failure:
        raise failure[0]


def run_rl_stage(cfg: DictConfig, start: str, datasets: dict | None = None) -> Path:
    """GRPO from ``start`` (the SFT checkpoint), which is also the frozen KL reference;
    ``datasets``: the RL pairs the preflight already read and checked."""
    from umerl.rl import run_rl
    from umerl.runtime.tracking import Tracker

    tracker = Tracker(cfg, stage="rl")
    try:
        return run_rl(cfg, start, start, tracker, datasets)
    finally:
        tracker.finish()


