"""GTPO and GRPO-S (arXiv 2508.04349): loop references written from the paper's equations against the vectorised
estimators, hand values, degenerate inputs, GRPO-S with β₂ = 0 against verl's GRPO, start-up checks, composition
with HAPO's adaptive temperature, and 2-step CPU runs through the trainer."""

import math
import random

import numpy as np
import pytest
import torch
from loss_test_utils import START_UP_OVERRIDES, grpo_loop, random_group_batch, two_step_run_metrics

from hapo_verl.algorithms.grpo_s import grpo_s_shaped_rewards, response_mean_entropy
from hapo_verl.algorithms.gtpo import gtpo_advantage
from hapo_verl.algorithms.groups import grpo_sequence_advantage
from hapo_verl.integration.estimator import LAST_METRICS, EstimatorNeedsTrainerError, estimator_inputs


# ------------------------------------------------------------------------------------------------ loop references
def gtpo_loop(scores, mask, entropy, groups, *, alpha1=1.0, alpha2=0.1, normalization="separate",
              base_reward="paper", threshold=0.0, eps=1e-6):
    """Eq. 2-4 of arXiv 2508.04349 (v5), one token at a time, in float64 Python."""
    B, L = mask.shape
    scores, mask, entropy = scores.tolist(), mask.tolist(), entropy.tolist()
    correct = [s > threshold for s in scores]
    shaped = [[None] * L for _ in range(B)]
    for g in set(groups):
        rows = [i for i in range(B) if groups[i] == g]
        for t in range(L):
            pos = [i for i in rows if correct[i] and mask[i][t]]
            neg = [i for i in rows if not correct[i] and mask[i][t]]
            for i in pos:  # Eq. 2
                base = alpha1 * scores[i]
                shaped[i][t] = base + alpha2 * (entropy[i][t] + eps) / sum(entropy[k][t] + eps for k in pos) * len(pos)
            for j in neg:  # Eq. 3
                base = alpha1 * scores[j] if base_reward == "score" else -alpha1
                inv = 1.0 / (entropy[j][t] + eps)
                shaped[j][t] = base - alpha2 * inv / sum(1.0 / (entropy[k][t] + eps) for k in neg) * len(neg)
    sets = [True, False] if normalization == "separate" else [None]
    out = [[0.0] * L for _ in range(B)]
    for which in sets:  # Eq. 4 (or all tokens together)
        cells = [(i, t) for i in range(B) for t in range(L)
                 if shaped[i][t] is not None and (which is None or correct[i] == which)]
        if not cells:
            continue
        values = [shaped[i][t] for i, t in cells]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        for i, t in cells:
            out[i][t] = (shaped[i][t] - mean) / (std + eps)
    return torch.tensor(out, dtype=torch.float64)


def grpo_s_loop(scores, mask, entropy, groups, *, beta1=1.0, beta2=0.1, base_reward="paper", threshold=0.0,
                eps=1e-6, norm_by_std=True):
    """Eq. 6 of arXiv 2508.04349 (v5) and GRPO's normalisation within each group (verl's conventions: unbiased std,
    a group of one has mean 0 and std 1), one response at a time."""
    B = len(scores)
    scores, mask, entropy = scores.tolist(), mask.tolist(), entropy.tolist()
    mean_h = [sum(h * m for h, m in zip(entropy[i], mask[i])) / max(1.0, sum(mask[i])) for i in range(B)]
    correct = [s > threshold for s in scores]
    shaped = [0.0] * B
    for g in set(groups):
        rows = [i for i in range(B) if groups[i] == g]
        pos = [i for i in rows if correct[i]]
        neg = [i for i in rows if not correct[i]]
        for i in pos:
            shaped[i] = beta1 * scores[i] + beta2 * (mean_h[i] + eps) / sum(mean_h[k] + eps for k in pos) * len(pos)
        for j in neg:
            base = beta1 * scores[j] if base_reward == "score" else -beta1
            inv = 1.0 / (mean_h[j] + eps)
            shaped[j] = base - beta2 * inv / sum(1.0 / (mean_h[k] + eps) for k in neg) * len(neg)
    adv = grpo_loop(shaped, groups, eps=eps, norm_by_std=norm_by_std)
    return torch.tensor([[a * m for m in mask[i]] for i, a in enumerate(adv)], dtype=torch.float64)


@pytest.mark.parametrize("seed", range(24))
def test_gtpo_vectorised_equals_the_loop_reference(seed):
    scores, mask, entropy, groups = random_group_batch(seed)
    rng = random.Random(seed)
    kw = dict(alpha1=rng.choice([1.0, 0.9]), alpha2=rng.choice([0.1, 0.2, 0.0]),
              normalization=rng.choice(["separate", "joint"]), base_reward=rng.choice(["paper", "score"]))
    expected = gtpo_loop(scores, mask, entropy, groups, **kw)
    for block_rows in (None, 1, 3):  # one block, and the streaming passes over several
        got, _ = gtpo_advantage(scores, mask, entropy, torch.tensor(groups), block_rows=block_rows, **kw)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), expected, rtol=2e-4, atol=2e-4)
        assert (got[mask == 0] == 0).all()


@pytest.mark.parametrize("seed", range(24))
def test_grpo_s_vectorised_equals_the_loop_reference(seed):
    scores, mask, entropy, groups = random_group_batch(seed)
    rng = random.Random(seed)
    kw = dict(beta1=rng.choice([1.0, 0.9]), beta2=rng.choice([0.1, 0.2, 0.0]),
              base_reward=rng.choice(["paper", "score"]))
    norm = rng.choice([True, False])
    expected = grpo_s_loop(scores, mask, entropy, groups, norm_by_std=norm, **kw)
    estimator = _estimator("grpo_s")
    uid = np.array([f"u{g}" for g in groups], dtype=object)
    with estimator_inputs(entropy=entropy):
        got, _ = estimator(scores[:, None] * torch.nn.functional.one_hot(torch.zeros(len(groups), dtype=torch.long),
                                                                          mask.shape[1]).float(),
                           mask, index=uid, config={"grpo_s": {**kw, "norm_adv_by_std": norm}})
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def equal_size_batch(seed, size, layout):
    """A random_group_batch regrouped into groups of ``size`` rows: consecutive blocks in a shuffled group order
    (``contiguous``, verl's rollout layout) or rows shuffled over the batch (``interleaved``, after balance_batch)."""
    scores, mask, entropy, _ = random_group_batch(seed)
    rows = len(scores) - len(scores) % size
    if rows == 0:
        scores, mask, entropy = scores.repeat(size), mask.repeat(size, 1), entropy.repeat(size, 1)
        rows = size
    scores, mask, entropy = scores[:rows], mask[:rows], entropy[:rows]
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randperm(rows // size, generator=g).repeat_interleave(size)
    groups = blocks if layout == "contiguous" else blocks[torch.randperm(rows, generator=g)]
    return scores, mask, entropy, groups


def test_equal_size_groups_detects_the_layout():
    from hapo_verl.algorithms.groups import equal_size_groups

    assert equal_size_groups(torch.tensor([2, 2, 0, 0, 1, 1]), 3) == (2, None)  # blocks, in any group order
    size, order = equal_size_groups(torch.tensor([1, 0, 2, 0, 1, 2]), 3)
    assert size == 2 and order.tolist() == [1, 3, 0, 4, 2, 5]
    assert equal_size_groups(torch.tensor([0, 0, 0, 1, 1, 2]), 3) is None  # sizes 3, 2, 1
    assert equal_size_groups(torch.tensor([0, 1, 1, 0]), 2)[1] is not None  # equal sizes, not consecutive
    assert equal_size_groups(torch.tensor([0, 0, 1]), 2) is None
    assert equal_size_groups(torch.tensor([0, 1, 2]), 3) == (1, None)
    for seed in range(6):
        groups = torch.randperm(60, generator=torch.Generator().manual_seed(seed)) % 12
        size, order = equal_size_groups(groups, 12)
        blocks = groups[order].view(12, size)
        assert size == 5 and (blocks == blocks[:, :1]).all() and sorted(blocks[:, 0].tolist()) == list(range(12))


@pytest.mark.parametrize("layout", ["contiguous", "interleaved"])
@pytest.mark.parametrize("seed", range(10))
def test_gtpo_grouped_path_equals_the_loop_and_the_general_path(seed, layout, monkeypatch):
    import hapo_verl.algorithms.gtpo as gtpo

    size = [1, 2, 3, 4, 8, 16][seed % 6]
    scores, mask, entropy, groups = equal_size_batch(seed, size, layout)
    rng = random.Random(seed)
    kw = dict(alpha1=rng.choice([1.0, 0.9]), alpha2=rng.choice([0.1, 0.2, 0.0]),
              normalization=rng.choice(["separate", "joint"]), base_reward=rng.choice(["paper", "score"]))
    general, general_stats = gtpo_advantage(scores, mask, entropy, groups, grouped=False, **kw)
    expected = gtpo_loop(scores, mask, entropy, groups.tolist(), **kw)

    def no_scatter(*args, **kwargs):
        raise AssertionError("equal-size groups took the scatter path")

    monkeypatch.setattr(gtpo, "_factors_scatter", no_scatter)
    for block_rows in (None, 1, 2 * size + 1):  # one block; one group per block; blocks of two groups
        got, stats = gtpo_advantage(scores, mask, entropy, groups, block_rows=block_rows, **kw)
        torch.testing.assert_close(got.double(), expected, rtol=2e-4, atol=2e-4)
        torch.testing.assert_close(got, general, rtol=1e-5, atol=1e-5)
        assert stats.keys() == general_stats.keys()
        for key in stats:
            assert stats[key] == pytest.approx(general_stats[key], rel=1e-6, abs=1e-9), key
        assert (got[mask == 0] == 0).all()


@pytest.mark.parametrize("seed", range(6))
def test_gtpo_cache_sized_chunks_do_not_change_the_result(seed, monkeypatch):
    """The passes and the float64 cell arithmetic run over chunks of BLOCK_ELEMENTS: chunks of one cell or one group
    (several chunks even on these small batches) give the advantages of one chunk, and both agree with the loop."""
    import hapo_verl.algorithms.gtpo as gtpo

    size = [2, 3, 4, 8, 16, 5][seed]
    for scores, mask, entropy, groups in (random_group_batch(seed), equal_size_batch(seed, size, "interleaved")):
        gid = torch.as_tensor(groups)
        expected = gtpo_loop(scores, mask, entropy, gid.tolist())
        for grouped in (True, False):
            whole, whole_stats = gtpo_advantage(scores, mask, entropy, gid, grouped=grouped)
            with monkeypatch.context() as m:
                m.setattr(gtpo, "BLOCK_ELEMENTS", 1)  # one row (one group) per block, one cell per chunk
                chunked, chunked_stats = gtpo_advantage(scores, mask, entropy, gid, grouped=grouped)
            torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(chunked.double(), expected, rtol=2e-4, atol=2e-4)
            for key in whole_stats:
                assert chunked_stats[key] == pytest.approx(whole_stats[key], rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("grouped", [True, False])
def test_gtpo_blocks_on_python_threads_equal_one_thread(grouped, monkeypatch):
    """With several torch threads the blocks run on Python threads (single-threaded ops): the same advantages, bit
    for bit, as one thread; under the caller's inference mode too; the caller's torch thread count comes back."""
    import hapo_verl.algorithms.gtpo as gtpo

    monkeypatch.setattr(gtpo, "BLOCK_ELEMENTS", 64 * 16)  # 16 rows of 64 tokens per block: many blocks
    g = torch.Generator().manual_seed(0)
    rows, length = 16 * 24, 64
    scores = torch.randint(0, 2, (rows,), generator=g).float()
    mask = (torch.arange(length)[None, :] < torch.randint(0, length + 1, (rows, 1), generator=g)).float()
    entropy = torch.rand(rows, length, generator=g) * 3
    groups = torch.randperm(rows, generator=g) % 24
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial, serial_stats = gtpo_advantage(scores, mask, entropy, groups, grouped=grouped)
        torch.set_num_threads(3)
        threaded, threaded_stats = gtpo_advantage(scores, mask, entropy, groups, grouped=grouped)
        assert torch.get_num_threads() == 3
        with torch.inference_mode():  # per-thread mode: the workers write into the caller's inference tensors
            inference, _ = gtpo_advantage(scores, mask, entropy, groups, grouped=grouped)
        assert inference.is_inference() and torch.get_num_threads() == 3
        monkeypatch.setattr(gtpo, "BLOCK_THREADS", 2)
        torch.set_num_threads(5)  # 2 Python threads with 2 torch threads each
        shared, _ = gtpo_advantage(scores, mask, entropy, groups, grouped=grouped)
        assert torch.get_num_threads() == 5
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(threaded, serial) and torch.equal(inference, serial) and threaded_stats == serial_stats
    assert torch.equal(shared, serial)
    expected = gtpo_loop(scores, mask, entropy, groups.tolist())
    torch.testing.assert_close(threaded.double(), expected, rtol=2e-4, atol=2e-4)


def test_gtpo_grouped_path_on_degenerate_inputs(monkeypatch):
    import hapo_verl.algorithms.gtpo as gtpo

    L = 4
    cases = {
        "singletons": (torch.tensor([1.0, 0.0, 1.0]), torch.ones(3, L), [0, 1, 2]),
        "all equal rewards": (torch.ones(4), torch.ones(4, L), [0, 1, 1, 0]),
        "all wrong": (torch.zeros(4), torch.ones(4, L), [1, 1, 0, 0]),
        "length 1": (torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([[1.0, 0, 0, 0]] * 4), [0, 1, 0, 1]),
        "all padding": (torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.zeros(4, L), [0, 0, 1, 1]),
        "some padding rows": (torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([[1.0] * L, [0.0] * L] * 2),
                              [0, 1, 1, 0]),
    }
    for case, (scores, mask, groups) in cases.items():
        for entropy in (torch.zeros_like(mask), torch.full_like(mask, 0.7), torch.rand(mask.shape) * 5):
            gid = torch.tensor(groups)
            general, _ = gtpo_advantage(scores, mask, entropy, gid, grouped=False)
            with monkeypatch.context() as m:
                m.setattr(gtpo, "_factors_scatter", None)  # the grouped path must not need it
                got, _ = gtpo_advantage(scores, mask, entropy, gid)
            assert torch.isfinite(got).all() and (got[mask == 0] == 0).all(), case
            # (not against the loop: with zero entropy, 1/ε = 1e6 makes float32 rounding visible; the general path
            # rounds alike)
            torch.testing.assert_close(got, general, rtol=1e-6, atol=1e-6)


def test_gtpo_hand_values():
    # one group: two correct responses with H = [3, 1] and [1, 3], one wrong response (alone in O⁻)
    scores = torch.tensor([1.0, 1.0, 0.0])
    mask = torch.ones(3, 2)
    entropy = torch.tensor([[3.0, 1.0], [1.0, 3.0], [2.0, 2.0]])
    # Eq. 2: r̃⁺ = 1 + 0.1 · H / 4 · 2 -> 1.15 (H = 3) and 1.05 (H = 1); Eq. 4 over those four tokens:
    # mean 1.1, unbiased std sqrt(4 · 0.05² / 3); the wrong response's tokens are all -1.1: advantage 0
    a = 0.05 / math.sqrt(4 * 0.05 ** 2 / 3)
    got, stats = gtpo_advantage(scores, mask, entropy, torch.zeros(3, dtype=torch.long), epsilon=1e-12)
    torch.testing.assert_close(got, torch.tensor([[a, -a], [-a, a], [0.0, 0.0]]), rtol=1e-5, atol=1e-6)
    assert stats["std_wrong"] == 0.0 and stats["correct_token_fraction"] == pytest.approx(4 / 6)
    # joint: the six tokens together (1.15, 1.05, 1.05, 1.15, -1.1, -1.1)
    vals = torch.tensor([1.15, 1.05, 1.05, 1.15, -1.1, -1.1], dtype=torch.float64)
    want = ((vals - vals.mean()) / vals.std()).reshape(3, 2).float()
    got, _ = gtpo_advantage(scores, mask, entropy, torch.zeros(3, dtype=torch.long), normalization="joint",
                            epsilon=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # a response active alone at t gets the whole entropy share: d_t = 1, weight 1
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    ref = gtpo_loop(scores, mask, entropy, [0, 0, 0], eps=1e-12)
    got, _ = gtpo_advantage(scores, mask, entropy, torch.zeros(3, dtype=torch.long), epsilon=1e-12)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_inverse_entropy_blames_confident_wrong_tokens_more():
    scores = torch.tensor([0.0, 0.0, 1.0, 1.0])
    mask = torch.ones(4, 1)
    entropy = torch.tensor([[0.1], [2.0], [0.1], [2.0]])
    got, _ = gtpo_advantage(scores, mask, entropy, torch.zeros(4, dtype=torch.long))
    assert got[0, 0] < got[1, 0]  # the confident mistake gets the lower advantage
    assert got[3, 0] > got[2, 0]  # the uncertain correct token gets the higher advantage


def test_alpha2_zero_leaves_only_the_base_reward():
    scores, mask, entropy, groups = random_group_batch(3)
    gid = torch.tensor(groups)
    # Eq. 4 as written: every correct token has reward α₁, every wrong one -α₁; each set is constant -> 0
    got, _ = gtpo_advantage(scores, mask, entropy, gid, alpha2=0.0)
    assert (got == 0).all()
    # joint: ±α₁ whitened over all tokens of the batch
    got, _ = gtpo_advantage(scores, mask, entropy, gid, alpha2=0.0, normalization="joint")
    r = torch.where(scores > 0, 1.0, -1.0)[:, None].expand_as(mask).double()
    valid = mask.bool()
    want = torch.zeros_like(r)
    want[valid] = (r[valid] - r[valid].mean()) / (r[valid].std() + 1e-6)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rewards", ["binary", "plus_minus_one"])
def test_grpo_s_with_beta2_zero_is_verl_grpo(rewards):
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    for seed in range(6):
        scores, mask, entropy, groups = random_group_batch(seed, holes=False)
        if rewards == "binary":
            scores = (scores > 0).float()
            # verl gives a group of one its raw score, GRPO-S β₁·(−1) for a wrong one: compare groups of 2..16
            keep = [i for i, g in enumerate(groups) if groups.count(g) > 1]
            scores, mask, entropy, groups = scores[keep], mask[keep], entropy[keep], [groups[i] for i in keep]
            if not groups:
                continue
        else:
            scores = torch.where(scores > 0, 1.0, -1.0)
        tlr = torch.zeros_like(mask)
        tlr[:, 0] = scores
        uid = np.array([f"u{g}" for g in groups], dtype=object)
        want, _ = compute_grpo_outcome_advantage(tlr, mask, uid)
        with estimator_inputs(entropy=entropy):
            got, _ = _estimator("grpo_s")(tlr, mask, index=uid, config={"grpo_s": {"beta2": 0.0}})
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with estimator_inputs(entropy=entropy):  # the entropy term on: no longer GRPO
            got, _ = _estimator("grpo_s")(tlr, mask, index=uid, config={"grpo_s": {"beta2": 0.5}})
        assert not torch.allclose(got, want, atol=1e-3)


@pytest.mark.parametrize("name", ["gtpo", "grpo_s"])
def test_degenerate_inputs_give_finite_advantages(name):
    estimator = _estimator(name)
    L = 4
    cases = {
        "singletons": (torch.tensor([1.0, 0.0, 1.0]), torch.ones(3, L), ["a", "b", "c"]),
        "all equal rewards": (torch.ones(4), torch.ones(4, L), ["a"] * 4),
        "all wrong": (torch.zeros(4), torch.ones(4, L), ["a"] * 4),
        "length 1": (torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([[1.0, 0, 0, 0]] * 4), ["a", "a", "b", "b"]),
        "all padding": (torch.tensor([1.0, 0.0, 1.0]), torch.zeros(3, L), ["a", "a", "b"]),
        "some padding rows": (torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([[1.0] * L, [0.0] * L] * 2),
                              ["a", "a", "a", "a"]),
    }
    for case, (scores, mask, uid) in cases.items():
        tlr = torch.zeros_like(mask)
        tlr[:, 0] = scores
        for entropy in (torch.zeros_like(mask), torch.full_like(mask, 0.7), torch.rand(mask.shape) * 5):
            with estimator_inputs(entropy=entropy):
                adv, ret = estimator(tlr, mask, index=np.array(uid, dtype=object), config={})
            assert torch.isfinite(adv).all(), (name, case, adv)
            assert (adv[mask == 0] == 0).all(), (name, case)
            assert adv.abs().max() < 1e3, (name, case, adv)
        assert all(math.isfinite(v) for v in LAST_METRICS.values()), LAST_METRICS
    # zero entropy everywhere: all weights equal, as with equal entropies (responses with at least one token)
    scores, mask, _, groups = random_group_batch(5)
    keep = mask.sum(-1) > 0
    scores, mask, groups = scores[keep], mask[keep], [g for g, k in zip(groups, keep.tolist()) if k]
    tlr = torch.zeros_like(mask)
    tlr[:, 0] = scores
    uid = np.array(groups, dtype=object)
    outs = []
    for value in (0.0, 1.0):
        with estimator_inputs(entropy=torch.full_like(mask, value)):
            outs.append(estimator(tlr, mask, index=uid, config={})[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def _estimator(name):
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    import hapo_verl  # noqa: F401  (registration through verl's plugin)

    return get_adv_estimator_fn(name)


@pytest.mark.parametrize("name", ["gtpo", "grpo_s"])
def test_estimators_need_the_old_entropy_from_the_trainer_and_report_metrics(name):
    mask = torch.ones(4, 3)
    tlr = torch.zeros(4, 3)
    tlr[:, -1] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    uid = np.array(["a", "a", "b", "b"], dtype=object)
    with pytest.raises(EstimatorNeedsTrainerError, match="hapo-verl"):
        _estimator(name)(tlr, mask, index=uid, config={})
    LAST_METRICS.clear()
    with estimator_inputs(entropy=torch.rand(4, 3)):
        _estimator(name)(tlr, mask, index=uid, config={})
    assert any(k.startswith(f"{name}/") for k in LAST_METRICS), LAST_METRICS


# ------------------------------------------------------------------------------------------------ configuration
BASE = START_UP_OVERRIDES


@pytest.mark.parametrize("config,key,value,match", [
    ("gtpo", "alpha3", 1.0, r"unknown option algorithm\.gtpo\.alpha3\b"),
    ("gtpo", "alpha2", -0.1, r"algorithm\.gtpo\.alpha2 must be in \[0, inf\)"),
    ("gtpo", "normalization", "group", r"algorithm\.gtpo\.normalization must be one of separate, joint"),
    ("gtpo", "epsilon", 0.0, r"algorithm\.gtpo\.epsilon must be in \(0, 1\]"),
    ("grpo_s", "beta3", 1.0, r"unknown option algorithm\.grpo_s\.beta3\b"),
    ("grpo_s", "beta1", -1.0, r"algorithm\.grpo_s\.beta1 must be in \[0, inf\)"),
    ("grpo_s", "base_reward", "raw", r"algorithm\.grpo_s\.base_reward must be one of paper, score"),
    ("grpo_s", "norm_adv_by_std", 3, r"algorithm\.grpo_s\.norm_adv_by_std must be true or false"),
])
def test_bad_options_are_rejected_at_start_up_naming_the_key(config, key, value, match):
    from hapo_verl.launcher import compose, prepare_config

    with pytest.raises(ValueError, match=match):
        prepare_config(compose(config, BASE + [f"++algorithm.{config}.{key}={value}"]))


def test_group_estimators_need_several_responses_per_prompt():
    from hapo_verl.launcher import compose, prepare_config

    for name in ("gtpo", "grpo_s"):
        with pytest.raises(ValueError, match=rf"adv_estimator={name} .*rollout\.n must be >= 2, got 1"):
            prepare_config(compose(name, BASE + ["actor_rollout_ref.rollout.n=1"]))


@pytest.mark.parametrize("name", ["gtpo", "grpo_s"])
def test_composes_with_hapo_adaptive_temperature_and_hapo_loss(name):
    """HAPO's adaptive temperature sampling runs beside either estimator: the step plan computes the old-policy
    entropy once, hands it to the estimator and runs HAPO's rollout-statistics hook; HAPO's loss (AAC, DAR) takes the
    estimator's advantages."""
    from hapo_verl.launcher import compose, prepare_config
    from hapo_verl.trainer.hapo_trainer import StepPlan

    cfg = compose(name, BASE + ["hapo.adaptive_temperature=true", "hapo.temperature_tau=0.05",
                                "actor_rollout_ref.rollout.agent.default_agent_loop=hapo_single_turn"])
    prepare_config(cfg)
    plan = StepPlan.from_config(cfg)
    assert plan.estimator_spec.name == name and plan.adaptive_temperature and plan.needs_old_policy
    assert [spec.name for spec, _ in plan.batch_stats_hooks()] == ["hapo"]
    cfg = compose(name, BASE + ["actor_rollout_ref.actor.policy_loss.loss_mode=hapo"])
    prepare_config(cfg)
    plan = StepPlan.from_config(cfg)
    assert plan.estimator_spec.name == name and plan.loss_spec.name == "hapo"


@pytest.mark.parametrize("name", ["gtpo", "grpo_s"])
def test_two_step_cpu_run_through_the_trainer(name, tmp_path):
    metrics = two_step_run_metrics(name, tmp_path)
    keys = {"gtpo": ("gtpo/bonus_mean", "gtpo/std_correct", "gtpo/correct_token_fraction"),
            "grpo_s": ("grpo_s/shaped_reward_mean", "grpo_s/mean_entropy", "grpo_s/correct_fraction")}[name]
    for step in (1, 2):
        for key in (*keys, "actor/pg_loss"):
            assert key in metrics[step], (step, key, sorted(metrics[step]))
            assert math.isfinite(float(metrics[step][key])), (step, key, metrics[step][key])
