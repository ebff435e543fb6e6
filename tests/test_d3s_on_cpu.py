"""D³S (arXiv 2509.22115): loop references of the sample level (max-variance subset per group), the token level
(top |A·H| at bfloat16 resolution) and the schedule against the vectorised code on random interleaved groups of
sizes 1..16, a brute-force check of the extremes theorem, hand values, degenerate inputs, the selection glue,
start-up checks, and 2-step CPU runs through the trainer (GRPO + vanilla, and HAPO's estimator and loss)."""

import itertools
import math
import random

import numpy as np
import pytest
import torch
from loss_test_utils import START_UP_OVERRIDES, two_step_run_metrics

from hapo_verl import registry
from hapo_verl.algorithms import d3s
from hapo_verl.algorithms.d3s import D3SOptions, d3s_keep, max_variance_keep, scheduled_ratio, top_score_keep

TIE = 1e-12


# ------------------------------------------------------------------------------------------------ loop references
def keep_count_loop(n, ratio):
    k = math.ceil(ratio * n - 1e-9)
    return min(max(k, min(n, 2)), n)


def variance(values):
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values)


def max_variance_loop(values, groups, ratio, eligible):
    """Per group, rows sorted by (value, row); every j: the j smallest plus the k−j largest; the largest variance,
    the first j within the tie tolerance."""
    keep = [False] * len(values)
    for g in sorted(set(groups)):
        rows = sorted((i for i in range(len(values)) if groups[i] == g and eligible[i]), key=lambda i: (values[i], i))
        n = len(rows)
        if n == 0:
            continue
        k = keep_count_loop(n, ratio)
        subsets = [rows[:j] + rows[n - (k - j):] for j in range(k + 1)]
        variances = [variance([values[i] for i in s]) for s in subsets]
        scale = max(values[i] ** 2 for i in rows)
        best = max(variances)
        chosen = next(s for s, v in zip(subsets, variances) if v >= best - TIE * scale)
        for i in chosen:
            keep[i] = True
    return keep


def key_loop(a, h):
    """The bfloat16 rank key of |a·h|, computed one token at a time."""
    product = np.float32(a) * np.float32(h)
    return int(torch.tensor(float(product), dtype=torch.float32).to(torch.bfloat16).view(torch.int16)) & 0x7FFF


def top_keys_loop(cells, keys, ratio):
    """The kept cells of one pool (the batch, or a row)."""
    n = len(cells)
    if n == 0:
        return set()
    k = min(n, max(1, math.ceil(ratio * n - 1e-9)))
    if ratio >= 1.0 or k >= n or not any(keys[c] > 0 for c in cells):
        return set(cells)
    tau = sorted((keys[c] for c in cells), reverse=True)[k - 1]
    return {c for c in cells if keys[c] >= tau and keys[c] > 0}


def d3s_loop(adv, mask, entropy, groups, sample_ratio, token_ratio, sample_scope="group", token_scope="batch",
             values=None):
    B, L = mask.shape
    adv_l, mask_l, ent_l = adv.tolist(), mask.tolist(), entropy.tolist()
    counts = [sum(1 for t in range(L) if mask_l[i][t]) for i in range(B)]
    # the rows' mean advantages as the code computes them in float32 (test_sequence_advantage checks them against
    # float64 loops): rows whose means differ only by rounding must sort alike here and there
    values = (d3s.sequence_advantage(adv, mask)[0] if values is None else values).tolist()
    eligible = [c > 0 for c in counts]
    if sample_ratio >= 1.0:
        rows = eligible
    else:
        pool = groups if sample_scope == "group" else [0] * B
        rows = max_variance_loop(values, pool, sample_ratio, eligible)
    cells = [(i, t) for i in range(B) if rows[i] for t in range(L) if mask_l[i][t]]
    keys = {(i, t): key_loop(adv_l[i][t], ent_l[i][t]) for i, t in cells}
    if token_scope == "batch":
        kept = top_keys_loop(cells, keys, token_ratio)
    else:
        kept = set()
        for i in range(B):
            kept |= top_keys_loop([c for c in cells if c[0] == i], keys, token_ratio)
    keep = torch.zeros(B, L, dtype=torch.bool)
    for i, t in kept:
        keep[i, t] = True
    return keep, torch.tensor(rows, dtype=torch.bool)


def random_batch(seed, max_len=12):
    """Interleaved groups of sizes 1..16 (shuffled rows), GRPO-like advantages (0/1 rewards, some groups all equal)
    or per-token advantages, prefix masks (some of length 0 or 1) with holes, entropies with zeros and ties."""
    rng = random.Random(seed)
    sizes = [rng.randint(1, 16) for _ in range(rng.randint(1, 6))]
    groups = [g for g, n in enumerate(sizes) for _ in range(n)]
    rng.shuffle(groups)
    B, L = len(groups), rng.randint(1, max_len)
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, L + 1, (B,), generator=gen)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).float()
    if seed % 3 == 0:
        mask = mask * (torch.rand(B, L, generator=gen) > 0.2).float()
    entropy = torch.rand(B, L, generator=gen) * 3
    entropy[torch.rand(B, L, generator=gen) < 0.1] = 0.0
    entropy[torch.rand(B, L, generator=gen) < 0.1] = 0.5
    if seed % 2:
        rewards = torch.randint(0, 2, (B,), generator=gen).float()
        gid = torch.tensor(groups)
        counts = torch.bincount(gid).float()
        mean = torch.zeros(len(sizes)).index_add_(0, gid, rewards) / counts
        adv = (rewards - mean[gid])[:, None] * mask
    else:
        adv = torch.randn(B, L, generator=gen) * (torch.rand(B, 1, generator=gen) + 0.1)
    return adv, mask, entropy, groups


@pytest.mark.parametrize("seed", range(40))
def test_vectorised_selection_equals_the_loop_reference(seed, monkeypatch):
    adv, mask, entropy, groups = random_batch(seed)
    rng = random.Random(seed)
    sample_ratio = rng.choice([0.1, 0.25, 0.5, 0.7, 1.0])
    token_ratio = rng.choice([0.05, 0.3, 0.5, 0.8, 1.0])
    sample_scope, token_scope = rng.choice(["group", "batch"]), rng.choice(["batch", "sequence"])
    gid = torch.tensor(groups)
    lengths = d3s.response_lengths(mask)
    padding = torch.arange(mask.shape[1])[None, :] >= lengths[:, None]
    padded = (adv.masked_fill(padding, 0.0), entropy.masked_fill(padding, 0.0))  # verl's zero padding
    for lengths_given in (False, True):  # from the mask alone, and with verl's lengths and zero padding
        a, h = padded if lengths_given else (adv, entropy)
        values = d3s.sequence_advantage(a, mask, lengths if lengths_given else None)[0]
        expected, expected_rows = d3s_loop(a, mask, h, groups, sample_ratio, token_ratio, sample_scope, token_scope,
                                           values)
        for block in (1 << 22, 7):  # one block, and the streaming passes over many
            monkeypatch.setattr(d3s, "BLOCK_ELEMENTS", block)
            keep, rows, counts, kept = d3s_keep(a, mask, h, gid, max(groups) + 1, sample_ratio, token_ratio,
                                                sample_scope, token_scope, lengths if lengths_given else None)
            assert torch.equal(rows, expected_rows), (seed, block)
            assert torch.equal(keep, expected), (seed, block, (keep != expected).nonzero().tolist())
            assert kept == int(expected.sum()) and torch.equal(counts, mask.sum(-1))
            assert not (keep & (mask == 0)).any()


@pytest.mark.parametrize("seed", range(8))
def test_sequence_advantage_is_the_mean_over_the_response(seed):
    adv, mask, _, _ = random_batch(seed)
    values, counts = d3s.sequence_advantage(adv, mask)
    lengths = d3s.response_lengths(mask)
    padded = adv.masked_fill(torch.arange(mask.shape[1])[None, :] >= lengths[:, None], 0.0)
    with_lengths, counts_with_lengths = d3s.sequence_advantage(padded, mask, lengths)
    assert torch.equal(counts, counts_with_lengths)
    for i in range(mask.shape[0]):
        tokens = [a for a, m in zip(adv[i].tolist(), mask[i].tolist()) if m]
        assert counts[i] == len(tokens)
        assert values[i].item() == pytest.approx(sum(tokens) / len(tokens) if tokens else 0.0, rel=1e-5, abs=1e-6)
        assert with_lengths[i].item() == pytest.approx(values[i].item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("seed", range(12))
def test_the_max_variance_subset_is_the_best_of_all_subsets(seed):
    """PODS's theorem, checked by brute force: no subset of size k has a larger variance than the one chosen."""
    rng = random.Random(seed)
    n = rng.randint(1, 10)
    values = [rng.choice([rng.gauss(0, 1), rng.choice([-1.0, 0.0, 1.0])]) for _ in range(n)]
    ratio = rng.choice([0.2, 0.4, 0.5, 0.8])
    keep = max_variance_keep(torch.tensor(values, dtype=torch.float64), torch.zeros(n, dtype=torch.long), 1, ratio)
    k = keep_count_loop(n, ratio)
    assert int(keep.sum()) == k
    chosen = variance([v for v, kept in zip(values, keep.tolist()) if kept])
    best = max(variance([values[i] for i in s]) for s in itertools.combinations(range(n), k))
    assert chosen == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_sample_level_hand_values():
    # one group of six 0/1 rewards as GRPO advantages ±1, ratio 0.5: k = 3. Rows sorted by (value, row): 1, 3, 5
    # (-1), then 0, 2, 4 (+1). j = 0: rows 0, 2, 4 (variance 0); j = 1: row 1 + rows 2, 4 (8/9); j = 2: rows 1, 3 +
    # row 4 (8/9); j = 3: rows 1, 3, 5 (0). The tie goes to the first j: rows 1, 2, 4.
    values = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    keep = max_variance_keep(values, torch.zeros(6, dtype=torch.long), 1, 0.5)
    assert keep.tolist() == [False, True, True, False, True, False]
    # two interleaved groups: continuous values keep the extremes; a group of 3 keeps at least 2
    values = torch.tensor([0.0, 10.0, 0.4, 11.0, 1.0, 12.0, 0.5, 0.6])
    groups = torch.tensor([0, 1, 0, 1, 0, 1, 0, 0])
    keep = max_variance_keep(values, groups, 2, 0.4)  # group 0: n=5, k=2 → {0.0, 1.0}; group 1: n=3, k=2 → {10, 12}
    assert keep.tolist() == [True, True, False, False, True, True, False, False]
    assert max_variance_keep(values, groups, 2, 1.0).all()
    # an ineligible row (no tokens) is never kept and does not count
    keep = max_variance_keep(values, groups, 2, 0.4, eligible=torch.tensor([False] + [True] * 7))
    assert keep.tolist() == [False, True, True, False, True, True, False, False]  # group 0 of 4: k=2 → {0.4, 1.0}


def test_token_level_hand_values():
    # two rows of 4 tokens, |A| = 1 and 2; entropies chosen exact in bfloat16: scores row 0: 1, 0.5, 0, 0.25;
    # row 1: 2, 0 (masked out: 4), 1, 0.5. Candidates: 7 tokens; ratio 0.5 → k = 4: 2, 1, 1, 0.5, 0.5 (ties at 0.5)
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0], [-2.0, 2.0, 2.0, 2.0]])
    entropy = torch.tensor([[1.0, 0.5, 0.0, 0.25], [1.0, 2.0, 0.5, 0.25]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 1.0]])
    keep, kept = top_score_keep(adv, entropy, mask, torch.tensor([True, True]), 0.5)
    assert keep.tolist() == [[True, True, False, False], [True, False, True, True]] and kept == 5
    # ratio 0.8 → k = 6: the 6 positive scores, never the zero-entropy token; ratio 0.9 → k = 7 = N: everything
    keep, kept = top_score_keep(adv, entropy, mask, torch.tensor([True, True]), 0.8)
    assert keep.tolist() == [[True, True, False, True], [True, False, True, True]] and kept == 6
    keep, kept = top_score_keep(adv, entropy, mask, torch.tensor([True, True]), 0.9)
    assert keep.tolist() == [[True, True, True, True], [True, False, True, True]] and kept == 7
    keep, kept = top_score_keep(adv, entropy, mask, torch.tensor([True, True]), 0.8)
    assert keep.tolist() == [[True, True, False, True], [True, False, True, True]] and kept == 6
    # ratio 1 keeps every candidate; a dropped row keeps nothing
    keep, _ = top_score_keep(adv, entropy, mask, torch.tensor([False, True]), 1.0)
    assert keep.tolist() == [[False] * 4, [True, False, True, True]]
    # per sequence, ratio 0.5: row 0 keeps ⌈2⌉ = {1, 0.5}; row 1 keeps ⌈1.5⌉ = 2 → {2, 1}
    keep, _ = top_score_keep(adv, entropy, mask, torch.tensor([True, True]), 0.5, scope="sequence")
    assert keep.tolist() == [[True, True, False, False], [True, False, True, False]]


def test_schedule_hand_values():
    assert scheduled_ratio(0.5, 1.0, 1, 11) == 0.5
    assert scheduled_ratio(0.5, 1.0, 6, 11) == pytest.approx(0.75)
    assert scheduled_ratio(0.5, 1.0, 11, 11) == 1.0 and scheduled_ratio(0.5, 1.0, 50, 11) == 1.0
    assert scheduled_ratio(0.5, 1.0, 6, 11, "cosine") == pytest.approx(0.75)
    assert scheduled_ratio(0.5, 1.0, 3, 11, "cosine") == pytest.approx(0.5 + 0.5 * (1 - math.cos(math.pi * 0.2)) / 2)
    assert scheduled_ratio(0.5, 1.0, 9, 11, "constant") == 0.5
    assert scheduled_ratio(0.5, 1.0, 1, 1) == 0.5  # one step: the start value
    for step in range(1, 30):  # monotone from aggressive to relaxed
        assert scheduled_ratio(0.3, 0.9, step, 20) <= scheduled_ratio(0.3, 0.9, step + 1, 20)


# ------------------------------------------------------------------------------------------------ degenerate inputs
def _select(adv, mask, entropy, groups, step=1, total=10, **options):
    spec = registry.get("d3s")
    opts = D3SOptions(enable=True, **options)
    inputs = registry.SelectionInputs(advantages=adv, response_mask=mask,
                                      group_ids=torch.tensor(groups, dtype=torch.long),
                                      entropy=entropy, step=step, total_steps=total)
    return spec.selection(inputs, opts)


DEGENERATE = {
    "singletons": (torch.tensor([[1.0, -1.0, 0.5], [0.3, 0.3, 0.3], [-2.0, 0.0, 1.0]]), torch.ones(3, 3), [0, 1, 2]),
    "all equal rewards": (torch.zeros(4, 3), torch.ones(4, 3), [0, 1, 1, 0]),
    "length 1": (torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [0.5, 0, 0], [-0.5, 0, 0]]),
                 torch.tensor([[1.0, 0, 0]] * 4), [0, 0, 1, 1]),
    "all padding": (torch.zeros(4, 3), torch.zeros(4, 3), [0, 0, 1, 1]),
    "some padding rows": (torch.tensor([[1.0] * 3, [0.0] * 3, [-1.0] * 3, [0.0] * 3]),
                          torch.tensor([[1.0] * 3, [0.0] * 3] * 2), [0, 0, 0, 0]),
    "empty batch": (torch.zeros(0, 3), torch.zeros(0, 3), []),
}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
@pytest.mark.parametrize("entropy_kind", ["zero", "constant", "random"])
@pytest.mark.parametrize("scopes", [("group", "batch"), ("batch", "sequence")])
def test_degenerate_inputs_give_finite_output(case, entropy_kind, scopes):
    adv, mask, groups = DEGENERATE[case]
    entropy = {"zero": torch.zeros_like(mask), "constant": torch.full_like(mask, 0.7),
               "random": torch.rand(mask.shape, generator=torch.Generator().manual_seed(0)) * 3}[entropy_kind]
    for step in (1, 5, 10):
        keep, metrics = _select(adv, mask, entropy, groups, step=step, sample_scope=scopes[0], token_scope=scopes[1])
        assert keep.dtype == torch.bool and keep.shape == mask.shape
        assert not (keep & (mask == 0)).any()
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        assert 0.0 <= metrics["d3s/kept_token_fraction"] <= 1.0 and 0.0 <= metrics["d3s/kept_sample_fraction"] <= 1.0
        has_tokens = mask.sum(-1) > 0
        if has_tokens.any():
            assert keep.any()  # never an update over no token
        if step == 10:  # the end of the schedule: every token
            assert torch.equal(keep, mask.bool())


def test_zero_scores_keep_every_candidate_and_singletons_are_kept():
    adv, mask, groups = DEGENERATE["all equal rewards"]
    keep, metrics = _select(adv, mask, torch.rand(4, 3), groups)
    # half of each group of two is still two rows (a variance needs two); every score is 0: all their tokens stay
    assert keep.all() and metrics["d3s/kept_sample_fraction"] == 1.0 and metrics["d3s/kept_token_fraction"] == 1.0
    adv, mask, groups = DEGENERATE["singletons"]
    keep, metrics = _select(adv, mask, torch.ones(3, 3), groups)
    assert metrics["d3s/kept_sample_fraction"] == 1.0 and metrics["d3s/kept_token_fraction"] < 1.0


def test_metrics_name_the_ratios_and_fractions():
    adv, mask, entropy, groups = random_batch(3)
    keep, metrics = _select(adv, mask, entropy, groups, step=1, total=5)
    assert set(metrics) == {"d3s/sample_keep_ratio", "d3s/token_keep_ratio", "d3s/kept_sample_fraction",
                            "d3s/kept_token_fraction"}
    assert metrics["d3s/sample_keep_ratio"] == 0.5 and metrics["d3s/token_keep_ratio"] == 0.5
    assert metrics["d3s/kept_token_fraction"] == pytest.approx(float(keep.sum() / mask.sum()))
    _, metrics = _select(adv, mask, entropy, groups, step=3, total=5, anneal_steps=0)
    assert metrics["d3s/sample_keep_ratio"] == 0.75
    _, metrics = _select(adv, mask, entropy, groups, step=3, total=5, anneal_steps=2)
    assert metrics["d3s/sample_keep_ratio"] == 1.0


def test_the_token_level_needs_the_entropy_only_below_ratio_one():
    spec = registry.get("d3s")
    assert spec.needs_of_selection(D3SOptions()) == {registry.OLD_ENTROPY}
    assert spec.needs_of_selection(D3SOptions(token_keep_ratio_start=1.0, token_keep_ratio_end=1.0)) == set()
    adv, mask, _, groups = random_batch(5)
    keep, _ = _select(adv, mask, None, groups, token_keep_ratio_start=1.0, token_keep_ratio_end=1.0)
    assert not (keep & (mask == 0)).any()
    with pytest.raises(ValueError, match="entropy"):
        _select(adv, mask, None, groups)


# ------------------------------------------------------------------------------------------------ the glue
def test_the_glue_runs_the_enabled_steps_with_what_they_need():
    from omegaconf import OmegaConf

    from hapo_verl.integration import selection

    assert selection.enabled_selections(OmegaConf.create({"adv_estimator": "grpo"})) == []
    assert selection.enabled_selections(OmegaConf.create({"d3s": {"enable": False}})) == []
    chosen = selection.enabled_selections(OmegaConf.create({"d3s": {"enable": True, "token_scope": "sequence"}}))
    assert [spec.name for spec, _ in chosen] == ["d3s"] and chosen[0][1].token_scope == "sequence"
    assert selection.selection_needs(chosen) == {registry.OLD_ENTROPY}
    with pytest.raises(ValueError, match=r"unknown option algorithm\.d3s\.ratio\b"):
        selection.enabled_selections(OmegaConf.create({"d3s": {"enable": False, "ratio": 0.5}}))
    adv, mask, entropy, groups = random_batch(7)
    with pytest.raises(RuntimeError, match="old entropy"):
        selection.run_selections(chosen, adv, mask, torch.tensor(groups))
    keep, metrics = selection.run_selections(chosen, adv, mask, torch.tensor(groups), {"entropy": entropy},
                                             step=1, total_steps=4)
    expected, _ = d3s_loop(adv, mask, entropy, groups, 0.5, 0.5, "group", "sequence")
    assert torch.equal(keep, expected) and metrics["d3s/token_keep_ratio"] == 0.5
    assert selection.run_selections([], adv, mask, torch.tensor(groups)) == (None, {})


def test_the_update_sees_the_kept_tokens_and_the_metrics_the_original_mask(monkeypatch):
    """selected_for_update against a TransferQueue stand-in holding verl's nested fields: inside the block the
    batch's response_mask is the kept tokens (same row lengths), after it the original mask again."""
    import sys
    import types

    from omegaconf import OmegaConf
    from tensordict import NonTensorData, NonTensorStack, TensorDict

    from hapo_verl.integration import selection

    adv, mask, entropy, groups = random_batch(11)
    lengths = d3s.response_lengths(mask).tolist()
    nested = lambda x, dtype: torch.nested.as_nested_tensor(  # noqa: E731
        [x[i, :n].to(dtype) for i, n in enumerate(lengths)], layout=torch.jagged)
    store = {"uid": NonTensorStack(*[NonTensorData(f"u{g}") for g in groups]),
             "response_mask": nested(mask, torch.int64), "advantages": nested(adv, torch.float32)}
    original = store["response_mask"]
    seen = []

    def kv_batch_get(keys, partition_id, select_fields):
        return TensorDict({f: store[f] for f in select_fields}, batch_size=len(keys))

    def kv_batch_put(keys, partition_id, fields):
        store.update(dict(fields.items()))

    monkeypatch.setitem(sys.modules, "transfer_queue", types.SimpleNamespace(kv_batch_get=kv_batch_get,
                                                                             kv_batch_put=kv_batch_put))
    batch = types.SimpleNamespace(keys=list(range(len(groups))), partition_id="train")
    chosen = selection.enabled_selections(OmegaConf.create({"d3s": {"enable": True}}))
    width = max(lengths) if lengths else 0
    padding = torch.arange(width)[None, :] >= torch.tensor(lengths)[:, None]
    adv, mask = adv[:, :width].masked_fill(padding, 0.0), mask[:, :width]
    old = {"entropy": entropy[:, :width].masked_fill(padding, 0.0)}  # zero-padded, as fetch_old_policy's
    metrics = {}
    with selection.selected_for_update(batch, chosen, old, 1, 3, metrics):
        inside = store["response_mask"]
        seen.append(inside)
    assert store["response_mask"] is original
    assert torch.equal(inside.offsets(), original.offsets()) and inside.dtype == original.dtype
    values = d3s.sequence_advantage(adv, mask, torch.tensor(lengths))[0]
    expected, _ = d3s_loop(adv, mask, old["entropy"], groups, 0.5, 0.5, values=values)
    kept = torch.nested.as_nested_tensor([expected[i, :n].long() for i, n in enumerate(lengths)],
                                         layout=torch.jagged)
    assert torch.equal(inside.values(), kept.values())
    assert metrics["d3s/kept_token_fraction"] == pytest.approx(float(expected.sum() / mask.sum()))
    with selection.selected_for_update(batch, [], old, 1, 3, metrics):  # no step: nothing is touched
        assert store["response_mask"] is original


def test_a_selection_spec_must_have_an_enable_switch():
    from dataclasses import dataclass

    @dataclass
    class NoSwitch:
        ratio: float = registry.option(0.5, "a ratio")

    with pytest.raises(ValueError, match="'enable' defaulting to false"):
        registry.register_algorithm(name="no_switch_selection", title="X", paper="", summary="",
                                    selection=lambda inputs, options: None, selection_options=NoSwitch,
                                    module="somebody.else")
    assert registry.get("no_switch_selection") is None


# ------------------------------------------------------------------------------------------------ configuration
BASE = START_UP_OVERRIDES


@pytest.mark.parametrize("key,value,match", [
    ("ratio", 0.5, r"unknown option algorithm\.d3s\.ratio\b"),
    ("sample_keep_ratio_start", 0, r"algorithm\.d3s\.sample_keep_ratio_start must be in \(0, 1\], got 0"),
    ("token_keep_ratio_end", 1.5, r"algorithm\.d3s\.token_keep_ratio_end must be in \(0, 1\], got 1\.5"),
    ("schedule", "exponential", r"algorithm\.d3s\.schedule must be one of linear, cosine, constant"),
    ("anneal_steps", -1, r"algorithm\.d3s\.anneal_steps must be in \[0, inf\)"),
    ("anneal_steps", 2.5, r"algorithm\.d3s\.anneal_steps must be an integer"),
    ("enable", 1, r"algorithm\.d3s\.enable must be true or false"),
    ("sample_scope", "prompt", r"algorithm\.d3s\.sample_scope must be one of group, batch"),
])
def test_bad_options_are_rejected_at_start_up_naming_the_key(key, value, match):
    from hapo_verl.launcher import compose, prepare_config

    with pytest.raises(ValueError, match=match):
        prepare_config(compose("d3s", BASE + [f"++algorithm.d3s.{key}={value}"]))
    with pytest.raises(ValueError, match=match):  # also when the step is off, in another config
        prepare_config(compose("hapo", BASE + [f"++algorithm.d3s.{key}={value}"]))


def test_composes_with_any_estimator_and_loss():
    """The step plan runs D³S after HAPO's estimator with HAPO's loss and adaptive temperature, after GTPO's
    estimator, and before verl's own clip_cov loss; the old-policy entropy is fetched once for all of them."""
    from hapo_verl.launcher import compose, prepare_config
    from hapo_verl.trainer.hapo_trainer import StepPlan

    for config, extra in (("hapo", []), ("gtpo", []), ("clip_cov", []), ("dapo", []),
                          ("d3s", ["actor_rollout_ref.actor.policy_loss.loss_mode=hapo"])):
        cfg = compose(config, BASE + extra + ["++algorithm.d3s.enable=true"])
        prepare_config(cfg)
        plan = StepPlan.from_config(cfg)
        assert [spec.name for spec, _ in plan.selections] == ["d3s"] and plan.needs_old_policy, config
    plan = StepPlan.from_config(compose("d3s", BASE + ["algorithm.d3s.token_keep_ratio_start=1.0"]))
    assert plan.selections and not plan.needs_old_policy  # the sample level alone needs nothing from the old policy
    plan = StepPlan.from_config(compose("d3s", BASE + ["algorithm.d3s.enable=false"]))
    assert plan.selections == []
    with pytest.raises(ValueError, match="bypass_mode"):
        prepare_config(compose("d3s", BASE + ["algorithm.rollout_correction.bypass_mode=true"]))


# ------------------------------------------------------------------------------------------------ through the trainer
@pytest.mark.parametrize("config,overrides", [("d3s", ()), ("hapo", ("+algorithm.d3s.enable=true",))])
def test_two_step_cpu_run_through_the_trainer(config, overrides, tmp_path):
    """GRPO + verl's vanilla loss + D³S, and HAPO's estimator, loss and adaptive temperature + D³S
    (``hapo-verl tiny --config hapo +algorithm.d3s.enable=true``)."""
    metrics = two_step_run_metrics(config, tmp_path, overrides)
    for step, ratio in ((1, 0.5), (2, 1.0)):  # 2 steps: the schedule goes from the start to the end values
        data = metrics[step]
        for key in ("d3s/kept_sample_fraction", "d3s/kept_token_fraction", "d3s/sample_keep_ratio",
                    "d3s/token_keep_ratio", "actor/pg_loss", "critic/advantages/mean"):
            assert key in data and math.isfinite(float(data[key])), (step, key, sorted(data))
        assert data["d3s/sample_keep_ratio"] == ratio and data["d3s/token_keep_ratio"] == ratio
        assert 0.0 < data["d3s/kept_token_fraction"] <= 1.0 and 0.0 < data["d3s/kept_sample_fraction"] <= 1.0
    assert metrics[2]["d3s/kept_token_fraction"] == 1.0 and metrics[2]["d3s/kept_sample_fraction"] == 1.0
    if config == "hapo":
        assert "hapo/h_hat/mean" in metrics[1] and "hapo/rollout/requests_with_stats" in metrics[2]
