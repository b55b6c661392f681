"""SFT batches: each contrastive batch comes from one sub-dataset.

The sampler is a pure function of (seed, epoch, position), so its state is two integers and a
resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from umerl.config.origins import ConfigError, Sources
from umerl.data.formats import DataError, Pair, Side


def load_pair_datasets(
    paths: Sequence[str | Path], reader: Callable[..., tuple[list[Pair], Any]],
    skip_invalid: bool = False, encoder: Any = None, max_prompt_tokens: int | None = None,
    key: str = "data", sources: Sources | None = None,
) -> dict[str, list[Pair]]:
    """Pair files (``read_sft_pairs`` or ``read_rl_pairs``) -> one sub-dataset per task.

    Every line is checked; given an ``encoder``, every prompt's length too. The driver's
    preflight, the SFT workers and the RL loop all load through here, so with ``skip_invalid``
    they all skip the same lines.
    """
    datasets: dict[str, list[Pair]] = {}
    for i, path in enumerate(paths):
        if not Path(path).is_file():
            where = sources.describe(f"{key}[{i}]") if sources else f"'{key}[{i}]'"
            raise ConfigError(f"{where}: data file not found: {path}")
        pairs, report = reader(path, skip_invalid=skip_invalid)
        skipped = list(report.skipped)
        if encoder is not None and max_prompt_tokens:
            from umerl.model.inputs import check_prompt_lengths

            pairs, too_long = check_prompt_lengths(encoder, pairs, max_prompt_tokens,
                                                   skip_invalid)
            skipped += too_long
        if skipped:
            print(f"warning: {path}: {len(pairs)} pairs kept, {len(skipped)} skipped "
                  f"(first: {skipped[0]})", flush=True)
        if not pairs:
            raise DataError(f"{path}: no valid pairs left")
        datasets.setdefault(pairs[0].task or Path(path).stem, []).extend(pairs)
    return datasets


@dataclass
class SamplerState:
    epoch: int = 0
    position: int = 0  # batches already taken in this epoch


class ContrastiveBatcher:
    """Global contrastive batches of ``batch_size`` pairs, each from a single sub-dataset.

    A batch may hold several pairs with the same target (two images of the digit seven): the
    loss masks such false negatives using ``target_id``.
    """

    def __init__(self, datasets: dict[str, list[Pair]], batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.datasets = {name: pairs for name, pairs in sorted(datasets.items()) if pairs}
        self.batch_size = batch_size
        self.seed = seed
        self.state = SamplerState()
        self._epoch_cache: tuple[int, list[tuple[str, list[int]]]] | None = None
        if not self.epoch_batches(0):
            sizes = {name: len(p) for name, p in self.datasets.items()}
            raise ValueError(
                f"no sub-dataset has {batch_size} pairs for one batch (sizes: {sizes})"
            )

    def epoch_batches(self, epoch: int) -> list[tuple[str, list[int]]]:
        """All (sub-dataset, pair indices) batches of one epoch, in order; each sub-dataset's
        last incomplete batch is dropped (a contrastive batch must fill every rank)."""
        if self._epoch_cache and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for name, pairs in self.datasets.items():
            order = rng.permutation(len(pairs)).tolist()
            full = len(order) - len(order) % self.batch_size
            batches.extend((name, order[i:i + self.batch_size])
                           for i in range(0, full, self.batch_size))
        shuffled = [batches[i] for i in rng.permutation(len(batches))]
        self._epoch_cache = (epoch, shuffled)
        return shuffled

    def next_batch(self) -> tuple[str, list[Pair]]:
        """The next global batch; moves to the next epoch when one runs out."""
        batches = self.epoch_batches(self.state.epoch)
        if self.state.position >= len(batches):
            self.state = SamplerState(self.state.epoch + 1, 0)
            batches = self.epoch_batches(self.state.epoch)
        name, indices = batches[self.state.position]
        self.state.position += 1
        return name, [self.datasets[name][i] for i in indices]

    def batches_per_epoch(self) -> int:
        return len(self.epoch_batches(0))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.state.epoch, "position": self.state.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"data cursor was saved with seed {state['seed']}, this run has {self.seed}"
            )
        self.state = SamplerState(int(state["epoch"]), int(state["position"]))


def shard(batch: list[Pair], rank: int, world_size: int) -> list[Pair]:
    """Rank r's contiguous slice; the InfoNCE gather puts the slices back in rank order."""
    if len(batch) % world_size:
        raise ValueError(f"batch of {len(batch)} does not split over {world_size} ranks")
    per_rank = len(batch) // world_size
    return batch[rank * per_rank:(rank + 1) * per_rank]


def target_id(side: Side) -> int:
    """A process-independent int64 identity of a side (equal content, equal id)."""
    digest = hashlib.blake2b(side.key().encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)
