"""GRPO-S, Sequence-Level GRPO (arXiv 2508.04349, "GTPO and GRPO-S: Token and Sequence-Level Reward Shaping with
Policy Entropy"): GTPO's entropy shaping at the level of whole responses, then GRPO's group normalisation.

Equation numbers are those of arXiv v5 (docs/gtpo.md). In a prompt's group of G responses, O⁺ (n correct: score >
``correct_threshold``) and O⁻ (m wrong), with Ĥ_k the mean old-policy entropy of response k over its tokens:

    Eq. 6   r̂⁺_i = β₁·r_i + β₂ · Ĥ_i / Σ_{k∈O⁺} Ĥ_k · n          r̂⁻_j = β₁·(−1) − β₂ · (1/Ĥ_j) / Σ_{k∈O⁻} (1/Ĥ_k) · m
    Â_i = (r̂_i − mean_group(r̂)) / (std_group(r̂) + ε)             ("analogously to Eq. 1", over the G responses)

Every Ĥ enters as Ĥ + ε. With β₂ = 0 and rewards in {0, 1} (or ±1) this is verl's GRPO: r̂ is then an increasing
affine function of the reward within each group, which the normalisation removes. The loss is the trainer's (the
paper's Eq. 7-8 sequence-level ratio is a loss, not an estimator: verl's ``loss_mode=gspo`` is its geometric-mean
form, §2.4.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hapo_verl.algorithms.groups import group_sum, grpo_sequence_advantage, num_groups
from hapo_verl.registry import OLD_ENTROPY, AdvantageInputs, Variant, algorithm, option

PAPER = "GRPO-S (Token and Sequence-Level Reward Shaping with Policy Entropy), arXiv 2508.04349 " \
        "(https://arxiv.org/abs/2508.04349)"


@dataclass(frozen=True)
class GRPOSOptions:
    """``algorithm.grpo_s.*`` with ``adv_estimator=grpo_s``."""

    beta1: float = option(1.0, "β₁: weight of the response's own reward (Eq. 6).", low=0.0,
                          paper=PAPER + ", §3.1: β₁ = 1")
    beta2: float = option(0.1, "β₂: weight of the mean-entropy term (Eq. 6); 0 gives GRPO.", low=0.0,
                          paper=PAPER + ", §3.1: β₂ = 0.1")
    base_reward: str = option(
        "paper", "paper: β₁·r_i for correct and β₁·(−1) for wrong responses (Eq. 6); score: β₁·r for both.",
        choices=("paper", "score"), paper=PAPER + ", Eq. 6")
    correct_threshold: float = option(
        0.0, "A response is correct (O⁺) when its score is above this; 0 fits 0/1 and ±1 rewards.")
    norm_adv_by_std: bool = option(True, "Divide by the group's std, as GRPO (Eq. 1).")
    epsilon: float = option(1e-6, "ε added to every mean entropy (against 1/0) and to the group std.",
                            low=0.0, high=1.0, low_open=True, paper=PAPER + ", Remark 2.1 (v6)")


def response_mean_entropy(entropy: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Ĥ_k (B,) in float64: mean entropy over the response's tokens (0 for a response without tokens). One batched
    dot product per row: no (B, L) temporary."""
    mask = response_mask.to(entropy.dtype)
    total = torch.bmm(entropy.detach().unsqueeze(1), mask.unsqueeze(2)).reshape(-1).to(torch.float64)
    return total / mask.sum(-1).to(torch.float64).clamp_min(1.0)


def grpo_s_shaped_rewards(
    scores: torch.Tensor,
    mean_entropy: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    beta1: float = 1.0,
    beta2: float = 0.1,
    base_reward: str = "paper",
    correct_threshold: float = 0.0,
    epsilon: float = 1e-6,
) -> torch.Tensor:
    """r̂ (B,) of Eq. 6 (module docstring), float64."""
    if base_reward not in ("paper", "score"):
        raise ValueError(f"algorithm.grpo_s.base_reward must be paper or score, got {base_reward!r}")
    scores = scores.detach().to(torch.float64)
    positive = scores > correct_threshold
    count = num_groups(group_ids)
    key = 2 * group_ids + positive.long()  # (group, sign) cell of each response
    h = mean_entropy.to(torch.float64) + epsilon
    x = torch.where(positive, h, h.reciprocal())
    share = x / group_sum(x, key, 2 * count)[key]  # Ĥ_i / Σ_{O⁺} Ĥ   or   (1/Ĥ_j) / Σ_{O⁻} (1/Ĥ)
    size = group_sum(torch.ones_like(x), key, 2 * count)[key]  # n or m
    base = beta1 * scores if base_reward == "score" else torch.where(positive, beta1 * scores,
                                                                       torch.full_like(scores, -beta1))
    return base + (positive.to(torch.float64) * 2.0 - 1.0) * beta2 * share * size


@algorithm("advantage", name="grpo_s", title="GRPO-S", paper=PAPER,
           summary="GRPO on entropy-shaped sequence rewards: bonus to exploratory correct responses, extra "
                   "penalty to confident wrong ones.",
           estimator_options=GRPOSOptions, estimator_needs=frozenset({OLD_ENTROPY}),
           variants=(Variant("ds", "dynamic sampling", ("algorithm.filter_groups.enable=true",),
                             why="without the groups whose rewards are all equal, which it gives entropy-only "
                                 "advantages"),))
def grpo_s_estimator(inputs: AdvantageInputs, options: GRPOSOptions):
    mask = inputs.response_mask
    scores = inputs.token_level_rewards.sum(-1)
    mean_entropy = response_mean_entropy(inputs.entropy, mask)
    shaped = grpo_s_shaped_rewards(scores, mean_entropy, inputs.group_ids, beta1=options.beta1,
                                   beta2=options.beta2, base_reward=options.base_reward,
                                   correct_threshold=options.correct_threshold, epsilon=options.epsilon)
    adv = grpo_sequence_advantage(shaped, inputs.group_ids, num_groups(inputs.group_ids), options.epsilon,
                                  options.norm_adv_by_std)
    advantages = adv.to(inputs.token_level_rewards.dtype)[:, None] * mask
    correct = scores > options.correct_threshold
    metrics = {
        "grpo_s/shaped_reward_mean": float(shaped.mean()) if shaped.numel() else 0.0,
        "grpo_s/correct_fraction": float(correct.double().mean()) if shaped.numel() else 0.0,
        "grpo_s/mean_entropy": float(mean_entropy.mean()) if shaped.numel() else 0.0,
    }
    return advantages, advantages, metrics
