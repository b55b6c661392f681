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

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from umerl.config.cluster import check_cluster, check_shared_output_dir, nodes_from_ray
from umerl.config.origins import Sources
from umerl.config.recipe import to_container
from umerl.data.tasks import ensure_benchmark, resolve_tasks
from umerl.eval.evaluate import EvalSettings, comparison_table, parse_modes
from umerl.model.loading import prompt_limit
from umerl.preflight import check_checkpoint, preflight
from umerl.runtime.console import quiet
from umerl.runtime.remote import WorkerError, gather, summarize, traceback_text
from umerl.train import checkpoint as ckpt


class StageError(RuntimeError):
    """A stage failed inside a worker: one line for the console, the traceback in a log."""


def train(cfg: DictConfig, sources: Sources | None = None) -> dict[str, Any]:
    """Run every enabled stage of a recipe; returns the evaluation summaries by label
    (``before``, ``sft``, ``rl``: each written to ``output_dir/eval/<label>/``) and the final
    checkpoint.

    Everything that can be checked without a cluster is checked first (``umerl.preflight``):
    a bad recipe, reward, checkpoint or data line fails here, before Ray starts.
    """
    quiet()
    sources = sources or Sources()
    cfg = absolute_paths(cfg)
    if cfg.model.path:
        model = str(check_checkpoint(cfg.model.path, sources.describe("model.path")))
    else:
        model = ensure_tiny_model(cfg.model.tiny)
    cfg.data.max_prompt_tokens = prompt_limit(cfg.data.max_prompt_tokens, model)
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
        with reported_failures(cfg, "SFT", cfg.sft.output_subdir):
            model = str(run_sft_stage(cfg, model))
        print(f"[driver] SFT checkpoint: {model}", flush=True)
        if cfg.eval.enabled:  # each stage's own effect: before -> sft -> rl
            results["sft"] = evaluate_checkpoint(cfg, model, "sft")
    if cfg.rl.enabled:
        with reported_failures(cfg, "RL", cfg.rl.output_subdir):
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


@contextmanager
def reported_failures(cfg: DictConfig, stage: str, subdir: str | None) -> Iterator[None]:
    """A worker failure becomes a ``StageError``: stage, worker and cause in one line; every
    traceback goes to ``output_dir/logs/``. Checkpoints are atomic: the last one under
    ``subdir`` (a training stage's) is intact."""
    try:
        yield
    except Exception as err:
        if not isinstance(err, WorkerError) and not _is_train_failure(err):
            raise
        summary, details = _failure_text(err)
        logs = Path(cfg.output_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        slug = "-".join("".join(c if c.isalnum() else " " for c in stage.lower()).split())
        log = logs / f"{slug}-failure-{time.strftime('%Y%m%d-%H%M%S')}.log"
        log.write_text(details, encoding="utf-8")
        if subdir is None:
            raise StageError(f"{stage} failed: {summary}; traceback: {log}") from None
        last = ckpt.latest(Path(cfg.output_dir) / subdir)
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


def absolute_paths(cfg: DictConfig) -> DictConfig:
    """Workers may start in another folder: every path they read is made absolute here."""
    cfg = OmegaConf.create(to_container(cfg))
    cfg.output_dir = str(Path(cfg.output_dir).resolve())
    if cfg.model.path:
        cfg.model.path = str(Path(cfg.model.path).resolve())
    cfg.model.tiny.dir = str(Path(cfg.model.tiny.dir).resolve())
    if not cfg.sft.data:
        manifest = ensure_benchmark(cfg.data.benchmark_dir, int(cfg.data.benchmark_seed))
        cfg.sft.data = [str(manifest.parent / entry["sft"]) for entry in _manifest(manifest)]
    cfg.sft.data = [str(Path(p).resolve()) for p in cfg.sft.data]
    if not cfg.rl.data:
        manifest = ensure_benchmark(cfg.data.benchmark_dir, int(cfg.data.benchmark_seed))
        cfg.rl.data = [str(manifest.parent / entry["rl_pairs"]) for entry in _manifest(manifest)]
    cfg.rl.data = [str(Path(p).resolve()) for p in cfg.rl.data]
    for entry in cfg.rewards:  # a plug-in file named relative to where the user ran umerl
        name = entry.get("name") if isinstance(entry, DictConfig) else None
        where, _, attr = str(name).rpartition(":")
        if where.endswith(".py") and Path(where).is_file():
            entry.name = f"{Path(where).resolve()}:{attr}"
    return cfg


def _manifest(path: Path) -> list[dict]:
    import json

    return json.loads(path.read_text(encoding="utf-8"))["tasks"]


def init_ray(cfg: DictConfig) -> None:
    """Join ``ray.address`` / RAY_ADDRESS, or start a local Ray bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # The hook runs in every worker process: the same quiet console as the driver's.
    env = worker_env()
    if not address:
        # One machine has no preemptible nodes; Ray Train's preemption watcher would only log
        # a core-worker error about its own constructor arguments.
        env.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    runtime_env = {"env_vars": env, "worker_process_setup_hook": "umerl.runtime.console.quiet"}
    if address:
        ray.init(address=address, runtime_env=runtime_env, logging_level="WARNING")
        print(f"[driver] joined the Ray cluster at {address}", flush=True)
        return
    ray.init(
        _node_ip_address="127.0.0.1", num_cpus=cfg.ray.num_cpus,
        object_store_memory=int(cfg.ray.object_store_memory), include_dashboard=False,
        runtime_env=runtime_env, log_to_driver=True, logging_level="WARNING",
    )
    print(f"[driver] started a local Ray on 127.0.0.1 with "
          f"{int(ray.cluster_resources().get('CPU', 0))} CPUs", flush=True)


# The user's settings for NCCL, CUDA, gloo and DeepSpeed reach every worker. Not
# CUDA_VISIBLE_DEVICES: Ray assigns each worker its own GPUs. Not a DeepSpeed accelerator
# chosen here: each worker picks its own from its own devices
# (umerl.train.dist.configure_accelerator)
# unless the user set DS_ACCELERATOR.
FORWARDED_PREFIXES = ("NCCL_", "TORCH_NCCL_", "CUDA_", "PYTORCH_CUDA_", "NVIDIA_", "GLOO_",
                      "TORCH_DISTRIBUTED_", "DS_")
NOT_FORWARDED = ("CUDA_VISIBLE_DEVICES",)


def worker_env() -> dict[str, str]:
    """What every Ray worker needs: offline hubs, one thread each, the user's NCCL/CUDA/
    DeepSpeed settings."""
    env = {
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("UMERL_WORKER_THREADS", "1"),
        "WANDB_MODE": os.environ.get("WANDB_MODE", ""),
        "DS_BUILD_OPS": "0",
        # Ray Train re-routes print() through a logger that wandb's stdout wrapper then
        # echoes again: every line would show twice.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "WANDB_SILENT": "true",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    for key, value in os.environ.items():
        if key.startswith(FORWARDED_PREFIXES) and key not in NOT_FORWARDED:
            env[key] = value
    for key in ("TORCH_EXTENSIONS_DIR", "UMERL_DATA_DIR", "WANDB_API_KEY"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return {k: v for k, v in env.items() if v}


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

    from umerl.train.sft import sft_worker

    scfg = cfg.sft
    use_gpu = float(scfg.gpus_per_worker) > 0
    resources = {"CPU": float(scfg.cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = float(scfg.gpus_per_worker)
    trainer = TorchTrainer(
        sft_worker,
        train_loop_config={"cfg": to_container(cfg), "init_checkpoint": str(init_checkpoint)},
        scaling_config=ScalingConfig(num_workers=int(scfg.num_workers), use_gpu=use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(storage_path=str(Path(cfg.output_dir) / "ray_train"), name="sft",
                             # Ray Train's INFO lines to its log files only, not the console.
                             logging_config=LoggingConfig(log_level="WARNING")),
    )
    trainer.fit()  # raises TrainingFailedError with the worker's traceback on failure
    final = ckpt.latest(Path(cfg.output_dir) / scfg.output_subdir)
    if final is None:
        raise RuntimeError(f"SFT finished but wrote no checkpoint under {cfg.output_dir}")
    return final


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


def eval_settings(cfg: DictConfig) -> EvalSettings:
    e = cfg.eval
    return EvalSettings(
        modes=parse_modes(list(e.modes)), pass_k=tuple(e.pass_k), batch_size=int(e.batch_size),
        max_new_tokens=int(e.max_new_tokens), temperature=float(e.temperature),
        top_k=int(e.top_k), seed=int(cfg.seed), save_embeddings=bool(e.save_embeddings),
        skip_invalid=bool(cfg.data.skip_invalid),
        max_prompt_tokens=None if cfg.data.max_prompt_tokens == "auto"
        else int(cfg.data.max_prompt_tokens),
    )


def evaluate_checkpoint(cfg: DictConfig, checkpoint: str, label: str) -> dict[str, Any]:
    specs = resolve_tasks(list(cfg.eval.tasks), cfg.eval.split, cfg.data.benchmark_dir,
                          int(cfg.data.benchmark_seed))
    out = Path(cfg.eval.out_dir or Path(cfg.output_dir) / "eval") / label
    return run_eval_work(cfg, label, run_eval, checkpoint, specs, eval_settings(cfg), out,
                         cfg.model.dtype)


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
    task = ray.remote(num_gpus=gpus, num_cpus=float(cfg.eval.cpus_per_worker))(work)
    ref = task.remote(checkpoint, *args, **kwargs, device="auto")
    with reported_failures(cfg, f"evaluation ({label})", None):
        return gather([ref], [f"evaluation task ({label})"])[0]


def run_eval(checkpoint: str | Path, specs, settings: EvalSettings, out_dir: str | Path,
             dtype: str = "float32", device: str = "cpu") -> dict:
    """Load, evaluate, write JSON, print the table; returns the summary (plus, under
    ``worker``, the process and device that ran it). ``device="auto"``: CUDA if this process
    has a GPU."""
    from umerl.eval.evaluate import evaluate, summary_table

    bundle, engine, device = policy_and_engine(checkpoint, dtype, device, settings.batch_size)
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
        bundle, engine, _ = policy_and_engine(checkpoint, dtype, device, settings.batch_size)
        return Evaluator(bundle, engine, settings)

    return run_mmeb_v2(checkpoint, root, tasks, settings, out_dir, load, chunk_size)


def fit_router_on(checkpoint: str | Path, specs, settings: EvalSettings, folds: int = 5,
                  dtype: str = "float32"):
    """``umerl route fit``: evaluate ``specs`` with the checkpoint (CPU) and fit a router."""
    from umerl.eval.evaluate import fit_on_tasks

    bundle, engine, _ = policy_and_engine(checkpoint, dtype, "cpu", settings.batch_size)
    router = fit_on_tasks(bundle, engine, specs, settings, folds)
    router.meta["checkpoint"] = str(checkpoint)
    return router


def policy_and_engine(checkpoint: str | Path, dtype: str, device: str, batch_size: int
                      ) -> tuple[Any, Any, str]:
    """An evaluation's policy on ``device`` (``auto``: CUDA if this process has a GPU) and the
    transformers engine over it, with the device it resolved to."""
    import torch

    from rollout.transformers_engine import TransformersEngine
    from umerl.model.loading import load_policy

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    bundle = load_policy(checkpoint, dtype=dtype, device=device)
    return bundle, TransformersEngine(bundle, batch_size), device
