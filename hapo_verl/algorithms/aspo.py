"""ASPO ("Asymmetric Importance Sampling Policy Optimization", arXiv 2510.06062).

Positive-advantage tokens get the flipped importance weight π_old/π_θ instead of π_θ/π_old, with a soft dual clip
that caps it at c; negative-advantage tokens keep verl's dual-clip PPO. Per token, as ∂loss/∂log π before
aggregation (r = π_θ/π_old, A the advantage, ε_l/ε_h verl's clip_ratio_low/high, c verl's clip_ratio_c):

    A > 0 and r ≤ 1 + ε_h :   −A · min(1/r, c)          (flipped weight, soft dual clip)
    A > 0 and r > 1 + ε_h :   0
    A < 0                 :   −r · A for 1 − ε_l ≤ r ≤ c, 0 outside   (verl's dual-clip PPO)

The authors' code (wizard-III/Archer2.0 ``compute_policy_loss_archer``) writes the positive branch as
−A·(r̂/sg(r̂))/sg(r̂) with r̂ = min(r, 1 + ε_h), and −A·c·log π where 1/r̂ > c. Here the value of a positive token
is −A/r̂ everywhere (theirs is −A·c·log π inside the soft dual clip: a value without meaning, same gradient) and the
gradient is added as ``w · (log π − sg(log π))``. Their code also applies the soft dual clip to negative tokens
(gradient −c·A for r > c instead of 0): ``negative_soft_dual_clip=true``.

Like Archer (arXiv 2507.15778), the authors' code widens the clip range of each response's high-entropy tokens
(entropy above the response's ``entropy_quantile``) to ``high_entropy_clip_ratio`` on both sides:
``entropy_clip``. Their mask variable is named inversely (``high_entropy_mask`` holds the *low*-entropy tokens) and
used inversely, so the two inversions cancel; this module names the mask for what it holds. docs/aspo.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from hapo_verl.algorithms.ppo import dual_clip_ppo_token_loss, masked_mean, ppo_metrics, validate_quantile
from hapo_verl.registry import CURRENT_ENTROPY, OLD_ENTROPY, LossInputs, algorithm, option

PAPER = "ASPO, arXiv 2510.06062 (https://arxiv.org/abs/2510.06062)"
CODE = "authors' code, linked from the abstract (docs/aspo.md)"


@dataclass
class ASPOOptions:
    """``actor_rollout_ref.actor.policy_loss.*`` with ``loss_mode=aspo``."""

    entropy_clip: bool = option(
        True, "Widen the clip range of each response's high-entropy tokens to high_entropy_clip_ratio (both sides), "
        "as the dual-token clip of arXiv 2507.15778; false: one clip range for every token (then the loss needs no "
        "entropy and also runs through verl's standard signature).", paper=PAPER + f" ({CODE}: always on in its ASPO training script)")
    high_entropy_clip_ratio: float = option(
        0.4, "Clip range ε of high-entropy tokens (lower bound 1 − ε for negative, upper bound 1 + ε for positive "
        "advantages); the others use clip_ratio_low/high.", low=0.0, high=1.0, paper=PAPER + f" ({CODE}: 0.4)")
    entropy_quantile: float = option(
        0.8, "A token is high-entropy when its entropy is above this quantile of its own response's token "
        "entropies.", low=0.0, high=1.0, high_open=True, paper=PAPER + f" ({CODE}: token_entropy_quantile 0.8)")
    entropy_source: str = option(
        "current", "Entropy that splits the tokens: current (the update's forward pass, as the authors' code; needs "
        "actor.calculate_entropy=true) or old (the old policy's, fixed for the whole step).",
        choices=("current", "old"), paper=CODE)
    negative_soft_dual_clip: bool = option(
        False, "Also soften the dual clip of negative-advantage tokens: gradient −c·A where r > c instead of 0 "
        "(the authors' code); false: verl's dual-clip PPO.", paper=CODE)


def response_high_entropy_mask(entropy: torch.Tensor, response_mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """True for the valid tokens whose entropy is above the ``quantile`` of their own response's valid-token
    entropies (linear interpolation, as ``torch.nanquantile`` and the authors' code). A row's split depends on that
    row only, so it is the same in any micro-batch."""
    quantile = validate_quantile(quantile, "entropy_quantile")
    mask = response_mask.bool()
    masked = torch.where(mask, entropy.detach().to(torch.float32),
                         torch.full_like(entropy, float("nan"), dtype=torch.float32))
    thresholds = torch.nanquantile(masked, quantile, dim=-1, keepdim=True)
    return mask & (masked > thresholds)


def aspo_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    high_entropy: torch.Tensor | None,
    *,
    clip_low: float,
    clip_high: float,
    high_clip: float,
    clip_ratio_c: float,
    aggregate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    negative_soft_dual_clip: bool = False,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ASPO's token loss (module docstring). ``high_entropy`` (B, L) bool gets the clip range ``high_clip``; None
    gives every token ``clip_low``/``clip_high``."""
    if high_entropy is not None:
        high = high_entropy.bool()
        like = dict(dtype=log_prob.dtype, device=log_prob.device)
        eps_low = torch.where(high, torch.tensor(high_clip, **like), torch.tensor(clip_low, **like))
        eps_high = torch.where(high, torch.tensor(high_clip, **like), torch.tensor(clip_high, **like))
    else:
        eps_low, eps_high = clip_low, clip_high
    # negative advantages (and the shared masks/metrics): verl's dual-clip PPO
    pg_losses, info = dual_clip_ppo_token_loss(old_log_prob, log_prob, advantages, eps_low, eps_high, clip_ratio_c)
    with torch.no_grad():
        positive = advantages > 0
        # r̂ = min(r, 1 + ε_h); PPO clips a positive token exactly where r > 1 + ε_h (info["clipped"])
        ratio = info["ratio"].detach()
        r_hat = torch.minimum(ratio, 1.0 + eps_high) if isinstance(eps_high, torch.Tensor) else \
            ratio.clamp(max=1.0 + eps_high)
        inv = r_hat.reciprocal_()  # 1/r̂
        pos_value = -advantages * inv
        # ∂loss/∂log π of a positive token: −A·min(1/r, c) in the band, 0 above it (clipped)
        weight = torch.where(info["clipped"], 0.0, inv.clamp_(max=clip_ratio_c)).mul_(advantages).neg_()
        soft_dual = inv >= clip_ratio_c  # after the clamp: 1/r ≥ c, the weight is capped at c
        if negative_soft_dual_clip:
            neg_soft = (advantages < 0) & (ratio > clip_ratio_c)
            weight = torch.where(positive, weight, torch.where(neg_soft, advantages * -clip_ratio_c, 0.0))
    grad_term = weight * (log_prob - log_prob.detach())  # value 0, gradient ``weight``
    if negative_soft_dual_clip:  # vanilla's gradient is 0 where r > c: the term adds −c·A there
        pg_losses = torch.where(positive, pos_value + grad_term, pg_losses + grad_term)
    else:
        pg_losses = torch.where(positive, pos_value + grad_term, pg_losses)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    loss = aggregate(pg_losses, response_mask)
    mask = response_mask.bool()
    metrics = ppo_metrics(info, mask)
    metrics["pos_soft_dual_clip_frac"] = masked_mean(soft_dual & positive, mask)
    if high_entropy is not None:
        metrics["high_entropy_frac"] = masked_mean(high_entropy, mask)
    return loss, metrics


def aspo_needs(options: ASPOOptions) -> frozenset:
    """Without the entropy clip ASPO needs nothing (and runs through verl's standard signature)."""
    if not options.entropy_clip:
        return frozenset()
    return frozenset({CURRENT_ENTROPY if options.entropy_source == "current" else OLD_ENTROPY})


@algorithm("loss", name="aspo", title="ASPO", paper=PAPER,
           summary="Flipped importance weight π_old/π (soft dual clip at c) on positive-advantage tokens; "
                   "optional wider clip on high-entropy tokens.",
           loss_options=ASPOOptions, loss_needs=aspo_needs)
def aspo_loss(inputs: LossInputs, options: ASPOOptions):
    high = None
    if options.entropy_clip:
        high = response_high_entropy_mask(inputs.entropy, inputs.response_mask, options.entropy_quantile)
    return aspo_policy_loss(
        inputs.old_log_prob, inputs.log_prob, inputs.advantages, inputs.response_mask, high,
        clip_low=inputs.clip_low, clip_high=inputs.clip_high, high_clip=options.high_entropy_clip_ratio,
        clip_ratio_c=inputs.clip_ratio_c, aggregate=lambda mat, mask: inputs.aggregate(mat, mask),
        negative_soft_dual_clip=options.negative_soft_dual_clip, rollout_is_weights=inputs.rollout_is_weights)
