"""OmegaConf recipes: the defaults file, then a recipe, then ``key=value`` overrides, checked.

``umerl/config/defaults.yaml`` holds every key and its default (the one source of defaults);
``umerl/config/schema.py`` holds each key's type and range and the rules between keys. A recipe or
an override naming an unknown key, or giving a value of the wrong type or out of range, is a
``ConfigError`` that names the key, where its value came from (``file:line`` or the command line)
and what is allowed. An empty mapping in the defaults is free-form: it accepts any keys.

A recipe may start from others: ``include: [base/a.yaml, ...]`` (paths relative to the including
file's folder) merges those files first, in order, then the recipe's own keys over them; an
included file may include others. Every key keeps the ``file:line`` it came from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from umerl.config.origins import ConfigError, Sources

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
DEFAULTS_FILE = Path(__file__).resolve().parent / "defaults.yaml"


def load_recipe(path: str | Path | None, overrides: Sequence[str] = (),
                option_sources: Mapping[str, str] | None = None) -> DictConfig:
    """Defaults, then the recipe file, then overrides; unknown keys and bad values are errors.

    ``option_sources`` names, per override key, the CLI option that set it (``--batch-size``).
    """
    return load_recipe_with_sources(path, overrides, option_sources)[0]


def load_recipe_with_sources(
    path: str | Path | None, overrides: Sequence[str] = (),
    option_sources: Mapping[str, str] | None = None,
) -> tuple[DictConfig, Sources]:
    from umerl.config.schema import validate

    sources = Sources()
    config = _load_yaml(DEFAULTS_FILE)
    sources.record(yaml_lines(DEFAULTS_FILE, "defaults "))
    if path is not None:
        sources.recipe = Path(path)
        config = _merge_recipe(config, Path(path), sources, ())
    if overrides:
        parsed = _parse_overrides(overrides)
        named = dict(option_sources or {})
        _check_known(config, parsed, lambda key: named.get(key, "command line"))
        config = OmegaConf.merge(config, parsed)
        sources.record({item.split("=", 1)[0].strip():
                        named.get(item.split("=", 1)[0].strip(), f"command line '{item}'")
                        for item in overrides})
    OmegaConf.set_readonly(config, False)
    validate(config, sources)
    return config, sources


INCLUDE = "include"


def _merge_recipe(config: DictConfig, path: Path, sources: Sources,
                  chain: tuple[Path, ...]) -> DictConfig:
    """``config`` with the recipe at ``path`` merged over it, its includes first."""
    recipe = _load_yaml(path)
    lines = {k: v for k, v in yaml_lines(path).items() if not k.startswith(INCLUDE)}
    for included in _includes(recipe, path, chain):
        config = _merge_recipe(config, included, sources, (*chain, path.resolve()))
    recipe.pop(INCLUDE, None)
    _check_known(config, recipe, lambda key: lines.get(key) or lines.get(f"{key}.", str(path)))
    sources.record(lines)
    return OmegaConf.merge(config, recipe)


def _includes(recipe: DictConfig, path: Path, chain: tuple[Path, ...]) -> list[Path]:
    """The files ``include`` names (one path or a list), relative to ``path``'s folder."""
    if INCLUDE not in recipe:
        return []
    value = recipe[INCLUDE]
    names = [value] if isinstance(value, str) else list(value) if OmegaConf.is_list(value) else None
    if not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{path}: '{INCLUDE}' must be a file name or a list of file names")
    found = []
    for name in names:
        target = path.parent / name  # shown as written (relative stays relative)
        if target.resolve() in (*chain, path.resolve()):
            raise ConfigError(f"{path}: '{INCLUDE}: {name}' includes itself (a cycle)")
        if not target.is_file():
            raise ConfigError(f"{path}: '{INCLUDE}: {name}': no such file ({target})")
        found.append(target)
    return found


def yaml_lines(path: Path, prefix: str = "") -> dict[str, str]:
    """``dotted.key -> "path:line"`` for every key (and list item) of a YAML mapping file;
    a key whose value is a mapping appears as ``key.`` (merged, not replaced, by a later file)."""
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    lines: dict[str, str] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                child = f"{key}.{key_node.value}" if key else str(key_node.value)
                mark = "." if isinstance(value_node, yaml.MappingNode) else ""
                lines[child + mark] = f"{prefix}{path}:{key_node.start_mark.line + 1}"
                walk(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[f"{key}[{i}]"] = f"{prefix}{path}:{item.start_mark.line + 1}"
                walk(item, f"{key}[{i}]")

    walk(root, "")
    return lines


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        loaded = OmegaConf.load(path)
    except (OmegaConfBaseException, ValueError) as err:
        raise ConfigError(f"{path}: invalid YAML: {_one_line(err)}") from None
    except Exception as err:  # yaml.YAMLError carries the line and column
        raise ConfigError(f"{path}: invalid YAML: {_one_line(err)}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: a recipe must be a mapping at the top level")
    return loaded


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' must look like key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid override: {_one_line(err)}") from None


def _check_known(schema: Any, update: Any, where: Callable[[str], str], prefix: str = "") -> None:
    """Every key of ``update`` must exist in ``schema`` (free-form mappings excepted);
    ``where(key)`` names the place that set it."""
    if not isinstance(update, DictConfig) or not isinstance(schema, DictConfig):
        return
    if _is_free_form(schema):
        return
    for key in update.keys():
        name = f"{prefix}{key}"
        if key not in schema:
            known = ", ".join(sorted(str(k) for k in schema.keys()))
            raise ConfigError(f"{where(name)}: unknown config key '{name}' (known here: {known})")
        child = schema._get_node(key)
        if isinstance(child, ListConfig):
            continue
        given = update._get_node(key)
        if isinstance(child, DictConfig) and isinstance(given, ListConfig):
            raise ConfigError(f"{where(name)}: '{name}' expected a mapping, got a list")
        _check_known(schema[key], given, where, f"{name}.")


def _is_free_form(node: DictConfig) -> bool:
    """An empty mapping in the defaults takes user keys (e.g. a reward's kwargs)."""
    return len(node) == 0


def defaults() -> DictConfig:
    """The defaults file alone (CLI options take their defaults from here)."""
    return _load_yaml(DEFAULTS_FILE)


def to_container(config: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
