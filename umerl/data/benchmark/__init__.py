"""The ``umerl-mini`` offline benchmark: MMEB-format tasks built from data shipped in PyPI
packages (scikit-learn, scikit-image, gensim and timm data files). See ``build.py`` for the
layout and ``SOURCES.md`` for licences.

``build_benchmark`` is imported lazily so that ``python -m umerl.data.benchmark.build`` does not
load the module twice.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_BENCHMARK = "umerl-mini"

__all__ = ["DEFAULT_BENCHMARK", "build_benchmark"]


def build_benchmark(out_dir: str | Path, seed: int = 0, sizes: dict | None = None,
                    rl_extra: dict[str, int] | None = None) -> Path:
    """Build the benchmark into ``out_dir``; returns the path of its ``tasks.json``.

    ``sizes`` overrides entries of ``umerl.data.benchmark.build.DEFAULT_SIZES``; ``rl_extra``
    (opt-in) draws more RL queries for a task without changing the rest of the build.
    """
    from umerl.data.benchmark.build import build_benchmark as _build

    return _build(out_dir, seed=seed, sizes=sizes, rl_extra=rl_extra)
