"""A tiny, deterministic Qwen-VL-family checkpoint built offline, for tests and CPU runs.

`build_tiny_model(dir)` writes a directory that loads like a real Qwen2-VL / Qwen2.5-VL /
Qwen3-VL checkpoint: `AutoTokenizer.from_pretrained(dir)`,
`model_class_for(AutoConfig.from_pretrained(dir).model_type).from_pretrained(dir)` and
`AutoImageProcessor.from_pretrained(dir)` (a PIL `Qwen2VLImageProcessorPil`, no torchvision).

    python -m umerl.model.tiny OUT_DIR [--family qwen2_vl|qwen2_5_vl|qwen3_vl] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from umerl.data.tokens import (
    DISC_EMB,
    EMBEDDING_TOKEN_INIT_SOURCES,
    ENDOFTEXT,
    GEN_EMB,
    IM_END,
    IM_START,
    IMAGE_PAD,
    QWEN_SPECIAL_TOKENS,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
)

if TYPE_CHECKING:
    import torch
    from transformers import (
        PreTrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        PreTrainedTokenizerFast,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

# torch and transformers are imported inside the functions so that importing this module (for
# FAMILIES or model_class_for) stays cheap; transformers alone takes seconds to import.

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# The rows UME-R1 copies into <disc_emb>/<gen_emb>; present here so the tiny model behaves
# like a real Qwen checkpoint when the embedding layer adds its tokens.
OBJECT_REF_START = EMBEDDING_TOKEN_INIT_SOURCES[DISC_EMB]
OBJECT_REF_END = EMBEDDING_TOKEN_INIT_SOURCES[GEN_EMB]
SPECIAL_TOKENS = (*QWEN_SPECIAL_TOKENS, OBJECT_REF_START, OBJECT_REF_END)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
MARKER_FILE = "umerl_tiny.json"

# Qwen2's pre-tokenizer split: contractions, letter runs, single digits, punctuation runs,
# newlines and spaces. Single digits keep numbers tokenized the way Qwen does.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Enough Python for a few seconds of training at most; the stdlib is read in sorted order so
# the corpus (and so the tokenizer) is the same on every run of the same Python.
_STDLIB_CHAR_CAP = 3_000_000
# Repeats make common English words win merges against the much larger Python corpus.
_ENGLISH_REPEATS = 100

_ENGLISH_TEXT = """\
You are a helpful assistant. The system, the user and the assistant take turns in a chat.
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Represent the given image for classification. Represent the given video for retrieval.
Represent the given text. Find an image that matches the given text. Find a video that
matches the caption. Describe the image in one sentence. What is shown in this picture?
Answer the question about the image. Summarize the document. Retrieve the relevant page.
I think the answer is yes. I think the answer is no. Let me think step by step.
First, look at the image. Then, find the main object. Finally, give a short answer.
The image shows a man and a woman standing next to a red car on a busy city street.
The photo shows a small white dog playing with a ball in the green grass of a park.
The video shows a person walking along the beach at sunset while waves roll in.
A cat is sitting on a wooden table near the window. Two birds fly over the blue sea.
A child is riding a bike down the road. A group of people are eating food at a restaurant.
There is a large building with many windows. The sky is clear and the sun is bright.
The handwritten digit is zero, one, two, three, four, five, six, seven, eight or nine.
Colors: red, orange, yellow, green, blue, purple, pink, brown, black, white, gray.
Shapes: circle, square, triangle, rectangle, line, dot, star, heart, arrow, cross.
Animals: dog, cat, horse, cow, sheep, bird, fish, bear, lion, tiger, elephant, mouse.
Things: car, bus, train, plane, boat, bike, house, tree, flower, book, phone, chair, table.
People: man, woman, boy, girl, child, baby, person, people, player, student, teacher.
Places: city, street, road, park, beach, room, kitchen, office, school, field, forest.
Actions: walk, run, jump, sit, stand, eat, drink, play, read, write, talk, look, hold, ride.
the of and to in is it you that he was for on are as with his they at be this have from
or one had by word but not what all were we when your can said there use an each which
she do how their if will up other about out many then them these so some her would make
like him into time has look two more go see number no way could my than first been call
who its now find long down day did get come made may part over new sound take only little
work know place year live me back give most very after thing our just name good sentence
man think say great where help through much before line right too mean old any same tell
boy follow came want show also around form three small set put end does another well large
must big even such because turn here why ask went men read need land different home us
move try kind hand picture again change off play spell air away animal house point page
letter mother answer found study still learn should world high every near add food between
own below country plant last school father keep tree never start city earth eye light
thought head under story saw left few while along might close something seem next hard
open example begin life always those both paper together got group often run important
until children side feet car mile night walk white sea began grow took river four carry
state once book hear stop without second later miss idea enough eat face watch far real
almost let above girl sometimes mountain cut young talk soon list song being leave family
"""

# Renders messages exactly as Qwen2-VL-Instruct's chat template does (default system turn,
# one vision block per image/video part, optional "Picture N: " / "Video N: " labels).
CHAT_TEMPLATE = (
    "{%- set counts = namespace(image=0, video=0) -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '" + IM_START + "system\\n" + DEFAULT_SYSTEM_PROMPT + IM_END + "\\n' -}}"
    "{%- endif -%}"
    "{{- '" + IM_START + "' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part.get('type') == 'image' or 'image' in part or 'image_url' in part -%}"
    "{%- set counts.image = counts.image + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' + counts.image|string + ': ' -}}{%- endif -%}"
    "{{- '" + VISION_START + IMAGE_PAD + VISION_END + "' -}}"
    "{%- elif part.get('type') == 'video' or 'video' in part -%}"
    "{%- set counts.video = counts.video + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' + counts.video|string + ': ' -}}{%- endif -%}"
    "{{- '" + VISION_START + VIDEO_PAD + VISION_END + "' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '" + IM_END + "\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + IM_START + "assistant\\n' -}}{%- endif -%}"
)


def _training_corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if total + len(text) > _STDLIB_CHAR_CAP:
            break
        texts.append(text)
        total += len(text)
    return texts + [_ENGLISH_TEXT] * _ENGLISH_REPEATS


def build_tiny_tokenizer(vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (Qwen2-style pre-tokenizer) and wrap it with the Qwen chat setup.

    The `vocab_size` learned tokens get ids 0..vocab_size-1; the Qwen special tokens follow, as
    in a real Qwen vocabulary.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_training_corpus(), trainer=trainer)
    # Added before wrapping so the ids follow Qwen's order (<|endoftext|> first), whatever
    # order the wrapper registers eos/pad in.
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        bos_token=None,
        model_max_length=32768,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def model_class_for(model_type: str | PreTrainedConfig) -> type[PreTrainedModel]:
    """The `*ForConditionalGeneration` class for a config's `model_type` (or a config object)."""
    import transformers

    if not isinstance(model_type, str):
        model_type = model_type.model_type
    classes = {
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
        "qwen3_vl": "Qwen3VLForConditionalGeneration",
    }
    if model_type not in classes:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(FAMILIES)}")
    return getattr(transformers, classes[model_type])


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; supported: {', '.join(FAMILIES)}")


def _patch_size(family: str) -> int:
    # Qwen3-VL's vision tower uses 16-pixel patches; Qwen2-VL and Qwen2.5-VL use 14.
    return 16 if family == "qwen3_vl" else 14


# Text-model sizes; head_dim stays 32 in both (what vLLM's CPU attention supports).
SIZES = {
    "tiny": {"hidden": 64, "heads": 2, "layers": 2, "intermediate": 128},
    "small": {"hidden": 128, "heads": 4, "layers": 4, "intermediate": 384},
}


def tiny_config(
    family: str, tokenizer: PreTrainedTokenizerBase, size: str = "tiny"
) -> PreTrainedConfig:
    """The tiny model config of `family`, with vocabulary and token ids from `tokenizer`."""
    _check_family(family)
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; supported: {', '.join(SIZES)}")
    import transformers

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    dims = SIZES[size]
    hidden, heads, head_dim = dims["hidden"], dims["heads"], 32
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": dims["intermediate"],
        "num_hidden_layers": dims["layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": 1,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        # Qwen tokenizers have no BOS token; Qwen configs point bos at <|endoftext|>.
        "bos_token_id": ids[ENDOFTEXT],
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[ENDOFTEXT],
    }
    vision: dict[str, Any] = {
        "depth": 2,
        "num_heads": 2,
        "patch_size": _patch_size(family),
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    # M-RoPE shares head_dim/2 = 16 rotary frequencies between (t, h, w), so mrope_section must
    # sum to 16: Qwen2-VL's [16, 24, 24] and Qwen3-VL's [24, 20, 20] scaled down from 64.
    if family == "qwen3_vl":
        text |= {
            "head_dim": head_dim,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": [6, 5, 5],
                "mrope_interleaved": True,
            },
        }
        vision |= {
            "hidden_size": 32,
            "intermediate_size": 64,
            "out_hidden_size": hidden,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [1],
        }
        config_cls = transformers.Qwen3VLConfig
    else:
        assert hidden // heads == head_dim  # Qwen2 text configs derive head_dim from hidden/heads
        text |= {
            "max_window_layers": dims["layers"],
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1_000_000.0,
                "mrope_section": [4, 6, 6],
            },
        }
        if family == "qwen2_vl":
            vision |= {"embed_dim": 32, "hidden_size": hidden, "mlp_ratio": 2}
            config_cls = transformers.Qwen2VLConfig
        else:
            vision |= {
                "hidden_size": 32,
                "intermediate_size": 64,
                "out_hidden_size": hidden,
                # One window-attention block then one full-attention block, as in Qwen2.5-VL.
                "window_size": 112,
                "fullatt_block_indexes": [1],
                "tokens_per_second": 2,
            }
            config_cls = transformers.Qwen2_5_VLConfig
    return config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PAD),
        video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_PAD),
        vision_start_token_id=tokenizer.convert_tokens_to_ids(VISION_START),
        vision_end_token_id=tokenizer.convert_tokens_to_ids(VISION_END),
        tie_word_embeddings=True,
    )


def tiny_image_processor(family: str) -> Qwen2VLImageProcessorPil:
    """The PIL Qwen2-VL image processor matching the tiny `family` vision tower."""
    _check_family(family)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    patch = _patch_size(family)
    factor = patch * 2  # one merged token covers merge_size x merge_size patches
    extra = {}
    if family == "qwen3_vl":
        extra = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}  # Qwen3-VL's
    # At least one merged token (28x28 px at patch 14) and at most 4x4 merged tokens (112x112
    # px), so any image costs the tiny vision tower 4 to 64 patches.
    return Qwen2VLImageProcessorPil(
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=factor * factor,
        max_pixels=(4 * factor) ** 2,
        **extra,
    )


def build_tiny_model(
    out_dir: str | Path,
    family: str = "qwen2_vl",
    seed: int = 0,
    tokenizer: PreTrainedTokenizerBase | None = None,
    size: str = "tiny",
) -> Path:
    """Build a randomly initialised tiny `family` model and save a complete checkpoint to out_dir.

    Writes config + safetensors weights, generation_config.json, the tokenizer (built with
    `build_tiny_tokenizer()` unless given), preprocessor_config.json and `umerl_tiny.json`.
    The same seed and tokenizer give identical weights.
    """
    _check_family(family)
    import torch
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    if tokenizer is None:
        tokenizer = build_tiny_tokenizer()
    config = tiny_config(family, tokenizer, size)
    torch.manual_seed(seed)
    model = model_class_for(config.model_type)(config)
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    pad = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=eos, pad_token_id=pad)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    tiny_image_processor(family).save_pretrained(out_dir)
    marker = {"family": family, "size": size, "seed": seed, "vocab_size": len(tokenizer)}
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return out_dir


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    """CLI: build a tiny checkpoint and print its parameter count and build time."""
    parser = argparse.ArgumentParser(
        prog="python -m umerl.model.tiny", description="Build a tiny offline Qwen-VL checkpoint."
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--family", choices=FAMILIES, default="qwen2_vl")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    out_dir = build_tiny_model(args.out_dir, family=args.family, seed=args.seed)
    seconds = time.perf_counter() - start
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out_dir)
    model = model_class_for(config.model_type).from_pretrained(out_dir)
    params = count_parameters(model)
    print(f"{args.family}: {params:,} parameters, built in {seconds:.2f} s -> {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
