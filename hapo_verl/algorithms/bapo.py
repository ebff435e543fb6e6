"""BAPO (BAlanced Policy Optimization with adaptive clipping, arXiv 2510.18927).

Explicit importance-ratio bounds c_low < 1 < c_high replace 1 ∓ ε. Before each update they are widened, starting at
(a⁻, a⁺), until the positive-advantage share of the clipped objective reaches ρ₀ (paper Eq. 8, Algorithm 1):

    ρ(c_low, c_high) = P / (P + N),   P = Σ_{A>0} A·min(r, c_high),   N = Σ_{A<0} |A|·max(r, c_low)

(``A·min(r, c_high)`` is ``min(r·A, clip(r, 0, c_high)·A)`` for A > 0; ``|A|·max(r, c_low)`` is the magnitude of
``min(r·A, clip(r, c_low, c_high)·A)`` for A < 0). The paper's Algorithm 1 raises c_high by δ₁ up to b⁺ first, then
c_low by δ₂ up to b⁻ (``bound_order=upper_first``); the authors' verl recipe raises c_low first, clamping each step
at the maximum (``bound_order=lower_first``). The update then maximises (Algorithm 1, line 20)

    J = Σ_t min(r_t·A_t, clip(r_t, c_low, c_high)·A_t)          (+ verl's dual clip with ``dual_clip=true``)

aggregated like verl's loss (global token-mean). The search is vectorised: the whole path of candidate bounds is
evaluated at once (one bucketize + two scatter-adds), without host syncs.

Where P and N come from (``bounds_per``): the bounds belong to one update, i.e. one optimizer step over an update
mini-batch at the current θ. verl runs a mini-batch's loss micro-batch by micro-batch and back-propagates each one
before the next forward, so the whole mini-batch's ratios exist only after a forward pass over all of it.
``mini_batch`` (default) runs that pass before each mini-batch's update (hapo-verl's mini-batch pass, the
``MINIBATCH_STATS`` need: one extra forward, no backward), sums P and N over its micro-batches and the data-parallel
ranks, and every micro-batch of the mini-batch uses those bounds: the result does not depend on the micro-batch
split or the data-parallel size. ``micro_batch`` searches in each micro-batch's loss over that micro-batch's tokens
(summed over the data-parallel ranks, ``LossInputs.all_reduce``), as the authors' code does, without the extra pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from hapo_verl.algorithms.ppo import device_constants, masked_mean
from hapo_verl.registry import MINIBATCH_STATS, LossInputs, MiniBatchPart, algorithm, option

PAPER = "BAPO, arXiv 2510.18927 (https://arxiv.org/abs/2510.18927)"
CODE = "WooooDyy/BAPO recipe/bapo/policy_loss.py"
KEY = "actor_rollout_ref.actor.policy_loss"
_TOL = 1e-9


@dataclass
class BAPOOptions:
    """``actor_rollout_ref.actor.policy_loss.*`` with ``loss_mode=bapo``. Bounds are ratio bounds, not ε."""

    positive_ratio_target: float = option(
        0.4, "ρ₀: stop widening the bounds once the positive-advantage share P/(P+N) of the clipped objective reaches "
        "this (the authors' code compares P/N with a target t instead: t ↔ ρ₀ = t/(1+t)).", low=0.0, high=1.0,
        paper=PAPER + " §5.1: 0.4")
    ratio_lower_start: float = option(0.6, "a⁻: initial lower ratio bound c_low.", low=0.0, high=1.0, low_open=True,
                                      paper=PAPER + " §5.1: 0.6")
    ratio_lower_max: float = option(0.9, "b⁻: maximal lower ratio bound c_low.", low=0.0, high=1.0, low_open=True,
                                    paper=PAPER + " §5.1: 0.9")
    ratio_lower_step: float = option(0.02, "δ₂: step of c_low (0: c_low stays at a⁻).", low=0.0, high=1.0,
                                     paper=PAPER + " §5.1: 0.02")
    ratio_upper_start: float = option(1.2, "a⁺: initial upper ratio bound c_high.", low=1.0,
                                      paper=PAPER + " §5.1: 1.2")
    ratio_upper_max: float = option(3.0, "b⁺: maximal upper ratio bound c_high.", low=1.0,
                                    paper=PAPER + " §5.1: 3.0")
    ratio_upper_step: float = option(0.05, "δ₁: step of c_high (0: c_high stays at a⁺).", low=0.0,
                                     paper=PAPER + " §5.1: 0.05")
    bound_order: str = option(
        "upper_first", "Which bound moves first: upper_first (the paper's Algorithm 1: c_high by δ₁ while "
        "c_high+δ₁ ≤ b⁺, then c_low by δ₂ while c_low+δ₂ ≤ b⁻) or lower_first (the authors' code: c_low first, "
        "then c_high, each step clamped at its maximum).", choices=("upper_first", "lower_first"),
        paper=PAPER + " Algorithm 1; " + CODE)
    bounds_per: str = option(
        "mini_batch", "mini_batch: search the bounds once per update mini-batch over all its tokens at the current "
        "policy (a forward-only pass over the mini-batch before its update, all data-parallel ranks): independent of "
        "the micro-batch split. micro_batch: search in each micro-batch's loss over that micro-batch (all ranks), as "
        "the authors' code; no extra forward pass.", choices=("mini_batch", "micro_batch"),
        paper=PAPER + " Algorithm 1 (bounds per update); " + CODE)
    dual_clip: bool = option(
        False, "Add verl's dual clip (loss of A<0 tokens capped at -c·A, c = actor.clip_ratio_c), as the authors' "
        "code does. false: the paper's objective (Algorithm 1, line 20).", paper=PAPER + "; " + CODE)

    def __post_init__(self):
        if self.ratio_lower_max < self.ratio_lower_start:
            raise ValueError(f"{KEY}.ratio_lower_max ({self.ratio_lower_max}) must be >= {KEY}.ratio_lower_start "
                             f"({self.ratio_lower_start})")
        if self.ratio_upper_max < self.ratio_upper_start:
            raise ValueError(f"{KEY}.ratio_upper_max ({self.ratio_upper_max}) must be >= {KEY}.ratio_upper_start "
                             f"({self.ratio_upper_start})")
        for name in ("ratio_lower_step", "ratio_upper_step"):
            step = getattr(self, name)
            if step and len(bound_path(self)) > 10_000:
                raise ValueError(f"{KEY}.{name}={step} gives more than 10000 candidate bounds")


def _steps(start: float, maximum: float, step: float, clamp: bool) -> list[float]:
    """The values a bound takes after each step: the paper's rule (step while value + step ≤ max) or the code's
    (step while value < max, clamped at max)."""
    values, value, k = [], start, 0
    if step <= 0.0:
        return values
    while True:
        nxt = round(start + (k + 1) * step, 12)  # no accumulated rounding error along the path
        if clamp:
            if not value < maximum - _TOL:
                break
            value = min(nxt, maximum)
        else:
            if not nxt <= maximum + _TOL:
                break
            value = nxt
        k += 1
        values.append(value)
    return values


def bound_path(options: BAPOOptions) -> list[tuple[float, float]]:
    """Every (c_low, c_high) the search visits, in order, starting at (a⁻, a⁺). The search stops at the first pair
    whose positive share reaches ρ₀, else at the last one."""
    lo, hi = options.ratio_lower_start, options.ratio_upper_start
    path = [(lo, hi)]
    if options.bound_order == "upper_first":  # Algorithm 1: c_high first, then c_low
        for hi in _steps(hi, options.ratio_upper_max, options.ratio_upper_step, clamp=False):
            path.append((lo, hi))
        for lo in _steps(lo, options.ratio_lower_max, options.ratio_lower_step, clamp=False):
            path.append((lo, hi))
    else:  # the authors' code: c_low first, then c_high, each clamped at its maximum
        for lo in _steps(lo, options.ratio_lower_max, options.ratio_lower_step, clamp=True):
            path.append((lo, hi))
        for hi in _steps(hi, options.ratio_upper_max, options.ratio_upper_step, clamp=True):
            path.append((lo, hi))
    return path


def _sums_below(values: torch.Tensor, weights: torch.Tensor, grid: torch.Tensor):
    """For each grid value g_j: (Σ_{v<g_j} w·v, Σ_{v≥g_j} w) over the given values: one bucketize and two
    scatter-adds, evaluated for the whole (sorted) grid at once."""
    n = grid.numel()
    bucket = torch.bucketize(values, grid, right=True)  # number of grid values <= v
    wv = torch.zeros(n + 1, dtype=weights.dtype, device=weights.device).scatter_add_(0, bucket, weights * values)
    w = torch.zeros(n + 1, dtype=weights.dtype, device=weights.device).scatter_add_(0, bucket, weights)
    # a value in bucket i is below g_j iff i <= j
    below_wv = torch.cumsum(wv, 0)[:n]
    above_w = w.sum() - torch.cumsum(w, 0)[:n]
    return below_wv, above_w


def _grid(values: list[float], device) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted distinct values (float64) and each value's index among them, built on the host from the options
    (no data-dependent op on the device)."""
    distinct = sorted(set(values))
    where = {v: i for i, v in enumerate(distinct)}
    return (device_constants(tuple(distinct), torch.float64, torch.device(device)),
            device_constants(tuple(where[v] for v in values), torch.long, torch.device(device)))


def contributions_along_path(ratio: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
                             lows: list[float], highs: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_k, N_k) for every candidate pair k = (lows[k], highs[k]) of the path:
    P_k = Σ_{A>0} A·min(r, c_high_k), N_k = Σ_{A<0} |A|·max(r, c_low_k), over the valid tokens passed in (float64)."""
    mask = response_mask.bool()
    r = ratio.detach().to(torch.float64).reshape(-1)
    a = advantages.detach().to(torch.float64).reshape(-1)
    m = mask.reshape(-1)
    pos = torch.where(m & (a > 0), a, torch.zeros_like(a))
    neg = torch.where(m & (a < 0), -a, torch.zeros_like(a))
    # P(h) = Σ pos·min(r, h) = Σ_{r<h} pos·r + h·Σ_{r≥h} pos
    uh, inv_h = _grid(highs, ratio.device)
    below_ar, above_a = _sums_below(r, pos, uh)
    p = (below_ar + uh * above_a)[inv_h]
    # N(l) = Σ neg·max(r, l) = Σ_{r<l} neg·l + Σ_{r≥l} neg·r = l·(Σneg − Σ_{r≥l} neg) + (Σneg·r − Σ_{r<l} neg·r)
    ul, inv_l = _grid(lows, ratio.device)
    below_nr, above_n = _sums_below(r, neg, ul)
    n = (ul * (neg.sum() - above_n) + ((neg * r).sum() - below_nr))[inv_l]
    return p, n


def positive_share(p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """ρ = P / (P + N); 1 where there is no negative contribution (nothing to re-balance)."""
    total = p + n
    return torch.where(n > 0, p / torch.where(total > 0, total, torch.ones_like(total)), torch.ones_like(total))


def search_bounds(ratio, advantages, response_mask, options: BAPOOptions,
                  all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """The adaptive-clipping search (Algorithm 1, lines 8-17) without a host sync: every candidate of
    :func:`bound_path` is evaluated, P and N are summed over the data-parallel ranks (``all_reduce``), and the first
    candidate with ρ ≥ ρ₀ is chosen (else the last). Returns 0-dim tensors (c_low, c_high, ρ, index)."""
    p, n = path_contributions(ratio, advantages, response_mask, options)
    if all_reduce is not None:
        p, n = all_reduce(torch.stack([p, n])).unbind(0)
    return choose_bounds(p, n, options)


def path_contributions(ratio, advantages, response_mask, options: BAPOOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_k, N_k) along :func:`bound_path` over the tokens passed in."""
    path = bound_path(options)
    return contributions_along_path(ratio, advantages, response_mask, [c[0] for c in path], [c[1] for c in path])


def choose_bounds(p: torch.Tensor, n: torch.Tensor, options: BAPOOptions):
    """Algorithm 1, lines 8-17, given (P_k, N_k) along the path: the first candidate with ρ ≥ ρ₀, else the last.
    Returns 0-dim tensors (c_low, c_high, ρ, index)."""
    path = bound_path(options)
    device = p.device
    lows = device_constants(tuple(c[0] for c in path), torch.float64, torch.device(device))
    highs = device_constants(tuple(c[1] for c in path), torch.float64, torch.device(device))
    rho = positive_share(p, n)
    k = len(path)
    index = torch.arange(k, device=device)
    chosen = torch.where(rho >= options.positive_ratio_target, index, torch.full_like(index, k - 1)).min()
    at = chosen.view(1)  # index_select: indexing with a 0-dim tensor would sync with the host
    return (lows.index_select(0, at)[0], highs.index_select(0, at)[0], rho.index_select(0, at)[0], chosen)


def bapo_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    options: BAPOOptions,
    *,
    clip_ratio_c: float,
    aggregate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rollout_is_weights: torch.Tensor | None = None,
    bounds: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BAPO's loss (module docstring): the clipped objective with ``bounds`` (:func:`bapo_minibatch_finalize` of
    the whole mini-batch), or, without them, with the bounds searched over the tokens passed in (and the other
    data-parallel ranks)."""
    log_ratio = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)
    if bounds is None:
        c_low, c_high, rho, chosen = search_bounds(ratio, advantages, response_mask, options, all_reduce)
    else:
        c_low, c_high, rho, chosen = (bounds[k] for k in ("clip_low", "clip_high", "positive_ratio", "search_steps"))
    lower, upper = c_low.to(ratio.dtype), c_high.to(ratio.dtype)
    clipped_ratio = torch.minimum(torch.maximum(ratio, lower), upper)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * clipped_ratio
    pg_losses = torch.maximum(pg_losses1, pg_losses2)
    negative = advantages < 0
    if options.dual_clip:
        if not clip_ratio_c > 1.0:
            raise ValueError(f"actor_rollout_ref.actor.clip_ratio_c must be > 1.0 for dual-clip PPO, got {clip_ratio_c}")
        pg_losses3 = -advantages * clip_ratio_c
        clipped_lower = torch.gt(pg_losses, pg_losses3).logical_and_(negative).detach()
        pg_losses = torch.where(negative, torch.minimum(pg_losses3, pg_losses), pg_losses)
    else:
        clipped_lower = torch.zeros_like(negative)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    loss = aggregate(pg_losses, response_mask)
    mask = response_mask.bool()
    with torch.no_grad():
        f32 = dict(dtype=torch.float32)
        metrics = {
            "pg_clipfrac": masked_mean(torch.gt(pg_losses2, pg_losses1), mask),
            "ppo_kl": -masked_mean(log_ratio, mask),
            "pg_clipfrac_lower": masked_mean(clipped_lower, mask),
            "clip_low": c_low.to(**f32),
            "clip_high": c_high.to(**f32),
            "positive_ratio": rho.to(**f32),
            "search_steps": chosen.to(**f32),
        }
    return loss, metrics


def bapo_needs(options: BAPOOptions) -> frozenset:
    return frozenset({MINIBATCH_STATS}) if options.bounds_per == "mini_batch" else frozenset()


def bapo_minibatch_stats(part: MiniBatchPart, options: BAPOOptions) -> dict[str, torch.Tensor]:
    """(P_k, N_k) along the path over one micro-batch of the mini-batch pass, at the current policy."""
    ratio = torch.exp(torch.clamp(part.log_prob - part.old_log_prob, min=-20.0, max=20.0))
    p, n = path_contributions(ratio, part.advantages, part.response_mask, options)
    return {"positive": p, "negative": n}


def bapo_minibatch_finalize(totals: Mapping[str, torch.Tensor], options: BAPOOptions) -> dict[str, torch.Tensor]:
    """The bounds of the whole mini-batch (P and N summed over its micro-batches and the data-parallel ranks)."""
    c_low, c_high, rho, chosen = choose_bounds(totals["positive"], totals["negative"], options)
    return {"clip_low": c_low, "clip_high": c_high, "positive_ratio": rho, "search_steps": chosen}


@algorithm("loss", name="bapo", title="BAPO", paper=PAPER,
           summary="Adaptive ratio bounds per update until positive-advantage tokens carry a share ρ₀ of the loss.",
           loss_options=BAPOOptions, loss_needs=bapo_needs, minibatch_stats=bapo_minibatch_stats,
           minibatch_finalize=bapo_minibatch_finalize)
def bapo_loss(inputs: LossInputs, options: BAPOOptions):
    return bapo_policy_loss(
        inputs.old_log_prob, inputs.log_prob, inputs.advantages, inputs.response_mask, options,
        clip_ratio_c=inputs.clip_ratio_c, aggregate=lambda mat, mask: inputs.aggregate(mat, mask),
        all_reduce=inputs.all_reduce, rollout_is_weights=inputs.rollout_is_weights, bounds=inputs.minibatch_stats)


__all__ = ["BAPOOptions", "bapo_minibatch_finalize", "bapo_minibatch_stats", "bapo_policy_loss", "bound_path",
           "choose_bounds", "contributions_along_path", "path_contributions", "positive_share", "search_bounds"]
