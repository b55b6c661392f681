"""Find evaluation tasks: bundled names, benchmark manifests (tasks.json) or plain JSONL files."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUNDLED = "umerl-mini"
POOLS = ("local", "global")
MODALITIES = ("image", "video", "visdoc", "text")
METRICS = ("hit@1", "ndcg_linear@5")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    path: Path  # the split's MMEB-format JSONL
    modality: str = "image"
    pool: str = "local"
    metric: str = "hit@1"


def default_benchmark_dir(seed: int = 0, rl_extra: dict[str, int] | None = None) -> Path:
    base = os.environ.get("UMERL_DATA_DIR") or Path.home() / ".cache" / "umerl"
    from umerl.data.benchmark.build import MANIFEST_VERSION, check_rl_extra

    # The builder's version and the build's options are part of the folder: a newer builder
    # never reuses an old build, nor a build with an extra RL pool a default one.
    extra = "".join(f"-rl+{task}{n}" for task, n in sorted(check_rl_extra(rl_extra).items()))
    return Path(base) / f"{BUNDLED}-v{MANIFEST_VERSION}-seed{seed}{extra}"


def ensure_benchmark(directory: str | Path | None = None, seed: int = 0,
                     rl_extra: dict[str, int] | None = None) -> Path:
    """The bundled benchmark's tasks.json, built on first use (atomically: a crash mid-build
    leaves no half-written benchmark behind). ``rl_extra``: ``build_benchmark``'s extra RL
    queries; an existing build made with other extras is an error, not silently reused."""
    from umerl.data.benchmark.build import check_rl_extra

    extra = check_rl_extra(rl_extra)
    target = Path(directory) if directory else default_benchmark_dir(seed, extra)
    manifest = target / "tasks.json"
    if manifest.is_file():
        _check_build(target, extra)
        return manifest
    from umerl.data.benchmark import build_benchmark

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        print(f"building the bundled benchmark into {target} (once) ...", flush=True)
        build_benchmark(staging, seed=seed, rl_extra=extra)
        if target.exists():  # an empty or broken leftover from an older run
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _check_build(target: Path, rl_extra: dict[str, int]) -> None:
    """A build asked for extra RL pools is reused only if it was made with them (its BUILD.json
    says). Asked for none, any build is taken as given: the extras change the rl split only."""
    if not rl_extra:
        return
    try:
        info = json.loads((target / "BUILD.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        info = {}
    built = dict(info.get("rl_extra", {}))
    if built != rl_extra:
        raise ValueError(f"{target} holds a benchmark built with rl_extra {built}, not "
                         f"{rl_extra} (data.benchmark_rl_extra): point data.benchmark_dir at "
                         "another folder, or null for the default")


def read_manifest(manifest: Path, split: str) -> list[TaskSpec]:
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        entries = data["tasks"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{manifest}: not a valid task manifest ({err})") from None
    specs = []
    for i, entry in enumerate(entries):
        where = f"{manifest}: tasks[{i}]"
        splits = entry.get("splits", {})
        if split not in splits:
            raise ValueError(f"{where}: no '{split}' split (has: {', '.join(splits)})")
        spec = TaskSpec(
            name=entry["name"],
            path=manifest.parent / splits[split],
            modality=entry.get("modality", "image"),
            pool=entry.get("pool", "local"),
            metric=entry.get("metric", "hit@1"),
        )
        _validate(spec, where)
        specs.append(spec)
    return specs


def _validate(spec: TaskSpec, where: str) -> None:
    if spec.pool not in POOLS:
        raise ValueError(f"{where}: pool '{spec.pool}' must be one of {POOLS}")
    if spec.modality not in MODALITIES:
        raise ValueError(f"{where}: modality '{spec.modality}' must be one of {MODALITIES}")
    if spec.metric not in METRICS:
        raise ValueError(f"{where}: metric '{spec.metric}' must be one of {METRICS}")


def resolve_tasks(
    names: list[str],
    split: str = "test",
    benchmark_dir: str | Path | None = None,
    benchmark_seed: int = 0,
    pool: str = "local",
    modality: str = "image",
    rl_extra: dict[str, int] | None = None,
) -> list[TaskSpec]:
    """Each name is a benchmark name, a bundled task name, a tasks.json or a task JSONL file
    (bundled names come from ``ensure_benchmark(benchmark_dir, benchmark_seed, rl_extra)``)."""
    specs: list[TaskSpec] = []
    bundled: list[TaskSpec] | None = None
    for name in names:
        path = Path(name)
        if path.suffix == ".jsonl":
            if not path.is_file():
                raise FileNotFoundError(f"task file not found: {path}")
            spec = TaskSpec(path.stem, path, modality=modality, pool=pool)
            _validate(spec, str(path))
            specs.append(spec)
        elif path.name == "tasks.json" or path.is_dir():
            manifest = path if path.name == "tasks.json" else path / "tasks.json"
            specs.extend(read_manifest(manifest, split))
        else:
            if bundled is None:
                bundled = read_manifest(ensure_benchmark(benchmark_dir, benchmark_seed, rl_extra),
                                        split)
            specs.extend(_pick_bundled(name, bundled))
    return specs


def recipe_tasks(names: list[str], split: str, data: Any, pool: str = "local",
                 modality: str = "image") -> list[TaskSpec]:
    """``resolve_tasks`` with the bundled benchmark a recipe's ``data`` section names
    (``benchmark_dir``, ``benchmark_seed``, ``benchmark_rl_extra``): the one place that reads
    those keys for task names, so evaluation, preflight and the CLI see the same build. The
    extra RL pools change the rl split only: a folder given by ``benchmark_dir`` is read for
    any other split as it is, whatever pools it was built with."""
    extra = dict(data.benchmark_rl_extra)
    if data.benchmark_dir and split != "rl":
        extra = {}
    return resolve_tasks(names, split, data.benchmark_dir, int(data.benchmark_seed), pool,
                         modality, extra)


def _pick_bundled(name: str, bundled: list[TaskSpec]) -> list[TaskSpec]:
    if name == BUNDLED:
        return list(bundled)
    short = name.removeprefix(f"{BUNDLED}/")
    chosen = [spec for spec in bundled if spec.name == short]
    if not chosen:
        known = ", ".join(spec.name for spec in bundled)
        raise ValueError(f"unknown task '{name}': not a file, and bundled tasks are: {known}")
    return chosen
