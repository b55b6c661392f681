"""Imports run one way: no cycles between modules of umerl/, rollout/ and rewards/, and the
model layer never reaches into rollout/ (the engines use the model layer, not the reverse).

Every import counts, including those inside functions: a deferred import still ties the two
modules together, it only hides the cycle until run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("umerl", "rollout", "rewards")
# The modules allowed to use rollout/: the RL loop and its learners, the driver, the CLI, and
# the applications that drive an engine as the driver does: the annotation tool and the
# embedding service (a Serve replica builds its own engine).
USES_ROLLOUT = {"umerl.rl", "umerl.train.learner", "umerl.driver", "umerl.cli", "umerl.annotate",
                "umerl.serve.service"}


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


def test_the_model_layer_does_not_import_rollout():
    graph = import_graph()
    offenders = sorted(f"{name} -> {target}" for name, targets in graph.items()
                       if name.startswith(("umerl", "rewards")) and name not in USES_ROLLOUT
                       for target in targets if target.split(".")[0] == "rollout")
    assert not offenders, offenders


def test_rollout_does_not_import_the_loop_or_the_learners():
    graph = import_graph()
    loop = {"umerl.rl", "umerl.train.learner", "umerl.driver", "umerl.cli", "umerl.train.engine",
            "umerl.train.sft"}
    offenders = sorted(f"{name} -> {target}" for name, targets in graph.items()
                       if name.startswith("rollout") for target in targets if target in loop)
    assert not offenders, offenders
