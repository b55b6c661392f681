"""Sampling settings and what every rollout engine offers: n completions (token ids) per prompt.

The model layer (evaluation, embedding) drives engines through this protocol; the engines
themselves live in ``rollout/``, which depends on this module, never the reverse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from umerl.data.formats import Side


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; the defaults are UME-R1's RL settings (temperature 1, top-k 50)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    do_sample: bool = True
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")


class RolloutEngine(Protocol):
    """Generates completions: ``[side][sample] -> completion token ids``.

    A completion ends with its stop token (``<gen_emb>`` or ``<|im_end|>``) when one was
    produced, and has no padding. With ``seeds`` (one per side), each side's samples depend only
    on its own seed, never on which other sides share the call or the engine: a pool of any size
    samples the same completions.
    """

    def generate(
        self,
        sides: Sequence[Side],
        n: int,
        sampling: SamplingParams,
        seeds: Sequence[int] | None = None,
    ) -> list[list[list[int]]]: ...
