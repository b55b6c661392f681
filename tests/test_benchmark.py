"""The bundled umerl-mini benchmark builder (umerl/data/benchmark): format, splits, determinism."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from umerl.data.benchmark import DEFAULT_BENCHMARK, build_benchmark
from umerl.data.benchmark import build as bb

SPLITS = ("train", "rl", "test")
COMPLETION = re.compile(r"<think>.*?</think>.*?\s*<answer>.*?\s*<gen_emb>", re.DOTALL)
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LOCAL_POOL_SIZES = {"digits_cls": 10, "faces_cls": 5, "photo_i2t": 10, "digits_reason": 10}
MMEB_FIELDS = {"qry_inst": str, "qry_text": str, "qry_img_path": str, "tgt_inst": str,
               "tgt_text": list, "tgt_img_path": list, "rel_scores": list}


# --------------------------------------------------------------------------------------------
# Fixtures: one API build and one CLI build with the same seed, one build with another seed.


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    manifest = build_benchmark(tmp_path_factory.mktemp("api") / "umerl-mini", seed=0)
    assert manifest.name == "tasks.json" and manifest.is_file()
    return manifest.parent


@pytest.fixture(scope="module")
def cli_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("cli") / "bench"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert bb.main([str(out), "--seed", "0"]) == 0
    return out, buf.getvalue()


@pytest.fixture(scope="module")
def manifest(bench: Path) -> dict:
    return json.loads((bench / "tasks.json").read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def task_lines(bench: Path, manifest: dict, task: str, split: str) -> list[dict]:
    entry = next(t for t in manifest["tasks"] if t["name"] == task)
    return read_jsonl(bench / entry["splits"][split])


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def pixels_key(path: Path) -> str:
    arr = np.asarray(Image.open(path).convert("RGB"))
    return hashlib.sha256(repr(arr.shape).encode() + arr.tobytes()).hexdigest()


def query_identity(folder: Path, line: dict) -> tuple[str, str, str]:
    img = line["qry_img_path"]
    return line["qry_inst"], line["qry_text"], pixels_key(folder / img) if img else ""


# --------------------------------------------------------------------------------------------
# Independent digit recovery: map a built PNG back to its sklearn digit by its pixels.


@pytest.fixture(scope="module")
def digit_of_png():
    from sklearn.datasets import load_digits

    d = load_digits()
    table = {d.images[i].astype(np.uint8).tobytes(): int(d.target[i])
             for i in range(len(d.target))}

    def lookup(path: Path) -> int:
        arr = np.asarray(Image.open(path).convert("RGB"))
        assert arr.shape == (8 * bb.DIGIT_SCALE, 8 * bb.DIGIT_SCALE, 3)
        ink = 255 - arr[::bb.DIGIT_SCALE, ::bb.DIGIT_SCALE, 0].astype(np.float64)
        levels = np.round(ink * 16 / 255).astype(np.uint8)
        return table[levels.tobytes()]

    return lookup


# --------------------------------------------------------------------------------------------
# Build, determinism, summary


def test_cli_prints_summary_and_build_time(cli_build: tuple[Path, str]) -> None:
    out, text = cli_build
    assert (out / "tasks.json").is_file()
    assert re.search(r"in \d+\.\d+ seconds", text), text
    for task in bb.TASKS:
        assert re.search(rf"^{task}\s+\S+\s+(local|global)\s+\S+\s+\d+\s+\d+\s+\d+", text,
                         re.MULTILINE), text


def test_same_seed_gives_identical_tree(bench: Path, cli_build: tuple[Path, str]) -> None:
    a, b = tree_hashes(bench), tree_hashes(cli_build[0])
    assert len(a) > 500
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_other_seed_differs(bench: Path, tmp_path: Path) -> None:
    other = build_benchmark(tmp_path / "seed1", seed=1).parent
    a, b = tree_hashes(bench), tree_hashes(other)
    for task in bb.TASKS:
        assert a[f"{task}/test.jsonl"] != b[f"{task}/test.jsonl"], task
    # The sources and the manifest do not depend on the seed.
    assert a["tasks.json"] == b["tasks.json"]


def test_test_split_does_not_depend_on_train_or_rl_sizes(bench: Path, tmp_path: Path) -> None:
    small = {"digits_cls": {"train": 30, "rl": 10}, "faces_cls": {"train": 20, "rl": 10},
             "photo": {"train": 3, "rl": 1}, "lee_text": {"train": 5, "rl": 5},
             "digits_reason": {"train": 30, "rl": 10}}
    other = build_benchmark(tmp_path / "small", seed=0, sizes=small).parent
    a, b = tree_hashes(bench), tree_hashes(other)
    test_files = [k for k in a if k.endswith("/test.jsonl") or "/images/test/" in k]
    assert len(test_files) > 100
    assert [k for k in test_files if a[k] != b.get(k)] == []
    assert a["digits_cls/train.jsonl"] != b["digits_cls/train.jsonl"]


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_benchmark(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_unknown_size_keys_are_rejected() -> None:
    with pytest.raises(ValueError):
        bb.merge_sizes({"digits_cls": {"tset": 3}})
    with pytest.raises(ValueError):
        bb.merge_sizes({"no_such_task": {"test": 3}})
    assert bb.merge_sizes({"digits_cls": {"test": 7}})["digits_cls"] == {
        "train": 200, "rl": 80, "test": 7}


# --------------------------------------------------------------------------------------------
# Manifest and file formats


def test_manifest_format(bench: Path, manifest: dict) -> None:
    assert set(manifest) == {"name", "version", "tasks", "sources"}
    assert manifest["name"] == DEFAULT_BENCHMARK == "umerl-mini"
    assert manifest["version"] == bb.MANIFEST_VERSION
    assert [t["name"] for t in manifest["tasks"]] == list(bb.TASKS)
    for entry in manifest["tasks"]:
        assert set(entry) == {"name", "modality", "kind", "pool", "metric", "splits", "sft",
                              "rl_pairs"}
        assert entry["modality"] in ("image", "video", "visdoc", "text")
        assert entry["pool"] in ("local", "global")
        assert entry["metric"] in ("hit@1", "ndcg_linear@5")
        assert set(entry["splits"]) == set(SPLITS)
        for rel in [*entry["splits"].values(), entry["sft"], entry["rl_pairs"]]:
            assert not Path(rel).is_absolute() and (bench / rel).is_file(), rel
    by_name = {t["name"]: t for t in manifest["tasks"]}
    assert by_name["lee_text"]["modality"] == "text"
    assert by_name["lee_text"]["metric"] == "ndcg_linear@5"
    assert by_name["photo_t2i"]["pool"] == "global"
    assert manifest["sources"] and all(
        {"name", "license", "credit", "package"} <= set(s) for s in manifest["sources"])
    assert (bench / "SOURCES.md").is_file()


def test_manifest_is_readable_by_the_task_loader(bench: Path) -> None:
    from umerl.data.tasks import read_manifest

    specs = read_manifest(bench / "tasks.json", "test")
    assert [s.name for s in specs] == list(bb.TASKS)
    assert all(s.path.is_file() for s in specs)


@pytest.mark.parametrize("split", SPLITS)
def test_mmeb_lines_fields_types_and_media(bench: Path, manifest: dict, split: str) -> None:
    for entry in manifest["tasks"]:
        path = bench / entry["splits"][split]
        folder = path.parent  # media paths are relative to the JSONL's own folder
        lines = read_jsonl(path)
        assert lines, path
        for n, line in enumerate(lines):
            where = f"{path}:{n + 1}"
            assert set(line) == set(MMEB_FIELDS), where
            for key, kind in MMEB_FIELDS.items():
                assert isinstance(line[key], kind), (where, key)
            k = len(line["tgt_text"])
            assert k >= 2 and len(line["tgt_img_path"]) == k and len(line["rel_scores"]) == k
            assert all(isinstance(t, str) for t in line["tgt_text"] + line["tgt_img_path"])
            assert all(isinstance(r, (int, float)) and not isinstance(r, bool) and r >= 0
                       for r in line["rel_scores"])
            assert line["qry_text"] or line["qry_img_path"], where
            for t, img in zip(line["tgt_text"], line["tgt_img_path"]):
                assert t or img, where
            for img in [line["qry_img_path"], *line["tgt_img_path"]]:
                if img:
                    assert not Path(img).is_absolute() and (folder / img).is_file(), (where, img)
            if entry["modality"] == "text":
                assert line["qry_img_path"] == "" and set(line["tgt_img_path"]) == {""}


def test_mmeb_files_pass_the_project_reader(bench: Path, manifest: dict) -> None:
    from umerl.data.formats import read_eval_queries

    for entry in manifest["tasks"]:
        for split in SPLITS:
            items, report = read_eval_queries(bench / entry["splits"][split])
            assert report.kept == len(items) and not report.skipped


def test_images_are_small_rgb_pngs(bench: Path) -> None:
    paths = sorted(bench.rglob("*.png"))
    assert len(paths) > 500
    for path in paths:
        raw = path.read_bytes()
        assert raw.startswith(b"\x89PNG") and b"tIME" not in raw and b"tEXt" not in raw
        with Image.open(path) as im:
            assert im.mode == "RGB" and max(im.size) <= 112, path


# --------------------------------------------------------------------------------------------
# Candidates and relevance


def test_positive_first_and_local_pool_sizes(bench: Path, manifest: dict) -> None:
    for entry in manifest["tasks"]:
        for split in SPLITS:
            lines = task_lines(bench, manifest, entry["name"], split)
            for line in lines:
                rel = line["rel_scores"]
                assert rel[0] > 0 and rel[0] == max(rel)
                names = [f"{i}\t{t}" for t, i in zip(line["tgt_text"], line["tgt_img_path"])]
                assert len(set(names)) == len(names)
                if entry["pool"] == "local":
                    assert len(names) == LOCAL_POOL_SIZES[entry["name"]]
                    assert rel == [1] + [0] * (len(rel) - 1)


def test_classification_candidates(bench: Path, manifest: dict) -> None:
    for split in SPLITS:
        for line in task_lines(bench, manifest, "digits_cls", split):
            assert sorted(line["tgt_text"]) == sorted(DIGITS)
        for line in task_lines(bench, manifest, "faces_cls", split):
            assert {"a human face", "a background patch"} <= set(line["tgt_text"])


def test_photo_t2i_global_pool(bench: Path, manifest: dict) -> None:
    for split in SPLITS:
        lines = task_lines(bench, manifest, "photo_t2i", split)
        folder = bench / "photo_t2i"
        every = {p for line in lines for p in line["tgt_img_path"]}
        assert len(every) == len(lines)  # one image variant per query
        for line in lines:
            assert line["qry_img_path"] == "" and line["qry_text"]
            assert set(line["tgt_img_path"]) == every
            assert set(line["tgt_text"]) == {""}
        positives = [line["tgt_img_path"][0] for line in lines]
        assert len(set(positives)) == len(positives)
        if split == "test":  # one caption template per test variant: no query asked twice
            assert len({line["qry_text"] for line in lines}) == len(lines)
        assert len({pixels_key(folder / p) for p in positives}) == len(positives)


def test_lee_text_graded_shared_corpus(bench: Path, manifest: dict) -> None:
    corpus = None
    for split in SPLITS:
        for line in task_lines(bench, manifest, "lee_text", split):
            rel = line["rel_scores"]
            assert len(rel) == 50 and rel[0] == 1.0
            assert sum(r > 0 for r in rel[1:]) >= 1  # at least one other relevant document
            graded = [r for r in rel[1:] if r > 0]
            assert graded == sorted(graded, reverse=True)
            assert rel[1:len(graded) + 1] == graded  # relevant ones right after the positive
            assert all(0 < r <= 1 for r in graded)
            assert len(line["qry_text"]) <= 300 and all(len(t) <= 300 for t in line["tgt_text"])
            assert line["qry_text"] not in line["tgt_text"]
            if corpus is None:
                corpus = set(line["tgt_text"])
            assert set(line["tgt_text"]) == corpus


# --------------------------------------------------------------------------------------------
# Splits


@pytest.mark.parametrize("task", list(bb.TASKS))
def test_splits_are_disjoint(bench: Path, manifest: dict, task: str) -> None:
    folder = bench / task
    ids = {s: {query_identity(folder, x) for x in task_lines(bench, manifest, task, s)}
           for s in SPLITS}
    assert all(ids[s] for s in SPLITS)
    assert not ids["train"] & ids["rl"]
    assert not ids["train"] & ids["test"]
    assert not ids["rl"] & ids["test"]


def test_photo_variants_differ_across_splits(bench: Path) -> None:
    keys = {s: {pixels_key(p) for p in (bench / "photo_t2i" / "images" / s).glob("*.png")}
            for s in SPLITS}
    assert [len(keys[s]) for s in SPLITS] == [170, 68, 68]
    assert not keys["train"] & keys["test"] and not keys["rl"] & keys["test"]
    assert not keys["train"] & keys["rl"]


def test_disjointness_check_fires() -> None:
    line = bb.Line(qry_inst="i", qry_text="same query", qry_img=None, tgt_inst="t",
                   cands=[("a", None), ("b", None)], rel=[1, 0], summary="a", q_reason="q",
                   t_reason="t")
    other = bb.Line(**{**line.__dict__, "qry_text": "another query"})
    third = bb.Line(**{**line.__dict__, "qry_text": "a third query"})
    bb.check_task(bb.Task("digits_cls", {"train": [line], "rl": [other], "test": [third]}))
    with pytest.raises(bb.BenchmarkError, match="both"):
        bb.check_task(bb.Task("digits_cls", {"train": [line], "rl": [other], "test": [line]}))
    bad = bb.Line(**{**line.__dict__, "rel": [0, 1]})
    with pytest.raises(bb.BenchmarkError, match="positive"):
        bb.check_task(bb.Task("digits_cls", {"train": [bad], "rl": [other], "test": [third]}))


def test_default_split_sizes(bench: Path, manifest: dict) -> None:
    counts = {t: [len(task_lines(bench, manifest, t, s)) for s in SPLITS] for t in bb.TASKS}
    assert counts == {
        "digits_cls": [200, 80, 400], "faces_cls": [100, 60, 40], "photo_t2i": [170, 68, 68],
        "photo_i2t": [170, 68, 68], "lee_text": [24, 10, 16], "digits_reason": [200, 80, 150],
    }


# --------------------------------------------------------------------------------------------
# Labels, checked independently of the builder


def test_digit_labels_match_pixels(bench: Path, manifest: dict, digit_of_png) -> None:
    folder = bench / "digits_cls"
    for split in SPLITS:
        lines = task_lines(bench, manifest, "digits_cls", split)
        labels = [digit_of_png(folder / x["qry_img_path"]) for x in lines]
        assert [DIGITS[d] for d in labels] == [x["tgt_text"][0] for x in lines]
        if split == "test":  # stratified: 40 of each digit
            assert np.bincount(labels, minlength=10).tolist() == [40] * 10


def test_faces_labels_follow_lfw_order(bench: Path) -> None:
    # lfw_subset: images 0..99 are faces, 100..199 non-faces.
    for pair in read_jsonl(bench / "faces_cls" / "sft.jsonl"):
        idx = int(pair["meta"]["source"].split(":")[1])
        want = "a human face" if idx < 100 else "a background patch"
        assert pair["target"]["text"].endswith("\n" + want)


WORD = {w: i for i, w in enumerate(DIGITS + (
    "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen", "twenty"))}
for _tens, _name in ((20, "twenty"), (30, "thirty"), (40, "forty"), (50, "fifty"),
                     (60, "sixty"), (70, "seventy"), (80, "eighty"), (90, "ninety")):
    WORD[_name] = _tens
    for _u in range(1, 10):
        WORD[f"{_name}-{DIGITS[_u]}"] = _tens + _u
FACTS = {
    "the number of sides of a triangle": 3, "the number of sides of a hexagon": 6,
    "the number of legs of a spider": 8, "the number of days in a week": 7,
    "the number of wheels on a bicycle": 2, "the number of months in a year": 12,
    "the number of fingers on one hand": 5, "the smallest odd prime": 3,
    "the largest single-digit prime": 7, "the number of planets in the solar system": 8,
}


def expected_digit(text: str) -> int | None:
    """The digit a query describes, for the templates this table knows; None otherwise."""
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b,
           "times": lambda a, b: a * b, "divided by": lambda a, b: a // b if a % b == 0 else -1}
    m = re.fullmatch(r"([a-z-]+) (plus|minus|times|divided by) ([a-z-]+)", text)
    if m and m[1] in WORD and m[3] in WORD:
        return ops[m[2]](WORD[m[1]], WORD[m[3]])
    if text in FACTS:
        return FACTS[text]
    m = re.fullmatch(r"(.+) (plus|minus) ([a-z]+)", text)
    if m and m[1] in FACTS and m[3] in WORD:
        return ops[m[2]](FACTS[m[1]], WORD[m[3]])
    m = re.fullmatch(r'the number of letters in the word "([A-Za-z]+)"', text)
    if m:
        return len(m[1])
    return None


def test_reasoning_queries_map_to_their_target_digit(bench: Path, manifest: dict,
                                                     digit_of_png) -> None:
    folder = bench / "digits_reason"
    checked = 0
    for split in SPLITS:
        for line in task_lines(bench, manifest, "digits_reason", split):
            digits = [digit_of_png(folder / p) for p in line["tgt_img_path"]]
            assert sorted(digits) == list(range(10)), line  # one image of every digit
            want = expected_digit(line["qry_text"])
            if want is not None:
                assert digits[0] == want, line["qry_text"]
                checked += 1
    assert checked >= 150  # most queries use the templates the table covers


def test_expected_digit_table_self_check() -> None:
    assert expected_digit("three plus four") == 7
    assert expected_digit("fifteen minus eight") == 7
    assert expected_digit("eighty-one divided by nine") == 9
    assert expected_digit("the number of days in a week minus two") == 5
    assert expected_digit('the number of letters in the word "house"') == 5
    assert expected_digit("something else") is None


def test_reasoning_generator_is_valid() -> None:
    from umerl.data.benchmark.reasoning import reason_items

    items = reason_items()
    assert len({it.text for it in items}) == len(items) >= 500
    for it in items:
        want = expected_digit(it.text)
        if want is not None:
            assert want == it.digit, it


# --------------------------------------------------------------------------------------------
# SFT and RL pairs


def test_sft_and_rl_pairs(bench: Path, manifest: dict) -> None:
    from umerl.data.formats import read_rl_pairs, read_sft_pairs

    for entry in manifest["tasks"]:
        task = entry["name"]
        train = task_lines(bench, manifest, task, "train")
        rl = task_lines(bench, manifest, task, "rl")
        sft = read_jsonl(bench / entry["sft"])
        pairs = read_jsonl(bench / entry["rl_pairs"])
        assert len(sft) == len(train) and len(pairs) == len(rl)
        for rows, lines, with_completion in ((sft, train, True), (pairs, rl, False)):
            assert len({r["id"] for r in rows}) == len(rows)
            for row, line in zip(rows, lines):
                assert set(row) == {"id", "task", "query", "target", "meta"}
                assert row["task"] == task and isinstance(row["id"], str)
                q, t = row["query"], row["target"]
                assert ("completion" in q) == ("completion" in t) == with_completion
                assert q["text"] == bb.side_text(line["qry_inst"], line["qry_text"])
                assert t["text"] == bb.side_text(line["tgt_inst"], line["tgt_text"][0])
                assert q.get("images", []) == ([line["qry_img_path"]]
                                               if line["qry_img_path"] else [])
                assert t.get("images", []) == ([line["tgt_img_path"][0]]
                                               if line["tgt_img_path"][0] else [])
                for side in (q, t):
                    assert set(side) <= {"text", "images", "completion"}
                    if with_completion:
                        assert COMPLETION.fullmatch(side["completion"]), side["completion"]
                if with_completion and task != "lee_text":  # both sides give the same answer
                    assert ANSWER.search(q["completion"])[1] == ANSWER.search(t["completion"])[1]
        got, report = read_sft_pairs(bench / entry["sft"])
        assert len(got) == len(sft) and not report.skipped
        got, report = read_rl_pairs(bench / entry["rl_pairs"])
        assert len(got) == len(pairs) and not report.skipped


def test_no_test_caption_leaks_into_training_files(bench: Path, manifest: dict) -> None:
    test_captions = {x["qry_text"] for x in task_lines(bench, manifest, "photo_t2i", "test")}
    for name in ("train.jsonl", "rl.jsonl", "sft.jsonl", "rl_pairs.jsonl"):
        for folder in ("photo_t2i", "photo_i2t"):
            text = (bench / folder / name).read_text(encoding="utf-8")
            for caption in test_captions:
                assert f'"{caption}"' not in text and f"\\n{caption}\"" not in text
                assert f">{caption}<" not in text


# --------------------------------------------------------------------------------------------
# Each side's SFT completion is derivable from that side's own input


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:['-][a-z0-9]+)*", text.lower())


def trigrams(*texts: str) -> set[tuple[str, ...]]:
    """Word trigrams of each text (none across two texts)."""
    out: set[tuple[str, ...]] = set()
    for text in texts:
        w = words(text)
        out |= {tuple(w[i:i + 3]) for i in range(len(w) - 2)}
    return out


def image_descriptions(task: str, folder: Path, side: dict, meta: dict,
                       digit_of_png) -> list[str]:
    """What a side's image shows, from the source data rather than the builder's rule: the
    digit recovered from the pixels, the lfw index (faces first), the photo's three phrasings."""
    if not side.get("images"):
        return []
    if task in ("digits_cls", "digits_reason"):
        return [f"a handwritten {DIGITS[digit_of_png(folder / side['images'][0])]}"]
    if task == "faces_cls":
        face = int(meta["source"].split(":")[1]) < 100
        return ["a human face" if face else "a background patch with no face"]
    from umerl.data.benchmark.sources import PHOTOS

    photo = next(p for p in PHOTOS if p.name == meta["label"])
    return [f"a photo of {phrase}" for phrase in photo.phrases]


def test_no_completion_states_what_only_the_other_side_has(bench: Path, manifest: dict,
                                                           digit_of_png) -> None:
    # A completion may restate its own input (text, or what its image shows), never a word
    # trigram that only the other side's input holds: at test time that side is not there.
    leaks = []
    for entry in manifest["tasks"]:
        task = entry["name"]
        for row in read_jsonl(bench / entry["sft"]):
            evidence = {
                name: trigrams(row[name]["text"], *image_descriptions(
                    task, bench / task, row[name], row["meta"], digit_of_png))
                for name in ("query", "target")}
            for own, other in (("query", "target"), ("target", "query")):
                only_other = evidence[other] - evidence[own]
                shared = trigrams(row[own]["completion"]) & only_other
                if shared:
                    leaks.append((row["id"], own, sorted(shared)[:3]))
    assert leaks == [], f"{len(leaks)} completions leak, e.g. {leaks[:3]}"


def test_the_leak_check_sees_a_copied_opening() -> None:
    opening = "Washington has sharply rebuked Russia over bombings of Georgian villages"
    body = "The United States regrets the loss of life, a spokesman said."
    completion = f"<think>The candidate is the rest.</think><answer>{opening}</answer>"
    assert trigrams(completion) & (trigrams(opening) - trigrams(body))
    assert not trigrams(completion) & (trigrams(body) - trigrams(opening))


def test_lee_text_answers_name_what_their_own_side_says(bench: Path) -> None:
    # A lead and a body are different texts: each side's answer lists terms of its own text.
    rows = read_jsonl(bench / "lee_text" / "sft.jsonl")
    differ = 0
    for row in rows:
        answers = {}
        for name in ("query", "target"):
            own = row[name]["text"].split("\n", 1)[1]
            answers[name] = ANSWER.search(row[name]["completion"])[1]
            terms = answers[name].split(", ")
            assert len(terms) >= 3 and all(t and t in own for t in terms), (row["id"], terms)
        differ += answers["query"] != answers["target"]
    assert differ == len(rows)


def test_key_terms_are_names_then_long_words() -> None:
    text = ("Washington has sharply rebuked Russia over bombings of Georgian villages near "
            "Tbilisi, Mr Fleischer said.")
    assert bb.key_terms(text) == ["Washington", "Russia", "Georgian", "Tbilisi"]
    assert bb.key_terms("The United States and the U.S. Army's plans.") == [
        "United States", "U.S. Army", "plans"]
    # Equally long words keep their order; a capital inside a word starts no name.
    assert bb.key_terms("a stricken humpback was swimming near al-Qaida") == [
        "stricken", "humpback", "swimming"]


# --------------------------------------------------------------------------------------------
# rl_extra: a larger RL pool for digits_cls, the rest of the build unchanged


RL_EXTRA = 30


@pytest.fixture(scope="module")
def extended(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_benchmark(tmp_path_factory.mktemp("extra") / "umerl-mini", seed=0,
                           rl_extra={"digits_cls": RL_EXTRA}).parent


def test_rl_extra_changes_only_the_digits_cls_rl_split(bench: Path, extended: Path) -> None:
    a, b = tree_hashes(bench), tree_hashes(extended)
    grown = {"digits_cls/rl.jsonl", "digits_cls/rl_pairs.jsonl", "BUILD.json"}
    new_images = {f"digits_cls/images/rl/{n:04d}.png" for n in range(80, 80 + RL_EXTRA)}
    assert set(b) == set(a) | new_images
    assert [k for k in a if k not in grown and a[k] != b[k]] == []
    for name in ("rl.jsonl", "rl_pairs.jsonl"):  # the default lines first, then the extras
        old = (bench / "digits_cls" / name).read_text(encoding="utf-8")
        new = (extended / "digits_cls" / name).read_text(encoding="utf-8")
        assert new.startswith(old) and len(new.splitlines()) == 80 + RL_EXTRA


def test_rl_extra_queries_are_new_images_labelled_by_their_pixels(
        bench: Path, manifest: dict, extended: Path, digit_of_png) -> None:
    folder = extended / "digits_cls"
    extra = read_jsonl(folder / "rl.jsonl")[80:]
    labels = [digit_of_png(folder / x["qry_img_path"]) for x in extra]
    assert [DIGITS[d] for d in labels] == [x["tgt_text"][0] for x in extra]
    assert np.bincount(labels, minlength=10).tolist() == [RL_EXTRA // 10] * 10
    # Every digit image the default build uses anywhere (digits_cls and digits_reason, all
    # splits), by pixels: the extras are none of them.
    used = {pixels_key(p) for task in ("digits_cls", "digits_reason")
            for p in (bench / task / "images").rglob("*.png")}
    extra_keys = [pixels_key(folder / x["qry_img_path"]) for x in extra]
    assert len(set(extra_keys)) == RL_EXTRA and not set(extra_keys) & used
    pairs = read_jsonl(folder / "rl_pairs.jsonl")[80:]
    assert [p["id"] for p in pairs] == [f"digits_cls-rl-{n:04d}" for n in range(80, 110)]
    assert [p["target"]["text"].split("\n")[-1] for p in pairs] == [DIGITS[d] for d in labels]


def test_rl_extra_is_checked_and_reaches_the_cli(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no extra RL pool"):
        bb.check_rl_extra({"faces_cls": 5})
    with pytest.raises(ValueError, match="int >= 0"):
        bb.check_rl_extra({"digits_cls": -1})
    assert bb.check_rl_extra({"digits_cls": 0}) == {}
    with pytest.raises(ValueError, match="not enough images of digit"):
        build_benchmark(tmp_path / "too-many", rl_extra={"digits_cls": 1100})
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        assert bb.main([str(tmp_path / "cli"), "--rl-extra", "digits_cls=20"]) == 0
    assert re.search(r"^digits_cls\s+\S+\s+local\s+\S+\s+200\s+100\s+400", buf.getvalue(),
                     re.MULTILINE), buf.getvalue()
    info = json.loads((tmp_path / "cli" / "BUILD.json").read_text(encoding="utf-8"))
    assert info["rl_extra"] == {"digits_cls": 20}


def test_learnability_seed_mean_row_pairs_the_seeds_mean_per_query(tmp_path: Path) -> None:
    """The bench's "mean" row compares the start with the per-query mean of the seeds' runs:
    two runs scoring queries (1, 0, 1, 0) and (1, 1, 0, 0) against a start of (0, 0, 0, 0)
    average to (1, .5, .5, 0), a change of +50 points whatever the resample."""
    from bench.bench_learnability import eval_rows

    def summary(values: list[float]) -> dict:
        score = sum(values) / len(values)
        per_query = {"gen": values, "pass@1": values}
        return {"tasks": {"digits_cls": {"per_query": per_query, "scores": {"gen": score}}},
                "modes": {"gen": {"overall": score}, "pass@1": {"overall": score}}}

    runs = {}
    for seed, values in enumerate(([1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0])):
        folder = tmp_path / f"reward-seed{seed}"
        (folder / "eval" / "rl").mkdir(parents=True)
        (folder / "eval" / "rl" / "summary.json").write_text(json.dumps(summary(values)))
        runs[("reward", seed)] = folder
    rows = eval_rows(summary([0.0, 0.0, 0.0, 0.0]), runs, resamples=200)
    mean = [r for r in rows if r["seed"] == "mean"]
    assert len(mean) == 1 and mean[0]["gen after"] == "50.0"
    # (1, .5, .5, 0) - 0: every resample of 4 of these has a mean in [0, 1]; the point is +50.
    assert mean[0]["gen change"].startswith("+50.0 [")
    low, high = (float(x) for x in mean[0]["gen change"].split("[")[1].rstrip("]").split(","))
    assert 0.0 <= low < 50.0 < high <= 100.0
    assert [r["gen change"].split(" ")[0] for r in rows[:2]] == ["+50.0", "+50.0"]


def test_a_recipe_asks_for_the_extra_rl_pool_by_key(bench: Path, extended: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """data.benchmark_rl_extra: checked by the schema (naming the key), part of the default
    folder's name, and an existing build made without those extras is refused, not reused."""
    from umerl.config.origins import ConfigError
    from umerl.config.recipe import load_recipe
    from umerl.data.tasks import default_benchmark_dir, ensure_benchmark

    for bad, problem in (("{faces_cls: 10}", "'faces_cls' has no extra RL pool"),
                         ("{digits_cls: -1}", "-1 is not an int >= 0"),
                         ("[digits_cls]", "expected a mapping")):
        with pytest.raises(ConfigError, match=rf"data.benchmark_rl_extra.*{re.escape(problem)}"):
            load_recipe(None, [f"data.benchmark_rl_extra={bad}"])
    cfg = load_recipe(None, [f"data.benchmark_rl_extra={{digits_cls: {RL_EXTRA}}}"])
    assert dict(cfg.data.benchmark_rl_extra) == {"digits_cls": RL_EXTRA}
    monkeypatch.setenv("UMERL_DATA_DIR", str(tmp_path))
    assert default_benchmark_dir(0, {"digits_cls": RL_EXTRA}).name.endswith(
        f"-seed0-rl+digits_cls{RL_EXTRA}")
    assert default_benchmark_dir(0, {"digits_cls": 0}) == default_benchmark_dir(0)
    assert ensure_benchmark(extended, 0, {"digits_cls": RL_EXTRA}) == extended / "tasks.json"
    with pytest.raises(ValueError, match=r"built with rl_extra \{'digits_cls': 30\}, not "
                       r"\{'digits_cls': 31\}"):
        ensure_benchmark(extended, 0, {"digits_cls": RL_EXTRA + 1})
    with pytest.raises(ValueError, match=r"built with rl_extra \{\}, not"):
        ensure_benchmark(bench, 0, {"digits_cls": RL_EXTRA})  # a default build


def test_recipe_tasks_reads_the_recipes_benchmark_keys(bench: Path, extended: Path) -> None:
    """Task names resolve in the build that data.benchmark_dir and data.benchmark_rl_extra
    name together: the extended build's grown rl split, and a refusal where the folder was
    built without the asked extras (a caller that dropped the extras would take any build).
    The extras change the rl split only: a folder given for another split is read as it is
    (``umerl eval --benchmark-dir`` on a checkpoint whose run asked for extras)."""
    from umerl.config.recipe import load_recipe
    from umerl.data.tasks import recipe_tasks

    asked = f"data.benchmark_rl_extra={{digits_cls: {RL_EXTRA}}}"
    cfg = load_recipe(None, [f"data.benchmark_dir={extended}", asked])
    [spec] = recipe_tasks(["umerl-mini/digits_cls"], "rl", cfg.data)
    assert spec.path == extended / "digits_cls" / "rl.jsonl"
    assert len(read_jsonl(spec.path)) == 80 + RL_EXTRA
    cfg = load_recipe(None, [f"data.benchmark_dir={bench}", asked])
    with pytest.raises(ValueError, match=r"built with rl_extra \{\}, not"):
        recipe_tasks(["umerl-mini/digits_cls"], "rl", cfg.data)
    [spec] = recipe_tasks(["umerl-mini/digits_cls"], "test", cfg.data)
    assert spec.path == bench / "digits_cls" / "test.jsonl"


@pytest.mark.parametrize(("steps", "pairs", "per_step", "epochs"), [
    (300, 480, 16, 1),   # 30 steps an epoch, 30-step windows: epoch 1 and epoch 10
    (600, 480, 16, 2),   # 60-step windows: epochs 1-2 and 19-20
    (600, 960, 16, 1),   # 60-step windows of 60-step epochs
    (240, 960, 16, 0),   # 24-step windows in 60-step epochs: different queries
    (330, 480, 16, 0),   # 33-step windows straddle an epoch's end
    (200, 480, 16, 0),   # 20-step windows, 30-step epochs
])
def test_learnability_says_whether_its_windows_are_whole_epochs(
        steps: int, pairs: int, per_step: int, epochs: int) -> None:
    from bench.bench_learnability import epochs_per_window

    assert epochs_per_window(steps, pairs, per_step) == epochs
