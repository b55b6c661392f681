"""Atomic checkpoints: a crash mid-save never damages the last good checkpoint.

Layout under a run's checkpoint root::

    step_00000040/            a Hugging Face folder (from_pretrained / umerl eval load it)
        config.json, model.safetensors, tokenizer files, preprocessor_config.json
        train_state/          what resume needs: DeepSpeed engine state (optimizer,
                              scheduler), data cursor, step, RNG state per rank
        umerl_checkpoint.json the manifest, written last: step, stage, every file's size and
                              SHA-256, and the recipe the run had (resume compares it; eval
                              and serve take its decoding settings)
    latest                    the name of the newest complete checkpoint
    .step_00000050.partial/   a save in progress (or one that crashed): never loaded
    .step_00000040.replaced/  the previous copy of a step being saved again (loaded only if
                              a crash left no step_00000040/)

Every rank writes into the ``.partial`` folder; rank 0 writes the manifest, renames the folder
into place (the commit point: a rename within a filesystem is atomic) and then replaces
``latest``. Picking the newest checkpoint trusts a folder whose files have the manifest's
sizes; ``verify`` and every resume also compare each file's SHA-256 (a same-size corruption is
caught there) before anything is loaded, so DeepSpeed only unpickles files that are byte for
byte those its run wrote. Manifests written before hashes were recorded (sizes only) still
verify for evaluation (safetensors loading runs no code) but cannot be resumed from.
On a multi-node cluster the root must be on storage every rank can reach.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MANIFEST = "umerl_checkpoint.json"
LATEST = "latest"
TRAIN_STATE = "train_state"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def partial_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f".step_{step:08d}.partial"


def begin(root: str | Path, step: int) -> Path:
    """A fresh staging folder for ``step`` (a leftover from a crashed save is discarded)."""
    staging = partial_dir(root, step)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def commit(root: str | Path, step: int, stage: str, extra: dict[str, Any] | None = None) -> Path:
    """Seal the staging folder of ``step`` and make it the latest checkpoint (rank 0 only)."""
    root = Path(root)
    staging = partial_dir(root, step)
    names = [str(p.relative_to(staging)) for p in sorted(staging.rglob("*")) if p.is_file()]
    digests = _digests(staging, names)
    files = {name: {"bytes": (staging / name).stat().st_size, "sha256": digests[name]}
             for name in names}
    manifest = {"step": step, "stage": stage, "created": time.time(), "files": files,
                **(extra or {})}
    _write_atomic(staging / MANIFEST, json.dumps(manifest, indent=1))
    _fsync_tree(staging)
    final = step_dir(root, step)
    replaced = root / f".{final.name}.replaced"
    if final.exists():  # re-saving a step: set the old copy aside until the new one is in
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    os.rename(staging, final)
    _fsync_dir(root)
    _write_atomic(root / LATEST, final.name)
    shutil.rmtree(replaced, ignore_errors=True)
    return final


def file_sha256(path: Path) -> str:
    """The one digest a manifest records (streamed: a file is never read whole into memory)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _digests(folder: Path, names: list[str]) -> dict[str, str]:
    # hashlib releases the GIL while hashing, so files hash in parallel.
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(names, pool.map(lambda n: file_sha256(folder / n), names)))


def _entries(manifest: dict[str, Any]) -> dict[str, tuple[int, str | None]]:
    """name -> (bytes, sha256); a manifest from before hashes were recorded maps name -> bytes."""
    return {name: (int(entry), None) if isinstance(entry, int)
            else (int(entry["bytes"]), str(entry["sha256"]))
            for name, entry in manifest["files"].items()}


def is_complete(path: str | Path) -> bool:
    """The manifest exists, parses, and every file it lists is there with its size (hashes are
    compared by ``verify`` and on resume, not here: picking the latest stays cheap)."""
    path = Path(path)
    try:
        return all((path / name).stat().st_size == size
                   for name, (size, _) in _entries(read_manifest(path)).items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def read_manifest(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / MANIFEST).read_text())


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint: ``latest`` if it is sound, else the highest sound step."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if _STEP_DIR.match(candidate.name) and is_complete(candidate):
            return candidate
    steps = [p for p in root.glob("step_*") if _STEP_DIR.match(p.name)]
    # A crash while re-saving a step leaves only its previous copy, set aside.
    steps += [p for p in root.glob(".step_*.replaced") if _STEP_DIR.match(p.name[1:-9])]
    steps.sort(key=lambda p: (p.name.strip(".").removesuffix(".replaced"),
                              not p.name.startswith(".")), reverse=True)
    return next((p for p in steps if is_complete(p)), None)


class CheckpointError(ValueError):
    """A checkpoint folder cannot be loaded; the message names the folder and the file."""


def verify(path: str | Path, resumable: bool = False) -> Path:
    """A loadable Hugging Face folder, checked without loading it; returns the folder.

    ``path`` may be a checkpoint folder or a run's checkpoint root (then its newest complete
    checkpoint). A umerl manifest must match the files (sizes, and SHA-256 where it records
    them); every safetensors file must be as long as its header says (a truncated copy fails
    here, not half-way through a load). ``resumable``: hashes are required (see
    ``check_hashes``).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder{hub_hint(str(path))}")
    if not (path / "config.json").is_file() and _is_root(path):
        found = latest(path)
        if found is None:
            raise CheckpointError(f"{path}: no complete checkpoint here{_pointer_note(path)}")
        path = found
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a Hugging Face checkpoint (no config.json)")
    if (path / MANIFEST).is_file():
        check_hashes(path, required=resumable)
    weights = sorted(path.glob("*.safetensors"))
    if not weights and not list(path.glob("*.bin")):
        raise CheckpointError(f"{path}: no weights (*.safetensors or *.bin)")
    for file in weights:
        problem = _safetensors_problem(file)
        if problem:
            raise CheckpointError(f"{file}: {problem}")
    return path


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_hint(name: str) -> str:
    """For a name like ``Qwen/Qwen2-VL-2B-Instruct`` that is no local folder (its first part
    is no folder here either): how to download it. umerl reads local folders only."""
    if not _HUB_ID.match(name) or Path(name.split("/")[0]).exists():
        return ""
    local = f"models/{name.split('/')[1]}"
    return (f". It looks like a Hugging Face Hub id: umerl never downloads at run time, so "
            f"download it first (pip install -U huggingface_hub): hf download {name} "
            f"--local-dir {local} and pass {local}")


def _is_root(path: Path) -> bool:
    return (path / LATEST).exists() or any(_STEP_DIR.match(p.name) for p in path.iterdir())


def _pointer_note(root: Path) -> str:
    pointer = root / LATEST
    if not pointer.is_file():
        return ""
    name = pointer.read_text().strip()
    state = "does not exist" if not (root / name).exists() else "is incomplete"
    return f" ('{LATEST}' names {name}, which {state})"


def _manifest_problem(path: Path) -> str | None:
    try:
        files = _entries(read_manifest(path))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"unreadable {MANIFEST} ({err})"
    for name, (size, _) in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size} bytes, the manifest says {size}"
    return None


def check_resumable(path: str | Path) -> None:
    """The manifest records a hash for every file (cheap: nothing is read but the manifest);
    older checkpoints record sizes only, and resuming unpickles DeepSpeed state."""
    path = Path(path)
    if any(sha is None for _, sha in _entries(read_manifest(path)).values()):
        raise CheckpointError(f"{path}: its {MANIFEST} records no SHA-256 hashes (written by an "
                              "older umerl), so its training state cannot be checked before "
                              "it is loaded; start fresh in another output_dir")


def check_hashes(path: str | Path, required: bool = True) -> None:
    """Every file the manifest lists has its SHA-256; raises ``CheckpointError`` naming the first
    that differs. ``required``: a manifest without hashes (written before they were recorded) is
    an error, as on resume, which unpickles DeepSpeed state; else it is accepted on sizes."""
    path = Path(path)
    problem = _manifest_problem(path)
    if problem:
        raise CheckpointError(f"{path}: incomplete checkpoint: {problem}")
    if required:
        check_resumable(path)
    entries = _entries(read_manifest(path))
    expected = {name: sha for name, (_, sha) in entries.items() if sha is not None}
    actual = _digests(path, sorted(expected))
    for name in sorted(expected):
        if actual[name] != expected[name]:
            raise CheckpointError(f"{path / name}: SHA-256 {actual[name][:16]}... differs from "
                                  f"the manifest's {expected[name][:16]}... (the file was "
                                  "changed or damaged after the checkpoint was written)")


def _safetensors_problem(file: Path) -> str | None:
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if size < 8 or header_len > size - 8:
                return f"truncated or not a safetensors file ({size} bytes)"
            header = json.loads(handle.read(header_len))
    except (OSError, ValueError) as err:
        return f"unreadable safetensors header ({err})"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        return f"truncated: {size} bytes, its header needs {expected}"
    return None


def is_fresh(resume: str | None) -> bool:
    return resume is None or str(resume).lower() in ("none", "null", "false", "")


def is_latest(resume: str | None) -> bool:
    """``auto`` and ``force`` both continue from the latest checkpoint (``force`` also when the
    recipe differs from the one the checkpoint recorded)."""
    return str(resume).lower() in ("auto", "force")


def stored_recipe(path: str | Path) -> dict[str, Any] | None:
    """The recipe a checkpoint's run had (its manifest's ``recipe``); None for a checkpoint
    from before recipes were recorded, or a folder that is no umerl checkpoint."""
    try:
        recipe = read_manifest(path).get("recipe")
    except (OSError, ValueError, AttributeError):
        return None
    return recipe if isinstance(recipe, dict) else None


def stored_step(path: str | Path) -> int | None:
    try:
        return int(read_manifest(path)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_fresh_start(root: str | Path, key: str) -> None:
    """A fresh start (``key`` null) must not write into a root holding another run's
    checkpoints: its saves and retention would interleave with them."""
    found = latest(root)
    if found is not None:
        raise CheckpointError(
            f"{key}=null starts fresh, but {root} holds another run's checkpoints (newest "
            f"{found.name}); set {key}=auto to continue that run, or output_dir=<another folder> "
            "to start fresh")


def resolve_resume(resume: str | None, root: str | Path, key: str = "resume") -> Path | None:
    """``auto``: the latest good checkpoint under root, if any; ``null``/``none``: start fresh
    (refused if root already holds checkpoints); anything else: that checkpoint folder, which
    must be complete. A checkpoint to resume from must match its manifest's hashes."""
    if is_fresh(resume):
        check_fresh_start(root, key)
        return None
    path = latest(root) if is_latest(resume) else Path(resume)
    if path is None:
        return None
    if not is_complete(path):
        raise CheckpointError(f"{key}={resume}: not a complete umerl checkpoint "
                              f"(no valid {MANIFEST})")
    check_hashes(path)
    return path


def prune(root: str | Path, keep_last: int, written: int) -> list[Path]:
    """Delete complete checkpoints older than the one just written (step ``written``, always
    kept) beyond the newest ``keep_last`` (that one included). Higher steps are not this run's
    history (an explicit resume from an earlier step): they are left alone."""
    root = Path(root)
    steps = sorted(p for p in root.glob("step_*") if _STEP_DIR.match(p.name)
                   and int(p.name[5:]) < written and is_complete(p))
    doomed = steps[:max(0, len(steps) - (keep_last - 1))] if keep_last > 0 else []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
