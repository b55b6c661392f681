"""Turn sides into Qwen-VL model inputs without the torchvision-bound HF processors.

A side is encoded once into an ``EncodedPrompt`` (token ids with the vision placeholders expanded,
plus its vision tensors). ``collate`` then left-pads prompts, optionally followed by completion
token ids, into one batch the model and ``generate`` both accept. ``prompt_length`` counts a
side's prompt tokens from image headers alone; ``check_prompt_lengths`` applies
``data.max_prompt_tokens`` to records read by ``umerl.data.formats``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from umerl.data.formats import DataError, EvalQuery, Pair, Side, image_header_size
from umerl.data.tokens import DISC_EMB, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START
from umerl.model.prompts import BLANK_IMAGE_SIZE, render_prompt

TEXT, IMAGE, VIDEO = 0, 1, 2  # mm_token_type_ids values the Qwen-VL M-RoPE expects

R = TypeVar("R", Pair, EvalQuery)
Grid = tuple[int, int, int]  # (t, h, w) in patches, as in image_grid_thw / video_grid_thw


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


def _where(side: Side) -> str:
    return f"{side.source}: " if side.source else ""


def _load_side_image(side: Side, path: str) -> Image.Image:
    """``load_image`` that names the side's file:line when the pixels cannot be decoded (the
    readers only check headers, so a truncated file first fails here)."""
    try:
        return load_image(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"{_where(side)}cannot decode image {path}: {err}") from None


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
        if side.is_text_only:
            images = [blank_image()]
        else:
            images = [_load_side_image(side, p) for p in side.images]
        image_grids: list[Grid] = []
        video_grid: Grid | None = None
        if images:
            features = self.image_processor(images=images, return_tensors="pt")
            prompt.pixel_values = features["pixel_values"]
            prompt.image_grid_thw = features["image_grid_thw"]
            image_grids = [_grid(g) for g in prompt.image_grid_thw.tolist()]
        if side.video:
            frames = [_load_side_image(side, p) for p in side.video]
            prompt.pixel_values_videos, prompt.video_grid_thw = video_patches(
                frames, self.image_processor
            )
            video_grid = _grid(prompt.video_grid_thw[0].tolist())
        text = self._expand_media(text, image_grids, video_grid, len(side.video))
        prompt.input_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return prompt

    def blank_media(self) -> dict[str, torch.Tensor]:
        """The blank image as vision-tower inputs without prompt tokens: what ``PolicyModule``
        runs the tower on under ZeRO-3 for a batch with no media, so that every rank makes
        the same tower call."""
        image = self.image_processor(images=[blank_image()], return_tensors="pt")
        return {"pixel_values": image["pixel_values"], "image_grid_thw": image["image_grid_thw"]}

    def prompt_length(self, side: Side) -> int:
        """``len(self.encode(side).input_ids)`` without decoding or normalising any pixels: the
        vision token counts come from the image headers' sizes, by the resize arithmetic the
        image processor and ``video_patches`` use."""
        text = render_prompt(self.tokenizer, side)
        ip = self.image_processor
        sizes = [(BLANK_IMAGE_SIZE, BLANK_IMAGE_SIZE)] if side.is_text_only else [
            self._header_hw(side, p) for p in side.images]
        frames = [self._header_hw(side, p) for p in side.video]
        try:
            image_grids = [image_grid(h, w, ip) for h, w in sizes]
            video_grid = video_grid_for(*frames[0], len(frames), ip) if frames else None
        except ValueError as err:  # smart_resize refuses aspect ratios over 200
            raise DataError(f"{_where(side)}{err}") from None
        text = self._expand_media(text, image_grids, video_grid, len(side.video))
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @staticmethod
    def _header_hw(side: Side, path: str) -> tuple[int, int]:
        size = image_header_size(path)
        if isinstance(size, str):
            raise DataError(f"{_where(side)}not a readable image: {path} ({size})")
        width, height = size
        return height, width

    def _expand_media(
        self, text: str, image_grids: Sequence[Grid], video_grid: Grid | None, num_frames: int
    ) -> str:
        """The prompt text with its vision placeholders expanded for these media grids: the
        one step ``encode`` (grids from the processor) and ``prompt_length`` (grids from
        header sizes) share."""
        if image_grids:
            text = self._expand(text, IMAGE_PAD, image_grids)
        if video_grid is not None:
            if self.model_type == "qwen3_vl":
                text = self._expand_timed_video(text, video_grid, num_frames)
            else:
                text = self._expand(text, VIDEO_PAD, [video_grid])
        return text

    def _expand(self, text: str, pad: str, grids: Sequence[Grid]) -> str:
        """Repeat each placeholder once per merged vision token of its image or video."""
        pieces = text.split(pad)
        if len(pieces) - 1 != len(grids):
            raise ValueError(f"prompt has {len(pieces) - 1} {pad} but {len(grids)} media")
        counts = [math.prod(g) // self.merge_size**2 for g in grids]
        out = pieces[0]
        for count, piece in zip(counts, pieces[1:]):
            out += pad * count + piece
        return out

    def _expand_timed_video(self, text: str, grid: Grid, num_frames: int) -> str:
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

    def shared_media_inputs(
        self, prompts: Sequence[EncodedPrompt], rows: Sequence[int],
        completions: Sequence[Sequence[int]],
    ) -> dict[str, torch.Tensor]:
        """``policy_inputs`` of the rows ``prompts[rows[i]]`` + ``completions[i]``, each
        prompt's media once: the vision keys hold the media of ``prompts`` in order (what the
        tower runs on), and ``image_index`` / ``video_index`` name, for each image / video of
        the rows in row order, which of those it is (``PolicyModule`` runs the tower once per
        medium and indexes its outputs out to the rows). GRPO's G rows of a prompt hold the
        same images: the tower then runs once where the whole rows run it G times."""
        texts = [EncodedPrompt(input_ids=prompts[r].input_ids) for r in rows]
        batch = self.policy_inputs(texts, completions)
        for pixels_key, grid_key, index_key in (
                ("pixel_values", "image_grid_thw", "image_index"),
                ("pixel_values_videos", "video_grid_thw", "video_index")):
            grids = [getattr(p, grid_key) for p in prompts]
            counts = [0 if g is None else g.shape[0] for g in grids]
            if not any(counts[r] for r in rows):
                continue
            starts = np.cumsum([0, *counts]).tolist()
            batch[pixels_key] = torch.cat([getattr(p, pixels_key) for p in prompts
                                           if getattr(p, pixels_key) is not None])
            batch[grid_key] = torch.cat([g for g in grids if g is not None])
            batch[index_key] = torch.tensor(
                [starts[r] + k for r in rows for k in range(counts[r])], dtype=torch.long)
        return batch

    def shared_prompt_inputs(
        self, prompts: Sequence[EncodedPrompt], completions: Sequence[Sequence[int]]
    ) -> dict[str, torch.Tensor]:
        """Each prompt once, its ``len(completions) // len(prompts)`` completions after it: the
        kwargs of ``PolicyModule``'s shared-prompt forward. Prompts are left-padded as in
        ``collate``; completions are right-padded in ``completion_ids``, row ``i * G + k``
        the k-th completion of prompt i."""
        if not prompts or len(completions) % len(prompts):
            raise ValueError(f"{len(completions)} completions do not split evenly over "
                             f"{len(prompts)} prompts")
        self._check_completions(completions)
        batch = self.collate(prompts)
        batch.pop("prompt_lengths")
        width = max(1, max(len(c) for c in completions))
        completion_ids = torch.full((len(completions), width), self.pad_id, dtype=torch.long)
        for i, completion in enumerate(completions):
            completion_ids[i, :len(completion)] = torch.tensor(list(completion), dtype=torch.long)
        batch["completion_ids"] = completion_ids
        batch["completion_lengths"] = torch.tensor([len(c) for c in completions])
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
    height, width = _resized_size(frames[0].height, frames[0].width, ip)
    arrays = [_normalised(frame, height, width, ip) for frame in frames]
    while len(arrays) % temporal:
        arrays.append(arrays[-1])
    video = np.stack(arrays)  # [T, C, H, W]
    grid_t, grid_h, grid_w = video_grid_for(frames[0].height, frames[0].width, len(frames), ip)
    channels = video.shape[1]
    patches = video.reshape(
        grid_t, temporal, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch
    )
    # -> (t, h-blocks, w-blocks, merge-row, merge-col, C, temporal, patch-row, patch-col)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(grid_t * grid_h * grid_w, channels * temporal * patch * patch)
    grid = torch.tensor([[grid_t, grid_h, grid_w]], dtype=torch.long)
    return torch.from_numpy(np.ascontiguousarray(flat)), grid


def image_grid(height: int, width: int, image_processor: Any) -> Grid:
    """The ``image_grid_thw`` row the image processor gives an image of this size."""
    ip = image_processor
    if getattr(ip, "do_resize", True):
        height, width = _resized_size(height, width, ip)
    patch = int(ip.patch_size)
    return 1, height // patch, width // patch


def video_grid_for(height: int, width: int, num_frames: int, image_processor: Any) -> Grid:
    """The ``video_grid_thw`` row ``video_patches`` gives ``num_frames`` frames whose first
    frame has this size (an odd count repeats the last frame)."""
    ip = image_processor
    patch, temporal = int(ip.patch_size), int(ip.temporal_patch_size)
    height, width = _resized_size(height, width, ip)
    return math.ceil(num_frames / temporal), height // patch, width // patch


def _grid(row: Sequence[int]) -> Grid:
    t, h, w = (int(v) for v in row)
    return t, h, w


def _resized_size(height: int, width: int, ip: Any) -> tuple[int, int]:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    size = ip.size
    min_pixels = size.get("shortest_edge") if isinstance(size, dict) else size.shortest_edge
    max_pixels = size.get("longest_edge") if isinstance(size, dict) else size.longest_edge
    return smart_resize(
        height, width, factor=int(ip.patch_size) * int(ip.merge_size),
        min_pixels=min_pixels, max_pixels=max_pixels,
    )


def _normalised(image: Image.Image, height: int, width: int, ip: Any) -> np.ndarray:
    resized = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    array = np.asarray(resized, dtype=np.float32) * float(ip.rescale_factor)
    mean = np.asarray(ip.image_mean, dtype=np.float32)
    std = np.asarray(ip.image_std, dtype=np.float32)
    return ((array - mean) / std).transpose(2, 0, 1)


def check_prompt_lengths(
    encoder: InputEncoder, records: Sequence[R], limit: int, skip_invalid: bool
) -> tuple[list[R], list[str]]:
    """Apply ``data.max_prompt_tokens``: every side of each record (a ``Pair``'s query and
    target, an ``EvalQuery``'s query and each candidate) must have a prompt of at most
    ``limit`` tokens (``InputEncoder.prompt_length``; no pixels are decoded).

    A side over the limit, or with an unreadable image, raises ``DataError`` naming its
    ``file:line``; with ``skip_invalid`` its record is dropped instead. Returns the kept records
    and one message per dropped record.
    """
    lengths: dict[Side, int] = {}  # candidates repeat across queries; Side ignores its source
    kept: list[R] = []
    skipped: list[str] = []
    for record in records:
        try:
            for name, side in _named_sides(record):
                if side not in lengths:
                    lengths[side] = encoder.prompt_length(side)
                if lengths[side] > limit:
                    raise DataError(
                        f"{_where(side)}{name} prompt is {lengths[side]} tokens, over "
                        f"data.max_prompt_tokens={limit}"
                    )
        except DataError as err:
            if not skip_invalid:
                raise
            skipped.append(str(err))
            continue
        kept.append(record)
    return kept, skipped


def _named_sides(record: Pair | EvalQuery) -> list[tuple[str, Side]]:
    if isinstance(record, Pair):
        return [("query", record.query), ("target", record.target)]
    if isinstance(record, EvalQuery):
        return [("query", record.query)] + [
            (f"candidate {i}", c) for i, c in enumerate(record.candidates)]
    raise TypeError(f"expected Pair or EvalQuery records, got {type(record).__name__}")
