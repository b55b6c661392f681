"""OmegaConf recipes: a YAML file, checked against the schema, with ``key=value`` overrides.

The schema is the set of keys in ``umerl/defaults.yaml``; a recipe or an override naming any
other key is an error that names it (and the file it came from). An empty mapping in the
defaults is free-form: it accepts any keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DEFAULTS_FILE = Path(__file__).resolve().parent / "defaults.yaml"


class ConfigError(ValueError):
    """A recipe or an override is invalid; the message names the key and its source."""


def load_recipe(path: str | Path | None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults, then the recipe file, then command-line overrides; unknown keys are errors."""
    config = _load_yaml(DEFAULTS_FILE)
    if path is not None:
        recipe = _load_yaml(Path(path))
        _check_known(config, recipe, str(path))
        config = OmegaConf.merge(config, recipe)
    if overrides:
        parsed = _parse_overrides(overrides)
        _check_known(config, parsed, "command line")
        config = OmegaConf.merge(config, parsed)
    OmegaConf.set_readonly(config, False)
    return config


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        loaded = OmegaConf.load(path)
    except (OmegaConfBaseException, ValueError) as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    except Exception as err:  # yaml.YAMLError carries the line and column
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: a recipe must be a mapping at the top level")
    return loaded


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' must look like key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid override: {err}") from None


def _check_known(schema: Any, update: Any, source: str, prefix: str = "") -> None:
    """Every key of ``update`` must exist in ``schema`` (free-form mappings excepted)."""
    if not isinstance(update, DictConfig) or not isinstance(schema, DictConfig):
        return
    if _is_free_form(schema):
        return
    for key in update.keys():
        name = f"{prefix}{key}"
        if key not in schema:
            known = ", ".join(sorted(str(k) for k in schema.keys()))
            raise ConfigError(f"{source}: unknown config key '{name}' (known here: {known})")
        child = schema._get_node(key)
        if isinstance(child, ListConfig):
            continue
        _check_known(schema[key], update._get_node(key), source, f"{name}.")


def _is_free_form(node: DictConfig) -> bool:
    """An empty mapping in the defaults takes user keys (e.g. a reward's kwargs)."""
    return len(node) == 0


def to_container(config: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
