"""The model layer on the tiny model: template, token handling, embedding positions, batching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rollout.transformers_engine import TransformersEngine
from umerl.data.formats import Side
from umerl.data.tokens import DISC_EMB, GEN_EMB, format_completion
from umerl.model.embed import disc_embeddings, forward_embeddings, gen_embeddings
from umerl.model.inputs import video_patches
from umerl.model.prompts import render_prompt
from umerl.model.sampling import SamplingParams

INSTRUCTION = (
    "Represent the above input text, images, videos, or any combination of the three as "
    "embeddings. First output the thinking process in <think> </think> tags and then summarize "
    "the entire input in a word or sentence. Finally, use the <gen_emb> tag to represent the "
    "entire input."
)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("media")
    paths = {}
    for name, size, colour in [("red", (64, 48), (220, 20, 20)), ("blue", (40, 40), (0, 0, 200)),
                               ("green", (90, 30), (0, 160, 0))]:
        Image.new("RGB", size, colour).save(root / f"{name}.png")
        paths[name] = str(root / f"{name}.png")
    for i in range(4):
        frame = Image.new("RGB", (56, 56), (i * 60, 0, 255 - i * 60))
        frame.save(root / f"frame{i}.png")
        paths[f"frame{i}"] = str(root / f"frame{i}.png")
    return paths


@pytest.fixture(scope="module")
def sides(media) -> list[Side]:
    return [
        Side(text="Find the photo of a red square.", images=(media["red"],)),
        Side(text="a blue square"),
        Side(text="What happens in this clip?",
             video=tuple(media[f"frame{i}"] for i in range(4))),
        Side(text="two images", images=(media["blue"], media["green"])),
    ]


def test_query_prompt_byte_for_byte(tiny_bundle, media) -> None:
    side = Side(text="Find the photo of a red square.", images=(media["red"],))
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "Find the photo of a red square.\n<disc_emb>\n" + INSTRUCTION + "<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_prompt(tiny_bundle.tokenizer, side) == expected


def test_text_only_target_gets_the_blank_image(tiny_bundle) -> None:
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "a blue square\n<disc_emb>\n" + INSTRUCTION + "<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_prompt(tiny_bundle.tokenizer, Side(text="a blue square")) == expected
    encoded = tiny_bundle.encoder.encode(Side(text="a blue square"))
    # 28x28 white image -> a 2x2 patch grid -> one merged vision token
    assert encoded.image_grid_thw.tolist() == [[1, 2, 2]]
    pad_id = tiny_bundle.encoder.image_pad_id
    assert encoded.input_ids.count(pad_id) == 1


def test_embedding_tokens_are_ordinary_and_survive_decoding(tiny_bundle) -> None:
    tok = tiny_bundle.tokenizer
    ids = tok("x <disc_emb> y <gen_emb>", add_special_tokens=False)["input_ids"]
    assert ids.count(tiny_bundle.disc_id) == 1 and ids.count(tiny_bundle.gen_id) == 1
    added = {t.content: t for t in tok.added_tokens_decoder.values()}
    assert not added[DISC_EMB].special and not added[GEN_EMB].special
    text = tok.decode(tok(format_completion("r", "s"), add_special_tokens=False)["input_ids"]
                      + [tok.convert_tokens_to_ids("<|im_end|>")], skip_special_tokens=True)
    assert text.endswith("<answer>s</answer><gen_emb>")  # <|im_end|> dropped, <gen_emb> kept


def test_new_token_rows_copy_the_source_rows(tiny_bundle) -> None:
    weight = tiny_bundle.model.get_input_embeddings().weight
    tok = tiny_bundle.tokenizer
    for token, source in [(DISC_EMB, "<|object_ref_start|>"), (GEN_EMB, "<|object_ref_end|>")]:
        assert torch.equal(weight[tok.convert_tokens_to_ids(token)],
                           weight[tok.convert_tokens_to_ids(source)])


def manual_hidden(bundle, side: Side, completion: list[int] | None = None) -> tuple:
    """Unbatched forward through the full model with output_hidden_states: the reference."""
    encoded = bundle.encoder.encode(side)
    ids = encoded.input_ids + (completion or [])
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids),
                                                                               dtype=torch.long)}
    inputs["mm_token_type_ids"] = bundle.encoder.token_types(inputs["input_ids"])
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        if getattr(encoded, key) is not None:
            inputs[key] = getattr(encoded, key)
    with torch.no_grad():
        out = bundle.model(**inputs, output_hidden_states=True)
    return out.hidden_states[-1][0], ids


def test_disc_embedding_is_the_hidden_state_at_disc_emb(tiny_bundle, sides) -> None:
    embeddings = disc_embeddings(tiny_bundle, sides, batch_size=len(sides))
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(len(sides)), atol=1e-5)
    for side, emb in zip(sides, embeddings):
        hidden, ids = manual_hidden(tiny_bundle, side)
        position = len(ids) - 1 - ids[::-1].index(tiny_bundle.disc_id)
        assert torch.allclose(emb, F.normalize(hidden[position], dim=-1), atol=1e-5)
        # and not the state of a neighbouring token
        assert not torch.allclose(emb, F.normalize(hidden[position + 1], dim=-1), atol=1e-3)


def completion_ids(bundle, text: str) -> list[int]:
    return bundle.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_gen_embedding_at_last_gen_emb_with_fallback(tiny_bundle, sides) -> None:
    with_token = completion_ids(tiny_bundle, "<think>a <gen_emb> inside</think><answer>red"
                                "</answer><gen_emb>") + [tiny_bundle.stop_ids[1]]
    without = completion_ids(tiny_bundle, "<think>no token here</think>")
    prompts = [tiny_bundle.encoder.encode(s) for s in sides[:2]]
    disc, gen, found = forward_embeddings(tiny_bundle, prompts, [with_token, without])
    assert found.tolist() == [True, False]
    hidden, ids = manual_hidden(tiny_bundle, sides[0], with_token)
    last_gen = len(ids) - 1 - ids[::-1].index(tiny_bundle.gen_id)
    assert last_gen == len(ids) - 2  # the last <gen_emb>, not the first, not <|im_end|>
    assert torch.allclose(gen[0], F.normalize(hidden[last_gen], dim=-1), atol=1e-5)
    hidden, ids = manual_hidden(tiny_bundle, sides[1], without)
    assert torch.allclose(gen[1], F.normalize(hidden[len(ids) - 1], dim=-1), atol=1e-5)
    # the disc embedding is read inside the prompt even when a completion follows
    reference = disc_embeddings(tiny_bundle, sides[:2], batch_size=1)
    assert torch.allclose(disc, reference, atol=1e-5)


def test_batching_matches_one_by_one(tiny_bundle, sides) -> None:
    batched = disc_embeddings(tiny_bundle, sides, batch_size=len(sides))
    single = disc_embeddings(tiny_bundle, sides, batch_size=1)
    assert torch.allclose(batched, single, atol=1e-5)
    completions = [completion_ids(tiny_bundle, t) for t in
                   ["<think>x</think><answer>y</answer><gen_emb>", "<think>longer text here"
                    "</think><answer>z</answer><gen_emb>", "<gen_emb>", "<think>q</think>"]]
    prompts = [tiny_bundle.encoder.encode(s) for s in sides]
    _, gen_batched, _ = forward_embeddings(tiny_bundle, prompts, completions)
    for i in range(len(sides)):
        _, gen_single, _ = forward_embeddings(tiny_bundle, prompts[i:i + 1], completions[i:i + 1])
        assert torch.allclose(gen_batched[i], gen_single[0], atol=1e-5)


def test_gen_embeddings_sample_k_per_input(tiny_bundle, sides) -> None:
    engine = TransformersEngine(tiny_bundle, batch_size=8)
    sampling = SamplingParams(max_new_tokens=8, seed=3)
    out = gen_embeddings(tiny_bundle, engine, sides[:2], num_samples=3, sampling=sampling)
    assert out.embeddings.shape == (2, 3, tiny_bundle.hidden_size)
    assert torch.allclose(out.embeddings.norm(dim=-1), torch.ones(2, 3), atol=1e-5)
    assert len(out.completions) == 2 and all(len(c) == 3 for c in out.completions)
    again = gen_embeddings(tiny_bundle, engine, sides[:2], num_samples=3, sampling=sampling)
    assert torch.equal(out.embeddings, again.embeddings)  # the seed makes sampling repeatable
    # samples differ from each other (temperature 1 on an untrained model)
    assert len({tuple(map(str, c)) for c in out.completions[0]}) > 1 or not torch.allclose(
        out.embeddings[0, 0], out.embeddings[0, 1])
    greedy = SamplingParams(max_new_tokens=8, do_sample=False)
    g1 = gen_embeddings(tiny_bundle, engine, sides[:2], 1, greedy, batch_size=2)
    g2 = gen_embeddings(tiny_bundle, engine, sides[:2], 1, greedy, batch_size=1)
    assert g1.completions == g2.completions
    assert torch.allclose(g1.embeddings, g2.embeddings, atol=1e-5)


def test_two_equal_frames_patch_like_one_image(tiny_bundle, media) -> None:
    ip = tiny_bundle.encoder.image_processor
    frame = Image.open(media["red"]).convert("RGB")
    video, grid = video_patches([frame, frame], ip)
    image = ip(images=[frame], return_tensors="pt")
    assert grid.tolist() == image["image_grid_thw"].tolist()
    assert np.allclose(video.numpy(), image["pixel_values"].numpy(), atol=2e-2)


def test_video_frames_reach_the_forward_pass(tiny_bundle, media) -> None:
    frames = tuple(media[f"frame{i}"] for i in range(4))
    encoded = tiny_bundle.encoder.encode(Side(text="clip", video=frames))
    assert encoded.video_grid_thw.tolist()[0][0] == 2  # 4 frames -> 2 temporal patches
    forward = disc_embeddings(tiny_bundle, [Side(text="clip", video=frames)])
    backward = disc_embeddings(tiny_bundle, [Side(text="clip", video=frames[::-1])])
    assert not torch.allclose(forward, backward, atol=1e-4)


def test_checkpoint_without_config_is_a_clear_error(tmp_path: Path) -> None:
    from umerl.model.loading import load_policy

    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_policy(tmp_path)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_every_family_embeds_text_images_and_video(family, media, tmp_path_factory) -> None:
    from umerl.model.loading import load_policy
    from umerl.model.tiny import build_tiny_model

    bundle = load_policy(build_tiny_model(tmp_path_factory.mktemp(family) / "m", family=family))
    family_sides = [
        Side(text="text only"),
        Side(text="an image", images=(media["red"],)),
        Side(text="three frames", video=tuple(media[f"frame{i}"] for i in range(3))),
        Side(text="four frames", video=tuple(media[f"frame{i}"] for i in range(4))),
    ]
    batched = disc_embeddings(bundle, family_sides, batch_size=4)
    single = disc_embeddings(bundle, family_sides, batch_size=1)
    assert torch.allclose(batched, single, atol=1e-5)
    hidden, ids = manual_hidden(bundle, family_sides[2])
    position = len(ids) - 1 - ids[::-1].index(bundle.disc_id)
    assert torch.allclose(single[2], F.normalize(hidden[position], dim=-1), atol=1e-5)
    engine = TransformersEngine(bundle)
    out = gen_embeddings(bundle, engine, family_sides, 2, SamplingParams(max_new_tokens=4))
    assert out.embeddings.shape == (4, 2, bundle.hidden_size)
