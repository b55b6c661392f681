"""Build the ``umerl-mini`` benchmark: MMEB-format tasks, SFT pairs and RL pairs from data that
ships inside PyPI packages (see ``SOURCES.md``), so training and evaluation run offline.

Usage: ``python -m umerl.data.benchmark.build OUT_DIR [--seed N] [--rl-extra digits_cls=N]``.

``--rl-extra digits_cls=N`` (``build_benchmark(..., rl_extra={"digits_cls": N})``; opt-in, off by
default) appends N more digits_cls RL queries to the rl split, drawn from the sklearn digits no
split uses, after train: train, test and the first lines of rl are byte-identical to the build
without it (an SFT checkpoint trained on the default build stays valid), only rl grows (rl.jsonl,
rl_pairs.jsonl, images/rl/). digits has 1,797 images; the default splits use 770 of them.

Layout (every path in a JSONL file is relative to that file's own folder, which is the default
media root of ``docs/data-formats.md``)::

    OUT_DIR/tasks.json             manifest (docs/data-formats.md), with a "sources" list
    OUT_DIR/BUILD.json             seed, sizes and line counts (no timestamps)
    OUT_DIR/SOURCES.md             licences and credits, copied from umerl/data/benchmark/SOURCES.md
    OUT_DIR/<task>/{train,rl,test}.jsonl   MMEB-format lines
    OUT_DIR/<task>/sft.jsonl       the train split as SFT pairs (positive target only)
    OUT_DIR/<task>/rl_pairs.jsonl  the rl split as RL pairs
    OUT_DIR/<task>/images/<split>/*.png

Tasks: ``digits_cls``, ``faces_cls``, ``photo_t2i``, ``photo_i2t``, ``lee_text``,
``digits_reason`` (see :data:`TASKS`). Train, rl and test never share a query: a query's
identity is ``(qry_inst, qry_text, sha256 of the query image's pixels)``, and the build stops
before writing anything if two splits of a task share one.

SFT completion rule (deterministic, one per side, built with
:func:`umerl.data.tokens.format_completion`)::

    query side:  format_completion(f"The input {verb} {query_description}.", summary)
    target side: format_completion(f"The candidate is {target_description}.", summary)

``verb`` is "shows" for an image query and "is"/"describes" for a text query. A completion
states only what its own side's input holds (an image's content counts). Where both inputs show
it, both sides share the same ``summary`` (the class label, caption or digit name), so a model
that follows the format writes the same answer for a query and its positive; lee_text's lead and
body are different texts, so each side's summary is its own text's key terms. Per task:

============== =============================================== =====================================
task           query reasoning / target reasoning              summary
============== =============================================== =====================================
digits_cls     "The input shows a handwritten {name}."         digit name ("seven")
               'The candidate is the class label "{name}".'
faces_cls      "The input shows a small grey photo of {l}."    class label ("a human face")
               'The candidate is the class label "{l}".'
photo_t2i      'The input is the caption "{caption}".'         the photo's phrase for the split
               "The candidate is a photo of {phrase}."
photo_i2t      "The input shows {phrase}."                     the photo's phrase for the split
               'The candidate is the caption "{caption}".'
lee_text       "The input is the opening of a news article."   :func:`key_terms` of the lead
               "The candidate is the rest of the same news article."  / of the body
digits_reason  "The input describes a number: {explanation}."  digit name
               "The candidate is a handwritten {name}."
============== =============================================== =====================================

Determinism: every random choice comes from ``numpy.random.default_rng([seed, crc32(key)])``,
splits are drawn test first (the test split depends only on the seed and the test sizes),
iteration is over sorted or fixed-order lists, PNGs are written by Pillow without metadata, and
JSON is written with a fixed key order and ``ensure_ascii=False``. The same seed gives a
byte-identical tree.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import os
import re
import shutil
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from umerl.data.benchmark import sources
from umerl.data.benchmark.reasoning import DIGIT_NAMES, reason_items
from umerl.data.tokens import format_completion

BENCHMARK_NAME = "umerl-mini"
# Raised whenever the built files change: the default cache folder is named after it
# (umerl.data.tasks.default_benchmark_dir), so a newer builder never reuses an older build.
MANIFEST_VERSION = 3
SPLITS = ("train", "rl", "test")
# Splits are drawn in this order, so the test split depends only on the seed and test sizes.
GEN_ORDER = ("test", "rl", "train")

# Per-task sizes. Split counts are numbers of queries, except under "photo", where they are
# image variants per photo (17 photos, so 170 / 68 / 68 queries for photo_t2i and photo_i2t).
# The test splits are as large as the sources allow at an evaluation cost that keeps
# `make run` (three evaluations) short: digits have ~180 images per digit, digits_reason's
# rarest digit has 46 queries (20 + 8 + 15 per digit are used), a photo's test variants are
# one per caption template; faces_cls and lee_text use all of their 200 images / 50 articles.
DEFAULT_SIZES: dict[str, dict] = {
    "digits_cls": {"train": 200, "rl": 80, "test": 400},
    "faces_cls": {"train": 100, "rl": 60, "test": 40, "distractors": 3},
    "photo": {"train": 10, "rl": 4, "test": 4, "max_side": 112},
    "photo_i2t": {"candidates": 10, "distractors": 2, "lemma_pool": 4},
    "lee_text": {"train": 24, "rl": 10, "test": 16, "threshold": 0.5, "max_chars": 300},
    "digits_reason": {"train": 200, "rl": 80, "test": 150, "pool_images": 3},
}

# Tasks that can draw extra RL queries (build_benchmark's rl_extra) and the cls_idx key of
# digits_cls's extra draw.
RL_EXTRA_TASKS = ("digits_cls",)
RL_EXTRA = "rl_extra"

# name -> (modality, kind, pool, metric)
TASKS: dict[str, tuple[str, str, str, str]] = {
    "digits_cls": ("image", "classification", "local", "hit@1"),
    "faces_cls": ("image", "classification", "local", "hit@1"),
    "photo_t2i": ("image", "retrieval", "global", "hit@1"),
    "photo_i2t": ("image", "retrieval", "local", "hit@1"),
    "lee_text": ("text", "retrieval", "global", "ndcg_linear@5"),
    "digits_reason": ("image", "reasoning", "local", "hit@1"),
}

CLS_QRY_INST = "Represent the given image for classification."
CLS_TGT_INST = "Represent the class label."
FACE_LABEL, NONFACE_LABEL = "a human face", "a background patch"
CAPTION_TEMPLATES = ("{}", "a photo of {}", "an image showing {}", "a picture of {}")
# split -> (phrase index, template indices): no caption text is shared between splits.
CAPTION_PLAN = {"test": (0, (0, 1, 2, 3)), "rl": (1, (0, 1, 2, 3)), "train": (2, (0, 1, 2, 3))}
DIGIT_SCALE = 7  # 8x8 -> 56x56, nearest neighbour: 2x2 vision tokens, not 1
FACE_SCALE = 2  # 25x25 -> 50x50, bicubic


class BenchmarkError(RuntimeError):
    """A built task breaks an invariant (shared queries, misaligned candidates, ...)."""


# --------------------------------------------------------------------------------------------
# In-memory records


@dataclass(frozen=True)
class Media:
    path: str  # relative to the task folder
    data: bytes
    key: str  # sha256 of the pixels, identity of the image content


@dataclass
class Line:
    qry_inst: str
    qry_text: str
    qry_img: Media | None
    tgt_inst: str
    cands: list[tuple[str, Media | None]]
    rel: list[float | int]
    summary: str
    q_reason: str
    t_reason: str
    meta: dict = field(default_factory=dict)
    t_summary: str | None = None  # the target's own summary, where it cannot share the query's

    def identity(self) -> tuple[str, str, str]:
        return (self.qry_inst, self.qry_text, self.qry_img.key if self.qry_img else "")


@dataclass
class Task:
    name: str
    splits: dict[str, list[Line]]

    @property
    def spec(self) -> tuple[str, str, str, str]:
        return TASKS[self.name]


def _rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(key.encode("utf-8"))])


def _png(arr: np.ndarray, path: str) -> Media:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"{path}: expected an RGB array, got shape {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    key = hashlib.sha256(repr(arr.shape).encode() + arr.tobytes()).hexdigest()
    return Media(path, buf.getvalue(), key)


def _gray_to_rgb(a: np.ndarray) -> np.ndarray:
    return np.stack([a] * 3, axis=-1)


def _per_class(n: int, k: int, rng: np.random.Generator) -> list[int]:
    """``n`` items spread over ``k`` classes as evenly as possible (extras to random classes)."""
    counts = [n // k] * k
    for c in rng.permutation(k)[: n % k]:
        counts[int(c)] += 1
    return counts


def _article(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def check_rl_extra(rl_extra: dict[str, int] | None) -> dict[str, int]:
    """``rl_extra`` validated, without zero entries (unknown tasks and negatives: an error)."""
    out = {}
    for task, n in (rl_extra or {}).items():
        if task not in RL_EXTRA_TASKS:
            raise ValueError(f"rl_extra: {task!r} has no extra RL pool (only: "
                             f"{', '.join(RL_EXTRA_TASKS)})")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"rl_extra[{task!r}]: {n!r} is not an int >= 0")
        if n:
            out[task] = n
    return out


def merge_sizes(sizes: dict | None) -> dict[str, dict]:
    """:data:`DEFAULT_SIZES` updated with ``sizes`` (unknown keys are an error)."""
    out = copy.deepcopy(DEFAULT_SIZES)
    for group, values in (sizes or {}).items():
        if group not in out:
            raise ValueError(f"sizes: unknown group {group!r} (known: {sorted(out)})")
        for key, value in values.items():
            if key not in out[group]:
                raise ValueError(f"sizes[{group!r}]: unknown key {key!r}")
            out[group][key] = value
    return out


# --------------------------------------------------------------------------------------------
# Digits


def _digit_png(img8: np.ndarray, path: str) -> Media:
    """Dark ink on white, 8x8 -> 56x56 nearest neighbour."""
    gray = 255 - np.round(img8.astype(np.float64) * 255.0 / 16.0).astype(np.uint8)
    big = np.kron(gray, np.ones((DIGIT_SCALE, DIGIT_SCALE), dtype=np.uint8))
    return _png(_gray_to_rgb(big), path)


def _digit_allocation(labels: np.ndarray, sz: dict, seed: int,
                      rl_extra: int = 0) -> tuple[dict, dict]:
    """Disjoint sklearn indices: digits_cls queries per split, digits_reason image pools.

    Drawn test first, so the test split does not change when train or rl sizes do; the
    ``rl_extra`` digits_cls queries (key :data:`RL_EXTRA`, only when > 0) are drawn after all.
    """
    rng = _rng(seed, "digits")
    by_class = [list(rng.permutation(np.flatnonzero(labels == c))) for c in range(10)]

    def take(c: int, n: int, what: str) -> list[int]:
        if n > len(by_class[c]):
            raise ValueError(f"{what}: not enough images of digit {c}")
        out = [int(i) for i in by_class[c][:n]]
        by_class[c] = by_class[c][n:]
        return out

    k = int(sz["digits_reason"]["pool_images"])
    if k < 1:
        raise ValueError("digits_reason: pool_images must be >= 1")
    cls_idx: dict[str, list[int]] = {}
    pools: dict[str, list[list[int]]] = {}
    for split in GEN_ORDER:
        pools[split] = [take(c, k, "digits_reason") for c in range(10)]
        cls_idx[split] = _draw_cls(int(sz["digits_cls"][split]), take, rng)
    # Drawn last, after every split, so that nothing above depends on it.
    extra = int(rl_extra)
    if extra:
        cls_idx[RL_EXTRA] = _draw_cls(extra, take, rng)
    return cls_idx, pools


def _draw_cls(n: int, take, rng: np.random.Generator) -> list[int]:
    """``n`` digits_cls queries spread evenly over the digits, in a random order."""
    counts = _per_class(n, 10, rng)
    chosen = [i for c in range(10) for i in take(c, counts[c], "digits_cls")]
    return [chosen[i] for i in rng.permutation(len(chosen))]


def build_digits_cls(images, labels, cls_idx, seed: int) -> Task:
    rng = _rng(seed, "digits_cls")
    splits: dict[str, list[Line]] = {}
    for split in GEN_ORDER:
        splits[split] = [_digit_cls_line(images, labels, idx, f"images/{split}/{n:04d}.png", rng)
                         for n, idx in enumerate(cls_idx[split])]
    # The extra RL queries come after train, so train's candidate orders do not move; they
    # continue the rl split's numbering.
    start = len(splits["rl"])
    splits["rl"] += [_digit_cls_line(images, labels, idx, f"images/rl/{start + n:04d}.png", rng)
                     for n, idx in enumerate(cls_idx.get(RL_EXTRA, []))]
    return Task("digits_cls", splits)


def _digit_cls_line(images, labels, idx: int, path: str, rng: np.random.Generator) -> Line:
    label = int(labels[idx])
    name = DIGIT_NAMES[label]
    others = [DIGIT_NAMES[c] for c in range(10) if c != label]
    order = rng.permutation(len(others))
    cands = [(name, None)] + [(others[i], None) for i in order]
    return Line(
        qry_inst=CLS_QRY_INST, qry_text="", qry_img=_digit_png(images[idx], path),
        tgt_inst=CLS_TGT_INST, cands=cands, rel=[1] + [0] * len(others),
        summary=name, q_reason=f"The input shows a handwritten {name}.",
        t_reason=f'The candidate is the class label "{name}".',
        meta={"label": name, "source": f"sklearn_digits:{idx}"})


def build_digits_reason(images, pools, sz: dict, seed: int) -> Task:
    rng = _rng(seed, "digits_reason")
    items = reason_items()
    by_digit = [[it for it in items if it.digit == d] for d in range(10)]
    by_digit = [[group[i] for i in rng.permutation(len(group))] for group in by_digit]
    inst = "Work out the number described below and find an image of that digit."
    splits: dict[str, list[Line]] = {}
    for split in GEN_ORDER:
        # The candidate images of the split: pool_images per digit, numbered in a seeded order.
        flat = [(d, idx) for d in range(10) for idx in pools[split][d]]
        media: dict[int, Media] = {}
        for n, j in enumerate(rng.permutation(len(flat))):
            d, idx = flat[int(j)]
            media[idx] = _digit_png(images[idx], f"images/{split}/{n:03d}.png")
        counts = _per_class(int(sz[split]), 10, rng)
        chosen = []
        for d in range(10):
            if counts[d] > len(by_digit[d]):
                raise ValueError(f"digits_reason: only {len(by_digit[d])} queries for digit {d}")
            chosen += by_digit[d][: counts[d]]
            by_digit[d] = by_digit[d][counts[d]:]
        lines = []
        for j in rng.permutation(len(chosen)):
            it = chosen[int(j)]
            pos = media[int(rng.choice(pools[split][it.digit]))]
            others = [d for d in range(10) if d != it.digit]
            negs = [media[int(rng.choice(pools[split][d]))] for d in others]
            negs = [negs[i] for i in rng.permutation(len(negs))]
            name = DIGIT_NAMES[it.digit]
            lines.append(Line(
                qry_inst=inst, qry_text=it.text, qry_img=None,
                tgt_inst="Represent the given image.",
                cands=[("", pos)] + [("", m) for m in negs], rel=[1] + [0] * len(negs),
                summary=name, q_reason=f"The input describes a number: {it.explanation}.",
                t_reason=f"The candidate is a handwritten {name}.",
                meta={"label": name, "digit": it.digit, "template": it.template}))
        splits[split] = lines
    return Task("digits_reason", splits)


# --------------------------------------------------------------------------------------------
# Faces


def build_faces_cls(lemmas: list[str], sz: dict, seed: int) -> Task:
    images, is_face = sources.load_lfw_subset()
    rng = _rng(seed, "faces_cls")
    faces = list(rng.permutation(np.flatnonzero(is_face)))
    backs = list(rng.permutation(np.flatnonzero(~is_face)))
    n_distr = int(sz["distractors"])
    splits: dict[str, list[Line]] = {}
    for split in GEN_ORDER:
        n = int(sz[split])
        n_face, n_back = n // 2, n - n // 2
        if n_face > len(faces) or n_back > len(backs):
            raise ValueError("faces_cls: lfw_subset has only 100 faces and 100 non-faces")
        chosen = [(int(i), True) for i in faces[:n_face]] + [(int(i), False)
                                                             for i in backs[:n_back]]
        faces, backs = faces[n_face:], backs[n_back:]
        # One label set per split (like a classification task's class list), shuffled per line.
        distr = [_article(lemmas[int(i)])
                 for i in rng.choice(len(lemmas), size=n_distr, replace=False)]
        lines = []
        for k, j in enumerate(rng.permutation(len(chosen))):
            idx, face = chosen[int(j)]
            label, other = (FACE_LABEL, NONFACE_LABEL) if face else (NONFACE_LABEL, FACE_LABEL)
            negs = [other] + distr
            negs = [negs[i] for i in rng.permutation(len(negs))]
            img = Image.fromarray(images[idx]).resize(
                (25 * FACE_SCALE, 25 * FACE_SCALE), Image.Resampling.BICUBIC)
            what = "a human face" if face else "a background patch with no face"
            lines.append(Line(
                qry_inst=CLS_QRY_INST, qry_text="",
                qry_img=_png(_gray_to_rgb(np.asarray(img)), f"images/{split}/{k:04d}.png"),
                tgt_inst=CLS_TGT_INST, cands=[(label, None)] + [(t, None) for t in negs],
                rel=[1] + [0] * len(negs), summary=label,
                q_reason=f"The input shows a small grey photo of {what}.",
                t_reason=f'The candidate is the class label "{label}".',
                meta={"label": label, "source": f"lfw_subset:{idx}"}))
        splits[split] = lines
    return Task("faces_cls", splits)


# --------------------------------------------------------------------------------------------
# Photos


def _variant(arr: np.ndarray, rng: np.random.Generator, max_side: int) -> np.ndarray:
    """A random crop (50-100% of the area, aspect 3:4..4:3), maybe mirrored, then resized."""
    h, w = arr.shape[:2]
    area = rng.uniform(0.5, 1.0) * h * w
    ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    cw = int(min(w, max(8, round(np.sqrt(area * ratio)))))
    ch = int(min(h, max(8, round(np.sqrt(area / ratio)))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    crop = arr[y0:y0 + ch, x0:x0 + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    side = int(rng.choice([max_side * 5 // 7, max_side * 6 // 7, max_side]))
    scale = side / max(ch, cw)
    size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
    img = Image.fromarray(np.ascontiguousarray(crop))
    return np.asarray(img.resize(size, Image.Resampling.BICUBIC))


def _photo_variants(sz: dict, seed: int) -> dict[str, list[list[np.ndarray]]]:
    """split -> [photo index] -> variant arrays; splits use different variants."""
    counts = {s: int(sz[s]) for s in SPLITS}
    out: dict[str, list[list[np.ndarray]]] = {s: [] for s in SPLITS}
    for photo in sources.PHOTOS:
        arr = sources.load_photo(photo)
        rng = _rng(seed, f"photo:{photo.name}")
        variants = [_variant(arr, rng, int(sz["max_side"])) for _ in range(sum(counts.values()))]
        keys = {v.shape + (hashlib.sha256(v.tobytes()).hexdigest(),) for v in variants}
        if len(keys) != len(variants):
            raise BenchmarkError(f"photo {photo.name}: two identical variants")
        start = 0
        for s in GEN_ORDER:
            out[s].append(variants[start:start + counts[s]])
            start += counts[s]
    return out


def _caption(photo: sources.Photo, split: str, k: int) -> tuple[str, str, int]:
    """(caption, phrase, template index) for the k-th variant of a photo in a split."""
    phrase_idx, templates = CAPTION_PLAN[split]
    t = templates[k % len(templates)]
    phrase = photo.phrases[phrase_idx]
    return CAPTION_TEMPLATES[t].format(phrase), phrase, t


def build_photo_tasks(variants, lemmas: list[str], sz_i2t: dict, seed: int) -> list[Task]:
    photos = sources.PHOTOS
    rng = _rng(seed, "photo_tasks")
    n_cand, n_distr = int(sz_i2t["candidates"]), int(sz_i2t["distractors"])
    n_lemma = int(sz_i2t["lemma_pool"])
    n_other = n_cand - 1 - n_distr
    if n_other < 1 or n_other > len(photos) - 1 or not 0 <= n_distr <= n_lemma:
        raise ValueError(f"photo_i2t: {n_cand} candidates with {n_distr} distractors from "
                         f"{n_lemma} lemmas is invalid")
    t2i: dict[str, list[Line]] = {}
    i2t: dict[str, list[Line]] = {}
    for split in GEN_ORDER:
        media = [[_png(v, f"images/{split}/p{p:02d}v{k:02d}.png") for k, v in enumerate(vs)]
                 for p, vs in enumerate(variants[split])]
        t2i_lines, i2t_lines = [], []
        split_lemmas = [lemmas[int(i)] for i in rng.choice(len(lemmas), size=n_lemma,
                                                          replace=False)]
        for p, photo in enumerate(photos):
            for k, m in enumerate(media[p]):
                caption, phrase, t = _caption(photo, split, k)
                # photo_t2i: the split's every variant; this query's variant first, the
                # photo's other variants are relevant too (they are in the global pool anyway).
                same = [media[p][j] for j in range(len(media[p])) if j != k]
                rest = [mm for q in range(len(photos)) if q != p for mm in media[q]]
                t2i_lines.append(Line(
                    qry_inst="Find an image that matches the given caption.",
                    qry_text=caption, qry_img=None, tgt_inst="Represent the given image.",
                    cands=[("", m)] + [("", mm) for mm in same + rest],
                    rel=[1] + [1] * len(same) + [0] * len(rest), summary=phrase,
                    q_reason=f'The input is the caption "{caption}".',
                    t_reason=f"The candidate is a photo of {phrase}.",
                    meta={"label": photo.name}))
                # photo_i2t: the caption first, then other photos' captions and ImageNet
                # distractors, all written with the same template.
                qs = [int(q) for q in rng.choice(
                    [q for q in range(len(photos)) if q != p], size=n_other, replace=False)]
                negs = [CAPTION_TEMPLATES[t].format(photos[q].phrases[CAPTION_PLAN[split][0]])
                        for q in qs]
                negs += [CAPTION_TEMPLATES[t].format(_article(split_lemmas[int(i)]))
                         for i in rng.choice(n_lemma, size=n_distr, replace=False)]
                negs = [negs[i] for i in rng.permutation(len(negs))]
                i2t_lines.append(Line(
                    qry_inst="Find a caption that describes the given image.", qry_text="",
                    qry_img=m, tgt_inst="Represent the given caption.",
                    cands=[(caption, None)] + [(c, None) for c in negs],
                    rel=[1] + [0] * len(negs), summary=phrase,
                    q_reason=f"The input shows {phrase}.",
                    t_reason=f'The candidate is the caption "{caption}".',
                    meta={"label": photo.name}))
        t2i[split] = [t2i_lines[i] for i in rng.permutation(len(t2i_lines))]
        i2t[split] = [i2t_lines[i] for i in rng.permutation(len(i2t_lines))]
    return [Task("photo_t2i", t2i), Task("photo_i2t", i2t)]


# --------------------------------------------------------------------------------------------
# Lee news documents

_SENTENCE_END = re.compile(r"[.!?][\"']?\s+(?=[\"'A-Z0-9])")


def _truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text.rfind(" ", 0, max_chars + 1)
    return text[: cut if cut > 0 else max_chars].rstrip(" ,;:-")


def split_lead_body(doc: str, min_chars: int = 120) -> tuple[str, str]:
    """The lead (whole sentences, at least ``min_chars``) and the rest of an article.

    When no sentence boundary leaves ``min_chars`` on both sides, the split is at the space
    nearest the middle.
    """
    for m in _SENTENCE_END.finditer(doc):
        cut = m.end()
        if cut >= min_chars and len(doc) - cut >= min_chars:
            return doc[:cut].strip(), doc[cut:].strip()
    mid = len(doc) // 2
    spaces = [i for i, ch in enumerate(doc) if ch == " "]
    cut = min(spaces, key=lambda i: (abs(i - mid), i))
    return doc[:cut].strip(), doc[cut:].strip()


# Capitalised because they begin a sentence or a title, not because they are names.
_FUNCTION_WORDS = frozenset(
    "a an the in on at as of for to and but or if it its this that these those he she they we "
    "i his her their there when while after before with by from mr mrs ms dr some most many "
    "more is was are were has have had however although how very just out".split())
_CAP_WORD = r"[A-Z][A-Za-z0-9&'-]*(?:\.[A-Z]\.?)*"  # "Greig", "U.S."
# A run of capitalised words that does not start inside a word ("al-Qaida" is skipped).
_NAME_RUN = re.compile(rf"(?<![\w'-]){_CAP_WORD}(?: {_CAP_WORD})*")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*[A-Za-z]")


def key_terms(text: str, most: int = 4, least: int = 3) -> list[str]:
    """What a news text is about, taken from the text alone: the first ``most`` names it
    mentions (runs of capitalised words, leading function words dropped, "'s" cut), topped up
    with its longest other words to ``least`` terms. Every term is a substring of ``text``."""
    terms: list[str] = []
    for run in _NAME_RUN.finditer(text):
        words = run.group(0).split(" ")
        while words and words[0].lower() in _FUNCTION_WORDS:
            words = words[1:]
        name = re.sub(r"'s?$", "", " ".join(words))
        if len(name) > 1 and name.lower() not in {t.lower() for t in terms}:
            terms.append(name)
    terms = terms[:most]
    used = _FUNCTION_WORDS | {w.lower() for t in terms for w in t.split(" ")}
    others = [w for w in dict.fromkeys(_WORD.findall(text))
              if re.sub(r"'s?$", "", w).lower() not in used]
    # sorted() is stable: equally long words keep their order in the text.
    return terms + sorted(others, key=len, reverse=True)[:max(0, least - len(terms))]


def build_lee_text(sz: dict, seed: int) -> Task:
    docs, sim = sources.load_lee()
    n = len(docs)
    max_chars, threshold = int(sz["max_chars"]), float(sz["threshold"])
    parts = [split_lead_body(d) for d in docs]
    leads = [_truncate(a, max_chars) for a, _ in parts]
    bodies = [_truncate(b, max_chars) for _, b in parts]
    if len(set(bodies)) != n or len(set(leads)) != n:
        raise BenchmarkError("lee_text: two documents have the same lead or body")
    rng = _rng(seed, "lee_text")
    order = [int(i) for i in rng.permutation(n)]
    want = {s: int(sz[s]) for s in SPLITS}
    if sum(want.values()) > n:
        raise ValueError(f"lee_text: {sum(want.values())} queries requested, {n} documents")
    splits: dict[str, list[Line]] = {}
    start = 0
    for split in GEN_ORDER:
        ids = order[start:start + want[split]]
        start += want[split]
        lines = []
        for i in ids:
            grades = {j: float(sim[i, j]) for j in range(n) if j != i}
            relevant = [j for j in range(n) if j != i and grades[j] > threshold]
            if not relevant:  # keep the most similar document so every query has one
                relevant = [min(grades, key=lambda j: (-grades[j], j))]
            relevant.sort(key=lambda j: (-grades[j], j))
            rest = [j for j in range(n) if j != i and j not in relevant]
            cand_ids = [i] + relevant + rest
            rel = [float(sim[i, i])] + [grades[j] for j in relevant] + [0] * len(rest)
            lines.append(Line(
                qry_inst="Find news articles similar to the given news article opening.",
                qry_text=leads[i], qry_img=None, tgt_inst="Represent the given news article.",
                cands=[(bodies[j], None) for j in cand_ids], rel=rel,
                summary=", ".join(key_terms(leads[i])),
                q_reason="The input is the opening of a news article.",
                t_reason="The candidate is the rest of the same news article.",
                meta={"label": f"lee:{i}", "doc": i},
                # The body's own names: the lead is not part of the target's input.
                t_summary=", ".join(key_terms(bodies[i]))))
        splits[split] = lines
    return Task("lee_text", {s: splits[s] for s in SPLITS})


# --------------------------------------------------------------------------------------------
# Checks


def check_task(task: Task) -> None:
    """Invariants checked before anything is written; raises :class:`BenchmarkError`."""
    seen: dict[tuple[str, str, str], str] = {}
    for split in SPLITS:
        for ident in {line.identity() for line in task.splits[split]}:
            if ident in seen:
                raise BenchmarkError(
                    f"{task.name}: query {ident[1][:60]!r} (image {ident[2][:12]}) is in both "
                    f"{seen[ident]} and {split}")
            seen[ident] = split
    media: dict[str, bytes] = {}
    pool = task.spec[2]
    for split in SPLITS:
        lines = task.splits[split]
        if not lines:
            raise BenchmarkError(f"{task.name}/{split}: no queries")
        sizes = {len(line.cands) for line in lines}
        if pool == "local" and len(sizes) != 1:
            raise BenchmarkError(f"{task.name}/{split}: local pools of sizes {sorted(sizes)}")
        for n, line in enumerate(lines):
            where = f"{task.name}/{split}:{n + 1}"
            if len(line.rel) != len(line.cands) or len(line.cands) < 2:
                raise BenchmarkError(f"{where}: {len(line.cands)} candidates, "
                                     f"{len(line.rel)} rel_scores")
            if line.rel[0] <= 0 or line.rel[0] < max(line.rel):
                raise BenchmarkError(f"{where}: the positive is not first")
            if not line.qry_text and line.qry_img is None:
                raise BenchmarkError(f"{where}: empty query")
            names = [f"{m.path if m else ''}\t{t}" for t, m in line.cands]
            if len(set(names)) != len(names):
                raise BenchmarkError(f"{where}: duplicate candidates")
            for m in [line.qry_img] + [m for _, m in line.cands]:
                if m is not None and media.setdefault(m.path, m.data) != m.data:
                    raise BenchmarkError(f"{where}: {m.path} names two different images")


# --------------------------------------------------------------------------------------------
# Writing


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _mmeb(line: Line) -> dict:
    return {
        "qry_inst": line.qry_inst,
        "qry_text": line.qry_text,
        "qry_img_path": line.qry_img.path if line.qry_img else "",
        "tgt_inst": line.tgt_inst,
        "tgt_text": [t for t, _ in line.cands],
        "tgt_img_path": [m.path if m else "" for _, m in line.cands],
        "rel_scores": list(line.rel),
    }


def side_text(inst: str, text: str) -> str:
    """The side text rule of docs/data-formats.md: ``inst``, or ``inst + "\\n" + text``."""
    return inst if not text else f"{inst}\n{text}"


def _pair(task: str, split: str, n: int, line: Line, sft: bool) -> dict:
    query: dict = {"text": side_text(line.qry_inst, line.qry_text)}
    if line.qry_img is not None:
        query["images"] = [line.qry_img.path]
    text, media = line.cands[0]
    target: dict = {"text": side_text(line.tgt_inst, text)}
    if media is not None:
        target["images"] = [media.path]
    if sft:
        query["completion"] = format_completion(line.q_reason, line.summary)
        target["completion"] = format_completion(line.t_reason, line.t_summary or line.summary)
    return {"id": f"{task}-{split}-{n:04d}", "task": task, "query": query, "target": target,
            "meta": dict(line.meta)}


def _write_lines(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(_dumps(row) + "\n")


def _write_task(root: Path, task: Task) -> dict:
    folder = root / task.name
    media: dict[str, bytes] = {}
    for split in SPLITS:
        for line in task.splits[split]:
            for m in [line.qry_img] + [m for _, m in line.cands]:
                if m is not None:
                    media[m.path] = m.data
    for rel in sorted(media):
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(media[rel])
    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        _write_lines(folder / f"{split}.jsonl", [_mmeb(x) for x in task.splits[split]])
    _write_lines(folder / "sft.jsonl", [_pair(task.name, "train", n, x, True)
                                        for n, x in enumerate(task.splits["train"])])
    _write_lines(folder / "rl_pairs.jsonl", [_pair(task.name, "rl", n, x, False)
                                             for n, x in enumerate(task.splits["rl"])])
    modality, kind, pool, metric = task.spec
    return {
        "name": task.name, "modality": modality, "kind": kind, "pool": pool, "metric": metric,
        "splits": {s: f"{task.name}/{s}.jsonl" for s in SPLITS},
        "sft": f"{task.name}/sft.jsonl", "rl_pairs": f"{task.name}/rl_pairs.jsonl",
    }


def _stats(task: Task) -> dict:
    out: dict = {}
    for split in SPLITS:
        lines = task.splits[split]
        cands = {len(x.cands) for x in lines}
        unique = {f"{m.path if m else ''}\t{t}" for x in lines for t, m in x.cands}
        out[split] = {"queries": len(lines), "candidates_per_query": sorted(cands),
                      "unique_candidates": len(unique)}
    return out


def _make_tasks(seed: int, sz: dict, rl_extra: dict[str, int]) -> list[Task]:
    images, labels = sources.load_digits()
    lemmas = sources.load_imagenet_lemmas()
    cls_idx, pools = _digit_allocation(labels, sz, seed, rl_extra.get("digits_cls", 0))
    tasks = [
        build_digits_cls(images, labels, cls_idx, seed),
        build_faces_cls(lemmas, sz["faces_cls"], seed),
        *build_photo_tasks(_photo_variants(sz["photo"], seed), lemmas, sz["photo_i2t"], seed),
        build_lee_text(sz["lee_text"], seed),
        build_digits_reason(images, pools, sz["digits_reason"], seed),
    ]
    if [t.name for t in tasks] != list(TASKS):
        raise BenchmarkError("task list out of sync with TASKS")
    return tasks


def _check_out_dir(out: Path) -> None:
    """``out`` must be absent, an empty folder or an earlier build (it holds a tasks.json)."""
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder")
        if any(out.iterdir()) and not (out / "tasks.json").is_file():
            raise FileExistsError(f"{out} is not empty and holds no tasks.json; refusing to "
                                  "overwrite it")


def _prepare_out_dir(out: Path) -> Path:
    """A fresh temporary sibling folder of ``out`` to build into."""
    _check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def build_benchmark(out_dir: str | Path, seed: int = 0, sizes: dict | None = None,
                    rl_extra: dict[str, int] | None = None) -> Path:
    """Build the benchmark into ``out_dir`` and return the path of its ``tasks.json``.

    ``sizes`` overrides entries of :data:`DEFAULT_SIZES`, e.g. ``{"digits_cls": {"test": 20}}``.
    ``rl_extra`` (opt-in), e.g. ``{"digits_cls": 880}``: more RL queries for a task, drawn after
    every split so that the rest of the build is unchanged (see the module docstring).
    An existing ``out_dir`` is replaced only if it is empty or holds an earlier build.
    """
    sz = merge_sizes(sizes)
    extra = check_rl_extra(rl_extra)
    out = Path(out_dir).resolve()
    _check_out_dir(out)
    tasks = _make_tasks(int(seed), sz, extra)
    for task in tasks:
        check_task(task)
    tmp = _prepare_out_dir(out)
    try:
        entries = [_write_task(tmp, task) for task in tasks]
        manifest = {"name": BENCHMARK_NAME, "version": MANIFEST_VERSION, "tasks": entries,
                    "sources": sources.source_records()}
        (tmp / "tasks.json").write_text(
            json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        info = {"name": BENCHMARK_NAME, "seed": int(seed), "sizes": sz,
                "tasks": {t.name: _stats(t) for t in tasks}}
        if extra:  # only then: a default build's BUILD.json is unchanged
            info["rl_extra"] = extra
        (tmp / "BUILD.json").write_text(
            json.dumps(info, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        shutil.copyfile(Path(__file__).with_name("SOURCES.md"), tmp / "SOURCES.md")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "tasks.json"


def format_summary(tasks_json: Path, seconds: float) -> str:
    info = json.loads(tasks_json.with_name("BUILD.json").read_text(encoding="utf-8"))
    rows = [f"{'task':<14} {'modality':<8} {'pool':<6} {'metric':<14} "
            f"{'train':>6} {'rl':>5} {'test':>5}  candidates/query (test)"]
    manifest = json.loads(tasks_json.read_text(encoding="utf-8"))
    for entry in manifest["tasks"]:
        st = info["tasks"][entry["name"]]
        cands = "/".join(str(c) for c in st["test"]["candidates_per_query"])
        rows.append(f"{entry['name']:<14} {entry['modality']:<8} {entry['pool']:<6} "
                    f"{entry['metric']:<14} {st['train']['queries']:>6} "
                    f"{st['rl']['queries']:>5} {st['test']['queries']:>5}  {cands} "
                    f"({st['test']['unique_candidates']} unique)")
    total = {s: sum(info["tasks"][t][s]["queries"] for t in info["tasks"]) for s in SPLITS}
    rows.append(f"{'total':<45} {total['train']:>6} {total['rl']:>5} {total['test']:>5}")
    rows.append(f"built {manifest['name']} (seed {info['seed']}) into {tasks_json.parent} "
                f"in {seconds:.2f} seconds")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m umerl.data.benchmark.build",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="output folder (created; an earlier build is replaced)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--rl-extra", action="append", default=[], metavar="TASK=N",
                        help=f"N more RL queries for TASK (one of: {', '.join(RL_EXTRA_TASKS)}),"
                        " drawn after every split: the rest of the build is unchanged")
    args = parser.parse_args(argv)
    rl_extra = {}
    for item in args.rl_extra:
        task, _, n = item.partition("=")
        if not n.strip().isdigit():
            parser.error(f"--rl-extra {item!r}: expected TASK=N")
        rl_extra[task.strip()] = int(n)
    start = time.perf_counter()
    path = build_benchmark(args.out_dir, seed=args.seed, rl_extra=rl_extra)
    print(format_summary(path, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
