"""What ``auto`` resolves to (engines, bf16) and the dtype names: one place for each."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from umerl.data.dtypes import DTYPES, MODEL_DTYPES, torch_dtype
from umerl.runtime.devices import engine_for, training_dtype, use_bf16


def test_auto_engine_is_vllm_only_with_gpus() -> None:
    assert engine_for("auto", 0) == "transformers"
    assert engine_for("auto", 0.5) == "vllm"
    assert engine_for("transformers", 1) == "transformers"  # an explicit choice stands
    assert engine_for("vllm", 0) == "vllm"


def test_bf16_auto_follows_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert use_bf16(True) and not use_bf16(False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not use_bf16("auto") and training_dtype("auto", "float16") == "float16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert use_bf16("auto") and training_dtype("auto", "float32") == "bfloat16"
    assert training_dtype(False, "float32") == "float32"


def test_dtype_names_are_torch_names() -> None:
    assert set(MODEL_DTYPES) <= set(DTYPES)
    for name in DTYPES:
        assert str(torch_dtype(name)) == f"torch.{name}"
    with pytest.raises(ValueError, match="complex64"):
        torch_dtype("complex64")


def test_ray_workers_compute_on_the_cpus_they_reserve(local_ray, tiny_model_dir, tmp_path
                                                      ) -> None:
    """Every Ray worker starts with OMP_NUM_THREADS=1 (the workers' environment): a learner,
    a rollout actor or an evaluation task reserving 2 CPUs must still get 2 torch threads
    (the GPU recipes reserve 8 per worker), and one reserving half a CPU gets 1."""
    from rollout.pool import RolloutActor
    from umerl.config.recipe import load_recipe
    from umerl.eval.runner import _with_reserved_cpus
    from umerl.train.learner import LearnerActor

    ray = local_ray

    def _torch_threads(actor: object) -> int:  # pickled by value: the workers run it as is
        return torch.get_num_threads()

    for cpus, threads in ((2, 2), (0.5, 1)):
        cfg = load_recipe(None, [f"output_dir={tmp_path}", f"learner.cpus_per_worker={cpus}"])
        learner = ray.remote(LearnerActor).options(num_cpus=cpus).remote(
            OmegaConf.to_container(cfg, resolve=True), 0, 1)
        assert ray.get(learner.__ray_call__.remote(_torch_threads)) == threads
        ray.kill(learner)
    rollout = ray.remote(RolloutActor).options(num_cpus=2).remote(
        str(tiny_model_dir), "transformers", False, cpus=2.0)
    assert ray.get(rollout.__ray_call__.remote(_torch_threads)) == 2
    ray.kill(rollout)
    task = ray.remote(num_cpus=2)(_with_reserved_cpus)
    assert ray.get(task.remote(2.0, lambda: {"threads": torch.get_num_threads()})) == {
        "threads": 2}
