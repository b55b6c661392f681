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
from umerl.data import DataError
from umerl.mmeb_v2 import TASKS, load_task, plan_tasks, select_tasks, task_pools
from umerl.mmeb_v2.labels import VIDEO_CLS_LABELS

# report_score_v2.py: the folder per modality and the names it looks for (a subset of its lists)
REPORT_NAMES = {"image": ["ImageNet-1K", "MSCOCO_t2i", "RefCOCO-Matching"],
                "video": ["Breakfast", "SmthSmthV2", "MSR-VTT"],
                "visdoc": ["ViDoRe_arxivqa", "VisRAG_ArxivQA"]}
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
            for j, src in enumerate(srcs):
                _copy(src, frames / folder / name / f"frame_{j + 1:04d}.jpg")
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
    return root


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


def test_default_plan_skips_tasks_without_a_reader_and_says_so(capsys) -> None:
    tasks = [t.name for t in plan_tasks(["video"], None)]
    warning = capsys.readouterr().out
    unread = ["MVBench", "Video-MME", "NExTQA", "EgoSchema", "ActivityNetQA", "QVHighlight",
              "Charades-STA", "MomentSeeker"]
    assert tasks == [t.name for t in TASKS.values() if t.modality == "video"
                     and t.name not in unread]
    assert all(name in warning for name in unread)
    assert [t.name for t in plan_tasks(None, ["MVBench"])] == ["MVBench"]  # named: kept


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
    with pytest.raises(DataError, match="not supported yet"):
        load_task(mmeb_copy, TASKS["MVBench"])


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
    from umerl.evaluate import Evaluator

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
    monkeypatch.setattr("umerl.model.load_policy", lambda *a, **k: pytest.fail("model loaded"))
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

    from umerl.driver import worker_env

    def run(out: Path, *extra: str) -> str:
        assert main(["eval", str(tiny_model_dir), "--mmeb-v2", str(mmeb_copy), "--tasks",
                     "ImageNet-1K", "--out", str(out), "--pass-k", "--max-new-tokens", "4",
                     *extra]) == 0
        return capsys.readouterr().out

    here = run(tmp_path / "here")
    assert "in this process, on CPU" in here
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(_node_ip_address="127.0.0.1", num_cpus=1, num_gpus=1, include_dashboard=False,
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
