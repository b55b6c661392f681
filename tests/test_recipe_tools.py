"""Composable recipes (``include:``), ``umerl config show``, ``umerl recipes``, ``--version``."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from umerl.cli import main
from umerl.config.origins import ConfigError
from umerl.config.recipe import (
    RECIPES_DIR,
    defaults,
    load_recipe,
    load_recipe_with_sources,
    to_container,
)

ROOT = RECIPES_DIR.parent
# Each bundled recipe's keys that differ from the defaults, saved from commit 50b71e2 (before
# the recipes shared recipes/base/): moving settings into included files changes none of them.
BEFORE = json.loads((Path(__file__).parent / "fixtures" / "recipes_merged_50b71e2.json")
                    .read_text(encoding="utf-8"))


def _flat(node: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            out |= _flat(value, name)
        else:
            out[name] = value
    return out


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_merged_recipes_are_unchanged_by_the_shared_bases(name: str) -> None:
    base = _flat(to_container(defaults()))
    merged = _flat(to_container(load_recipe(RECIPES_DIR / name)))
    assert {k: v for k, v in merged.items() if base.get(k, object()) != v} == BEFORE[name]


def test_the_gpu_recipes_take_the_paper_settings_from_one_file() -> None:
    cfg, sources = load_recipe_with_sources(RECIPES_DIR / "qwen2vl_7b_train.yaml")
    assert sources.of("rl.lr").startswith(str(RECIPES_DIR / "base" / "qwen2vl_grpo.yaml"))
    assert sources.of("sft.lr").startswith(str(RECIPES_DIR / "base" / "qwen2vl_sft.yaml"))
    assert sources.of("output_dir").startswith(str(RECIPES_DIR / "qwen2vl_7b_train.yaml"))
    gpu = [p for p in RECIPES_DIR.glob("qwen2vl_*.yaml")]
    assert gpu and all("include:" in p.read_text() for p in gpu)
    assert all("lr:" not in p.read_text() for p in gpu)  # the paper's rates live in base/ only


def test_include_merges_in_order_with_sources_and_refuses_cycles(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "a.yaml").write_text("seed: 1\nrl:\n  lr: 0.5\n  group_size: 4\n")
    (tmp_path / "base" / "b.yaml").write_text("include: a.yaml\nrl:\n  lr: 0.25\n")
    (tmp_path / "r.yaml").write_text("include: [base/b.yaml]\nrl:\n  group_size: 2\n")
    cfg, sources = load_recipe_with_sources(tmp_path / "r.yaml", ["seed=3"])
    assert (cfg.seed, cfg.rl.lr, cfg.rl.group_size) == (3, 0.25, 2)
    assert sources.of("rl.lr") == f"{tmp_path / 'base' / 'b.yaml'}:3"
    assert sources.of("rl.group_size") == f"{tmp_path / 'r.yaml'}:3"
    assert "include" not in cfg
    (tmp_path / "base" / "a.yaml").write_text("include: ../r.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(tmp_path / "r.yaml")
    (tmp_path / "r.yaml").write_text("include: nothere.yaml\n")
    with pytest.raises(ConfigError, match="nothere.yaml': no such file"):
        load_recipe(tmp_path / "r.yaml")
    (tmp_path / "r.yaml").write_text("include: [base/b.yaml]\nrl:\n  lrr: 1\n")
    (tmp_path / "base" / "a.yaml").write_text("seed: 1\n")
    with pytest.raises(ConfigError, match=r"r.yaml:3: unknown config key 'rl.lrr'"):
        load_recipe(tmp_path / "r.yaml")


def test_config_show_prints_each_key_with_its_source(capsys, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["config", "show", "recipes/qwen2vl_2b_grpo.yaml", "rl.lr=2e-6"]) == 0
    lines = {line.split(":", 1)[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["rl.lr"].split("#")[1].strip() == "command line 'rl.lr=2e-6'"
    assert lines["rl.lr"].startswith("rl.lr: 2e-06")
    assert lines["rl.group_size"].endswith("# recipes/base/qwen2vl_grpo.yaml:15")
    assert lines["learner.num_workers"].endswith("# recipes/qwen2vl_2b_grpo.yaml:38")
    assert "umerl/config/defaults.yaml:" in lines["rl.top_p"]
    assert lines["rewards[1]"].startswith('rewards[1]: {"name": "embedding", "weight": 1.0}')
    assert main(["config", "show", "recipes/cpu_tiny.yaml", "rl.nope=1"]) == 2


def test_recipes_lists_every_bundled_recipe_with_its_purpose(capsys) -> None:
    assert main(["recipes"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [r.split()[0] for r in rows] == [f"recipes/{p.name}"
                                           for p in sorted(RECIPES_DIR.glob("*.yaml"))]
    tiny = next(r for r in rows if r.startswith("recipes/cpu_tiny.yaml"))
    assert tiny.split(None, 1)[1] == ("The embedded default: the tiny offline Qwen2-VL model on "
                                      "the bundled umerl-mini benchmark.")
    assert all(len(r.split(None, 1)) == 2 and r.endswith(".") for r in rows)


def test_recipes_lists_paths_usable_from_the_working_directory(capsys, monkeypatch,
                                                               tmp_path: Path) -> None:
    """Run from another folder, each listed path is still a recipe file (was recipes/x.yaml,
    which named no file there)."""
    monkeypatch.chdir(tmp_path)
    assert main(["recipes"]) == 0
    paths = [Path(r.split()[0]) for r in capsys.readouterr().out.splitlines()]
    assert paths == sorted(RECIPES_DIR.glob("*.yaml"))
    monkeypatch.chdir(RECIPES_DIR.parent)
    assert main(["recipes"]) == 0
    assert capsys.readouterr().out.split()[0] == "recipes/cpu_tiny.yaml"


def test_version_is_the_package_version(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out.strip() == f"umerl {version}"
