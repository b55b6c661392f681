"""The contrastive half of the cold-start SFT objective: symmetric InfoNCE across ranks.

UME-R1 stage 1 (docs/method.md, 'Stage 1: cold-start SFT') trains on one teacher-forced
forward pass per side and minimises, with all weights 1 (``umerl.train.sft`` sums the four
terms)::

    InfoNCE(gen_q, gen_t) + InfoNCE(disc_q, disc_t) + CE(query completion) + CE(target completion)

InfoNCE is symmetric ((q->t + t->q) / 2), logit scale 50 (temperature 0.02), with in-batch
negatives gathered from every data-parallel rank and gradients flowing through the gather.

Data-parallel convention (DDP, DeepSpeed, Ray Train all follow it): each rank backpropagates its
own loss and the parameter gradients are then AVERAGED over the W ranks. The loss here is
written so that this average equals the gradient of the loss computed on one rank over the
concatenated global batch (equal local batch size B on every rank assumed):

* ``info_nce`` returns, per rank, the mean over that rank's B local rows of the per-row symmetric
  loss, each row scored against the W*B gathered columns. The mean of the W per-rank losses is
  then exactly the global-batch loss, and because ``gather_with_grad`` SUMS the gradients that
  every rank's loss sends to a slice, the gradient arriving at rank r's local embeddings is
  ``W * dL_global / dx_r``; the 1/W of the DP average cancels that factor, so averaged parameter
  gradients equal the single-rank gradients exactly (tests/test_losses.py checks both).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


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
