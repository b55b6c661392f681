"""Faults for the HTTP tests' `umerl serve` (tests/test_serve.py), injected into every process
of that service, its Ray replica included, by putting this folder first on PYTHONPATH: Python
imports ``sitecustomize`` at start-up. Inert unless UMERL_TEST_SERVE_FAULTS names a folder.

Once ``umerl.serve.service`` is imported, ``Embedder.gen`` sleeps ``S`` seconds before a batch
holding a text with ``[[sleep S]]`` (a gen batch that runs long: a caller can disconnect
during it, or a request outlive ``serve.request_timeout_s``), and appends the batch's texts
to ``gen_batches.jsonl`` in that folder (which requests shared a batch).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path

FOLDER = os.environ.get("UMERL_TEST_SERVE_FAULTS")
SLEEP = re.compile(r"\[\[sleep ([0-9.]+)\]\]")


def _patch(module) -> None:
    real = module.Embedder.gen

    def gen(self, sides, samples, max_new_tokens=None):
        texts = [side.text for side in sides]
        with open(Path(FOLDER) / "gen_batches.jsonl", "a") as out:
            out.write(json.dumps(texts) + "\n")
        delays = [float(m.group(1)) for t in texts for m in [SLEEP.search(t)] if m]
        if delays:
            time.sleep(max(delays))  # before generating: the images are read after this
        return real(self, sides, samples, max_new_tokens)

    module.Embedder.gen = gen


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it lets ``umerl.serve.service`` load as usual, then patches it."""

    def find_spec(self, name, path, target=None):
        if name != "umerl.serve.service":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module) -> None:
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if FOLDER:
    sys.meta_path.insert(0, _PatchOnImport())
