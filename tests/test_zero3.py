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


def _config(out: Path, data: Path, steps: int, *overrides: str):
    from umerl.config.recipe import load_recipe

    return load_recipe(None, [
        f"output_dir={out}", f'sft.data=["{data}"]', f"sft.max_steps={steps}",
        "sft.micro_batch_size=2", "sft.num_workers=2", "sft.zero_stage=3", "sft.save_every=2",
        "sft.log_every=100", "sft.lr=0.01", "wandb.mode=disabled", *overrides,
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


# -- any mix of modalities ------------------------------------------------------------------------
# Qwen-VL runs its vision tower once for a batch's images and once more for its videos; under
# ZeRO-3 each call gathers the tower's parameters (a collective) and DeepSpeed checks that every
# rank ran the same modules. A rank whose micro-batch holds a video and one whose micro-batch
# holds none must still train, not hang or disagree.

HANG_LIMIT_S = 300  # far above a normal run (about a minute): past it the ranks are hung


def _spawn_bounded(fn, args: tuple, nprocs: int = 2) -> None:
    """``mp.spawn`` that fails the test when the ranks are still running after ``HANG_LIMIT_S``
    (an unmatched collective blocks forever) instead of hanging the test session."""
    import time

    context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + HANG_LIMIT_S
    while not context.join(timeout=5):  # raises ProcessRaisedException if a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"ranks still running after {HANG_LIMIT_S}s: hung in a collective")


def _media(root: Path) -> dict[str, list[str]]:
    """A few small images and a 3-frame video (odd: the last frame repeats into a pair)."""
    from PIL import Image

    def draw(name: str, colour: tuple[int, int, int], size: tuple[int, int]) -> str:
        path = root / f"{name}.png"
        Image.new("RGB", size, colour).save(path)
        return str(path)

    return {
        "images": [draw(f"img{i}", (40 * i, 200 - 30 * i, 90), (56, 84)) for i in range(4)],
        "video": [draw(f"frame{i}", (10, 60 * i, 250 - 60 * i), (84, 56)) for i in range(3)],
    }


def _rank_pairs(media: dict[str, list[str]], which: int, video_alone: bool = False):
    """Data rank ``which`` gets: 0 has a video-only query among image sides, 1 only images (a
    text-only side also runs the tower, on the blank image). ``video_alone``: both of data
    0's queries are video-only, so its query batch holds the video and no image."""
    from umerl.data.formats import Pair, Side

    img, video = media["images"], tuple(media["video"])
    done = format_completion

    def side(text: str, images: list[str] = (), vid: tuple[str, ...] = ()) -> Side:
        return Side(text=text, images=tuple(images), video=vid,
                    completion=done(f"about {text}", text))

    if which == 0:
        return [Pair("v", "toy", side("what happens", vid=video), side("a clip", img[:1])),
                Pair("a", "toy", side("what next", vid=video) if video_alone
                     else side("red one", img[1:2]), side("a red thing"))]
    return [Pair("b", "toy", side("blue one", img[2:3]), side("a blue thing", img[3:])),
            Pair("c", "toy", side("two", img[:2]), side("both", img[2:]))]


def _save_full_weights(engine, path: Path) -> None:
    """The engine's full weights (a collective under ZeRO-3: every rank calls it) to ``path``,
    written by rank 0."""
    from umerl.train.engine import full_state_dict

    state = full_state_dict(engine, 3)
    if state is not None:
        torch.save(state, path)


def _mixed_sft_main(rank: int, port: int, model: str, data: str, root: str,
                    media: dict[str, list[str]], checkpointing: bool) -> None:
    """Under ZeRO-3, with data 0 (the video) on rank 0 and data 1 (images) on rank 1: a no-grad
    forward of the queries (each rank saves its embeddings), then two SFT steps (rank 0 saves
    the weights); then the same two steps from the start with the ranks' data swapped. With
    ``checkpointing`` data 0's query batch holds the video alone (``_rank_pairs``)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    from umerl.train import dist as udist
    from umerl.train.sft import SftRun, loss_parts, side_inputs

    udist.init_process_group(rank, 2, "127.0.0.1", port, backend="gloo")
    root_path = Path(root)
    for order, which in (("as_given", rank), ("swapped", 1 - rank)):
        run = SftRun(_config(root_path / order, Path(data), 2,
                             f"sft.gradient_checkpointing={checkpointing}"), model)
        pairs = _rank_pairs(media, which, video_alone=checkpointing)
        if order == "as_given":
            with torch.no_grad():
                out = run.engine(**side_inputs(run.bundle, [p.query for p in pairs]))
            torch.save({"disc": out.disc, "gen": out.gen}, root_path / f"embed_data{which}.pt")
        for _ in range(2):
            parts, _ = loss_parts(run.engine, run.bundle, pairs, float(run.scfg.logit_scale))
            run.engine.backward(sum(parts.values()))
            run.engine.step()
        _save_full_weights(run.engine, root_path / f"sft_{order}.pt")
    udist.barrier()


def _assert_trained_alike(given: dict, swapped: dict, start: dict) -> None:
    """Both runs moved the weights, and alike: a few steps of Adam (lr 0.01) turn the float
    rounding of a summation order into differences up to ~2e-4 on single elements, while a
    wrong gradient moves elements by the learning rate."""
    assert given.keys() == swapped.keys() and len(given) > 10
    for key in given:
        assert torch.allclose(given[key], swapped[key], atol=1e-3, rtol=0), key
    moved = [k for k in given if not torch.allclose(given[k], start[k], atol=1e-3)]
    assert len(moved) > 10


@pytest.mark.parametrize("checkpointing", [False, True])  # True: every GPU SFT recipe's
def test_zero3_sft_trains_with_a_video_on_one_rank_only(checkpointing, tmp_path,
                                                        tiny_model_dir):
    """Rank 0's micro-batch holds a video, rank 1's only images: both SFT runs train (neither
    hangs nor aborts), alike whichever rank holds the video, and the live ZeRO-3 embeddings
    equal a plain forward's. With gradient checkpointing (every GPU SFT recipe's setting) one
    rank's query batch holds the video alone, the other's images alone. A coverage test of
    that setting, not a regression test: it passed on the tower-call-per-modality design too
    (the GRPO learner's micro-batches, below, and the shared-media test failed on it)."""
    from umerl.model.loading import load_policy
    from umerl.model.policy import PolicyModule
    from umerl.train.dist import free_port
    from umerl.train.sft import side_inputs

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({  # SftRun needs a data set; the test feeds its own
        "id": str(i), "task": "toy",
        "query": {"text": f"q {i}", "completion": format_completion("r", "s")},
        "target": {"text": f"t {i}", "completion": format_completion("t", "u")},
    }) + "\n" for i in range(4)))
    media = _media(tmp_path)
    _spawn_bounded(_mixed_sft_main, (free_port(), str(tiny_model_dir), str(data),
                                     str(tmp_path), media, checkpointing))
    start = load_policy(tiny_model_dir)
    _assert_trained_alike(torch.load(tmp_path / "sft_as_given.pt"),
                          torch.load(tmp_path / "sft_swapped.pt"), start.model.state_dict())
    plain = PolicyModule(start.model, start.disc_id, start.gen_id)
    for which in (0, 1):
        live = torch.load(tmp_path / f"embed_data{which}.pt")
        with torch.no_grad():
            queries = [p.query for p in _rank_pairs(media, which, checkpointing)]
            out = plain(**side_inputs(start, queries))
        assert torch.allclose(out.disc, live["disc"], atol=1e-5)
        assert torch.allclose(out.gen, live["gen"], atol=1e-5)


def _completions(tokenizer, prefix: str) -> list[list[int]]:
    """One pair's group of two rollouts (token ids), as a learner's step receives them."""
    texts = [format_completion(f"{prefix} {k}", str(k)) for k in range(2)]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _mixed_learner_main(rank: int, port: int, model: str, root: str,
                        media: dict[str, list[str]], checkpointing: bool,
                        micro_batch: int) -> None:
    """One GRPO learner step under ZeRO-3 (a no-grad scoring forward, then the update's), data
    0 on rank 0 (its query side: a video and images), data 1 (images) on rank 1; then the
    same step from the start with the ranks' data swapped. Each rank's query side has 4
    rows, 2 per pair: micro-batch size 0 runs all of them at once, 2 one pair's; the pairs
    go in reverse, so that in micro-batches of 2 both ranks' first holds images and rank 0's
    second the video alone (the layout that failed: see the test)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    from umerl.config.recipe import load_recipe
    from umerl.train import dist as udist
    from umerl.train.learner import Learner, StepShard

    udist.init_process_group(rank, 2, "127.0.0.1", port, backend="gloo")
    root_path = Path(root)
    for order, which in (("as_given", rank), ("swapped", 1 - rank)):
        cfg = load_recipe(None, [
            f"output_dir={root_path / order}", "rl.pairs_per_step=4", "rl.group_size=2",
            "rl.lr=0.01", "learner.num_workers=2", "learner.zero_stage=3",
            f"learner.gradient_checkpointing={checkpointing}",
            f"learner.micro_batch_size={micro_batch}", "wandb.mode=disabled",
        ])
        learner = Learner(cfg, model, model)
        pairs = _rank_pairs(media, which)[::-1]
        tokenizer = learner.bundle.tokenizer
        rollouts = [[_completions(tokenizer, f"{side} {p.id}") for p in pairs] for side in "qt"]
        metrics = learner.step(StepShard(1, pairs, 2 * rank, *rollouts))
        _save_full_weights(learner.engine, root_path / f"rl_{order}.pt")
        torch.save(metrics, root_path / f"rl_{order}_metrics_data{which}.pt")
    udist.barrier()


@pytest.mark.parametrize("checkpointing, micro_batch", [
    (False, 0),  # one micro-batch per side: a video and images on rank 0, images on rank 1
    (True, 2),  # every GPU recipe's setting; a micro-batch with the video alone on rank 0
])
def test_zero3_grpo_learner_steps_with_a_video_on_one_rank_only(checkpointing, micro_batch,
                                                                tmp_path, tiny_model_dir):
    """The learners' path: rank 0's query side holds a video and images, rank 1's only
    images. The step runs (no hang, no abort) and updates the weights; the step's rewards and
    each data's KL and ratio, computed from both ranks' forwards, are those of the run with
    the ranks' data swapped. Not compared: the policy loss and the weights element by element.
    A random tiny model gives a group's rollouts near-equal rewards, so (r - mean) / std
    turns the rounding of the rewards' summation order (which the swap changes) into a policy
    loss of +-4e-5 instead of 0, and one Adam step moves elements with ~1e-9 gradients by
    +-lr (so too with images only, before this change). The second layout failed when the
    tower ran once per modality, on blank media for the missing one: the two calls' backwards
    ran in another order on each rank, which DeepSpeed's first trace reports as "Detected a
    disagreement" (the shared-media test's layout hung instead; see ``PolicyModule``)."""
    from umerl.model.loading import load_policy
    from umerl.train.dist import free_port

    media = _media(tmp_path)
    _spawn_bounded(_mixed_learner_main,
                   (free_port(), str(tiny_model_dir), str(tmp_path), media, checkpointing,
                    micro_batch))
    start = load_policy(tiny_model_dir).model.state_dict()
    weights = torch.load(tmp_path / "rl_as_given.pt")
    assert weights.keys() == start.keys()
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert sum(not torch.allclose(weights[k], start[k], atol=1e-3) for k in weights) > 10
    for which in (0, 1):  # actor/ metrics are the rank's own data's; reward/ the step's
        given = torch.load(tmp_path / f"rl_as_given_metrics_data{which}.pt")
        swapped = torch.load(tmp_path / f"rl_swapped_metrics_data{which}.pt")
        compared = [k for k in given if k.startswith(("actor/", "reward/"))
                    and k not in ("actor/loss", "actor/policy_loss")]
        assert "actor/kl" in compared and "reward/total" in compared
        for key in compared:
            assert given[key] == pytest.approx(swapped[key], abs=1e-6), key


def test_lockstep_runs_the_tower_once_per_forward_and_changes_nothing(tiny_bundle, tmp_path):
    """On one rank: with the lockstep media every forward calls the vision tower once, on all
    its batch's media (images, then the video), whatever the batch holds; outputs and
    gradients are those of the plain module, which calls it once per modality (bit for bit
    where that is one call; to float rounding where the one call stacks both modalities)."""
    from umerl.data.formats import Side
    from umerl.model.policy import PolicyModule
    from umerl.train.sft import side_inputs

    bundle = tiny_bundle
    media = _media(tmp_path)
    video = Side("clip", video=tuple(media["video"]), completion=format_completion("a", "b"))
    image = Side("pic", images=tuple(media["images"][:1]), completion=format_completion("c", "d"))
    text = Side("words", completion=format_completion("e", "f"))
    plain = PolicyModule(bundle.model, bundle.disc_id, bundle.gen_id)
    lockstep = PolicyModule(bundle.model, bundle.disc_id, bundle.gen_id,
                            lockstep_media=bundle.encoder.blank_media())
    tower_calls: list[list[list[int]]] = []
    hook = bundle.model.model.visual.register_forward_hook(
        lambda module, args, kwargs, out: tower_calls.append(kwargs["grid_thw"].tolist()),
        with_kwargs=True)
    try:
        # (sides, the plain module's calls): images of the text side are the blank image
        for sides, plain_calls in (([image, text], 1), ([video], 1), ([video, image], 2)):
            batch = side_inputs(bundle, sides)
            grids = [g for key in ("image_grid_thw", "video_grid_thw") if key in batch
                     for g in batch[key].tolist()]
            results = []
            for module in (plain, lockstep):
                bundle.model.zero_grad(set_to_none=True)
                tower_calls.clear()
                out = module(**batch)
                (out.disc.sum() + out.gen.sum() + out.logprobs.sum()).backward()
                grads = {n: p.grad.clone() for n, p in bundle.model.named_parameters()
                         if p.grad is not None}
                results.append((out, grads, list(tower_calls)))
            (base, base_grads, base_calls), (got, got_grads, got_calls) = results
            assert len(base_calls) == plain_calls and got_calls == [grids]
            exact = plain_calls == 1
            for field in ("disc", "gen", "logprobs"):
                a, b = getattr(got, field), getattr(base, field)
                assert torch.equal(a, b) if exact else torch.allclose(a, b, atol=1e-6), field
            assert got_grads.keys() == base_grads.keys() and len(got_grads) > 10
            for name, b in base_grads.items():
                a, scale = got_grads[name], float(b.abs().max())
                assert (torch.equal(a, b) if exact
                        else torch.allclose(a, b, rtol=1e-5, atol=1e-6 * scale)), name
    finally:
        hook.remove()
        bundle.model.zero_grad(set_to_none=True)


def test_lockstep_runs_the_blank_image_for_a_batch_without_media(tiny_bundle):
    """A batch with no media at all (no vision tokens): under lockstep the tower still runs
    once, on the blank image, and changes nothing: outputs and the language model's gradients
    bit for bit the plain module's, the projector's gradients zero."""
    from umerl.model.inputs import EncodedPrompt
    from umerl.model.policy import PolicyModule

    bundle = tiny_bundle
    tokenizer = bundle.tokenizer
    prompts = [EncodedPrompt(input_ids=tokenizer(text, add_special_tokens=False)["input_ids"]
                             + [bundle.disc_id]) for text in ("a query", "another query here")]
    completions = [tokenizer(format_completion(a, b), add_special_tokens=False)["input_ids"]
                   for a, b in (("x", "y"), ("some more", "z"))]
    batch = bundle.encoder.policy_inputs(prompts, completions)
    assert not any("pixel" in key or "grid" in key for key in batch)
    blank = bundle.encoder.blank_media()
    tower_calls: list[list[list[int]]] = []
    hook = bundle.model.model.visual.register_forward_hook(
        lambda module, args, kwargs, out: tower_calls.append(kwargs["grid_thw"].tolist()),
        with_kwargs=True)
    results = []
    try:
        for lockstep in (None, blank):
            module = PolicyModule(bundle.model, bundle.disc_id, bundle.gen_id,
                                  lockstep_media=lockstep)
            bundle.model.zero_grad(set_to_none=True)
            out = module(**batch)
            (out.disc.sum() + out.gen.sum() + out.logprobs.sum()).backward()
            results.append((out, {n: p.grad.clone() for n, p in bundle.model.named_parameters()
                                  if p.grad is not None}))
    finally:
        hook.remove()
        bundle.model.zero_grad(set_to_none=True)
    assert tower_calls == [blank["image_grid_thw"].tolist()]
    (base, base_grads), (got, got_grads) = results
    for field in ("disc", "gen", "logprobs"):
        assert torch.equal(getattr(got, field), getattr(base, field)), field
    tower = {n for n in got_grads if ".visual." in f".{n}"}
    assert tower and got_grads.keys() - tower == base_grads.keys()
    assert all(not got_grads[n].any() for n in tower)
    for name, grad in base_grads.items():
        assert torch.equal(got_grads[name], grad), name
