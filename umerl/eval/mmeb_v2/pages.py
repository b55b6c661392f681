"""Page images of a visual-document corpus, rebuilt from its ``image`` column when missing.

As VLM2Vec's ``corpus_prepare`` (``src/data/eval_dataset/{vidore,visrag}_dataset.py`` at
6e1e1d4): a corpus page whose file is not under the task's image root is written there from
the corpus row's image, in the format its file name says (``<corpus-id>.png``; VisRAG: the
shortened name with the corpus id's extension). Pages already on disk are left as they are.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from PIL import Image

from umerl.data.formats import DataError
from umerl.eval.mmeb_v2.catalog import TaskInfo
from umerl.eval.mmeb_v2.files import iter_rows


def _image_bytes(value: Any, where: str) -> bytes:
    # A Hugging Face Image column is stored as {"bytes": ..., "path": ...}; plain bytes too.
    data = value.get("bytes") if isinstance(value, dict) else value
    if not isinstance(data, bytes) or not data:
        raise DataError(f"{where}: column 'image' holds no image bytes to rebuild the page from")
    return data


def _write_page(data: bytes, path: Path, where: str) -> None:
    """Decode and save as the file name's format; written aside, then renamed, so a reader
    never meets half a page."""
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise DataError(f"{where}: cannot write page {path}: unknown image type '{path.suffix}'")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"{where}: column 'image' is not a readable image ({err})") from None
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with image:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(partial, format=image_format)
            partial.replace(path)
        except OSError as err:
            partial.unlink(missing_ok=True)
            raise DataError(f"{where}: cannot write page {path} ({err})") from None


def rebuild_missing_pages(root: Path, info: TaskInfo, pages: dict[str, Path]) -> None:
    """Write every page of ``pages`` (corpus id -> its file) that is not on disk from the
    corpus's ``image`` column; the column is read only when a page is missing."""
    missing = {corpus_id: path for corpus_id, path in pages.items() if not path.is_file()}
    if not missing:
        return
    print(f"[mmeb-v2] {info.name}: writing {len(missing)} missing page image(s) under "
          f"{root / info.media_root} from the corpus's image column", flush=True)
    for where, row in iter_rows(root, info.repo, "corpus", info.split, ("corpus-id", "image")):
        path = missing.pop(str(row["corpus-id"]), None)
        if path is not None:
            _write_page(_image_bytes(row["image"], where), path, where)
