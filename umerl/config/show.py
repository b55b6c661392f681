"""Printing recipes: the merged config with each key's source (``umerl config show``) and the
bundled recipes with their purpose (``umerl recipes``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig

from umerl.config.origins import Sources
from umerl.config.recipe import RECIPES_DIR


def flat_items(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted.key, value)`` for every leaf; a list of mappings as ``key[i]`` items (each
    rewards entry has a line of its own), any other list as one value."""
    if isinstance(node, DictConfig):
        if len(node) == 0:
            return [(prefix, {})]
        items: list[tuple[str, Any]] = []
        for key in node.keys():
            items += flat_items(node._get_node(key), f"{prefix}.{key}" if prefix else str(key))
        return items
    if isinstance(node, ListConfig):
        if len(node) and all(isinstance(n, DictConfig) for n in node):
            return [(f"{prefix}[{i}]", _plain(n)) for i, n in enumerate(node)]
        return [(prefix, _plain(node))]
    return [(prefix, node._value() if hasattr(node, "_value") else node)]


def _plain(node: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


def config_lines(cfg: DictConfig, sources: Sources) -> list[str]:
    """One line per key: ``key: value  # source`` (``file:line``, an override or an option)."""
    items = [(key, json.dumps(value)) for key, value in flat_items(cfg)]
    width = max(len(k) + len(v) + 2 for k, v in items)
    return [f"{f'{key}: {value}':<{width}}  # {sources.of(key)}" for key, value in items]


def recipe_purpose(path: Path) -> str:
    """The first sentence of a recipe's header comment."""
    words: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text:
            break
        words.append(text)
        joined = " ".join(words)
        if ". " in joined or joined.endswith("."):
            return joined.split(". ")[0].rstrip(".") + "."
    return " ".join(words)


def bundled_recipes(folder: Path = RECIPES_DIR) -> list[tuple[str, str]]:
    """``(path, purpose)`` of every runnable recipe (not base/). The path is one the RECIPE
    argument takes from the working directory: relative below it, else absolute."""
    return [(_as_argument(p), recipe_purpose(p)) for p in sorted(folder.glob("*.yaml"))]


def _as_argument(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:  # run from elsewhere (another project, /tmp): recipes/x.yaml is no file
        return str(path)
