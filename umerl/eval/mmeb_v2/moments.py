"""MMEB-V2's moment retrieval tasks: a description (and a video, an image or nothing) against
clips, one or more of which are the moment described.

Facts from VLM2Vec's loaders (TIGER-AI-Lab/VLM2Vec at 6e1e1d4, ``src/data/eval_dataset/
moment_retrieval_datasets.py`` for QVHighlight and Charades-STA, ``momentseeker_dataset.py``):

- QVHighlight, Charades-STA: a row's ``video_path`` names a folder of the frame root
  (``<frame_root>/<video file name without extension>/``) holding the query video's frames in
  ``query/`` and one frame folder per clip beside it; the clip whose folder name starts with
  ``positive`` is the answer. The query is the video (8 frames) and the row's ``query``; each
  clip is 8 frames. A clip's candidate name is its folder.
- MomentSeeker: clips are listed in the row (``positive_frames``, ``negative_frames``: their
  ``output_path``), each a folder ``<frame_root>/video_frames/<output_path with "/" as "_",
  without ".mp4">/``; every positive counts. The query is the text with, by ``input_frames``, a
  video (``.mp4``: its frames folder, named as a clip's) or an image
  (``.jpg``: ``<frame_root>/query_<input_frames>``). Its frames are all those extracted (VLM2Vec
  reads them with ``load_frames``, no sampling).

Every pool is local: the query's own clips.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

from umerl.data.formats import DataError, EvalQuery, Side, join_instruction
from umerl.eval.mmeb_v2.catalog import TaskInfo
from umerl.eval.mmeb_v2.files import read_rows
from umerl.eval.mmeb_v2.sides import Names, frames, image_file, named_query, string

MOMENT_QUERY = "Find the clip that corresponds to the described scene in the given video:"
MOMENT_TARGET = "Understand the content of the provided video."
SEEKER_QUERY_TEXT = "Find the clip that corresponds to the given text:"
SEEKER_QUERY_IMAGE = "Select the video clip that aligns with the given text and image:"
SEEKER_QUERY_VIDEO = "Find the clip that corresponds to the given sentence and video segment:"
SEEKER_TARGET = "Understand the content of the provided video clip."
QUERY_FOLDER = "query"  # a moment video's own frames, beside its clips


def _clip_side(text: str, folder: Path, num_frames: int | None, where: str) -> Side:
    return Side(text=text, video=frames(folder, num_frames, where), source=where)


def _clip_folders(video: Path, where: str) -> tuple[list[Path], Path]:
    """A moment video's clip folders (in name order: VLM2Vec takes the file system's) and the
    one positive among them."""
    if not video.is_dir():
        raise DataError(f"{where}: no frame folder {video} (MMEB-V2 ships the frames in "
                        "video-tasks/frames/video_mret.tar.gz; extract it there)")
    clips = sorted(p for p in video.iterdir() if p.is_dir() and p.name != QUERY_FOLDER)
    positives = [p for p in clips if p.name.startswith("positive")]
    if len(positives) != 1:
        raise DataError(f"{where}: {video} needs exactly one clip folder named 'positive*', "
                        f"found {[p.name for p in positives]}")
    return clips, positives[0]


def load_moments(root: Path, info: TaskInfo) -> tuple[list[EvalQuery], list[Side]]:
    """QVHighlight, Charades-STA: the query video and its description against its clips."""
    names, items = Names(), []
    for where, row in read_rows(root, info.repo, info.subset, info.split,
                                ("query", "video_path")):
        stem = os.path.splitext(os.path.basename(string(row, "video_path", where)))[0]
        video = root / info.media_root / stem
        clips, positive = _clip_folders(video, where)
        query = Side(text=join_instruction(MOMENT_QUERY, string(row, "query", where)),
                     video=frames(video / QUERY_FOLDER, info.num_frames, where), source=where)
        makers = [partial(_clip_side, MOMENT_TARGET, clip, info.num_frames, f"{where}: {clip}")
                  for clip in clips]
        items.append(named_query(names, query, [str(c) for c in clips], makers,
                                 {str(positive): 1.0}, where))
    return items, []


def _seeker_clip(media: Path, output_path: str) -> Path:
    return media / "video_frames" / output_path.replace("/", "_").split(".mp4")[0]


def _output_paths(row: dict[str, Any], key: str, where: str) -> list[str]:
    entries = row[key]
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("output_path"), str) for e in entries):
        raise DataError(f"{where}: field '{key}' must be a list of {{'output_path': str}}")
    return [e["output_path"] for e in entries]


def _seeker_query(media: Path, row: dict[str, Any], num_frames: int | None, where: str) -> Side:
    text, given = string(row, "query", where), string(row, "input_frames", where)
    if given.endswith(".mp4"):
        folder = media / "video_frames" / given.split(".mp4")[0].replace("/", "_")
        return Side(text=join_instruction(SEEKER_QUERY_VIDEO, text),
                    video=frames(folder, num_frames, where), source=where)
    if given.endswith(".jpg"):
        image = image_file(media, f"query_{given}", where, "input_frames")
        return Side(text=join_instruction(SEEKER_QUERY_IMAGE, text), images=(image,),
                    source=where)
    return Side(text=join_instruction(SEEKER_QUERY_TEXT, text), source=where)


def load_momentseeker(root: Path, info: TaskInfo) -> tuple[list[EvalQuery], list[Side]]:
    """MomentSeeker: a text (with a video, an image or alone) against its listed clips."""
    media, names, items = root / info.media_root, Names(), []
    for where, row in read_rows(root, info.repo, info.subset, info.split,
                                ("query", "positive_frames", "negative_frames", "input_frames")):
        positives = [_seeker_clip(media, p)
                     for p in _output_paths(row, "positive_frames", where)]
        negatives = [_seeker_clip(media, p)
                     for p in _output_paths(row, "negative_frames", where)]
        clips = positives + negatives
        makers = [partial(_clip_side, SEEKER_TARGET, clip, info.num_frames, f"{where}: {clip}")
                  for clip in clips]
        query = _seeker_query(media, row, info.num_frames, where)
        items.append(named_query(names, query, [str(c) for c in clips], makers,
                                 {str(p): 1.0 for p in positives}, where))
    return items, []
