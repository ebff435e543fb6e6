"""HAPO (Heterogeneous Adaptive Policy Optimization, arXiv 2509.16591): options and spec.

The math lives in three modules that read like the paper: :mod:`.entropy` (ĥ, its statistics, the sampling
temperature), :mod:`.advantage` (Token-Level Group Average) and :mod:`.policy_loss` (Asymmetric Adaptive
Clipping, Differential Advantage Redistribution). This module binds them to the registry:

- ``algorithm.adv_estimator=hapo``: TLGA over each prompt group (needs nothing from the old policy);
- ``policy_loss.loss_mode=hapo``: the HAPO loss. Default: ĥ from the old-policy entropy with statistics of the
  whole training batch (computed once per step on the driver). ``reference_compat``: the authors' fork, ĥ = |ĥ|
  from the current-policy entropy with statistics of each micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hapo_verl.algorithms.advantage import token_level_group_average_advantage
from hapo_verl.algorithms.entropy import EntropyStats, compute_entropy_stats, entropy_score
from hapo_verl.algorithms.policy_loss import hapo_policy_loss
from hapo_verl.registry import (
    BATCH_STATS,
    CURRENT_ENTROPY,
    OLD_ENTROPY,
    AdvantageInputs,
    LossInputs,
    OldPolicyBatch,
    algorithm,
    load_options,
    option,
)

PAPER = "HAPO, arXiv 2509.16591 (https://arxiv.org/abs/2509.16591)"


@dataclass
class HAPOLossOptions:
    """``actor_rollout_ref.actor.policy_loss.*`` with ``loss_mode=hapo``."""

    reference_compat: bool = option(
        False, "Reproduce the authors' fork: ĥ = |ĥ| (its sign bug) from the current policy's entropy with "
        "per-micro-batch statistics. false: signed ĥ from the old policy's entropy, whole-batch statistics. "
        "Set from hapo.reference_compat by hapo.yaml (${hapo.reference_compat}); a different value stops the "
        "run at start-up.", paper=PAPER + ", authors' code")
    adaptive_clip: bool = option(True, "Asymmetric Adaptive Clipping: per-token clip ranges from ĥ.",
                                 paper=PAPER)
    clip_alpha: float = option(1.0, "α: how far clip ranges widen with |ĥ|, ε·(1 + α|ĥ|).", low=0.0,
                               paper=PAPER + " (published recipes: 1.0)")
    adaptive_advantage: bool = option(True, "Differential Advantage Redistribution: A·(1 + βĥ) on modulated "
                                      "tokens.", paper=PAPER)
    adv_beta: float = option(1.0, "β of the advantage factor (1 + βĥ).", low=0.0,
                             paper=PAPER + " (published recipes: 1.0)")
    entropy_pivot: float = option(0.8, "Quantile of log-entropy used as the pivot of ĥ (the fork calls it "
                                  "'median'; it is the 80th percentile).", low=0.0, high=1.0, low_open=True,
                                  high_open=True, paper=PAPER + ", authors' code")


@dataclass(frozen=True)
class HAPOAdvantageConfig:
    """``algorithm.hapo.*`` with ``adv_estimator=hapo`` (Token-Level Group Average)."""

    reference_compat: bool = option(False, "Include padding positions in the smooth-score fallback check, as the "
                                    "fork does. Set from hapo.reference_compat by hapo.yaml; a different value "
                                    "stops the run at start-up.", paper=PAPER)
    fallback_threshold: float = option(5.0, "A group whose normalized advantage reaches this magnitude falls back "
                                       "to GRPO advantages (the fork's hard-coded 5.0).", low=0.0, low_open=True,
                                       paper=PAPER + ", authors' code")
    norm_adv_by_std: bool = option(True, "Divide by the token-level std (false: centering only, as Dr.GRPO).")
    epsilon: float = option(1e-6, "Added to the std.", low=0.0, high=1.0, low_open=True)

    @classmethod
    def from_algorithm_config(cls, algorithm_config) -> "HAPOAdvantageConfig":
        """Read ``algorithm.hapo`` from verl's algorithm config (DictConfig, dict, AlgoConfig or None)."""
        options = None
        if algorithm_config is not None:
            getter = getattr(algorithm_config, "get", None)
            options = getter("hapo", None) if getter else getattr(algorithm_config, "hapo", None)
        return load_options(cls, options, "algorithm.hapo")


@dataclass
class AdaptiveTemperatureOptions:
    """The top-level ``hapo.*`` section: Adaptive Temperature Sampling and the fork-compatibility switch."""

    reference_compat: bool = option(
        False, "Switch to the authors' fork's behaviour. Here: the sampler's ĥ is unsigned and uses the fork's "
        "constants (log floor 1e-6, scale + 1e-6). hapo.yaml sets the loss's and the estimator's reference_compat "
        "from it; the launcher stops the run when either differs. What still differs from the fork: "
        "docs/algorithms.md.", paper=PAPER + ", authors' code")
    adaptive_temperature: bool = option(
        False, "Adaptive Temperature Sampling: sample each token at T·(1 + τ·ĥ) with the previous step's entropy "
        "statistics (vLLM logits processor or the CPU rollout).", paper=PAPER)
    temperature_tau: float = option(0.0, "τ of the temperature factor (1 + τ·ĥ).", low=0.0, high=1.0,
                                    high_open=True, paper=PAPER + " (published recipes: 0.05)")


def hapo_loss_needs(options: HAPOLossOptions) -> frozenset:
    return frozenset({CURRENT_ENTROPY}) if options.reference_compat else frozenset({OLD_ENTROPY, BATCH_STATS})


def hapo_batch_stats(old: OldPolicyBatch, options: HAPOLossOptions) -> dict:
    """Entropy statistics of every valid token of the step (driver)."""
    return compute_entropy_stats(old.entropy, old.response_mask, options.entropy_pivot).to_dict()


def hapo_batch_metrics(old: OldPolicyBatch, options: HAPOLossOptions, stats: dict) -> dict:
    """The statistics and the distribution of ĥ over the step's valid tokens."""
    stats = EntropyStats.from_dict(stats)
    metrics = {"hapo/stats/pivot": stats.pivot, "hapo/stats/scale": stats.scale,
               "hapo/stats/pos_scale": stats.pos_scale, "hapo/stats/neg_scale": stats.neg_scale,
               "hapo/stats/num_tokens": stats.num_tokens}
    h_hat = entropy_score(old.entropy, stats, reference_compat=options.reference_compat,
                          clamp=not options.reference_compat)[old.response_mask.bool()]
    if h_hat.numel():
        q = torch.quantile(h_hat.float()[: 1 << 24], torch.tensor([0.1, 0.5, 0.9], device=h_hat.device))
        metrics.update({"hapo/h_hat/mean": h_hat.mean().item(), "hapo/h_hat/p10": q[0].item(),
                        "hapo/h_hat/p50": q[1].item(), "hapo/h_hat/p90": q[2].item(),
                        "hapo/h_hat/positive_frac": (h_hat > 0).float().mean().item()})
    return metrics


def hapo_advantage(inputs: AdvantageInputs, options: HAPOAdvantageConfig):
    """Token-Level Group Average advantage (:func:`token_level_group_average_advantage`)."""
    advantages, returns, info = token_level_group_average_advantage(
        inputs.token_level_rewards, inputs.response_mask, inputs.group_ids, epsilon=options.epsilon,
        norm_adv_by_std=options.norm_adv_by_std, fallback_threshold=options.fallback_threshold,
        reference_compat=options.reference_compat, return_info=True)
    used = info["tokens"] > 0
    fallback = float(info["fallback"][used].float().mean()) if bool(used.any()) else 0.0
    return advantages, returns, {"hapo/estimator/fallback_group_frac": fallback}


@algorithm("loss", name="hapo", title="HAPO", paper=PAPER,
           summary="Entropy-aware clipping and advantage redistribution per token; TLGA advantage; adaptive "
                   "sampling temperature.",
           loss_options=HAPOLossOptions, loss_needs=hapo_loss_needs, advantage=hapo_advantage,
           estimator_options=HAPOAdvantageConfig, batch_stats=hapo_batch_stats, batch_metrics=hapo_batch_metrics, rollout_entropy_stats=True,
           sampling_options=AdaptiveTemperatureOptions)
def hapo_loss(inputs: LossInputs, options: HAPOLossOptions):
    """HAPO's loss: ĥ from ``inputs.entropy`` and the batch statistics (computed over the tokens passed in when
    none are given: the fork's per-micro-batch behaviour), then :func:`hapo_policy_loss`."""
    entropy = inputs.entropy.detach()
    if inputs.batch_stats is not None:
        stats = EntropyStats.from_dict(dict(inputs.batch_stats))
    else:
        stats = compute_entropy_stats(entropy, inputs.response_mask, options.entropy_pivot)
    h_hat = entropy_score(entropy, stats, reference_compat=options.reference_compat,
                          clamp=not options.reference_compat)
    loss, metrics = hapo_policy_loss(
        inputs.old_log_prob, inputs.log_prob, inputs.advantages, inputs.response_mask, h_hat,
        clip_low=inputs.clip_low, clip_high=inputs.clip_high, clip_ratio_c=inputs.clip_ratio_c,
        adaptive_clip=options.adaptive_clip, clip_alpha=float(options.clip_alpha),
        adaptive_advantage=options.adaptive_advantage, adv_beta=float(options.adv_beta),
        aggregate=lambda mat, mask: inputs.aggregate(mat, mask), rollout_is_weights=inputs.rollout_is_weights)
    device = inputs.log_prob.device
    # Python floats (EntropyStats): written on the device, no host-to-device copy
    metrics["stats_pivot"] = torch.full((), stats.pivot, device=device)
    metrics["stats_scale"] = torch.full((), stats.scale, device=device)
    return loss, metrics

