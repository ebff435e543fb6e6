"""KL-Cov over the whole update mini-batch (The Entropy Mechanism of Reinforcement Learning for Reasoning Language
Models, arXiv 2505.22617, §4.2 Eq. 13-14 and Listing 1): a split-invariant variant of verl's ``loss_mode=kl_cov``.

KL-Cov ranks the valid tokens by the centred cross-product of advantage and log-probability

    Cov_t = (A_t − mean(A)) · (log π_t − mean(log π))                                       (Eq. 13, per token)

and adds a penalty κ·|log π_θ − log π_old| to the unclipped loss −r·A of the top-k share of them (Eq. 14 with
Listing 1's |log r|; k = ``kl_cov_ratio``, at least one token):

    ℓ_t = −r_t·A_t + κ·|log r_t| · 1[Cov_t ≥ Cov_(k)]

verl computes the means and the top-k over the tokens of one loss call (a micro-batch on one GPU), so its result
depends on the micro-batch split and the data-parallel size (docs/clip_kl_cov.md). Here the means and the k-th
largest Cov are taken over the whole update mini-batch by hapo-verl's mini-batch pass: every micro-batch gathers its
valid tokens' (A, log π), summed and concatenated over the micro-batches and the data-parallel ranks, and
:func:`kl_cov_minibatch_finalize` returns the two means and the threshold Cov_(k) that every micro-batch's loss uses.

``covariance_policy`` chooses log π in Cov: ``old`` (default) uses π_old, stored with the batch, so the pass runs no
forward (no extra cost); it equals π_θ's on the first update of every step (θ = θ_old), and with one mini-batch and
one epoch per step on every update. ``current`` uses π_θ, the paper's, at the cost of one extra forward per
mini-batch. Tokens tied with Cov_(k) are all penalised (ties of float64 products: in practice none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from hapo_verl.algorithms.ppo import masked_mean
from hapo_verl.registry import MINIBATCH_STATS, Gathered, LossInputs, MiniBatchPart, algorithm, option

PAPER = "The Entropy Mechanism of RL for Reasoning LMs, arXiv 2505.22617 (https://arxiv.org/abs/2505.22617)"
SCRIPT = "PRIME-RL/Entropy-Mechanism-of-RL recipe/dapo/7b_kl_cov.sh"


@dataclass
class KLCovGlobalOptions:
    """``actor_rollout_ref.actor.policy_loss.*`` with ``loss_mode=kl_cov_global`` (verl's KL-Cov key names)."""

    # verl's key names and defaults (a recipe switching from kl_cov keeps its values); conf/kl_cov_global.yaml sets
    # the authors' 7B values
    kl_cov_ratio: float = option(
        0.0002, "k: the share of the mini-batch's valid tokens with the largest Cov that get the KL penalty (at least "
        "one token); verl's default.", low=0.0, high=1.0, low_open=True,
        paper=PAPER + " §4.3: k = 2e-4 (32B), 2e-3 (7B, " + SCRIPT + ")")
    ppo_kl_coef: float = option(0.1, "κ: coefficient of the penalty |log π_θ − log π_old| on the selected tokens; "
                                "verl's default.", low=0.0, paper=PAPER + " §4.3; " + SCRIPT + ": β = 1")
    covariance_policy: str = option(
        "old", "log π in Cov: old (π_old, stored with the batch: no extra forward; equal to π_θ's on each step's "
        "first update) or current (π_θ, the paper's: one extra forward per mini-batch).", choices=("old", "current"),
        paper=PAPER + " Eq. 13 (current policy)")


def kl_cov_needs(options: KLCovGlobalOptions) -> frozenset:
    return frozenset({MINIBATCH_STATS})


def covariance_threshold(advantages: torch.Tensor, log_probs: torch.Tensor, ratio: float) -> dict[str, torch.Tensor]:
    """The means of A and log π and the k-th largest Cov over the 1-D valid-token values given (float64); the
    threshold is +inf without valid tokens (nothing penalised)."""
    a, lp = advantages.to(torch.float64), log_probs.to(torch.float64)
    n = torch.full((), a.numel(), dtype=torch.float64, device=a.device)
    if a.numel() == 0:  # a shape, not a value: no sync
        zero = torch.zeros((), dtype=torch.float64, device=a.device)
        return {"mean_advantage": zero, "mean_log_prob": zero, "threshold": zero + math.inf, "valid": n}
    mean_a, mean_lp = a.mean(), lp.mean()
    cov = (a - mean_a) * (lp - mean_lp)
    k = int(max(1, math.floor(a.numel() * ratio)))  # from the shape: no sync
    threshold = torch.topk(cov, min(k, a.numel()), largest=True).values[-1]
    return {"mean_advantage": mean_a, "mean_log_prob": mean_lp, "threshold": threshold, "valid": n}


def covariance(advantages, log_probs, mean_advantage, mean_log_prob) -> torch.Tensor:
    """Cov_t (B, L) in float64 with the given means (the same arithmetic as :func:`covariance_threshold`)."""
    return (advantages.detach().to(torch.float64) - mean_advantage) * (log_probs.detach().to(torch.float64)
                                                                      - mean_log_prob)


def kl_cov_global_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cov_log_prob: torch.Tensor,
    stats: Mapping[str, torch.Tensor],
    *,
    ppo_kl_coef: float,
    aggregate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ℓ_t = −r·A + κ·|log r| on the tokens whose Cov (with ``stats``' means, log π from ``cov_log_prob``) reaches
    ``stats["threshold"]``, aggregated over the global batch (verl's op order for the token loss)."""
    mask = response_mask.bool()
    negative_approx_kl = log_prob - old_log_prob
    abs_kl = negative_approx_kl.abs()
    ratio = torch.exp(negative_approx_kl)
    pg_losses = -advantages * ratio
    with torch.no_grad():
        cov = covariance(advantages, cov_log_prob, stats["mean_advantage"], stats["mean_log_prob"])
        selected = mask & (cov >= stats["threshold"])
    pg_losses = torch.where(selected, pg_losses + ppo_kl_coef * abs_kl, pg_losses)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    loss = aggregate(pg_losses, response_mask)
    metrics = {"ppo_kl": masked_mean(abs_kl, mask),  # verl's kl_cov logs the mean |log r| as ppo_kl
               "selected_frac": masked_mean(selected, mask),
               "cov_threshold": stats["threshold"].to(torch.float32)}
    return loss, metrics


def _valid_values(advantages, log_probs, response_mask):
    mask = response_mask.bool()
    return advantages.detach()[mask].to(torch.float64), log_probs.detach()[mask].to(torch.float64)


def kl_cov_minibatch_stats(part: MiniBatchPart, options: KLCovGlobalOptions) -> dict:
    """One micro-batch of the mini-batch pass: its valid tokens' A and log π (gathered)."""
    log_pi = part.log_prob if options.covariance_policy == "current" else part.old_log_prob
    a, lp = _valid_values(part.advantages, log_pi, part.response_mask)
    return {"advantage": Gathered(a), "log_prob": Gathered(lp)}


def kl_cov_minibatch_finalize(totals: Mapping[str, torch.Tensor], options: KLCovGlobalOptions) -> dict:
    return covariance_threshold(totals["advantage"], totals["log_prob"], options.kl_cov_ratio)


@algorithm("loss", name="kl_cov_global", title="KL-Cov Global", paper=PAPER,
           summary="KL-Cov with the covariance ranking over the whole update mini-batch (all micro-batches and "
                   "ranks): independent of the micro-batch split, unlike verl's kl_cov.",
           loss_options=KLCovGlobalOptions, loss_needs=kl_cov_needs, minibatch_stats=kl_cov_minibatch_stats,
           minibatch_finalize=kl_cov_minibatch_finalize,
           minibatch_forward=lambda options: options.covariance_policy == "current")
def kl_cov_global(inputs: LossInputs, options: KLCovGlobalOptions):
    cov_log_prob = inputs.log_prob if options.covariance_policy == "current" else inputs.old_log_prob
    stats = inputs.minibatch_stats
    if stats is None:  # a direct call: the tokens passed in are the whole batch (selecting them syncs once)
        stats = covariance_threshold(*_valid_values(inputs.advantages, cov_log_prob, inputs.response_mask),
                                     options.kl_cov_ratio)
    return kl_cov_global_loss(inputs.old_log_prob, inputs.log_prob, inputs.advantages, inputs.response_mask,
                              cov_log_prob, stats, ppo_kl_coef=options.ppo_kl_coef, aggregate=inputs.aggregate,
                              rollout_is_weights=inputs.rollout_is_weights)
