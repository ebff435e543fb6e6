"""HAEPO (History-Aggregated Exploratory Policy Optimization, arXiv 2508.18884): pure torch.

What the public sources give (abstract + review; see docs/haepo.md): every trajectory k is compressed into its
cumulative log-likelihood L_k(θ) = Σ_t log π_θ(a_t | s_t); a Plackett-Luce softmax across trajectories turns
these into normalized weights w_k(θ); the weights are applied to (normalized) returns; an entropy bonus and a
soft KL penalty to a frozen copy of the previous policy regularize the update.

Reconstruction implemented here (docs/haepo.md §2), per prompt group g (the n responses of one prompt):

    s_k(θ)  = L_k(θ) / κ                     (length_normalize=False)
            = L_k(θ) / (κ T_k)               (length_normalize=True, T_k = number of response tokens)
    w_k(θ)  = softmax_{k ∈ g} s_k(θ)          (Plackett-Luce first-choice probabilities)
    R̃_k     = (R_k − mean_g R) / (std_g R + ε)   (group-normalized return; GRPO's normalization)
    J(θ)    = (1/G) Σ_g Σ_{k∈g} w_k(θ) R̃_k
    ∇J      = (1/G) Σ_g Σ_{k∈g} w_k (R̃_k − R̄_g) ∇s_k,      R̄_g = Σ_{j∈g} w_j R̃_j

Group handling (docs/haepo.md §3): the softmax couples all responses of a prompt, which verl may place in
different micro-batches, mini-batches and data-parallel ranks. The weights are therefore computed once, on the
driver, from the **old** policy's log-probabilities of the whole training batch, and enter the loss as a
per-token advantage

    Â_k = (B/G) · w_k(θ_old) (R̃_k − R̄_g) / (κ · T_k^[length_normalize])       (constant over the tokens of k)

so that the per-sequence surrogate  ℓ(θ) = −(1/B) Σ_k Σ_t Â_k · r_t(θ),  r_t = π_θ(a_t)/π_old(a_t),  has exactly
the gradient −∇J at θ = θ_old, whatever the split (B = sequences, G = groups in the batch). Later mini-batches
and epochs see the weights of θ_old (importance-weighted through r_t); the soft KL to π_old is the trust region.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from hapo_verl.algorithms.groups import group_sum, num_groups as count_groups
from hapo_verl.registry import OLD_LOG_PROB, AdvantageInputs, LossInputs, algorithm, option


def _check_2d(name: str, tensor: torch.Tensor, shape) -> None:
    if tensor.dim() != 2 or tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


def sequence_scores(
    log_prob: torch.Tensor, response_mask: torch.Tensor, temperature: float = 1.0, length_normalize: bool = True
) -> torch.Tensor:
    """s_k = L_k / κ (or L_k / (κ T_k)): the softmax logits of HAEPO. (B, L) -> (B,). Rows without a valid
    token get 0 (they take part in their group's softmax with a neutral logit and carry no gradient)."""
    mask = response_mask.to(log_prob.dtype)
    total = (log_prob * mask).sum(-1)
    if length_normalize:
        total = total / mask.sum(-1).clamp_min(1.0)
    return total / temperature


def group_softmax(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Softmax of ``scores`` (B,) within each group (``group_ids`` (B,) in 0..G-1), numerically stable and
    differentiable."""
    num_groups = count_groups(group_ids)
    if num_groups == 0:
        return scores.clone()
    group_max = torch.full((num_groups,), float("-inf"), dtype=scores.dtype, device=scores.device)
    group_max = group_max.scatter_reduce(0, group_ids, scores.detach(), reduce="amax", include_self=True)
    shifted = torch.exp(scores - group_max[group_ids])
    denom = torch.zeros(num_groups, dtype=scores.dtype, device=scores.device).index_add(0, group_ids, shifted)
    return shifted / denom[group_ids]


def group_normalized_returns(
    returns: torch.Tensor, group_ids: torch.Tensor, norm_by_std: bool = True, epsilon: float = 1e-6
) -> torch.Tensor:
    """R̃_k = (R_k − mean_g) / (std_g + ε), std unbiased as verl's GRPO; a group of one keeps R̃ = R exactly
    (where :func:`~hapo_verl.algorithms.groups.grpo_sequence_advantage` gives R/(1 + ε)), which HAEPO's baseline R̄_g
    then cancels exactly. In float64."""
    num_groups = count_groups(group_ids)
    r = returns.to(torch.float64)
    count = group_sum(torch.ones_like(r), group_ids, num_groups)
    mean = group_sum(r, group_ids, num_groups) / count
    centered = r - mean[group_ids]
    var = group_sum(centered ** 2, group_ids, num_groups)
    std = torch.sqrt(var / (count - 1).clamp_min(1.0))
    single = count[group_ids] < 2
    normalized = torch.where(single, r, centered / (std[group_ids] + epsilon) if norm_by_std else centered)
    return normalized.to(returns.dtype)


def haepo_weights(
    old_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    returns: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    length_normalize: bool = True,
    norm_by_std: bool = True,
    epsilon: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """Everything HAEPO computes from the old policy on the driver, per sequence (all (B,) tensors):

    ``weights`` w_k(θ_old), ``norm_returns`` R̃_k, ``baseline`` R̄_g of k's group, ``coef`` the gradient
    coefficient of s_k, (B/G) w_k (R̃_k − R̄_g), and ``group_size`` n_g. B and G count the rows (groups) with
    at least one valid token.
    """
    _check_2d("response_mask", response_mask, old_log_prob.shape)
    if returns.shape != (old_log_prob.shape[0],) or group_ids.shape != returns.shape:
        raise ValueError("returns and group_ids must be (B,) with B = old_log_prob.shape[0]")
    with torch.no_grad():
        scores = sequence_scores(old_log_prob.double(), response_mask, temperature, length_normalize)
        weights = group_softmax(scores, group_ids)
        norm_returns = group_normalized_returns(returns.double(), group_ids, norm_by_std, epsilon)
        num_groups = count_groups(group_ids)
        baseline = group_sum(weights * norm_returns, group_ids, num_groups)[group_ids]
        group_size = group_sum(torch.ones_like(weights), group_ids, num_groups)[group_ids]
        # B / G over the rows with at least one valid token (verl's synthetic padding rows have none and their
        # own uid): (1/G) Σ_g  ==  (1/B) Σ_k (B/G), B being the sequence count verl's loss normalizes by
        has_tokens = response_mask.bool().any(-1)
        valid_groups = torch.unique(group_ids[has_tokens]).numel()
        scale = int(has_tokens.sum()) / max(valid_groups, 1)
        coef = scale * weights * (norm_returns - baseline)
    return {"weights": weights, "norm_returns": norm_returns, "baseline": baseline, "coef": coef,
            "group_size": group_size, "scores": scores}


def haepo_advantages(
    old_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    returns: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    length_normalize: bool = True,
    norm_by_std: bool = True,
    epsilon: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token HAEPO advantage Â (B, L) (module docstring), the group-normalized returns broadcast over
    the response (B, L), and the per-sequence info of :func:`haepo_weights`."""
    info = haepo_weights(old_log_prob, response_mask, returns, group_ids, temperature=temperature,
                         length_normalize=length_normalize, norm_by_std=norm_by_std, epsilon=epsilon)
    mask = response_mask.to(torch.float64)
    per_token = info["coef"] / temperature
    if length_normalize:
        per_token = per_token / mask.sum(-1).clamp_min(1.0)
    advantages = (per_token[:, None] * mask).to(old_log_prob.dtype)
    norm_returns = (info["norm_returns"][:, None] * mask).to(old_log_prob.dtype)
    return advantages, norm_returns, info


def haepo_objective(
    log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    norm_returns: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    length_normalize: bool = True,
) -> torch.Tensor:
    """The exact, differentiable HAEPO return term J(θ) = (1/G) Σ_g Σ_{k∈g} w_k(θ) R̃_k (to maximize), for a
    batch that holds whole groups. Used as the reference the surrogate is tested against."""
    scores = sequence_scores(log_prob, response_mask, temperature, length_normalize)
    weights = group_softmax(scores, group_ids)
    return (weights * norm_returns.to(weights.dtype)).sum() / max(count_groups(group_ids), 1)


def haepo_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    kl_coef: float,
    kl_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    aggregate_seq: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    aggregate_tok: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """HAEPO loss without the entropy bonus (verl adds −entropy_coeff·H̄ around every policy loss):

        loss = aggregate_seq(−Â ⊙ r) + β · aggregate_tok(KL̂(π_θ ‖ π_old))

    ``aggregate_seq`` must be a sequence mean of token sums (verl's ``seq-mean-token-sum`` with the global batch
    size bound) and ``aggregate_tok`` a token mean (``token-mean`` with the global token count), so the value and
    gradient do not depend on the micro-batch split. ``kl_fn(log_prob, old_log_prob)`` is the per-token KL
    estimator (verl's ``kl_penalty``)."""
    log_ratio = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)
    pg_mat = -advantages * ratio
    if rollout_is_weights is not None:
        pg_mat = pg_mat * rollout_is_weights
    pg_term = aggregate_seq(pg_mat, response_mask)
    kl_mat = kl_fn(log_prob, old_log_prob)
    kl_term = aggregate_tok(kl_mat, response_mask)
    loss = pg_term + kl_coef * kl_term
    with torch.no_grad():
        mask_f = response_mask.to(log_prob.dtype)
        count = mask_f.sum().clamp_min(1.0)
        # local (this micro-batch) means: verl averages these metrics over micro-batches
        metrics = {
            "kl_prev": (kl_mat.detach() * mask_f).sum() / count,
            "ppo_kl": -(log_ratio.detach() * mask_f).sum() / count,
            "ratio_mean": (ratio.detach() * mask_f).sum() / count,
        }
    return loss, metrics


# ------------------------------------------------------------------------------------------------ options, spec
PAPER = "HAEPO, arXiv 2508.18884 (https://arxiv.org/abs/2508.18884); reconstruction in docs/haepo.md"
KL_TYPES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "full", "k1+", "k3+", "low_var_kl+")


@dataclass(frozen=True)
class HAEPOEstimatorOptions:
    """``algorithm.haepo.*`` with ``adv_estimator=haepo``."""

    temperature: float = option(1.0, "κ of the Plackett-Luce softmax s_k = L_k/κ.", low=0.0, low_open=True,
                                paper=PAPER + " [ours]")
    length_normalize: bool = option(True, "Use the mean token log-likelihood L_k/T_k instead of the sum (sums over "
                                    "hundreds of tokens make the softmax one-hot; docs/haepo.md §4).", paper=PAPER)
    norm_adv_by_std: bool = option(True, "Divide the group-centred returns by the group std (GRPO).", paper=PAPER)
    epsilon: float = option(1e-6, "Added to the std.", low=0.0, high=1.0)


@dataclass
class HAEPOLossOptions:
    """``actor_rollout_ref.actor.policy_loss.*`` with ``loss_mode=haepo``."""

    haepo_kl_coef: float = option(0.01, "β of the soft KL penalty to the frozen previous policy π_old (the paper's "
                                  "value is not public).", low=0.0, paper=PAPER + " [ours]")
    haepo_kl_type: str = option("low_var_kl", "verl KL estimator name for that penalty.", choices=KL_TYPES)


def effective_group_frac(weights: torch.Tensor, group_ids: torch.Tensor) -> float:
    """exp(H(w_g)) / n_g averaged over groups: 1 = uniform weights, 1/n_g = one-hot."""
    if weights.numel() == 0:
        return 1.0
    count = count_groups(group_ids)
    plogp = torch.where(weights > 0, weights * torch.log(weights), torch.zeros_like(weights))
    ent = -group_sum(plogp, group_ids, count)
    size = group_sum(torch.ones_like(weights), group_ids, count)
    return float((torch.exp(ent) / size).mean())


def haepo_advantage(inputs: AdvantageInputs, options: HAEPOEstimatorOptions):
    """HAEPO's per-token advantage Â from the old policy's log-probs of complete groups (driver)."""
    mask = inputs.response_mask.bool()
    returns = (inputs.token_level_rewards * mask).sum(-1)
    advantages, norm_returns, info = haepo_advantages(
        inputs.old_log_prob.float(), mask, returns.float(), inputs.group_ids, temperature=options.temperature,
        length_normalize=options.length_normalize, norm_by_std=options.norm_adv_by_std, epsilon=options.epsilon)
    dtype = inputs.token_level_rewards.dtype
    w, n = info["weights"], info["group_size"]
    multi = n > 1
    metrics = {
        "haepo/weight_max": float(w[multi].max()) if multi.any() else 1.0,
        "haepo/effective_group_frac": effective_group_frac(w, inputs.group_ids),
        "haepo/coef_abs_mean": float(info["coef"].abs().mean()) if w.numel() else 0.0,
    }
    return advantages.to(dtype), norm_returns.to(dtype), metrics


@algorithm("loss", name="haepo", title="HAEPO", paper=PAPER,
           summary="Plackett-Luce weights of whole trajectories on group-normalised returns, soft KL to π_old.",
           loss_options=HAEPOLossOptions, advantage=haepo_advantage, estimator_options=HAEPOEstimatorOptions,
           estimator_needs=frozenset({OLD_LOG_PROB}), loss_requires_estimator=True)
def haepo_loss(inputs: LossInputs, options: HAEPOLossOptions):
    """The return term is a sequence mean of token sums and the KL a token mean, both over the global batch,
    whatever ``loss_agg_mode`` says (HAEPO is sequence-level)."""
    return haepo_policy_loss(
        inputs.old_log_prob, inputs.log_prob, inputs.advantages, inputs.response_mask.bool(),
        kl_coef=options.haepo_kl_coef, kl_fn=lambda lp, old: inputs.kl(lp, old, options.haepo_kl_type),
        aggregate_seq=lambda mat, mask: inputs.aggregate(mat, mask, "seq-mean-token-sum"),
        aggregate_tok=lambda mat, mask: inputs.aggregate(mat, mask, "token-mean"),
        rollout_is_weights=inputs.rollout_is_weights)
