"""The adaptive-temperature request protocol: what a generation request carries to the sampler, and what the
sampler reports back.

Flat keys of a generation request's sampling ``extra_args`` are the contract between the trainer's agent loop and
every sampler (vLLM logits processors, the CPU rollout). They are plain floats so that they survive JSON / msgspec:

    hapo_pivot, hapo_scale, hapo_pos_scale, hapo_neg_scale     entropy statistics of the previous training step
    hapo_tau                                                    f = 1 + tau * clamp(ĥ, -1, 1), tau in [0, 1)
    hapo_reference_compat                                       optional bool: the authors' fork's sampler rule

A sampler that reports per-token effective temperatures (the CPU rollout) puts them, as a ``list[float]`` aligned
with the generated tokens, under ``TOKEN_TEMPERATURES_KEY`` of its output's ``extra_fields``.

Pure Python + the entropy statistics of :mod:`hapo_verl.algorithms.entropy`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hapo_verl.algorithms.entropy import EntropyStats, validate_tau

#: prefix of the flat keys carried in a sampling request's ``extra_args``
STATS_KEY_PREFIX = "hapo_"
TAU_KEY = f"{STATS_KEY_PREFIX}tau"
REFERENCE_COMPAT_KEY = f"{STATS_KEY_PREFIX}reference_compat"
#: the statistics' keys, in the order of ``EntropyStats``' fields pivot, scale, pos_scale, neg_scale
STATS_KEYS = (f"{STATS_KEY_PREFIX}pivot", f"{STATS_KEY_PREFIX}scale", f"{STATS_KEY_PREFIX}pos_scale",
              f"{STATS_KEY_PREFIX}neg_scale")
REQUEST_KEYS = (*STATS_KEYS, TAU_KEY, REFERENCE_COMPAT_KEY)

#: per-token effective sampling temperature, a list[float] in a sampler output's ``extra_fields`` (CPU rollout)
TOKEN_TEMPERATURES_KEY = "hapo_token_temperatures"


def stats_request_args(stats: EntropyStats) -> dict[str, float]:
    """The statistics' flat keys for a sampling request's ``extra_args``."""
    return {key: float(getattr(stats, field))
            for key, field in zip(STATS_KEYS, ("pivot", "scale", "pos_scale", "neg_scale"))}


@dataclass(frozen=True)
class AdaptiveTemperatureRequest:
    """What a sampler needs for one request: statistics of the previous training step, tau, the mode."""

    stats: EntropyStats
    tau: float
    reference_compat: bool = False

    def to_extra_args(self) -> dict:
        return {**stats_request_args(self.stats), TAU_KEY: float(self.tau),
                REFERENCE_COMPAT_KEY: bool(self.reference_compat)}


def has_adaptive_temperature_args(extra_args) -> bool:
    """Whether a request's ``extra_args`` carries any ``hapo_*`` key (without validating them)."""
    return bool(extra_args) and any(k in extra_args for k in REQUEST_KEYS)


def parse_adaptive_temperature_args(extra_args) -> AdaptiveTemperatureRequest | None:
    """Read the flat ``hapo_*`` keys of a request's ``extra_args``.

    Returns None when the request carries none of them (validation, warm-up, step 1, other users of the
    engine). Raises ValueError naming the key when they are partial, non-numeric, out of range
    (tau outside [0, 1), a non-positive scale).
    """
    if not extra_args:
        return None
    present = [k for k in REQUEST_KEYS if k in extra_args]
    if not present:
        return None
    missing = [k for k in (*STATS_KEYS, TAU_KEY) if k not in extra_args]
    if missing:
        raise ValueError(f"adaptive temperature: extra_args has {present} but is missing {missing}")
    values = {}
    for key in (*STATS_KEYS, TAU_KEY):
        value = extra_args[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            raise ValueError(f"adaptive temperature: extra_args['{key}'] must be a finite number, got {value!r}")
        values[key] = float(value)
    for key in STATS_KEYS[1:]:
        if values[key] <= 0:
            raise ValueError(f"adaptive temperature: extra_args['{key}'] must be > 0, got {values[key]!r}")
    validate_tau(values[TAU_KEY], key=f"extra_args['{TAU_KEY}']")
    ref = extra_args.get(REFERENCE_COMPAT_KEY, False)
    if not isinstance(ref, (bool, int)) or ref not in (0, 1, True, False):
        raise ValueError(f"adaptive temperature: extra_args['{REFERENCE_COMPAT_KEY}'] must be a bool, got {ref!r}")
    stats = EntropyStats(pivot=values[STATS_KEYS[0]], scale=values[STATS_KEYS[1]],
                         pos_scale=values[STATS_KEYS[2]], neg_scale=values[STATS_KEYS[3]])
    return AdaptiveTemperatureRequest(stats=stats, tau=values[TAU_KEY], reference_compat=bool(ref))
