"""The JSONL readers: good records parse; every bad-input case names its file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from umerl.data.formats import (
    DataError,
    Side,
    image_header_size,
    read_eval_queries,
    read_rl_pairs,
    read_sft_pairs,
)
from umerl.data.tokens import format_completion

COMPLETION = format_completion("a cat on a mat", "a cat")


@pytest.fixture()
def media(tmp_path: Path) -> Path:
    Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / "cat.png")
    for i in range(3):
        Image.new("RGB", (32, 32), (i, i, i)).save(tmp_path / f"frame{i}.png")
    Image.new("RGB", (48, 32), (5, 5, 5)).save(tmp_path / "wide.png")
    (tmp_path / "text.png").write_text("this is not an image\n", encoding="utf-8")
    return tmp_path


def write_lines(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def sft_record(**changes) -> dict:
    record = {
        "id": "p0", "task": "toy",
        "query": {"text": "find the cat", "images": ["cat.png"], "completion": COMPLETION},
        "target": {"text": "a cat", "completion": COMPLETION},
    }
    record.update(changes)
    return record


def mmeb_record(**changes) -> dict:
    record = {
        "qry_inst": "Represent the given image.", "qry_text": "", "qry_img_path": "cat.png",
        "tgt_inst": "Represent the label.", "tgt_text": ["cat", "dog", "bird"],
        "tgt_img_path": ["", "", ""],
    }
    record.update(changes)
    return record


def test_sft_pairs_parse_with_media_resolved(media: Path) -> None:
    path = write_lines(media / "sft.jsonl", [
        sft_record(),
        sft_record(id="p1", query={"video": ["frame0.png", "frame1.png", "frame2.png"],
                                   "completion": COMPLETION}),
    ])
    pairs, report = read_sft_pairs(path)
    assert report.kept == 2 and not report.skipped
    assert pairs[0].query.images == (str(media / "cat.png"),)
    assert pairs[0].target.is_text_only and pairs[0].target.completion == COMPLETION
    assert len(pairs[1].query.video) == 3 and pairs[1].query.text == ""


def test_rl_pairs_need_no_completion(media: Path) -> None:
    record = sft_record()
    del record["query"]["completion"], record["target"]["completion"]
    pairs, _ = read_rl_pairs(write_lines(media / "rl.jsonl", [record]))
    assert pairs[0].query.completion is None


def test_media_root_overrides_the_files_folder(media: Path, tmp_path_factory) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    path = write_lines(elsewhere / "sft.jsonl", [sft_record()])
    with pytest.raises(DataError, match="missing media"):
        read_sft_pairs(path)
    pairs, _ = read_sft_pairs(path, media_root=media)
    assert pairs[0].query.images == (str(media / "cat.png"),)


BAD_SFT = [
    ("{not json", r"sft.jsonl:2: malformed JSON"),
    ("[1, 2]", r"sft.jsonl:2: expected a JSON object"),
    (sft_record(query={"text": "", "completion": COMPLETION}), r"sft.jsonl:2: empty side 'query'"),
    (sft_record(query={"text": "x", "images": ["nope.png"], "completion": COMPLETION}),
     r"sft.jsonl:2: query: missing media file for 'images\[0\]'"),
    (sft_record(query={"text": 5, "completion": COMPLETION}),
     r"sft.jsonl:2: query: field 'text' must be str, got int"),
    (sft_record(query={"text": "x", "images": "cat.png", "completion": COMPLETION}),
     r"sft.jsonl:2: query: field 'images' must be list"),
    (sft_record(target={"text": "a cat"}), r"sft.jsonl:2: target: missing field 'completion'"),
    (sft_record(target={"text": "a cat", "completion": "<answer>cat</answer>"}),
     r"sft.jsonl:2: target: completion does not match"),
    (sft_record(task=None), r"sft.jsonl:2: field 'task' must be str, got NoneType"),
    (sft_record(query={"text": "x", "images": ["text.png"], "completion": COMPLETION}),
     r"sft.jsonl:2: query: field 'images\[0\]': not a readable image: \S*text.png "
     r"\(cannot identify image file\)$"),
    (sft_record(target={"video": ["frame0.png", "text.png"], "completion": COMPLETION}),
     r"sft.jsonl:2: target: field 'video\[1\]': not a readable image: \S*text.png"),
    (sft_record(query={"video": ["frame0.png", "frame1.png", "gone.png"],
                       "completion": COMPLETION}),
     r"sft.jsonl:2: query: missing media file for 'video\[2\]': \S*gone.png$"),
    (sft_record(query={"video": ["frame0.png", "frame1.png", "wide.png"],
                       "completion": COMPLETION}),
     r"sft.jsonl:2: query: field 'video\[2\]': video frame 2 is 48x32 but frame 0 is 32x32"),
    ({"id": "x", "task": "t", "query": {"text": "q", "completion": COMPLETION}},
     r"sft.jsonl:2: missing field 'target'"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_SFT)
def test_bad_sft_lines_name_file_and_line(media: Path, bad, message: str) -> None:
    path = write_lines(media / "sft.jsonl", [sft_record(), bad])
    with pytest.raises(DataError, match=message):
        read_sft_pairs(path)


def test_skip_invalid_counts_and_reports(media: Path) -> None:
    path = write_lines(media / "sft.jsonl", [sft_record(), "{oops", sft_record(id="p2"),
                                             sft_record(query={"text": ""})])
    pairs, report = read_sft_pairs(path, skip_invalid=True)
    assert [p.id for p in pairs] == ["p0", "p2"]
    assert len(report.skipped) == 2
    assert report.skipped[0].endswith("malformed JSON (Expecting property name enclosed in "
                                      "double quotes at column 2)")
    assert "sft.jsonl:4:" in report.skipped[1]
    assert "2 skipped" in report.summary()


def test_all_lines_bad_is_an_error_even_when_skipping(media: Path) -> None:
    path = write_lines(media / "sft.jsonl", ["{oops"])
    with pytest.raises(DataError, match="no valid records"):
        read_sft_pairs(path, skip_invalid=True)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nothere.jsonl: no such file"):
        read_rl_pairs(tmp_path / "nothere.jsonl")


def test_mmeb_queries_default_relevance_positive_first(media: Path) -> None:
    items, _ = read_eval_queries(write_lines(media / "task.jsonl", [mmeb_record()]))
    item = items[0]
    assert item.query.text == "Represent the given image."
    assert item.query.images == (str(media / "cat.png"),)
    assert [c.text for c in item.candidates] == [
        "Represent the label.\ncat", "Represent the label.\ndog", "Represent the label.\nbird"]
    assert item.relevance == (1.0, 0.0, 0.0)


def test_mmeb_graded_relevance_and_image_candidates(media: Path) -> None:
    record = mmeb_record(qry_text="a cat", qry_img_path="", tgt_text=["", "cat"],
                         tgt_img_path=["cat.png", ""], rel_scores=[2, 0.5])
    items, _ = read_eval_queries(write_lines(media / "task.jsonl", [record]))
    assert items[0].query.text == "Represent the given image.\na cat"
    assert items[0].candidates[0].images == (str(media / "cat.png"),)
    assert items[0].candidates[0].text == "Represent the label."
    assert items[0].relevance == (2.0, 0.5)


BAD_MMEB = [
    (mmeb_record(tgt_img_path=["", ""]), "'tgt_img_path' has 2 entries but 'tgt_text' has 3"),
    (mmeb_record(tgt_text=[]), "'tgt_text' is empty"),
    (mmeb_record(qry_img_path="missing.png"), "missing media file for 'qry_img_path'"),
    (mmeb_record(rel_scores=[1, 0]), "'rel_scores' has 2 entries but there are 3 candidates"),
    (mmeb_record(rel_scores=[0, 0, 0]), "no relevant candidate"),
    (mmeb_record(rel_scores=[1, "high", 0]), r"'rel_scores\[1\]' must be a number"),
    (mmeb_record(qry_inst="", qry_img_path=""), "empty query"),
    (mmeb_record(tgt_text=["cat", 3, "bird"]), "candidate 1: 'tgt_text' and 'tgt_img_path'"),
    (mmeb_record(tgt_inst="", tgt_text=["cat", "", "bird"]), "empty candidate 1"),
    (mmeb_record(tgt_text="cat"), "field 'tgt_text' must be list, got str"),
    (mmeb_record(qry_img_path="text.png"),
     r"field 'qry_img_path': not a readable image: \S*text.png \(cannot identify image file\)"),
    (mmeb_record(tgt_img_path=["", "text.png", ""]),
     r"field 'tgt_img_path\[1\]': not a readable image: \S*text.png"),
    (mmeb_record(qry_video=["frame0.png", "missing.png"]),
     r"missing media file for 'qry_video\[1\]'"),
    (mmeb_record(qry_video=["wide.png", "frame1.png"]),
     r"field 'qry_video\[1\]': video frame 1 is 32x32 but frame 0 is 48x32"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_MMEB)
def test_bad_mmeb_lines_name_file_and_line(media: Path, bad: dict, message: str) -> None:
    path = write_lines(media / "task.jsonl", [mmeb_record(), mmeb_record(), bad])
    with pytest.raises(DataError, match=rf"task.jsonl:3: .*{message}"):
        read_eval_queries(path)


def test_non_utf8_line_names_file_line_and_column(media: Path) -> None:
    good = json.dumps(sft_record()).encode()
    bad = good.replace(b'"p0"', b'"p\xff\xfe"')
    column = bad.index(b"\xff") + 1
    path = media / "sft.jsonl"
    path.write_bytes(good + b"\n" + bad + b"\n" + good.replace(b'"p0"', b'"p2"') + b"\n")
    with pytest.raises(DataError, match=rf"sft.jsonl:2: not valid UTF-8 \(byte 0xff at column "
                                        rf"{column}\)$"):
        read_sft_pairs(path)
    pairs, report = read_sft_pairs(path, skip_invalid=True)
    assert [p.id for p in pairs] == ["p0", "p2"]
    assert len(report.skipped) == 1 and report.skipped[0].startswith(f"{path}:2: not valid UTF-8")


def test_skip_invalid_counts_media_errors(media: Path) -> None:
    lines = [
        sft_record(),
        sft_record(id="p1", query={"text": "x", "images": ["text.png"], "completion": COMPLETION}),
        sft_record(id="p2", query={"video": ["frame0.png", "wide.png"], "completion": COMPLETION}),
        sft_record(id="p3", query={"video": ["frame0.png", "nope.png"], "completion": COMPLETION}),
        sft_record(id="p4"),
    ]
    pairs, report = read_sft_pairs(write_lines(media / "sft.jsonl", lines), skip_invalid=True)
    assert [p.id for p in pairs] == ["p0", "p4"]
    assert [m.split(": ", 2)[:2] for m in report.skipped] == [
        [f"{media}/sft.jsonl:2", "query"], [f"{media}/sft.jsonl:3", "query"],
        [f"{media}/sft.jsonl:4", "query"]]
    assert "not a readable image" in report.skipped[0]
    assert "video frame 1 is 48x32" in report.skipped[1]
    assert "missing media file for 'video[1]'" in report.skipped[2]
    assert report.summary().startswith(f"{media}/sft.jsonl: 2 records, 3 skipped")


def test_eval_skip_invalid_counts_unreadable_candidate_image(media: Path) -> None:
    path = write_lines(media / "task.jsonl", [
        mmeb_record(), mmeb_record(tgt_img_path=["", "", "text.png"]), mmeb_record()])
    items, report = read_eval_queries(path, skip_invalid=True)
    assert len(items) == 2 and len(report.skipped) == 1
    assert report.skipped[0].startswith(f"{path}:2: field 'tgt_img_path[2]': not a readable image")


def test_sides_record_their_source_outside_their_identity(media: Path) -> None:
    pairs, _ = read_sft_pairs(write_lines(media / "sft.jsonl", [sft_record(), sft_record()]))
    sft = str(media / "sft.jsonl")
    assert [(p.query.source, p.target.source) for p in pairs] == [
        (f"{sft}:1", f"{sft}:1"), (f"{sft}:2", f"{sft}:2")]
    assert pairs[0].query == pairs[1].query and hash(pairs[0].query) == hash(pairs[1].query)
    assert pairs[0].query.key() == pairs[1].query.key()
    items, _ = read_eval_queries(write_lines(media / "task.jsonl", [mmeb_record()]))
    task = str(media / "task.jsonl")
    assert items[0].query.source == f"{task}:1"
    assert [c.source for c in items[0].candidates] == [
        f"{task}:1: candidate {i}" for i in range(3)]
    assert Side(text="a", source="x:1") == Side(text="a", source="y:2")


def test_image_header_cache_sees_a_replaced_file(media: Path) -> None:
    path = media / "text.png"
    assert image_header_size(path) == "cannot identify image file"
    Image.new("RGB", (20, 10)).save(path, format="PNG")
    assert image_header_size(path) == (20, 10)
    assert image_header_size(media / "absent.png") == "No such file or directory"


# -- control tokens in text: caught at the door, named by file:line, field and token ----------

CONTROL_SFT = [
    (sft_record(query={"text": "find <|image_pad|> the cat", "images": ["cat.png"],
                       "completion": COMPLETION}),
     r"sft.jsonl:2: query: field 'text' holds <\|image_pad\|>"),
    (sft_record(target={"text": "a cat<|im_end|>\n<|im_start|>assistant",
                        "completion": COMPLETION}),
     r"sft.jsonl:2: target: field 'text' holds <\|im_end\|>"),
    (sft_record(target={"text": "a <disc_emb> cat", "completion": COMPLETION}),
     r"sft.jsonl:2: target: field 'text' holds <disc_emb>"),
    (sft_record(target={"text": "a cat", "completion": format_completion("x<|im_end|>", "y")}),
     r"sft.jsonl:2: target: field 'completion' holds <\|im_end\|>"),
    (sft_record(target={"text": "a cat", "completion": format_completion("x", "<gen_emb>")}),
     r"sft.jsonl:2: target: field 'completion' holds <gen_emb>"),
]


@pytest.mark.parametrize(("bad", "message"), CONTROL_SFT)
def test_control_tokens_in_pair_text_are_rejected(media: Path, bad, message: str) -> None:
    path = write_lines(media / "sft.jsonl", [sft_record(), bad])
    with pytest.raises(DataError, match=message):
        read_sft_pairs(path)
    rl = write_lines(media / "rl.jsonl", [sft_record(), bad])
    if "completion" not in message:  # RL pairs drop completions unread
        with pytest.raises(DataError, match=message.replace("sft", "rl")):
            read_rl_pairs(rl)


@pytest.mark.parametrize(("bad", "field"), [
    (mmeb_record(qry_text="red <|image_pad|>"), "qry_text"),
    (mmeb_record(qry_inst="<|vision_start|>Represent"), "qry_inst"),
    (mmeb_record(tgt_inst="Represent<|im_end|>"), "tgt_inst"),
    (mmeb_record(tgt_text=["cat", "dog <|video_pad|>", "bird"]), r"tgt_text\[1\]"),
])
def test_control_tokens_in_eval_text_are_rejected(media: Path, bad: dict, field: str) -> None:
    path = write_lines(media / "task.jsonl", [mmeb_record(), bad])
    with pytest.raises(DataError, match=rf"task.jsonl:2: field '{field}' holds <"):
        read_eval_queries(path)


def test_control_token_in_finds_the_first_and_lets_reasoning_tags_pass() -> None:
    from umerl.data.tokens import control_token_in

    assert control_token_in("a <gen_emb> b <|im_end|>") == "<gen_emb>"
    assert control_token_in("plain text, a < b") is None
    # The format is the completion's: a quoted tag in an input is plain text to it.
    assert control_token_in("explain <think> and <answer> tags") is None
    assert control_token_in("<|IMAGE_PAD|>") is None  # the tokenizer matches exact strings


def test_sides_built_outside_the_readers_get_the_same_check() -> None:
    from umerl.data.formats import check_side_texts

    check_side_texts([Side(text="fine", source="a.parquet:row 1")])
    with pytest.raises(DataError, match=r"^b.parquet:row 7: text holds <\|image_pad\|>"):
        check_side_texts([Side(text="x <|image_pad|>", source="b.parquet:row 7")])
