"""The GPU code path, checked on CPU where a CPU test can show the defect: collectives on the
process group's device, per-worker accelerators, training mode with real recomputation, the
reference model beside the policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from umerl.config.recipe import load_recipe
from umerl.data.tokens import format_completion
from umerl.train import dist as udist


class _Sentinel(Exception):
    pass


def test_all_reduce_uses_the_process_groups_device(monkeypatch) -> None:
    seen = {}

    def fake_all_reduce(tensor, *args, **kwargs):
        seen["device"] = tensor.device
        raise _Sentinel

    monkeypatch.setattr(udist.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(udist.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(udist.dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(udist, "collective_device", lambda: torch.device("meta"))
    with pytest.raises(_Sentinel):
        udist.all_reduce_sum(3.0)
    assert seen["device"] == torch.device("meta")


def test_nccl_groups_collect_on_the_current_cuda_device(monkeypatch) -> None:
    monkeypatch.setattr(udist.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(udist.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert udist.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(udist.dist, "get_backend", lambda: "gloo")
    assert udist.collective_device() == torch.device("cpu")


def test_each_worker_picks_its_own_accelerator(monkeypatch) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "x")  # recorded: the original is restored afterwards
    monkeypatch.delenv("DS_ACCELERATOR")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert udist.configure_accelerator() == "cuda"
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # the Makefile's, inherited: not on a GPU
    assert udist.configure_accelerator() == "cuda"
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")  # an explicit choice of another kind wins
    assert udist.configure_accelerator() == "xpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")  # a CPU-only worker cannot use CUDA
    assert udist.configure_accelerator() == "cpu"
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert udist.configure_accelerator() == "cpu"


def test_driver_forwards_nccl_settings_but_no_accelerator(monkeypatch) -> None:
    from umerl.runtime.ray_start import worker_env

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # the Makefile's
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only head node
    env = worker_env()
    assert "DS_ACCELERATOR" not in env
    assert env["NCCL_SOCKET_IFNAME"] == "ib0" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in env


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gc") / "sft.jsonl"
    lines = []
    for i in range(8):
        completion = format_completion(f"item {i} is about {i % 3}", f"topic {i}")
        lines.append(json.dumps({"id": str(i), "task": "toy",
                                 "query": {"text": f"find {i}", "completion": completion},
                                 "target": {"text": f"item {i}", "completion": completion}}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _decoder_layer(model: torch.nn.Module) -> torch.nn.Module:
    return next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_sft_trains_in_train_mode_and_checkpointing_recomputes(tiny_model_dir, sft_file,
                                                               tmp_path, checkpointing) -> None:
    from umerl.train.sft import SftRun

    udist.init_single_process()
    cfg = load_recipe(None, [f"output_dir={tmp_path}", f'sft.data=["{sft_file}"]',
                             "sft.micro_batch_size=4", "wandb.mode=disabled",
                             f"sft.gradient_checkpointing={str(checkpointing).lower()}"])
    run = SftRun(cfg, str(tiny_model_dir))
    assert run.bundle.model.training
    calls = []
    # a pre-hook: the recomputation may stop early, before a forward hook would fire
    _decoder_layer(run.bundle.model).register_forward_pre_hook(lambda *a: calls.append(1))
    run.optimizer_step()
    # two sides per micro-step: two forwards; checkpointing runs each layer again in backward
    assert len(calls) == (4 if checkpointing else 2)


def test_learner_policy_trains_and_reference_sits_beside_it(tiny_model_dir, tmp_path) -> None:
    from umerl.train.learner import Learner

    udist.init_single_process()
    cfg = load_recipe(None, [f"output_dir={tmp_path}", "rl.pairs_per_step=2", "rl.group_size=2",
                             "learner.num_workers=1", "learner.gradient_checkpointing=true",
                             "wandb.mode=disabled"])
    learner = Learner(cfg, str(tiny_model_dir), str(tiny_model_dir))
    assert learner.bundle.model.training and not learner.reference.training
    assert learner.bundle.model.is_gradient_checkpointing
    devices = {p.device for p in learner.reference.parameters()}
    assert devices == {learner.engine.device}


def test_evaluation_runs_in_a_ray_task_with_the_recipes_gpu(tiny_model_dir, benchmark_manifest,
                                                            tmp_path) -> None:
    """eval.gpus_per_worker > 0: the evaluation leaves the driver for a Ray task holding that
    GPU (here a local Ray that declares one GPU; on CPU the task finds no CUDA and uses CPU)."""
    import os

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from umerl.eval.runner import evaluate_checkpoint
    from umerl.runtime.ray_start import worker_env

    cfg = load_recipe(None, [f"output_dir={tmp_path}", "eval.tasks=[digits_cls]",
                             f"data.benchmark_dir={benchmark_manifest.parent}",
                             "eval.pass_k=[]", "eval.max_new_tokens=4", "eval.gpus_per_worker=1",
                             "wandb.mode=disabled"])
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=2, num_gpus=1,
             include_dashboard=False,
             runtime_env={"env_vars": worker_env()})
    try:
        summary = evaluate_checkpoint(cfg, str(tiny_model_dir), "before")
    finally:
        ray.shutdown()
    assert summary["worker"]["pid"] != os.getpid()
    assert (tmp_path / "eval" / "before" / "summary.json").is_file()
    assert set(summary["tasks"]) == {"digits_cls"}


def test_rollout_engines_generate_in_the_learners_training_dtype(tiny_model_dir, monkeypatch):
    """DeepSpeed bf16 learners publish bf16 weights; a float32 rollout engine would refuse
    them (or differ from them). learner.bf16=auto is resolved on the rollout actor's device."""
    from rollout.pool import RolloutActor
    from umerl.runtime.devices import training_dtype

    assert training_dtype(True, "float32") == "bfloat16"
    assert training_dtype(False, "float32") == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a bf16 GPU's answers
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert training_dtype("auto", "float32") == "bfloat16"
    actor = RolloutActor(str(tiny_model_dir), "transformers", "auto", model_dtype="float32")
    assert actor.dtype == "bfloat16"
    assert next(actor.model.parameters()).dtype == torch.bfloat16
