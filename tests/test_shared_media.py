"""Shared media (``learner.shared_media``): where a micro-batch runs whole rows (ZeRO-3,
gradient checkpointing), each distinct side is encoded once and its images and video go
through the vision tower once, their outputs indexed out to the G rows that hold them.

Checked: the forward and its gradients against whole rows in every Qwen-VL family; the
encodes and the media through the tower in a learner step (counted with spies on the real
encoder and towers); and, on 2 gloo ranks under ZeRO-3 with gradient checkpointing, a learner
step's metrics, reduced gradients and updated weights against the same step on whole rows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from test_zero3 import _media, _save_full_weights, _spawn_bounded

from umerl.data.tokens import format_completion

G = 4


def _pairs(media: dict[str, list[str]], which: int = 0) -> list[Any]:
    """Two pairs of known media: (query, target) = (2 images, text), (1 image, a 3-frame
    video) for data 0; (1 image, 1 image), (text, 2 images) for data 1 (no video); data 2 is
    data 0's modalities with other images and words."""
    from umerl.data.formats import Pair, Side

    img, video = media["images"], tuple(media["video"])
    if which == 0:
        return [Pair("a", "toy", Side("two pictures", images=tuple(img[:2])), Side("words")),
                Pair("b", "toy", Side("one picture", images=(img[2],)),
                     Side("a clip", video=video))]
    if which == 2:
        return [Pair("e", "toy", Side("the other two", images=tuple(img[2:])),
                     Side("some other words")),
                Pair("f", "toy", Side("first one", images=(img[0],)),
                     Side("the same clip", video=video))]
    return [Pair("c", "toy", Side("third", images=(img[3],)), Side("first", images=(img[0],))),
            Pair("d", "toy", Side("only text"), Side("pair", images=tuple(img[1:3])))]


def _rollouts(tokenizer, pairs: list[Any]) -> list[list[list[list[int]]]]:
    """G completions per side of each pair, of different lengths, some writing <gen_emb>."""
    out = []
    for side in "qt":
        groups = []
        for p in pairs:
            texts = [format_completion(f"{side} {p.id} " + "x " * k, str(k)) if k % 2 else
                     f"{side} {p.id} " + "y " * k for k in range(G)]
            groups.append([tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts])
        out.append(groups)
    return out


# -- the forward ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_shared_media_forward_and_gradients_equal_whole_rows(family, tmp_path):
    """Images (two in one side), a video and a text side (the blank image), G rows each; with
    and without the lockstep media ZeRO-3 adds. Outputs bit for bit, gradients (the vision
    tower's too: every parameter trains here) to float rounding of the summation order."""
    from umerl.model.loading import load_policy
    from umerl.model.policy import PolicyModule
    from umerl.model.tiny import build_tiny_model
    from umerl.train.learner import distinct_sides

    bundle = load_policy(str(build_tiny_model(tmp_path / family, family=family)))
    media = _media(tmp_path)
    sides = [s for p in _pairs(media) for s in (p.query, p.target)]
    row_sides = [s for s in sides for _ in range(G)]
    generator = torch.Generator().manual_seed(0)
    completions = [torch.randint(10, 300, (2 + i % 5,), generator=generator).tolist()
                   for i in range(len(row_sides))]
    encoder = bundle.encoder
    whole = encoder.policy_inputs([encoder.encode(s) for s in row_sides], completions)
    distinct, rows = distinct_sides(row_sides)
    assert len(distinct) == len(sides) and rows == [i // G for i in range(len(row_sides))]
    shared = encoder.shared_media_inputs([encoder.encode(s) for s in distinct], rows,
                                         completions)
    # each medium once: a G-th of the whole rows' pixels
    assert shared["pixel_values"].shape[0] * G == whole["pixel_values"].shape[0]
    assert shared["pixel_values_videos"].shape[0] * G == whole["pixel_values_videos"].shape[0]
    for lockstep in (None, encoder.blank_media()):
        policy = PolicyModule(bundle.model, bundle.disc_id, bundle.gen_id,
                              lockstep_media=lockstep).train()
        (base, base_grads), (got, got_grads) = (_forward_and_grads(policy, inputs)
                                                for inputs in (whole, shared))
        for field in ("disc", "gen", "gen_found", "logprobs", "completion_mask"):
            assert torch.equal(getattr(got, field), getattr(base, field)), field
        assert got_grads.keys() == base_grads.keys()
        assert sum("visual" in n for n in got_grads) > 10  # the tower's own blocks too
        for name, grad in base_grads.items():  # fp32 sums in another order: 1e-6 relative
            scale = float(grad.abs().max())
            assert torch.allclose(got_grads[name], grad, rtol=1e-5, atol=1e-6 * scale), name
    bundle.model.zero_grad(set_to_none=True)


def _forward_and_grads(policy, inputs: dict[str, torch.Tensor]) -> tuple[Any, dict]:
    policy.zero_grad(set_to_none=True)
    out = policy(**dict(inputs))
    weights = torch.linspace(-1, 1, out.gen.shape[-1])
    (out.logprobs.sum() + (out.gen * weights).sum() + (out.disc * weights).sum()).backward()
    return out, {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


# -- the counts ----------------------------------------------------------------------------------

class TowerSpy:
    """Forward hooks on vision towers: the media (rows of ``grid_thw``) of each call."""

    def __init__(self, towers: list[torch.nn.Module]):
        self.calls: list[int] = []
        self.handles = [t.register_forward_hook(self._hook, with_kwargs=True) for t in towers]

    def _hook(self, module, args, kwargs, output) -> None:
        grid = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        self.calls.append(int(grid.shape[0]))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _count_encodes(encoder) -> list[int]:
    """Wrap the encoder instance's ``encode`` (the processor + tokenizer call) with a counter."""
    calls: list[int] = []
    plain = encoder.encode

    def counted(*args, **kwargs):
        calls.append(1)
        return plain(*args, **kwargs)

    encoder.encode = counted
    return calls


def test_a_learner_step_encodes_each_side_and_runs_each_medium_once(tiny_model_dir, tmp_path):
    """Gradient checkpointing (whole rows: no shared prompt), micro-batches of one group (G
    rows of one side): 2 pairs x 2 sides encoded 4 times, not G x 4 = 16; the policy tower
    (scoring pass + update pass) and the reference tower see each medium of a micro-batch
    once, in as many calls as before (one per modality present)."""
    from umerl.config.recipe import load_recipe
    from umerl.train import dist as udist
    from umerl.train.learner import Learner, StepShard

    udist.init_single_process()
    cfg = load_recipe(None, [
        f"output_dir={tmp_path}", "rl.pairs_per_step=2", f"rl.group_size={G}",
        f"learner.micro_batch_size={G}", "learner.num_workers=1",
        "learner.gradient_checkpointing=true", "wandb.mode=disabled"])
    learner = Learner(cfg, str(tiny_model_dir), str(tiny_model_dir))
    assert not learner.shared_prompt and not learner.single_forward
    pairs = _pairs(_media(tmp_path))
    encodes = _count_encodes(learner.bundle.encoder)
    policy = TowerSpy([learner.bundle.model.model.visual])
    reference = TowerSpy([learner.reference.model.model.visual])
    try:
        learner.step(StepShard(1, pairs, 0, *_rollouts(learner.bundle.tokenizer, pairs)))
    finally:
        policy.remove()
        reference.remove()
    assert len(encodes) == 4
    # one call per micro-batch: query (2 images), query (1 image), target (the blank image),
    # target (the video); whole rows would hold G times each
    per_pass = [2, 1, 1, 1]
    assert reference.calls == per_pass
    assert policy.calls == per_pass + per_pass  # scoring pass, then the update's


# -- ZeRO-3 on 2 gloo ranks ----------------------------------------------------------------------

def _zero3_main(rank: int, port: int, model: str, root: str, media: dict[str, list[str]],
                data: tuple[int, int], checkpointing: bool) -> None:
    """The same learner step with shared media on, then off (whole rows), from the same start,
    under ZeRO-3, rank r on ``_pairs(media, data[r])``; micro-batches of 2 rows, which split
    groups of G = 4 in two. Each rank saves its metrics, the gradient partitions DeepSpeed
    hands the optimizer, its tower calls and encodes; rank 0 the updated full weights."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    from umerl.config.recipe import load_recipe
    from umerl.train import dist as udist
    from umerl.train.learner import Learner, StepShard

    udist.init_process_group(rank, 2, "127.0.0.1", port, backend="gloo")
    root_path = Path(root)
    for shared in (True, False):
        cfg = load_recipe(None, [
            f"output_dir={root_path / str(shared)}", "rl.pairs_per_step=4",
            f"rl.group_size={G}", "rl.lr=0.001", "learner.num_workers=2",
            "learner.zero_stage=3", f"learner.gradient_checkpointing={checkpointing}",
            "learner.micro_batch_size=2", f"learner.shared_media={shared}",
            "wandb.mode=disabled"])
        learner = Learner(cfg, model, model)
        pairs = _pairs(media, data[rank])
        grads = _record_gradients(learner.optimizer)
        encodes = _count_encodes(learner.bundle.encoder)
        towers = TowerSpy([learner.bundle.model.model.visual])
        metrics = learner.step(StepShard(1, pairs, 2 * rank,
                                         *_rollouts(learner.bundle.tokenizer, pairs)))
        towers.remove()
        torch.save({"metrics": metrics, "grads": grads, "tower": towers.calls,
                    "encodes": len(encodes)}, root_path / f"rank{rank}_{shared}.pt")
        _save_full_weights(learner.engine, root_path / f"weights_{shared}.pt")
    udist.barrier()


def _record_gradients(optimizer) -> list[list[torch.Tensor]]:
    """Every call of the optimizer's ``step``: the gradients it is about to apply (under
    ZeRO-3 this rank's reduced, clipped fp32 partitions)."""
    seen: list[list[torch.Tensor]] = []
    plain = optimizer.step

    def recording(closure=None):
        seen.append([p.grad.detach().clone() for group in optimizer.param_groups
                     for p in group["params"] if p.grad is not None])
        return plain(closure)

    optimizer.step = recording
    return seen


@pytest.mark.parametrize("data, checkpointing", [
    ((0, 1), False),  # a video on rank 0 only
    ((0, 1), True),  # the same with gradient checkpointing (hung with a tower call per modality)
    ((0, 2), True),  # gradient checkpointing; both ranks' micro-batches of one modality
])
def test_zero3_learner_step_with_shared_media_equals_whole_rows(data, checkpointing, tmp_path,
                                                                tiny_model_dir):
    """Metrics (timings aside) equal; the reduced gradient partitions each rank hands the
    optimizer equal to fp32 summation order (1e-6 of the largest); the updated weights (lr
    1e-3) to 1e-6, and moved. Encodes and tower media fewer, tower calls as many, as the
    other rank's too (lockstep: one call per forward)."""
    from umerl.model.loading import load_policy
    from umerl.train.dist import free_port

    media = _media(tmp_path)
    _spawn_bounded(_zero3_main, (free_port(), str(tiny_model_dir), str(tmp_path), media, data,
                                 checkpointing))
    runs = {(rank, shared): torch.load(tmp_path / f"rank{rank}_{shared}.pt")
            for rank in (0, 1) for shared in (True, False)}
    for rank in (0, 1):
        got, base = runs[rank, True], runs[rank, False]
        # 2 sides x 4 micro-batches of 2 rows, each of one side: 8 encodes, not 16
        assert (got["encodes"], base["encodes"]) == (8, 16)
        # Lockstep: every forward calls the tower once (8 micro-batches, a scoring and an
        # update forward each), on every rank, with or without sharing; shared, it sees fewer
        # media per call.
        assert len(got["tower"]) == len(base["tower"]) == len(runs[1 - rank, True]["tower"]) == 16
        assert sum(got["tower"]) < sum(base["tower"])
        assert got["metrics"].keys() == base["metrics"].keys()
        for key, value in base["metrics"].items():
            if not key.startswith("timing_s/"):
                assert got["metrics"][key] == pytest.approx(value, abs=1e-6), key
        assert len(got["grads"]) == len(base["grads"]) >= 1
        for step_got, step_base in zip(got["grads"], base["grads"]):
            assert len(step_got) == len(step_base) >= 1
            for g, b in zip(step_got, step_base):
                assert g.shape == b.shape and g.abs().sum() > 0
                assert torch.allclose(g, b, rtol=0, atol=1e-6 * float(b.abs().max()))
    start = load_policy(tiny_model_dir).model.state_dict()
    got, base = torch.load(tmp_path / "weights_True.pt"), torch.load(tmp_path / "weights_False.pt")
    assert got.keys() == base.keys() == start.keys()
    for key in base:
        assert torch.allclose(got[key], base[key], rtol=0, atol=1e-6), key
    assert sum(not torch.allclose(base[k], start[k], atol=1e-4) for k in base) > 10


def test_a_transformers_without_encoder_outputs_is_refused(tiny_bundle, monkeypatch):
    """Shared and lockstep media hand the tower's outputs to the model as
    ``mm_encoder_outputs`` (transformers >= 5.18). A forward without that keyword (5.17's,
    which took it into ``**kwargs`` and embedded the image placeholders as text) is refused
    when the learner's module is built, naming the version needed. The stand-in forward keeps
    5.17's signature shape: the model's own arguments, then ``**kwargs``."""
    import transformers

    from umerl.model.policy import PolicyModule

    base = tiny_bundle.model.model
    PolicyModule(tiny_bundle.model, tiny_bundle.disc_id, tiny_bundle.gen_id)  # 5.18+: accepted

    def forward_517(input_ids=None, attention_mask=None, pixel_values=None, **kwargs):
        raise AssertionError("never called")

    monkeypatch.setattr(base, "forward", forward_517)
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    with pytest.raises(RuntimeError, match=r"transformers 5\.17\.0: .*mm_encoder_outputs.*"
                                           r"transformers>=5\.18,<5\.20"):
        PolicyModule(tiny_bundle.model, tiny_bundle.disc_id, tiny_bundle.gen_id)


def test_the_named_transformers_requirement_is_the_projects() -> None:
    """The refusal above names pyproject.toml's own requirement, not a copy that drifted."""
    import tomllib

    from umerl.model.policy import TRANSFORMERS_REQUIREMENT

    with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as handle:
        deps = tomllib.load(handle)["project"]["dependencies"]
    assert TRANSFORMERS_REQUIREMENT in deps
