"""Load a Qwen-VL checkpoint as a dual-mode (discriminative + generative) embedder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from umerl.data.dtypes import MODEL_DTYPES, torch_dtype
from umerl.data.tokens import (
    DISC_EMB,
    EMBEDDING_TOKEN_INIT_SOURCES,
    EMBEDDING_TOKENS,
    GEN_EMB,
    IM_END,
)
from umerl.model.inputs import InputEncoder

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@dataclass
class PolicyBundle:
    """The model with everything needed to feed it and find the embedding tokens."""

    model: Any
    tokenizer: Any
    encoder: InputEncoder
    disc_id: int
    gen_id: int
    stop_ids: tuple[int, ...]

    @property
    def hidden_size(self) -> int:
        config = self.model.config
        return int(getattr(config, "text_config", config).hidden_size)


def add_embedding_tokens(model: Any, tokenizer: Any) -> list[str]:
    """Add <disc_emb>/<gen_emb> as ordinary added tokens; returns the tokens it added.

    Ordinary (not special) so ``skip_special_tokens=True`` keeps them in decoded text. Their
    input rows start as copies of a rarely used token's row, as the UME-R1 authors did.
    """
    missing = [t for t in EMBEDDING_TOKENS if t not in tokenizer.get_vocab()]
    if not missing:
        return []
    tokenizer.add_tokens(missing, special_tokens=False)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embeddings = model.get_input_embeddings().weight
    with torch.no_grad():
        for token in missing:
            source = _init_source_id(tokenizer, EMBEDDING_TOKEN_INIT_SOURCES[token])
            embeddings[tokenizer.convert_tokens_to_ids(token)] = embeddings[source]
    return missing


def _init_source_id(tokenizer: Any, preferred: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(preferred)
    if token_id is None or token_id == tokenizer.unk_token_id:
        token_id = tokenizer.pad_token_id  # any existing row works; rarely-used is a nicety
    return int(token_id)


def load_policy(
    path: str | Path, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
    max_pixels: int | None = None,
) -> PolicyBundle:
    """Load model, tokenizer and image processor from a Hugging Face folder, offline.
    ``max_pixels`` (``model.max_pixels``): see ``limit_pixels``."""
    from transformers import AutoModelForImageTextToText

    if dtype not in MODEL_DTYPES:
        raise ValueError(f"dtype '{dtype}' is not one of {sorted(MODEL_DTYPES)}")
    _, tokenizer, image_processor = _load_processors(Path(path), trust_remote_code, max_pixels)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype(dtype)).to(device)
    add_embedding_tokens(model, tokenizer)
    model.eval()
    return bundle_for(model, tokenizer, image_processor)


def load_encoder(path: str | Path, max_pixels: int | None = None) -> InputEncoder:
    """The tokenizer and image processor alone, no weights: prompts are measured cheaply."""
    config, tokenizer, image_processor = _load_processors(Path(path), max_pixels=max_pixels)
    missing = [t for t in EMBEDDING_TOKENS if t not in tokenizer.get_vocab()]
    tokenizer.add_tokens(missing, special_tokens=False)
    return InputEncoder(tokenizer, image_processor, config.model_type)


def context_length(path: str | Path) -> int:
    """The model's context length (``max_position_embeddings`` of its language model)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return int(getattr(config, "text_config", config).max_position_embeddings)


def prompt_limit(setting: int | str, path: str | Path) -> int:
    """``data.max_prompt_tokens``: an int as it is; ``auto``: the model's context length."""
    return context_length(path) if setting == "auto" else int(setting)


def limit_pixels(image_processor: Any, max_pixels: int | None) -> Any:
    """The processor with ``max_pixels`` as its largest image (and video frame) area in
    pixels; None leaves its own (Qwen2-VL's is 12.8M px: 16k vision tokens per image). An
    image above it is resized down, keeping its aspect ratio, to at most ``max_pixels``: at
    most ``max_pixels / patch_size**2`` patches and a ``merge_size**2``-th of that in tokens."""
    if max_pixels is None:
        return image_processor
    size = image_processor.size
    least = size["shortest_edge"] if isinstance(size, dict) else size.shortest_edge
    if least is not None and int(max_pixels) < int(least):
        raise ValueError(f"model.max_pixels = {max_pixels} is below the image processor's "
                         f"smallest image area ({least} px)")
    if isinstance(size, dict):
        size["longest_edge"] = int(max_pixels)
    else:
        size.longest_edge = int(max_pixels)
    if getattr(image_processor, "max_pixels", None) is not None:  # older processors' copy
        image_processor.max_pixels = int(max_pixels)
    return image_processor


def _load_processors(path: Path, trust_remote_code: bool = False,
                     max_pixels: int | None = None) -> tuple[Any, Any, Any]:
    from transformers import AutoConfig, AutoTokenizer

    # From its module, not the package root: without torchvision, transformers 5.16 and 5.17
    # export a torchvision-only placeholder as `transformers.AutoImageProcessor`, while this
    # class picks the PIL image processor on any version.
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a Hugging Face checkpoint (no config.json)")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{path}: model_type '{config.model_type}' is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    image_processor = limit_pixels(AutoImageProcessor.from_pretrained(path), max_pixels)
    return config, tokenizer, image_processor


def bundle_for(model: Any, tokenizer: Any, image_processor: Any) -> PolicyBundle:
    disc_id = tokenizer.convert_tokens_to_ids(DISC_EMB)
    gen_id = tokenizer.convert_tokens_to_ids(GEN_EMB)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    return PolicyBundle(
        model=model,
        tokenizer=tokenizer,
        encoder=InputEncoder(tokenizer, image_processor, model.config.model_type),
        disc_id=disc_id,
        gen_id=gen_id,
        # Stopping at <gen_emb> saves the tokens after it, which no embedding reads.
        stop_ids=(gen_id, im_end),
    )


def save_policy(bundle: PolicyBundle, path: str | Path,
                state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """A complete Hugging Face folder: weights (``state_dict`` if given), tokenizer, processor."""
    bundle.model.save_pretrained(path, state_dict=state_dict)
    bundle.tokenizer.save_pretrained(path)
    bundle.encoder.image_processor.save_pretrained(path)
