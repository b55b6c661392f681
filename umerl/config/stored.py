"""What a checkpoint's stored recipe (its manifest's ``recipe``) is used for.

A resume compares the keys that change what training computes (``MATTERS``) with the current
recipe and refuses on a difference (``<stage>.resume=force`` continues anyway): continuing an
optimizer's state under another learning rate, data set or model is rarely what was meant.
``umerl eval`` and ``umerl serve`` read the run's decoding settings (``DECODING``) from it, so
a checkpoint evaluated by hand decodes as its run's own evaluations did.
"""

from __future__ import annotations

import json
from typing import Any

# Per stage, the keys whose change makes a resumed run another experiment. Pool sizes, save
# and log cadence, max_steps, timeouts and evaluation settings may change between resumes.
_MODEL = ["model.path", "model.max_pixels", "model.tiny", "seed"]
MATTERS = {
    "sft": [*_MODEL, "sft.data", "sft.lr", "sft.weight_decay", "sft.warmup_ratio",
            "sft.min_lr_ratio", "sft.micro_batch_size", "sft.num_workers",
            "sft.gradient_accumulation_steps", "sft.logit_scale", "sft.loss_weights",
            "sft.train", "sft.zero_stage"],
    "rl": [*_MODEL, "rl.data", "rl.lr", "rl.weight_decay", "rl.warmup_ratio",
           "rl.pairs_per_step", "rl.group_size", "rl.max_new_tokens", "rl.temperature",
           "rl.top_k", "rl.top_p", "rl.adv_eps", "rl.norm_adv_by_std", "rl.loss_agg_mode",
           "rl.clip_eps_low", "rl.clip_eps_high", "rl.kl_beta", "rl.entropy_coeff",
           "rl.max_completion_length",
           "rl.max_staleness", "rl.mask_shared_targets", "rewards", "learner.train",
           "learner.zero_stage"],
}
# The settings a checkpoint's evaluation decodes with: (key in the stored recipe, key set).
DECODING = [("eval.max_new_tokens", "eval.max_new_tokens"),
            ("eval.temperature", "eval.temperature"), ("eval.top_k", "eval.top_k"),
            ("model.dtype", "model.dtype")]
# umerl serve: its gen budget is the one the run evaluated with (serve.max_new_tokens).
SERVE_DECODING = [("eval.max_new_tokens", "serve.max_new_tokens"),
                  ("eval.temperature", "serve.temperature"), ("eval.top_k", "serve.top_k"),
                  ("model.dtype", "model.dtype")]
# umerl eval / route fit: bundled task names resolve to the benchmark build the run used.
BENCHMARK = [("data.benchmark_seed", "data.benchmark_seed"),
             ("data.benchmark_rl_extra", "data.benchmark_rl_extra")]
_MISSING = object()


def select(recipe: dict[str, Any], key: str) -> Any:
    node: Any = recipe
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def differences(stored: dict[str, Any], current: dict[str, Any], stage: str) -> list[str]:
    """``key: checkpoint <old>, now <new>`` for each key of ``MATTERS[stage]`` that differs
    (a key the stored recipe lacks, from an older umerl, is not compared)."""
    found = []
    for key in MATTERS[stage]:
        old, new = select(stored, key), select(current, key)
        if old is not _MISSING and old != new:
            found.append(f"{key}: checkpoint {json.dumps(old)}, now {json.dumps(new)}")
    return found


def decoding_overrides(recipe: dict[str, Any], pairs: list[tuple[str, str]]) -> list[str]:
    """``key=value`` overrides that set each decoding key to the stored recipe's value."""
    out = []
    for stored_key, key in pairs:
        value = select(recipe, stored_key)
        if value is not _MISSING and value is not None:
            out.append(f"{key}={json.dumps(value)}")
    return out


def decoding_from(stored: dict[str, Any] | None, checkpoint: str, recipe: str | None,
                  pairs: list[tuple[str, str]]) -> tuple[list[str], dict[str, str]]:
    """Overrides setting the decoding keys (``pairs``: ``DECODING`` for eval, ``SERVE_DECODING``
    for serve) as ``recipe`` has them (``--recipe``), else as ``stored``, the recipe stored in
    ``checkpoint``, has them (None for a checkpoint from before recipes were stored: no
    overrides); and their sources."""
    if recipe is not None:
        from umerl.config.recipe import load_recipe, to_container

        source, where = to_container(load_recipe(recipe)), f"--recipe {recipe}"
    else:
        source, where = stored, f"the recipe stored in {checkpoint}"
    if source is None:
        return [], {}
    overrides = decoding_overrides(source, pairs)
    return overrides, {item.split("=", 1)[0]: where for item in overrides}


def unstored_note(checkpoint: str, cfg: Any, pairs: list[tuple[str, str]]) -> str:
    """What ``umerl eval``/``serve`` print for a checkpoint that stores no run recipe (a model
    downloaded from the Hub, a run of an older umerl) and no ``--recipe``: the decoding
    settings they fall back on, which need not be those the checkpoint was evaluated with."""
    from omegaconf import OmegaConf

    values = ", ".join(f"{key} {OmegaConf.select(cfg, key)}" for _, key in pairs)
    return (f"[decoding] {checkpoint} stores no run recipe: decoding with {values} (umerl's "
            "defaults, then any options); --recipe RECIPE decodes as that recipe evaluates")
