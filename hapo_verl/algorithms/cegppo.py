"""CE-GPPO ("Coordinating Entropy via Gradient-Preserving Clipping Policy Optimization", arXiv 2509.20712).

Objective: Eq. 8 of the paper (arXiv v5), gradient: Eq. 9-10 (derived in Appendix A.3, Eq. 24-34). PPO's clipped
tokens keep a bounded gradient, scaled by β₁ (negative advantage, ratio below the band) and β₂ (positive advantage,
ratio above the band). Per token, as ∂loss/∂log π before aggregation (r = π_θ/π_old, A the advantage, ε_l/ε_h
verl's clip_ratio_low/high), i.e. −F_{i,t}·A with Eq. 10's F:

    A < 0 and r < 1 − ε_l :   −β₁ (1 − ε_l) · A          (vanilla PPO: 0)
    A > 0 and r > 1 + ε_h :   −β₂ (1 + ε_h) · A          (vanilla PPO: 0)
    otherwise             :   −r · A

The paper's objective has no dual clip: A < 0 tokens keep −r·A however large r is (§5.4: "fully trusting negative
feedback"). The authors' code (Kwai-Klear/CE-GPPO ``compute_gppo_loss_general_beta``) applies verl's dual clip on
top (gradient 0 where A < 0 and r > c, c = clip_ratio_c, 10 in their scripts): ``dual_clip=true``.

Eq. 8 writes the clipped branches as β·(1∓ε)·(δ/sg(δ))·A (δ = r), the authors' code likewise. Here the loss
**value** of every token is PPO's clipped value (verl's vanilla with ``dual_clip=true``) and the preserved gradient
is added as ``w · (log π − sg(log π))`` (value 0): the gradient is Eq. 10's, the value differs from Eq. 8's by a
constant on clipped tokens, and β₁ = β₂ = 0 is PPO exactly (value and gradient; verl's vanilla loss bit for bit with
``dual_clip=true``). docs/cegppo.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from hapo_verl.algorithms.ppo import dual_clip_ppo_token_loss, masked_mean, ppo_metrics
from hapo_verl.registry import LossInputs, algorithm, option

PAPER = "CE-GPPO, arXiv 2509.20712 (https://arxiv.org/abs/2509.20712)"
CODE = "authors' code, Kwai-Klear/CE-GPPO compute_gppo_loss_general_beta"


@dataclass
class CEGPPOOptions:
    """``actor_rollout_ref.actor.policy_loss.*`` with ``loss_mode=cegppo``."""

    beta_low: float = option(
        0.5, "β₁: gradient scale of negative-advantage tokens whose ratio is below 1 − clip_ratio_low (their "
        "gradient is −β₁(1 − ε_l)·A; 0 is PPO).", low=0.0,
        paper=PAPER + " Eq. 8, 10 (v5); 0.5 is the paper's 'generally effective setting' (Limitations; Table 1 "
        "reports β₁ = 0.5 and 0.75, β₂ = 1; 0.75 is its best 7B run and the authors' 7B script)")
    beta_high: float = option(
        1.0, "β₂: gradient scale of positive-advantage tokens whose ratio is above 1 + clip_ratio_high (their "
        "gradient is −β₂(1 + ε_h)·A; 0 is PPO).", low=0.0,
        paper=PAPER + " Eq. 8, 10 (v5); β₂ = 1 in every main run (Table 1) and the authors' scripts")
    dual_clip: bool = option(
        False, "Add verl's dual clip (negative-advantage tokens' loss capped at −c·A, c = actor.clip_ratio_c: "
        "gradient 0 where r > c), as the authors' code does. false: the paper's objective (Eq. 8), where those "
        "tokens keep the gradient −r·A.", paper=PAPER + " Eq. 8; " + CODE)


def cegppo_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    clip_ratio_c: float,
    beta_low: float,
    beta_high: float,
    aggregate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    dual_clip: bool = False,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CE-GPPO's token loss (module docstring), aggregated with ``aggregate(loss_mat, mask)``. Tensors (B, L).
    ``clip_ratio_c`` is read only with ``dual_clip``."""
    # without the dual clip its bound −A·c must never bind: c = ∞ (−A·∞ is +∞ for A < 0, the only tokens it acts on)
    pg_losses, info = dual_clip_ppo_token_loss(old_log_prob, log_prob, advantages, clip_low, clip_high,
                                               clip_ratio_c if dual_clip else math.inf)
    with torch.no_grad():
        # PPO's clipped tokens (−A·clip(r) > −A·r) are exactly A < 0, r < 1 − ε_l and A > 0, r > 1 + ε_h; there
        # clip(r) is the bound 1 − ε_l or 1 + ε_h: the preserved gradient is w = −β·A·clip(r), 0 elsewhere
        clipped = info["clipped"]
        negative = advantages < 0
        weight = torch.where(clipped, advantages * info["clipped_ratio"].detach(), 0.0)
        if beta_low == beta_high:
            weight.mul_(-beta_low)
        else:  # Python-number products keep weight's dtype (a where() of two numbers would be float32)
            weight = torch.where(negative, weight * -beta_low, weight * -beta_high)
    pg_losses = pg_losses + weight * (log_prob - log_prob.detach())
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    loss = aggregate(pg_losses, response_mask)
    mask = response_mask.bool()
    metrics = ppo_metrics(info, mask)
    # the preserved groups: below the band = clipped & A < 0; above it = pg_clipfrac − preserved_low_frac
    metrics["preserved_low_frac"] = masked_mean(clipped & negative, mask)
    return loss, metrics


@algorithm("loss", name="cegppo", title="CE-GPPO", paper=PAPER,
           summary="PPO whose clipped tokens keep a bounded gradient (β₁ below, β₂ above the band); "
                   "optional dual clip (the authors' code).",
           loss_options=CEGPPOOptions)
def cegppo_loss(inputs: LossInputs, options: CEGPPOOptions):
    return cegppo_policy_loss(
        inputs.old_log_prob, inputs.log_prob, inputs.advantages, inputs.response_mask, clip_low=inputs.clip_low,
        clip_high=inputs.clip_high, clip_ratio_c=inputs.clip_ratio_c, beta_low=options.beta_low,
        beta_high=options.beta_high, aggregate=lambda mat, mask: inputs.aggregate(mat, mask),
        dual_clip=options.dual_clip, rollout_is_weights=inputs.rollout_is_weights)
