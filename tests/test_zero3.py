"""ZeRO-3 on 2 gloo ranks (DeepSpeed's CPU accelerator): SFT saves, resumes exactly, and its
Hugging Face export loads and embeds like the live, sharded engine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from umerl.data.tokens import format_completion
from umerl.train import checkpoint as ckpt


def _config(out: Path, data: Path, steps: int):
    from umerl.config.recipe import load_recipe

    return load_recipe(None, [
        f"output_dir={out}", f'sft.data=["{data}"]', f"sft.max_steps={steps}",
        "sft.micro_batch_size=2", "sft.num_workers=2", "sft.zero_stage=3", "sft.save_every=2",
        "sft.log_every=100", "sft.lr=0.01", "wandb.mode=disabled",
    ])


def _rank_main(rank: int, port: int, model: str, data: str, root: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    from umerl.train import dist as udist
    from umerl.train.sft import SftRun, side_inputs

    udist.init_process_group(rank, 2, "127.0.0.1", port, backend="gloo")
    root_path, data_path = Path(root), Path(data)
    SftRun(_config(root_path / "straight", data_path, 4), model).train()
    stopped = SftRun(_config(root_path / "stopped", data_path, 4), model)
    for _ in range(2):
        stopped.optimizer_step()
        stopped.state.step += 1
    stopped.save()
    stopped.optimizer_step()  # lost in the "crash"
    resumed = SftRun(_config(root_path / "stopped", data_path, 4), model)
    resumed.train()
    # the live sharded engine embeds a fixed batch (a collective under ZeRO-3)
    pairs = resumed.batcher.datasets["toy"][:3]
    batch = {k: v for k, v in side_inputs(resumed.bundle, [p.query for p in pairs]).items()}
    with torch.no_grad():
        out = resumed.engine(**batch)
    if rank == 0:
        torch.save({"disc": out.disc, "gen": out.gen}, root_path / "live.pt")
    udist.barrier()


@pytest.fixture(scope="module")
def zero3_runs(tmp_path_factory, tiny_model_dir):
    from umerl.train.dist import free_port

    root = tmp_path_factory.mktemp("z3")
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps({
        "id": str(i), "task": "toy",
        "query": {"text": f"find item {i}", "completion": format_completion(f"r {i}", f"s {i}")},
        "target": {"text": f"item {i}", "completion": format_completion(f"t {i}", f"u {i}")},
    }) + "\n" for i in range(12)))
    mp.spawn(_rank_main, args=(free_port(), str(tiny_model_dir), str(data), str(root)),
             nprocs=2, join=True)
    return root, data


def test_zero3_resume_equals_an_uninterrupted_run(zero3_runs):
    root, _ = zero3_runs
    straight = ckpt.latest(root / "straight" / "sft")
    resumed = ckpt.latest(root / "stopped" / "sft")
    assert straight.name == resumed.name == "step_00000004"
    assert ckpt.read_manifest(resumed)["world_size"] == 2
    from safetensors.torch import load_file

    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        assert a[key].numel() > 0, key  # full tensors, not the (0,)-shaped local shards
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key


def test_zero3_export_loads_and_embeds_like_the_engine(zero3_runs, tiny_model_dir):
    from umerl.data.formats import read_sft_pairs
    from umerl.model.loading import load_policy
    from umerl.model.policy import PolicyModule
    from umerl.train.sft import side_inputs
    from umerl.train.sft_data import load_pair_datasets

    root, data = zero3_runs
    exported = load_policy(ckpt.latest(root / "stopped" / "sft"))
    start = load_policy(tiny_model_dir)
    pairs = load_pair_datasets([str(data)], read_sft_pairs)["toy"][:3]
    batch = side_inputs(exported, [p.query for p in pairs])
    live = torch.load(root / "live.pt")
    with torch.no_grad():
        out = PolicyModule(exported.model, exported.disc_id, exported.gen_id)(**batch)
        before = PolicyModule(start.model, start.disc_id, start.gen_id)(**batch)
    assert torch.allclose(out.disc, live["disc"], atol=1e-5)
    assert torch.allclose(out.gen, live["gen"], atol=1e-5)
    assert not torch.allclose(before.disc, live["disc"], atol=1e-3)  # training moved it
