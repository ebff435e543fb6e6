"""EDGE-GRPO's Entropy-Driven Advantage (arXiv 2507.21848), a baseline of the HAPO paper's Table 1.

A response's GRPO advantage is divided by its normalised mean token entropy under the old policy, so that confident
responses get larger updates (both signs):

    Â_i = A_i / P̂_i,    P̂_i = P_i / P̄,    P_i = mean_t H_{i,t}

P̄ is the mean of P over the response's group (our reading; the paper's equation is not public) or over the whole
batch (the authors' released code). Guided Error Correction is not a loss (docs/baselines.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hapo_verl.algorithms.groups import group_sum, grpo_sequence_advantage, num_groups
from hapo_verl.registry import OLD_ENTROPY, AdvantageInputs, algorithm, option

PAPER = "EDGE-GRPO, arXiv 2507.21848 (https://arxiv.org/abs/2507.21848)"


@dataclass(frozen=True)
class EdgeGRPOOptions:
    """``algorithm.edge_grpo.*`` with ``adv_estimator=edge_grpo``."""

    normalization: str = option("group", "P̄ over the response's group (our reading) or the whole batch (the "
                                "authors' released code).", choices=("group", "batch"), paper=PAPER)
    norm_adv_by_std: bool = option(True, "GRPO's std normalisation of the base advantage.")
    epsilon: float = option(1e-6, "Floor of the response entropy P_i, and added to the GRPO std.", low=0.0, high=1.0)


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
    """Â_i = A_i / P̂_i (module docstring). ``advantages`` (B, L) are GRPO's (constant over each response); P is
    clamped to ≥ ``epsilon``."""
    if normalization not in ("group", "batch"):
        raise ValueError(f"algorithm.edge_grpo.normalization must be group or batch, got {normalization!r}")
    p = response_mean_entropy(entropy, response_mask).clamp_min(epsilon)
    has_tokens = response_mask.bool().any(-1)
    if normalization == "batch" or group_ids is None:
        valid = has_tokens.to(p.dtype)
        p_bar = ((p * valid).sum() / valid.sum()).where(valid.sum() > 0, torch.ones((), dtype=p.dtype, device=p.device))
        p_bar = p_bar.expand_as(p)
    else:
        count = num_groups(group_ids)
        valid = has_tokens.to(p.dtype)
        p_bar = (group_sum(p * valid, group_ids, count) / group_sum(valid, group_ids, count).clamp_min(1.0))
        p_bar = p_bar[group_ids].clamp_min(epsilon)
    scale = p_bar / p  # 1 / P̂
    out = advantages * scale[:, None].to(advantages.dtype)
    return out, {"response_entropy": p, "scale": scale}


@algorithm("advantage", name="edge_grpo", title="EDGE-GRPO", paper=PAPER,
           summary="GRPO advantage divided by the response's normalised old-policy entropy.",
           estimator_options=EdgeGRPOOptions, estimator_needs=frozenset({OLD_ENTROPY}))
def edge_grpo_advantage(inputs: AdvantageInputs, options: EdgeGRPOOptions):
    mask = inputs.response_mask
    scores = (inputs.token_level_rewards * mask).sum(-1)
    base = grpo_sequence_advantage(scores, inputs.group_ids, num_groups(inputs.group_ids), options.epsilon,
                                   options.norm_adv_by_std)
    advantages = base[:, None] * mask
    out, info = entropy_driven_advantage(advantages, mask, inputs.entropy, inputs.group_ids,
                                         normalization=options.normalization, epsilon=options.epsilon)
    scale = info["scale"]
    metrics = {
        "edge_grpo/scale_mean": float(scale.mean()) if scale.numel() else 1.0,
        "edge_grpo/scale_max": float(scale.max()) if scale.numel() else 1.0,
        "edge_grpo/response_entropy_mean": float(info["response_entropy"].mean()) if scale.numel() else 0.0,
    }
    return out, advantages, metrics
