"""Read one MMEB-V2 task from a local copy into umerl's queries, candidates and pools.

Each parser builds what the VLM2Vec loader of the same name builds (``src/data/eval_dataset/``):
the query side, each query's candidate names with the positive (or, for visual documents, the
qrels' graded relevance), and for global tasks the extra corpus (the full label set of video
classification, the page corpus of ViDoRe/VisRAG). Candidates are deduplicated by VLM2Vec's
*candidate name*: the label text for classification, the option for video QA (``video_qa``),
the image path for text-to-image, ``path:caption`` for visual grounding and image-to-image, the
video name for video retrieval, the clip's frame folder for moment retrieval (``moments``), the
corpus id for documents. The first side seen under a name stands for every later one.

Side texts are the instruction and the text joined as in umerl's own MMEB files (the model's
chat template adds the vision placeholders, so VLM2Vec's backbone-specific image tokens are
dropped). A local task's pool is its query's candidate names, each name once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from umerl.data.formats import DataError, EvalQuery, Side, check_side_texts, join_instruction
from umerl.eval.evaluate import TaskPools, build_pools
from umerl.eval.mmeb_v2.catalog import TaskInfo
from umerl.eval.mmeb_v2.files import Row, read_rows
from umerl.eval.mmeb_v2.labels import VIDEO_CLS_LABELS
from umerl.eval.mmeb_v2.moments import load_moments, load_momentseeker
from umerl.eval.mmeb_v2.pages import rebuild_missing_pages
from umerl.eval.mmeb_v2.sides import Names, frames, image_file, named_query, string_list
from umerl.eval.mmeb_v2.video_qa import QA_LAYOUTS, load_video_qa

IMAGE_TOKEN = "<|image_1|>"  # MMEB's image placeholder in instructions
VIDEO_CLS_INSTRUCTION = {
    "K700": "Recognize the category of the video content.",
    "SmthSmthV2": "What actions or object interactions are being performed by the person in "
                  "the video?",
    "UCF101": "What activities or sports are being performed by the person in the video?",
    "HMDB51": "What actions or objects interactions are the person in the video doing?",
    "Breakfast": "Recognize the breakfast type that the person is cooking in the video.",
}
VIDEO_CLS_LABEL_SET = {"K700": "Kinetics-700", "UCF101": "UCF101", "HMDB51": "HMDB51",
                       "Breakfast": "Breakfast"}
VIDEO_RET_QUERY = "Find a video that contains the following visual content:"
VIDEO_RET_TARGET = "Understand the content of the provided video."
DOC_QUERY = "Find a document image that matches the given query:"
DOC_TARGET = "Understand the content of the provided document image."


@dataclass
class LoadedTask:
    info: TaskInfo
    items: list[EvalQuery]
    corpus: list[Side] = field(default_factory=list)  # global pools: candidates beyond the rows


def load_task(root: Path, info: TaskInfo) -> LoadedTask:
    """The task's queries and candidates, read from the local copy at ``root``."""
    items, corpus = PARSERS[info.parser](root, info)
    if not items:
        raise DataError(f"MMEB-V2 task {info.name}: no queries in {root / info.repo}")
    check_side_texts([side for item in items for side in (item.query, *item.candidates)]
                     + corpus)
    return LoadedTask(info, items, corpus)


def task_pools(task: LoadedTask) -> TaskPools:
    """Unique candidates and each query's pool: its own names (local) or every unique
    candidate, the corpus included (global), as VLM2Vec's ``generate_cand_dataset``."""
    pools = build_pools(task.items, "local")
    if task.info.pool == "local":
        return pools
    candidates = list(pools.candidates)
    seen = {side.key() for side in candidates}
    for side in task.corpus:
        if side.key() not in seen:
            seen.add(side.key())
            candidates.append(side)
    everything = np.arange(len(candidates))
    relevance = []
    for members, grades in zip(pools.pools, pools.relevance):
        full = np.zeros(len(candidates))
        full[members] = grades
        relevance.append(full)
    return TaskPools(pools.queries, candidates, [everything] * len(relevance), relevance)


def _image_side(text: str, root: Path, relative: str, where: str, name: str) -> Side:
    return Side(text=text, images=(image_file(root, relative, where, name),), source=where)


def _video_side(folder: Path, num_frames: int | None, where: str) -> Side:
    return Side(text=VIDEO_RET_TARGET, video=frames(folder, num_frames, where), source=where)


def _strip_image_token(text: Any, where: str, key: str) -> str:
    if not isinstance(text, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(text).__name__}")
    return text.replace(IMAGE_TOKEN, "").strip()


# ---- image tasks: ziyjiang/MMEB_Test_Instruct rows, images under image-tasks/ -------------

IMAGE_COLUMNS = ("qry_inst", "qry_text", "qry_img_path", "tgt_inst", "tgt_text", "tgt_img_path")


def _image_rows(root: Path, info: TaskInfo) -> list[Row]:
    return read_rows(root, info.repo, info.subset, info.split, IMAGE_COLUMNS)


def _load_image_text_targets(root: Path, info: TaskInfo) -> tuple[list[EvalQuery], list[Side]]:
    """image_cls, image_qa, image_i2t: an image query, text candidates named by their text."""
    media, names, items = root / info.media_root, Names(), []
    for where, row in _image_rows(root, info):
        text = join_instruction(_strip_image_token(row["qry_inst"], where, "qry_inst"),
                                _strip_image_token(row["qry_text"], where, "qry_text"))
        query = Side(text=text, images=(image_file(media, row["qry_img_path"], where,
                                                   "qry_img_path"),), source=where)
        targets = string_list(row, "tgt_text", where)
        makers = [partial(Side, text=t, source=f"{where}: candidate {i}")
                  for i, t in enumerate(targets)]
        items.append(named_query(names, query, targets, makers, {targets[0]: 1.0}, where))
    return items, []


def _load_image_targets(root: Path, info: TaskInfo) -> tuple[list[EvalQuery], list[Side]]:
    """image_t2i (text query) and image_i2i_vg (image query): image candidates, named by path
    (t2i) or by ``path:caption`` (i2i/VG, where one image holds several targets)."""
    media, names, items = root / info.media_root, Names(), []
    with_query_image = info.parser == "image_i2i_vg"
    for where, row in _image_rows(root, info):
        text = join_instruction(_strip_image_token(row["qry_inst"], where, "qry_inst"),
                                _strip_image_token(row["qry_text"], where, "qry_text"))
        images = (image_file(media, row["qry_img_path"], where, "qry_img_path"),) \
            if with_query_image else ()
        query = Side(text=text, images=images, source=where)
        paths, captions = string_list(row, "tgt_img_path", where), row["tgt_text"]
        if not isinstance(captions, list) or len(captions) != len(paths):
            raise DataError(f"{where}: 'tgt_text' must be a list as long as 'tgt_img_path' "
                            f"({len(paths)})")
        inst = _strip_image_token(row["tgt_inst"], where, "tgt_inst")
        # As VLM2Vec: captions count only when the first one is non-empty (WebQA, EDIS,
        # RefCOCO-Matching); otherwise every candidate is the instruction and its image.
        use_captions = bool(str(captions[0]).strip())
        cand_names = [f"{p}:{str(c).strip(chr(34))}" if with_query_image else p
                      for p, c in zip(paths, captions)]
        makers = [partial(_image_side, join_instruction(inst, str(c)) if use_captions else inst,
                          media, p, f"{where}: candidate {i}", f"tgt_img_path[{i}]")
                  for i, (p, c) in enumerate(zip(paths, captions))]
        items.append(named_query(names, query, cand_names, makers, {cand_names[0]: 1.0}, where))
    return items, []


# ---- video tasks: VLM2Vec/<dataset> rows, frames under video-tasks/frames/ -----------------

def _load_video_cls(root: Path, info: TaskInfo) -> tuple[list[EvalQuery], list[Side]]:
    """A video query against every label of the dataset (global) or, for SSv2, against its
    own listed options (local)."""
    local = info.parser == "ssv2"
    columns = ("video_id", "pos_text", "neg_text") if local else ("video_id", "pos_text")
    names, items = Names(), []
    for where, row in read_rows(root, info.repo, info.subset, info.split, columns):
        video = frames(root / info.media_root / str(row["video_id"]), info.num_frames, where)
        query = Side(text=VIDEO_CLS_INSTRUCTION[info.name], video=video, source=where)
        label = str(row["pos_text"])
        options = string_list(row, "neg_text", where) if local else [label]
        makers = [partial(Side, text=t, source=f"{where}: candidate {i}")
                  for i, t in enumerate(options)]
        items.append(named_query(names, query, options, makers, {label: 1.0}, where))
    corpus = [] if local else [
        names.side(label, partial(Side, text=label, source=f"{info.name} label set"))
        for label in VIDEO_CLS_LABELS[VIDEO_CLS_LABEL_SET[info.name]]
    ]
    return items, corpus


# Video retrieval: which columns give the video's name (its frame folder) and the caption.
def _msrvtt(row: dict[str, Any]) -> tuple[str, str]:
    return str(row["video_id"]), row["caption"]


def _msvd(row: dict[str, Any]) -> tuple[str, str]:
    return str(row["video_id"]), row["caption"][0]


def _didemo(row: dict[str, Any]) -> tuple[str, str]:
    return os.path.splitext(os.path.basename(row["video"]))[0], row["caption"]


def _vatex(row: dict[str, Any]) -> tuple[str, str]:
    return str(row["videoID"]), row["enCap"][0]


def _youcook2(row: dict[str, Any]) -> tuple[str, str]:
    return str(row["id"]), row["sentence"]


VIDEO_RET = {
    "msrvtt": (("video_id", "caption"), _msrvtt),
    "msvd": (("video_id", "caption"), _msvd),
    "didemo": (("video", "caption"), _didemo),
    "vatex": (("videoID", "enCap"), _vatex),
    "youcook2": (("id", "sentence"), _youcook2),
}


def _load_video_ret(root: Path, info: TaskInfo) -> tuple[list[EvalQuery], list[Side]]:
    """A caption against every video of the split, each video named by its id."""
    columns, fields = VIDEO_RET[info.parser]
    names, items = Names(), []
    for where, row in read_rows(root, info.repo, info.subset, info.split, columns):
        try:
            video_name, caption = fields(row)
        except (TypeError, IndexError, KeyError) as err:
            raise DataError(f"{where}: unexpected {columns} ({err!r})") from None
        query = Side(text=join_instruction(VIDEO_RET_QUERY, str(caption)), source=where)
        make = partial(_video_side, root / info.media_root / video_name, info.num_frames, where)
        items.append(named_query(names, query, [video_name], [make], {video_name: 1.0}, where))
    return items, []


# ---- visual documents: BEIR queries/corpus/qrels, page images under visdoc-tasks/ ----------

def _page_file(parser: str, corpus_id: str) -> str:
    if parser == "visrag":  # VLM2Vec shortens VisRAG's long names: 50 chars + an md5 tag
        base, ext = os.path.splitext(corpus_id)
        return f"{base[:50]}_{hashlib.md5(corpus_id.encode('utf-8')).hexdigest()[:8]}{ext}"
    return f"{corpus_id}.png"


def _qrels(root: Path, info: TaskInfo) -> dict[str, dict[str, float]]:
    """query id -> {corpus id: grade}; grades > 0 only, the highest of repeated pairs."""
    mapping: dict[str, dict[str, float]] = {}
    for where, row in read_rows(root, info.repo, "qrels", info.split,
                                ("query-id", "corpus-id", "score")):
        score = row["score"]
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise DataError(f"{where}: qrels 'score' must be a number, got {score!r}")
        if score > 0:
            docs = mapping.setdefault(str(row["query-id"]), {})
            docs[str(row["corpus-id"])] = max(docs.get(str(row["corpus-id"]), 0.0), float(score))
    return mapping


def _load_visdoc(root: Path, info: TaskInfo) -> tuple[list[EvalQuery], list[Side]]:
    """A text query against the whole page corpus; its qrels give graded relevance."""
    qrels, pages = _qrels(root, info), root / info.media_root
    names, items = Names(), []

    def page(corpus_id: str, where: str) -> Callable[[], Side]:
        return partial(_image_side, DOC_TARGET, pages, _page_file(info.parser, corpus_id), where,
                       f"corpus-id {corpus_id}")

    # As VLM2Vec, the corpus comes first: its pages missing on disk are written from its
    # image column before any query's candidates are looked up.
    corpus_rows = [(where, str(row["corpus-id"])) for where, row in
                   read_rows(root, info.repo, "corpus", info.split, ("corpus-id",))]
    rebuild_missing_pages(root, info, {corpus_id: pages / _page_file(info.parser, corpus_id)
                                       for _, corpus_id in corpus_rows})
    for where, row in read_rows(root, info.repo, "queries", info.split, ("query-id", "query")):
        docs = qrels.get(str(row["query-id"]))
        if not docs:
            raise DataError(f"{where}: query-id {row['query-id']!r} has no relevant document "
                            f"in qrels")
        query = Side(text=join_instruction(DOC_QUERY, str(row["query"])), source=where)
        items.append(named_query(names, query, list(docs), [page(d, where) for d in docs],
                                 docs, where))
    corpus = [names.side(corpus_id, page(corpus_id, where)) for where, corpus_id in corpus_rows]
    return items, corpus


PARSERS: dict[str, Callable[[Path, TaskInfo], tuple[list[EvalQuery], list[Side]]]] = {
    "image_cls": _load_image_text_targets,
    "image_qa": _load_image_text_targets,
    "image_i2t": _load_image_text_targets,
    "image_t2i": _load_image_targets,
    "image_i2i_vg": _load_image_targets,
    "video_cls": _load_video_cls,
    "ssv2": _load_video_cls,
    **{parser: _load_video_ret for parser in VIDEO_RET},
    **{parser: load_video_qa for parser in QA_LAYOUTS},
    "moment_retrieval": load_moments,
    "momentseeker": load_momentseeker,
    "vidore": _load_visdoc,
    "visrag": _load_visdoc,
}
