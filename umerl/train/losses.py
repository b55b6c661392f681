"""Cold-start SFT objective: two symmetric InfoNCE losses plus completion cross-entropy.

UME-R1 stage 1 (docs/method.md, 'Stage 1: cold-start SFT') trains on one teacher-forced
forward pass per side and minimises, with all weights 1::

    InfoNCE(gen_q, gen_t) + InfoNCE(disc_q, disc_t) + CE(query completion) + CE(target completion)

InfoNCE is symmetric ((q->t + t->q) / 2), logit scale 50 (temperature 0.02), with in-batch
negatives gathered from every data-parallel rank and gradients flowing through the gather.

Data-parallel convention (DDP, DeepSpeed, Ray Train all follow it): each rank backpropagates its
own loss and the parameter gradients are then AVERAGED over the W ranks. Every loss here is
written so that this average equals the gradient of the loss computed on one rank over the
concatenated global batch (equal local batch size B on every rank assumed):

* ``info_nce`` returns, per rank, the mean over that rank's B local rows of the per-row symmetric
  loss, each row scored against the W*B gathered columns. The mean of the W per-rank losses is
  then exactly the global-batch loss, and because ``gather_with_grad`` SUMS the gradients that
  every rank's loss sends to a slice, the gradient arriving at rank r's local embeddings is
  ``W * dL_global / dx_r``; the 1/W of the DP average cancels that factor, so averaged parameter
  gradients equal the single-rank gradients exactly (tests/test_losses.py checks both).
* ``completion_ce`` is a token mean over the LOCAL batch by default. Averaging per-rank token
  means is not the global token mean when ranks hold different numbers of assistant tokens; pass
  ``denominator = global_token_count / W`` to get the exact global token mean under DP averaging.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _dp_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums every rank's gradient for this rank's slice.

    Forward: every rank contributes its [B, ...] tensor and receives [W*B, ...].
    Backward: rank s's loss depends on rank r's slice through the gather, so the gradient of
    the sum of all ranks' losses w.r.t. rank r's input is the all-reduced (summed) gradient of
    the gathered tensor, restricted to rank r's rows.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        rank, world = _dp_world()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every data-parallel rank along dim 0, keeping gradients.

    Without an initialised process group (or with world size 1) this returns ``x`` itself.
    Every rank must pass a tensor of the same shape (equal local batch size). Every rank must
    also run backward through the result, because the backward pass is a collective.
    """
    _, world = _dp_world()
    if world == 1:
        return x
    return _GatherWithGrad.apply(x)


def _gather_ids(ids: Tensor, world: int) -> Tensor:
    if world == 1:
        return ids
    parts = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(parts, ids.contiguous())
    return torch.cat(parts)


def info_nce(
    query: Tensor,
    target: Tensor,
    scale: float = 50.0,
    gather: bool = True,
    target_ids: Tensor | None = None,
) -> Tensor:
    """Symmetric InfoNCE with in-batch negatives gathered from all data-parallel ranks.

    Args:
        query, target: [B, d] L2-normalised local embeddings; row i of ``query`` is paired with
            row i of ``target``. B must be equal on every rank.
        scale: logit scale (1 / temperature); the paper uses 50.
        gather: gather negatives from all ranks (no-op without a process group).
        target_ids: optional [B] int64 identity of each pair's target (equal ids = the same
            target). In-batch "negatives" with the positive's id are false negatives (two
            digit images of class "seven" share the target "seven"): their logits are masked
            out of both directions, so classification batches may repeat a class.

    Returns:
        Scalar: the mean over the B LOCAL rows of ``(CE(q_i -> T_all) + CE(t_i -> Q_all)) / 2``,
        where the candidates are all W*B gathered rows and the positive of local row i is global
        column ``rank * B + i``. The mean of this value over ranks equals the loss over the
        concatenated batch on a single rank, and under DP gradient averaging the gradients are
        identical too (see the module docstring).
    """
    if query.shape != target.shape or query.dim() != 2:
        raise ValueError(
            f"expected two [B, d] tensors, got {tuple(query.shape)} and {tuple(target.shape)}"
        )
    rank, world = _dp_world() if gather else (0, 1)
    if world > 1:
        query_all, target_all = gather_with_grad(query), gather_with_grad(target)
    else:
        query_all, target_all = query, target
    batch = query.shape[0]
    labels = torch.arange(batch, device=query.device) + rank * batch
    dtype = _at_least_fp32(query.dtype)  # bf16 values near 50 are 0.25 apart
    q_to_t = scale * (query.to(dtype) @ target_all.to(dtype).T)  # [B, W*B]
    t_to_q = scale * (target.to(dtype) @ query_all.to(dtype).T)  # [B, W*B]
    if target_ids is not None:
        all_ids = _gather_ids(target_ids.to(query.device), world)
        same = target_ids.to(query.device)[:, None] == all_ids[None, :]  # [B, W*B]
        false_negative = same & (torch.arange(all_ids.shape[0], device=query.device)[None, :]
                                 != labels[:, None])
        q_to_t = q_to_t.masked_fill(false_negative, float("-inf"))
        t_to_q = t_to_q.masked_fill(false_negative, float("-inf"))
    return (F.cross_entropy(q_to_t, labels) + F.cross_entropy(t_to_q, labels)) / 2


def assistant_labels(input_ids: Tensor, completion_lengths: Tensor | list[int]) -> Tensor:
    """Labels for completion-only CE: ``input_ids`` with everything but the completion = -100.

    Batches are LEFT-padded, so row i's completion is its last ``completion_lengths[i]`` tokens;
    the prompt (system and user turns, the generation prompt) and the padding are masked.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got {tuple(input_ids.shape)}")
    lengths = torch.as_tensor(completion_lengths, device=input_ids.device).long().reshape(-1)
    rows, width = input_ids.shape
    if lengths.numel() != rows:
        raise ValueError(f"{lengths.numel()} completion lengths for {rows} rows")
    if bool((lengths < 0).any()) or bool((lengths > width).any()):
        raise ValueError(f"completion lengths must lie in [0, {width}], got {lengths.tolist()}")
    positions = torch.arange(width, device=input_ids.device).expand(rows, width)
    keep = positions >= (width - lengths)[:, None]
    return torch.where(keep, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


def completion_ce(logits: Tensor, labels: Tensor, denominator: float | None = None) -> Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100.

    ``labels`` are aligned with the inputs (as ``assistant_labels`` returns them): the logits at
    position t are scored against the label at t+1. Computed in at least float32.

    Args:
        logits: [B, T, V]; labels: [B, T].
        denominator: divide the summed token losses by this instead of the local count of valid
            tokens (e.g. global token count / world size for an exact global token mean under
            data-parallel averaging).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [B, T, V] and labels [B, T], got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    pred = logits[:, :-1].reshape(-1, logits.shape[-1])
    pred = pred.to(_at_least_fp32(pred.dtype))
    gold = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(pred, gold, ignore_index=IGNORE_INDEX, reduction="sum")
    if denominator is None:
        count = int((gold != IGNORE_INDEX).sum())
        if count == 0:
            return total * 0.0  # keeps the graph; no completion tokens in this batch
        denominator = count
    return total / denominator


@dataclass
class SftLossWeights:
    """Weights of the four SFT terms (the paper uses 1 for each)."""

    gen_nce: float = 1.0
    disc_nce: float = 1.0
    query_ce: float = 1.0
    target_ce: float = 1.0


def sft_loss(
    parts: Mapping[str, Tensor], weights: SftLossWeights | None = None
) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of the SFT terms, plus detached floats for logging.

    ``parts`` maps term names (the fields of ``SftLossWeights``) to scalar losses. A term whose
    weight is 0 may be absent; any other missing term or an unknown name raises. The log dict
    holds every given part under its name and the total under ``"loss"``.
    """
    weights = weights or SftLossWeights()
    table = asdict(weights)
    unknown = set(parts) - set(table)
    if unknown:
        raise KeyError(f"unknown SFT loss terms {sorted(unknown)}; expected {sorted(table)}")
    missing = [name for name, w in table.items() if w != 0 and name not in parts]
    if missing:
        raise KeyError(f"missing SFT loss terms with nonzero weight: {missing}")
    terms = [table[name] * value for name, value in parts.items() if table[name] != 0]
    if not terms:
        raise ValueError("every SFT loss weight is zero")
    total = terms[0].reshape(())
    for term in terms[1:]:
        total = total + term.reshape(())
    logs = {name: float(value.detach()) for name, value in parts.items()}
    logs["loss"] = float(total.detach())
    return total, logs
