"""Everything a recipe needs from the world, checked before Ray starts.

``umerl.config.schema`` checks the config alone (types, ranges, rules between keys); this module
checks what the config points at: ``output_dir`` is writable (the driver checks it first: the
run's lock goes there), the starting checkpoint and any explicit ``resume`` checkpoint are
loadable (a resume's files match their hashes), a fresh start (``resume: null``) does not write
among another run's checkpoints, every reward loads (built-in, module or file, with its kwargs),
every data file reads cleanly (each bad line a ``DataError`` naming ``file:line``, prompts within
``data.max_prompt_tokens``), each stage's batches can be filled, and every evaluation task
resolves. Errors name the key and where its value came from.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from umerl.config.origins import ConfigError, Sources
from umerl.data.formats import read_eval_queries, read_rl_pairs, read_sft_pairs
from umerl.train import checkpoint as ckpt
from umerl.train.sft_data import load_pair_datasets


def preflight(cfg: DictConfig, model: str, sources: Sources | None = None
              ) -> dict[str, dict[str, list]]:
    """Check ``cfg`` (with absolute paths and a resolved ``data.max_prompt_tokens``) and the
    starting checkpoint ``model``; raises ``ConfigError``, ``DataError`` or ``CheckpointError``.
    Returns the pair datasets it read, by stage (``sft``, ``rl``), for the driver to reuse."""
    sources = sources or Sources()
    start = time.perf_counter()
    check_checkpoint(model, sources.describe("model.path"))
    for stage in ("sft", "rl"):
        if cfg[stage].enabled:
            check_resume(cfg, stage, sources)
    if cfg.rl.enabled:
        check_rewards(cfg.rewards, sources)
    encoder = _encoder(model, cfg.model.max_pixels)
    limit = int(cfg.data.max_prompt_tokens)
    skip = bool(cfg.data.skip_invalid)
    loaded: dict[str, dict[str, list]] = {}
    if cfg.sft.enabled:
        loaded["sft"] = load_pair_datasets(list(cfg.sft.data), read_sft_pairs, skip, encoder,
                                           limit, key="sft.data", sources=sources)
        _check_batches(loaded["sft"], int(cfg.sft.micro_batch_size) * int(cfg.sft.num_workers),
                       "sft.micro_batch_size x sft.num_workers", sources)
    if cfg.rl.enabled:
        loaded["rl"] = load_pair_datasets(list(cfg.rl.data), read_rl_pairs, skip, encoder,
                                          limit, key="rl.data", sources=sources)
        _check_batches(loaded["rl"], int(cfg.rl.pairs_per_step), "rl.pairs_per_step", sources)
    if cfg.eval.enabled:
        check_eval_tasks(cfg, encoder, sources)
    print(f"[preflight] recipe, checkpoint, rewards and data checked in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    return loaded


def rewards_notice(cfg: DictConfig) -> str | None:
    """A line naming the rewards an RL run uses when its list leaves out a default reward (a
    ``rewards=[...]`` override replaces the whole list); None otherwise."""
    from rewards import DEFAULT_REWARDS

    if not cfg.rl.enabled:
        return None
    entries = [e if isinstance(e, str) else dict(e) for e in cfg.rewards]
    names = [e if isinstance(e, str) else str(e.get("name")) for e in entries]
    missing = [d["name"] for d in DEFAULT_REWARDS if d["name"] not in names]
    if not missing:
        return None
    used = ", ".join(name if isinstance(e, str) else f"{name} (weight {e.get('weight', 1.0):g})"
                     for name, e in zip(names, entries))
    return (f"[rewards] this run uses: {used}; not the default {' + '.join(missing)} (a rewards "
            "list replaces the defaults: list them too to keep them)")


def check_output_dir(path: str, described: str) -> None:
    """``path`` can be created and written to (a probe file is written and removed)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".umerl-write-probe-"):
            pass
    except OSError as err:
        raise ConfigError(f"{described}: cannot write to {path}: {err.strerror or err}") from None


def check_checkpoint(path: str, described: str, resumable: bool = False) -> Path:
    try:
        return ckpt.verify(path, resumable)
    except ckpt.CheckpointError as err:
        raise ckpt.CheckpointError(f"{described}: {err}") from None


def check_resume(cfg: DictConfig, stage: str, sources: Sources) -> int | None:
    """An explicit ``<stage>.resume`` checkpoint is loadable and its files match their hashes;
    ``auto`` finds a checkpoint that records hashes, or none; a fresh start (null) finds no
    other run's checkpoints in the stage's checkpoint root. The checkpoint resumed from must
    have been written with this recipe's values of the keys that matter
    (``umerl.config.stored.MATTERS``) unless the key is ``force``. Returns its step (None:
    the stage starts fresh)."""
    resume, key = cfg[stage].resume, f"{stage}.resume"
    if not ckpt.is_fresh(resume) and not ckpt.is_latest(resume):
        found: Path | None = check_checkpoint(resume, sources.describe(key), resumable=True)
    else:
        root = Path(cfg.output_dir) / cfg[stage].output_subdir
        try:
            if ckpt.is_fresh(resume):
                ckpt.check_fresh_start(root, key)
            elif (found := ckpt.latest(root)) is not None:
                ckpt.check_resumable(found)  # its hashes are compared when the workers resume
        except ckpt.CheckpointError as err:
            raise ConfigError(f"{sources.describe(key)}: {err}") from None
        if ckpt.is_fresh(resume) or found is None:
            return None
    if str(resume).lower() != "force":
        check_same_recipe(cfg, stage, found, sources)
    return ckpt.stored_step(found)


def check_same_recipe(cfg: DictConfig, stage: str, found: Path, sources: Sources) -> None:
    from umerl.config.recipe import to_container
    from umerl.config.stored import differences

    stored = ckpt.stored_recipe(found)
    changed = differences(stored, to_container(cfg), stage) if stored else []
    if changed:
        key = f"{stage}.resume"
        raise ConfigError(
            f"{sources.describe(key)}: {found} was written by a run with another recipe; "
            f"it differs in: {'; '.join(changed)}. To train with the new values from scratch, "
            f"use another output_dir (or {key}=null in an empty one); to continue this "
            f"checkpoint with them anyway, {key}=force")


def finished_stages(cfg: DictConfig, sources: Sources) -> list[str] | None:
    """When every enabled training stage's checkpoint is at or past its ``max_steps``: one line
    per stage saying so (the run has nothing to do). Else None."""
    lines = []
    for stage in ("sft", "rl"):
        if not cfg[stage].enabled:
            continue
        resume = cfg[stage].resume
        if ckpt.is_fresh(resume) or ckpt.is_latest(resume):
            step = check_resume(cfg, stage, sources)  # cheap: reads the manifest only
        else:  # an explicit checkpoint: its hashes are compared by the preflight, if it runs
            step = ckpt.stored_step(resume)
            if step is not None:
                check_same_recipe(cfg, stage, Path(resume), sources)
        if step is None or step < int(cfg[stage].max_steps):
            return None
        lines.append(f"{stage}: its checkpoint is at step {step}, {stage}.max_steps is "
                     f"{cfg[stage].max_steps} (from {sources.of(f'{stage}.max_steps')})")
    return lines or None


def finished_checkpoint(cfg: DictConfig, stage: str) -> Path | None:
    """The stage's newest checkpoint when a resume from it (``auto``/``force``) would train
    nothing: its step is at or past ``<stage>.max_steps``. The driver then starts no workers
    for the stage and goes on from that checkpoint (the preflight has checked it)."""
    if not cfg[stage].enabled or not ckpt.is_latest(cfg[stage].resume):
        return None
    found = ckpt.latest(Path(cfg.output_dir) / cfg[stage].output_subdir)
    step = None if found is None else ckpt.stored_step(found)
    return found if step is not None and step >= int(cfg[stage].max_steps) else None


def check_rewards(entries: Any, sources: Sources) -> Any:
    """Import every reward as the learners will (the same loader; a relative file path from the
    working directory, then from the recipe's folder); returns the ``RewardSet``."""
    from rewards import RewardError, rewards_from_config

    try:
        return rewards_from_config(entries, base_dir=sources.recipe_dir or os.getcwd())
    except RewardError as err:
        where = sources.of(err.entry or "rewards")
        raise ConfigError(f"{err} (from {where})") from None


def check_eval_tasks(cfg: DictConfig, encoder: Any, sources: Sources) -> None:
    from umerl.data.tasks import recipe_tasks

    try:
        specs = recipe_tasks(list(cfg.eval.tasks), cfg.eval.split, cfg.data)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"{sources.describe('eval.tasks')}: {err}") from None
    check_eval_specs(specs, encoder, cfg)


def check_eval_specs(specs: list, encoder: Any, cfg: DictConfig) -> None:
    """Every task file reads cleanly and every prompt fits ``data.max_prompt_tokens``."""
    from umerl.model.inputs import check_prompt_lengths

    for spec in specs:
        items, _ = read_eval_queries(spec.path, skip_invalid=bool(cfg.data.skip_invalid))
        check_prompt_lengths(encoder, items, int(cfg.data.max_prompt_tokens),
                             bool(cfg.data.skip_invalid))


def _check_batches(datasets: dict[str, list], batch: int, keys: str, sources: Sources) -> None:
    from umerl.train.sft_data import ContrastiveBatcher

    try:
        ContrastiveBatcher(datasets, batch)
    except ValueError as err:
        first = keys.split(" ")[0]
        raise ConfigError(f"{keys} = {batch} (from {sources.of(first)}): {err}; each batch is "
                          "drawn from one sub-dataset") from None


def _encoder(model: str, max_pixels: int | None) -> Any:
    from umerl.model.loading import load_encoder

    return load_encoder(ckpt.verify(model), max_pixels)
