"""SFT: the CE masks non-assistant tokens, batching rules, and exact resume (world size 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from umerl.config.recipe import load_recipe
from umerl.data.formats import Pair, Side
from umerl.data.tokens import format_completion
from umerl.model.policy import PolicyModule
from umerl.train import checkpoint as ckpt
from umerl.train.engine import cosine_schedule, parameter_group
from umerl.train.sft import completion_nll, side_inputs
from umerl.train.sft_data import ContrastiveBatcher, shard


def pair(i: int, target: str, task: str = "t") -> Pair:
    completion = format_completion(f"reason {i}", f"summary {i}")
    return Pair(str(i), task, Side(text=f"query {i}", completion=completion),
                Side(text=target, completion=completion))


def test_ce_counts_only_the_assistant_tokens(tiny_bundle) -> None:
    sides = [pair(0, "a").query, Side(text="a much longer query text " * 3,
                                      completion=format_completion("r", "s"))]
    batch = side_inputs(tiny_bundle, sides)
    lengths = batch["completion_lengths"]
    module = PolicyModule(tiny_bundle.model, tiny_bundle.disc_id, tiny_bundle.gen_id)
    with torch.no_grad():
        out = module(**batch)
        vision = {k: v for k, v in batch.items() if k != "completion_lengths"}
        logits = tiny_bundle.model(**vision).logits
    # the mask is exactly the completion + <|im_end|>, at the right end of each row
    completion_ids = tiny_bundle.tokenizer(sides[0].completion, add_special_tokens=False)
    assert int(lengths[0]) == len(completion_ids["input_ids"]) + 1
    assert out.completion_mask.sum(dim=1).tolist() == lengths.tolist()
    assert batch["input_ids"][0, -1] == tiny_bundle.tokenizer.convert_tokens_to_ids("<|im_end|>")
    # equals a hand computation over the full-vocabulary logits at the completion positions
    manual = []
    for row in range(2):
        width = batch["input_ids"].shape[1]
        for pos in range(width - int(lengths[row]), width):
            token = batch["input_ids"][row, pos]
            manual.append(-torch.log_softmax(logits[row, pos - 1], -1)[token])
    assert torch.allclose(completion_nll(out), torch.stack(manual).mean(), atol=1e-5)


def test_parameter_groups_of_qwen_vl_names() -> None:
    assert parameter_group("model.visual.blocks.0.attn.qkv.weight") == "vision"
    assert parameter_group("model.visual.merger.mlp.0.weight") == "projector"
    assert parameter_group("model.visual.deepstack_merger_list.0.norm.weight") == "projector"
    assert parameter_group("model.language_model.layers.0.mlp.up_proj.weight") == "llm"
    assert parameter_group("lm_head.weight") == "llm"


def test_cosine_schedule_warms_up_then_decays() -> None:
    f = cosine_schedule(100, 0.1, 0.0)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5, abs=1e-6)
    assert f(100) == pytest.approx(0.0, abs=1e-9)


def test_batches_come_from_one_dataset_and_cover_it() -> None:
    datasets = {
        "cls": [pair(i, f"class {i % 3}", "cls") for i in range(30)],
        "ret": [pair(100 + i, f"doc {i}", "ret") for i in range(14)],
    }
    batcher = ContrastiveBatcher(datasets, batch_size=4, seed=1)
    assert batcher.batches_per_epoch() == 30 // 4 + 14 // 4
    seen: list[str] = []
    for _ in range(batcher.batches_per_epoch()):
        name, batch = batcher.next_batch()
        assert len(batch) == 4 and {p.task for p in batch} == {name}
        seen.extend(p.id for p in batch)
    assert len(seen) == len(set(seen))  # no pair twice in an epoch
    assert batcher.state.epoch == 0
    batcher.next_batch()
    assert batcher.state.epoch == 1  # rolls over
    with pytest.raises(ValueError, match="no sub-dataset has 40 pairs"):
        ContrastiveBatcher(datasets, batch_size=40)


def test_false_negatives_with_the_same_target_are_masked() -> None:
    from umerl.train.losses import info_nce

    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    t[2] = t[0]  # pairs 0 and 2 share their target ("seven")
    ids = torch.tensor([7, 1, 7, 3])
    masked = info_nce(q, t, scale=50.0, target_ids=ids)
    # reference: per row, drop the other columns that carry the same target id
    logits = 50.0 * q @ t.T
    losses = []
    for i in range(4):
        keep = [j for j in range(4) if j == i or ids[j] != ids[i]]
        losses.append(-torch.log_softmax(logits[i, keep], 0)[keep.index(i)])
        losses.append(-torch.log_softmax(logits.T[i, keep], 0)[keep.index(i)])
    assert torch.allclose(masked, torch.stack(losses).mean(), atol=1e-5)
    assert not torch.allclose(masked, info_nce(q, t, scale=50.0), atol=1e-3)
    distinct = torch.arange(4)
    assert torch.allclose(info_nce(q, t, 50.0, target_ids=distinct), info_nce(q, t, 50.0))


def test_batcher_state_resumes_the_same_sequence() -> None:
    datasets = {"ret": [pair(i, f"doc {i}") for i in range(20)]}
    a = ContrastiveBatcher(datasets, batch_size=4, seed=7)
    first = [a.next_batch() for _ in range(7)]
    b = ContrastiveBatcher(datasets, batch_size=4, seed=7)
    [b.next_batch() for _ in range(3)]
    c = ContrastiveBatcher(datasets, batch_size=4, seed=7)
    c.load_state_dict(b.state_dict())
    rest = [c.next_batch() for _ in range(4)]
    assert [[p.id for p in batch] for _, batch in rest] == \
           [[p.id for p in batch] for _, batch in first[3:]]
    assert [p.id for p in shard(first[0][1], 1, 2)] == [p.id for p in first[0][1][2:]]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    lines = []
    for i in range(24):
        completion = format_completion(f"item {i} is about topic {i % 6}", f"topic {i}")
        lines.append(json.dumps({
            "id": str(i), "task": "toy",
            "query": {"text": f"find item {i}", "completion": completion},
            "target": {"text": f"item {i} text", "completion": completion},
        }))
    path.write_text("\n".join(lines) + "\n")
    return path


def sft_config(out: Path, data: Path, steps: int, resume: str = "auto"):
    return load_recipe(None, [
        f"output_dir={out}", f'sft.data=["{data}"]', f"sft.max_steps={steps}",
        "sft.micro_batch_size=4", "sft.save_every=2", "sft.log_every=100", "sft.lr=0.01",
        "sft.warmup_ratio=0.25", f"sft.resume={resume}", "wandb.mode=disabled",
    ])


def test_resume_after_a_stop_matches_an_uninterrupted_run(tiny_model_dir, sft_data, tmp_path):
    from umerl.train import dist as udist
    from umerl.train.sft import SftRun

    udist.init_single_process()
    straight = SftRun(sft_config(tmp_path / "a", sft_data, 4), str(tiny_model_dir))
    straight.train()

    # The same run, stopped after step 2 (its checkpoint), then started again with resume=auto.
    stopped = SftRun(sft_config(tmp_path / "b", sft_data, 4), str(tiny_model_dir))
    for _ in range(2):
        stopped.optimizer_step()
        stopped.state.step += 1
    stopped.save()
    stopped.optimizer_step()  # work after the last checkpoint is lost in the "crash"
    resumed = SftRun(sft_config(tmp_path / "b", sft_data, 4), str(tiny_model_dir))
    assert resumed.resume() is not None and resumed.state.step == 2
    assert resumed.batcher.state.position == stopped.batcher.state.position - 1
    resumed.state.step = 0  # train() resumes again by itself
    resumed.train()

    a = straight.engine.module.state_dict()
    b = resumed.engine.module.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key
    assert not torch.allclose(a["model.lm_head.weight"],
                              stopped.engine.module.state_dict()["model.lm_head.weight"])
    final = ckpt.latest(tmp_path / "b" / "sft")
    assert final is not None and final.name == "step_00000004"
    assert ckpt.read_manifest(final)["stage"] == "sft"


def test_resume_checks_hashes_before_deepspeed_unpickles(tiny_model_dir, sft_data, tmp_path):
    """Issue 24: the client state and RNG states load with ``weights_only=True``; DeepSpeed's
    own files (which it unpickles) are loaded only once every file matches its SHA-256, so a
    same-size replacement carrying code is refused, naming the file, and its code never runs."""
    import os
    import pickle

    from umerl.train import dist as udist
    from umerl.train.sft import SftRun

    udist.init_single_process()
    SftRun(sft_config(tmp_path / "run", sft_data, 2), str(tiny_model_dir)).train()
    state = ckpt.latest(tmp_path / "run" / "sft") / ckpt.TRAIN_STATE
    marker = tmp_path / "the-pickle-ran"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    target = state / "ds" / "mp_rank_00_model_states.pt"
    evil = pickle.dumps(Payload())
    target.write_bytes(evil + b"\0" * (target.stat().st_size - len(evil)))  # same size
    resumed = SftRun(sft_config(tmp_path / "run", sft_data, 4), str(tiny_model_dir))
    with pytest.raises(ckpt.CheckpointError, match="SHA-256") as err:
        resumed.resume()
    assert str(target) in str(err.value)
    assert not marker.exists()
    client = torch.load(state / "client_state.pt", weights_only=True)
    assert client["step"] == 2 and client["stage"] == "sft" and "data" in client
    assert set(torch.load(state / "rng_rank0.pt", weights_only=True)) == {"python", "numpy",
                                                                         "torch"}


def test_a_fresh_run_refuses_another_runs_checkpoints(tiny_model_dir, sft_data, tmp_path):
    """Issue 24: a fresh run (resume=null) beside an older run's later steps deleted its own new
    checkpoints. It now stops before training, naming the folder and the ways out."""
    from umerl.train import dist as udist
    from umerl.train.sft import SftRun

    udist.init_single_process()
    SftRun(sft_config(tmp_path / "run", sft_data, 4), str(tiny_model_dir)).train()
    older = sorted(p.name for p in (tmp_path / "run" / "sft").glob("step_*"))
    fresh = SftRun(sft_config(tmp_path / "run", sft_data, 2, resume="null"),
                   str(tiny_model_dir))
    with pytest.raises(ckpt.CheckpointError, match="sft.resume=auto") as err:
        fresh.train()
    assert str(tmp_path / "run" / "sft") in str(err.value) and fresh.state.step == 0
    assert sorted(p.name for p in (tmp_path / "run" / "sft").glob("step_*")) == older
