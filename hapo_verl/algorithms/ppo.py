"""PPO building blocks shared by the policy losses: verl's dual-clip token loss and masked metric means.

Pure torch. Device-agnostic: every tensor is made on the input's device, and nothing syncs with the host.
"""

from __future__ import annotations

import functools

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
    neg_advantages = -advantages  # verl negates three times; once is the same value
    pg_losses1 = neg_advantages * ratio
    pg_losses2 = neg_advantages * clipped_ratio
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_losses3 = neg_advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    negative = advantages < 0
    pg_losses = torch.where(negative, clip_pg_losses2, clip_pg_losses1)
    with torch.no_grad():
        clipped = torch.gt(pg_losses2, pg_losses1)
        clipped_lower = torch.gt(clip_pg_losses1, pg_losses3).logical_and_(negative)
    return pg_losses, clipped, clipped_lower


def scalar_like(value: float, like: torch.Tensor) -> torch.Tensor:
    """0-dim tensor holding the Python number ``value`` in ``like``'s dtype on ``like``'s device, the value
    ``torch.tensor(value, dtype=...)`` would hold, written by a fill kernel on the device: no host-to-device copy
    (``torch.tensor``/``torch.as_tensor`` of a Python number on CUDA is a pageable copy, a sync point)."""
    return torch.full((), value, dtype=like.dtype, device=like.device)


@functools.lru_cache(maxsize=256)
def device_constants(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """1-D tensor of the Python numbers ``values`` (the values ``torch.tensor(list(values), dtype=dtype)`` holds)
    on ``device``, written element by element by fill kernels on the device: no host-to-device copy. Cached per
    (values, dtype, device), so the fills run once per run: the tensor is shared, never write to it."""
    out = torch.empty(len(values), dtype=dtype, device=device)
    for i, value in enumerate(values):
        out[i].fill_(value)
    return out


def clip_bounds(clip_low: torch.Tensor | float, clip_high: torch.Tensor | float, like: torch.Tensor):
    """The ratio bounds (1 − ε_low, 1 + ε_high) of :func:`dual_clip_ppo_token_loss`, computed in ``like``'s dtype:
    Python floats when both ranges are numbers (verl's ``torch.clamp`` with scalars), else tensors on ``like``'s
    device (a number becomes a 0-dim tensor, see :func:`scalar_like`)."""
    if not isinstance(clip_low, torch.Tensor) and not isinstance(clip_high, torch.Tensor):
        return 1.0 - clip_low, 1.0 + clip_high

    def as_like(value):
        if isinstance(value, torch.Tensor):
            return value.to(dtype=like.dtype, device=like.device)
        return scalar_like(value, like)

    return 1.0 - as_like(clip_low), 1.0 + as_like(clip_high)


def dual_clip_ppo_token_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: torch.Tensor | float | None,
    clip_high: torch.Tensor | float | None,
    clip_ratio_c: float,
    *,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """verl's dual-clip PPO token loss with clip ranges that may be per-token tensors. Returns the (B, L) loss and
    boolean (B, L) masks ``clipped`` and ``clipped_lower``, plus ``log_ratio``, ``ratio`` (exp of the clamped
    log-ratio, carrying its gradient) and ``clipped_ratio`` (clip(r, 1 − ε_low, 1 + ε_high)).

    ``bounds``: the ratio bounds (1 − ε_low, 1 + ε_high) as tensors in the ratio's dtype, given instead of
    ``clip_low``/``clip_high`` (a caller that builds per-token bounds directly, :func:`clip_bounds`' values)."""
    if not clip_ratio_c > 1.0:
        raise ValueError(f"actor_rollout_ref.actor.clip_ratio_c must be > 1.0 for dual-clip PPO, got {clip_ratio_c}")
    log_ratio = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)
    lower, upper = clip_bounds(clip_low, clip_high, ratio) if bounds is None else bounds
    if isinstance(lower, torch.Tensor) or isinstance(upper, torch.Tensor):
        clipped_ratio = torch.minimum(torch.maximum(ratio, lower), upper)
    else:
        clipped_ratio = torch.clamp(ratio, lower, upper)
    pg_losses, clipped, clipped_lower = dual_clip_token_losses(advantages, ratio, clipped_ratio, clip_ratio_c)
    return pg_losses, {"clipped": clipped, "clipped_lower": clipped_lower, "log_ratio": log_ratio, "ratio": ratio,
                       "clipped_ratio": clipped_ratio}


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` in float32 (0 for an empty mask), detached, on the input's device."""
    return masked_mean_fn(mask)(values)


def masked_mean_fn(mask: torch.Tensor):
    """``mean(values)``: :func:`masked_mean` over one ``mask`` for several ``values``, the mask's float32 copy
    and count made once. Bit-equal to :func:`masked_mean`: a boolean ``values`` over a boolean ``mask`` is summed
    as float32(values & mask), the same 0/1 terms in the same order as float32(values) · float32(mask)."""
    mask_f = mask.to(torch.float32)
    count = mask_f.sum().clamp_min(1.0)
    is_bool = mask.dtype == torch.bool

    def mean(values: torch.Tensor) -> torch.Tensor:
        values = values.detach()
        if is_bool and values.dtype == torch.bool and values.shape == mask.shape:
            return (values & mask).to(torch.float32).sum() / count
        return (values.to(torch.float32) * mask_f).sum() / count

    return mean


def ppo_metrics(info: dict[str, torch.Tensor], mask: torch.Tensor, mean=None) -> dict[str, torch.Tensor]:
    """verl's three PPO metrics (``pg_clipfrac``, ``ppo_kl``, ``pg_clipfrac_lower``) from
    :func:`dual_clip_ppo_token_loss`'s masks, local means over ``mask`` (``mean``: a :func:`masked_mean_fn` of
    ``mask`` to share)."""
    mean = mean or masked_mean_fn(mask)
    with torch.no_grad():
        return {
            "pg_clipfrac": mean(info["clipped"]),
            "ppo_kl": -mean(info["log_ratio"]),
            "pg_clipfrac_lower": mean(info["clipped_lower"]),
        }
