"""D³S, Dynamic Dual-Level Down-Sampling (arXiv 2509.22115, "Learning More with Less: A Dynamic Dual-Level
Down-Sampling Framework for Efficient Policy Optimization"): which rollouts and which tokens the update learns from.

A driver-side selection step after the advantage (any estimator) and before the update (any loss). With A_{i,t} the
advantages the estimator wrote and H_{i,t} the old-policy token entropy:

    sample level   in each prompt group of n rollouts, keep the k = ⌈ρ_s·n⌉ rollouts whose (sequence) advantages
                   a_i have the largest variance:  S* = argmax_{|S| = k} Var_{i∈S}(a_i)
    token level    among the tokens of the kept rollouts, keep the ⌈ρ_t·N⌉ with the largest |A_{i,t}|·H_{i,t}
    schedule       ρ_s, ρ_t move from aggressive (small) to relaxed (large) over training

The paper's full text (equations, schedule constants, the authors' code "in the supplementary material") could not be
read for this implementation: only the abstract and third-party summaries. Every reading below is an option, and
docs/d3s.md lists them. The max-variance subset of size k of scalars is a set of extremes, the j smallest and the
k−j largest for some j (proved in PODS, arXiv 2504.13818, whose max-variance down-sampling of rewards D³S's sample
level applies to advantages), so :func:`max_variance_keep` evaluates every j of every group at once with prefix sums
over the sorted groups.

Everything here is vectorised over groups, rows and tokens (no Python loop over them; the token passes loop over
blocks of a few million elements), runs on any device, and takes a few host syncs (sizes, counts, the threshold):
it runs once per step on the driver, never in a loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hapo_verl.registry import OLD_ENTROPY, SelectionInputs, algorithm, option

PAPER = "D³S, arXiv 2509.22115 (https://arxiv.org/abs/2509.22115)"
OURS = "our default: the paper's constants are not public"
#: two subsets whose advantage variances differ by less than this times the group's largest a² are a tie (the
#: first j wins), so float rounding of the prefix sums never decides between equally good subsets
VARIANCE_TIE = 1e-12
#: ⌈ρ·n⌉ computed as ⌈ρ·n − this⌉: 0.3·10 is 3.0000000000000004 in floats, and must give 3
CEIL_SLACK = 1e-9
#: elements per block of the token passes (16 MiB of float32 per temporary, reused by the allocator)
BLOCK_ELEMENTS = 1 << 22
#: the rank keys of :func:`score_key`: bfloat16 bit patterns of non-negative numbers
KEY_BINS = 1 << 15


@dataclass(frozen=True)
class D3SOptions:
    """``algorithm.d3s.*``: the selection step, with any ``adv_estimator`` and any ``loss_mode``."""

    enable: bool = option(False, "Run the D³S selection step (after the advantage, before the update).", paper=PAPER)
    sample_keep_ratio_start: float = option(
        0.5, "ρ_s at the first step: fraction of each prompt group's rollouts kept (at least 2 of a group of 2 or "
        "more, rounded up).", low=0.0, high=1.0, low_open=True, paper=f"{PAPER}; {OURS}")
    sample_keep_ratio_end: float = option(
        1.0, "ρ_s at the end of the schedule (1 keeps every rollout).", low=0.0, high=1.0, low_open=True,
        paper=f"{PAPER}; {OURS}")
    token_keep_ratio_start: float = option(
        0.5, "ρ_t at the first step: fraction of the kept rollouts' tokens kept, those with the largest |A|·H.",
        low=0.0, high=1.0, low_open=True, paper=f"{PAPER}; {OURS}")
    token_keep_ratio_end: float = option(
        1.0, "ρ_t at the end of the schedule (1 keeps every token of the kept rollouts).", low=0.0, high=1.0,
        low_open=True, paper=f"{PAPER}; {OURS}")
    schedule: str = option(
        "linear", "How the ratios move from start to end: linear or cosine in the training progress; constant "
        "keeps the start values.", choices=("linear", "cosine", "constant"), paper=f"{PAPER}; {OURS}")
    anneal_steps: int = option(
        0, "Steps over which the ratios reach their end values; 0: trainer.total_training_steps.", low=0,
        paper=f"{PAPER}; {OURS}")
    sample_scope: str = option(
        "group", "group: the max-variance subset is taken in each prompt group (k = ⌈ρ_s·n⌉ per group); batch: over "
        "the whole batch as one pool (our reading of the paper's cross-group variant).",
        choices=("group", "batch"), paper=PAPER)
    token_scope: str = option(
        "batch", "batch: the top ⌈ρ_t·N⌉ tokens of the whole batch by |A|·H; sequence: the top ⌈ρ_t·N_i⌉ of each "
        "kept rollout (a full per-row sort: slower).", choices=("batch", "sequence"), paper=PAPER)


# ------------------------------------------------------------------------------------------------ schedule
def scheduled_ratio(start: float, end: float, step: int, anneal_steps: int, schedule: str = "linear") -> float:
    """The keep ratio at training step ``step`` (1-based): ``start`` at step 1, ``end`` from step ``anneal_steps``
    on, linear or cosine in between; ``constant`` stays at ``start``."""
    if schedule == "constant":
        return float(start)
    progress = min(1.0, max(0.0, (step - 1) / max(1, anneal_steps - 1)))
    if schedule == "cosine":
        progress = (1.0 - math.cos(math.pi * progress)) / 2.0
    return float(start + (end - start) * progress)


# ------------------------------------------------------------------------------------------------ sample level
def response_lengths(response_mask: torch.Tensor) -> torch.Tensor:
    """(B,) one past each row's last response token (0 for a row without any): the prefix every token of the row
    lies in (verl's rows are right-padded; the trainer passes the lengths it already has)."""
    positions = torch.arange(1, response_mask.shape[-1] + 1, device=response_mask.device)
    return torch.where(response_mask.bool(), positions, 0).amax(dim=-1) if response_mask.numel() else \
        torch.zeros(response_mask.shape[0], dtype=torch.long, device=response_mask.device)


def sequence_advantage(advantages: torch.Tensor, response_mask: torch.Tensor, lengths: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, n): a_i the mean advantage over a response's tokens (the scalar of outcome estimators such as GRPO,
    whose advantage is constant along the response; 0 for a response without tokens) and n_i its token count.

    ``lengths`` (verl's padding, see :func:`d3s_keep`): when no row has a masked-out token before its length, the
    sums need no mask (the advantages are 0 from each row's length on)."""
    mask = response_mask if response_mask.dtype == advantages.dtype else response_mask.to(advantages.dtype)
    ones = torch.ones(mask.shape[-1], dtype=mask.dtype, device=mask.device)
    count = torch.mv(mask, ones)  # matrix-vector products and a batched dot product: no (B, L) temporary
    if lengths is not None and bool((count == lengths.to(count.device)).all()):
        total = torch.mv(advantages, ones.to(advantages.dtype))
    else:
        total = torch.bmm(advantages.unsqueeze(1), mask.unsqueeze(2)).view(-1)
    return total / count.clamp_min(1.0), count


def keep_counts(sizes: torch.Tensor, ratio: float) -> torch.Tensor:
    """k = ⌈ratio·n⌉ per group, at least 2 for a group of 2 or more (a variance needs two) and at most n."""
    k = torch.ceil(sizes.double() * ratio - CEIL_SLACK).long()
    return torch.minimum(torch.maximum(k, sizes.clamp_max(2)), sizes)


def max_variance_keep(values: torch.Tensor, group_ids: torch.Tensor, num_groups: int, ratio: float,
                      eligible: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) bool: in each group, the k = :func:`keep_counts` rows whose ``values`` have the largest variance.

    Of the rows sorted by value (ties by row index), the candidates are the j smallest plus the k−j largest,
    j = 0..k (a max-variance subset is always of this form, as PODS proves); their variances come from prefix
    sums of the values and squares over each sorted group, laid out as a (groups, largest group) matrix, all groups
    and all j at once. The largest variance wins; near-ties (:data:`VARIANCE_TIE`) go to the smallest j. Rows not
    ``eligible`` (e.g. responses without tokens) are never kept and do not count in n.
    """
    B = values.numel()
    device = values.device
    if B == 0:
        return torch.zeros(0, dtype=torch.bool, device=device)
    v = values.reshape(-1).double()
    g = group_ids.reshape(-1).long()
    if eligible is not None:  # ineligible rows form one extra group that keeps nothing
        g = torch.where(eligible.reshape(-1), g, torch.full_like(g, num_groups))
    groups = num_groups + 1
    sizes = torch.bincount(g, minlength=groups)
    k = keep_counts(sizes, ratio)
    k[num_groups] = 0
    # rows by group, then value, then row index (two stable sorts)
    by_value = torch.sort(v, stable=True).indices
    order = by_value[torch.sort(g[by_value], stable=True).indices]
    sorted_g, sorted_v = g[order], v[order]
    starts = torch.cumsum(sizes, 0) - sizes
    pos = torch.arange(B, device=device) - starts[sorted_g]
    width = int(sizes.max())
    # centred per group: the variance is shift-invariant and the prefix sums stay small
    mean = torch.zeros(groups, dtype=v.dtype, device=device).index_add_(0, g, v) / sizes.clamp_min(1)
    centred = sorted_v - mean[sorted_g]
    prefix = torch.zeros(groups, width + 1, dtype=v.dtype, device=device)
    prefix_sq = torch.zeros(groups, width + 1, dtype=v.dtype, device=device)
    prefix[sorted_g, pos + 1] = centred
    prefix_sq[sorted_g, pos + 1] = centred.square()
    prefix, prefix_sq = prefix.cumsum(1), prefix_sq.cumsum(1)
    j = torch.arange(int(k.max()) + 1, device=device)[None, :]
    valid = j <= k[:, None]
    j = torch.minimum(j, k[:, None])
    high_from = sizes[:, None] - (k[:, None] - j)  # the k−j largest: sorted positions high_from..n−1
    n_col = sizes[:, None].expand_as(j)

    def subset_sum(p):
        return p.gather(1, j) + p.gather(1, n_col) - p.gather(1, high_from)

    kf = k.clamp_min(1).double()[:, None]
    variance = subset_sum(prefix_sq) / kf - (subset_sum(prefix) / kf).square()
    variance = torch.where(valid, variance, torch.full_like(variance, -math.inf))
    # the group's largest a² (rows sorted by value: its first or last row) scales the tie tolerance
    first = sorted_v[starts.clamp_max(B - 1)]
    last = sorted_v[(starts + sizes - 1).clamp(0, B - 1)]
    scale = torch.maximum(first.square(), last.square())
    best = variance.max(dim=1, keepdim=True).values
    chosen = (variance >= best - VARIANCE_TIE * scale[:, None]) & valid
    j_star = torch.argmax(chosen.to(torch.uint8), dim=1)  # the first j within the tie tolerance
    n_sorted, k_sorted, j_sorted = sizes[sorted_g], k[sorted_g], j_star[sorted_g]
    keep_sorted = ((pos < j_sorted) | (pos >= n_sorted - (k_sorted - j_sorted))) & (k_sorted > 0)
    keep = torch.empty(B, dtype=torch.bool, device=device)
    keep[order] = keep_sorted
    return keep


# ------------------------------------------------------------------------------------------------ token level
def score_key(advantages: torch.Tensor, entropy: torch.Tensor, response_mask: torch.Tensor | None) -> torch.Tensor:
    """|A_{i,t}·H_{i,t}| on the response's tokens (0 elsewhere) as a rank key: the float32 product rounded to
    bfloat16, whose bit pattern (sign cleared) is an int16 in [0, 32767] ordered like the score.

    Scores are ranked at bfloat16 resolution (8 significant bits; tokens whose scores agree that far are ties):
    the entropies and advantages come from bfloat16 logits, so finer ranks would order rounding noise, and a
    16-bit key makes the batch threshold one histogram instead of a sort.
    """
    score = torch.mul(advantages.float(), entropy.float())
    if response_mask is not None:  # None: the caller knows the score is 0 off the response tokens
        score.mul_(response_mask)
    return score.to(torch.bfloat16).view(torch.int16).bitwise_and_(0x7FFF)


def _prefix_blocks(rows: torch.Tensor, lengths: torch.Tensor):
    """The rows ``rows`` (indices) with tokens, longest first, in blocks of about :data:`BLOCK_ELEMENTS` elements:
    (row indices, width) with width the block's longest length. A pass over them touches each row's prefix (where
    its tokens are) instead of the whole padded row, in block-sized temporaries."""
    lengths = lengths[rows]
    order = torch.argsort(lengths, descending=True, stable=True)
    rows, widths = rows[order], lengths[order].tolist()
    start = 0
    while start < len(widths) and widths[start] > 0:
        end = min(len(widths), start + max(1, BLOCK_ELEMENTS // widths[start]))
        yield rows[start:end], widths[start]
        start = end


def _take(x: torch.Tensor, rows: torch.Tensor, width: int) -> torch.Tensor:
    return x[:, :width].index_select(0, rows)


def top_score_keep(advantages: torch.Tensor, entropy: torch.Tensor, response_mask: torch.Tensor,
                   rows: torch.Tensor, ratio: float, scope: str = "batch", lengths: torch.Tensor | None = None,
                   counts: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(keep (B, L) bool, its count): of the candidates (the response tokens of the ``rows`` kept), the ⌈ratio·N⌉
    with the largest :func:`score_key` (N candidates in the batch, or in each row with ``scope="sequence"``).

    τ is the ⌈ratio·N⌉-th largest candidate key and every candidate with key ≥ τ is kept (ties at τ all kept),
    except that a score of 0 is never preferred: below ratio 1 only positive keys are kept, and a pool (the batch,
    or a row) without any positive key keeps all its candidates (nothing in it is more informative than the rest,
    and an update over no token divides by zero). Ratio 1 keeps every candidate.

    The batch scope passes twice over the kept rows' prefixes, in blocks: the keys and their histogram (32768
    bins), then the comparison with τ read off the histogram. The sequence scope sorts each kept row's keys.
    ``lengths``: verl's padding, see :func:`d3s_keep` (derived from the mask when None); ``counts`` (B,): the rows'
    token counts when known.
    """
    B, L = advantages.shape
    device = advantages.device
    rows = rows.reshape(-1).bool()
    keep = torch.zeros(B, L, dtype=torch.bool, device=device)
    zero_padded = lengths is not None
    lengths = response_lengths(response_mask) if lengths is None else lengths.to(device)
    kept_rows = rows.nonzero().view(-1)
    if ratio >= 1.0:
        return _keep_candidates(keep, response_mask, kept_rows, lengths)
    if scope == "sequence":
        return _top_score_keep_rows(advantages, entropy, response_mask, kept_rows, lengths, ratio, keep)
    counts = response_mask.bool().sum(dim=-1) if counts is None else counts.to(device)
    candidates = int(counts[kept_rows].double().sum())
    if candidates == 0:
        return keep, 0
    k = min(candidates, max(1, math.ceil(ratio * candidates - CEIL_SLACK)))
    # rows without a masked-out token before their length, zero from it on: their prefixes need no mask
    unmasked = zero_padded and bool((counts[kept_rows] == lengths[kept_rows]).all())
    blocks, histogram = [], torch.zeros(KEY_BINS, dtype=torch.long, device=device)
    for index, width in _prefix_blocks(kept_rows, lengths):
        key = score_key(_take(advantages, index, width), _take(entropy, index, width),
                        None if unmasked else _take(response_mask, index, width))
        counted = torch.bincount(key.view(-1))
        histogram[:counted.numel()] += counted
        blocks.append((index, width, key))
    at_least = histogram[1:].flip(0).cumsum(0).flip(0)  # at_least[v - 1]: candidates with key ≥ v, v ≥ 1
    positive = int(at_least[0])
    if positive == 0 or k >= candidates:  # nothing to prefer, or everything kept
        return _keep_candidates(keep, response_mask, kept_rows, lengths)
    threshold = max(1, int(torch.count_nonzero(at_least >= k)))  # the largest v with ≥ k keys ≥ v (else 1)
    for index, width, key in blocks:
        keep[:, :width].index_copy_(0, index, key >= threshold)
    return keep, int(at_least[threshold - 1])


def _keep_candidates(keep, response_mask, kept_rows, lengths):
    kept = 0
    for index, width in _prefix_blocks(kept_rows, lengths):
        chosen = _take(response_mask, index, width).bool()
        keep[:, :width].index_copy_(0, index, chosen)
        kept += int(torch.count_nonzero(chosen))
    return keep, kept


def _top_score_keep_rows(advantages, entropy, response_mask, kept_rows, lengths, ratio, keep):
    kept = 0
    for index, width in _prefix_blocks(kept_rows, lengths):
        candidates = _take(response_mask, index, width)
        key = score_key(_take(advantages, index, width), _take(entropy, index, width), candidates)
        candidates = candidates.bool()
        counts = candidates.sum(dim=-1)
        k = torch.minimum(torch.ceil(counts.double() * ratio - CEIL_SLACK).long().clamp_min(1), counts)
        ranked = torch.sort(key, dim=-1, descending=True).values  # non-candidates have key 0: last
        threshold = ranked.gather(1, (k - 1).clamp_min(0)[:, None]).clamp_min(1)
        chosen = key >= threshold
        everything = (k >= counts) | ~chosen.any(dim=-1)
        chosen = torch.where(everything[:, None], candidates, chosen)
        keep[:, :width].index_copy_(0, index, chosen)
        kept += int(torch.count_nonzero(chosen))
    return keep, kept


# ------------------------------------------------------------------------------------------------ the step
def d3s_keep(advantages: torch.Tensor, response_mask: torch.Tensor, entropy: torch.Tensor | None,
             group_ids: torch.Tensor, num_groups: int, sample_ratio: float, token_ratio: float,
             sample_scope: str = "group", token_scope: str = "batch", lengths: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(token keep (B, L) bool, rollout keep (B,) bool, token count per rollout (B,), kept tokens): the sample
    level, then the token level on the kept rollouts. The advantages are not recomputed over the kept rollouts: the
    sample level maximises the variance of these very advantages (whose group baselines use every rollout).

    ``lengths`` (B,): verl's padding, as the trainer has it: every response token of row i lies before
    ``lengths[i]``, and the advantages and entropies are 0 from there on (to_padded_tensor's zeros). Rows without
    masked-out tokens before their length then need no mask. None: everything is derived from the mask."""
    values, counts = sequence_advantage(advantages, response_mask, lengths)
    has_tokens = counts > 0
    if sample_ratio >= 1.0 and token_ratio >= 1.0:  # the end of the schedule: every token
        return response_mask.bool(), has_tokens, counts, int(counts.double().sum())
    if sample_ratio >= 1.0:
        rows = has_tokens
    else:
        if sample_scope == "batch":
            group_ids, num_groups = torch.zeros_like(group_ids), 1
        rows = max_variance_keep(values, group_ids, num_groups, sample_ratio, eligible=has_tokens)
    if token_ratio < 1.0 and entropy is None:
        raise ValueError("D³S's token level needs the old-policy entropy (token keep ratio below 1)")
    keep, kept = top_score_keep(advantages, entropy, response_mask, rows, token_ratio, token_scope, lengths, counts)
    return keep, rows, counts, kept


def current_ratios(options: D3SOptions, step: int, total_steps: int) -> tuple[float, float]:
    steps = options.anneal_steps or total_steps
    return (scheduled_ratio(options.sample_keep_ratio_start, options.sample_keep_ratio_end, step, steps,
                            options.schedule),
            scheduled_ratio(options.token_keep_ratio_start, options.token_keep_ratio_end, step, steps,
                            options.schedule))


def _needs(options: D3SOptions) -> set:
    token_level = options.token_keep_ratio_start < 1.0 or options.token_keep_ratio_end < 1.0
    return {OLD_ENTROPY} if token_level else set()


@algorithm("selection", name="d3s", title="D³S", paper=PAPER,
           summary="Driver-side down-sampling after any estimator: the max-variance rollouts of each group, then the "
                   "tokens with the largest |A|·H, with keep ratios annealed from aggressive to relaxed.",
           selection_options=D3SOptions, selection_needs=_needs)
def d3s_selection(inputs: SelectionInputs, options: D3SOptions):
    sample_ratio, token_ratio = current_ratios(options, inputs.step, inputs.total_steps)
    group_ids = inputs.group_ids.to(inputs.advantages.device)
    num_groups = int(group_ids.max()) + 1 if group_ids.numel() else 0
    keep, rows, counts, kept = d3s_keep(inputs.advantages, inputs.response_mask, inputs.entropy, group_ids,
                                        num_groups, sample_ratio, token_ratio, options.sample_scope,
                                        options.token_scope, inputs.lengths)
    responses = int(torch.count_nonzero(counts))
    tokens = int(counts.double().sum())
    metrics = {
        "d3s/sample_keep_ratio": sample_ratio,
        "d3s/token_keep_ratio": token_ratio,
        "d3s/kept_sample_fraction": int(torch.count_nonzero(rows)) / responses if responses else 1.0,
        "d3s/kept_token_fraction": kept / tokens if tokens else 1.0,
    }
    return keep, metrics
