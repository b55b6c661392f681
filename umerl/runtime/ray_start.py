"""Ray start-up shared by the driver, evaluation and the embedding service: join a cluster
or start a local Ray on 127.0.0.1, and the environment every Ray worker gets."""

from __future__ import annotations

import os

from omegaconf import DictConfig


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
    # address="local": Ray's default (None) joins any Ray it finds on this machine (a `ray
    # start` cluster, another job's local Ray, a stale ray_current_cluster file) instead of
    # starting the job's own.
    keep_on_loopback()
    ray.init(
        address="local", _node_ip_address="127.0.0.1", num_cpus=cfg.ray.num_cpus,
        object_store_memory=int(cfg.ray.object_store_memory), include_dashboard=False,
        runtime_env=runtime_env, log_to_driver=True, logging_level="WARNING",
    )
    print(f"[driver] started a local Ray on 127.0.0.1 with "
          f"{int(ray.cluster_resources().get('CPU', 0))} CPUs", flush=True)


def keep_on_loopback() -> None:
    """A local Ray stays on 127.0.0.1. Ray 2.60's ``ray.init`` rewrites a 127.0.0.1
    ``_node_ip_address`` to the machine's outward address (``services.resolve_ip_for_localhost``)
    unless its clusters-off flag is set, which it reads from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
    once, at import: set both, so the GCS and the raylet advertise loopback and the workers,
    started with that variable, agree."""
    import ray._private.ray_constants as ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


# The user's settings for NCCL, CUDA, gloo and DeepSpeed reach every worker. Not
# CUDA_VISIBLE_DEVICES: Ray assigns each worker its own GPUs. Not DS_ACCELERATOR (the
# Makefile's shell sets cpu): each worker picks its own from its own devices
# (umerl.train.dist.configure_accelerator).
FORWARDED_PREFIXES = ("NCCL_", "TORCH_NCCL_", "CUDA_", "PYTORCH_CUDA_", "NVIDIA_", "GLOO_",
                      "TORCH_DISTRIBUTED_", "DS_")
NOT_FORWARDED = ("CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR")


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
    # Never a credential (WANDB_API_KEY): the dashboard, `ray job` and the logs show a runtime
    # env. The process that runs wandb takes it from the driver (umerl.runtime.tracking).
    for key in ("TORCH_EXTENSIONS_DIR", "UMERL_DATA_DIR"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return {k: v for k, v in env.items() if v}
