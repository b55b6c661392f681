"""Rows of a Hugging Face dataset from a local copy (what ``huggingface-cli download`` leaves).

A dataset ``owner/name`` lives in ``<root>/owner/name/``. Its files for one config and split
follow the Hub's conventions: ``<config>/<split>-*.parquet`` (or ``.jsonl``/``.json``), and for
a dataset without configs ``data/<split>-*``, ``<split>-*`` or ``<split>.jsonl``. Parquet is read
with pyarrow, only the columns asked for (a corpus's page images stay on disk).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from umerl.data.formats import DataError

EXTENSIONS = (".parquet", ".jsonl", ".json")
PARQUET_BATCH = 256  # rows decoded at a time


def dataset_dir(root: Path, repo: str) -> Path:
    return root / repo


def find_files(root: Path, repo: str, subset: str | None, split: str) -> list[Path]:
    """The data files of ``repo`` (config ``subset``) for ``split``, in name order."""
    base = dataset_dir(root, repo)
    if not base.is_dir():
        raise DataError(f"{base}: no such folder (MMEB-V2 reads {repo} from here: "
                        f"huggingface-cli download {repo} --repo-type dataset --local-dir {base})")
    folders = [base / subset] if subset else [base / "data", base]
    for folder in folders:
        found = sorted(p for p in folder.glob(f"{split}*") if p.suffix in EXTENSIONS
                       and p.is_file() and _is_split_file(p.name, split))
        if found:
            return found
    looked = ", ".join(f"{f}/{split}*{{{','.join(EXTENSIONS)}}}" for f in folders)
    raise DataError(f"{base}: no '{split}' data files for "
                    f"{'config ' + repr(subset) if subset else 'the default config'} "
                    f"(looked for {looked})")


def _is_split_file(name: str, split: str) -> bool:
    # "test-00000-of-00001.parquet", "test.jsonl"; not "test_1k" (another config's name).
    stem = name.split(".", 1)[0]
    return stem == split or stem.startswith(f"{split}-")


Row = tuple[str, dict[str, Any]]  # (where it was read: "file:line" or "file: row i", the row)


def read_rows(root: Path, repo: str, subset: str | None, split: str,
              columns: Sequence[str]) -> list[Row]:
    """Every row of the split, each with (at least) ``columns`` and where it came from; a
    missing column is an error naming the file."""
    return list(iter_rows(root, repo, subset, split, columns))


def iter_rows(root: Path, repo: str, subset: str | None, split: str,
              columns: Sequence[str]) -> Iterator[Row]:
    """``read_rows`` a few rows at a time: parquet is read batch by batch, so a column of page
    images never has to fit in memory at once."""
    for path in find_files(root, repo, subset, split):
        yield from (_read_parquet(path, columns) if path.suffix == ".parquet"
                    else _read_json(path, columns))


def _read_parquet(path: Path, columns: Sequence[str]) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow comes with the environment
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), "
                        "or convert the split to JSONL") from None
    names = pq.read_schema(path).names
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} (has: {', '.join(names)})")
    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH,
                                                   columns=list(columns)):
        for row in batch.to_pylist():
            yield f"{path}: row {index}", row
            index += 1


def _read_json(path: Path, columns: Sequence[str]) -> list[Row]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        records = [(i + 1, r) for i, r in enumerate(json.loads(text))]
    else:
        records = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((line_no, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{line_no}: malformed JSON ({err.msg})") from None
    for number, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object")
        missing = [c for c in columns if c not in record]
        if missing:
            raise DataError(f"{path}:{number}: missing field(s) {missing}")
    return [(f"{path}:{number}", record) for number, record in records]
