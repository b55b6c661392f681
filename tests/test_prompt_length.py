"""Prompt lengths from image headers, decode errors at encode time, data.max_prompt_tokens."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from umerl.data.formats import DataError, Side, read_eval_queries, read_rl_pairs
from umerl.model.inputs import check_prompt_lengths

SIZES = [(28, 28), (60, 90), (200, 100), (640, 480), (13, 300)]  # (width, height)
LONG_UNIT = "the quick brown fox "  # 6 tokens per repeat with the tiny tokenizer


@pytest.fixture(scope="module")
def qwen3_bundle(tmp_path_factory: pytest.TempPathFactory):
    from umerl.model.loading import load_policy
    from umerl.model.tiny import build_tiny_model

    return load_policy(
        build_tiny_model(tmp_path_factory.mktemp("tiny3") / "qwen3_vl", family="qwen3_vl")
    )


@pytest.fixture(params=["qwen2_vl", "qwen3_vl"])
def bundle(request: pytest.FixtureRequest):
    name = "tiny_bundle" if request.param == "qwen2_vl" else "qwen3_bundle"
    return request.getfixturevalue(name)


@pytest.fixture()
def media(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for w, h in SIZES:
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{w}x{h}.png")
    real = (tmp_path / "200x100.png").read_bytes()
    assert len(real) > 1000
    (tmp_path / "truncated.png").write_bytes(real[:100])  # header parses, pixels do not
    return tmp_path


def write_lines(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def rl_record(i: int, query: dict | None = None, target: dict | None = None) -> dict:
    return {"id": f"p{i}", "task": "toy", "query": query or {"text": f"query {i}"},
            "target": target or {"text": f"target {i}"}}


def test_prompt_length_equals_encoded_length(bundle, media: Path) -> None:
    png = {f"{w}x{h}": str(media / f"{w}x{h}.png") for w, h in SIZES}
    sides = [
        Side(text="text only"),
        Side(text="", images=(png["60x90"],)),
        Side(text="thin", images=(png["13x300"],)),
        Side(text="several", images=(png["28x28"], png["200x100"], png["640x480"])),
        Side(text="odd video", video=(png["200x100"],) * 3),
        Side(text="big video", video=(png["640x480"],) * 4),
        Side(text="both", images=(png["60x90"],), video=(png["28x28"],) * 2),
    ]
    encoder = bundle.encoder
    lengths = [encoder.prompt_length(s) for s in sides]
    assert lengths == [len(encoder.encode(s).input_ids) for s in sides]
    # The vision tokens are counted: a bigger image costs more than the blank one.
    assert lengths[3] > lengths[1] > encoder.prompt_length(Side(text=""))


def test_prompt_length_reads_headers_only(tiny_bundle, media: Path) -> None:
    truncated = Side(text="x", images=(str(media / "truncated.png"),), source="f.jsonl:4")
    whole = Side(text="x", images=(str(media / "200x100.png"),))
    assert tiny_bundle.encoder.prompt_length(truncated) == len(
        tiny_bundle.encoder.encode(whole).input_ids)


def test_prompt_length_names_an_unreadable_image(tiny_bundle, media: Path) -> None:
    (media / "note.png").write_text("not an image", encoding="utf-8")
    side = Side(text="x", images=(str(media / "note.png"),), source="f.jsonl:7")
    with pytest.raises(DataError, match=r"^f.jsonl:7: not a readable image: \S*note.png "
                                        r"\(cannot identify image file\)$"):
        tiny_bundle.encoder.prompt_length(side)


@pytest.mark.parametrize("field", ["images", "video"])
def test_truncated_png_fails_at_encode_naming_file_line(tiny_bundle, media: Path,
                                                        field: str) -> None:
    media_list = ["truncated.png"] if field == "images" else ["200x100.png", "truncated.png"]
    path = write_lines(media / "rl.jsonl", [
        rl_record(0), rl_record(1, target={"text": "t", field: media_list})])
    pairs, report = read_rl_pairs(path)  # the header is fine, so the reader accepts it
    assert report.kept == 2
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: cannot decode image "
                                        r"\S*truncated.png: image file is truncated"):
        tiny_bundle.encoder.encode(pairs[1].target)


def test_check_prompt_lengths_rejects_a_400k_token_query(tiny_bundle, media: Path) -> None:
    encoder = tiny_bundle.encoder
    long_text = LONG_UNIT * 66_667  # just over 400,000 tokens (asserted below)
    path = write_lines(media / "rl.jsonl", [
        rl_record(0), rl_record(1, query={"text": long_text}),
        rl_record(2, target={"text": "t", "images": ["60x90.png"]})])
    pairs, _ = read_rl_pairs(path)
    limit = max(encoder.prompt_length(p.target) for p in pairs)
    started = time.perf_counter()
    with pytest.raises(DataError) as caught:
        check_prompt_lengths(encoder, pairs, limit, skip_invalid=False)
    elapsed = time.perf_counter() - started
    match = re.fullmatch(
        rf"{re.escape(str(path))}:2: query prompt is (\d+) tokens, over "
        rf"data.max_prompt_tokens={limit}", str(caught.value))
    assert match, str(caught.value)
    assert int(match.group(1)) == encoder.prompt_length(pairs[1].query) > 400_000
    assert elapsed < 10, f"check_prompt_lengths took {elapsed:.1f} s"

    kept, skipped = check_prompt_lengths(encoder, pairs, limit, skip_invalid=True)
    assert [p.id for p in kept] == ["p0", "p2"]
    assert len(skipped) == 1 and skipped[0] == str(caught.value)


def test_check_prompt_lengths_is_inclusive_and_checks_targets(tiny_bundle, media: Path) -> None:
    encoder = tiny_bundle.encoder
    path = write_lines(media / "rl.jsonl", [
        rl_record(0, target={"text": "a much longer target text " * 20})])
    pairs, _ = read_rl_pairs(path)
    n = encoder.prompt_length(pairs[0].target)
    assert check_prompt_lengths(encoder, pairs, n, skip_invalid=False) == (pairs, [])
    with pytest.raises(DataError, match=rf":1: target prompt is {n} tokens, over "
                                        rf"data.max_prompt_tokens={n - 1}$"):
        check_prompt_lengths(encoder, pairs, n - 1, skip_invalid=False)


def test_check_prompt_lengths_names_each_line_of_a_repeated_candidate(tiny_bundle,
                                                                      media: Path) -> None:
    encoder = tiny_bundle.encoder
    record = {"qry_inst": "Represent the image.", "qry_img_path": "28x28.png",
              "tgt_inst": "Represent the label.", "tgt_text": ["cat", "dog " * 300]}
    short = dict(record, tgt_text=["cat", "dog"])
    path = write_lines(media / "task.jsonl", [record, short, record])
    items, _ = read_eval_queries(path)
    limit = max(encoder.prompt_length(s) for s in (items[1].query, *items[1].candidates))
    kept, skipped = check_prompt_lengths(encoder, items, limit, skip_invalid=True)
    assert kept == [items[1]]
    # The second rejection reuses the cached length but still names its own line.
    assert [m.split(" prompt is ")[0] for m in skipped] == [
        f"{path}:1: candidate 1: candidate 1", f"{path}:3: candidate 1: candidate 1"]
    assert all(m.endswith(f"over data.max_prompt_tokens={limit}") for m in skipped)
