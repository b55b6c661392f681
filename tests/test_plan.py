"""``umerl plan``: parameter counts against the real models, the state bytes against a real
torch AdamW on the tiny model, and the GPU recipes' estimates."""

from __future__ import annotations

import pytest
import torch

from umerl.cli import main
from umerl.config.recipe import load_recipe
from umerl.plan import GIB, KNOWN_MODELS, learner_column, resolve_shape, shape_from_config


def tiny_model(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path)


def test_counts_by_part_equal_the_loaded_tiny_model(tiny_model_dir):
    from umerl.train.engine import parameter_group

    shape = resolve_shape(None, model_config=str(tiny_model_dir))
    counts = {"llm": 0, "projector": 0, "vision": 0}
    for name, p in tiny_model(tiny_model_dir).named_parameters():
        counts[parameter_group(name)] += p.numel()
    assert shape.params == counts and all(counts.values())


def test_state_bytes_equal_a_real_adamw_step_on_the_tiny_model(tiny_model_dir):
    """fp32, one rank, no ZeRO: weights + gradients + Adam moments, as the estimate says."""
    from umerl.train.engine import set_trainable

    cfg = load_recipe(None, ["learner.num_workers=1", "learner.zero_stage=0",
                             "rl.pairs_per_step=1", "learner.bf16=false"])
    held = {item: b for item, b, _ in learner_column(
        cfg, resolve_shape(None, model_config=str(tiny_model_dir)), 80 * GIB).held}
    model = tiny_model(tiny_model_dir)
    set_trainable(model, dict(cfg.learner.train))
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained)
    for p in trained:
        p.grad = torch.ones_like(p)
    optimizer.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    moments = [v for state in optimizer.state.values() for k, v in state.items() if k != "step"]
    assert held["policy weights"] == nbytes(model.parameters())
    assert held["gradients"] == nbytes(p.grad for p in trained)
    assert held["optimizer states"] == nbytes(moments)
    assert held["reference policy"] == nbytes(model.parameters())


@pytest.mark.parametrize("name,public", [("qwen2-vl-2b", 2.21e9), ("qwen2-vl-7b", 8.29e9)])
def test_built_in_shapes_give_the_published_sizes(name, public):
    """The model cards' sizes (2.21B, 8.29B parameters)."""
    shape = shape_from_config(KNOWN_MODELS[name], name)
    assert shape.total == pytest.approx(public, abs=0.005e9)
    assert shape.vocab == KNOWN_MODELS[name]["vocab_size"]


@pytest.mark.parametrize("size", ["2b", "7b"])
def test_gpu_recipes_fit_80_gib(size, capsys):
    assert main(["plan", f"recipes/qwen2vl_{size}_grpo.yaml", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert f"built-in qwen2-vl-{size}" in out and "DOES NOT FIT" not in out
    learner = out.split("learner GPU")[1].split("rollout GPU")[0]
    margin = float(learner.split("margin ")[1].split(" GiB")[0])
    assert margin >= 10, out  # the 7B learner (ZeRO-3 reference): 32.6 GiB at the time of writing


def test_a_gpu_too_small_is_exit_3_and_named(capsys):
    assert main(["plan", "recipes/qwen2vl_7b_grpo.yaml", "--gpu-memory", "40"]) == 3
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "does not fit 40 GiB" in out


def test_images_bound_by_max_pixels_shrink_the_activations():
    shape = shape_from_config(KNOWN_MODELS["qwen2-vl-7b"], "7b")
    figures = {}
    for pixels in ("null", "1003520"):
        cfg = load_recipe("recipes/qwen2vl_7b_grpo.yaml", [f"model.max_pixels={pixels}"])
        step = learner_column(cfg, shape, 80 * GIB).transient["step"]
        figures[pixels] = dict((item, b) for item, b, _ in step)["activations"]
    assert figures["null"] > 3 * figures["1003520"]


@pytest.mark.parametrize("placement,kl_beta,gpu_elements", [
    ("device", 0.04, 8_291_375_616), ("zero3", 0.04, 8_291_375_616 // 4),
    ("zero3_offload", 0.04, 0), ("device", 0.0, 0), ("zero3", 0.0, 0)])
def test_reference_line_follows_its_placement(placement, kl_beta, gpu_elements):
    """learner.reference_placement: a full bf16 copy per GPU, a quarter of it over 4 ZeRO-3
    learners, none on the GPU offloaded (its partition in CPU memory, said in a note), none
    at all without a KL term; the ZeRO-3 ones add a reference forward's gathered layers.
    8,291,375,616: Qwen2-VL-7B's published parameter count (8.29B)."""
    shape = shape_from_config(KNOWN_MODELS["qwen2-vl-7b"], "7b")
    assert shape.total == 8_291_375_616
    cfg = load_recipe("recipes/qwen2vl_7b_grpo.yaml", [
        f"learner.reference_placement={placement}", f"rl.kl_beta={kl_beta}"])
    col = learner_column(cfg, shape, 80 * GIB)
    held = {item: b for item, b, _ in col.held}
    assert held["reference policy"] == gpu_elements * 2
    sharded = placement != "device" and kl_beta > 0
    assert ("reference forward" in col.transient) == sharded
    offloaded = [n for n in col.notes if "CPU memory" in n]
    assert len(offloaded) == (placement == "zero3_offload" and kl_beta > 0)
    if offloaded:
        assert f"{8_291_375_616 * 2 / 4 / GIB:.1f} GiB per learner process" in offloaded[0]


def test_the_7b_recipe_fits_better_with_its_reference_sharded():
    """The recipe's zero3 reference leaves 3/4 of the 15.4 GiB copy free on every learner."""
    shape = shape_from_config(KNOWN_MODELS["qwen2-vl-7b"], "7b")
    margins = {placement: learner_column(load_recipe("recipes/qwen2vl_7b_grpo.yaml", [
        f"learner.reference_placement={placement}"]), shape, 80 * GIB).margin
        for placement in ("device", "zero3")}
    assert load_recipe("recipes/qwen2vl_7b_grpo.yaml", []).learner.reference_placement == "zero3"
    assert margins["zero3"] - margins["device"] == 8_291_375_616 * 2 * 3 // 4


@pytest.mark.parametrize("zero", [2, 3])
def test_the_zero_gradient_buckets_are_what_deepspeed_allocates(zero, tiny_model_dir, tmp_path,
                                                                benchmark_manifest, monkeypatch):
    """A learner step's largest allocation is DeepSpeed's gradient bucket, and the plan counts
    it: two in fp32 under ZeRO-2 (allocated at each backward; two were alive at once on an
    H200), one in the weights' dtype held under ZeRO-3. Before the learners sized it,
    DeepSpeed's default bucket (5e8 elements, 2 GB in fp32) was most of a tiny learner's
    memory and missing from the plan."""
    from test_off_policy import rl_pairs
    from test_zero3 import _completions

    from umerl.train import dist as udist
    from umerl.train.learner import Learner, StepShard

    udist.init_single_process()
    cfg = load_recipe(None, [f"output_dir={tmp_path}", "rl.pairs_per_step=2", "rl.group_size=2",
                             "learner.num_workers=1", f"learner.zero_stage={zero}",
                             "learner.bf16=false", "rl.kl_beta=0", "wandb.mode=disabled"])
    sizes: list[int] = []  # bytes of every torch.empty from here (DeepSpeed's buckets among them)
    real = torch.empty

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        sizes.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(torch, "empty", spy)
    learner = Learner(cfg, str(tiny_model_dir), str(tiny_model_dir))
    pairs = rl_pairs(benchmark_manifest)
    rollouts = [[_completions(learner.bundle.tokenizer, f"{side} {p.id}") for p in pairs]
                for side in "qt"]
    learner.step(StepShard(1, pairs, 0, *rollouts))
    col = learner_column(cfg, resolve_shape(None, model_config=str(tiny_model_dir)), 80 * GIB)
    lines = {item: b for item, b, _ in col.held + col.transient["step"]}
    if zero == 3:
        assert lines["ZeRO-3 gradient bucket"] == max(sizes)
    else:
        assert lines["ZeRO gradient buckets"] == 2 * max(sizes)
