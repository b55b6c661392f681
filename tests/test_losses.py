"""Tests for umerl.train.losses (SFT) and umerl.train.grpo (RL) against
sentence-transformers, verl 0.9.1,
a 2-process gloo run and hand-written loops over the paper's formulas."""

from __future__ import annotations

import math
import os
import socket
import time
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from umerl.config.schema import LOSS_AGG_MODES
from umerl.train.grpo import (
    aggregate,
    clipped_policy_loss,
    group_advantages,
    grpo_side_loss,
    k3_kl,
)
from umerl.train.losses import gather_with_grad, info_nce


def _unit(gen: torch.Generator, rows: int, dim: int, dtype=torch.float32) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=-1).to(dtype)


def _reference_nce(q: torch.Tensor, t: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric InfoNCE over one whole batch, written out with log-softmax."""
    logits = scale * q @ t.T
    diag = torch.arange(q.shape[0])
    forward = -logits.log_softmax(dim=1)[diag, diag].mean()
    backward = -logits.T.log_softmax(dim=1)[diag, diag].mean()
    return (forward + backward) / 2


# -- 1. InfoNCE vs sentence-transformers ------------------------------------------------------


@pytest.fixture(scope="module")
def st_losses():
    """A tiny offline SentenceTransformer (in-memory word-level tokenizer + StaticEmbedding):
    the losses only need a model object; compute_loss_from_embeddings never calls it."""
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from sentence_transformers.util import dot_score
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    tokenizer = Tokenizer(WordLevel({"[UNK]": 0, "query": 1, "target": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    model = SentenceTransformer(modules=[StaticEmbedding(tokenizer, embedding_dim=8)], device="cpu")
    with warnings.catch_warnings():  # MNSRL is deprecated in favour of MNRL(directions=...)
        warnings.simplefilter("ignore", DeprecationWarning)
        symmetric = losses.MultipleNegativesSymmetricRankingLoss(model, scale=50.0)
    return {
        "symmetric": symmetric,
        "mnrl": losses.MultipleNegativesRankingLoss(model, scale=50.0),
        "mnrl_both_dot": losses.MultipleNegativesRankingLoss(
            model,
            scale=50.0,
            similarity_fct=dot_score,
            directions=("query_to_doc", "doc_to_query"),
            partition_mode="per_direction",
        ),
    }


@pytest.mark.parametrize("batch,dim", [(2, 4), (16, 32), (64, 24)])
def test_info_nce_matches_sentence_transformers(st_losses, batch, dim):
    gen = torch.Generator().manual_seed(batch * 1000 + dim)
    q, t = _unit(gen, batch, dim), _unit(gen, batch, dim)
    ours = info_nce(q, t, scale=50.0)
    symmetric = st_losses["symmetric"].compute_loss_from_embeddings([q, t], None)
    mnrl = st_losses["mnrl"]
    averaged = (
        mnrl.compute_loss_from_embeddings([q, t], None)
        + mnrl.compute_loss_from_embeddings([t, q], None)
    ) / 2
    torch.testing.assert_close(ours, symmetric, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, averaged, atol=1e-5, rtol=0)
    # Without a process group, gather=True is a no-op.
    torch.testing.assert_close(ours, info_nce(q, t, scale=50.0, gather=False), atol=0, rtol=0)


def test_info_nce_gradients_match_sentence_transformers(st_losses):
    # ST's default cos_sim re-normalises (its gradient is projected), so compare gradients with
    # ST's raw dot product, which is what info_nce uses on pre-normalised inputs.
    gen = torch.Generator().manual_seed(7)
    q0, t0 = _unit(gen, 12, 16, torch.float64), _unit(gen, 12, 16, torch.float64)
    q1, t1 = q0.clone().requires_grad_(), t0.clone().requires_grad_()
    q2, t2 = q0.clone().requires_grad_(), t0.clone().requires_grad_()
    ours = info_nce(q1, t1, scale=50.0)
    theirs = st_losses["mnrl_both_dot"].compute_loss_from_embeddings([q2, t2], None)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)
    torch.testing.assert_close(q1.grad, q2.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(t1.grad, t2.grad, atol=1e-10, rtol=0)


def test_info_nce_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        info_nce(torch.zeros(3, 4), torch.zeros(2, 4))


# -- 2. InfoNCE across 2 gloo ranks -----------------------------------------------------------

WORLD, LOCAL_B, D_IN, D_OUT, SCALE = 2, 5, 6, 4, 50.0


def _gather_inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    xq = torch.randn(WORLD * LOCAL_B, D_IN, generator=gen, dtype=torch.float64)
    xt = torch.randn(WORLD * LOCAL_B, D_IN, generator=gen, dtype=torch.float64)
    weight = torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64) / math.sqrt(D_IN)
    return xq, xt, weight


def _embed(xq, xt, weight):
    return F.normalize(xq @ weight.T, dim=-1), F.normalize(xt @ weight.T, dim=-1)


def _gather_worker(rank: int, port: int, out_dir: str, seed: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        xq_all, xt_all, weight0 = _gather_inputs(seed)
        rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
        xq = xq_all[rows].clone().requires_grad_()
        xt = xt_all[rows].clone().requires_grad_()
        weight = weight0.clone().requires_grad_()  # a replicated "model parameter"
        q, t = _embed(xq, xt, weight)
        loss = info_nce(q, t, scale=SCALE)
        loss.backward()
        # What DDP / DeepSpeed do with parameter gradients: average over ranks.
        dist.all_reduce(weight.grad)
        weight.grad /= WORLD
        gathered = gather_with_grad(q.detach())
        torch.save(
            {
                "loss": loss.detach(),
                "xq_grad": xq.grad,
                "xt_grad": xt.grad,
                "weight_grad": weight.grad,
                "gathered": gathered,
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_info_nce_two_ranks_equals_one_rank(tmp_path):
    seed = 11
    context = mp.start_processes(
        _gather_worker,
        args=(_free_port(), str(tmp_path), seed),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-rank gloo workers did not finish in 60 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    xq0, xt0, weight0 = _gather_inputs(seed)
    xq, xt, weight = (x.clone().requires_grad_() for x in (xq0, xt0, weight0))
    q, t = _embed(xq, xt, weight)
    reference = _reference_nce(q, t, SCALE)
    reference.backward()

    # Forward: the gather returns the concatenated batch on every rank.
    for result in ranks:
        torch.testing.assert_close(result["gathered"], q.detach(), atol=1e-12, rtol=0)
    # Loss: the DP average of the per-rank losses is the global-batch loss.
    dp_loss = sum(r["loss"] for r in ranks) / WORLD
    torch.testing.assert_close(dp_loss, reference.detach(), atol=1e-6, rtol=0)
    # Replicated parameters: the DP-averaged gradient equals the 1-rank gradient.
    for result in ranks:
        torch.testing.assert_close(result["weight_grad"], weight.grad, atol=1e-6, rtol=0)
    # Per-rank inputs: the gradient at rank r's slice is W x dL/dx (every rank's loss sends its
    # share back through the gather); the DP average's 1/W brings it to the 1-rank slice.
    for r, result in enumerate(ranks):
        rows = slice(r * LOCAL_B, (r + 1) * LOCAL_B)
        torch.testing.assert_close(result["xq_grad"] / WORLD, xq.grad[rows], atol=1e-6, rtol=0)
        torch.testing.assert_close(result["xt_grad"] / WORLD, xt.grad[rows], atol=1e-6, rtol=0)


# -- 3. GRPO vs verl 0.9.1 --------------------------------------------------------------------


@pytest.fixture(scope="module")
def verl_algos():
    pytest.importorskip("verl")
    # verl is installed --no-deps; core_algos also needs tensordict (and ray, transformers)
    return pytest.importorskip("verl.trainer.ppo.core_algos")


def _response_mask(gen: torch.Generator, rows: int, width: int) -> torch.Tensor:
    lengths = torch.randint(1, width + 1, (rows,), generator=gen)
    return (torch.arange(width)[None, :] < lengths[:, None]).float()


def _verl_advantages(verl_algos, rewards, group_size, mask, eps, vectorized=False):
    token_rewards = torch.zeros_like(mask)
    last = mask.sum(dim=1).long() - 1
    token_rewards[torch.arange(len(rewards)), last] = rewards  # scalar at the last valid token
    index = np.repeat(np.arange(len(rewards) // group_size), group_size)
    fn = (
        verl_algos.compute_grpo_vectorized_outcome_advantage
        if vectorized
        else verl_algos.compute_grpo_outcome_advantage
    )
    advantages, _ = fn(
        token_level_rewards=token_rewards, response_mask=mask, index=index, epsilon=eps
    )
    return advantages


@pytest.mark.parametrize("group_size", [2, 3, 4, 8])
def test_group_advantages_match_verl(verl_algos, group_size):
    gen = torch.Generator().manual_seed(group_size)
    groups, width, eps = 6, 7, 1e-4
    n = groups * group_size
    # format reward (0/1) + a continuous embedding reward; one group of identical rewards
    rewards = torch.randint(0, 2, (n,), generator=gen).double() + torch.rand(
        n, generator=gen, dtype=torch.float64
    )
    rewards[:group_size] = 0.75
    mask = _response_mask(gen, n, width).double()
    ours = group_advantages(rewards, group_size, eps=eps)
    assert ours.shape == (n,)
    assert float(ours[:group_size].abs().max()) == 0.0
    for vectorized in (False, True):
        theirs = _verl_advantages(verl_algos, rewards, group_size, mask, eps, vectorized)
        torch.testing.assert_close(ours[:, None] * mask, theirs, atol=1e-6, rtol=0)
    # and against a plain loop with the unbiased std
    for g in range(groups):
        chunk = rewards[g * group_size : (g + 1) * group_size].tolist()
        mean = sum(chunk) / group_size
        std = math.sqrt(sum((x - mean) ** 2 for x in chunk) / (group_size - 1))
        for j, x in enumerate(chunk):
            assert float(ours[g * group_size + j]) == pytest.approx(
                (x - mean) / (std + eps), abs=1e-9
            )


def test_group_size_one_differs_from_verl_by_design(verl_algos):
    rewards = torch.tensor([0.3, 1.2, -0.5], dtype=torch.float64)
    mask = torch.ones(3, 4, dtype=torch.float64)
    ours = group_advantages(rewards, 1, eps=1e-4)
    assert ours.tolist() == [0.0, 0.0, 0.0]  # no group baseline for a single sample
    theirs = _verl_advantages(verl_algos, rewards, 1, mask, 1e-4)
    # verl: mean 0, std 1 for a size-1 group, so A = r / (1 + eps) (its 0 and 1 are float32
    # tensors, so 1 + eps is rounded to float32: hence 1e-6, not float64 precision)
    torch.testing.assert_close(theirs[:, 0], rewards / (1 + 1e-4), atol=1e-6, rtol=0)


def test_group_advantages_validation():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(7), 4)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(2, 4), 4)


def _policy_batch(seed: int, rows: int = 24, width: int = 10):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(rows, width, generator=gen, dtype=torch.float64) * 3
    old_logp = logp + torch.randn(rows, width, generator=gen, dtype=torch.float64) * 0.8
    ref_logp = logp + torch.randn(rows, width, generator=gen, dtype=torch.float64) * 0.5
    advantages = torch.randn(rows, generator=gen, dtype=torch.float64) * 1.5
    mask = _response_mask(gen, rows, width).double()
    return logp, old_logp, ref_logp, advantages, mask


def _verl_actor_config(clip_ratio_c: float, **global_batch_info):
    from omegaconf import OmegaConf

    return OmegaConf.create(
        {
            "clip_ratio": 0.2,
            "clip_ratio_low": 0.2,
            "clip_ratio_high": 0.28,
            "clip_ratio_c": clip_ratio_c,
            "global_batch_info": dict(global_batch_info),
        }
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clipped_policy_loss_matches_verl(verl_algos, seed):
    logp, old_logp, _, advantages, mask = _policy_batch(seed)
    token_adv = advantages[:, None] * mask
    assert (advantages < 0).any() and (advantages > 0).any()
    per_token, clip_fraction = clipped_policy_loss(
        logp, old_logp, advantages, mask, eps_low=0.2, eps_high=0.28
    )
    assert float(per_token[mask == 0].abs().max()) == 0.0
    ours = per_token.sum() / mask.sum()  # token-mean
    # verl always dual-clips (clip_ratio_c must be > 1): c = 1e9 never binds, i.e. plain PPO,
    # which is the paper's objective and this one's.
    theirs, metrics = verl_algos.compute_policy_loss_vanilla(
        old_log_prob=old_logp,
        log_prob=logp,
        advantages=token_adv,
        response_mask=mask,
        loss_agg_mode="token-mean",
        config=_verl_actor_config(1e9),
    )
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert clip_fraction == pytest.approx(metrics["actor/pg_clipfrac"], abs=1e-6)
    assert 0 < clip_fraction < 1


def test_k3_matches_verl(verl_algos):
    gen = torch.Generator().manual_seed(3)
    logp = -torch.rand(400, generator=gen, dtype=torch.float64) * 5
    # log-ratios spanning both clamps: |ref - logp| > 20 and k3 > 10
    ref_logp = logp + (torch.rand(400, generator=gen, dtype=torch.float64) - 0.5) * 60
    ours = k3_kl(logp, ref_logp)
    assert float(ours.max()) == 10.0 and ((ref_logp - logp).abs() > 20).any()
    for name in ("low_var_kl", "k3"):
        theirs = verl_algos.kl_penalty(logp, ref_logp, name)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    small = ref_logp.clamp(logp - 1, logp + 1)
    delta = small - logp
    torch.testing.assert_close(k3_kl(logp, small), delta.exp() - delta - 1)


def test_grpo_side_loss_matches_verl_seq_mean_token_sum_norm(verl_algos):
    logp, old_logp, ref_logp, advantages, mask = _policy_batch(5)
    max_len, beta = 16, 0.04
    ours, metrics = grpo_side_loss(
        logp, old_logp, ref_logp, advantages, mask, max_len, kl_beta=beta
    )
    pg, pg_metrics = verl_algos.compute_policy_loss_vanilla(
        old_log_prob=old_logp,
        log_prob=logp,
        advantages=advantages[:, None] * mask,
        response_mask=mask,
        loss_agg_mode="seq-mean-token-sum-norm",
        config=_verl_actor_config(1e9, loss_scale_factor=max_len),
    )
    kl = verl_algos.agg_loss(
        verl_algos.kl_penalty(logp, ref_logp, "low_var_kl"),
        mask,
        "seq-mean-token-sum-norm",
        loss_scale_factor=max_len,
    )
    torch.testing.assert_close(ours, pg + beta * kl, atol=1e-6, rtol=0)
    assert metrics["policy_loss"] == pytest.approx(float(pg), abs=1e-6)
    assert metrics["kl_loss"] == pytest.approx(float(kl), abs=1e-6)
    assert metrics["clip_fraction"] == pytest.approx(pg_metrics["actor/pg_clipfrac"], abs=1e-6)


# -- 4. GRPO side loss vs a loop over the paper's formula -------------------------------------


def _paper_side_loss(logp, old_logp, ref_logp, advantages, mask, max_len, beta, lo, hi):
    """Sequence by sequence, token by token, with 0-d tensors so autograd still works."""
    total = torch.zeros((), dtype=logp.dtype)
    kl_sum, kl_count, clipped, tokens = 0.0, 0, 0, 0
    for i in range(logp.shape[0]):
        seq = torch.zeros((), dtype=logp.dtype)
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            a = float(advantages[i])
            ratio = torch.exp(logp[i, t] - old_logp[i, t])
            clipped_ratio = torch.clamp(ratio, 1 - lo, 1 + hi)
            policy = torch.maximum(-a * ratio, -a * clipped_ratio)
            d = ref_logp[i, t] - logp[i, t]
            k3 = torch.exp(d) - d - 1
            seq = seq + policy + beta * k3
            kl_sum += float(k3.detach())
            kl_count += 1
            tokens += 1
            r = float(ratio.detach())
            clipped += int((a > 0 and r > 1 + hi) or (a < 0 and r < 1 - lo))
        total = total + seq / max_len
    return total / logp.shape[0], kl_sum / kl_count, clipped / tokens


@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_side_loss_matches_paper_loop(seed):
    logp0, old_logp, ref_logp, advantages, mask = _policy_batch(seed, rows=8, width=9)
    max_len, beta, lo, hi = 12, 0.04, 0.2, 0.28
    logp1, logp2 = logp0.clone().requires_grad_(), logp0.clone().requires_grad_()
    ours, metrics = grpo_side_loss(
        logp1,
        old_logp,
        ref_logp,
        advantages,
        mask.bool(),
        max_len,
        kl_beta=beta,
        eps_low=lo,
        eps_high=hi,
    )
    expected, kl, clip_fraction = _paper_side_loss(
        logp2, old_logp, ref_logp, advantages, mask, max_len, beta, lo, hi
    )
    ours.backward()
    expected.backward()
    torch.testing.assert_close(ours, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(logp1.grad, logp2.grad, atol=1e-10, rtol=0)
    assert metrics["loss"] == pytest.approx(float(expected.detach()), abs=1e-10)
    assert metrics["kl"] == pytest.approx(kl, abs=1e-10)
    assert metrics["clip_fraction"] == pytest.approx(clip_fraction, abs=1e-10)
    assert 0 < clip_fraction < 1


def test_grpo_on_policy_and_two_sides():
    logp0, _, ref_logp, advantages, mask = _policy_batch(9, rows=6, width=5)
    # on-policy: old_logp=None means logp.detach(); the gradient is -A / max_len per token
    logp = logp0.clone().requires_grad_()
    loss, metrics = grpo_side_loss(logp, None, None, advantages, mask, 8, kl_beta=0.0)
    loss.backward()
    expected = -(advantages[:, None] * mask).sum() / 8 / 6
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logp.grad, -advantages[:, None] * mask / 8 / 6)
    assert metrics["clip_fraction"] == 0.0 and metrics["kl"] == 0.0
    with pytest.raises(ValueError):
        grpo_side_loss(logp0, None, None, advantages, mask, 8, kl_beta=0.04)


# -- 6. the recipe knobs rl.norm_adv_by_std and rl.loss_agg_mode, against verl ----------------


@pytest.mark.parametrize("group_size", [2, 4, 8])
def test_dr_grpo_advantages_match_verl(verl_algos, group_size):
    gen = torch.Generator().manual_seed(10 + group_size)
    n = 5 * group_size
    rewards = torch.rand(n, generator=gen, dtype=torch.float64) * 0.01  # noise-sized spread
    mask = _response_mask(gen, n, 6).double()
    ours = group_advantages(rewards, group_size, norm_by_std=False)
    token_rewards = torch.zeros_like(mask)
    token_rewards[torch.arange(n), mask.sum(dim=1).long() - 1] = rewards
    theirs, _ = verl_algos.compute_grpo_outcome_advantage(
        token_level_rewards=token_rewards, response_mask=mask,
        index=np.repeat(np.arange(n // group_size), group_size), norm_adv_by_std_in_grpo=False)
    torch.testing.assert_close(ours[:, None] * mask, theirs, atol=1e-9, rtol=0)
    # r - mean keeps the rewards' scale; dividing by the std blows noise up to size ~1
    assert float(ours.abs().max()) < 0.01
    assert float(group_advantages(rewards, group_size).abs().max()) > 0.5


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_loss_agg_modes_match_verl(verl_algos, mode):
    logp, old_logp, ref_logp, advantages, mask = _policy_batch(11, rows=12, width=9)
    max_len = 16
    per_token = torch.randn(12, 9, generator=torch.Generator().manual_seed(4),
                            dtype=torch.float64) * mask
    theirs = verl_algos.agg_loss(per_token, mask, mode, loss_scale_factor=max_len)
    # 1e-7: verl's seq-mean-token-mean divides by (token count + 1e-8)
    torch.testing.assert_close(aggregate(per_token, mask.bool(), mode, max_len), theirs,
                               atol=1e-7, rtol=0)
    # and the whole side loss, policy and KL parts under the same mode
    ours, metrics = grpo_side_loss(logp, old_logp, ref_logp, advantages, mask, max_len,
                                   loss_agg_mode=mode)
    pg, kl = _verl_pg_and_kl(verl_algos, logp, old_logp, ref_logp, advantages, mask, mode,
                             max_len)
    torch.testing.assert_close(ours, pg + 0.04 * kl, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="loss_agg_mode 'token-sum'"):
        aggregate(per_token, mask.bool(), "token-sum", max_len)


def _verl_pg_and_kl(verl_algos, logp, old_logp, ref_logp, advantages, mask, mode, max_len):
    """verl's policy loss (no clipping) and k3 KL under ``mode``: the reference side loss."""
    pg, _ = verl_algos.compute_policy_loss_vanilla(
        old_log_prob=old_logp, log_prob=logp, advantages=advantages[:, None] * mask,
        response_mask=mask, loss_agg_mode=mode,
        config=_verl_actor_config(1e9, loss_scale_factor=max_len))
    kl = verl_algos.agg_loss(verl_algos.kl_penalty(logp, ref_logp, "low_var_kl"), mask, mode,
                             loss_scale_factor=max_len)
    return pg, kl


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_entropy_bonus_matches_verl(verl_algos, mode):
    """rl.entropy_coeff: verl's actor loss is pg - entropy_coeff * agg_loss(entropy) (+ the
    KL); the bonus's gradient per entropy entry is -coeff x that token's aggregation weight."""
    logp, old_logp, ref_logp, advantages, mask = _policy_batch(13, rows=12, width=9)
    max_len, coeff = 16, 0.3
    entropy = (torch.rand(12, 9, generator=torch.Generator().manual_seed(5),
                          dtype=torch.float64) * 4).requires_grad_()
    ours, metrics = grpo_side_loss(logp, old_logp, ref_logp, advantages, mask, max_len,
                                   loss_agg_mode=mode, entropy=entropy, entropy_coeff=coeff)
    pg, kl = _verl_pg_and_kl(verl_algos, logp, old_logp, ref_logp, advantages, mask, mode,
                             max_len)
    bonus = verl_algos.agg_loss(entropy.detach(), mask, mode, loss_scale_factor=max_len)
    torch.testing.assert_close(ours, pg + 0.04 * kl - coeff * bonus, atol=1e-6, rtol=0)
    assert metrics["entropy_loss"] == pytest.approx(float(bonus), abs=1e-6)
    ours.backward()
    rows, tokens = mask.shape[0], mask.sum(dim=1, keepdim=True)
    weight = {"seq-mean-token-sum-norm": mask / max_len / rows,
              "seq-mean-token-sum": mask / rows,
              "seq-mean-token-mean": mask / tokens / rows,
              "token-mean": mask / mask.sum()}[mode]
    torch.testing.assert_close(entropy.grad, -coeff * weight, atol=1e-7, rtol=1e-6)
    # 0 (the default) leaves the loss as it was; a coefficient needs the entropy
    plain, _ = grpo_side_loss(logp, old_logp, ref_logp, advantages, mask, max_len,
                              loss_agg_mode=mode)
    torch.testing.assert_close(plain, pg + 0.04 * kl, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="entropy is required"):
        grpo_side_loss(logp, old_logp, ref_logp, advantages, mask, max_len, entropy_coeff=0.1)


def test_token_mean_over_micro_batches_and_ranks_is_the_step_mean():
    """What the learner does for token-mean: each micro-batch's token sum over
    ``token_divisor`` = step tokens / (ranks x micro-batches per side); averaging those losses
    (DeepSpeed over micro-batches, data parallelism over ranks) gives the step's token mean."""
    gen = torch.Generator().manual_seed(7)
    ranks, micro, rows, width = 2, 3, 4, 10
    values = torch.randn(ranks, micro, rows, width, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, width + 1, (ranks, micro, rows), generator=gen)
    mask = torch.arange(width) < lengths[..., None]
    divisor = float(mask.sum()) / (ranks * micro)
    averaged = sum(aggregate(values[r, m] * mask[r, m], mask[r, m], "token-mean", 1, divisor)
                   for r in range(ranks) for m in range(micro)) / (ranks * micro)
    expected = float(values[mask].sum()) / int(mask.sum())
    assert float(averaged) == pytest.approx(expected, abs=1e-12)
    # without the divisor each micro-batch's own mean is averaged: a length bias
    naive = sum(aggregate(values[r, m] * mask[r, m], mask[r, m], "token-mean", 1)
                for r in range(ranks) for m in range(micro)) / (ranks * micro)
    assert abs(float(naive) - expected) > 1e-3


def test_the_learners_token_divisor_counts_the_sides_tokens_per_micro_batch():
    """``learner._token_divisor`` (one process): the side's completion tokens over its
    micro-batches, so the micro-batch losses average to the side's token mean."""
    from umerl.train.learner import _token_divisor

    batches = [{"inputs": {"completion_lengths": torch.tensor([3, 5])}},
               {"inputs": {"completion_lengths": torch.tensor([2, 6])}}]
    assert _token_divisor(batches) == (3 + 5 + 2 + 6) / 2
