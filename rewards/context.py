"""What a reward sees: one ``RewardContext`` per RL step, holding every rollout of the step.

Rollout order (R = 2 * P * G rollouts for P pairs and group size G)::

    r = 0 .. P*G-1        query rollouts, pair-major: pair p's samples at p*G .. p*G+G-1
    r = P*G .. 2*P*G-1    target rollouts, the same order

so ``rewards[ctx.query_slice]`` is the query side and ``r // G`` is the rollout's GRPO group
(2 * P groups: the query groups first, then the target groups).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from umerl.data.answers import gold_answer, names_answer

QUERY, TARGET = 0, 1
SIDE_NAMES = ("query", "target")


@dataclass
class RewardContext:
    """The reward's view of one RL step (all rollouts, all learner ranks gathered).

    Attributes (R = 2 * P * G rollouts, P pairs, group size G, embedding dim d):
        completions: decoded completion text per rollout, ``[R]``.
        completion_ids: completion token ids per rollout (no padding, stop token kept), ``[R]``.
        pair_index: ``int64 [R]``, index of the rollout's pair within the step (0 .. P-1).
        pair_ids: dataset id of the rollout's pair, ``[R]``.
        sample_index: ``int64 [R]``, the rollout's sample index within its group (0 .. G-1).
        side: ``int64 [R]``, ``QUERY`` (0) or ``TARGET`` (1); ``side_names`` gives strings.
        query_embeddings: ``[P*G, d]`` generative embeddings of the query rollouts, pair-major,
            L2-normalised, detached.
        target_embeddings: ``[P*G, d]`` the same for the target rollouts.
        meta: one dict per pair, ``[P]``: ``id``, ``task``, ``query`` and ``target`` (each with
            ``text``, ``images``, ``video``) and the dataset's own ``meta`` object.
        group_size: G, samples per prompt.
        step: the RL step number.
        disc_query_embeddings: ``[P, d]`` discriminative embeddings of the query prompts
            (one per pair: they depend on the prompt only), L2-normalised, or ``None``.
        disc_target_embeddings: ``[P, d]`` the same for the target prompts, or ``None``.

    Build it with ``RewardContext.build`` (or ``from_pairs``), which checks every shape.
    """

    completions: list[str]
    completion_ids: list[list[int]]
    pair_index: Tensor
    pair_ids: list[str]
    sample_index: Tensor
    side: Tensor
    query_embeddings: Tensor
    target_embeddings: Tensor
    meta: list[dict[str, Any]]
    group_size: int
    step: int = 0
    disc_query_embeddings: Tensor | None = None
    disc_target_embeddings: Tensor | None = None
    # ``rl.mask_shared_targets``: the embedding reward leaves out of the negatives (and of
    # topG) the rollouts of other pairs with the same target as the anchor's pair.
    mask_shared_targets: bool = False
    # What the built-in rewards derive from the step once and share (``rewards.builtin``).
    _derived: dict[str, Any] = field(default_factory=dict, init=False, repr=False,
                                     compare=False)

    # --- sizes and slices -------------------------------------------------------------------

    @property
    def num_pairs(self) -> int:
        """P, the number of (query, target) pairs in the step."""
        return self.query_embeddings.shape[0] // self.group_size

    def shared_targets(self) -> Tensor:
        """``bool [P, P]``: pairs p != q whose targets are the same (text, images, video)."""
        keys = [repr(sorted(m.get("target", {}).items())) if isinstance(m.get("target"), dict)
                else repr(m.get("target")) for m in self.meta]
        same = torch.tensor([[a == b for b in keys] for a in keys], dtype=torch.bool)
        return same & ~torch.eye(len(keys), dtype=torch.bool)

    @property
    def num_rollouts(self) -> int:
        """R = 2 * P * G."""
        return 2 * self.query_embeddings.shape[0]

    @property
    def query_slice(self) -> slice:
        """Rows of the query rollouts in any per-rollout output: ``0 .. P*G``."""
        return slice(0, self.num_rollouts // 2)

    @property
    def target_slice(self) -> slice:
        """Rows of the target rollouts in any per-rollout output: ``P*G .. 2*P*G``."""
        return slice(self.num_rollouts // 2, self.num_rollouts)

    @property
    def device(self) -> torch.device:
        return self.query_embeddings.device

    # --- per-rollout helpers ----------------------------------------------------------------

    @property
    def is_query(self) -> Tensor:
        """``bool [R]``, True for query rollouts."""
        return self.side == QUERY

    @property
    def side_names(self) -> list[str]:
        """``"query"`` or ``"target"`` per rollout."""
        return [SIDE_NAMES[s] for s in self.side.tolist()]

    @property
    def group_index(self) -> Tensor:
        """``int64 [R]``, the rollout's GRPO group: ``r // G`` (query groups, then target)."""
        return torch.arange(self.num_rollouts) // self.group_size

    def embeddings(self) -> Tensor:
        """``[R, d]`` generative embedding of every rollout, in rollout order."""
        return torch.cat([self.query_embeddings, self.target_embeddings])

    def meta_of(self, rollout: int) -> dict[str, Any]:
        """The metadata of rollout ``rollout``'s pair."""
        return self.meta[int(self.pair_index[rollout])]

    def answer_correct(self) -> Tensor:
        """``float32 [R]``: 1.0 where the rollout's ``<answer>`` names its pair's gold answer,
        0.0 where it does not, NaN where the pair declares none (``umerl.data.answers``)."""
        gold = [gold_answer(m.get("task", ""), m.get("meta", {})) for m in self.meta]
        values = [math.nan if gold[p] is None else float(names_answer(text, gold[p]))
                  for text, p in zip(self.completions, self.pair_index.tolist())]
        return torch.tensor(values, dtype=torch.float32)

    def describe(self, rollout: int) -> str:
        """``"query pair 3 (id 'x') sample 5"``, for error messages."""
        pair = int(self.pair_index[rollout])
        return (f"{SIDE_NAMES[int(self.side[rollout])]} pair {pair} (id {self.pair_ids[rollout]!r})"
                f" sample {int(self.sample_index[rollout])}")

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        *,
        completions: Sequence[str],
        completion_ids: Sequence[Sequence[int]],
        query_embeddings: Tensor,
        target_embeddings: Tensor,
        group_size: int,
        meta: Sequence[Mapping[str, Any]],
        pair_ids: Sequence[str] | None = None,
        step: int = 0,
        disc_query_embeddings: Tensor | None = None,
        disc_target_embeddings: Tensor | None = None,
        mask_shared_targets: bool = False,
        norm_tolerance: float | None = 1e-2,
    ) -> RewardContext:
        """Check shapes and build the context; index tensors are derived from the layout.

        ``completions`` and ``completion_ids`` are in rollout order (all query rollouts
        pair-major, then all target rollouts). ``meta`` and ``pair_ids`` have one entry per
        pair; ``pair_ids`` defaults to ``meta[p]["id"]`` (else ``str(p)``). Discriminative
        embeddings may be ``[P, d]`` or ``[P*G, d]`` (then the first row of each group is kept).
        Rows of every embedding must have norm 1 within ``norm_tolerance`` (None: not checked).
        Every violation raises ``ValueError`` saying what is wrong.
        """
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
        query_embeddings = _check_embeddings("query_embeddings", query_embeddings, norm_tolerance)
        target_embeddings = _check_embeddings(
            "target_embeddings", target_embeddings, norm_tolerance
        )
        if query_embeddings.shape != target_embeddings.shape:
            raise ValueError(
                f"query_embeddings {tuple(query_embeddings.shape)} and target_embeddings "
                f"{tuple(target_embeddings.shape)} must have the same shape [P*G, d]"
            )
        rows = query_embeddings.shape[0]
        if rows == 0 or rows % group_size:
            raise ValueError(
                f"query_embeddings has {rows} rows: expected P*G with P >= 1 and G={group_size}"
            )
        if target_embeddings.device != query_embeddings.device:
            raise ValueError("query_embeddings and target_embeddings are on different devices")
        num_pairs = rows // group_size
        num_rollouts = 2 * rows
        layout = f"2 sides x {num_pairs} pairs x {group_size} samples = {num_rollouts}"

        if len(completions) != num_rollouts:
            raise ValueError(f"got {len(completions)} completions, expected {layout}")
        if len(completion_ids) != num_rollouts:
            raise ValueError(f"got {len(completion_ids)} completion_ids, expected {layout}")
        for r, text in enumerate(completions):
            if not isinstance(text, str):
                raise ValueError(f"completions[{r}] must be str, got {type(text).__name__}")
        if len(meta) != num_pairs:
            raise ValueError(f"got {len(meta)} meta entries, expected one per pair ({num_pairs})")
        for p, entry in enumerate(meta):
            if not isinstance(entry, Mapping):
                raise ValueError(f"meta[{p}] must be a mapping, got {type(entry).__name__}")
        if pair_ids is None:
            pair_ids = [str(entry.get("id", p)) for p, entry in enumerate(meta)]
        if len(pair_ids) != num_pairs:
            raise ValueError(f"got {len(pair_ids)} pair_ids, expected one per pair ({num_pairs})")

        rollout = torch.arange(num_rollouts)
        pair_index = (rollout % rows) // group_size
        return cls(
            completions=list(completions),
            completion_ids=[list(ids) for ids in completion_ids],
            pair_index=pair_index,
            pair_ids=[str(pair_ids[p]) for p in pair_index.tolist()],
            sample_index=rollout % group_size,
            side=(rollout >= rows).long(),
            query_embeddings=query_embeddings,
            target_embeddings=target_embeddings,
            meta=[dict(entry) for entry in meta],
            group_size=group_size,
            step=int(step),
            disc_query_embeddings=_check_disc(
                "disc_query_embeddings", disc_query_embeddings, num_pairs, group_size,
                norm_tolerance,
            ),
            disc_target_embeddings=_check_disc(
                "disc_target_embeddings", disc_target_embeddings, num_pairs, group_size,
                norm_tolerance,
            ),
            mask_shared_targets=bool(mask_shared_targets),
        )

    @classmethod
    def from_pairs(cls, pairs: Sequence[Any], **kwargs: Any) -> RewardContext:
        """``build`` with ``meta`` and ``pair_ids`` from ``umerl.data.formats.Pair`` objects."""
        meta = [pair_meta(pair) for pair in pairs]
        return cls.build(meta=meta, pair_ids=[m["id"] for m in meta], **kwargs)


def pair_meta(pair: Any) -> dict[str, Any]:
    """The metadata dict a reward sees for a ``umerl.data.formats.Pair``."""

    def side(s: Any) -> dict[str, Any]:
        return {"text": s.text, "images": list(s.images), "video": list(s.video)}

    return {"id": str(pair.id), "task": pair.task, "query": side(pair.query),
            "target": side(pair.target), "meta": dict(pair.meta)}


def _check_embeddings(name: str, value: Any, norm_tolerance: float | None) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 2 or not value.is_floating_point():
        raise ValueError(
            f"{name} must be a 2-D floating tensor [rows, d], got {value.dtype} "
            f"{tuple(value.shape)}"
        )
    value = value.detach()
    finite = torch.isfinite(value).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name} has NaN or inf in rows {bad}")
    if norm_tolerance is not None and value.shape[0]:
        norms = value.float().norm(dim=1)
        off = ((norms - 1).abs() > norm_tolerance).nonzero().flatten()
        if off.numel():
            rows = off[:5].tolist()
            raise ValueError(
                f"{name} rows must be L2-normalised: rows {rows} have norms "
                f"{[round(float(norms[i]), 4) for i in rows]}"
            )
    return value


def _check_disc(name: str, value: Tensor | None, num_pairs: int, group_size: int,
                norm_tolerance: float | None) -> Tensor | None:
    if value is None:
        return None
    value = _check_embeddings(name, value, norm_tolerance)
    if value.shape[0] == num_pairs:
        return value
    if value.shape[0] == num_pairs * group_size:
        return value[::group_size]
    raise ValueError(
        f"{name} has {value.shape[0]} rows, expected one per pair ({num_pairs}) "
        f"or one per rollout ({num_pairs * group_size})"
    )
