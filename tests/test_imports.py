"""Imports run one way, folder by folder: no cycles between modules, and no arrow from a wing
of ``umerl/`` (or ``rollout/``, ``rewards/``) to one above it.

Every import counts, including those inside functions: a deferred import still ties the two
modules together, it only hides the cycle until run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("umerl", "rollout", "rewards")
WINGS = ("config", "runtime", "model", "data", "train", "eval", "serve")
SPINE = "umerl"  # cli, driver, rl, preflight, check, annotate, plan: they may use every wing
# What each wing may import besides itself, lowest layer first. The data formats and the model
# layer know nothing of Ray; rollout engines use the model layer; the learners use both and the
# rewards; evaluation and serving are applications over the model layer and its engines. Only
# the spine (the driver, the RL loop, the CLI) uses everything, and no wing imports the spine.
MAY_IMPORT: dict[str, set[str]] = {
    "umerl.data": set(),
    "umerl.runtime": set(),
    "umerl.model": {"umerl.data"},
    "umerl.config": {"umerl.runtime", "umerl.data"},
    "rewards": {"umerl.data"},
    "rollout": {"umerl.data", "umerl.model", "umerl.runtime"},
    "umerl.train": {"umerl.data", "umerl.model", "umerl.runtime", "umerl.config", "rewards",
                    "rollout"},
    "umerl.eval": {"umerl.data", "umerl.model", "umerl.runtime", "rollout"},
    "umerl.serve": {"umerl.data", "umerl.model", "umerl.runtime", "umerl.config", "umerl.eval",
                    "rollout"},
}


def wing(module: str) -> str:
    """``umerl.train.grpo`` -> ``umerl.train``; ``rollout.pool`` -> ``rollout``; a spine module
    (``umerl.driver``) -> ``umerl``."""
    parts = module.split(".")
    if parts[0] != "umerl":
        return parts[0]
    return f"umerl.{parts[1]}" if len(parts) > 1 and parts[1] in WINGS else SPINE


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports (``from a import b`` counts as ``a.b`` when that
    is a module, else ``a``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_deferred_and_relative_imports():
    graph = import_graph()
    assert "rollout.weight_sync" in graph["umerl.train.learner"]  # imported inside a method
    assert "umerl.model.sampling" in graph["rollout.pool"]
    assert "rewards.builtin" in graph["rewards"]  # the package's own __init__
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def arrows_up(graph: dict[str, set[str]]) -> list[str]:
    """Every import from one wing into another that ``MAY_IMPORT`` does not allow."""
    return sorted(f"{name} -> {target}" for name, targets in graph.items()
                  for target in targets
                  if wing(name) != SPINE and wing(target) != wing(name)
                  and wing(target) not in MAY_IMPORT[wing(name)])


def test_every_module_sits_in_a_wing_or_the_spine():
    strays = sorted(m for m in import_graph() if wing(m) not in MAY_IMPORT and wing(m) != SPINE)
    assert not strays, strays
    spine = sorted(m for m in import_graph() if wing(m) == SPINE)
    assert spine == ["umerl", "umerl.annotate", "umerl.check", "umerl.cli", "umerl.driver",
                     "umerl.plan", "umerl.preflight", "umerl.rl"]


def test_no_arrow_runs_back_up_a_layer():
    offenders = arrows_up(import_graph())
    assert not offenders, offenders


def test_the_layers_themselves_have_no_cycle():
    assert not cycles({w: set(deps) for w, deps in MAY_IMPORT.items()})


def test_the_rule_catches_a_bad_import():
    """The checker itself: a model-layer module importing the learner, a Ray helper or the
    driver, and a serving module importing the driver, are all reported."""
    graph = {"umerl.model.embed": {"umerl.train.learner", "umerl.runtime.remote",
                                   "umerl.data.formats"},
             "umerl.data.formats": {"rollout.pool"},
             "umerl.serve.service": {"umerl.driver"},
             "umerl.eval.runner": {"umerl.driver", "umerl.model.loading"},
             "umerl.driver": {"umerl.serve.service"}}
    assert arrows_up(graph) == [
        "umerl.data.formats -> rollout.pool", "umerl.eval.runner -> umerl.driver",
        "umerl.model.embed -> umerl.runtime.remote", "umerl.model.embed -> umerl.train.learner",
        "umerl.serve.service -> umerl.driver"]
