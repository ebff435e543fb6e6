"""One module per algorithm: its pure-torch math, its options (dataclasses whose fields carry help, default,
range and paper) and its spec (:mod:`hapo_verl.registry`); plus shared building blocks (``groups``, ``ppo``) and
HAPO's three parts (``entropy``, ``advantage``, ``policy_loss``; spec in ``hapo``). Imports torch and the registry
only: no verl, vLLM, Ray, transformers, Hydra or OmegaConf. Every module here is imported by registry discovery.
"""

from hapo_verl.algorithms.advantage import token_level_group_average_advantage
from hapo_verl.algorithms.entropy import (
    EntropyStats,
    compute_entropy_stats,
    entropy_score,
    row_temperature_factor,
    temperature_factor,
    temperature_factor_from_entropy,
    token_entropy_from_logits,
)
from hapo_verl.algorithms.groups import group_ids_from_index, grpo_sequence_advantage
from hapo_verl.algorithms.policy_loss import adaptive_clip_ranges, hapo_policy_loss, redistribute_advantage

__all__ = [
    "EntropyStats",
    "adaptive_clip_ranges",
    "compute_entropy_stats",
    "entropy_score",
    "group_ids_from_index",
    "grpo_sequence_advantage",
    "hapo_policy_loss",
    "redistribute_advantage",
    "row_temperature_factor",
    "temperature_factor",
    "temperature_factor_from_entropy",
    "token_entropy_from_logits",
    "token_level_group_average_advantage",
]
