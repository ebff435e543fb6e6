"""STAPO (Spurious-Token-Aware Policy Optimization, arXiv 2602.15620): Silencing Spurious Tokens (S2T).

Among the valid tokens of an update mini-batch, the **candidates** are the positive-advantage tokens whose
probability under the policy is below τ_p. A candidate is **spurious** when the policy's entropy at its position is
below τ_h^(q), the q-quantile of the candidates' entropies in that mini-batch (the paper's S2T mask, Methodology):

    c_{i,t} = 1[A_{i,t} > 0] · 1[π_θ(o_{i,t}) < τ_p]
    s_{i,t} = c_{i,t} · 1[H_{i,t} < τ_h^(q)],   τ_h^(q) = quantile_q{H_{j,u} : c_{j,u} = 1, (j, u) in the mini-batch}

Spurious tokens are removed from the loss and from its token-mean normaliser (label ``eq:stapo_loss``); the others
keep DAPO's clipped token loss ℓ = −min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A) (``dual_clip=true``: verl's dual
clip on top):

    ℓ_STAPO = Σ_{i,t} (1 − s_{i,t}) · ℓ_{i,t} / Σ_{i,t} (1 − s_{i,t})

π_θ and H are the current policy's (the update's forward pass; ``spurious_policy=old``: π_old and the old-policy
entropy of verl's old-log-prob step). ``spurious_entropy_threshold_type=absolute`` replaces the quantile by a fixed
τ_h in nats (an extension; the paper defines only the quantile).

Where the mini-batch statistics come from (``normalizer_per``): verl runs the loss per micro-batch and
back-propagates each one before the next forward, so the candidates' quantile and the kept-token count of the whole
mini-batch at π_θ exist only after a forward pass over all of it. ``mini_batch`` (default) runs hapo-verl's
mini-batch pass before each mini-batch's update (the ``MINIBATCH_STATS`` need: one extra forward, none with
``spurious_policy=old``): the candidates' entropies are gathered and the valid tokens counted over its micro-batches
and the data-parallel ranks, τ_h^(q) and the kept count N_kept follow (:func:`stapo_minibatch_finalize`), and every
micro-batch's loss is ``Σ (1−s)·ℓ / N_kept``: the formula above, independent of the micro-batch split and the
data-parallel size. ``micro_batch`` skips the pass: τ_h^(q) is the quantile of the micro-batch's own candidates (this
rank) and each micro-batch is renormalised by its own kept fraction, ``Σ_mb (1−s)·ℓ / (N · k_mb)`` (N: verl's global
valid-token count, k_mb the micro-batch's kept fraction summed over the ranks): exact only with one micro-batch per
rank. A direct call (``compute_policy_loss``) on a whole batch is exact. The other aggregation modes pass the
kept-token mask to verl's ``agg_loss`` (per-sequence means over kept tokens) and need no count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from hapo_verl.algorithms.ppo import dual_clip_ppo_token_loss, masked_mean, ppo_metrics
from hapo_verl.registry import (CURRENT_ENTROPY, MINIBATCH_STATS, OLD_ENTROPY, Gathered, LossInputs, MiniBatchPart,
                                algorithm, option)

PAPER = "STAPO, arXiv 2602.15620 (https://arxiv.org/abs/2602.15620)"
SETTINGS = PAPER + ", Experiments: Settings and the table of training hyperparameters"


@dataclass
class STAPOOptions:
    """``actor_rollout_ref.actor.policy_loss.*`` with ``loss_mode=stapo``."""

    spurious_prob_threshold: float = option(
        0.002, "τ_p: a positive-advantage token is a spurious candidate when its probability is below this (absolute "
        "probability).", low=0.0, high=1.0, paper=SETTINGS + ": τ_p = 0.002")
    spurious_entropy_threshold_type: str = option(
        "quantile", "quantile: τ_h = the spurious_entropy_quantile of the candidates' entropies in each update "
        "mini-batch (the paper). absolute: τ_h = spurious_entropy_threshold in nats (an extension).",
        choices=("quantile", "absolute"), paper=PAPER + ", Methodology: the S2T mask")
    spurious_entropy_quantile: float = option(
        0.75, "q: the candidates below the q-quantile of their entropies are spurious (quantile form; 0.75 silences "
        "the lowest-entropy 75 % of the candidates).", low=0.0, high=1.0, low_open=True, high_open=True,
        paper=SETTINGS + ": q = 75%")
    spurious_entropy_threshold: float = option(
        0.1, "τ_h in nats (absolute form only): candidates with entropy below this are spurious.", low=0.0,
        paper=PAPER + " (no absolute form in the paper)")
    spurious_policy: str = option(
        "current", "Whose probability and entropy define a spurious token: current (π_θ of the update's forward "
        "pass, the paper's; needs actor.calculate_entropy=true) or old (π_old and the old-policy entropy of verl's "
        "old-log-prob step).", choices=("current", "old"), paper=PAPER + ", Appendix: the algorithm")
    normalizer_per: str = option(
        "mini_batch", "Where τ_h's quantile and the token-mean normaliser are computed: mini_batch over the whole "
        "update mini-batch in a pass before its update (one extra forward with spurious_policy=current, none with "
        "old): the paper's, independent of the micro-batch split. micro_batch: over each micro-batch (no extra "
        "pass; exact only with one micro-batch per rank).", choices=("mini_batch", "micro_batch"),
        paper=PAPER + ", Methodology: 'in each mini-batch'")
    dual_clip: bool = option(
        False, "Add verl's dual clip (loss of A<0 tokens capped at -c·A, c = actor.clip_ratio_c). false: the paper's "
        "DAPO token loss.", paper=PAPER + ", Preliminaries: the DAPO objective")


def stapo_needs(options: STAPOOptions) -> frozenset:
    needs = {CURRENT_ENTROPY} if options.spurious_policy == "current" else {OLD_ENTROPY}
    if options.normalizer_per == "mini_batch":
        needs |= {MINIBATCH_STATS}
    return frozenset(needs)


def candidate_mask(log_prob: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
                   prob_threshold: float) -> torch.Tensor:
    """c = valid ∧ A > 0 ∧ π < τ_p (``log_prob`` is log π; compared as log π < log τ_p)."""
    log_tau_p = math.log(prob_threshold) if prob_threshold > 0.0 else -math.inf
    with torch.no_grad():
        return response_mask.bool() & (advantages > 0) & (log_prob.detach() < log_tau_p)


def masked_quantile(values: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile (linear interpolation, as ``torch.quantile``) of ``values`` where ``mask`` is set, as a 0-dim
    float64 tensor on the input's device; ``empty`` when nothing is set. No host sync: the unset values sort last and
    the two order statistics are gathered at tensor positions."""
    if values.numel() == 0:  # e.g. no candidate gathered in the whole mini-batch (a shape, not a value: no sync)
        return torch.zeros((), dtype=torch.float64, device=values.device)
    flat = torch.where(mask, values.detach().to(torch.float64), math.inf).reshape(-1)
    ordered = torch.sort(flat).values
    n = mask.sum().to(torch.float64)
    pos = (n - 1.0).clamp_min(0.0) * q
    lo = pos.floor()
    low = ordered.gather(0, lo.long().view(1))[0]
    high = ordered.gather(0, pos.ceil().long().view(1))[0]
    return torch.where(n > 0, low + (high - low) * (pos - lo), 0.0)


def entropy_threshold(options: STAPOOptions, entropy: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor | float:
    """τ_h: the quantile of the candidates' entropies passed in (0 without candidates: an entropy is never below 0,
    so nothing is spurious), or the absolute threshold."""
    if options.spurious_entropy_threshold_type == "absolute":
        return float(options.spurious_entropy_threshold)
    return masked_quantile(entropy, candidates, options.spurious_entropy_quantile)


def spurious_mask(log_prob: torch.Tensor, entropy: torch.Tensor, advantages: torch.Tensor,
                  response_mask: torch.Tensor, prob_threshold: float,
                  entropy_threshold: torch.Tensor | float) -> torch.Tensor:
    """s = c ∧ H < τ_h (:func:`candidate_mask`)."""
    with torch.no_grad():
        below = entropy.detach() < entropy_threshold
        return candidate_mask(log_prob, advantages, response_mask, prob_threshold) & below


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
    counts: Mapping[str, torch.Tensor] | None = None,
    dual_clip: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped token loss without the ``spurious`` (B, L) tokens, renormalised over the remaining ones (module
    docstring). ``aggregate(mat, mask, mode=None)`` is verl's ``agg_loss`` with the global batch info bound.
    ``counts``: the valid and kept tokens of the whole mini-batch (:func:`stapo_minibatch_finalize`); without them,
    this micro-batch's counts summed over the data-parallel ranks. ``clip_ratio_c`` is read only with
    ``dual_clip``."""
    pg_losses, info = dual_clip_ppo_token_loss(old_log_prob, log_prob, advantages, clip_low, clip_high,
                                               clip_ratio_c if dual_clip else math.inf)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    mask = response_mask.bool()
    keep = mask & ~spurious.bool()
    with torch.no_grad():
        if counts is not None:
            n_valid, n_kept = counts["valid"].to(torch.float64), counts["kept"].to(torch.float64)
        else:
            local = torch.stack([mask.sum(), keep.sum()]).to(torch.float64)
            n_valid, n_kept = (local if all_reduce is None else all_reduce(local)).unbind(0)
    if loss_agg_mode == "token-mean":
        # verl's global token-mean divides by the mini-batch's valid count N: Σ_kept ℓ / N · (N / N_kept) with the
        # whole mini-batch's counts; this micro-batch's (all ranks) without them
        factor = (n_valid / n_kept.clamp_min(1.0)).to(pg_losses.dtype)
        loss = aggregate(pg_losses * keep.to(pg_losses.dtype), response_mask) * factor
    else:
        loss = aggregate(pg_losses, keep)
    metrics = ppo_metrics(info, mask)
    metrics["spurious_frac"] = masked_mean(spurious, mask)
    metrics["spurious_frac_global"] = ((n_valid - n_kept) / n_valid.clamp_min(1.0)).to(torch.float32)
    metrics["clipfrac_kept"] = masked_mean(info["clipped"], keep)
    return loss, metrics


def _policy_tensors(options: STAPOOptions, log_prob, old_log_prob):
    return log_prob if options.spurious_policy == "current" else old_log_prob


def stapo_minibatch_stats(part: MiniBatchPart, options: STAPOOptions) -> dict:
    """One micro-batch of the mini-batch pass: its valid-token count and its candidates' entropies (gathered), or,
    with the absolute threshold, its kept count."""
    log_pi = _policy_tensors(options, part.log_prob, part.old_log_prob)
    candidates = candidate_mask(log_pi, part.advantages, part.response_mask, options.spurious_prob_threshold)
    stats = {"valid": part.response_mask.sum().to(torch.float64)}
    if options.spurious_entropy_threshold_type == "absolute":
        spurious = candidates & (part.entropy < options.spurious_entropy_threshold)
        stats["spurious"] = spurious.sum().to(torch.float64)
    else:
        stats["candidate_entropy"] = Gathered(part.entropy.detach()[candidates].to(torch.float64))
    return stats


def stapo_minibatch_finalize(totals: Mapping[str, torch.Tensor], options: STAPOOptions) -> dict[str, torch.Tensor]:
    """τ_h of the whole mini-batch (the quantile of all its candidates' entropies) and its valid and kept counts."""
    valid = totals["valid"]
    if options.spurious_entropy_threshold_type == "absolute":
        return {"valid": valid, "kept": valid - totals["spurious"],
                "entropy_threshold": torch.full((), options.spurious_entropy_threshold, dtype=torch.float64,
                                                device=valid.device)}
    entropies = totals["candidate_entropy"]  # 0 without candidates: nothing is spurious
    every = torch.ones_like(entropies, dtype=torch.bool)
    tau_h = masked_quantile(entropies, every, options.spurious_entropy_quantile)
    spurious = (entropies < tau_h).sum().to(torch.float64)
    return {"valid": valid, "kept": valid - spurious, "entropy_threshold": tau_h,
            "candidates": torch.full((), entropies.numel(), dtype=torch.float64, device=valid.device)}


@algorithm("loss", name="stapo", title="STAPO", paper=PAPER,
           summary="Silencing spurious tokens: positive-advantage tokens with low probability and low entropy are "
                   "dropped from the loss and its normaliser.",
           loss_options=STAPOOptions, loss_needs=stapo_needs, minibatch_stats=stapo_minibatch_stats,
           minibatch_finalize=stapo_minibatch_finalize,
           minibatch_forward=lambda options: options.spurious_policy == "current")
def stapo_loss(inputs: LossInputs, options: STAPOOptions):
    log_pi = _policy_tensors(options, inputs.log_prob, inputs.old_log_prob)
    given = inputs.minibatch_stats
    if given is not None:
        tau_h = given["entropy_threshold"]
    else:  # the candidates passed in (a direct call: the whole batch; normalizer_per=micro_batch: the micro-batch)
        candidates = candidate_mask(log_pi, inputs.advantages, inputs.response_mask, options.spurious_prob_threshold)
        tau_h = entropy_threshold(options, inputs.entropy, candidates)
    spurious = spurious_mask(log_pi, inputs.entropy, inputs.advantages, inputs.response_mask,
                             options.spurious_prob_threshold, tau_h)
    loss, metrics = stapo_policy_loss(
        inputs.old_log_prob, inputs.log_prob, inputs.advantages, inputs.response_mask, spurious,
        clip_low=inputs.clip_low, clip_high=inputs.clip_high, clip_ratio_c=inputs.clip_ratio_c,
        loss_agg_mode=inputs.loss_agg_mode, aggregate=inputs.aggregate, all_reduce=inputs.all_reduce,
        rollout_is_weights=inputs.rollout_is_weights, counts=given, dual_clip=options.dual_clip)
    metrics["entropy_threshold"] = tau_h.to(torch.float32) if isinstance(tau_h, torch.Tensor) else \
        torch.full((), tau_h, dtype=torch.float32, device=inputs.log_prob.device)
    if given is not None and "candidates" in given:
        metrics["candidate_frac"] = (given["candidates"] / given["valid"].clamp_min(1.0)).to(torch.float32)
    return loss, metrics
