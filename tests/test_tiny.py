"""The tiny offline Qwen-VL checkpoints load and run like real ones."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from umerl.data.tokens import (  # noqa: E402
    DISC_EMB,
    ENDOFTEXT,
    GEN_EMB,
    IM_END,
    IMAGE_PAD,
    QWEN_SPECIAL_TOKENS,
    THINK_OPEN,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
)
from umerl.model import tiny  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tiny_tokenizer()


@pytest.fixture(scope="module")
def checkpoints(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        f: tiny.build_tiny_model(root / f, family=f, tokenizer=tokenizer) for f in tiny.FAMILIES
    }


def _load(path):
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    model = tiny.model_class_for(config.model_type).from_pretrained(path).eval()
    return model, AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)


def _image(seed: int, width: int = 70, height: int = 56) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def _prompt(tok, media_type: str) -> str:
    content = [{"type": media_type}, {"type": "text", "text": "Represent the given input."}]
    return tok.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def test_tokenizer_is_deterministic(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "a")
    tiny.build_tiny_tokenizer().save_pretrained(tmp_path / "b")
    a = (tmp_path / "a" / "tokenizer.json").read_bytes()
    assert a == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_special_tokens(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS]
    # Learned tokens first, then the Qwen specials, <|endoftext|> first, as in Qwen's vocabulary.
    assert ids == list(range(2048, 2048 + len(tiny.SPECIAL_TOKENS)))
    assert len(tokenizer) == 2048 + len(tiny.SPECIAL_TOKENS)
    for token in (*QWEN_SPECIAL_TOKENS, "<|object_ref_start|>", "<|object_ref_end|>"):
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [
            tokenizer.convert_tokens_to_ids(token)
        ]
        assert token in tokenizer.all_special_tokens
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token == ENDOFTEXT
    assert tokenizer.bos_token is None
    think = tokenizer(THINK_OPEN, add_special_tokens=False)["input_ids"]
    assert len(think) > 1 and not set(think) & set(tokenizer.all_special_ids)
    vocab = tokenizer.get_vocab()
    assert DISC_EMB not in vocab and GEN_EMB not in vocab
    assert len(tokenizer.tokenize(" the image shows a dog")) == 5


def test_chat_template_matches_qwen2_vl(tokenizer):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello"},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Hi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
    )


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_checkpoint_reloads_and_runs_on_an_image(family, checkpoints, tokenizer):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    path = checkpoints[family]
    model, tok, ip = _load(path)
    assert model.config.model_type == family
    assert isinstance(ip, Qwen2VLImageProcessorPil)
    assert ip.patch_size == model.config.vision_config.patch_size
    assert ip.merge_size == model.config.vision_config.spatial_merge_size
    assert tok.get_vocab() == tokenizer.get_vocab()
    assert model.config.image_token_id == tok.convert_tokens_to_ids(IMAGE_PAD)
    assert model.config.video_token_id == tok.convert_tokens_to_ids(VIDEO_PAD)
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids(VISION_START)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    marker = json.loads((path / tiny.MARKER_FILE).read_text())
    assert marker == {"family": family, "size": "tiny", "seed": 0, "vocab_size": len(tokenizer)}

    torch.manual_seed(0)
    built = tiny.model_class_for(family)(tiny.tiny_config(family, tokenizer)).state_dict()
    reloaded = model.state_dict()
    assert built.keys() == reloaded.keys()
    for name, tensor in built.items():
        assert torch.equal(reloaded[name], tensor), name

    features = ip(images=[_image(0)], return_tensors="pt")
    n = int(features["image_grid_thw"][0].prod()) // ip.merge_size**2
    enc = tok([_prompt(tok, "image").replace(IMAGE_PAD, IMAGE_PAD * n)], return_tensors="pt")
    enc["mm_token_type_ids"] = (enc["input_ids"] == model.config.image_token_id).long()
    enc.update(features)
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    assert hidden.shape == (1, enc["input_ids"].shape[1], model.config.text_config.hidden_size)
    assert torch.isfinite(hidden).all()

    generated = model.generate(**enc, max_new_tokens=4, do_sample=True, num_return_sequences=2)
    assert generated.shape[0] == 2


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_checkpoint_runs_on_video_frames(family, checkpoints):
    model, tok, ip = _load(checkpoints[family])
    frames = [_image(i, 64, 48) for i in range(3)]
    frames.append(frames[-1])  # pairs of frames make one temporal patch
    # Frames through the image processor without temporal broadcasting, then paired.
    features = ip(images=frames, temporal_patch_size=1, return_tensors="pt")
    _, gh, gw = features["image_grid_thw"][0].tolist()
    tp, p, gt = ip.temporal_patch_size, ip.patch_size, len(frames) // ip.temporal_patch_size
    patches = features["pixel_values"].view(gt, tp, gh * gw, 3, p, p).permute(0, 2, 3, 1, 4, 5)
    pixel_values_videos = patches.reshape(gt * gh * gw, 3 * tp * p * p)
    per_frame = gh * gw // ip.merge_size**2
    if family == "qwen3_vl":  # one timestamped block per temporal patch, as Qwen3VLProcessor
        blocks = [f"<{t + 0.5:.1f} seconds>" for t in range(gt)]
        video = "".join(f"{b}{VISION_START}{VIDEO_PAD * per_frame}{VISION_END}" for b in blocks)
    else:
        video = VIDEO_PAD * (gt * per_frame)
    enc = tok([_prompt(tok, "video").replace(VIDEO_PAD, video)], return_tensors="pt")
    enc["mm_token_type_ids"] = (enc["input_ids"] == model.config.video_token_id).long() * 2
    enc.update(pixel_values_videos=pixel_values_videos, video_grid_thw=torch.tensor([[gt, gh, gw]]))
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    assert out.hidden_states[-1].shape[-1] == model.config.text_config.hidden_size
    assert torch.isfinite(out.hidden_states[-1]).all()


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_same_seed_same_weights(family, checkpoints, tokenizer, tmp_path):
    again = load_file(
        tiny.build_tiny_model(tmp_path / "a", family, tokenizer=tokenizer) / "model.safetensors"
    )
    first = load_file(checkpoints[family] / "model.safetensors")
    assert again.keys() == first.keys()
    assert all(torch.equal(again[k], first[k]) for k in first)
    other = load_file(
        tiny.build_tiny_model(tmp_path / "b", family, seed=1, tokenizer=tokenizer)
        / "model.safetensors"
    )
    assert not all(torch.equal(other[k], first[k]) for k in first)


def test_unknown_family_or_model_type(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="qwen2_vl, qwen2_5_vl, qwen3_vl"):
        tiny.build_tiny_model(tmp_path, family="llava", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="qwen2_vl, qwen2_5_vl, qwen3_vl"):
        tiny.model_class_for("llama")
    assert tiny.model_class_for("qwen2_5_vl").__name__ == "Qwen2_5_VLForConditionalGeneration"
