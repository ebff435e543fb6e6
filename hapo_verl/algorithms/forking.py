"""Forking tokens ("Beyond the 80/20 Rule", arXiv 2506.01939), a baseline of the HAPO paper's Table 1.

DAPO/GRPO's token loss is kept only on the tokens whose old-policy entropy is at least the ``q``-quantile of the
token entropies of the whole training batch (q = 0.8: the top 20 %):

    ℓ = (1/N) Σ_{i,t} 1[H_{i,t} ≥ τ_q] · ℓ^PPO_{i,t},      τ_q = quantile_q{H over the valid tokens of the batch}

N counts every valid token of the batch: the indicator removes gradient, not tokens from the normaliser.
τ_q is computed once per step on the driver (:func:`forking_batch_stats`) and sent to the workers.
``loss_mode=forking``; the older spelling ``loss_mode=vanilla`` + ``top_entropy_quantile`` is deprecated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from hapo_verl.algorithms.ppo import dual_clip_ppo_token_loss, masked_mean, ppo_metrics, validate_quantile
from hapo_verl.registry import BATCH_STATS, OLD_ENTROPY, LossInputs, OldPolicyBatch, algorithm, option

PAPER = "Beyond the 80/20 Rule, arXiv 2506.01939 (https://arxiv.org/abs/2506.01939)"


@dataclass
class ForkingOptions:
    """``actor_rollout_ref.actor.policy_loss.*`` with ``loss_mode=forking``."""

    top_entropy_quantile: float = option(
        0.8, "Keep the loss only on tokens whose old-policy entropy is at least this quantile of all valid tokens "
        "of the global batch (0.8: the paper's top 20 %; 0: the plain DAPO loss).", low=0.0, high=1.0,
        high_open=True, paper=PAPER)


def entropy_quantile_threshold(entropy: torch.Tensor, response_mask: torch.Tensor, quantile: float) -> float:
    """τ_q over the valid tokens of ``entropy``: the smallest entropy among the top ⌈(1−q)·N⌉ tokens (ties may
    keep a few more). q = 0 gives the minimum (every token kept). Exact for any N (no 2^24 limit of
    ``torch.quantile``); ``nan`` when there is no valid token."""
    quantile = validate_quantile(quantile, "top_entropy_quantile")
    values = entropy.detach()[response_mask.bool()].reshape(-1).to(torch.float64)
    n = values.numel()
    if n == 0:
        return float("nan")
    keep = max(1, math.ceil((1.0 - quantile) * n - 1e-9))
    return float(torch.kthvalue(values, n - keep + 1).values.item())


def forking_token_mask(entropy: torch.Tensor, response_mask: torch.Tensor, threshold) -> torch.Tensor:
    """1[H ≥ τ] on valid tokens (``threshold`` None: every valid token)."""
    mask = response_mask.bool()
    if threshold is None:
        return mask
    return mask & (entropy.detach() >= threshold)


def forking_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    entropy: torch.Tensor | None,
    threshold: float | None,
    *,
    clip_low: float,
    clip_high: float,
    clip_ratio_c: float,
    aggregate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DAPO/GRPO dual-clip loss restricted to forking tokens (module docstring). ``aggregate(loss_mat, mask)``
    receives the **response** mask, so the normaliser counts every valid token. ``threshold`` None is verl's
    vanilla loss exactly."""
    pg_losses, info = dual_clip_ppo_token_loss(old_log_prob, log_prob, advantages, clip_low, clip_high, clip_ratio_c)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    mask = response_mask.bool()
    keep = forking_token_mask(entropy, mask, threshold)
    if threshold is not None:
        pg_losses = pg_losses * keep.to(pg_losses.dtype)
    loss = aggregate(pg_losses, response_mask)
    metrics = ppo_metrics(info, mask)
    metrics["kept_frac"] = masked_mean(keep, mask)
    return loss, metrics


def forking_needs(options: ForkingOptions) -> frozenset:
    """Quantile 0 is the plain DAPO loss: it needs nothing (and runs through verl's standard signature)."""
    return frozenset() if options.top_entropy_quantile == 0.0 else frozenset({OLD_ENTROPY, BATCH_STATS})


def forking_batch_stats(old: OldPolicyBatch, options: ForkingOptions) -> dict:
    """τ_q over every valid token of the step (driver)."""
    return {"threshold": entropy_quantile_threshold(old.entropy, old.response_mask, options.top_entropy_quantile)}


def forking_batch_metrics(old: OldPolicyBatch, options: ForkingOptions, stats: dict) -> dict:
    valid = old.entropy[old.response_mask.bool()]
    kept = float((valid >= stats["threshold"]).float().mean()) if valid.numel() else 0.0
    return {"forking/threshold": stats["threshold"], "forking/kept_frac_batch": kept,
            "forking/num_tokens": float(valid.numel())}


@algorithm("loss", name="forking", title="Forking", paper=PAPER,
           summary="DAPO's loss on the top-entropy (forking) tokens of the batch only.",
           loss_options=ForkingOptions, loss_needs=forking_needs,
           batch_stats=forking_batch_stats, batch_metrics=forking_batch_metrics)
def forking_loss(inputs: LossInputs, options: ForkingOptions):
    if options.top_entropy_quantile == 0.0:
        threshold = None
    elif inputs.batch_stats is not None:
        threshold = float(inputs.batch_stats["threshold"])
    else:  # no batch statistics given: the threshold of the tokens passed in
        threshold = entropy_quantile_threshold(inputs.entropy, inputs.response_mask, options.top_entropy_quantile)
    loss, metrics = forking_policy_loss(
        inputs.old_log_prob, inputs.log_prob, inputs.advantages, inputs.response_mask, inputs.entropy, threshold,
        clip_low=inputs.clip_low, clip_high=inputs.clip_high, clip_ratio_c=inputs.clip_ratio_c,
        aggregate=lambda mat, mask: inputs.aggregate(mat, mask), rollout_is_weights=inputs.rollout_is_weights)
    if threshold is not None:
        # a Python float (batch statistics arrive as numbers): written on the device, no host-to-device copy
        metrics["threshold"] = torch.full((), threshold, device=inputs.log_prob.device)
    return loss, metrics
