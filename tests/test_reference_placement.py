"""``learner.reference_placement``: the frozen KL reference as a full copy per learner
(``device``) or as a DeepSpeed ZeRO-3 inference engine partitioned over the learners
(``zero3``, ``zero3_offload``), on 2 gloo ranks (DeepSpeed's CPU accelerator); and no
reference at all without a KL term."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from test_zero3 import _completions, _media, _rank_pairs, _spawn_bounded

from umerl.config.recipe import load_recipe
from umerl.config.schema import ConfigError

PLACEMENTS = ("device", "zero3", "zero3_offload")


def _config(out: Path, placement: str, *overrides: str):
    return load_recipe(None, [
        f"output_dir={out}", "rl.pairs_per_step=4", "rl.group_size=2", "rl.lr=0.01",
        "learner.num_workers=2", "learner.zero_stage=3",
        f"learner.reference_placement={placement}", "wandb.mode=disabled", *overrides,
    ])


def _placements_main(rank: int, port: int, model: str, root: str,
                     media: dict[str, list[str]]) -> None:
    """Per placement, from the same start: the reference's log-probs of this rank's rollouts
    (rank 0's query batch holds a video, rank 1's only images: the vision-tower calls differ
    unless kept in lockstep), the second learner step's metrics, and the reference's parameter
    elements on this rank, all saved per rank."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    from umerl.train import dist as udist
    from umerl.train.learner import Learner, StepShard
    from umerl.train.reference import resident_elements

    udist.init_process_group(rank, 2, "127.0.0.1", port, backend="gloo")
    for placement in PLACEMENTS:
        learner = Learner(_config(Path(root) / placement, placement), model, model)
        pairs = _rank_pairs(media, rank)
        tokenizer, encoder = learner.bundle.tokenizer, learner.bundle.encoder
        rollouts = [[_completions(tokenizer, f"{side} {p.id}") for p in pairs] for side in "qt"]
        inputs = encoder.policy_inputs([encoder.encode(p.query) for p in pairs for _ in "ab"],
                                       [c for group in rollouts[0] for c in group])
        with torch.no_grad():
            ref = learner.reference(**inputs).logprobs
        learner.step(StepShard(1, pairs, 2 * rank, *rollouts))
        # step 2: the policy has moved off the reference, so the KL term is not 0
        metrics = learner.step(StepShard(2, pairs, 2 * rank, *rollouts))
        partition = sum(p.ds_tensor.numel() for p in learner.reference.parameters()
                        if hasattr(p, "ds_tensor"))
        torch.save({"ref": ref, "metrics": metrics, "partition": partition,
                    "resident": sum(resident_elements(learner.reference).values())},
                   Path(root) / f"{placement}_rank{rank}.pt")
    udist.barrier()


@pytest.fixture(scope="module")
def placements(tmp_path_factory, tiny_model_dir):
    from umerl.train.dist import free_port

    root = tmp_path_factory.mktemp("refplace")
    _spawn_bounded(_placements_main, (free_port(), str(tiny_model_dir), str(root),
                                      _media(root)))
    return {(placement, rank): torch.load(root / f"{placement}_rank{rank}.pt")
            for placement in PLACEMENTS for rank in (0, 1)}


def _full_count(model_dir) -> int:
    """The policy's parameter elements (with the embedding tokens ``load_policy`` adds)."""
    from umerl.model.loading import load_policy

    return sum(p.numel() for p in load_policy(model_dir).model.parameters())


@pytest.mark.parametrize("placement", ["zero3", "zero3_offload"])
def test_zero3_reference_logprobs_and_step_equal_the_device_copy(placements, placement):
    """The same reference log-probs (a video on one rank only, images on the other) and the
    same learner steps, KL included, as with a full copy per rank."""
    for rank in (0, 1):
        got, want = placements[(placement, rank)], placements[("device", rank)]
        assert got["ref"].shape == want["ref"].shape and (want["ref"] < 0).any()
        assert torch.allclose(got["ref"], want["ref"], atol=1e-6, rtol=0), rank
        assert want["metrics"]["actor/kl"] > 0  # the step ran the KL term
        compared = [k for k in want["metrics"] if k.startswith(("actor/", "reward/"))]
        assert "actor/loss" in compared and "actor/kl_loss" in compared
        for key in compared:
            assert got["metrics"][key] == pytest.approx(want["metrics"][key], abs=1e-7), key


@pytest.mark.parametrize("placement", ["zero3", "zero3_offload"])
def test_each_rank_holds_its_partition_of_the_reference(placements, placement, tiny_model_dir):
    """A full copy per rank for ``device``; about half of it per rank under ZeRO-3 (the
    partitions of the two ranks cover the model; norms and biases stay whole, a few %)."""
    full = _full_count(tiny_model_dir)
    assert placements[("device", 0)]["resident"] == full
    assert placements[("device", 0)]["partition"] == 0
    partitions = [placements[(placement, rank)]["partition"] for rank in (0, 1)]
    assert full <= sum(partitions) <= full + 2 * 200  # padding: < 2 elements per tensor
    for rank in (0, 1):
        resident = placements[(placement, rank)]["resident"]
        print(f"{placement} rank {rank}: {resident} of {full} elements")
        assert full / 2 <= resident <= 0.6 * full, (rank, resident, full)


@pytest.mark.parametrize("offload", [False, True])
def test_the_zero3_reference_moves_its_buffers_where_its_forwards_run(tiny_model_dir, offload):
    """zero.Init places and partitions parameters only, and ``deepspeed.initialize`` leaves
    such a module where it is: the engine moves the buffers (the rotary embeddings'
    inv_freq) to the learner's device itself. On an H200 the buffers left on the CPU failed
    the first forward (gpu_check's ZeRO-3 reference); here ``meta`` stands in for the GPU
    that the CPU machines lack."""
    from umerl.model.loading import load_policy
    from umerl.train import dist as udist
    from umerl.train.reference import zero3_inference_engine

    udist.init_single_process()
    engine = zero3_inference_engine(load_policy(tiny_model_dir), offload, 256,
                                    torch.device("meta"))
    buffers = dict(engine.module.named_buffers())
    assert any(name.endswith("inv_freq") for name in buffers)
    assert {b.device.type for b in buffers.values()} == {"meta"}
    assert {p.device.type for p in engine.module.parameters()} == {"cpu"}  # DeepSpeed's


def test_no_reference_without_a_kl_term(tmp_path, tiny_model_dir, benchmark_manifest):
    """rl.kl_beta 0: the learner builds no reference, and steps with a KL of 0."""
    from test_off_policy import rl_pairs

    from umerl.train import dist as udist
    from umerl.train.learner import Learner, StepShard

    udist.init_single_process()
    cfg = load_recipe(None, [f"output_dir={tmp_path}", "rl.pairs_per_step=2",
                             "rl.group_size=2", "rl.kl_beta=0", "learner.num_workers=1",
                             "wandb.mode=disabled"])
    learner = Learner(cfg, str(tiny_model_dir), str(tmp_path / "no-such-reference"))
    assert learner.reference is None
    pairs = rl_pairs(benchmark_manifest)
    rollouts = [[_completions(learner.bundle.tokenizer, f"{side} {p.id}") for p in pairs]
                for side in "qt"]
    metrics = learner.step(StepShard(1, pairs, 0, *rollouts))
    assert metrics["actor/kl"] == 0 and torch.isfinite(torch.tensor(metrics["actor/loss"]))


@pytest.mark.parametrize("placement", ["zero3", "zero3_offload"])
def test_zero3_reference_needs_a_zero3_policy(placement, tmp_path):
    with pytest.raises(ConfigError, match="reference_placement.*needs.*zero_stage"):
        _config(tmp_path, placement, "learner.zero_stage=2")
    assert _config(tmp_path, placement).learner.reference_placement == placement
    with pytest.raises(ConfigError, match="reference_placement"):
        _config(tmp_path, "cpu")
