"""Token entropy, the normalized entropy score ĥ, and the adaptive-temperature factor.

Pure torch. Every HAPO component is driven by one number per token, the entropy score ĥ ∈ [-1, 1]
(HAPO, arXiv 2509.16591): how far the token's log-entropy lies above (ĥ > 0) or below (ĥ < 0) a
pivot, relative to the most extreme token of the population on that side.

    e   = log(max(H, floor))                         log-entropy
    m   = q-quantile of e over valid tokens          pivot            (nearest rank, q = entropy_pivot)
    s   = sqrt(max(mean_valid((e - m)^2), 1e-8))     scale            (RMS about the pivot)
    h   = (e - m) / s
    P   = max(h over valid tokens with h > 0)        pos_scale = 1/P
    N   = |min(h over valid tokens with h < 0)|      neg_scale = 1/N
    ĥ   = h * pos_scale  if h > 0  else  h * neg_scale               (intended: ĥ ∈ [-1, 1])
    ĥ   = h * pos_scale  if h > 0  else -h * neg_scale               (reference_compat: the authors'
                                                                      fork, whose sign bug gives |ĥ|)

See docs/algorithms.md for the pairing of each equation with these functions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

#: floor of the entropy before taking its log (the fork's ``eps`` in ``compute_entropy_h``)
LOG_ENTROPY_FLOOR = 1e-8
#: floor of the variance about the pivot
VARIANCE_FLOOR = 1e-8
#: floor of the largest positive / negative normalized value
EXTREME_FLOOR = 1e-8


@dataclass(frozen=True)
class EntropyStats:
    """Statistics of the log-entropy of a population of tokens; they define ĥ for any token.

    Attributes:
        pivot: the ``entropy_pivot``-quantile of log-entropy over valid tokens (m).
        scale: RMS of (log-entropy - pivot) over valid tokens (s), > 0.
        pos_scale: 1 / largest positive normalized value (1/P), > 0.
        neg_scale: 1 / magnitude of the most negative normalized value (1/|N|), > 0.
        num_tokens: number of valid tokens the statistics were computed from (0 means "no data": the
            neutral statistics below, which give ĥ = 0 for H = 1).
    """

    pivot: float
    scale: float
    pos_scale: float
    neg_scale: float
    num_tokens: int = 0

    def __post_init__(self):
        for name in ("pivot", "scale", "pos_scale", "neg_scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"EntropyStats.{name} must be a finite number, got {value!r}")
        for name in ("scale", "pos_scale", "neg_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"EntropyStats.{name} must be > 0, got {getattr(self, name)!r}")

    @classmethod
    def neutral(cls) -> "EntropyStats":
        return cls(pivot=0.0, scale=1.0, pos_scale=1.0, neg_scale=1.0, num_tokens=0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EntropyStats":
        unknown = set(d) - {"pivot", "scale", "pos_scale", "neg_scale", "num_tokens"}
        if unknown:
            raise ValueError(f"unknown EntropyStats keys {sorted(unknown)}")
        return cls(**{k: (int(v) if k == "num_tokens" else float(v)) for k, v in d.items()})


def token_entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy H = -Σ p log p of softmax(logits) over the last dim, in nats.

    Computed as ``H = log s + E_p[m - x]`` with ``m = max x`` and ``s = Σ exp(x - m)``: no log of a
    probability is ever taken, so ``-inf`` logits (masked vocabulary) contribute exactly 0 and a one-hot
    row gives exactly 0. A row that is entirely ``-inf`` has no distribution; it gets H = 0.
    """
    if logits.dim() == 0:
        raise ValueError("logits must have a vocabulary dimension")
    x = logits.float()
    m = x.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    shifted = x - m  # <= 0, -inf where masked
    p_unnorm = shifted.exp()
    s = p_unnorm.sum(dim=-1)
    # E_p[m - x] = Σ p_unnorm * (-shifted) / s ; the product is 0 (not nan) where p_unnorm == 0
    weighted = torch.where(p_unnorm > 0, p_unnorm * (-shifted), torch.zeros_like(shifted)).sum(dim=-1)
    entropy = torch.log(s) + weighted / s
    valid_row = s > 0
    return torch.where(valid_row, entropy, torch.zeros_like(entropy)).clamp_min(0.0)


def _nearest_rank_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The fork's ``torch_quantile(..., interpolation="nearest")``: element of rank round(q·(n-1))."""
    n = values.numel()
    k = int(round(q * (n - 1)))  # Python's round, as the fork
    return torch.kthvalue(values, k + 1).values


def compute_entropy_stats(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    entropy_pivot: float = 0.8,
) -> EntropyStats:
    """Statistics of log-entropy over the tokens where ``mask`` is true.

    Args:
        entropy: per-token entropy H (any shape), nats.
        mask: bool/0-1 tensor of the same shape; only these tokens form the population.
        entropy_pivot: quantile in (0, 1) used as pivot (0.8 = the 80th percentile, as in the recipes).
    """
    validate_entropy_pivot(entropy_pivot)
    entropy, mask = _check_entropy_and_mask(entropy, mask)
    with torch.no_grad():
        e = torch.log(entropy.float().clamp_min(LOG_ENTROPY_FLOOR))[mask]
        n = int(e.numel())
        if n == 0:
            return EntropyStats.neutral()
        pivot = _nearest_rank_quantile(e, entropy_pivot)
        centered = e - pivot
        scale = centered.square().mean().clamp_min(VARIANCE_FLOOR).sqrt()
        h = centered / scale
        pos_extreme = h.max().clamp_min(EXTREME_FLOOR)
        neg_extreme = (-h.min()).clamp_min(EXTREME_FLOOR)
        return EntropyStats(
            pivot=float(pivot),
            scale=float(scale),
            pos_scale=float(1.0 / pos_extreme),
            neg_scale=float(1.0 / neg_extreme),
            num_tokens=n,
        )


def entropy_score(
    entropy: torch.Tensor,
    stats: EntropyStats,
    reference_compat: bool = False,
    clamp: bool = True,
    log_floor: float = LOG_ENTROPY_FLOOR,
    scale_eps: float = 0.0,
) -> torch.Tensor:
    """ĥ for every token of ``entropy`` (same shape), from population statistics ``stats``.

    Default (intended algorithm): signed, ĥ < 0 for tokens below the pivot, clamped to [-1, 1].
    ``reference_compat=True``: the authors' fork, ĥ = |ĥ_intended| ∈ [0, 1], no clamp (the fork's loss
    does not clamp; within the population the stats came from it is in [0, 1] anyway).
    ``log_floor`` / ``scale_eps`` exist for the fork's sampler, which uses 1e-6 for both.
    """
    with torch.no_grad():
        # in-place chain: one allocation for the whole computation
        h = entropy.float().clamp_min(log_floor).log_().sub_(stats.pivot).div_(stats.scale + scale_eps)
        neg_factor = -stats.neg_scale if reference_compat else stats.neg_scale
        # h * (pos if h > 0 else neg) == neg * h + (pos - neg) * relu(h)
        positive_part = torch.relu(h).mul_(stats.pos_scale - neg_factor)
        h_hat = h.mul_(neg_factor).add_(positive_part)
        if clamp:
            h_hat = h_hat.clamp_(-1.0, 1.0)
        return h_hat


def temperature_factor(h_hat: torch.Tensor | float, tau: float) -> torch.Tensor | float:
    """Adaptive temperature factor f = 1 + tau * clamp(ĥ, -1, 1); the sampling temperature is T·f.

    Every sampler (vLLM logits processor, CPU rollout, learning benchmark) uses this function.
    """
    validate_tau(tau)
    if isinstance(h_hat, torch.Tensor):
        return 1.0 + tau * h_hat.clamp(-1.0, 1.0)
    return 1.0 + tau * min(1.0, max(-1.0, float(h_hat)))


def temperature_factor_from_entropy(
    entropy: torch.Tensor,
    stats: EntropyStats,
    tau: float,
    reference_compat: bool = False,
) -> torch.Tensor:
    """Factor f for tokens whose entropy is already known, with one set of statistics (the samplers' rule):
    default mode uses the same ĥ as the loss; ``reference_compat`` uses the fork's sampler constants (log floor
    1e-6, scale + 1e-6). Per-row statistics: :func:`row_temperature_factor_from_entropy`."""
    if reference_compat:
        h_hat = entropy_score(entropy, stats, reference_compat=True, clamp=True,
                              log_floor=REFERENCE_SAMPLER_LOG_FLOOR, scale_eps=REFERENCE_SAMPLER_SCALE_EPS)
    else:
        h_hat = entropy_score(entropy, stats, reference_compat=False, clamp=True)
    return temperature_factor(h_hat, tau)


def row_temperature_factor(
    logits: torch.Tensor,
    stats: EntropyStats,
    tau: float,
    reference_compat: bool = False,
) -> torch.Tensor:
    """Per-row factor for a [rows, vocab] block of decoding logits (pre-temperature): the entropy of
    softmax(logits) on the logits as given, then :func:`temperature_factor_from_entropy`."""
    return temperature_factor_from_entropy(token_entropy_from_logits(logits), stats, tau, reference_compat)


def validate_entropy_pivot(entropy_pivot: float, key: str = "entropy_pivot") -> None:
    if not isinstance(entropy_pivot, (int, float)) or isinstance(entropy_pivot, bool):
        raise ValueError(f"{key} must be a number in (0, 1), got {entropy_pivot!r}")
    if not 0.0 < float(entropy_pivot) < 1.0:
        raise ValueError(f"{key} must be in (0, 1) (a quantile of log-entropy), got {entropy_pivot!r}")


def validate_tau(tau: float, key: str = "temperature_tau") -> None:
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not math.isfinite(tau):
        raise ValueError(f"{key} must be a number in [0, 1), got {tau!r}")
    if not 0.0 <= float(tau) < 1.0:
        raise ValueError(f"{key} must be in [0, 1) so that the temperature stays positive, got {tau!r}")


def _check_entropy_and_mask(entropy: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(entropy, torch.Tensor):
        raise TypeError(f"entropy must be a torch.Tensor, got {type(entropy).__name__}")
    if mask.shape != entropy.shape:
        raise ValueError(f"entropy shape {tuple(entropy.shape)} does not match mask shape {tuple(mask.shape)}")
    mask = mask.bool()
    if torch.isnan(entropy[mask]).any():
        raise ValueError("entropy contains NaN at valid (masked-in) positions")
    return entropy, mask


# ----------------------------------------------------------------------------------------------------------
# Per-row-parameter form of ``row_temperature_factor`` (used by ``hapo_verl.sampling``: fast path, kernels):
# every row of a decoding batch may carry its own statistics, tau and mode, as plain [rows] tensors.
# ----------------------------------------------------------------------------------------------------------
#: the fork's sampler constants (``reference_compat``): floor of H before its log, epsilon added to the scale
REFERENCE_SAMPLER_LOG_FLOOR = 1e-6
REFERENCE_SAMPLER_SCALE_EPS = 1e-6


@dataclass(frozen=True)
class _RowStats:
    """Duck-typed ``EntropyStats`` whose fields are [rows] tensors (``entropy_score`` only reads them)."""

    pivot: torch.Tensor
    scale: torch.Tensor
    pos_scale: torch.Tensor
    neg_scale: torch.Tensor


def row_temperature_factor_from_entropy(
    entropy: torch.Tensor,
    pivot: torch.Tensor,
    scale: torch.Tensor,
    pos_scale: torch.Tensor,
    neg_scale: torch.Tensor,
    tau: torch.Tensor,
    reference_compat: torch.Tensor | bool = False,
) -> torch.Tensor:
    """``row_temperature_factor`` for rows whose entropy is already known and whose parameters are tensors.

    All arguments are [rows] tensors (or broadcastable); ``reference_compat`` is a bool tensor per row (or one
    bool). Returns f = 1 + tau * clamp(ĥ, -1, 1) per row, with ĥ from ``entropy_score`` in the row's mode:
    the default mode (log floor 1e-8, no scale epsilon, signed ĥ) or the fork's sampler rule (log floor 1e-6,
    scale + 1e-6, ĥ = |ĥ|), both clamped. Parameters are assumed validated
    (``hapo_verl.sampling.request.parse_adaptive_temperature_args``).
    """
    entropy = entropy.float()

    def _t(v):
        return torch.as_tensor(v, dtype=torch.float32, device=entropy.device)

    stats = _RowStats(pivot=_t(pivot), scale=_t(scale), pos_scale=_t(pos_scale), neg_scale=_t(neg_scale))
    compat = torch.as_tensor(reference_compat, device=entropy.device).bool()
    intended = entropy_score(entropy, stats, reference_compat=False, clamp=True)
    if not compat.any():
        h_hat = intended
    else:
        fork = entropy_score(entropy, stats, reference_compat=True, clamp=True,
                             log_floor=REFERENCE_SAMPLER_LOG_FLOOR, scale_eps=REFERENCE_SAMPLER_SCALE_EPS)
        h_hat = torch.where(compat, fork, intended)
    return 1.0 + _t(tau) * h_hat.clamp(-1.0, 1.0)
