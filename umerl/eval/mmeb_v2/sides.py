"""What every MMEB-V2 reader shares: candidates kept by VLM2Vec's candidate name, a query over
its named candidates, and a video's frames sampled from its frame folder."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from umerl.data.formats import DataError, EvalQuery, Side, image_header_size

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")


class Names:
    """Candidate sides by VLM2Vec candidate name: the first side made for a name is kept."""

    def __init__(self) -> None:
        self.sides: dict[str, Side] = {}

    def side(self, name: str, make: Callable[[], Side]) -> Side:
        if name not in self.sides:
            self.sides[name] = make()
        return self.sides[name]


def named_query(names: Names, query: Side, cand_names: list[str],
                makers: list[Callable[[], Side]], grades: dict[str, float],
                where: str) -> EvalQuery:
    """One query over its candidate names (each once, first-seen order) with these grades."""
    order: dict[str, Side] = {}
    for name, make in zip(cand_names, makers):
        if name not in order:
            order[name] = names.side(name, make)
    if not any(grades.get(name, 0.0) > 0 for name in order):
        raise DataError(f"{where}: the positive {sorted(grades)} is not among the candidates")
    return EvalQuery(query, tuple(order.values()),
                     tuple(float(grades.get(name, 0.0)) for name in order))


def string_list(row: dict[str, Any], key: str, where: str) -> list[str]:
    value = row[key]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: field '{key}' must be a non-empty list of strings")
    return value


def string(row: dict[str, Any], key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def image_file(root: Path, relative: Any, where: str, name: str) -> str:
    """The path of an image file of the copy, checked readable."""
    if not isinstance(relative, str) or not relative:
        raise DataError(f"{where}: field '{name}' must be a non-empty path, got {relative!r}")
    path = root / relative
    size = image_header_size(path)
    if isinstance(size, str):
        raise DataError(f"{where}: field '{name}': not a readable image: {path} ({size})")
    return str(path)


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def frames(folder: Path, num_frames: int | None, where: str) -> tuple[str, ...]:
    """``num_frames`` frames spread evenly over the folder's frames (all of them when it has
    fewer, or when ``num_frames`` is None), as VLM2Vec's ``process_video_frames`` and
    ``load_frames``; all frames must have one size."""
    if not folder.is_dir():
        raise DataError(f"{where}: no frame folder {folder} (MMEB-V2 ships the frames in "
                        "video-tasks/frames/*.tar.gz; extract them there)")
    names = sorted((p.name for p in folder.iterdir()
                    if p.suffix.lower() in FRAME_EXTENSIONS), key=_natural_key)
    if not names:
        raise DataError(f"{where}: frame folder {folder} holds no .jpg/.jpeg/.png frames")
    if num_frames is not None and num_frames <= len(names):
        names = [names[i] for i in np.linspace(0, len(names) - 1, num_frames, dtype=int)]
    paths, first = [], None
    for name in names:
        path = folder / name
        size = image_header_size(path)
        if isinstance(size, str):
            raise DataError(f"{where}: frame {path} is not a readable image ({size})")
        if first is not None and size != first:
            raise DataError(f"{where}: frame {path} is {size[0]}x{size[1]} but the first frame "
                            f"is {first[0]}x{first[1]} (all frames of a video need one size)")
        first = first or size
        paths.append(str(path))
    return tuple(paths)
