"""The entropy-aware baselines of the HAPO paper's table (arXiv 2509.16591, Table 1), pure torch.

- **Forking tokens** ("Beyond the 80/20 Rule", arXiv 2506.01939): the DAPO/GRPO token loss is kept only on the
  tokens whose entropy is at least the ``q``-quantile of the batch's token entropies (q = 0.8: the top 20 %):

      ℓ = (1/N) Σ_{i,t} 1[H_{i,t} ≥ τ_q] · ℓ^PPO_{i,t},      τ_q = quantile_q{H over the valid tokens of the batch}

  N is the number of valid tokens of the batch (the indicator removes gradient, not tokens from the normalizer).
- **Archer** ("Stabilizing Knowledge, Promoting Reasoning: Dual-Token Constraints", arXiv 2507.15778): tokens are
  split per response at the ``q``-quantile of that response's token entropies; high-entropy ("reasoning") tokens
  get a wider clip range and a weaker KL to the reference policy, low-entropy ("knowledge") tokens the base clip
  range and a stronger KL; all tokens are updated together:

      ℓ = (1/N) Σ_{i,t} [ ℓ^PPO_{i,t}(ε_{c(i,t)}) + β_{c(i,t)} · KL̂_{i,t}(π_θ ‖ π_ref) ],   c ∈ {low, high}
- **EDGE-GRPO**, Entropy-Driven Advantage (arXiv 2507.21848): a response's GRPO advantage is divided by its
  normalized mean token entropy,  Â_i = A_i / P̂_i,  P̂_i = P_i / mean_j P_j,  P_i = mean_t H_{i,t}, so that
  confident responses get larger updates (both signs). Guided Error Correction is not a loss (docs/baselines.md).

ℓ^PPO is verl's dual-clip PPO token loss (``compute_policy_loss_vanilla``) with per-token clip ranges.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from hapo_verl.algorithms.policy_loss import dual_clip_token_losses


def validate_quantile(value, key: str, allow_zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} must be a number in [0, 1), got {value!r}")
    if not (0.0 <= value < 1.0) or (not allow_zero and value == 0.0):
        lo = "[0" if allow_zero else "(0"
        raise ValueError(f"{key} must be in {lo}, 1), got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------- PPO token loss
def dual_clip_ppo_token_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: torch.Tensor | float,
    clip_high: torch.Tensor | float,
    clip_ratio_c: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """verl's dual-clip PPO token loss (``compute_policy_loss_vanilla`` before aggregation), with clip ranges that
    may be per-token tensors. Returns the (B, L) loss matrix and boolean (B, L) masks ``clipped`` (the clipped
    branch is active) and ``clipped_lower`` (the dual-clip bound is active), plus ``log_ratio``."""
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1.0 for dual-clip PPO, got {clip_ratio_c}")
    log_ratio = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)
    if isinstance(clip_low, torch.Tensor) or isinstance(clip_high, torch.Tensor):
        lower = 1.0 - torch.as_tensor(clip_low, dtype=ratio.dtype, device=ratio.device)
        upper = 1.0 + torch.as_tensor(clip_high, dtype=ratio.dtype, device=ratio.device)
        clipped_ratio = torch.minimum(torch.maximum(ratio, lower), upper)
    else:
        clipped_ratio = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg_losses, clipped, clipped_lower = dual_clip_token_losses(advantages, ratio, clipped_ratio, clip_ratio_c)
    return pg_losses, {"clipped": clipped, "clipped_lower": clipped_lower, "log_ratio": log_ratio}


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask_f = mask.to(torch.float32)
    return (values.detach().to(torch.float32) * mask_f).sum() / mask_f.sum().clamp_min(1.0)


# --------------------------------------------------------------------------------------------- forking tokens
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


def forking_token_mask(entropy: torch.Tensor, response_mask: torch.Tensor, threshold: float | None) -> torch.Tensor:
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
    """DAPO/GRPO dual-clip loss restricted to forking tokens (module docstring). ``aggregate(loss_mat, mask)`` is
    verl's ``agg_loss`` with the global batch info bound and receives the **response** mask, so the normalizer
    counts every valid token. ``threshold`` None (quantile 0) is verl's vanilla loss exactly."""
    pg_losses, info = dual_clip_ppo_token_loss(old_log_prob, log_prob, advantages, clip_low, clip_high, clip_ratio_c)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    mask = response_mask.bool()
    keep = forking_token_mask(entropy, mask, threshold) if threshold is not None else mask
    if threshold is not None:
        pg_losses = pg_losses * keep.to(pg_losses.dtype)
    loss = aggregate(pg_losses, response_mask)
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": _masked_mean(info["clipped"], mask),
            "ppo_kl": -_masked_mean(info["log_ratio"], mask),
            "pg_clipfrac_lower": _masked_mean(info["clipped_lower"], mask),
            "kept_frac": _masked_mean(keep, mask),
        }
    return loss, metrics


# --------------------------------------------------------------------------------------------- Archer
def response_entropy_quantile_mask(entropy: torch.Tensor, response_mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """Archer's response-level split: True for the valid tokens whose entropy is **above** the ``quantile`` of
    their own response's valid-token entropies (linear interpolation, as ``torch.nanquantile``). A row's split
    depends on that row only, so it is the same in any micro-batch."""
    quantile = validate_quantile(quantile, "archer_entropy_quantile")
    mask = response_mask.bool()
    masked = torch.where(mask, entropy.detach().to(torch.float32), torch.full_like(entropy, float("nan"),
                                                                                   dtype=torch.float32))
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
    """Archer's dual-token loss (module docstring). ``high_entropy`` (B, L) bool marks the reasoning tokens
    (:func:`response_entropy_quantile_mask`). The KL term is added when ``ref_log_prob`` is given: per token
    β_low or β_high times ``kl_fn(log_prob, ref_log_prob)``, aggregated like the policy term (token mean over
    all valid tokens of the global batch). Returns the loss and metrics; ``kl_low``/``kl_high`` are the local
    means of the KL over each class."""
    high = high_entropy.bool() & response_mask.bool()
    clip_lo = torch.where(high, torch.tensor(high_clip_low, dtype=log_prob.dtype),
                          torch.tensor(clip_low, dtype=log_prob.dtype))
    clip_hi = torch.where(high, torch.tensor(high_clip_high, dtype=log_prob.dtype),
                          torch.tensor(clip_high, dtype=log_prob.dtype))
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
        coef = torch.where(high, torch.tensor(high_kl_coef, dtype=kld.dtype), torch.tensor(low_kl_coef, dtype=kld.dtype))
        loss = loss + aggregate(kld * coef, response_mask)
        with torch.no_grad():
            metrics["kl_low"] = _masked_mean(kld, low)
            metrics["kl_high"] = _masked_mean(kld, high)
    with torch.no_grad():
        metrics.update({
            "pg_clipfrac": _masked_mean(info["clipped"], mask),
            "ppo_kl": -_masked_mean(info["log_ratio"], mask),
            "pg_clipfrac_lower": _masked_mean(info["clipped_lower"], mask),
            "high_entropy_frac": _masked_mean(high, mask),
            "clipfrac_high_entropy": _masked_mean(info["clipped"], high),
            "clipfrac_low_entropy": _masked_mean(info["clipped"], low),
        })
    return loss, metrics


# --------------------------------------------------------------------------------------------- EDGE-GRPO
def response_mean_entropy(entropy: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """P_i = mean_t H_{i,t} over the valid tokens of each response (0 for a response without valid token)."""
    mask = response_mask.to(torch.float64)
    return (entropy.detach().to(torch.float64) * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


def entropy_driven_advantage(
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    entropy: torch.Tensor,
    group_ids: torch.Tensor | None,
    *,
    normalization: str = "group",
    epsilon: float = 1e-6,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """EDGE-GRPO's Entropy-Driven Advantage: Â_i = A_i / P̂_i with P̂_i = P_i / P̄, where P̄ is the mean of P over
    the response's group (``normalization='group'``) or over the whole batch (``'batch'``: the authors'
    released code, which averages over the gathered batch). P is clamped to ≥ ``epsilon``. ``advantages`` (B, L)
    are GRPO's (constant over each response)."""
    if normalization not in ("group", "batch"):
        raise ValueError(f"edge_grpo normalization must be 'group' or 'batch', got {normalization!r}")
    p = response_mean_entropy(entropy, response_mask).clamp_min(epsilon)
    has_tokens = response_mask.bool().any(-1)
    if normalization == "batch" or group_ids is None:
        p_bar = p[has_tokens].mean() if has_tokens.any() else torch.ones((), dtype=p.dtype)
        p_bar = p_bar.expand_as(p)
    else:
        num_groups = int(group_ids.max().item()) + 1 if group_ids.numel() else 0
        valid = has_tokens.to(p.dtype)
        sums = torch.zeros(num_groups, dtype=p.dtype).index_add_(0, group_ids, p * valid)
        counts = torch.zeros(num_groups, dtype=p.dtype).index_add_(0, group_ids, valid)
        p_bar = (sums / counts.clamp_min(1.0))[group_ids].clamp_min(epsilon)
    scale = p_bar / p  # 1 / P̂
    out = advantages * scale[:, None].to(advantages.dtype)
    return out, {"response_entropy": p, "scale": scale}
