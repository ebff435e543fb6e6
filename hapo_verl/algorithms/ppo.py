"""PPO building blocks shared by the policy losses: verl's dual-clip token loss and masked metric means.

Pure torch. Device-agnostic: every tensor is made on the input's device, and nothing syncs with the host.
"""

from __future__ import annotations

import torch


def validate_quantile(value, key: str, allow_zero: bool = True) -> float:
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} must be a number in [0, 1), got {value!r}")
    if not (0.0 <= value < 1.0) or (not allow_zero and value == 0.0):
        lo = "[0" if allow_zero else "(0"
        raise ValueError(f"{key} must be in {lo}, 1), got {value!r}")
    return float(value)


def dual_clip_token_losses(
    advantages: torch.Tensor, ratio: torch.Tensor, clipped_ratio: torch.Tensor, clip_ratio_c: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """verl's dual-clip PPO token loss (``compute_policy_loss_vanilla`` before aggregation), op for op so that the
    result is bit-equal, given the ratio and its clipped value (clip ranges may be per-token tensors).

    Returns the (B, L) loss and two boolean masks: ``clipped`` (the clipped branch is active) and
    ``clipped_lower`` (the dual-clip bound -A·c is active, negative advantages only)."""
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * clipped_ratio
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    negative = advantages < 0
    pg_losses = torch.where(negative, clip_pg_losses2, clip_pg_losses1)
    with torch.no_grad():
        clipped = torch.gt(pg_losses2, pg_losses1)
        clipped_lower = torch.gt(clip_pg_losses1, pg_losses3).logical_and_(negative)
    return pg_losses, clipped, clipped_lower


def dual_clip_ppo_token_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: torch.Tensor | float,
    clip_high: torch.Tensor | float,
    clip_ratio_c: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """verl's dual-clip PPO token loss with clip ranges that may be per-token tensors. Returns the (B, L) loss and
    boolean (B, L) masks ``clipped`` and ``clipped_lower``, plus ``log_ratio``, ``ratio`` (exp of the clamped
    log-ratio, carrying its gradient) and ``clipped_ratio`` (clip(r, 1 − ε_low, 1 + ε_high))."""
    if not clip_ratio_c > 1.0:
        raise ValueError(f"actor_rollout_ref.actor.clip_ratio_c must be > 1.0 for dual-clip PPO, got {clip_ratio_c}")
    log_ratio = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)
    if isinstance(clip_low, torch.Tensor) or isinstance(clip_high, torch.Tensor):
        lower = 1.0 - torch.as_tensor(clip_low, dtype=ratio.dtype, device=ratio.device)
        upper = 1.0 + torch.as_tensor(clip_high, dtype=ratio.dtype, device=ratio.device)
        clipped_ratio = torch.minimum(torch.maximum(ratio, lower), upper)
    else:
        clipped_ratio = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg_losses, clipped, clipped_lower = dual_clip_token_losses(advantages, ratio, clipped_ratio, clip_ratio_c)
    return pg_losses, {"clipped": clipped, "clipped_lower": clipped_lower, "log_ratio": log_ratio, "ratio": ratio,
                       "clipped_ratio": clipped_ratio}


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` in float32 (0 for an empty mask), detached, on the input's device."""
    mask_f = mask.to(torch.float32)
    return (values.detach().to(torch.float32) * mask_f).sum() / mask_f.sum().clamp_min(1.0)


def ppo_metrics(info: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """verl's three PPO metrics (``pg_clipfrac``, ``ppo_kl``, ``pg_clipfrac_lower``) from
    :func:`dual_clip_ppo_token_loss`'s masks, local means over ``mask``."""
    with torch.no_grad():
        return {
            "pg_clipfrac": masked_mean(info["clipped"], mask),
            "ppo_kl": -masked_mean(info["log_ratio"], mask),
            "pg_clipfrac_lower": masked_mean(info["clipped_lower"], mask),
        }
