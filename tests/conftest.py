"""Shared fixtures: the tiny offline model and the bundled benchmark, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Before any test imports Ray: with it, the 127.0.0.1 a test gives Ray stays 127.0.0.1 (else Ray
# rewrites it to the machine's outward address; tests/multinode.py).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# Where the shared tiny bundles run: CPU here and in CI; ``cuda`` when the GPU check
# (docs/gpu.md, "Checking the GPU path") runs the engine's tests on a GPU.
TEST_DEVICE = os.environ.get("UMERL_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from umerl.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2_vl", family="qwen2_vl")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_model_dir: Path):
    from umerl.model.loading import load_policy

    return load_policy(tiny_model_dir, device=TEST_DEVICE)


@pytest.fixture(scope="session")
def benchmark_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``UMERL_TEST_BENCHMARK``: an already built umerl-mini folder (the GPU machine lacks
    gensim, one of its data sources, so the GPU check carries this machine's build)."""
    from umerl.data.tasks import ensure_benchmark

    built = os.environ.get("UMERL_TEST_BENCHMARK")
    return ensure_benchmark(built or tmp_path_factory.mktemp("bench") / "umerl-mini")


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray on loopback with 2 CPUs and the workers' environment, one per test module
    (the GRPO loop's tests)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from umerl.runtime.ray_start import worker_env

    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False,
             object_store_memory=512 << 20, runtime_env={"env_vars": worker_env()})
    yield ray
    ray.shutdown()
