"""MMEB-V2 from a local copy: a small synthetic copy in each layout, read as VLM2Vec reads it,
scored into the tree report_score_v2.py reads, resumed after an interruption."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from umerl.cli import main
from umerl.data.formats import DataError
from umerl.eval.mmeb_v2 import TASKS, load_task, select_tasks, task_pools
from umerl.eval.mmeb_v2.labels import VIDEO_CLS_LABELS
from umerl.eval.mmeb_v2.loaders import PARSERS

# report_score_v2.py: the folder per modality and the names it looks for (a subset of its lists)
REPORT_NAMES = {"image": ["ImageNet-1K", "MSCOCO_t2i", "RefCOCO-Matching"],
                "video": ["Breakfast", "SmthSmthV2", "MSR-VTT"],
                "visdoc": ["ViDoRe_arxivqa", "VisRAG_ArxivQA"]}
# report_score_v2.py's video list, in its order (MMEB-V2's 18 video tasks)
REPORT_VIDEO = ["K700", "SmthSmthV2", "HMDB51", "UCF101", "Breakfast",
                "MVBench", "Video-MME", "NExTQA", "EgoSchema", "ActivityNetQA",
                "DiDeMo", "MSR-VTT", "MSVD", "VATEX", "YouCook2",
                "QVHighlight", "Charades-STA", "MomentSeeker"]
# VLM2Vec's RankingMetrics.evaluate keys (metrics hit, ndcg, precision, recall, f1, map, mrr at
# k = 1, 5, 10), plus the two counts eval.py adds.
VLM2VEC_KEYS = [f"{m}@{k}" for m in ("hit", "ndcg_linear", "ndcg_exponential", "precision",
                                     "recall", "f1", "map", "mrr") for k in (1, 5, 10)]
VLM2VEC_KEYS += ["num_pred", "num_data"]


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


@pytest.fixture(scope="module")
def mmeb_copy(benchmark_manifest: Path, tmp_path_factory) -> Path:
    """Two or three tasks per modality, laid out as the MMEB-V2 release and its datasets."""
    bench = benchmark_manifest.parent
    digits = sorted((bench / "digits_cls" / "images" / "test").glob("*.png"))
    photos = sorted((bench / "photo_t2i" / "images" / "test").glob("*.png"))
    root = tmp_path_factory.mktemp("mmeb-v2")
    images = root / "image-tasks"
    for i, src in enumerate(digits[:6]):
        _copy(src, images / "ImageNet-1K" / f"d{i}.png")
    for i, src in enumerate(photos[:6]):
        _copy(src, images / "MSCOCO" / f"p{i}.png")
    inst = "ziyjiang/MMEB_Test_Instruct"
    # classification, parquet: "seven" is listed twice in row 1 (one pool entry), and rows share
    # names (one embedding each)
    _parquet(root / inst / "ImageNet-1K" / "test-00000-of-00001.parquet", [
        {"qry_inst": "<|image_1|> Represent the given image for classification",
         "qry_text": "", "qry_img_path": f"ImageNet-1K/d{i}.png", "tgt_inst": "",
         "tgt_text": labels, "tgt_img_path": [""] * len(labels)}
        for i, labels in enumerate([["zero", "one", "two"], ["one", "seven", "seven", "zero"],
                                    ["two", "zero", "one"]])])
    # text -> image, JSONL: candidates named by image path
    _jsonl(root / inst / "MSCOCO_t2i" / "test.jsonl", [
        {"qry_inst": "Find me an everyday image that matches the given caption:",
         "qry_text": caption, "qry_img_path": "",
         "tgt_inst": "<|image_1|> Represent the given image.", "tgt_text": ["", "", ""],
         "tgt_img_path": paths}
        for caption, paths in [("a photo", ["MSCOCO/p0.png", "MSCOCO/p1.png", "MSCOCO/p2.png"]),
                               ("another", ["MSCOCO/p3.png", "MSCOCO/p0.png", "MSCOCO/p4.png"])]])
    # visual grounding with captions: one image, several targets, named path:caption
    _jsonl(root / inst / "RefCOCO-Matching" / "test.jsonl", [
        {"qry_inst": "<|image_1|> Select the portion of the image that follows the language "
                     "expressions.", "qry_text": text, "qry_img_path": "MSCOCO/p5.png",
         "tgt_inst": "<|image_1|> Select the portion of the image that follows the language "
                     "expressions:", "tgt_text": captions,
         "tgt_img_path": ["MSCOCO/p5.png"] * len(captions)}
        for text, captions in [("left", ['"left dog"', "right dog"]),
                               ("right", ["right dog", "left dog"])]])
    frames = root / "video-tasks" / "frames"
    # a video of 10 frames: 8 are sampled (np.linspace over 0..9); another of 3: all are kept
    videos = {"v_long": digits[:10], "v_short": digits[10:13], "v_three": digits[13:16]}
    for folder in ("video_cls/Breakfast", "video_cls/SSv2", "video_ret/MSR-VTT"):
        for name, srcs in videos.items():
            _frames(frames / folder / name, srcs)
    _jsonl(root / "VLM2Vec/Breakfast/test.jsonl", [
        {"video_id": "v_long", "pos_text": "coffee"}, {"video_id": "v_short", "pos_text": "tea"}])
    _jsonl(root / "VLM2Vec/SmthSmthV2/data/test-00000-of-00001.jsonl", [
        {"video_id": "v_three", "pos_text": "Pushing something",
         "neg_text": ["Pulling something", "Pushing something", "Lifting something"]}])
    _parquet(root / "VLM2Vec/MSR-VTT/test_1k/test-00000-of-00001.parquet", [
        {"video_id": "v_long", "video": "v_long.mp4", "caption": "digits go by"},
        {"video_id": "v_short", "video": "v_short.mp4", "caption": "three digits"},
        {"video_id": "v_long", "video": "v_long.mp4", "caption": "the same video again"}])
    # ViDoRe (BEIR, parquet): graded qrels, a zero-score pair (dropped) and a repeated pair
    # (the higher grade kept); page images <corpus-id>.png; a corpus page nobody asks for.
    vidore = root / "vidore/arxivqa_test_subsampled_beir"
    pages = root / "visdoc-tasks" / "ViDoRe_arxivqa"
    for i in range(4):
        _copy(photos[6 + i], pages / f"{i}.png")
    _parquet(vidore / "queries/test-00000-of-00001.parquet",
             [{"query-id": 1, "query": "what is on page one?"},
              {"query-id": 2, "query": "and pages two and zero?"}])
    _parquet(vidore / "corpus/test-00000-of-00001.parquet",
             [{"corpus-id": i, "image": b"unused"} for i in range(4)])
    _parquet(vidore / "qrels/test-00000-of-00001.parquet", [
        {"query-id": 1, "corpus-id": 1, "score": 1}, {"query-id": 1, "corpus-id": 3, "score": 0},
        {"query-id": 2, "corpus-id": 2, "score": 2}, {"query-id": 2, "corpus-id": 0, "score": 1},
        {"query-id": 2, "corpus-id": 0, "score": 0}, {"query-id": 2, "corpus-id": 2, "score": 1}])
    # VisRAG: split "train", long file names shortened to 50 characters + an md5 tag
    visrag = root / "openbmb/VisRAG-Ret-Test-ArxivQA"
    names = [f"{'x' * 60}-{i}.png" for i in range(3)]
    for i, name in enumerate(names):
        short = f"{name[:-4][:50]}_{hashlib.md5(name.encode()).hexdigest()[:8]}.png"
        _copy(photos[10 + i], root / "visdoc-tasks" / "VisRAG_ArxivQA" / short)
    _jsonl(visrag / "queries/train.jsonl", [{"query-id": "q0", "query": "a chart"}])
    _jsonl(visrag / "corpus/train.jsonl", [{"corpus-id": n} for n in names])
    _jsonl(visrag / "qrels/train.jsonl", [{"query-id": "q0", "corpus-id": names[2], "score": 1}])
    _write_video_qa(root, digits)
    _write_moments(root, digits, photos)
    return root


def _frames(folder: Path, srcs: list[Path]) -> None:
    """A frame folder as the release ships it: frame_0001.jpg, frame_0002.jpg, ..."""
    for j, src in enumerate(srcs):
        _copy(src, folder / f"frame_{j + 1:04d}.jpg")


# VLM2Vec's MVBench subset_meta keys: one config each, concatenated in this order.
MVBENCH_CONFIGS = [
    "episodic_reasoning", "action_sequence", "action_prediction", "action_antonym",
    "fine_grained_action", "unexpected_action", "object_existence", "object_interaction",
    "object_shuffle", "moving_direction", "action_localization", "scene_transition",
    "action_count", "moving_count", "moving_attribute", "state_change", "fine_grained_pose",
    "character_order", "egocentric_navigation", "counterfactual_inference"]


def _write_video_qa(root: Path, digits: list[Path]) -> None:
    """The five video QA layouts: frames under video-tasks/frames/video_qa/<Dataset>/."""
    qa = root / "video-tasks/frames/video_qa"
    # MVBench: one config per subset (split "train"); frames under <subset>/<video file name>
    for i, subset in enumerate(MVBENCH_CONFIGS):
        _frames(qa / "MVBench" / subset / f"clip{i}.mp4", digits[20 + i:23 + i])
        options = ["yes", "no"] if i % 2 else ["left", "right", "up"]
        _jsonl(root / "VLM2Vec/MVBench" / subset / "train.jsonl", [
            {"video": f"clip{i}.mp4", "question": f"Question {i}?", "candidates": options,
             "answer": options[i % len(options)], "accurate_start": 0.0}])
    # Video-MME: lettered options, the answer a letter; frames under <videoID>/ (10: 8 kept)
    _frames(qa / "Video-MME" / "vm1", digits[50:60])
    _frames(qa / "Video-MME" / "vm2", digits[60:63])
    _parquet(root / "VLM2Vec/Video-MME/test-00000-of-00001.parquet", [
        {"videoID": "vm1", "question_id": "001-1", "domain": "Knowledge", "sub_category": "x",
         "question": "What colour is the car?",
         "options": ["A. Red.", "B. Blue.", "C. Green", "D. A dark grey one."], "answer": "B"},
        {"videoID": "vm2", "question_id": "002-1", "domain": "Sports", "sub_category": "y",
         "question": "How many players?", "options": ["A. 1", "B. 2", "C. 3", "D. 11"],
         "answer": "D"}])
    # NExTQA (config MC): options a0..a4, the answer their index; frames under <video>/
    _frames(qa / "NExTQA" / "4010069381", digits[70:74])
    _parquet(root / "VLM2Vec/NExTQA/MC/test-00000-of-00001.parquet", [
        {"video": 4010069381, "qid": 3, "type": "CW", "question": "why does the boy run",
         "answer": 2, "a0": "to hide", "a1": "to eat", "a2": "to catch the ball",
         "a3": "to sleep", "a4": "to sing"}])
    # EgoSchema (config Subset): lettered options, the answer an index as a string
    _frames(qa / "EgoSchema" / "ego-uuid-1", digits[80:84])
    _jsonl(root / "VLM2Vec/EgoSchema/Subset/test.jsonl", [
        {"video_idx": "ego-uuid-1", "question_idx": "q-ego-1", "question": "What is c doing?",
         "option": ["A. c cooks.", "B. c reads a book", "C. c paints."], "answer": "1"}])
    # ActivityNetQA: yes/no questions; frames under v_<video_name>/
    _frames(qa / "ActivityNetQA" / "v_abc123", digits[90:95])
    _jsonl(root / "VLM2Vec/ActivityNetQA/test.jsonl", [
        {"video_name": "abc123", "question_id": "a1", "question": "is the man outdoors",
         "answer": "no"},
        {"video_name": "abc123", "question_id": "a2", "question": "is it sunny",
         "answer": "yes"}])


def _write_moments(root: Path, digits: list[Path], photos: list[Path]) -> None:
    """The moment retrieval layouts under video-tasks/frames/video_mret/."""
    mret = root / "video-tasks/frames/video_mret"
    # QVHighlight, Charades-STA: <video stem>/{query, positive*, negative*}/ frames; a stray
    # file beside the clips is no clip
    for task, folder, videos in (("QVHighlight", "QVHighlight", ["qv_a", "qv_b"]),
                                 ("Charades-STA", "Charades_STA", ["ch_a"])):
        for v, video in enumerate(videos):
            base = 100 + 40 * v + (0 if task == "QVHighlight" else 200)
            _frames(mret / folder / video / "query", digits[base:base + 10])
            for c, clip in enumerate(["negative_0", "positive", "negative_1"]):
                _frames(mret / folder / video / clip, digits[base + 10 + 9 * c:base + 19 + 9 * c])
            (mret / folder / video / "meta.json").write_text("{}")
        rows = [{"query": f"a person moves ({video})", "video_path": f"videos/{video}.mp4",
                 "duration": 150} for video in videos]
        if task == "QVHighlight":
            _jsonl(root / "VLM2Vec/QVHighlight/test.jsonl", rows)
        else:
            _parquet(root / "VLM2Vec/Charades-STA/test-00000-of-00001.parquet", rows)
    # MomentSeeker: clips under video_frames/<output_path, "/" as "_", no ".mp4">/ (10
    # frames: all kept); queries by text only, with an image, or with a video
    seeker = mret / "MomentSeeker"
    for c, clip in enumerate(["ego_pos1", "ego_pos2", "ego_neg1", "ego_neg2", "mov_q"]):
        _frames(seeker / "video_frames" / clip, digits[300 + 10 * c:310 + 10 * c])
    _copy(photos[20], seeker / "query_frame7.jpg")
    clips = {"positive_frames": [{"output_path": "ego/pos1.mp4", "start": 0},
                                 {"output_path": "ego/pos2.mp4", "start": 5}],
             "negative_frames": [{"output_path": "ego/neg1.mp4", "start": 9},
                                 {"output_path": "ego/neg2.mp4", "start": 12}]}
    _parquet(root / "VLM2Vec/MomentSeeker/test-00000-of-00001.parquet", [
        {"query": "the man opens the door", "input_frames": "", **clips},
        {"query": "what happens next", "input_frames": "frame7.jpg", **clips},
        {"query": "the same action again", "input_frames": "mov/q.mp4",
         **{**clips, "positive_frames": clips["positive_frames"][1:]}}])


def test_catalog_has_mmeb_v2s_78_tasks_with_vlm2vecs_pools() -> None:
    by_modality = {m: [t for t in TASKS.values() if t.modality == m]
                   for m in ("image", "video", "visdoc")}
    assert [len(v) for v in by_modality.values()] == [36, 18, 24]
    assert all(t.pool == "local" for t in by_modality["image"])
    assert all(t.pool == "global" for t in by_modality["visdoc"])
    glob = {t.name for t in by_modality["video"] if t.pool == "global"}
    assert glob == {"K700", "HMDB51", "UCF101", "Breakfast", "DiDeMo", "MSR-VTT", "MSVD",
                    "VATEX", "YouCook2"}
    assert {t.metric for t in by_modality["visdoc"]} == {"ndcg_linear@5"}
    assert [t.name for t in select_tasks(["video"], ["MSR-VTT"])] == ["MSR-VTT"]
    with pytest.raises(ValueError, match="unknown MMEB-V2 task"):
        select_tasks(None, ["ImageNet-2K"])
    with pytest.raises(ValueError, match="are not of --modalities"):
        select_tasks(["image"], ["MSR-VTT"])


def test_default_plan_runs_every_task_of_the_modalities() -> None:
    assert [t.name for t in select_tasks(["video"], None)] == REPORT_VIDEO
    assert len(select_tasks(None, None)) == 78
    assert {t.parser for t in TASKS.values()} <= set(PARSERS)  # every layout has a reader
    assert [t.name for t in select_tasks(None, ["MVBench"])] == ["MVBench"]


def _names(pools, to_name) -> tuple[list[str], list[dict[str, float]]]:
    """Each unique candidate's name, and each query's {name: grade} over its pool."""
    names = [to_name(side) for side in pools.candidates]
    per_query = [{names[int(i)]: float(g) for i, g in zip(pool, rel)}
                 for pool, rel in zip(pools.pools, pools.relevance)]
    return names, per_query


def _stem(side) -> str:
    return Path(side.images[0]).stem


def test_image_tasks_pool_and_dedup_by_vlm2vec_candidate_name(mmeb_copy: Path) -> None:
    inst = mmeb_copy / "ziyjiang/MMEB_Test_Instruct"
    # ImageNet-1K: local pools of the row's tgt_text names, each once; positive tgt_text[0]
    rows = pq.read_table(inst / "ImageNet-1K/test-00000-of-00001.parquet").to_pylist()
    pools = task_pools(load_task(mmeb_copy, TASKS["ImageNet-1K"]))
    names, per_query = _names(pools, lambda side: side.text)
    assert names == ["zero", "one", "two", "seven"]  # first-seen order over all rows
    for row, grades in zip(rows, per_query):
        unique = list(dict.fromkeys(row["tgt_text"]))
        assert list(grades) == unique
        assert grades == {n: float(n == row["tgt_text"][0]) for n in unique}
    assert pools.queries[0].text == "Represent the given image for classification"
    assert pools.queries[0].images == (str(mmeb_copy / "image-tasks/ImageNet-1K/d0.png"),)

    # MSCOCO_t2i: candidates are images, named (and merged) by path
    rows = [json.loads(line) for line in (inst / "MSCOCO_t2i/test.jsonl").read_text().split("\n")
            if line]
    pools = task_pools(load_task(mmeb_copy, TASKS["MSCOCO_t2i"]))
    names, per_query = _names(pools, _stem)
    assert names == ["p0", "p1", "p2", "p3", "p4"]
    for row, grades in zip(rows, per_query):
        assert grades == {Path(p).stem: float(j == 0) for j, p in enumerate(row["tgt_img_path"])}
    assert pools.queries[0].images == () and pools.queries[0].text.endswith("a photo")
    assert pools.candidates[0].text == "Represent the given image."

    # RefCOCO-Matching: one image, targets told apart by caption (path:caption, quotes off)
    pools = task_pools(load_task(mmeb_copy, TASKS["RefCOCO-Matching"]))
    assert len(pools.candidates) == 2
    texts = [c.text.split("\n")[-1] for c in pools.candidates]
    assert texts == ['"left dog"', "right dog"]
    assert [list(r) for r in pools.relevance] == [[1.0, 0.0], [1.0, 0.0]]
    assert [list(p) for p in pools.pools] == [[0, 1], [1, 0]]


def test_video_tasks_frames_and_label_set_pools(mmeb_copy: Path) -> None:
    frames = mmeb_copy / "video-tasks/frames"
    pools = task_pools(load_task(mmeb_copy, TASKS["Breakfast"]))
    # 10 frames -> 8 at np.linspace(0, 9, 8).astype(int) = 0 1 2 3 5 6 7 9; 3 frames -> all 3
    picked = [Path(f).name for f in pools.queries[0].video]
    assert picked == [f"frame_{j + 1:04d}.jpg" for j in (0, 1, 2, 3, 5, 6, 7, 9)]
    assert pools.queries[1].video == tuple(
        str(frames / "video_cls/Breakfast/v_short" / f"frame_{j:04d}.jpg") for j in (1, 2, 3))
    # global: every query against the whole label set (the 10 Breakfast labels)
    labels = [c.text for c in pools.candidates]
    assert sorted(labels) == sorted(VIDEO_CLS_LABELS["Breakfast"]) and len(labels) == 10
    for pool, rel, positive in zip(pools.pools, pools.relevance, ["coffee", "tea"]):
        assert len(pool) == 10
        assert [labels[int(i)] for i, g in zip(pool, rel) if g > 0] == [positive]

    pools = task_pools(load_task(mmeb_copy, TASKS["SmthSmthV2"]))  # local: its own options
    assert [c.text for c in pools.candidates] == ["Pulling something", "Pushing something",
                                                  "Lifting something"]
    assert list(pools.relevance[0]) == [0.0, 1.0, 0.0]

    # MSR-VTT: a caption against every video, videos named by video_id (v_long listed twice)
    pools = task_pools(load_task(mmeb_copy, TASKS["MSR-VTT"]))
    assert len(pools.candidates) == 2 and len(pools.queries) == 3
    assert [Path(c.video[0]).parent.name for c in pools.candidates] == ["v_long", "v_short"]
    assert [list(r) for r in pools.relevance] == [[1, 0], [0, 1], [1, 0]]


def test_visdoc_tasks_graded_qrels_and_corpus(mmeb_copy: Path) -> None:
    pools = task_pools(load_task(mmeb_copy, TASKS["ViDoRe_arxivqa"]))
    names, per_query = _names(pools, _stem)
    # the corpus adds the pages no query lists (3), after the qrels' pages in first-seen order
    assert names == ["1", "2", "0", "3"]
    # independent reading of qrels: score > 0 only, highest grade per (query, page)
    qrels = pq.read_table(mmeb_copy / "vidore/arxivqa_test_subsampled_beir/qrels/"
                          "test-00000-of-00001.parquet").to_pylist()
    expected: dict[int, dict[str, float]] = {}
    for row in qrels:
        if row["score"] > 0:
            docs = expected.setdefault(row["query-id"], {})
            docs[str(row["corpus-id"])] = max(docs.get(str(row["corpus-id"]), 0), row["score"])
    for qid, grades in zip((1, 2), per_query):
        assert {n: g for n, g in grades.items() if g > 0} == expected[qid]
        assert set(grades) == {"0", "1", "2", "3"}  # global: the whole corpus
    assert expected[2] == {"2": 2, "0": 1}

    pools = task_pools(load_task(mmeb_copy, TASKS["VisRAG_ArxivQA"]))
    assert len(pools.candidates) == 3
    positive = pools.candidates[int(np.argmax(pools.relevance[0]))]
    assert Path(positive.images[0]).name.startswith("x" * 50 + "_")
    names = [json.loads(line)["corpus-id"] for line in (
        mmeb_copy / "openbmb/VisRAG-Ret-Test-ArxivQA/corpus/train.jsonl").read_text().splitlines()]
    tag = hashlib.md5(names[2].encode()).hexdigest()[:8]
    assert Path(positive.images[0]).name == f"{'x' * 50}_{tag}.png"


# VLM2Vec's video QA prompt (its TASK_PROMPT), before the question
QA_PROMPT = ("Given a video and a question, select the most accurate answer from the provided "
             "candidates. Return only the exact text of your chosen answer. Question:")
SAMPLED_OF_10 = (0, 1, 2, 3, 5, 6, 7, 9)  # np.linspace(0, 9, 8).astype(int)


def _pool(pools, i: int) -> list[tuple[str, float]]:
    """Query i's pool: each candidate's text and grade, in pool order."""
    return [(pools.candidates[int(j)].text, float(g))
            for j, g in zip(pools.pools[i], pools.relevance[i])]


def _clip_pool(pools, i: int) -> list[tuple[str, float]]:
    """Query i's pool: each clip's frame folder name and grade, in pool order."""
    return [(Path(pools.candidates[int(j)].video[0]).parent.name, float(g))
            for j, g in zip(pools.pools[i], pools.relevance[i])]


def _frame_names(side) -> list[str]:
    return [Path(f).name for f in side.video]


def test_video_qa_options_answers_and_frames(mmeb_copy: Path) -> None:
    qa = mmeb_copy / "video-tasks/frames/video_qa"
    # MVBench: every subset config in VLM2Vec's order, options as "(A) ...", shared by name
    rows = [(subset, json.loads((mmeb_copy / "VLM2Vec/MVBench" / subset / "train.jsonl")
                                .read_text())) for subset in MVBENCH_CONFIGS]
    pools = task_pools(load_task(mmeb_copy, TASKS["MVBench"]))
    assert len(pools.queries) == 20 and len(pools.candidates) == 5
    for i, (subset, row) in enumerate(rows):
        letters = "ABCDE"
        assert _pool(pools, i) == [(f"({letters[k]}) {c}", float(c == row["answer"]))
                                   for k, c in enumerate(row["candidates"])]
        assert Path(pools.queries[i].video[0]).parent == qa / "MVBench" / subset / row["video"]
        assert len(pools.queries[i].video) == 3  # fewer than 8 frames: all of them
    assert pools.queries[0].text == (f"{QA_PROMPT}\nQuestion 0?\nOptions:\n(A) left\n(B) right"
                                     "\n(C) up")
    assert _pool(pools, 1) == [("(A) yes", 0.0), ("(B) no", 1.0)]

    # Video-MME: named by the lettered option, embedded without its letter; answer a letter
    rows = pq.read_table(mmeb_copy / "VLM2Vec/Video-MME/test-00000-of-00001.parquet").to_pylist()
    pools = task_pools(load_task(mmeb_copy, TASKS["Video-MME"]))
    for i, row in enumerate(rows):
        answer = "ABCD".index(row["answer"])
        assert _pool(pools, i) == [(o.split(". ", 1)[1].rstrip("."), float(k == answer))
                                   for k, o in enumerate(row["options"])]
    assert _pool(pools, 0) == [("Red", 0.0), ("Blue", 1.0), ("Green", 0.0),
                               ("A dark grey one", 0.0)]
    assert pools.queries[0].text == (f"{QA_PROMPT}\nWhat colour is the car?\nA. Red.\nB. Blue."
                                     "\nC. Green\nD. A dark grey one.")
    assert _frame_names(pools.queries[0]) == [f"frame_{j + 1:04d}.jpg" for j in SAMPLED_OF_10]
    assert Path(pools.queries[1].video[0]).parent == qa / "Video-MME/vm2"

    # NExTQA: options a0..a4 as they are, the answer their index; the query lists them lettered
    row = pq.read_table(mmeb_copy / "VLM2Vec/NExTQA/MC/test-00000-of-00001.parquet").to_pylist()[0]
    pools = task_pools(load_task(mmeb_copy, TASKS["NExTQA"]))
    assert _pool(pools, 0) == [(row[f"a{k}"], float(k == row["answer"])) for k in range(5)]
    assert pools.queries[0].text == (f"{QA_PROMPT}\nwhy does the boy run\nOptions:\n(A) to hide"
                                     "\n(B) to eat\n(C) to catch the ball\n(D) to sleep\n"
                                     "(E) to sing")
    assert Path(pools.queries[0].video[0]).parent == qa / "NExTQA/4010069381"

    # EgoSchema: options without letter (and trailing period), question and options run on
    pools = task_pools(load_task(mmeb_copy, TASKS["EgoSchema"]))
    assert _pool(pools, 0) == [("c cooks", 0.0), ("c reads a book", 1.0), ("c paints", 0.0)]
    assert pools.queries[0].text == (f"{QA_PROMPT}\nWhat is c doing?A. c cooks. B. c reads a book "
                                     "C. c paints.")

    # ActivityNetQA: yes/no, one pair of candidates for every question; frames in v_<name>/
    rows = [json.loads(line) for line in
            (mmeb_copy / "VLM2Vec/ActivityNetQA/test.jsonl").read_text().splitlines()]
    pools = task_pools(load_task(mmeb_copy, TASKS["ActivityNetQA"]))
    assert len(pools.candidates) == 2
    for i, row in enumerate(rows):
        assert _pool(pools, i) == [(o, float(o == row["answer"])) for o in ("yes", "no")]
        assert pools.queries[i].text == f"{QA_PROMPT}\n{row['question']}? (A) yes; (B) no."
    assert _frame_names(pools.queries[0]) == [f"frame_{j:04d}.jpg" for j in range(1, 6)]


def test_moment_retrieval_clips_and_positives(mmeb_copy: Path) -> None:
    mret = mmeb_copy / "video-tasks/frames/video_mret"
    # QVHighlight (JSONL), Charades-STA (parquet): the video's clip folders, positive*'s the
    # answer; the query video is query/; 8 of the frames of each
    for task, folder, rows in (
            ("QVHighlight", "QVHighlight", [json.loads(line) for line in (
                mmeb_copy / "VLM2Vec/QVHighlight/test.jsonl").read_text().splitlines()]),
            ("Charades-STA", "Charades_STA", pq.read_table(
                mmeb_copy / "VLM2Vec/Charades-STA/test-00000-of-00001.parquet").to_pylist())):
        pools = task_pools(load_task(mmeb_copy, TASKS[task]))
        assert len(pools.queries) == len(rows) and len(pools.candidates) == 3 * len(rows)
        for i, row in enumerate(rows):
            video = mret / folder / Path(row["video_path"]).stem
            clips = sorted(p.name for p in video.iterdir() if p.is_dir() and p.name != "query")
            assert _clip_pool(pools, i) == [(c, float(c.startswith("positive"))) for c in clips]
            assert Path(pools.queries[i].video[0]).parent == video / "query"
            assert pools.queries[i].text == ("Find the clip that corresponds to the described "
                                             f"scene in the given video:\n{row['query']}")
            assert _frame_names(pools.queries[i]) == [f"frame_{j + 1:04d}.jpg"
                                                      for j in SAMPLED_OF_10]
        assert {len(c.video) for c in pools.candidates} == {8}  # 9 frames a clip: 8 kept
        assert {c.text for c in pools.candidates} == {"Understand the content of the provided "
                                                      "video."}

    # MomentSeeker: listed clips (every positive counts), all of their frames
    seeker = mret / "MomentSeeker"
    rows = pq.read_table(mmeb_copy / "VLM2Vec/MomentSeeker/test-00000-of-00001.parquet").to_pylist()
    pools = task_pools(load_task(mmeb_copy, TASKS["MomentSeeker"]))
    assert len(pools.candidates) == 4
    for i, row in enumerate(rows):
        expected = [(e["output_path"].replace("/", "_")[:-len(".mp4")], float(positive))
                    for positive, key in ((True, "positive_frames"), (False, "negative_frames"))
                    for e in row[key]]
        assert _clip_pool(pools, i) == expected
    assert _clip_pool(pools, 2) == [("ego_pos2", 1.0), ("ego_neg1", 0.0), ("ego_neg2", 0.0)]
    assert {len(c.video) for c in pools.candidates} == {10}
    text_only, with_image, with_video = pools.queries
    assert text_only.text == "Find the clip that corresponds to the given text:\nthe man opens " \
        "the door" and text_only.is_text_only
    assert with_image.images == (str(seeker / "query_frame7.jpg"),) and not with_image.video
    assert with_image.text.startswith("Select the video clip that aligns with the given text "
                                      "and image:\n")
    assert Path(with_video.video[0]).parent == seeker / "video_frames/mov_q"
    assert len(with_video.video) == 10
    assert with_video.text.startswith("Find the clip that corresponds to the given sentence and "
                                      "video segment:\n")


def test_bad_video_qa_and_moment_copies_name_the_problem(mmeb_copy: Path,
                                                         tmp_path: Path) -> None:
    broken = tmp_path / "copy"
    shutil.copytree(mmeb_copy / "VLM2Vec", broken / "VLM2Vec")
    shutil.rmtree(broken / "VLM2Vec/MVBench/state_change")
    with pytest.raises(DataError, match="no 'train' data files for config 'state_change'"):
        load_task(broken, TASKS["MVBench"])
    _jsonl(broken / "VLM2Vec/ActivityNetQA/test.jsonl",
           [{"video_name": "abc123", "question": "is it", "answer": "maybe"}])
    with pytest.raises(DataError, match=r"test.jsonl:1: answer 'maybe' must be 'yes' or 'no'"):
        load_task(broken, TASKS["ActivityNetQA"])
    with pytest.raises(DataError, match="no frame folder .*video_mret/QVHighlight/qv_a"):
        load_task(broken, TASKS["QVHighlight"])  # the records without the frames
    clips = broken / "video-tasks/frames/video_mret/QVHighlight/qv_a"
    shutil.copytree(mmeb_copy / "video-tasks/frames/video_mret/QVHighlight/qv_a", clips)
    shutil.copytree(clips / "positive", clips / "positive_2")
    _jsonl(broken / "VLM2Vec/QVHighlight/test.jsonl", [{"query": "x", "video_path": "qv_a.mp4"}])
    with pytest.raises(DataError, match=r"exactly one clip folder named 'positive\*'"):
        load_task(broken, TASKS["QVHighlight"])


NEW_VIDEO_TASKS = ["MVBench", "Video-MME", "NExTQA", "EgoSchema", "ActivityNetQA",
                   "QVHighlight", "Charades-STA", "MomentSeeker"]


def test_eval_scores_video_qa_and_moment_retrieval(tiny_model_dir: Path, mmeb_copy: Path,
                                                   tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    assert main(["eval", str(tiny_model_dir), "--mmeb-v2", str(mmeb_copy), "--tasks",
                 *NEW_VIDEO_TASKS, "--out", str(out), "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    queries = {"MVBench": 20, "Video-MME": 2, "NExTQA": 1, "EgoSchema": 1, "ActivityNetQA": 2,
               "QVHighlight": 2, "Charades-STA": 1, "MomentSeeker": 3}
    for mode in ("disc", "gen", "oracle"):
        found = sorted(p.name for p in (out / mode / "video").glob("*_score.json"))
        assert found == sorted(f"{d}_score.json" for d in REPORT_VIDEO if d in NEW_VIDEO_TASKS)
        for task, count in queries.items():
            scores = json.loads((out / mode / "video" / f"{task}_score.json").read_text())
            assert list(scores) == VLM2VEC_KEYS
            assert scores["num_data"] == count and 0.0 <= scores["hit@1"] <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["tasks"]) == sorted(NEW_VIDEO_TASKS)


def _pixels(source) -> np.ndarray:
    from PIL import Image

    with Image.open(source) as image:
        return np.asarray(image.convert("RGB"))


def test_missing_page_images_are_rebuilt_from_the_corpus_image_column(
        mmeb_copy: Path, tmp_path: Path) -> None:
    import io

    from PIL import Image

    copy = tmp_path / "copy"
    shutil.copytree(mmeb_copy / "vidore", copy / "vidore")
    shutil.copytree(mmeb_copy / "openbmb", copy / "openbmb")
    sources = sorted((mmeb_copy / "visdoc-tasks/ViDoRe_arxivqa").glob("*.png"))
    # ViDoRe: the corpus's Hugging Face Image column ({bytes, path}); only page 0 on disk
    corpus = copy / "vidore/arxivqa_test_subsampled_beir/corpus/test-00000-of-00001.parquet"
    _parquet(corpus, [{"corpus-id": int(p.stem), "image": {"bytes": p.read_bytes(), "path": None}}
                      for p in sources])
    pages = copy / "visdoc-tasks/ViDoRe_arxivqa"
    _copy(sources[0], pages / "0.png")
    kept = (pages / "0.png").stat().st_mtime_ns
    pools = task_pools(load_task(copy, TASKS["ViDoRe_arxivqa"]))
    assert sorted(p.name for p in pages.iterdir()) == ["0.png", "1.png", "2.png", "3.png"]
    assert (pages / "0.png").stat().st_mtime_ns == kept  # a page on disk is left as it is
    for source in sources:
        assert np.array_equal(_pixels(pages / source.name), _pixels(source))
    assert sorted(Path(c.images[0]).name for c in pools.candidates) == [p.name for p in sources]

    # VisRAG: a JPEG in the column is written in the format of VLM2Vec's (shortened) name
    names = [json.loads(line)["corpus-id"] for line in (
        copy / "openbmb/VisRAG-Ret-Test-ArxivQA/corpus/train.jsonl").read_text().splitlines()]
    with pytest.raises(DataError, match=r"corpus/train.jsonl:1: missing field.*'image'"):
        load_task(copy, TASKS["VisRAG_ArxivQA"])  # a page missing and no image column
    jpegs = []
    for source in sources[:len(names)]:
        buffer = io.BytesIO()
        Image.open(source).convert("RGB").save(buffer, format="JPEG")
        jpegs.append(buffer.getvalue())
    (copy / "openbmb/VisRAG-Ret-Test-ArxivQA/corpus/train.jsonl").unlink()
    _parquet(copy / "openbmb/VisRAG-Ret-Test-ArxivQA/corpus/train-00000-of-00001.parquet",
             [{"corpus-id": n, "image": {"bytes": b, "path": n}} for n, b in zip(names, jpegs)])
    load_task(copy, TASKS["VisRAG_ArxivQA"])
    for name, data in zip(names, jpegs):
        short = f"{name[:-4][:50]}_{hashlib.md5(name.encode()).hexdigest()[:8]}.png"
        written = copy / "visdoc-tasks/VisRAG_ArxivQA" / short
        assert Image.open(written).format == "PNG"
        assert np.array_equal(_pixels(written), _pixels(io.BytesIO(data)))


def test_bad_copies_name_the_file(mmeb_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="huggingface-cli download ziyjiang/MMEB_Test_Instruct"):
        load_task(tmp_path, TASKS["ImageNet-1K"])
    broken = tmp_path / "copy"
    shutil.copytree(mmeb_copy / "VLM2Vec", broken / "VLM2Vec")
    with pytest.raises(DataError, match="no frame folder .*v_long"):
        load_task(broken, TASKS["Breakfast"])
    bad = broken / "VLM2Vec/SmthSmthV2/data/test-00000-of-00001.jsonl"
    bad.write_text(json.dumps({"video_id": "v_three", "pos_text": "x"}) + "\n")
    with pytest.raises(DataError, match=r"test-00000-of-00001.jsonl:1: missing field.*neg_text"):
        load_task(broken, TASKS["SmthSmthV2"])


def _ranked_hit_and_ndcg(q: np.ndarray, c: np.ndarray, grades: np.ndarray) -> tuple[float, float]:
    """Hit@1 and linear nDCG@5 by hand: sort by score, ties pessimistic (less relevant first)."""
    sims = c @ q
    order = sorted(range(len(sims)), key=lambda j: (-sims[j], grades[j], j))
    dcg = sum(grades[j] / np.log2(r + 2) for r, j in enumerate(order[:5]))
    ideal = sum(g / np.log2(r + 2) for r, g in enumerate(sorted(grades, reverse=True)[:5]))
    return float(grades[order[0]] > 0), dcg / ideal


def _cached(out: Path, task: str, name: str) -> np.ndarray:
    folder = out / "cache" / task / name
    return np.concatenate([np.load(p) for p in sorted(folder.glob("chunk-*.npy"))])


EVAL_TASKS = ["ImageNet-1K", "Breakfast", "ViDoRe_arxivqa"]


def _eval(model: Path, root: Path, out: Path) -> int:
    return main(["eval", str(model), "--mmeb-v2", str(root), "--tasks", *EVAL_TASKS,
                 "--out", str(out), "--pass-k", "--max-new-tokens", "4", "--chunk-size", "2"])


def test_eval_writes_the_tree_report_score_v2_reads_and_resumes(
        tiny_model_dir: Path, mmeb_copy: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from umerl.eval.evaluate import Evaluator

    out = tmp_path / "eval"
    real_embed = Evaluator.embed
    calls = {"n": 0}

    def flaky(self, sides, mode, label):  # the run is cut off at its 6th chunk
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real_embed(self, sides, mode, label)

    monkeypatch.setattr(Evaluator, "embed", flaky)
    assert _eval(tiny_model_dir, mmeb_copy, out) == 130
    written = {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("chunk-*.npy")}
    assert len(written) == 5 and not (out / "summary.json").exists()
    capsys.readouterr()

    assert _eval(tiny_model_dir, mmeb_copy, out) == 0
    printed = capsys.readouterr().out
    assert "ETA" in printed and "overall" in printed
    # the chunks written before the interruption were reused, not recomputed
    assert all(p.stat().st_mtime_ns == t for p, t in written.items())
    assert calls["n"] > 6

    # what report_score_v2.py reads: <path>/<modality>/<Dataset>_score.json with its keys
    for mode in ("disc", "gen", "oracle"):
        for modality, datasets in REPORT_NAMES.items():
            found = sorted(p.name for p in (out / mode / modality).glob("*_score.json"))
            assert found == sorted(f"{d}_score.json" for d in datasets if d in EVAL_TASKS)
            for name in found:
                scores = json.loads((out / mode / modality / name).read_text())
                assert list(scores) == VLM2VEC_KEYS
    scores = json.loads((out / "disc/image/ImageNet-1K_score.json").read_text())
    assert scores["num_pred"] == scores["num_data"] == 3

    # the scores recompute from the cached embeddings, by hand
    summary = json.loads((out / "summary.json").read_text())
    for task, modality, metric in (("ImageNet-1K", "image", "hit@1"),
                                   ("Breakfast", "video", "hit@1"),
                                   ("ViDoRe_arxivqa", "visdoc", "ndcg_linear@5")):
        pools = task_pools(load_task(mmeb_copy, TASKS[task]))
        for mode in ("disc", "gen"):
            q, c = _cached(out, task, f"query_{mode}"), _cached(out, task, f"candidate_{mode}")
            hits, ndcgs = zip(*(_ranked_hit_and_ndcg(q[i], c[pool], rel) for i, (pool, rel)
                                in enumerate(zip(pools.pools, pools.relevance))))
            written_scores = json.loads((out / mode / modality / f"{task}_score.json").read_text())
            assert written_scores["hit@1"] == pytest.approx(np.mean(hits), abs=1e-9)
            assert written_scores["ndcg_linear@5"] == pytest.approx(np.mean(ndcgs), abs=1e-6)
            assert summary["tasks"][task]["scores"][mode] == pytest.approx(
                written_scores[metric])
    # umerl's summary: plain means per modality and over tasks, for disc, gen and oracle
    for mode in ("disc", "gen", "oracle"):
        per_task = {t: summary["tasks"][t]["scores"][mode] for t in EVAL_TASKS}
        assert summary["modes"][mode]["per_modality"] == pytest.approx(
            {"image": per_task["ImageNet-1K"], "video": per_task["Breakfast"],
             "visdoc": per_task["ViDoRe_arxivqa"]})
        assert summary["modes"][mode]["overall"] == pytest.approx(np.mean(list(per_task.values())))

    # a finished evaluation resumes without the model: nothing is recomputed
    monkeypatch.setattr("umerl.model.loading.load_policy",
                        lambda *a, **k: pytest.fail("model loaded"))
    assert _eval(tiny_model_dir, mmeb_copy, out) == 0
    assert "3 of 3 task(s) already finished" in capsys.readouterr().out


def test_eval_mmeb_v2_options_are_checked(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["eval", str(tiny_model_dir), "--tasks", "ImageNet-1K"]) == 2
    assert "need --mmeb-v2 DIR" in capsys.readouterr().err
    assert main(["eval", str(tiny_model_dir), "--mmeb-v2", str(tmp_path / "none")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["eval", str(tiny_model_dir), "--mmeb-v2", str(tmp_path), "--modalities",
                 "audio"]) == 2
    assert "'audio' must be one of" in capsys.readouterr().err
    assert main(["eval", str(tiny_model_dir)]) == 2
    assert "needs TASK arguments, or --mmeb-v2" in capsys.readouterr().err


def test_eval_with_gpus_runs_the_model_work_in_a_ray_task(
        tiny_model_dir: Path, mmeb_copy: Path, tmp_path: Path, capsys) -> None:
    """``--gpus N`` (eval.gpus_per_worker) sends the work to a Ray task asking for N GPUs; a
    local Ray here declares one logical GPU, so the task runs (on CPU) and must write the same
    scores as the in-process run."""
    import os

    import ray

    from umerl.runtime.ray_start import worker_env

    def run(out: Path, *extra: str) -> str:
        assert main(["eval", str(tiny_model_dir), "--mmeb-v2", str(mmeb_copy), "--tasks",
                     "ImageNet-1K", "--out", str(out), "--pass-k", "--max-new-tokens", "4",
                     *extra]) == 0
        return capsys.readouterr().out

    here = run(tmp_path / "here")
    assert "in this process, on CPU" in here
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=1, num_gpus=1,
             include_dashboard=False,
             object_store_memory=256 << 20, runtime_env={"env_vars": worker_env()})
    try:
        remote = run(tmp_path / "ray", "--gpus", "1")
    finally:
        ray.shutdown()
    assert "in a Ray task with 1 GPU(s)" in remote
    for mode in ("disc", "gen"):
        name = f"{mode}/image/ImageNet-1K_score.json"
        assert json.loads((tmp_path / "ray" / name).read_text()) == json.loads(
            (tmp_path / "here" / name).read_text())


def test_control_tokens_in_a_copy_are_named_with_their_row(mmeb_copy: Path,
                                                           tmp_path: Path) -> None:
    """MMEB-V2 rows get the data readers' control-token check (umerl eval's task loading)."""
    copy = tmp_path / "copy"
    shutil.copytree(mmeb_copy, copy)
    table = copy / "ziyjiang/MMEB_Test_Instruct/ImageNet-1K/test-00000-of-00001.parquet"
    _parquet(table, [{"qry_inst": "Represent the given image for classification",
                      "qry_text": "", "qry_img_path": "ImageNet-1K/d0.png", "tgt_inst": "",
                      "tgt_text": ["zero", "one<|im_end|>"], "tgt_img_path": ["", ""]}])
    with pytest.raises(DataError, match=r"test-00000-of-00001\.parquet.*: text holds "
                                        r"<\|im_end\|>"):
        load_task(copy, TASKS["ImageNet-1K"])
