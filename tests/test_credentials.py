"""Credentials never ride in a Ray runtime env (the dashboard, `ray job` and the logs show it),
yet reach the process that runs wandb."""

from __future__ import annotations

import json
import os

import pytest

from umerl.config.recipe import load_recipe

KEY = "wandb-key-that-must-not-leak"


@pytest.fixture()
def ray_from_init_ray(monkeypatch, tmp_path):
    """A local Ray started as the driver starts it (``init_ray``), with WANDB_API_KEY set."""
    import ray

    from umerl.runtime.ray_start import init_ray

    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    init_ray(load_recipe(None, [f"output_dir={tmp_path}", "ray.num_cpus=1",
                                "ray.object_store_memory=268435456"]))
    yield ray
    ray.shutdown()


def test_the_runtime_env_holds_no_credential(ray_from_init_ray):
    ray = ray_from_init_ray

    @ray.remote(num_cpus=0)
    def runtime_env_seen_by_a_task() -> dict:
        return ray.get_runtime_context().runtime_env

    for runtime_env in (ray.get_runtime_context().runtime_env,  # the job's, as Ray records it
                        ray.get(runtime_env_seen_by_a_task.remote())):
        assert runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"  # the worker env is there
        assert KEY not in json.dumps(runtime_env)
        assert "WANDB_API_KEY" not in runtime_env["env_vars"]


def test_the_process_running_wandb_gets_the_drivers_key(ray_from_init_ray, tmp_path):
    """SFT's tracker runs in Ray Train's rank 0: it takes the key the driver passes (as a Ray
    object, in the train loop's config, as ``run_sft_stage`` does). The worker drops its own
    copy first: a stand-in for a worker on another node, whose environment is its node's."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from umerl.runtime.tracking import adopt_credentials, driver_credentials

    seen = tmp_path / "seen.txt"

    def worker(config: dict) -> None:
        os.environ.pop("WANDB_API_KEY", None)
        adopt_credentials(config["credentials"])
        seen.write_text(os.environ.get("WANDB_API_KEY", "none"))

    TorchTrainer(worker, train_loop_config={"credentials": driver_credentials()},
                 scaling_config=ScalingConfig(num_workers=1),
                 torch_config=TorchConfig(backend="gloo"),
                 run_config=RunConfig(storage_path=str(tmp_path / "ray_train"))).fit()
    assert seen.read_text() == KEY
