"""Recipes: defaults + file + overrides; unknown keys and bad values are named."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import DictConfig

from umerl.config.origins import ConfigError
from umerl.config.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent


def leaf_keys(config: DictConfig, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf of a config (lists count as leaves)."""
    keys = []
    for key in config.keys():
        name = f"{prefix}{key}"
        node = config._get_node(key)
        if isinstance(node, DictConfig) and len(node) > 0:
            keys.extend(leaf_keys(node, f"{name}."))
        else:
            keys.append(name)
    return keys


def test_every_shipped_recipe_loads_and_names_its_command() -> None:
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        cfg = load_recipe(recipe)
        assert cfg.seed is not None
        header = recipe.read_text().splitlines()[:6]
        assert any("umerl" in line or "make run" in line for line in header), recipe


def test_overrides_win_over_recipe_and_defaults() -> None:
    cfg = load_recipe(REPO / "recipes" / "cpu_tiny.yaml",
                      ["eval.pass_k=[1,8]", "model.tiny.family=qwen3_vl", "seed=7"])
    assert list(cfg.eval.pass_k) == [1, 8]
    assert cfg.model.tiny.family == "qwen3_vl" and cfg.seed == 7
    assert cfg.eval.split == "test"  # untouched keys keep the recipe's / defaults' values


def test_unknown_key_in_a_recipe_names_key_and_file(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("eval:\n  passk: [1]\n")
    with pytest.raises(ConfigError, match=r"r.yaml:2: unknown config key 'eval.passk'"):
        load_recipe(recipe)


def test_unknown_override_is_named() -> None:
    with pytest.raises(ConfigError, match=r"command line: unknown config key 'model.tinyy'"):
        load_recipe(None, ["model.tinyy.family=x"])
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_recipe(None, ["eval.split"])


def test_broken_yaml_is_named(tmp_path: Path) -> None:
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("eval: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: invalid YAML"):
        load_recipe(recipe)
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_schema_covers_exactly_the_keys_of_the_defaults() -> None:
    from umerl.config.recipe import defaults
    from umerl.config.schema import SCHEMA

    assert set(leaf_keys(defaults())) == set(SCHEMA)


def test_every_default_value_passes_its_own_rule() -> None:
    from omegaconf import OmegaConf

    from umerl.config.recipe import defaults
    from umerl.config.schema import SCHEMA

    base = defaults()
    for key, rule in SCHEMA.items():
        assert rule.check(OmegaConf.select(base, key)) is None, key


def test_sources_name_recipe_lines_and_overrides(tmp_path: Path) -> None:
    from umerl.config.recipe import load_recipe_with_sources

    recipe = tmp_path / "r.yaml"
    recipe.write_text("seed: 3\nrl:\n  group_size: 4\nrewards:\n  - {name: format}\n")
    _, sources = load_recipe_with_sources(recipe, ["rl.lr=2e-6"], {"seed": "option --seed"})
    assert sources.of("rl.group_size") == f"{recipe}:3"
    assert sources.of("rewards[0]") == f"{recipe}:5"
    assert sources.of("rl.lr") == "command line 'rl.lr=2e-6'"
    assert sources.of("rl.kl_beta").startswith("defaults ") and "defaults.yaml:" in \
        sources.of("rl.kl_beta")
    _, sources = load_recipe_with_sources(recipe, ["seed=5"], {"seed": "option --seed"})
    assert sources.of("seed") == "option --seed"


def test_a_later_list_replaces_the_sources_of_the_earlier_one(tmp_path: Path) -> None:
    from umerl.config.recipe import load_recipe_with_sources

    recipe = tmp_path / "r.yaml"
    recipe.write_text("rewards:\n  - {name: format}\n  - {name: embedding}\n")
    _, sources = load_recipe_with_sources(recipe, ["rewards=[{name: rank}]"])
    assert sources.of("rewards[0]") == "command line 'rewards=[{name: rank}]'"
    assert sources.of("rewards[1]") == "command line 'rewards=[{name: rank}]'"


@pytest.mark.parametrize("changes, named", [
    ({"rl.pairs_per_step": 3}, r"'rl\.pairs_per_step' .* must be a multiple of"),
    ({"learner.micro_batch_size": 5}, r"'learner\.micro_batch_size' .* = 5 must divide the 16"),
    ({"learner.single_forward": True, "learner.zero_stage": 3}, "learner.single_forward"),
    ({"learner.shared_prompt": True, "learner.gradient_checkpointing": True},
     "learner.shared_prompt"),
])
def test_check_learner_applies_the_learner_rules_whatever_rl_enabled(changes, named) -> None:
    """The rules a Learner runs on a config that load_recipe never checked (tests build one
    with rl.enabled false): the schema's own functions, so the same errors."""
    from omegaconf import OmegaConf

    from umerl.config.schema import check_learner, validate

    cfg = load_recipe(None, ["learner.num_workers=2", "rl.group_size=8"])
    check_learner(cfg)
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value)
    assert not cfg.rl.enabled
    with pytest.raises(ConfigError, match=named):
        check_learner(cfg)
    cfg.rl.enabled = True
    with pytest.raises(ConfigError, match=named):
        validate(cfg)


def test_rl_sizes_are_only_checked_when_the_rl_stage_runs() -> None:
    from umerl.config.schema import validate

    cfg = load_recipe(None, ["rl.pairs_per_step=3", "learner.num_workers=2"])  # rl off: fine
    cfg.rl.enabled = True
    with pytest.raises(ConfigError, match="must be a multiple of"):
        validate(cfg)


def test_shipped_recipes_pass_the_schema_and_their_rules() -> None:
    """Each paper recipe also satisfies the rules between keys (validated on load)."""
    from umerl.runtime.devices import ENGINES, engine_for

    for recipe in sorted((REPO / "recipes").glob("*.yaml")):
        cfg = load_recipe(recipe)
        assert engine_for(cfg.rollout.engine, cfg.rollout.gpus_per_worker) in ENGINES, recipe


def test_the_grpo_knobs_are_checked() -> None:
    recipe = REPO / "recipes" / "cpu_tiny.yaml"
    cfg = load_recipe(recipe, ["rl.loss_agg_mode=token-mean", "rl.norm_adv_by_std=false"])
    assert cfg.rl.loss_agg_mode == "token-mean" and cfg.rl.norm_adv_by_std is False
    with pytest.raises(ConfigError, match=r"'rl.loss_agg_mode' \(from command line.*token-sum"):
        load_recipe(recipe, ["rl.loss_agg_mode=token-sum"])
    with pytest.raises(ConfigError, match=r"'rl.norm_adv_by_std'"):
        load_recipe(recipe, ["rl.norm_adv_by_std=3"])


@pytest.mark.parametrize("overrides", [
    ["rollout.engine=vllm", "rollout.gpus_per_worker=0.5"],
    ["rollout.engine=auto", "rollout.gpus_per_worker=0.25"],
    ["rollout.engine=vllm", "rollout.gpus_per_worker=1.5"],
])
def test_vllm_rollouts_on_a_gpu_share_are_rejected(overrides: list[str]) -> None:
    with pytest.raises(ConfigError, match=r"'rollout\.gpus_per_worker' .* is not a whole number "
                                          r"of GPUs, but 'rollout\.engine' .* resolves to vllm"):
        load_recipe(REPO / "recipes" / "cpu_tiny.yaml", overrides)


def test_transformers_rollouts_may_share_a_gpu() -> None:
    cfg = load_recipe(REPO / "recipes" / "cpu_tiny.yaml",
                      ["rollout.engine=transformers", "rollout.gpus_per_worker=0.5"])
    assert cfg.rollout.gpus_per_worker == 0.5
