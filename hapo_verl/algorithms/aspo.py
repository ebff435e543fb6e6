"""ASPO ("Asymmetric Importance Sampling Policy Optimization", arXiv 2510.06062; v2 is titled "When Importance
Sampling Misallocates Credit: Asymmetric Ratios for Outcome-Supervised RL").

§6 of the paper (v2), three steps. Step 1: PPO's hard clip masks A < 0 tokens with r < 1 − ε_low and A > 0 tokens
with r > 1 + ε_high. Step 2: positive-advantage tokens get the flipped ratio r̂ = π_old·π_θ / sg(π_θ²) (Eq. 3; value
π_old/π_θ = 1/r, gradient (1/r)·A·∇log π, Appendix A.2 Eq. 12); negative ones keep r. Step 3: a soft dual clip
(CISPO's: the value is clipped, the gradient kept) caps the positive tokens' weight at c; negative tokens keep PPO's
usual (hard) dual clip. Per token, as ∂loss/∂log π before aggregation (r = π_θ/π_old, A the advantage, ε_l/ε_h
verl's clip_ratio_low/high, c verl's clip_ratio_c):

    A > 0 and r ≤ 1 + ε_h :   −A · min(1/r, c)          (flipped weight, soft dual clip)
    A > 0 and r > 1 + ε_h :   0
    A < 0                 :   −r · A for 1 − ε_l ≤ r ≤ c, 0 outside   (verl's dual-clip PPO)

The authors' code (wizard-III/Archer2.0 ``compute_policy_loss_archer``) writes the positive branch as
−A·(r̂/sg(r̂))/sg(r̂) with r̂ = min(r, 1 + ε_h), and −A·c·log π where 1/r̂ > c. Here the value of a positive token
is −A/r̂ everywhere (theirs is −A·c·log π inside the soft dual clip: a value without meaning, same gradient) and the
gradient is added as ``w · (log π − sg(log π))``. Their code also applies the soft dual clip to negative tokens
(gradient −c·A for r > c instead of 0): ``negative_soft_dual_clip=true``.

The paper's clip range is one ε for every token (ε = 0.2, Appendix B). The authors' code (Archer2.0 builds on Archer,
arXiv 2507.15778) also widens the clip range of each response's high-entropy tokens (entropy above the response's
``entropy_quantile``) to ``high_entropy_clip_ratio`` on both sides: ``entropy_clip=true``. Their mask variable is
named inversely (``high_entropy_mask`` holds the *low*-entropy tokens) and used inversely, so the two inversions
cancel; this module names the mask for what it holds. docs/aspo.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from hapo_verl.algorithms.ppo import (dual_clip_ppo_token_loss, masked_mean_fn, ppo_metrics, scalar_like,
                                       validate_quantile)
from hapo_verl.registry import CURRENT_ENTROPY, OLD_ENTROPY, LossInputs, algorithm, option

PAPER = "ASPO, arXiv 2510.06062 (https://arxiv.org/abs/2510.06062)"
CODE = "authors' code, repository wizard-III/Archer2.0: its policy loss and training script (docs/aspo.md)"


@dataclass
class ASPOOptions:
    """``actor_rollout_ref.actor.policy_loss.*`` with ``loss_mode=aspo``."""

    entropy_clip: bool = option(
        False, "Widen the clip range of each response's high-entropy tokens to high_entropy_clip_ratio (both sides), "
        "as the dual-token clip of arXiv 2507.15778 and the authors' code; false: one clip range for every token, "
        "the paper's (the loss then needs no entropy and also runs through verl's standard signature).",
        paper=PAPER + " §6 Step 1, Appendix B (v2): ε = 0.2 for every token; " + CODE + ": always on")
    high_entropy_clip_ratio: float = option(
        0.4, "Clip range ε of high-entropy tokens (lower bound 1 − ε for negative, upper bound 1 + ε for positive "
        "advantages); the others use clip_ratio_low/high.", low=0.0, high=1.0, paper=CODE + ": 0.4")
    entropy_quantile: float = option(
        0.8, "A token is high-entropy when its entropy is above this quantile of its own response's token "
        "entropies.", low=0.0, high=1.0, high_open=True, paper=CODE + ": token_entropy_quantile 0.8")
    entropy_source: str = option(
        "current", "Entropy that splits the tokens: current (the update's forward pass, as the authors' code; needs "
        "actor.calculate_entropy=true) or old (the old policy's, fixed for the whole step).",
        choices=("current", "old"), paper=CODE)
    negative_soft_dual_clip: bool = option(
        False, "Also soften the dual clip of negative-advantage tokens: gradient −c·A where r > c instead of 0 "
        "(the authors' code); false: verl's dual-clip PPO (the paper softens the dual clip of positive tokens only).",
        paper=PAPER + " §6 Step 3 (v2); " + CODE)


def response_high_entropy_mask(entropy: torch.Tensor, response_mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """True for the valid tokens whose entropy is above the ``quantile`` of their own response's valid-token
    entropies (linear interpolation, as ``torch.nanquantile`` and the authors' code). A row's split depends on that
    row only, so it is the same in any micro-batch.

    Bit-equal to ``torch.nanquantile`` over the valid tokens (NaN entropies are skipped as it skips them) without
    sorting every row: the two order statistics that the interpolation reads come from one ``torch.topk`` whose
    width is fixed by the row length (:func:`_topk_width`), so nothing is read back to the host."""
    quantile = validate_quantile(quantile, "entropy_quantile")
    mask = response_mask.bool()
    values = entropy.detach().to(torch.float32)
    length = values.shape[-1]
    if values.numel() == 0 or length == 0:
        return mask.clone()
    valid = torch.eq(values, values).logical_and_(mask)  # not NaN, and valid
    count = valid.sum(dim=-1, keepdim=True)
    # torch.nanquantile: rank = q · (n − 1) in float32 (negative for an empty row: 0), lerp of the values at
    # floor(rank) and ceil(rank) of the row sorted ascending
    ranks = (count - 1).to(torch.float32).mul_(quantile).clamp_min_(0.0)
    below = ranks.to(torch.long)
    above = ranks.ceil().to(torch.long)
    weights = ranks - below
    width, largest = _topk_width(quantile, length)
    fill = float("-inf") if largest else float("inf")
    top = torch.topk(torch.where(valid, values, fill), width, dim=-1, largest=largest, sorted=True).values
    if largest:  # ascending position p of the n valid values is position n − 1 − p from the top
        below, above = (count - 1 - below).clamp_min_(0), (count - 1 - above).clamp_min_(0)
    thresholds = torch.lerp(top.gather(-1, below), top.gather(-1, above), weights)
    return mask & (values > thresholds)


@functools.lru_cache(maxsize=64)
def _topk_width(quantile: float, length: int) -> tuple[int, bool]:
    """(k, largest): the fewest sorted values from one end of a row of ``length`` that hold both order statistics
    of the ``quantile`` for every valid-token count n in 1..length (ranks computed as torch.nanquantile does, in
    float32). The top end when that is narrower (quantiles above the median)."""
    n = np.arange(1, length + 1, dtype=np.int64)
    ranks = np.float32(quantile) * (n - 1).astype(np.float32)
    below, above = np.floor(ranks).astype(np.int64), np.ceil(ranks).astype(np.int64)
    from_bottom = int(above.max()) + 1  # ascending positions 0..ceil(rank)
    from_top = int((n - below).max())  # descending positions 0..n − 1 − floor(rank)
    return (from_top, True) if from_top < from_bottom else (from_bottom, False)


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
    bounds = None
    if high_entropy is not None:
        # per-token bounds 1 ∓ ε, one pass each: ε in log_prob's dtype, 1 ∓ ε in the ratio's (as
        # dual_clip_ppo_token_loss computes them from per-token ε); the four values are made on the device
        ratio_dtype = torch.result_type(log_prob, old_log_prob)

        def eps(value):
            return scalar_like(value, log_prob).to(ratio_dtype)

        high = high_entropy.bool()
        bounds = (torch.where(high, 1.0 - eps(high_clip), 1.0 - eps(clip_low)),
                  torch.where(high, 1.0 + eps(high_clip), 1.0 + eps(clip_high)))
    # negative advantages (and the shared masks/metrics): verl's dual-clip PPO
    pg_losses, info = dual_clip_ppo_token_loss(old_log_prob, log_prob, advantages, clip_low, clip_high, clip_ratio_c,
                                               bounds=bounds)
    with torch.no_grad():
        positive = advantages > 0
        # r̂ = min(r, 1 + ε_h); PPO clips a positive token exactly where r > 1 + ε_h (info["clipped"])
        ratio = info["ratio"].detach()
        r_hat = ratio.clamp(max=1.0 + clip_high) if bounds is None else torch.minimum(ratio, bounds[1])
        inv = r_hat.reciprocal_()  # 1/r̂
        # negation is exact, so (−A)·x has the bits of −(A·x)
        neg_advantages = -advantages
        pos_value = neg_advantages * inv  # −A/r̂
        inv.clamp_(max=clip_ratio_c)
        soft_dual = inv >= clip_ratio_c  # after the clamp: 1/r ≥ c, the weight is capped at c
        # ∂loss/∂log π of a positive token: −A·min(1/r, c) in the band, 0 above it (clipped)
        weight = inv.masked_fill_(info["clipped"], 0.0).mul_(neg_advantages)
        if negative_soft_dual_clip:
            neg_soft = (advantages < 0) & (ratio > clip_ratio_c)
            weight = torch.where(positive, weight, torch.where(neg_soft, advantages * -clip_ratio_c, 0.0))
    grad_term = weight * (log_prob - log_prob.detach())  # value 0, gradient ``weight``
    if negative_soft_dual_clip:  # vanilla's gradient is 0 where r > c: the term adds −c·A there
        pg_losses = torch.where(positive, pos_value.add_(grad_term), pg_losses + grad_term)
    else:
        pg_losses = torch.where(positive, pos_value.add_(grad_term), pg_losses)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    loss = aggregate(pg_losses, response_mask)
    mask = response_mask.bool()
    mean = masked_mean_fn(mask)
    metrics = ppo_metrics(info, mask, mean)
    metrics["pos_soft_dual_clip_frac"] = mean(soft_dual.logical_and_(positive))
    if high_entropy is not None:
        metrics["high_entropy_frac"] = mean(high_entropy)
    return loss, metrics


def aspo_needs(options: ASPOOptions) -> frozenset:
    """Without the entropy clip ASPO needs nothing (and runs through verl's standard signature)."""
    if not options.entropy_clip:
        return frozenset()
    return frozenset({CURRENT_ENTROPY if options.entropy_source == "current" else OLD_ENTROPY})


@algorithm("loss", name="aspo", title="ASPO", paper=PAPER,
           summary="Flipped importance weight π_old/π (soft dual clip at c) on positive-advantage tokens; "
                   "optional wider clip on high-entropy tokens (the authors' code).",
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
