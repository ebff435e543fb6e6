"""Archer ("Stabilizing Knowledge, Promoting Reasoning: Dual-Token Constraints", arXiv 2507.15778), a baseline of
the HAPO paper's Table 1.

Tokens are split per response at the ``q``-quantile of that response's old-policy token entropies. High-entropy
("reasoning") tokens get a wider clip range and a weaker KL to the reference policy; low-entropy ("knowledge")
tokens get the base clip range and a stronger KL. All tokens are updated together:

    ℓ = (1/N) Σ_{i,t} [ ℓ^PPO_{i,t}(ε_{c(i,t)}) + β_{c(i,t)} · KL̂_{i,t}(π_θ ‖ π_ref) ],   c ∈ {low, high}

ℓ^PPO is verl's dual-clip PPO token loss with per-token clip ranges. The low class uses ``actor.clip_ratio_low/high``
and ``actor.kl_loss_coef``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from hapo_verl.algorithms.ppo import (dual_clip_ppo_token_loss, masked_mean, ppo_metrics, scalar_like,
                                       validate_quantile)
from hapo_verl.registry import OLD_ENTROPY, LossInputs, algorithm, option

PAPER = "Archer, arXiv 2507.15778 (https://arxiv.org/abs/2507.15778)"


@dataclass
class ArcherOptions:
    """``actor_rollout_ref.actor.policy_loss.*`` with ``loss_mode=archer``."""

    archer_entropy_quantile: float = option(
        0.8, "A token is high-entropy when its old-policy entropy is above this quantile of its own response's "
        "token entropies.", low=0.0, high=1.0, high_open=True, paper=PAPER + " (authors' scripts: 0.8)")
    high_entropy_clip_ratio_low: float = option(0.5, "Lower clip range ε of high-entropy tokens.", low=0.0,
                                                high=1.0, paper=PAPER + " (authors' v1 scripts: 0.5)")
    high_entropy_clip_ratio_high: float = option(0.5, "Upper clip range ε of high-entropy tokens.", low=0.0,
                                                 paper=PAPER + " (authors' v1 scripts: 0.5)")
    high_entropy_kl_coef: float = option(0.0, "KL coefficient of high-entropy tokens (low-entropy tokens use "
                                         "actor.kl_loss_coef; needs actor.use_kl_loss=true).", low=0.0,
                                         paper=PAPER + " (authors' scripts: 0.0)")


def response_entropy_quantile_mask(entropy: torch.Tensor, response_mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """True for the valid tokens whose entropy is **above** the ``quantile`` of their own response's valid-token
    entropies (linear interpolation, as ``torch.nanquantile``). A row's split depends on that row only, so it is the
    same in any micro-batch."""
    quantile = validate_quantile(quantile, "archer_entropy_quantile")
    mask = response_mask.bool()
    masked = torch.where(mask, entropy.detach().to(torch.float32),
                         torch.full_like(entropy, float("nan"), dtype=torch.float32))
    thresholds = torch.nanquantile(masked, quantile, dim=-1, keepdim=True)  # nan for rows without valid token
    return mask & (masked > thresholds)


def archer_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    high_entropy: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    high_clip_low: float,
    high_clip_high: float,
    clip_ratio_c: float,
    aggregate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ref_log_prob: torch.Tensor | None = None,
    kl_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    low_kl_coef: float = 0.0,
    high_kl_coef: float = 0.0,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Archer's dual-token loss (module docstring). ``high_entropy`` (B, L) bool marks the reasoning tokens. The KL
    term is added when ``ref_log_prob`` is given: per token β_low or β_high times ``kl_fn(log_prob, ref_log_prob)``,
    aggregated like the policy term. ``kl_low``/``kl_high`` are local means of the KL over each class."""
    high = high_entropy.bool() & response_mask.bool()
    like = log_prob.detach()  # the four ranges are written on the device: no host-to-device copy
    clip_lo = torch.where(high, scalar_like(high_clip_low, like), scalar_like(clip_low, like))
    clip_hi = torch.where(high, scalar_like(high_clip_high, like), scalar_like(clip_high, like))
    pg_losses, info = dual_clip_ppo_token_loss(old_log_prob, log_prob, advantages, clip_lo, clip_hi, clip_ratio_c)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    loss = aggregate(pg_losses, response_mask)
    mask = response_mask.bool()
    low = mask & ~high
    metrics = {}
    if ref_log_prob is not None:
        if kl_fn is None:
            raise ValueError("archer_policy_loss: kl_fn is required with ref_log_prob")
        kld = kl_fn(log_prob, ref_log_prob)
        kl_like = kld.detach()
        coef = torch.where(high, scalar_like(high_kl_coef, kl_like), scalar_like(low_kl_coef, kl_like))
        loss = loss + aggregate(kld * coef, response_mask)
        metrics["kl_low"] = masked_mean(kld, low)
        metrics["kl_high"] = masked_mean(kld, high)
    metrics.update(ppo_metrics(info, mask))
    metrics.update({
        "high_entropy_frac": masked_mean(high, mask),
        "clipfrac_high_entropy": masked_mean(info["clipped"], high),
        "clipfrac_low_entropy": masked_mean(info["clipped"], low),
    })
    return loss, metrics


@algorithm("loss", name="archer", title="Archer", paper=PAPER,
           summary="Per-response entropy split: wider clip and weaker KL on high-entropy tokens.",
           loss_options=ArcherOptions, loss_needs=frozenset({OLD_ENTROPY}), loss_handles_kl=True)
def archer_loss(inputs: LossInputs, options: ArcherOptions):
    high = response_entropy_quantile_mask(inputs.entropy, inputs.response_mask, options.archer_entropy_quantile)
    use_kl = inputs.ref_log_prob is not None
    return archer_policy_loss(
        inputs.old_log_prob, inputs.log_prob, inputs.advantages, inputs.response_mask, high,
        clip_low=inputs.clip_low, clip_high=inputs.clip_high, high_clip_low=options.high_entropy_clip_ratio_low,
        high_clip_high=options.high_entropy_clip_ratio_high, clip_ratio_c=inputs.clip_ratio_c,
        aggregate=lambda mat, mask: inputs.aggregate(mat, mask),
        ref_log_prob=inputs.ref_log_prob if use_kl else None,
        kl_fn=(lambda lp, ref: inputs.kl(lp, ref, inputs.kl_type)) if use_kl else None,
        low_kl_coef=float(inputs.kl_coef), high_kl_coef=options.high_entropy_kl_coef,
        rollout_is_weights=inputs.rollout_is_weights)
