"""Asymmetric Adaptive Clipping, Differential Advantage Redistribution and the HAPO policy loss.

Pure torch (verl's ``agg_loss`` is injected by the caller so that this file imports nothing from verl).

Asymmetric Adaptive Clipping (per token, α = clip_alpha):
    ĥ ≤ 0:  ε_low' = ε_low · (1 - α ĥ),   ε_high' = ε_high          (low entropy: allow the ratio further down)
    ĥ > 0:  ε_low' = ε_low,               ε_high' = ε_high · (1 + α ĥ)  (high entropy: allow it further up)

Differential Advantage Redistribution (per token, β = adv_beta, r = π_θ/π_old):
    neutral band  NB = (1 - ε_low'/2, 1 + ε_high'/2)
    A_ent = A · (1 + β ĥ)
    ĥ > 0:  A' = A      if r ∈ NB else A_ent      (exploring, high-entropy token: amplify)
    ĥ ≤ 0:  A' = A_ent  if r ∈ NB else A          (confident, low-entropy token at rest: attenuate)

Loss (dual-clip PPO with per-token ranges, c = clip_ratio_c):
    ℓ = max(-A' r, -A' clip(r, 1 - ε_low', 1 + ε_high'));   ℓ = min(ℓ, -A' c) where A' < 0
"""

from __future__ import annotations

from typing import Callable

import torch

from hapo_verl.algorithms.ppo import dual_clip_token_losses


def adaptive_clip_ranges(
    h_hat: torch.Tensor, clip_low: float, clip_high: float, clip_alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clip ranges (ε_low', ε_high') from ĥ (Asymmetric Adaptive Clipping)."""
    low = clip_low * (1.0 - clip_alpha * h_hat.clamp(max=0.0))
    high = clip_high * (1.0 + clip_alpha * h_hat.clamp(min=0.0))
    return low, high


def redistribute_advantage(
    advantages: torch.Tensor,
    ratio: torch.Tensor,
    h_hat: torch.Tensor,
    eps_low: torch.Tensor | float,
    eps_high: torch.Tensor | float,
    adv_beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differential Advantage Redistribution. Returns (A', modulated) where ``modulated`` marks the tokens
    whose advantage was multiplied by (1 + β ĥ)."""
    in_band = (ratio > 1.0 - eps_low / 2) & (ratio < 1.0 + eps_high / 2)
    modulated = torch.where(h_hat > 0, ~in_band, in_band)
    redistributed = torch.where(modulated, advantages * (1.0 + adv_beta * h_hat), advantages)
    return redistributed, modulated


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    # a dot product reads both tensors once and allocates nothing
    return torch.dot(values.detach().reshape(-1).to(mask.dtype), mask.reshape(-1)) / count


def hapo_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    h_hat: torch.Tensor | None,
    *,
    clip_low: float,
    clip_high: float,
    clip_ratio_c: float,
    adaptive_clip: bool,
    clip_alpha: float,
    adaptive_advantage: bool,
    adv_beta: float,
    aggregate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """HAPO PPO loss. ``aggregate(loss_mat, mask)`` reduces the token losses (verl's ``agg_loss`` with the
    global batch info bound). With ``adaptive_clip`` and ``adaptive_advantage`` off this is verl's vanilla
    dual-clip loss, bit for bit.

    Returns the scalar loss and a dict of 0-dim detached metric tensors.
    """
    # metrics in float32 whatever the model dtype (a bf16 token count is inexact past 256)
    mask_f = response_mask.to(torch.float32)
    count = mask_f.sum().clamp_min(1.0)

    log_ratio = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)

    with torch.no_grad():
        if adaptive_clip:
            # ratio bounds 1 - ε_low' and 1 + ε_high' (same values as adaptive_clip_ranges, fewer passes)
            lower = h_hat.clamp(max=0.0).mul_(clip_low * clip_alpha).add_(1.0 - clip_low)
            upper = h_hat.clamp(min=0.0).mul_(clip_high * clip_alpha).add_(1.0 + clip_high)
        else:
            lower, upper = 1.0 - clip_low, 1.0 + clip_high
        modulated = None
        if adaptive_advantage:
            # neutral band (1 - ε_low'/2, 1 + ε_high'/2) == ((1 + lower)/2, (1 + upper)/2): test 2r - 1 instead
            stretched = ratio.detach().mul(2.0).sub_(1.0)
            in_band = (stretched > lower).logical_and_(stretched < upper)
            high_entropy = h_hat > 0
            modulated = in_band.logical_xor_(high_entropy)
            factor = (h_hat * adv_beta).add_(1.0)
            advantages = torch.where(modulated, advantages * factor, advantages)

    if adaptive_clip:
        clipped_ratio = torch.minimum(torch.maximum(ratio, lower), upper)
    else:
        clipped_ratio = torch.clamp(ratio, lower, upper)
    pg_losses, clipped, clipped_lower = dual_clip_token_losses(advantages, ratio, clipped_ratio, clip_ratio_c)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    loss = aggregate(pg_losses, response_mask)

    with torch.no_grad():
        metrics = {
            "pg_clipfrac": _masked_mean(clipped, mask_f, count),
            "ppo_kl": -_masked_mean(log_ratio.detach(), mask_f, count),
            "pg_clipfrac_lower": _masked_mean(clipped_lower, mask_f, count),
        }
        if h_hat is not None:
            high = (h_hat > 0).to(mask_f.dtype).mul_(mask_f)
            n_high = high.sum()
            n_low = torch.where(mask_f.sum() > 0, count - n_high, n_high)  # no host sync
            clipped_f = clipped.to(mask_f.dtype)
            clipped_high = torch.dot(clipped_f.view(-1), high.view(-1))
            clipped_all = metrics["pg_clipfrac"] * count
            metrics["h_hat_mean"] = _masked_mean(h_hat, mask_f, count)
            metrics["clipfrac_high_entropy"] = clipped_high / n_high.clamp_min(1.0)
            metrics["clipfrac_low_entropy"] = (clipped_all - clipped_high) / n_low.clamp_min(1.0)
            metrics["high_entropy_frac"] = n_high / count
            if modulated is not None and adv_beta != 0:
                mod = modulated.to(mask_f.dtype).mul_(mask_f).masked_fill_(h_hat == 0, 0.0)
                amplified = torch.dot(mod.view(-1), high.view(-1))
                metrics["amplified_frac"] = amplified / count
                metrics["attenuated_frac"] = (mod.sum() - amplified) / count
            else:
                zero = torch.zeros((), dtype=mask_f.dtype, device=mask_f.device)
                metrics["amplified_frac"] = zero
                metrics["attenuated_frac"] = zero
            if adaptive_clip:
                metrics["clip_lower_bound_mean"] = _masked_mean(lower, mask_f, count)
                metrics["clip_upper_bound_mean"] = _masked_mean(upper, mask_f, count)
            else:
                # Python numbers: written on the device, no host-to-device copy
                metrics["clip_lower_bound_mean"] = torch.full((), 1.0 - clip_low, device=mask_f.device)
                metrics["clip_upper_bound_mean"] = torch.full((), 1.0 + clip_high, device=mask_f.device)
    return loss, metrics
