"""STAPO (Spurious-Token-Aware Policy Optimization, arXiv 2602.15620): Silencing Spurious Tokens (S2T).

A valid token is spurious when its advantage is positive, its probability under the policy is below τ_p and the
policy's entropy at its position is below τ_h:

    s_{i,t} = 1[A_{i,t} > 0] · 1[π_θ(o_{i,t}) < τ_p] · 1[H_{i,t} < τ_h]

Spurious tokens are removed from the loss and from its token-mean normaliser; the remaining tokens keep verl's
dual-clip PPO token loss ℓ^PPO:

    ℓ = Σ_{i,t} (1 − s_{i,t}) · ℓ^PPO_{i,t} / Σ_{i,t} (1 − s_{i,t})

π_θ and H are the current policy's (the update's forward pass; ``spurious_policy=old``: π_old and the old-policy
entropy of verl's old-log-prob step). τ_h is absolute (nats) or the q-quantile of the step's old-policy token
entropies (``spurious_entropy_threshold_type=quantile``, computed once per step on the driver).

The normaliser: verl runs the loss per micro-batch and back-propagates each micro-batch before the next forward, so
the global count of non-spurious tokens under the *current* policy is not known when a micro-batch's loss is
formed. The token-mean loss is therefore ``Σ_mb (1−s)·ℓ / (N · k_mb)``: N is verl's global valid-token count of the
mini-batch and k_mb the kept fraction of the micro-batch, summed over the data-parallel ranks. It equals the formula
above exactly when each data-parallel rank runs one micro-batch per mini-batch, or when every micro-batch has the
same kept fraction (e.g. no spurious token); a direct call (``compute_policy_loss``) on a whole batch is exact.
The other aggregation modes pass the kept-token mask to verl's ``agg_loss`` (per-sequence means over kept tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from hapo_verl.algorithms.ppo import dual_clip_ppo_token_loss, masked_mean, ppo_metrics, validate_quantile
from hapo_verl.registry import BATCH_STATS, CURRENT_ENTROPY, OLD_ENTROPY, LossInputs, OldPolicyBatch, algorithm, option

PAPER = "STAPO, arXiv 2602.15620 (https://arxiv.org/abs/2602.15620)"


@dataclass
class STAPOOptions:
    """``actor_rollout_ref.actor.policy_loss.*`` with ``loss_mode=stapo``."""

    spurious_prob_threshold: float = option(
        0.01, "τ_p: a positive-advantage token is a spurious candidate when its probability is below this (absolute "
        "probability).", low=0.0, high=1.0, paper=PAPER + " (τ_p = 0.01 as reported by secondary write-ups; "
        "docs/stapo.md)")
    spurious_entropy_threshold: float = option(
        0.1, "τ_h in nats (spurious_entropy_threshold_type=absolute): spurious candidates need entropy below this.",
        low=0.0, paper=PAPER + " (no published absolute value; docs/stapo.md)")
    spurious_entropy_threshold_type: str = option(
        "quantile", "absolute: τ_h = spurious_entropy_threshold. quantile: τ_h = the spurious_entropy_quantile of "
        "the step's old-policy token entropies (all valid tokens of the batch, computed on the driver).",
        choices=("absolute", "quantile"), paper=PAPER)
    spurious_entropy_quantile: float = option(
        0.05, "q of the quantile form of τ_h (0.05: the 5th percentile).", low=0.0, high=1.0, low_open=True,
        high_open=True, paper=PAPER + " (5th percentile as reported by secondary write-ups; docs/stapo.md)")
    spurious_policy: str = option(
        "current", "Whose probability and entropy define a spurious token: current (π_θ of the update's forward "
        "pass, the paper's definition; needs actor.calculate_entropy=true) or old (π_old and the old-policy entropy "
        "of verl's old-log-prob step).", choices=("current", "old"), paper=PAPER)


def stapo_needs(options: STAPOOptions) -> frozenset:
    needs = {CURRENT_ENTROPY} if options.spurious_policy == "current" else {OLD_ENTROPY}
    if options.spurious_entropy_threshold_type == "quantile":
        needs |= {BATCH_STATS}
    return frozenset(needs)


def entropy_quantile(entropy: torch.Tensor, response_mask: torch.Tensor, quantile: float) -> float:
    """The ``quantile`` of the valid tokens' entropies (linear interpolation, as ``torch.quantile``; exact for any
    number of tokens); ``nan`` without valid tokens."""
    quantile = validate_quantile(quantile, "spurious_entropy_quantile", allow_zero=False)
    values = entropy.detach()[response_mask.bool()].reshape(-1).to(torch.float64)
    n = values.numel()
    if n == 0:
        return float("nan")
    pos = quantile * (n - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    low = torch.kthvalue(values, lo + 1).values
    high = low if hi == lo else torch.kthvalue(values, hi + 1).values
    return float((low + (high - low) * (pos - lo)).item())


def spurious_mask(log_prob: torch.Tensor, entropy: torch.Tensor, advantages: torch.Tensor,
                  response_mask: torch.Tensor, prob_threshold: float, entropy_threshold: float) -> torch.Tensor:
    """s = valid ∧ A > 0 ∧ π < τ_p ∧ H < τ_h (``log_prob`` is log π; compared as log π < log τ_p)."""
    log_tau_p = math.log(prob_threshold) if prob_threshold > 0.0 else -math.inf
    with torch.no_grad():
        return (response_mask.bool() & (advantages > 0) & (log_prob.detach() < log_tau_p)
                & (entropy.detach() < entropy_threshold))


def stapo_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    spurious: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    clip_ratio_c: float,
    loss_agg_mode: str,
    aggregate: Callable[..., torch.Tensor],
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """verl's dual-clip PPO loss without the ``spurious`` (B, L) tokens, renormalised over the remaining ones (module
    docstring). ``aggregate(mat, mask, mode=None)`` is verl's ``agg_loss`` with the global batch info bound."""
    pg_losses, info = dual_clip_ppo_token_loss(old_log_prob, log_prob, advantages, clip_low, clip_high, clip_ratio_c)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    mask = response_mask.bool()
    keep = mask & ~spurious.bool()
    with torch.no_grad():
        counts = torch.stack([mask.sum(), keep.sum()]).to(torch.float64)
        if all_reduce is not None:
            counts = all_reduce(counts)
        n_valid, n_kept = counts.unbind(0)
    if loss_agg_mode == "token-mean":
        # Σ_kept ℓ / N_global · (n_valid / n_kept) of this micro-batch (all data-parallel ranks)
        factor = (n_valid / n_kept.clamp_min(1.0)).to(pg_losses.dtype)
        loss = aggregate(pg_losses * keep.to(pg_losses.dtype), response_mask) * factor
    else:
        loss = aggregate(pg_losses, keep)
    metrics = ppo_metrics(info, mask)
    metrics["spurious_frac"] = masked_mean(spurious, mask)
    metrics["spurious_frac_global"] = ((n_valid - n_kept) / n_valid.clamp_min(1.0)).to(torch.float32)
    metrics["clipfrac_kept"] = masked_mean(info["clipped"], keep)
    return loss, metrics


def stapo_batch_stats(old: OldPolicyBatch, options: STAPOOptions) -> dict:
    """τ_h of the quantile form over every valid token of the step (driver)."""
    return {"entropy_threshold": entropy_quantile(old.entropy, old.response_mask, options.spurious_entropy_quantile)}


def stapo_batch_metrics(old: OldPolicyBatch, options: STAPOOptions, stats: dict) -> dict:
    return {"stapo/entropy_threshold": stats["entropy_threshold"]}


def entropy_threshold_of(inputs: LossInputs, options: STAPOOptions) -> float:
    if options.spurious_entropy_threshold_type == "absolute":
        return float(options.spurious_entropy_threshold)
    if inputs.batch_stats is not None:
        return float(inputs.batch_stats["entropy_threshold"])
    # no batch statistics given: the quantile of the entropies passed in
    return entropy_quantile(inputs.entropy, inputs.response_mask, options.spurious_entropy_quantile)


@algorithm("loss", name="stapo", title="STAPO", paper=PAPER,
           summary="Silencing spurious tokens: positive-advantage tokens with low probability and low entropy are "
                   "dropped from the loss and its normaliser.",
           loss_options=STAPOOptions, loss_needs=stapo_needs, batch_stats=stapo_batch_stats,
           batch_metrics=stapo_batch_metrics)
def stapo_loss(inputs: LossInputs, options: STAPOOptions):
    tau_h = entropy_threshold_of(inputs, options)
    log_pi = inputs.log_prob if options.spurious_policy == "current" else inputs.old_log_prob
    spurious = spurious_mask(log_pi, inputs.entropy, inputs.advantages, inputs.response_mask,
                             options.spurious_prob_threshold, tau_h)
    loss, metrics = stapo_policy_loss(
        inputs.old_log_prob, inputs.log_prob, inputs.advantages, inputs.response_mask, spurious,
        clip_low=inputs.clip_low, clip_high=inputs.clip_high, clip_ratio_c=inputs.clip_ratio_c,
        loss_agg_mode=inputs.loss_agg_mode, aggregate=inputs.aggregate, all_reduce=inputs.all_reduce,
        rollout_is_weights=inputs.rollout_is_weights)
    metrics["entropy_threshold"] = torch.full((), tau_h, dtype=torch.float32, device=inputs.log_prob.device)
    return loss, metrics
