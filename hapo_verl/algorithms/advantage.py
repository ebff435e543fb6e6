"""Token-Level Group Average advantage (HAPO, arXiv 2509.16591: its TLGA component).

For each prompt group g (the n responses sharing a ``uid``), with R_i the scalar outcome reward of
response i and L_i its number of valid tokens:

    μ_g = Σ_i L_i R_i / Σ_i L_i                                    length-weighted mean over valid tokens
    σ_g = sqrt(Σ_i L_i (R_i - μ_g)² / Σ_i L_i)                     population std over valid tokens
    A_i = (R_i - μ_g) / (σ_g + ε)        (or R_i - μ_g without std normalization)

One value per response, broadcast over its valid tokens. Smooth-score fallback: when any normalized value of
the group reaches ``fallback_threshold`` in magnitude (a tiny minority class, or σ_g ≈ 0), the group uses
GRPO advantages (R_i - mean_j R_j) / (std_unbiased_j R_j + ε) instead. The default checks valid tokens only;
``reference_compat`` also checks the padding positions the fork normalizes, (0 - μ_g)/(σ_g + ε).

Vectorized with scatter-adds over groups: no Python loop over groups or rows.
"""

from __future__ import annotations

import torch

from hapo_verl.algorithms.groups import group_sum, grpo_sequence_advantage, num_groups as count_groups


def token_level_group_average_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: torch.Tensor,
    epsilon: float = 1e-6,
    norm_adv_by_std: bool = True,
    fallback_threshold: float = 5.0,
    reference_compat: bool = False,
    return_info: bool = False,
):
    """Token-Level Group Average advantage.

    Args:
        token_level_rewards: (B, L) rewards; R_i is the row sum.
        response_mask: (B, L) valid-token mask.
        group_ids: (B,) long, contiguous group ids (see :func:`group_ids_from_index`).
        epsilon: added to σ_g before dividing.
        norm_adv_by_std: divide by σ_g (False: Dr.GRPO-style centering only).
        fallback_threshold: a group whose normalized values reach this magnitude uses GRPO advantages.
        reference_compat: include padding positions in the fallback check, as the authors' fork does.
        return_info: also return a dict with per-group tensors (mean, std, fallback).

    Returns:
        (advantages, returns), both (B, L), zero at padding; plus the info dict when ``return_info``.
    """
    if token_level_rewards.shape != response_mask.shape or token_level_rewards.dim() != 2:
        raise ValueError(
            f"token_level_rewards {tuple(token_level_rewards.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must both be (batch, response_length)"
        )
    if group_ids.shape != (token_level_rewards.shape[0],):
        raise ValueError(f"group_ids must have shape ({token_level_rewards.shape[0]},), got {tuple(group_ids.shape)}")
    if not fallback_threshold > 0:
        raise ValueError(f"algorithm.hapo.fallback_threshold must be > 0, got {fallback_threshold!r}")
    with torch.no_grad():
        mask = response_mask.to(token_level_rewards.dtype)
        scores = token_level_rewards.sum(dim=-1)
        if torch.isnan(scores).any():
            raise ValueError("token_level_rewards contain NaN")
        lengths = response_mask.sum(dim=-1, dtype=scores.dtype)
        group_ids = group_ids.to(device=scores.device, dtype=torch.long)
        num_groups = count_groups(group_ids)

        tokens_g = group_sum(lengths, group_ids, num_groups)
        safe_tokens = tokens_g.clamp_min(1.0)
        mean_g = group_sum(lengths * scores, group_ids, num_groups) / safe_tokens
        dev = scores - mean_g[group_ids]
        std_g = (group_sum(lengths * dev.square(), group_ids, num_groups) / safe_tokens).sqrt()

        denom = (std_g + epsilon) if norm_adv_by_std else torch.ones_like(std_g)
        normed = dev / denom[group_ids]

        # fallback check over valid positions: rows with at least one valid token
        has_tokens = lengths > 0
        row_hit = has_tokens & (normed.abs() >= fallback_threshold)
        if reference_compat:
            # the fork normalizes the whole (rows x L) block: padding positions hold (0 - μ_g) / denom
            has_padding = lengths < response_mask.shape[-1]
            pad_value = (-mean_g / denom)[group_ids]
            row_hit = row_hit | (has_padding & (pad_value.abs() >= fallback_threshold))
        fallback_g = group_sum(row_hit.to(scores.dtype), group_ids, num_groups) > 0

        grpo = grpo_sequence_advantage(scores, group_ids, num_groups, epsilon, norm_adv_by_std)
        per_row = torch.where(fallback_g[group_ids], grpo, normed)
        per_row = torch.where(tokens_g[group_ids] > 0, per_row, torch.zeros_like(per_row))
        advantages = per_row.unsqueeze(-1) * mask
    if return_info:
        return advantages, advantages, {"mean": mean_g, "std": std_g, "fallback": fallback_g, "tokens": tokens_g}
    return advantages, advantages
