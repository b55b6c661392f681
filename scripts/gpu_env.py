#!/usr/bin/env python
"""Check a GPU environment right after `make install-gpu` (and on any node, any time):

    .venv-gpu/bin/python scripts/gpu_env.py

Exit status 1, with the reason, when torch is a CPU build (a local +cpu wheel in pip's
configuration wins over PyPI's CUDA build), a pinned package has another version, or a package
the recipes need is missing. Prints each GPU's compute capability and flags those CUDA 13 does
not support (below 7.5). Runs without a GPU too (a login node): it then says none is visible.
No GPU work, no model: a few seconds plus the imports of vLLM, DeepSpeed, Ray and umerl.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys

# The pins of pyproject.toml (the [gpu] extra and the dependencies vLLM 0.32's wheel is built on).
PINNED = {"torch": "2.13.0", "vllm": "0.32.0", "deepspeed": "0.19.8", "ray": "2.60.0"}
# Read as data by the bundled benchmark (never imported).
DATA_PACKAGES = ("gensim", "timm")
MIN_CAPABILITY = (7, 5)  # CUDA 13 dropped Maxwell, Pascal and Volta


def version_problems() -> list[str]:
    problems = []
    for name, want in PINNED.items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{name} is not installed (want {want})")
            continue
        if have.split("+")[0] != want:
            problems.append(f"{name} {have} is installed, the project pins {want}")
    problems += [f"{name} is not installed (the bundled benchmark reads its data files)"
                 for name in DATA_PACKAGES if importlib.util.find_spec(name) is None]
    return problems


def torch_problems() -> list[str]:
    import torch

    if torch.version.cuda is None:
        return [f"torch {torch.__version__} is a CPU build: reinstall torch==2.13.0 from PyPI "
                "(a local +cpu wheel folder in pip's configuration wins over it; see "
                "`pip config list`)"]
    print(f"torch {torch.__version__}, built with CUDA {torch.version.cuda}")
    if not torch.cuda.is_available():
        print("no GPU visible here (a login node?): drivers and GPUs not checked")
        return []
    problems = []
    for index in range(torch.cuda.device_count()):
        name = torch.cuda.get_device_name(index)
        capability = torch.cuda.get_device_capability(index)
        print(f"GPU {index}: {name}, compute capability {capability[0]}.{capability[1]}")
        if capability < MIN_CAPABILITY:
            problems.append(f"GPU {index} ({name}) is below compute capability 7.5, which "
                            "CUDA 13 builds of torch and vLLM do not support")
    return problems


def import_problems() -> list[str]:
    """What fails to import in the process a Ray worker runs (vLLM checks its torch here)."""
    problems = []
    for name in ("vllm", "deepspeed", "ray", "umerl.driver"):
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - any import failure is reported by name
            problems.append(f"import {name} fails: {type(err).__name__}: {err}")
    return problems


def main() -> int:
    problems = version_problems() + torch_problems()
    if not problems:
        problems = import_problems()
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        print("note: DS_ACCELERATOR=cpu is set in this shell; umerl's GPU workers ignore it, "
              "other DeepSpeed programs would run on CPU")
    for problem in problems:
        print(f"gpu_env: {problem}")
    if problems:
        return 1
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in
                         ("vllm", "deepspeed", "ray", "transformers"))
    print(f"gpu_env: ok: Python {sys.version.split()[0]}, {versions}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
