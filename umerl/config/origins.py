"""Where each recipe value came from, and the error that names it.

Shared by the recipe loader (``umerl.config.recipe``), the schema (``umerl.config.schema``)
and every check that reports a bad value (preflight, cluster, data), so none of them
imports another for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


class ConfigError(ValueError):
    """A recipe or an override is invalid; the message names the key and its source."""


class Sources:
    """Where each key's value came from: ``file:line``, ``command line`` or a CLI option."""

    def __init__(self) -> None:
        self._where: dict[str, str] = {}
        # The recipe file, when there is one: plug-in reward files are also looked for beside it.
        self.recipe: Path | None = None

    @property
    def recipe_dir(self) -> Path | None:
        return self.recipe.resolve().parent if self.recipe is not None else None

    def record(self, mapping: Mapping[str, str]) -> None:
        """A later source replaces a value and everything under it (a list replaces a list);
        a mapping merges (a key ending in ``.`` is a mapping: its children keep their sources)."""
        for key, where in mapping.items():
            if key.endswith("."):
                self._where[key[:-1]] = where
                continue
            for old in [k for k in self._where if k.startswith((f"{key}.", f"{key}["))]:
                del self._where[old]
            self._where[key] = where

    def of(self, key: str) -> str:
        """The source of ``key`` (a dotted path, list items as ``key[i]``), or of its parent."""
        probe = key
        while probe:
            if probe in self._where:
                return self._where[probe]
            cut = max(probe.rfind("."), probe.rfind("["))
            probe = probe[:cut] if cut > 0 else ""
        return "defaults"

    def describe(self, key: str) -> str:
        return f"'{key}' (from {self.of(key)})"
