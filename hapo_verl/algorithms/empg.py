"""EMPG, Entropy-Modulated Policy Gradients (arXiv 2509.09265, "Harnessing Uncertainty: Entropy-Modulated Policy
Gradients for Long-Horizon LLM Agents"): an outcome advantage rescaled per step by the step's confidence, plus a bonus
for steps that lead to a clear next step.

The paper's step is an agent turn. A single-turn response has none, so here **a step is a line of the response**
(:data:`hapo_verl.registry.RESPONSE_STEPS`: it ends with a token whose text holds a newline). For step t of response
i, with H_{i,t} the mean old-policy token entropy over the step's tokens (equation numbers of arXiv v1, as the
authors' code on the project page cites them; docs/empg.md):

    Eq. 12  H̃ = (H − min H) / (max H − min H + ε)              min and max over every step of the batch
    Eq. 10  g(H_{i,t}) = exp(−k·H̃_{i,t}) / mean_{batch steps} exp(−k·H̃)   (its mean over the steps is 1)
    Eq. 11  f(H_{i,t+1}) = exp(−k_f·H̃_{i,t+1})                  0 for a response's last step (no next step)
    Eq. 8   A_mod(i,t) = g(H_{i,t})·A(i) + ζ·f(H_{i,t+1})
    Eq. 7   A_final = A_mod − mean(A_mod)                       mean over the batch's steps (no std)

A(i) is the response's outcome advantage from GRPO's group normalisation (verl's ``grpo``). Every token of step t
gets A_final(i,t). Nothing depends on the sign of A: a confident step (g > 1) gets a larger update either way.

Vectorised: a step is a segment of the batch's flattened positions (from after the previous step end to its own
end), so the sums over the steps' tokens are one ``segment_reduce``, the step formulas act on (steps,) vectors, and a
running sum along each row writes every token's value (no Python loop over rows, groups or steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hapo_verl.algorithms.groups import grpo_sequence_advantage, num_groups
from hapo_verl.registry import OLD_ENTROPY, RESPONSE_STEPS, AdvantageInputs, algorithm, option

PAPER = "EMPG, arXiv 2509.09265 (https://arxiv.org/abs/2509.09265); project page https://empgseed-seed.github.io"


@dataclass(frozen=True)
class EMPGOptions:
    """``algorithm.empg.*`` with ``adv_estimator=empg``."""

    k: float = option(1.0, "k: how much a step's confidence scales its advantage, g = exp(−k·H̃) / mean (Eq. 10); "
                      "0 leaves A unscaled.", low=0.0, paper=PAPER + ", Eq. 10; k = 1 in the authors' code")
    k_f: float = option(1.0, "k_f: sharpness of the future-clarity bonus f = exp(−k_f·H̃ of the next step) (Eq. 11).",
                        low=0.0, paper=PAPER + ", Eq. 11; k_f = 1 in the authors' code")
    zeta: float = option(0.1, "ζ: weight of the future-clarity bonus (Eq. 8); 0 switches it off.", low=0.0,
                         paper=PAPER + ", Eq. 8; ζ = 0.1 in the authors' code (0.05 in ARLArena's reimplementation)")
    center: str = option("step", "step: subtract the mean of A_mod over the batch's steps (Eq. 7, as the authors' "
                         "code); token: over the batch's tokens.", choices=("step", "token"), paper=PAPER + ", Eq. 7")
    epsilon: float = option(1e-8, "ε in the min-max normalisation (Eq. 12) and in g's mean (Eq. 10).", low=0.0,
                            high=1.0, low_open=True, paper=PAPER + ", Eq. 10, 12; 1e-8 in the authors' code")
    norm_adv_by_std: bool = option(True, "A(i): divide by the group's std, as verl's GRPO.")


@dataclass
class StepCells:
    """The batch's steps as segments of its flattened (B·L) positions, in order, each closed by a step end or by its
    row's last position: ``first`` (C,) each segment's first flat position, ``row`` (C,) its response, ``tokens`` (C,)
    its number of active tokens (0: not a step, e.g. the padding after a response's last line) and ``entropy`` (C,)
    their mean entropy (float64, 0 without tokens); ``shape`` is (B, L)."""

    first: torch.Tensor
    row: torch.Tensor
    tokens: torch.Tensor
    entropy: torch.Tensor
    shape: tuple


def step_cells(entropy: torch.Tensor, response_mask: torch.Tensor, step_ends: torch.Tensor) -> StepCells:
    """Split every row (B, L) into its steps: a step ends where ``step_ends`` (B, L) is true, and a row's last step
    at its last position. Steps are segments of the flattened positions, so their sums are one ``segment_reduce``
    each (float32: a step's count is exact, its entropy sum is one line's)."""
    rows, length = response_mask.shape
    device = response_mask.device
    if rows * length == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return StepCells(empty, empty, empty.double(), empty.double(), (rows, length))
    ends = step_ends.to(torch.bool, copy=True)
    ends[:, -1] = True
    last = torch.nonzero(ends.reshape(-1)).squeeze(1)
    spans = torch.diff(last, prepend=last.new_tensor([-1]))
    mask = response_mask.to(torch.float32)
    tokens = torch.segment_reduce(mask.reshape(-1), "sum", lengths=spans)
    total = torch.segment_reduce((entropy.detach().to(torch.float32) * mask).reshape(-1), "sum", lengths=spans)
    tokens, total = tokens.to(torch.float64), total.to(torch.float64)
    first = last - spans + 1
    return StepCells(first=first, row=torch.div(first, length, rounding_mode="floor"), tokens=tokens,
                     entropy=total / tokens.clamp_min(1.0), shape=(rows, length))


def per_position(cells: StepCells, values: torch.Tensor) -> torch.Tensor:
    """(B, L) float32: every position gets its step's value (C,). The change from the previous step of the row is
    written at each step's first position and summed along the row, so every token of a step gets the same number
    (within float32 rounding of the running sum, about 1e-7 relative)."""
    change = values.clone()
    same_row = cells.row[1:] == cells.row[:-1]
    change[1:] -= torch.where(same_row, values[:-1], torch.zeros_like(values[:-1]))
    out = torch.zeros(cells.shape, dtype=torch.float32, device=values.device)
    out.view(-1)[cells.first] = change.to(torch.float32)
    return out.cumsum_(1)


def empg_step_advantages(cells: StepCells, outcome: torch.Tensor, *, k: float = 1.0, k_f: float = 1.0,
                         zeta: float = 0.1, center: str = "step", epsilon: float = 1e-8
                         ) -> tuple[torch.Tensor, dict[str, float]]:
    """A_final (C,) of every step cell (Eq. 7-12, module docstring) from the responses' outcome advantages A (B,);
    0 for empty cells. Returns (advantages, statistics)."""
    if center not in ("step", "token"):
        raise ValueError(f"algorithm.empg.center must be step or token, got {center!r}")
    real = cells.tokens > 0
    out = torch.zeros_like(cells.entropy)
    if not bool(real.any()):
        return out, {}
    h = cells.entropy[real]
    row = cells.row[real]
    h_norm = (h - h.min()) / (h.max() - h.min() + epsilon)  # Eq. 12
    confidence = torch.exp(-k * h_norm)
    g = confidence / (confidence.mean() + epsilon)  # Eq. 10
    # Eq. 11: the next step of the same response (the real cells are in row order, steps in order within a row)
    clarity = torch.exp(-k_f * h_norm)
    bonus = torch.zeros_like(h)
    bonus[:-1] = torch.where(row[1:] == row[:-1], clarity[1:], torch.zeros_like(clarity[1:]))
    modulated = g * outcome.to(torch.float64)[row] + zeta * bonus  # Eq. 8
    tokens = cells.tokens[real]
    mean = modulated.mean() if center == "step" else (modulated * tokens).sum() / tokens.sum()
    out[real] = modulated - mean  # Eq. 7
    stats = {"steps_per_response": float(real.sum()) / cells.shape[0],
             "step_entropy_mean": float(h.mean()), "g_min": float(g.min()), "g_max": float(g.max()),
             "bonus_mean": float(zeta * bonus.mean()), "centering_mean": float(mean)}
    return out, stats


@algorithm("advantage", name="empg", title="EMPG", paper=PAPER,
           summary="GRPO's outcome advantage scaled per step (line) by the step's confidence, plus a bonus for steps "
                   "followed by a confident one; centred over the batch.",
           estimator_options=EMPGOptions, estimator_needs=frozenset({OLD_ENTROPY, RESPONSE_STEPS}))
def empg_estimator(inputs: AdvantageInputs, options: EMPGOptions):
    mask = inputs.response_mask
    scores = inputs.token_level_rewards.sum(-1).to(torch.float64)  # as verl's GRPO (rewards are 0 outside the mask)
    outcome = grpo_sequence_advantage(scores, inputs.group_ids, num_groups(inputs.group_ids), 1e-6,
                                      options.norm_adv_by_std)
    cells = step_cells(inputs.entropy, mask, inputs.step_ends)
    per_step, stats = empg_step_advantages(cells, outcome, k=options.k, k_f=options.k_f, zeta=options.zeta,
                                           center=options.center, epsilon=options.epsilon)
    advantages = per_position(cells, per_step).mul_(mask).to(inputs.token_level_rewards.dtype)
    return advantages, advantages, {f"empg/{key}": value for key, value in stats.items()}
