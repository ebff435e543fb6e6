"""GTPO, Group Token Policy Optimization (arXiv 2508.04349, "GTPO and GRPO-S: Token and Sequence-Level Reward
Shaping with Policy Entropy"): entropy-shaped token rewards, then token-level advantages.

Equation numbers are those of arXiv v5 (2025-09-26), the last version whose full text we could read; the latest
(v6, 2026-02, the ICML 2026 version) keeps these formulas in a third-party reimplementation that cites its numbering
(textpolicy: Eq. 3, 5, 6). docs/gtpo.md pairs each equation with the code and lists the choices made.

In a prompt's group, O⁺ are the correct responses (score > ``correct_threshold``) and O⁻ the wrong ones. With the
old-policy token entropy H (detached), ``d_t`` / ``h_t`` the numbers of correct / wrong responses still active at
position t (response mask set), and a response inactive at t counting as H = 0:

    Eq. 2   r̃⁺_{i,t} = α₁·r_i + α₂ · H_{i,t} / Σ_{k∈O⁺} H_{k,t} · d_t                     (o_i ∈ O⁺)
    Eq. 3   r̃⁻_{j,t} = α₁·(−1) − α₂ · (1/H_{j,t}) / Σ_{k∈O⁻} (1/H_{k,t}) · h_t             (o_j ∈ O⁻)
    Eq. 4   Ã⁺ = (r̃⁺ − mean(R̃⁺)) / std(R̃⁺),   Ã⁻ = (r̃⁻ − mean(R̃⁻)) / std(R̃⁻)

R̃⁺ / R̃⁻ are all shaped token rewards of the correct / wrong responses of the whole batch (Eq. 4 as written:
``normalization=separate``). ``normalization=joint`` whitens all tokens of the batch together, the reading under
which the paper's §2.4.2 claim E[Ã] ≈ E[Â] holds (docs/gtpo.md). Every H enters as H + ε (Remark 2.1 of v6 adds ε
against 1/0), so zero entropy gives finite weights that tend to the equal-entropy weights.

The computation streams over cache-sized blocks of rows twice (pass 1: per (group, sign) cell and position, the sums
that give the bonus factor and the moments of Eq. 4; pass 2: the advantages), so that no (B, L) temporary is
allocated besides the output and a block's temporaries stay in cache; every operation inside a block is vectorised
over all its rows and positions. When every group has the same size (verl's ``rollout.n``), the cell sums are batched
products over a (groups, n, L) view of the rows taken group after group (no scatter), and a block's cells, complete
once its groups are summed, get their factors and moments (float64) while the sums are in cache; other layouts
accumulate with ``index_put_``, then do the same per chunk of cells. A normalisation set whose spread is below
float32 resolution is constant: its advantages are 0, as the exact formula gives (its shaped rewards all equal their
mean).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from hapo_verl.algorithms.groups import equal_size_groups, num_groups
from hapo_verl.registry import OLD_ENTROPY, AdvantageInputs, Variant, algorithm, option

PAPER = "GTPO and GRPO-S, arXiv 2508.04349 (https://arxiv.org/abs/2508.04349)"
#: elements per block of rows in the streaming passes (1 MiB of float32 per temporary: a block's half-dozen
#: temporaries stay in the 32 MiB L3 cache, so that only the inputs and the output travel to and from memory)
BLOCK_ELEMENTS = 1 << 18
#: most Python threads for the blocks (_each_block): each op holds the GIL for its dispatch, a few µs against tens of µs
#: of work on a block, so more threads would queue for it
BLOCK_THREADS = 8
_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class GTPOOptions:
    """``algorithm.gtpo.*`` with ``adv_estimator=gtpo``."""

    alpha1: float = option(1.0, "α₁: weight of the response's own reward in each token reward (Eq. 2-3).",
                           low=0.0, paper=PAPER + ", §3.1: α₁ = 1")
    alpha2: float = option(0.1, "α₂: weight of the entropy term (Eq. 2-3); 0 switches it off.",
                           low=0.0, paper=PAPER + ", §3.1: α₂ = 0.1")
    normalization: str = option(
        "separate", "separate: correct and wrong tokens each whitened over the batch (Eq. 4 as written); joint: all "
        "tokens of the batch whitened together (the reading of the paper's §2.4.2 analysis).",
        choices=("separate", "joint"), paper=PAPER + ", Eq. 4")
    base_reward: str = option(
        "paper", "paper: α₁·r_i for correct and α₁·(−1) for wrong responses (Eq. 2-3); score: α₁·r for both "
        "(keeps reward shaping such as DAPO's overlong penalty on wrong responses).",
        choices=("paper", "score"), paper=PAPER + ", Eq. 2-3")
    correct_threshold: float = option(
        0.0, "A response is correct (O⁺) when its score is above this; 0 fits 0/1 and ±1 rewards.")
    epsilon: float = option(1e-6, "ε added to every entropy (against 1/0) and to the std of Eq. 4.",
                            low=0.0, high=1.0, low_open=True, paper=PAPER + ", Remark 2.1 (v6)")


def _token_values(entropy: torch.Tensor, mask: torch.Tensor, positive: torch.Tensor, epsilon: float,
                  out: torch.Tensor, spare: torch.Tensor) -> torch.Tensor:
    """X = H + ε on correct rows, 1 / (H + ε) on wrong rows, 0 where the mask is off, for one block of rows, written
    into ``out`` (``spare``: a buffer of the same shape; ``positive``: 1.0 on correct rows, 0.0 on wrong ones)."""
    torch.add(entropy, epsilon, out=spare)
    torch.reciprocal(spare, out=out)
    # lerp with a weight of exactly 0 or 1 selects exactly (finite values), 3-4x faster than torch.where on CPU
    torch.lerp(out, spare, positive[:, None], out=out)
    return out.mul_(mask)


def _step(length: int, block_rows: int | None) -> int:
    return block_rows or max(1, BLOCK_ELEMENTS // max(1, length))


def _each_block(count: int, device: torch.device, work) -> None:
    """Calls ``work(blocks)``, where ``blocks`` yields the block indices 0..count-1, each once; ``work`` makes its own
    buffers, and block k writes only its own slice of the results. On CPU with several torch threads the blocks run on
    Python threads (at most :data:`BLOCK_THREADS`, the torch threads shared out among them), every thread taking the
    next free block: a block's ops are small, and torch's intra-op threads meet at a barrier after each of them, where
    under load from other processes each op waits for a time slice of every core (3-4x the wall time at a load of 3 on
    2 cores); threads working on separate blocks do not wait for each other (torch releases the GIL inside an op).
    The results do not depend on the thread that computes a block."""
    available = torch.get_num_threads()
    threads = min(available, count, BLOCK_THREADS) if device.type == "cpu" else 1
    blocks = iter(range(count))  # shared: next() on it runs under the GIL, so each index is handed out once
    if threads <= 1:
        work(blocks)
        return
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def run():  # grad and inference mode are per thread: the caller's apply (writing into inference tensors)
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            work(blocks)

    torch.set_num_threads(available // threads)  # per op; restored below (new threads take it on their first op)
    try:
        with ThreadPoolExecutor(threads) as pool:
            for done in [pool.submit(run) for _ in range(threads)]:
                done.result()
    finally:
        torch.set_num_threads(available)


def _cell_factors(s_x, active, s_xx, s_bx, alpha2, factor, tokens, bonus_sq, base_bonus):
    """From the float32 sums of some cells and positions, promoted to float64 (each (..., L), modified): Σ X, the
    active count, Σ X² and Σ base·X. Writes the factor F = α₂ · count / Σ X of the bonus b_{i,t} = F[cell, t] · X_{i,t}
    (Eq. 2-3) into ``factor`` (..., L) (float32), and per cell, for the moments of Eq. 4, Σ_t count,
    Σ b² = Σ_t F² · Σ X² and Σ base·b = Σ_t F · Σ base·X (float64, from the unrounded F) into ``tokens``,
    ``bonus_sq`` and ``base_bonus`` (...). Σ X > 0 wherever count > 0: the clamp only turns 0/0 into 0."""
    f64 = torch.mul(active, alpha2).div_(s_x.clamp_min_(_TINY))
    torch.sum(active, -1, out=tokens)
    torch.sum(s_xx.mul_(f64).mul_(f64), -1, out=bonus_sq)
    torch.sum(s_bx.mul_(f64), -1, out=base_bonus)
    factor.copy_(f64)


def _factors_scatter(entropy, mask, positive, base32, key, cells, epsilon, alpha2, block_rows):
    """Pass 1 for any group layout: the cell sums accumulated with ``index_put_`` over blocks of rows, then the
    factors and moments of the cells (_cell_factors), a cache-sized chunk of cells at a time; and each row's number
    of active tokens. Returns (factor (cells, L), tokens, bonus_sq, base_bonus, lengths)."""
    rows, length = mask.shape
    device = mask.device
    sums = torch.zeros(cells, 4, length, dtype=torch.float32, device=device)  # Σ X, count, Σ X², Σ base·X
    s_x, active, s_xx, s_bx = sums.unbind(1)
    lengths = torch.empty(rows, dtype=torch.float32, device=device)
    step = min(rows, _step(length, block_rows))
    x_buf = torch.empty(step, length, dtype=torch.float32, device=device)
    spare = torch.empty_like(x_buf)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        m, k = mask[start:stop], key[start:stop]
        x, tmp = x_buf[:stop - start], spare[:stop - start]
        _token_values(entropy[start:stop], m, positive[start:stop], epsilon, x, tmp)
        # index_put_ with accumulate: a sort-based row accumulation, several times faster on CPU than index_add_
        s_x.index_put_((k,), x, accumulate=True)
        active.index_put_((k,), m, accumulate=True)
        s_bx.index_put_((k,), torch.mul(x, base32[start:stop, None], out=tmp), accumulate=True)
        s_xx.index_put_((k,), torch.mul(x, x, out=tmp), accumulate=True)
        torch.sum(m, -1, out=lengths[start:stop])
    factor = torch.empty(cells, length, dtype=torch.float32, device=device)
    tokens, bonus_sq, base_bonus = (torch.empty(cells, dtype=torch.float64, device=device) for _ in range(3))
    chunk = max(1, _step(4 * length, None))

    def work(blocks):
        for block in blocks:
            c0, c1 = block * chunk, min(cells, (block + 1) * chunk)
            wide = sums[c0:c1].to(torch.float64)  # one conversion: no mixed-dtype arithmetic in _cell_factors
            _cell_factors(*wide.unbind(1), alpha2, factor[c0:c1], tokens[c0:c1], bonus_sq[c0:c1], base_bonus[c0:c1])

    _each_block(-(-cells // chunk), device, work)
    return factor, tokens, bonus_sq, base_bonus, lengths


def _factors_grouped(entropy, mask, positive, base32, size, order, epsilon, alpha2, block_rows):
    """Pass 1 when every group has ``size`` rows (groups.equal_size_groups gives ``order``): the rows are taken group
    after group (gathered through ``order`` one cache-sized block at a time, or viewed in place when the groups are
    already consecutive blocks), and the cell sums of a block of groups are batched products of the (groups, size)
    sign and base weights with the (groups, size, L) values: no scatter, no sort. The block's groups are then
    complete: their factors and moments (_cell_factors) follow while the sums are in cache. Cell 2·j + sign belongs
    to the j-th block of rows. Returns what _factors_scatter returns, the lengths in the order of ``order``."""
    rows, length = mask.shape
    groups = rows // size
    device = mask.device
    if order is not None:
        positive, base32 = positive[order], base32[order]
    w_pos = positive
    w_neg = 1.0 - w_pos
    # (groups, 4, size): wrong, correct, base·wrong, base·correct; the first two also alone, contiguous for bmm
    weights = torch.stack((w_neg, w_pos, w_neg * base32, w_pos * base32)).view(4, groups, size).transpose(0, 1)
    weights = weights.contiguous()
    signs = weights[:, :2].contiguous()
    cells = 2 * groups
    factor = torch.empty(cells, length, dtype=torch.float32, device=device)
    tokens, bonus_sq, base_bonus = (torch.empty(cells, dtype=torch.float64, device=device) for _ in range(3))
    lengths = torch.empty(rows, dtype=torch.float32, device=device)
    step = max(1, min(groups, _step(length, block_rows) // size))
    f32 = dict(dtype=torch.float32, device=device)

    def work(blocks):
        # per group: Σ X (wrong, correct), Σ base·X (wrong, correct), count (wrong, correct), Σ X² (wrong, correct)
        sums = torch.empty(step, 8, length, **f32)
        buffers = [torch.empty(step * size, length, **f32) for _ in range(2 if order is None else 4)]
        for block in blocks:
            g0 = block * step
            g1 = min(groups, g0 + step)
            r0, r1, blk = g0 * size, g1 * size, g1 - g0
            x, tmp = buffers[0][:r1 - r0], buffers[1][:r1 - r0]
            if order is None:
                e, m = entropy[r0:r1], mask[r0:r1]
            else:
                idx = order[r0:r1]
                e = torch.index_select(entropy, 0, idx, out=buffers[2][:r1 - r0])
                m = torch.index_select(mask, 0, idx, out=buffers[3][:r1 - r0])
            _token_values(e, m, positive[r0:r1], epsilon, x, tmp)
            s = sums[:blk]
            torch.bmm(weights[g0:g1], x.view(blk, size, length), out=s[:, 0:4])
            torch.bmm(signs[g0:g1], m.view(blk, size, length), out=s[:, 4:6])
            torch.bmm(signs[g0:g1], torch.mul(x, x, out=tmp).view(blk, size, length), out=s[:, 6:8])
            torch.sum(m, -1, out=lengths[r0:r1])
            wide = s.to(torch.float64)  # one conversion: no mixed-dtype arithmetic in _cell_factors
            c0, c1 = 2 * g0, 2 * g1
            _cell_factors(wide[:, 0:2], wide[:, 4:6], wide[:, 6:8], wide[:, 2:4], alpha2,
                          factor[c0:c1].view(blk, 2, length), tokens[c0:c1].view(blk, 2),
                          bonus_sq[c0:c1].view(blk, 2), base_bonus[c0:c1].view(blk, 2))

    _each_block(-(-groups // step), device, work)
    return factor, tokens, bonus_sq, base_bonus, lengths


def gtpo_advantage(
    scores: torch.Tensor,
    response_mask: torch.Tensor,
    entropy: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    alpha1: float = 1.0,
    alpha2: float = 0.1,
    normalization: str = "separate",
    base_reward: str = "paper",
    correct_threshold: float = 0.0,
    epsilon: float = 1e-6,
    block_rows: int | None = None,
    grouped: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token advantages (B, L) of Eq. 2-4 (module docstring) from per-response scores (B,), the response mask, the
    old-policy entropy (B, L) and contiguous group ids (B,). Returns (advantages, statistics).

    ``grouped``: when every group has the same size (verl's ``rollout.n``), compute the group sums on a (groups, n,
    L) view (_factors_grouped); False forces the general scatter path (tests compare the two)."""
    if normalization not in ("separate", "joint"):
        raise ValueError(f"algorithm.gtpo.normalization must be separate or joint, got {normalization!r}")
    if base_reward not in ("paper", "score"):
        raise ValueError(f"algorithm.gtpo.base_reward must be paper or score, got {base_reward!r}")
    rows, length = response_mask.shape
    device = response_mask.device
    out = torch.empty(rows, length, dtype=torch.float32, device=device)
    if rows == 0 or length == 0:
        return out, {}
    scores = scores.detach().to(torch.float64)
    positive = scores > correct_threshold
    base = alpha1 * scores if base_reward == "score" else torch.where(positive, alpha1 * scores,
                                                                        torch.full_like(scores, -alpha1))
    group_ids = group_ids.to(device)
    count = num_groups(group_ids)
    cells = 2 * count
    mask = response_mask.to(torch.float32)
    entropy = entropy.detach().to(torch.float32)
    base32 = base.to(torch.float32)
    positive32 = positive.to(torch.float32)
    layout = equal_size_groups(group_ids, count) if grouped else None

    # pass 1: per cell and position t, Σ X (the denominators of Eq. 2-3), the active count d_t / h_t, Σ X² and
    # Σ base·X; from them the factor F of the bonus b = F · X and the cell moments of b that Eq. 4 needs, without
    # materialising the shaped rewards. Σ_i Σ_t b over a cell = Σ_t F · Σ X = α₂ · Σ_t count.
    if layout is None:
        key = 2 * group_ids + positive.long()  # (group, sign) cell of each row
        factor, cell_tokens, cell_bonus_sq, cell_base_bonus, lengths = _factors_scatter(
            entropy, mask, positive32, base32, key, cells, epsilon, alpha2, block_rows)
    else:
        size, order = layout
        factor, cell_tokens, cell_bonus_sq, cell_base_bonus, lengths = _factors_grouped(
            entropy, mask, positive32, base32, size, order, epsilon, alpha2, block_rows)
        slot = torch.arange(rows, device=device) // size  # the block of rows (a group) of each row, in pass-1 order
        if order is not None:
            slot, lengths = torch.empty_like(slot).index_put_((order,), slot), \
                torch.empty_like(lengths).index_put_((order,), lengths)
        key = 2 * slot + positive.long()
    cell_bonus = alpha2 * cell_tokens
    lengths = lengths.to(torch.float64)
    cell_sign = torch.tensor([-1.0, 1.0], dtype=torch.float64, device=device).repeat(cells // 2)
    cell_base = torch.zeros(cells, dtype=torch.float64, device=device).index_add_(0, key, base * lengths)
    cell_base_sq = torch.zeros(cells, dtype=torch.float64, device=device).index_add_(0, key, base.square() * lengths)
    # Eq. 4: moments of r̃ = base + sign·b over each normalisation set (correct / wrong tokens, or all tokens)
    total = cell_base + cell_sign * cell_bonus
    total_sq = cell_base_sq + 2 * cell_sign * cell_base_bonus + cell_bonus_sq
    sets = (torch.arange(cells, device=device) % 2) if normalization == "separate" else \
        torch.zeros(cells, dtype=torch.long, device=device)
    n = torch.zeros(2, dtype=torch.float64, device=device).index_add_(0, sets, cell_tokens)
    s1 = torch.zeros_like(n).index_add_(0, sets, total)
    s2 = torch.zeros_like(n).index_add_(0, sets, total_sq)
    mean = s1 / n.clamp_min(1.0)
    var = ((s2 - n * mean.square()) / (n - 1.0).clamp_min(1.0)).clamp_min(0.0)
    std = torch.where(n > 1, var.sqrt(), torch.zeros_like(var))
    # a spread below float32 resolution (relative 1e-5) is rounding: the set is constant, its exact advantages 0
    rms = (s2 / n.clamp_min(1.0)).clamp_min(0.0).sqrt()
    constant = std <= 1e-5 * rms
    row_set = sets[key]
    scale = torch.where(constant, torch.zeros_like(std), 1.0 / (std + epsilon))[row_set]
    row_shift = ((base - mean[row_set]) * scale).to(torch.float32)
    row_scale = (cell_sign[key] * scale).to(torch.float32)

    # pass 2, in row order: Ã = (base − mean) / (std + ε) + sign · b / (std + ε) on the active tokens (the order of
    # the float32 operations is part of the result where a set is nearly constant: keep it)
    step = min(rows, _step(length, block_rows))

    def work(blocks):
        x_buf = torch.empty(step, length, dtype=torch.float32, device=device)
        spare = torch.empty_like(x_buf)
        for block in blocks:
            start = block * step
            stop = min(rows, start + step)
            m = mask[start:stop]
            x = _token_values(entropy[start:stop], m, positive32[start:stop], epsilon, x_buf[:stop - start],
                              spare[:stop - start])
            rows_out = torch.index_select(factor, 0, key[start:stop], out=out[start:stop]).mul_(x)
            rows_out.mul_(row_scale[start:stop, None]).addcmul_(m, row_shift[start:stop, None])

    _each_block(-(-rows // step), device, work)

    tokens = cell_tokens.sum().clamp_min(1.0)
    stats = {"correct_token_fraction": float(cell_tokens[1::2].sum() / tokens),
             "shaped_reward_mean": float(total.sum() / tokens),
             "bonus_mean": float(cell_bonus.sum() / tokens)}
    if normalization == "separate":
        stats.update(std_correct=float(std[1]), std_wrong=float(std[0]))
    else:
        stats["std"] = float(std[0])
    return out, stats


@algorithm("advantage", name="gtpo", title="GTPO", paper=PAPER,
           summary="Entropy-shaped token rewards: more credit to uncertain tokens of correct responses, more blame "
                   "to confident tokens of wrong ones; token-level advantages.",
           estimator_options=GTPOOptions, estimator_needs=frozenset({OLD_ENTROPY}),
           variants=(Variant("joint", "joint normalisation", ("algorithm.gtpo.normalization=joint",),
                             why="Eq. 4 whitening all tokens together (docs/gtpo.md, ambiguity 1)"),))
def gtpo_estimator(inputs: AdvantageInputs, options: GTPOOptions):
    mask = inputs.response_mask
    scores = inputs.token_level_rewards.sum(-1)  # as verl's GRPO (rewards are 0 outside the mask)
    advantages, stats = gtpo_advantage(
        scores, mask, inputs.entropy, inputs.group_ids, alpha1=options.alpha1, alpha2=options.alpha2,
        normalization=options.normalization, base_reward=options.base_reward,
        correct_threshold=options.correct_threshold, epsilon=options.epsilon)
    advantages = advantages.to(inputs.token_level_rewards.dtype)
    return advantages, advantages, {f"gtpo/{k}": v for k, v in stats.items()}
