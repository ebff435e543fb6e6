"""Start-up checks of the keys of verl's own covariance losses (``loss_mode=clip_cov`` and ``kl_cov``, arXiv
2505.22617), which verl reads only inside the workers (and there only asserts ``ratio > 0``). Unknown keys are
already refused by Hydra's structured config; this checks the ranges, naming the key, before Ray starts.

Declared with :func:`hapo_verl.registry.option` so that the ranges read like every other option's.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from hapo_verl.registry import option, validate_value

PAPER = "The Entropy Mechanism of RL for Reasoning LMs, arXiv 2505.22617 (https://arxiv.org/abs/2505.22617)"


@dataclass
class ClipCovKeys:
    clip_cov_ratio: float = option(0.0002, "Fraction of the valid tokens (of each micro-batch, in verl) whose "
                                   "gradient Clip-Cov removes.", low=0.0, high=1.0, low_open=True, paper=PAPER)
    clip_cov_lb: float = option(1.0, "Lower covariance bound of the tokens Clip-Cov may pick.", paper=PAPER)
    clip_cov_ub: float = option(5.0, "Upper covariance bound of the tokens Clip-Cov may pick.", paper=PAPER)


@dataclass
class KLCovKeys:
    kl_cov_ratio: float = option(0.0002, "Fraction of the valid tokens (of each micro-batch, in verl) with the "
                                 "largest covariance that get the KL penalty.", low=0.0, high=1.0, low_open=True,
                                 paper=PAPER)
    ppo_kl_coef: float = option(0.1, "Coefficient of the penalty |log π − log π_old| on those tokens.", low=0.0,
                                paper=PAPER)


#: verl's loss_mode -> its keys under actor_rollout_ref.actor.policy_loss
VERL_LOSS_KEYS = {"clip_cov": ClipCovKeys, "kl_cov": KLCovKeys}


def check_verl_loss_keys(policy_loss, prefix: str) -> None:
    """Range-check the keys of the active verl covariance loss (a no-op for any other loss_mode)."""
    cls = VERL_LOSS_KEYS.get(str(policy_loss.get("loss_mode", "vanilla")))
    if cls is None:
        return
    for f in fields(cls):
        value = policy_loss.get(f.name, f.default)
        validate_value(f"{prefix}.{f.name}", value, f.metadata)
    if cls is ClipCovKeys:
        lb, ub = float(policy_loss.get("clip_cov_lb", 1.0)), float(policy_loss.get("clip_cov_ub", 5.0))
        if not lb < ub:
            raise ValueError(f"{prefix}.clip_cov_lb must be below {prefix}.clip_cov_ub, got {lb} and {ub}")
