"""Turn sides into Qwen-VL model inputs without the torchvision-bound HF processors.

A side is encoded once into an ``EncodedPrompt`` (token ids with the vision placeholders expanded,
plus its vision tensors). ``collate`` then left-pads prompts, optionally followed by completion
token ids, into one batch the model and ``generate`` both accept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image

from umerl.data import Side
from umerl.prompts import BLANK_IMAGE_SIZE, render_prompt
from umerl.tokens import DISC_EMB, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START

TEXT, IMAGE, VIDEO = 0, 1, 2  # mm_token_type_ids values the Qwen-VL M-RoPE expects


@dataclass
class EncodedPrompt:
    """One side's prompt: token ids and the vision tensors its placeholders stand for."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None


@lru_cache(maxsize=1)
def blank_image() -> Image.Image:
    return Image.new("RGB", (BLANK_IMAGE_SIZE, BLANK_IMAGE_SIZE), (255, 255, 255))


def load_image(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


class InputEncoder:
    """Encodes sides for one tokenizer + image processor pair."""

    def __init__(
        self, tokenizer: Any, image_processor: Any, model_type: str = "qwen2_vl",
        video_fps: float = 1.0,
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_type = model_type
        # Frame lists carry no timing; Qwen3-VL's prompt states each temporal patch's time.
        self.video_fps = video_fps
        self.merge_size = int(image_processor.merge_size)
        self.image_pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.video_pad_id = tokenizer.convert_tokens_to_ids(VIDEO_PAD)
        self.pad_id = tokenizer.pad_token_id

    def encode(self, side: Side, messages: list[dict[str, Any]] | None = None) -> EncodedPrompt:
        """Encode the UME-R1 prompt of ``side``, or other ``messages`` about the same media
        (their image and video parts must follow ``prompts.user_content``'s convention)."""
        if messages is None:
            text = render_prompt(self.tokenizer, side)
        else:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        prompt = EncodedPrompt(input_ids=[])
        images = [blank_image()] if side.is_text_only else [load_image(p) for p in side.images]
        if images:
            features = self.image_processor(images=images, return_tensors="pt")
            prompt.pixel_values = features["pixel_values"]
            prompt.image_grid_thw = features["image_grid_thw"]
            text = self._expand(text, IMAGE_PAD, prompt.image_grid_thw)
        if side.video:
            frames = [load_image(p) for p in side.video]
            prompt.pixel_values_videos, prompt.video_grid_thw = video_patches(
                frames, self.image_processor
            )
            if self.model_type == "qwen3_vl":
                text = self._expand_timed_video(text, prompt.video_grid_thw[0], len(frames))
            else:
                text = self._expand(text, VIDEO_PAD, prompt.video_grid_thw)
        prompt.input_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return prompt

    def _expand(self, text: str, pad: str, grids: torch.Tensor) -> str:
        """Repeat each placeholder once per merged vision token of its image or video."""
        pieces = text.split(pad)
        if len(pieces) - 1 != len(grids):
            raise ValueError(f"prompt has {len(pieces) - 1} {pad} but {len(grids)} media")
        counts = [int(g.prod()) // self.merge_size**2 for g in grids]
        out = pieces[0]
        for count, piece in zip(counts, pieces[1:]):
            out += pad * count + piece
        return out

    def _expand_timed_video(self, text: str, grid: torch.Tensor, num_frames: int) -> str:
        """Qwen3-VL reads a video as one vision block per temporal patch, each preceded by its
        time in seconds (the mean time of the frames it holds)."""
        temporal = int(self.image_processor.temporal_patch_size)
        per_patch = int(grid[1] * grid[2]) // self.merge_size**2
        blocks = []
        for t in range(int(grid[0])):
            frames = [min(f, num_frames - 1) for f in range(t * temporal, (t + 1) * temporal)]
            seconds = sum(frames) / len(frames) / self.video_fps
            blocks.append(f"<{seconds:.1f} seconds>{VISION_START}{VIDEO_PAD * per_patch}"
                          f"{VISION_END}")
        if text.count(VIDEO_PAD) != 1:
            raise ValueError(f"prompt has {text.count(VIDEO_PAD)} {VIDEO_PAD}, expected 1")
        return text.replace(VIDEO_PAD, "".join(blocks))

    def policy_inputs(
        self, prompts: Sequence[EncodedPrompt], completions: Sequence[Sequence[int]] | None
    ) -> dict[str, torch.Tensor]:
        """``collate`` plus ``completion_lengths``: the kwargs ``PolicyModule`` takes."""
        batch = self.collate(prompts, completions)
        batch.pop("prompt_lengths")
        lengths = [len(c) for c in completions] if completions is not None else [0] * len(prompts)
        batch["completion_lengths"] = torch.tensor(lengths)
        return batch

    def _check_completions(self, completions: Sequence[Sequence[int]]) -> None:
        # A vision placeholder in generated text would claim image features that do not exist.
        forbidden = {self.image_pad_id, self.video_pad_id}
        for i, completion in enumerate(completions):
            if forbidden.intersection(completion):
                raise ValueError(
                    f"completion {i} contains {IMAGE_PAD}/{VIDEO_PAD}; rollout engines must "
                    "suppress vision placeholder tokens (see suppressed_token_ids)"
                )

    def suppressed_token_ids(self) -> list[int]:
        """Tokens a completion must never contain: vision markers and <disc_emb>."""
        names = (IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END, DISC_EMB)
        ids = [self.tokenizer.convert_tokens_to_ids(name) for name in names]
        return [i for i in ids if i is not None and i != self.tokenizer.unk_token_id]

    def token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        types = torch.zeros_like(input_ids)
        types[input_ids == self.image_pad_id] = IMAGE
        types[input_ids == self.video_pad_id] = VIDEO
        return types

    def collate(
        self,
        prompts: Sequence[EncodedPrompt],
        completions: Sequence[Sequence[int]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Left-pad prompt (+ completion) ids into a batch; vision tensors concatenated in order.

        Returns model kwargs plus ``prompt_lengths`` (unpadded prompt length per row), which
        callers pop before calling the model.
        """
        if completions is not None and len(completions) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        rows = [
            list(p.input_ids) + (list(completions[i]) if completions is not None else [])
            for i, p in enumerate(prompts)
        ]
        if completions is not None:
            self._check_completions(completions)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row):] = 1
        batch: dict[str, torch.Tensor] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": self.token_types(input_ids) * attention_mask,
            "prompt_lengths": torch.tensor([len(p.input_ids) for p in prompts]),
        }
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            parts = [getattr(p, key) for p in prompts if getattr(p, key) is not None]
            if parts:
                batch[key] = torch.cat(parts)
        return batch


def video_patches(
    frames: list[Image.Image], image_processor: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-VL video patches from frames, laid out as the image processor lays out one image.

    Frames share the first frame's resized size; an odd frame count repeats the last frame so
    frames pair up into temporal patches. One image equals a video of that frame twice.
    """
    ip = image_processor
    patch, merge, temporal = int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size)
    height, width = _resized_size(frames[0], ip)
    arrays = [_normalised(frame, height, width, ip) for frame in frames]
    while len(arrays) % temporal:
        arrays.append(arrays[-1])
    video = np.stack(arrays)  # [T, C, H, W]
    grid_t, grid_h, grid_w = len(arrays) // temporal, height // patch, width // patch
    channels = video.shape[1]
    patches = video.reshape(
        grid_t, temporal, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch
    )
    # -> (t, h-blocks, w-blocks, merge-row, merge-col, C, temporal, patch-row, patch-col)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(grid_t * grid_h * grid_w, channels * temporal * patch * patch)
    grid = torch.tensor([[grid_t, grid_h, grid_w]], dtype=torch.long)
    return torch.from_numpy(np.ascontiguousarray(flat)), grid


def _resized_size(image: Image.Image, ip: Any) -> tuple[int, int]:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    size = ip.size
    min_pixels = size.get("shortest_edge") if isinstance(size, dict) else size.shortest_edge
    max_pixels = size.get("longest_edge") if isinstance(size, dict) else size.longest_edge
    return smart_resize(
        image.height, image.width, factor=int(ip.patch_size) * int(ip.merge_size),
        min_pixels=min_pixels, max_pixels=max_pixels,
    )


def _normalised(image: Image.Image, height: int, width: int, ip: Any) -> np.ndarray:
    resized = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    array = np.asarray(resized, dtype=np.float32) * float(ip.rescale_factor)
    mean = np.asarray(ip.image_mean, dtype=np.float32)
    std = np.asarray(ip.image_std, dtype=np.float32)
    return ((array - mean) / std).transpose(2, 0, 1)
