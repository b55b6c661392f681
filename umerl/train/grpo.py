"""GRPO numerics for UME-R1 stage 2 (docs/method.md, 'Stage 2: GRPO').

Per side (query rollouts, target rollouts), with N = pairs x G sampled completions::

    A_i      = (r_i - mean_g(r)) / (std_g(r) + eps)             unbiased std, eps 1e-4
               (rl.norm_adv_by_std=false, Dr. GRPO: A_i = r_i - mean_g(r))
    rho_it   = exp(logp_it - old_logp_it)
    pg_it    = max(-A_i rho_it, -A_i clip(rho_it, 1 - eps_low, 1 + eps_high))   eps 0.2 / 0.28
    k3_it    = exp(ref_it - logp_it) - (ref_it - logp_it) - 1
    L_side   = agg(pg_it + beta k3_it) - c agg(H_it)                              beta 0.04
    L        = (L_query + L_target) / 2

``H_it`` is the entropy of the policy's next-token distribution (at the rollout temperature)
where token t was sampled, and ``c`` is ``rl.entropy_coeff`` (verl's name; default 0: no
bonus): a positive ``c`` rewards keeping the sampling distribution spread, against the policy
collapsing onto a few answers. ``agg`` is ``rl.loss_agg_mode`` (verl's names), over the side's
N sequences x T tokens:

    seq-mean-token-sum-norm  mean_i [ sum_t x_it / max_completion_length ]    (the default)
    seq-mean-token-sum       mean_i [ sum_t x_it ]
    seq-mean-token-mean      mean_i [ sum_t x_it / T_i ]                      (T_i: i's tokens)
    token-mean               sum_i sum_t x_it / sum_i T_i       over the whole step's side

Every constant is a parameter. Notes against verl 0.9.1 ``verl.trainer.ppo.core_algos`` (the
cross-check reference in tests/test_losses.py):

* Advantages: verl's ``compute_grpo_outcome_advantage`` uses the same formula (its default
  epsilon is 1e-6, pass 1e-4). For a group of size 1 verl uses mean 0 and std 1, i.e. A = r /
  (1 + eps); here a single sample has no group baseline, so its advantage is 0.
* Clamping: like verl, the log-ratio is clamped to [-20, 20] before ``exp`` (policy ratio and
  k3), and k3 itself is clamped to [-10, 10]. The clamps zero the gradient where they bind.
* Dual clip: verl's ``compute_policy_loss_vanilla`` always applies dual-clip PPO for A < 0
  (loss capped at -A * clip_ratio_c, default 3). The paper does not, and neither does this.
* Aggregation: the default is verl's ``seq-mean-token-sum-norm`` mode with
  ``loss_scale_factor = max_completion_length`` (TRL calls it ``dr_grpo``), except that verl
  drops fully masked sequences from the mean, while here every sequence counts (a sampled
  completion always has at least one token, so the two agree in practice).
* Data parallel: the seq-mean modes are a mean over the LOCAL sequences; DP gradient averaging
  over ranks (and DeepSpeed's over micro-batches) holding equal numbers of sequences gives the
  global mean. ``token-mean`` divides each micro-batch's token sum by ``token_divisor``, the
  side's token count over the whole step divided by the number of micro-batches that average
  into the update, so that the averaged gradient is the step-wide token mean (verl passes its
  ``batch_num_tokens`` for the same reason).
"""

from __future__ import annotations

import torch
from torch import Tensor

from umerl.config.schema import LOSS_AGG_MODES


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4,
                     norm_by_std: bool = True) -> Tensor:
    """Group-normalised advantages ``(r - mean_g) / (std_g + eps)``, unbiased std.

    Args:
        rewards: [N] scalar rewards, ordered group-major: group g is rows g*G .. g*G + G - 1.
        group_size: G; N must be a multiple of it.
        eps: added to the std (the paper: 1e-4).
        norm_by_std: False gives Dr. GRPO's ``r - mean_g`` (no division: a group whose rewards
            differ by noise alone gets advantages of the noise's size, not of size 1).

    Returns:
        [N] advantages (detached, float32 or wider). A group with identical rewards gets 0.
        For G == 1 every advantage is 0: a single sample has no group baseline (verl instead
        returns r / (1 + eps) for size-1 groups).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [N], got {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    rewards = rewards.detach()
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    if group_size == 1:
        return torch.zeros_like(rewards)
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if not norm_by_std:
        return centred.reshape(-1)
    std = grouped.std(dim=1, keepdim=True, unbiased=True)
    return (centred / (std + eps)).reshape(-1)


def k3_kl(
    logp: Tensor, ref_logp: Tensor, log_ratio_clamp: float = 20.0, value_clamp: float = 10.0
) -> Tensor:
    """Per-token k3 estimator of KL(policy || reference): ``exp(d) - d - 1``, d = ref - logp.

    ``d`` is clamped to [-log_ratio_clamp, log_ratio_clamp] before ``exp`` and the result to
    [-value_clamp, value_clamp], exactly as verl's ``kl_penalty(..., "low_var_kl")``.
    """
    delta = (ref_logp - logp).clamp(-log_ratio_clamp, log_ratio_clamp)
    return (torch.exp(delta) - delta - 1).clamp(-value_clamp, value_clamp)


def _masked_mean(values: Tensor, mask: Tensor) -> float:
    count = int(mask.sum())
    if count == 0:
        return 0.0
    return float(torch.where(mask, values, torch.zeros_like(values)).sum() / count)


def _token_advantages(advantages: Tensor, like: Tensor) -> Tensor:
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    return advantages.to(like.dtype).expand_as(like)


def clipped_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    log_ratio_clamp: float = 20.0,
) -> tuple[Tensor, float]:
    """Token-level PPO clipped objective (as a loss to minimise).

    Args:
        logp, old_logp: [N, T] per-token log-probs of the sampled tokens under the current policy
            and the policy that sampled them.
        advantages: [N] (one per sequence, broadcast over tokens) or [N, T].
        mask: [N, T] valid completion tokens (bool or 0/1).
        eps_low, eps_high: ratio clip range [1 - eps_low, 1 + eps_high].
        log_ratio_clamp: logp - old_logp is clamped to +-this before ``exp``.

    Returns:
        per_token_loss: [N, T], ``max(-A r, -A clip(r))``, 0 where mask is False.
        clip_fraction: share of valid tokens where the clipped term is the active one (verl's
            ``pg_clipfrac``).
    """
    mask = mask.bool()
    adv = _token_advantages(advantages, logp)
    ratio = torch.exp((logp - old_logp).clamp(-log_ratio_clamp, log_ratio_clamp))
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - eps_low, 1 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    clip_fraction = _masked_mean((clipped > unclipped).to(logp.dtype), mask)
    return torch.where(mask, loss, torch.zeros_like(loss)), clip_fraction


def aggregate(per_token: Tensor, mask: Tensor, mode: str, max_completion_length: int,
              token_divisor: float | None = None) -> Tensor:
    """``per_token`` [N, T] (0 where ``mask`` is False) to one number, by ``mode`` (one of
    ``LOSS_AGG_MODES``; the formulas are in the module docstring). ``token_divisor``: the
    divisor of ``token-mean`` (default: this batch's own token count)."""
    rows = per_token.shape[0]
    sums = per_token.sum(dim=1)
    if mode == "seq-mean-token-sum-norm":
        return sums.div(max_completion_length).sum() / rows
    if mode == "seq-mean-token-sum":
        return sums.sum() / rows
    if mode == "seq-mean-token-mean":
        return (sums / mask.sum(dim=1).clamp(min=1)).sum() / rows
    if mode == "token-mean":
        divisor = float(mask.sum()) if token_divisor is None else float(token_divisor)
        return sums.sum() / max(divisor, 1.0)
    raise ValueError(f"loss_agg_mode {mode!r}: expected one of {', '.join(LOSS_AGG_MODES)}")


def grpo_side_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    max_completion_length: int,
    kl_beta: float = 0.04,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    loss_agg_mode: str = "seq-mean-token-sum-norm",
    token_divisor: float | None = None,
    entropy: Tensor | None = None,
    entropy_coeff: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO loss of one side (query or target rollouts):
    ``agg(pg + kl_beta * k3) - entropy_coeff * agg(entropy)``.

    Args:
        logp: [N, T] current-policy log-probs (with grad).
        old_logp: [N, T] sampling-policy log-probs; ``None`` = fully on-policy (``logp.detach()``,
            so the ratio is 1 but its gradient is the policy gradient).
        ref_logp: [N, T] frozen-reference log-probs; may be ``None`` only when kl_beta == 0.
        advantages: [N] or [N, T]; mask: [N, T] valid completion tokens.
        max_completion_length: the constant divisor of ``seq-mean-token-sum-norm`` (the
            generation limit), not the batch's T.
        loss_agg_mode, token_divisor: see ``aggregate``.
        entropy: [N, T] per-token entropy of the current policy (with grad); required when
            entropy_coeff != 0 (verl subtracts ``entropy_coeff * agg(entropy)`` likewise).

    Returns:
        (loss, metrics): metrics hold ``policy_loss`` and ``kl_loss`` (the two parts of the loss
        under the same aggregation: loss = policy_loss + kl_beta * kl_loss - entropy_coeff *
        entropy_loss, ``entropy_loss`` logged when ``entropy`` is given), ``kl`` (masked
        token mean of k3), ``clip_fraction``, ``ratio_mean`` (masked token mean of the
        importance ratio) and ``loss``.
    """
    if max_completion_length <= 0:
        raise ValueError("max_completion_length must be positive")
    mask = mask.bool()
    if old_logp is None:
        old_logp = logp.detach()
    pg, clip_fraction = clipped_policy_loss(logp, old_logp, advantages, mask, eps_low, eps_high)

    def agg(per_token: Tensor) -> Tensor:
        return aggregate(per_token, mask, loss_agg_mode, max_completion_length, token_divisor)

    policy_loss = agg(pg)
    if ref_logp is None:
        if kl_beta != 0:
            raise ValueError("ref_logp is required when kl_beta != 0")
        kl_tok = torch.zeros_like(logp)
    else:
        kl_tok = torch.where(mask, k3_kl(logp, ref_logp), torch.zeros_like(logp))
    kl_loss = agg(kl_tok)
    loss = policy_loss + kl_beta * kl_loss
    extra: dict[str, float] = {}
    if entropy is None:
        if entropy_coeff != 0:
            raise ValueError("entropy is required when entropy_coeff != 0")
    else:
        entropy_loss = agg(torch.where(mask, entropy, torch.zeros_like(entropy)))
        loss = loss - entropy_coeff * entropy_loss
        extra["entropy_loss"] = float(entropy_loss.detach())
    metrics = {
        "loss": float(loss.detach()),
        "policy_loss": float(policy_loss.detach()),
        "kl_loss": float(kl_loss.detach()),
        "kl": _masked_mean(kl_tok.detach(), mask),
        "clip_fraction": clip_fraction,
        # Token mean of rho = exp(logp - old_logp): 1 on-policy, off 1 for stale rollouts.
        "ratio_mean": _masked_mean(torch.exp((logp - old_logp).detach().clamp(-20, 20)), mask),
        **extra,
    }
    return loss, metrics
