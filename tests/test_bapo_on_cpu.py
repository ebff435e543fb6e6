"""BAPO (arXiv 2510.18927): the candidate path of both bound orders, the vectorised contributions against direct sums,
a hand-computed search + loss + gradient, each branch (positive clip, negative clip, dual clip, target met at the
start / never met), reduction to verl's vanilla loss, the mini-batch pass (bounds of the whole mini-batch: the result
does not depend on the micro-batch split or the data-parallel size; the authors' per-micro-batch search does),
start-up validation and a 2-step CPU run whose bounds come from the whole mini-batch."""

import math

import pytest
import torch
from dp_test_utils import assert_ranks_equal_single, run_on_ranks
from loss_test_utils import (AGG_MODES, SPLIT, actor_config, agg, assert_loss_option_rejected, assert_split_invariant,
                             identity_padding, minibatch_split_run, random_batch, two_step_run_metrics, vanilla,
                             worker_data)

from hapo_verl import compute_policy_loss, registry
from hapo_verl.algorithms.bapo import BAPOOptions, bapo_policy_loss, bound_path, contributions_along_path, \
    search_bounds
from hapo_verl.integration.loss import LossNeedsTrainerError, registered_ppo_loss, run_loss

SMALL = dict(positive_ratio_target=0.45, ratio_lower_start=0.6, ratio_lower_max=0.8, ratio_lower_step=0.1,
             ratio_upper_start=1.2, ratio_upper_max=1.4, ratio_upper_step=0.1)


def test_paper_path_raises_the_upper_bound_first():
    path = bound_path(BAPOOptions())  # §5.1: c_high 1.2 -> 3.0 by 0.05, then c_low 0.6 -> 0.9 by 0.02
    assert path[0] == (0.6, 1.2) and path[36] == (0.6, 3.0) and path[37] == (0.62, 3.0) and path[-1] == (0.9, 3.0)
    assert len(path) == 1 + 36 + 15
    assert bound_path(BAPOOptions(**SMALL)) == [(0.6, 1.2), (0.6, 1.3), (0.6, 1.4), (0.7, 1.4), (0.8, 1.4)]


def test_code_path_raises_the_lower_bound_first_and_clamps_at_the_maximum():
    opts = BAPOOptions(**{**SMALL, "ratio_lower_step": 0.15, "bound_order": "lower_first"})
    # the authors' code: c_low 0.6 -> 0.75 -> 0.8 (clamped), then c_high
    assert bound_path(opts) == [(0.6, 1.2), (0.75, 1.2), (0.8, 1.2), (0.8, 1.3), (0.8, 1.4)]
    # the paper's rule never passes the maximum: 0.6 -> 0.75 and stop
    assert bound_path(BAPOOptions(**{**SMALL, "ratio_lower_step": 0.15}))[-1] == (0.75, 1.4)


def test_contributions_along_the_path_match_direct_sums():
    old, new, adv, mask, _, _ = random_batch(B=16, L=12, seed=3)
    ratio = torch.exp(new - old) * 1.3
    path = bound_path(BAPOOptions())
    lows, highs = [c[0] for c in path], [c[1] for c in path]
    p, n = contributions_along_path(ratio, adv, mask, lows, highs)
    r, a, m = ratio.double(), adv.double(), mask.double()
    p_ref = torch.stack([(m * a.clamp(min=0) * torch.minimum(r, h)).sum() for h in torch.tensor(highs, dtype=torch.float64)])
    n_ref = torch.stack([(m * (-a).clamp(min=0) * torch.maximum(r, lo)).sum() for lo in torch.tensor(lows, dtype=torch.float64)])
    assert torch.allclose(p, p_ref, rtol=1e-12) and torch.allclose(n, n_ref, rtol=1e-12)


def _three_tokens():
    # A=+1 at r=1.5, A=-1 at r=0.5, A=-1 at r=1.0 (one row)
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.0]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, -1.0]])
    return old, new, adv, torch.ones(1, 3, dtype=torch.bool)


def test_hand_computed_search_loss_and_gradient_paper_order():
    old, new, adv, mask = _three_tokens()
    # P(c_high) = min(1.5, c_high); N(c_low) = max(0.5, c_low) + max(1, c_low) = c_low + 1
    # path: (0.6,1.2) rho 1.2/2.8 = .429; (0.6,1.3) 1.3/2.9 = .448; (0.6,1.4) 1.4/3.0 = .467 >= .45 -> stop
    loss, metrics = bapo_policy_loss(old, new, adv, mask, BAPOOptions(**SMALL), clip_ratio_c=10.0,
                                     aggregate=agg("token-mean"))
    assert metrics["clip_low"].item() == pytest.approx(0.6) and metrics["clip_high"].item() == pytest.approx(1.4)
    assert metrics["positive_ratio"].item() == pytest.approx(1.4 / 3.0, rel=1e-6)
    assert metrics["search_steps"].item() == 2
    # token 1: -min(1.5, 1.4) = -1.4 (clipped); token 2: max(0.5, 0.6) = 0.6 (clipped); token 3: 1.0
    assert loss.item() == pytest.approx((-1.4 + 0.6 + 1.0) / 3, rel=1e-6)
    loss.backward()
    assert new.grad[0].tolist() == pytest.approx([0.0, 0.0, 1.0 / 3], abs=1e-7)
    assert metrics["pg_clipfrac"].item() == pytest.approx(2 / 3)


def test_hand_computed_search_code_order_never_meets_the_target_here():
    old, new, adv, mask = _three_tokens()
    # lower first: rho .429 -> 1.2/2.9 = .414 -> 1.2/3.0 = .400 -> 1.3/3.0 = .433 -> 1.4/3.0 = .467 >= .45 at the last
    opts = BAPOOptions(**{**SMALL, "bound_order": "lower_first"})
    loss, metrics = bapo_policy_loss(old, new, adv, mask, opts, clip_ratio_c=10.0, aggregate=agg("token-mean"))
    assert (metrics["clip_low"].item(), metrics["clip_high"].item()) == pytest.approx((0.8, 1.4))
    assert metrics["search_steps"].item() == 4
    assert loss.item() == pytest.approx((-1.4 + 0.8 + 1.0) / 3, rel=1e-6)


def test_target_met_at_the_start_and_never_met():
    old, new, adv, mask = _three_tokens()
    met = bapo_policy_loss(old, new, adv, mask, BAPOOptions(**{**SMALL, "positive_ratio_target": 0.4}),
                           clip_ratio_c=10.0, aggregate=agg("token-mean"))[1]
    assert met["search_steps"].item() == 0 and met["clip_high"].item() == pytest.approx(1.2)
    never = bapo_policy_loss(old, new, adv, mask, BAPOOptions(**{**SMALL, "positive_ratio_target": 0.9}),
                             clip_ratio_c=10.0, aggregate=agg("token-mean"))[1]
    assert never["search_steps"].item() == 4 and (never["clip_low"].item(), never["clip_high"].item()) == \
        pytest.approx((0.8, 1.4))
    # only positive tokens: rho = 1, nothing to re-balance
    only_pos = search_bounds(torch.ones(1, 2), torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool),
                             BAPOOptions(positive_ratio_target=1.0))
    assert only_pos[2].item() == 1.0 and only_pos[3].item() == 0


def test_dual_clip_is_the_codes_option():
    old = torch.zeros(1, 1)
    new = torch.full((1, 1), math.log(20.0), requires_grad=True)
    adv = -torch.ones(1, 1)
    mask = torch.ones(1, 1, dtype=torch.bool)
    paper, m_paper = bapo_policy_loss(old, new, adv, mask, BAPOOptions(), clip_ratio_c=10.0, aggregate=agg("token-mean"))
    code, m_code = bapo_policy_loss(old, new, adv, mask, BAPOOptions(dual_clip=True), clip_ratio_c=10.0,
                                    aggregate=agg("token-mean"))
    assert paper.item() == pytest.approx(20.0) and code.item() == pytest.approx(10.0)
    assert m_paper["pg_clipfrac_lower"].item() == 0.0 and m_code["pg_clipfrac_lower"].item() == 1.0


@pytest.mark.parametrize("mode", AGG_MODES)
def test_fixed_bounds_with_dual_clip_equal_verls_vanilla_loss(mode):
    old, new, adv, mask, _, _ = random_batch(seed=11)
    opts = BAPOOptions(ratio_lower_start=0.8, ratio_lower_max=0.8, ratio_upper_start=1.28, ratio_upper_max=1.28,
                       dual_clip=True)
    ref, _ = vanilla(old, new, adv, mask, mode, actor_config(clip=(0.2, 0.28)))
    loss, _ = bapo_policy_loss(old, new, adv, mask, opts, clip_ratio_c=10.0, aggregate=agg(mode))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-7)


def test_compute_policy_loss_and_verls_standard_signature():
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    old, new, adv, mask, _, _ = random_batch(seed=5)
    cfg = actor_config(loss_mode="bapo", bounds_per="micro_batch")
    direct, metrics = compute_policy_loss("bapo", old, new, adv, mask, "token-mean", cfg)
    standard, _ = get_policy_loss_fn("bapo")(old, new, adv, mask, "token-mean", cfg)
    assert direct.item() == standard.item()
    assert {"actor/bapo/clip_low", "actor/bapo/clip_high", "actor/bapo/positive_ratio"} <= set(metrics)
    # the default (bounds of the whole mini-batch) needs hapo-verl's mini-batch pass, which verl's signature lacks
    default, _ = compute_policy_loss("bapo", old, new, adv, mask, "token-mean", actor_config(loss_mode="bapo"))
    assert default.item() == direct.item()  # a direct call's tokens are the whole batch
    with pytest.raises(LossNeedsTrainerError, match="minibatch_stats"):
        get_policy_loss_fn("bapo")(old, new, adv, mask, "token-mean", actor_config(loss_mode="bapo"))


def _off_policy_batch(seed=8):
    old, new, adv, mask, entropy, ref = random_batch(B=8, seed=seed)
    return old, new + 0.4, adv, mask, entropy, ref  # ratios away from 1: the search moves


@pytest.mark.parametrize("split", [SPLIT, ([0, 1, 2, 3], [4, 5, 6, 7]), ([0], [1, 2, 3, 4, 5, 6, 7])])
def test_minibatch_pass_bounds_do_not_depend_on_the_micro_batch_split(split):
    batch = _off_policy_batch()
    old, new, adv, mask, _, _ = batch
    run, _, engine = minibatch_split_run("bapo", batch, split)
    assert engine.forward_calls == 1
    metrics = assert_split_invariant(run)
    direct, ref_metrics = compute_policy_loss("bapo", old, new, adv, mask, "token-mean", actor_config(loss_mode="bapo"))
    assert run(list(range(8)))[0] == pytest.approx(direct.item(), rel=1e-6)
    assert float(ref_metrics["actor/bapo/clip_high"]) > 1.2  # the search moved
    for key in ("clip_low", "clip_high", "positive_ratio"):
        got = metrics[f"actor/bapo/{key}"]
        assert float(got.values[0] if hasattr(got, "values") else got) == \
            pytest.approx(float(ref_metrics[f"actor/bapo/{key}"]))
    tokens = metrics["actor/bapo/minibatch_tokens"]
    assert float(tokens.values[0] if hasattr(tokens, "values") else tokens) == int(mask.sum())


def test_per_micro_batch_search_depends_on_the_split_as_the_authors_code():
    # the control of the test above: without the pass each micro-batch finds its own bounds
    run, loss_fn, engine = minibatch_split_run("bapo", _off_policy_batch(), SPLIT, bounds_per="micro_batch")
    assert engine.forward_calls == 0 and loss_fn.minibatch_stats is None
    with pytest.raises(AssertionError):
        assert_split_invariant(run)


def test_worker_loss_refuses_to_run_without_the_minibatch_pass():
    old, new, adv, mask, entropy, _ = random_batch(B=8, seed=8)
    with identity_padding(), pytest.raises(RuntimeError, match="mini-batch pass did not run"):
        registered_ppo_loss(actor_config(loss_mode="bapo"), {"log_probs": new},
                            worker_data(old, adv, mask, entropy, global_batch_size=8, batch_num_tokens=int(mask.sum())))


def test_worker_loss_with_one_micro_batch_is_the_whole_mini_batch_search():
    old, new, adv, mask, entropy, _ = _off_policy_batch()
    cfg = actor_config(loss_mode="bapo", bounds_per="micro_batch")
    ref, ref_metrics = compute_policy_loss("bapo", old, new, adv, mask, "token-mean", cfg)
    with identity_padding():
        loss, metrics = registered_ppo_loss(cfg, {"log_probs": new},
                                            worker_data(old, adv, mask, entropy, global_batch_size=8,
                                                        batch_num_tokens=int(mask.sum())))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for key in ("clip_low", "clip_high", "positive_ratio"):
        got = metrics[f"actor/bapo/{key}"]
        got = got.values[0] if hasattr(got, "values") else got
        assert float(got) == pytest.approx(float(ref_metrics[f"actor/bapo/{key}"]))


def _dp_job(rank, world, group):
    """Per-micro-batch search (the authors' granularity) on ``world`` ranks: P and N summed over the ranks."""
    old, new, adv, mask, _, _ = random_batch(B=8, seed=21)
    new = new + 0.5
    rows = list(range(rank, 8, world))
    spec = registry.get("bapo")
    cfg = actor_config(loss_mode="bapo", bounds_per="micro_batch")
    cfg.global_batch_info.update(dp_size=world, batch_num_tokens=int(mask.sum()), global_batch_size=8,
                                 loss_scale_factor=None)
    lp = new[rows].clone().requires_grad_(True)
    loss, metrics = run_loss(spec, BAPOOptions(bounds_per="micro_batch"), old_log_prob=old[rows], log_prob=lp,
                             advantages=adv[rows], response_mask=mask[rows], loss_agg_mode="token-mean", config=cfg,
                             dp_group=group)
    loss.backward()
    return {"rows": rows, "loss": loss.item(), "grad": lp.grad, "low": float(metrics["actor/bapo/clip_low"]),
            "high": float(metrics["actor/bapo/clip_high"]), "rho": float(metrics["actor/bapo/positive_ratio"])}


def test_two_data_parallel_ranks_pick_the_whole_batch_bounds(tmp_path):
    (single,) = run_on_ranks(_dp_job, 1, tmp_path / "one")
    ranks = run_on_ranks(_dp_job, 2, tmp_path / "two")
    assert single["high"] > 1.2  # the search moved
    for r in ranks:
        assert (r["low"], r["high"], r["rho"]) == pytest.approx((single["low"], single["high"], single["rho"]))
    assert_ranks_equal_single(single, ranks)


def _dp_minibatch_job(rank, world, group):
    """The mini-batch pass on ``world`` ranks, each with two micro-batches of its rows."""
    batch = _off_policy_batch(seed=21)
    rows = list(range(rank, 8, world))
    local = list(range(len(rows)))
    split = (local[:1], local[1:]) if world > 1 else SPLIT
    run, loss_fn, _ = minibatch_split_run("bapo", batch, split, dp_group=group, rows_of_rank=rows, world=world)
    loss, grad, _ = run(local)
    stats = loss_fn.minibatch_stats
    return {"rows": rows, "loss": loss, "grad": grad, "low": float(stats["clip_low"]),
            "high": float(stats["clip_high"]), "tokens": float(stats["minibatch_tokens"])}


def test_minibatch_pass_on_two_data_parallel_ranks_equals_one_process(tmp_path):
    (single,) = run_on_ranks(_dp_minibatch_job, 1, tmp_path / "one")
    ranks = run_on_ranks(_dp_minibatch_job, 2, tmp_path / "two")
    assert single["high"] > 1.2
    for r in ranks:
        assert (r["low"], r["high"], r["tokens"]) == (single["low"], single["high"], single["tokens"])
    assert_ranks_equal_single(single, ranks)


@pytest.mark.parametrize("key,value,match", [
    ("positive_ratio_target", 1.5, r"policy_loss\.positive_ratio_target must be in \[0, 1\]"),
    ("ratio_upper_start", 0.9, r"policy_loss\.ratio_upper_start must be in \[1, inf\)"),
    ("ratio_lower_max", 0.5, r"policy_loss\.ratio_lower_max \(0\.5\) must be >= .*ratio_lower_start"),
    ("bound_order", "random", r"policy_loss\.bound_order must be one of upper_first, lower_first"),
    ("ratio_upper_step", -0.05, r"policy_loss\.ratio_upper_step must be in \[0, inf\)"),
    ("ratio_lower_strat", 0.6, r"unknown option actor_rollout_ref\.actor\.policy_loss\.ratio_lower_strat"),
])
def test_bad_options_are_rejected_at_start_up_naming_the_key(key, value, match):
    assert_loss_option_rejected("bapo", key, value, match)


def test_two_step_cpu_run_through_the_trainer(tmp_path):
    metrics = two_step_run_metrics("bapo", tmp_path)
    for step in (1, 2):
        for key in ("actor/bapo/clip_low", "actor/bapo/clip_high", "actor/bapo/positive_ratio", "actor/pg_loss"):
            assert key in metrics[step], (step, key, sorted(metrics[step]))
            assert math.isfinite(float(metrics[step][key])), (step, key, metrics[step][key])
        assert 0.6 <= float(metrics[step]["actor/bapo/clip_low"]) <= 0.9
        assert 1.2 <= float(metrics[step]["actor/bapo/clip_high"]) <= 3.0
        # the mini-batch pass saw the whole mini-batch (tiny: 8 prompts x 4 responses, one mini-batch, two
        # micro-batches of 16), not one micro-batch
        tokens = float(metrics[step]["response_length/mean"]) * 32
        assert float(metrics[step]["actor/bapo/minibatch_tokens"]) == pytest.approx(tokens), (step, tokens)
