"""Readers for the three JSONL formats in docs/data-formats.md, with validation.

Every problem is reported as ``DataError("path:line: what is wrong")``: malformed JSON or
non-UTF-8 lines, wrong fields, missing media, media that are not readable images, video frames of
differing sizes. Nothing is skipped silently: ``skip_invalid=True`` skips bad lines but counts
them in the returned ``DataReport``. Images are checked from their header only (no pixel
decode), once per file version.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from umerl.data.tokens import GEN_EMB, control_token_problem

T = TypeVar("T")

# The UME-R1 completion format; the format reward uses the same pattern.
COMPLETION_PATTERN = re.compile(r"<think>.*?</think>.*?\s*<answer>.*?\s*<gen_emb>", re.DOTALL)


class DataError(ValueError):
    """A data file is malformed; the message starts with ``path:line:``."""


@dataclass(frozen=True)
class Side:
    """One side (query or target) of a pair: text plus optional images or video frames."""

    text: str = ""
    images: tuple[str, ...] = ()
    video: tuple[str, ...] = ()
    completion: str | None = None
    # Where the side was read ("path:line", "path:line: candidate i"); not part of its identity.
    source: str = field(default="", compare=False)

    @property
    def is_text_only(self) -> bool:
        return not self.images and not self.video

    def key(self) -> str:
        """Identity of a candidate, used to merge duplicates in global pools."""
        media = ",".join(self.images or self.video)
        return f"{media}\t{self.text}"


@dataclass(frozen=True)
class Pair:
    """A (query, target) pair for SFT (sides carry completions) or RL (they do not)."""

    id: str
    task: str
    query: Side
    target: Side
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalQuery:
    """One MMEB query: its side, its own candidate list and each candidate's relevance grade."""

    query: Side
    candidates: tuple[Side, ...]
    relevance: tuple[float, ...]


@dataclass
class DataReport:
    """What a reader kept and what it skipped (only with ``skip_invalid``)."""

    path: str
    kept: int = 0
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.path}: {self.kept} records"
        if self.skipped:
            text += f", {len(self.skipped)} skipped (first: {self.skipped[0]})"
        return text


def read_sft_pairs(
    path: str | Path, media_root: str | Path | None = None, skip_invalid: bool = False
) -> tuple[list[Pair], DataReport]:
    """Read SFT pairs: both sides need a completion in the UME-R1 format."""
    return _read(path, media_root, skip_invalid, lambda r, ctx: _parse_pair(r, ctx, True))


def read_rl_pairs(
    path: str | Path, media_root: str | Path | None = None, skip_invalid: bool = False
) -> tuple[list[Pair], DataReport]:
    """Read RL pairs: completions are not needed and are dropped if present."""
    return _read(path, media_root, skip_invalid, lambda r, ctx: _parse_pair(r, ctx, False))


def read_eval_queries(
    path: str | Path, media_root: str | Path | None = None, skip_invalid: bool = False
) -> tuple[list[EvalQuery], DataReport]:
    """Read an MMEB-format task file (one query and its candidates per line)."""
    return _read(path, media_root, skip_invalid, _parse_eval_query)


@dataclass(frozen=True)
class _Context:
    where: str  # "path:line"
    media_root: Path

    def fail(self, message: str) -> DataError:
        return DataError(f"{self.where}: {message}")


def _read(
    path: str | Path,
    media_root: str | Path | None,
    skip_invalid: bool,
    parse: Callable[[dict[str, Any], _Context], T],
) -> tuple[list[T], DataReport]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    root = Path(media_root) if media_root is not None else path.parent
    report = DataReport(str(path))
    records: list[T] = []
    for line_no, raw in _numbered_lines(path):
        ctx = _Context(f"{path}:{line_no}", root)
        try:
            line = _decode(raw, ctx)
            if not line.strip():
                continue
            records.append(parse(_parse_json(line, ctx), ctx))
        except DataError as err:
            if not skip_invalid:
                raise
            report.skipped.append(str(err))
    report.kept = len(records)
    if not records:
        raise DataError(f"{path}: no valid records")
    return records, report


def _numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Lines as bytes, so that one undecodable line is one bad line, not a crash."""
    with path.open("rb") as handle:
        yield from enumerate(handle, start=1)


def _decode(raw: bytes, ctx: _Context) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ctx.fail(
            f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
        ) from None


def _parse_json(line: str, ctx: _Context) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ctx.fail(f"malformed JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise ctx.fail(f"expected a JSON object, got {type(record).__name__}")
    return record


def _get(record: dict[str, Any], key: str, kind: type | tuple[type, ...], ctx: _Context,
         default: Any = ...) -> Any:
    if key not in record:
        if default is ...:
            raise ctx.fail(f"missing field '{key}'")
        return default
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ctx.fail(f"field '{key}' must be {names}, got {type(value).__name__}")
    return value


def image_header_size(path: str | Path) -> tuple[int, int] | str:
    """``(width, height)`` of an image file read from its header only (pixels are not decoded),
    or a short reason why the file is not a readable image. Cached per path and file version:
    classification candidates repeat the same image thousands of times."""
    try:
        info = os.stat(path)
    except OSError as err:
        return err.strerror or type(err).__name__
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    return _header_size(str(path), info.st_mtime_ns, info.st_size)


@lru_cache(maxsize=1 << 18)
def _header_size(path: str, mtime_ns: int, size: int) -> tuple[int, int] | str:
    del mtime_ns, size  # only part of the cache key
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = str(err) or type(err).__name__
        # PIL names the file in its message; the caller already does.
        return reason.replace(f" {path!r}", "").replace(f" {path}", "")
    if width < 1 or height < 1:
        return f"empty image ({width}x{height})"
    return width, height


def _text(record: dict[str, Any], key: str, ctx: _Context, default: Any = ...) -> str:
    """A text field, free of the model's control tokens (``control_token_problem``)."""
    return _checked_text(_get(record, key, str, ctx, default), key, ctx)


def _checked_text(text: str, name: str, ctx: _Context) -> str:
    problem = control_token_problem(text)
    if problem:
        raise ctx.fail(f"field '{name}' {problem}")
    return text


def _media_list(
    record: dict[str, Any], key: str, ctx: _Context, video: bool = False
) -> tuple[str, ...]:
    """Paths of ``record[key]``, each an existing image; for a video (``video=True``) all
    frames must have the first frame's size."""
    values = _get(record, key, list, ctx, default=[])
    paths: list[str] = []
    first: tuple[int, int] | None = None
    for i, value in enumerate(values):
        if not isinstance(value, str) or not value:
            raise ctx.fail(f"field '{key}[{i}]' must be a non-empty path string")
        path, size = _resolve_image(value, f"{key}[{i}]", ctx)
        if video and first is not None and size != first:
            raise ctx.fail(
                f"field '{key}[{i}]': video frame {i} is {size[0]}x{size[1]} but frame 0 is "
                f"{first[0]}x{first[1]} (all frames of a video need one size): {path}"
            )
        first = first or size
        paths.append(path)
    return tuple(paths)


def _resolve_media(value: str, name: str, ctx: _Context) -> str:
    return _resolve_image(value, name, ctx)[0]


def _resolve_image(value: str, name: str, ctx: _Context) -> tuple[str, tuple[int, int]]:
    """The resolved path of an image and its ``(width, height)`` from the file's header."""
    path = Path(value)
    if not path.is_absolute():
        path = ctx.media_root / path
    if not path.is_file():
        raise ctx.fail(f"missing media file for '{name}': {path}")
    size = image_header_size(path)
    if isinstance(size, str):
        raise ctx.fail(f"field '{name}': not a readable image: {path} ({size})")
    return str(path), size


def _parse_side(record: Any, name: str, ctx: _Context, needs_completion: bool) -> Side:
    if not isinstance(record, dict):
        raise ctx.fail(f"field '{name}' must be object, got {type(record).__name__}")
    side_ctx = _Context(f"{ctx.where}: {name}", ctx.media_root)
    text = _text(record, "text", side_ctx, default="")
    images = _media_list(record, "images", side_ctx)
    video = _media_list(record, "video", side_ctx, video=True)
    if not text.strip() and not images and not video:
        raise ctx.fail(f"empty side '{name}': no text, images or video")
    completion = None
    if needs_completion:
        completion = _get(record, "completion", str, side_ctx)
        if not COMPLETION_PATTERN.search(completion) or not completion.rstrip().endswith(GEN_EMB):
            raise side_ctx.fail(
                "completion does not match <think>…</think><answer>…</answer><gen_emb>"
            )
        _checked_text(completion.rstrip().removesuffix(GEN_EMB), "completion", side_ctx)
    return Side(text=text, images=images, video=video, completion=completion, source=ctx.where)


def _parse_pair(record: dict[str, Any], ctx: _Context, needs_completion: bool) -> Pair:
    pair_id = _get(record, "id", (str, int), ctx)
    task = _get(record, "task", str, ctx)
    query = _parse_side(_get(record, "query", dict, ctx), "query", ctx, needs_completion)
    target = _parse_side(_get(record, "target", dict, ctx), "target", ctx, needs_completion)
    meta = _get(record, "meta", dict, ctx, default={})
    return Pair(id=str(pair_id), task=task, query=query, target=target, meta=meta)


def check_side_texts(sides: Iterable[Side]) -> None:
    """Sides built elsewhere than these readers (MMEB-V2's parquet rows): the same control-token
    check, the error naming each side's source."""
    for side in sides:
        problem = control_token_problem(side.text)
        if problem:
            raise DataError(f"{side.source or 'a side'}: text {problem}")


def join_instruction(instruction: str, text: str) -> str:
    """MMEB splits instruction and text; a side's text is both, on separate lines."""
    instruction, text = instruction.strip(), text.strip()
    return f"{instruction}\n{text}" if instruction and text else instruction or text


def _parse_eval_query(record: dict[str, Any], ctx: _Context) -> EvalQuery:
    qry_text = join_instruction(
        _text(record, "qry_inst", ctx, default=""), _text(record, "qry_text", ctx, "")
    )
    qry_img = _get(record, "qry_img_path", str, ctx, default="")
    images = (_resolve_media(qry_img, "qry_img_path", ctx),) if qry_img else ()
    video = _media_list(record, "qry_video", ctx, video=True)
    if not qry_text and not images and not video:
        raise ctx.fail("empty query: no qry_inst/qry_text, qry_img_path or qry_video")
    query = Side(text=qry_text, images=images, video=video, source=ctx.where)
    candidates = _parse_candidates(record, ctx)
    relevance = _parse_relevance(record, len(candidates), ctx)
    return EvalQuery(query=query, candidates=candidates, relevance=relevance)


def _parse_candidates(record: dict[str, Any], ctx: _Context) -> tuple[Side, ...]:
    tgt_inst = _text(record, "tgt_inst", ctx, default="")
    texts = _get(record, "tgt_text", list, ctx)
    img_paths = _get(record, "tgt_img_path", list, ctx, default=[""] * len(texts))
    if not texts:
        raise ctx.fail("field 'tgt_text' is empty: a query needs at least one candidate")
    if len(img_paths) != len(texts):
        raise ctx.fail(
            f"'tgt_img_path' has {len(img_paths)} entries but 'tgt_text' has {len(texts)}"
        )
    candidates = []
    for i, (text, img) in enumerate(zip(texts, img_paths)):
        if not isinstance(text, str) or not isinstance(img, str):
            raise ctx.fail(f"candidate {i}: 'tgt_text' and 'tgt_img_path' entries must be strings")
        if not text.strip() and not img:
            raise ctx.fail(f"empty candidate {i}: no tgt_text and no tgt_img_path")
        _checked_text(text, f"tgt_text[{i}]", ctx)
        images = (_resolve_media(img, f"tgt_img_path[{i}]", ctx),) if img else ()
        candidates.append(Side(text=join_instruction(tgt_inst, text), images=images,
                               source=f"{ctx.where}: candidate {i}"))
    return tuple(candidates)


def _parse_relevance(record: dict[str, Any], n: int, ctx: _Context) -> tuple[float, ...]:
    if "rel_scores" not in record:
        return (1.0,) + (0.0,) * (n - 1)
    scores = _get(record, "rel_scores", list, ctx)
    if len(scores) != n:
        raise ctx.fail(f"'rel_scores' has {len(scores)} entries but there are {n} candidates")
    for i, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, (int, float)) or score < 0:
            raise ctx.fail(f"'rel_scores[{i}]' must be a number >= 0, got {score!r}")
    if not any(score > 0 for score in scores):
        raise ctx.fail("'rel_scores' has no relevant candidate (all grades are 0)")
    return tuple(float(s) for s in scores)
