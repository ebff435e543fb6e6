"""STAPO (arXiv 2602.15620): every branch of the spurious-token test, a hand-computed loss and gradient with the
renormalised token mean, reduction to verl's vanilla loss without spurious tokens, per-sequence modes, the quantile
form of τ_h, the old-policy variant, the worker-side normaliser (one micro-batch = exact; real data-parallel ranks),
start-up validation and a 2-step CPU run."""

import math

import pytest
import torch
from dp_test_utils import assert_ranks_equal_single, run_on_ranks
from loss_test_utils import (AGG_MODES, actor_config, agg, assert_loss_option_rejected, identity_padding,
                             random_batch, two_step_run_metrics, vanilla, worker_data)

from hapo_verl import compute_policy_loss, registry
from hapo_verl.algorithms.stapo import STAPOOptions, entropy_quantile, spurious_mask, stapo_needs, stapo_policy_loss
from hapo_verl.integration.loss import registered_ppo_loss, run_loss

ABS = dict(spurious_entropy_threshold_type="absolute", spurious_prob_threshold=0.01, spurious_entropy_threshold=0.5)


def test_spurious_needs_all_three_conditions():
    # token 0: spurious. 1: A = 0. 2: A < 0. 3: π = 0.02 >= τ_p. 4: H = 0.6 >= τ_h. 5: padding. 6: π exactly τ_p
    log_prob = torch.log(torch.tensor([[0.005, 0.005, 0.005, 0.02, 0.005, 0.005, 0.01]]))
    entropy = torch.tensor([[0.1, 0.1, 0.1, 0.1, 0.6, 0.1, 0.1]])
    adv = torch.tensor([[1.0, 0.0, -1.0, 1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, True, True, True, False, True]])
    s = spurious_mask(log_prob, entropy, adv, mask, 0.01, 0.5)
    assert s.tolist() == [[True, False, False, False, False, False, False]]
    # H exactly τ_h is not below it
    assert not spurious_mask(log_prob, torch.full_like(entropy, 0.5), adv, mask, 0.01, 0.5).any()


def test_hand_computed_loss_and_gradient_renormalised_over_kept_tokens():
    # 4 tokens, ratio 1 (on-policy); token 0 spurious (A=2, π=0.005, H=0.1)
    old = torch.log(torch.tensor([[0.005, 0.5, 0.5, 0.5]]))
    new = old.clone().requires_grad_(True)
    adv = torch.tensor([[2.0, 1.0, -1.0, 3.0]])
    entropy = torch.tensor([[0.1, 0.1, 0.1, 2.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    cfg = actor_config(loss_mode="stapo", **ABS)
    loss, metrics = compute_policy_loss("stapo", old, new, adv, mask, "token-mean", cfg, entropy=entropy)
    # kept: -1 + 1 - 3 over 3 tokens (the spurious one leaves the denominator too)
    assert loss.item() == pytest.approx((-1.0 + 1.0 - 3.0) / 3, rel=1e-6)
    loss.backward()
    assert new.grad[0].tolist() == pytest.approx([0.0, -1 / 3, 1 / 3, -1.0], rel=1e-6)
    assert metrics["actor/stapo/spurious_frac"].item() == pytest.approx(0.25)
    assert metrics["actor/stapo/spurious_frac_global"].item() == pytest.approx(0.25)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_without_spurious_tokens_it_is_verls_vanilla_loss(mode):
    old, new, adv, mask, entropy, _ = random_batch(seed=4)
    cfg = actor_config(loss_mode="stapo", **{**ABS, "spurious_prob_threshold": 0.0})
    ref, _ = vanilla(old, new, adv, mask, mode, actor_config(clip=(0.2, 0.28)))
    loss, _ = compute_policy_loss("stapo", old, new, adv, mask, mode, cfg, entropy=entropy)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-7)


def test_sequence_mean_modes_drop_spurious_tokens_from_their_sequence():
    old = torch.log(torch.full((2, 2), 0.5))
    old[0, 0] = math.log(0.005)
    new = old.clone()
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    entropy = torch.full((2, 2), 0.1)
    mask = torch.ones(2, 2, dtype=torch.bool)
    spurious = spurious_mask(new, entropy, adv, mask, 0.01, 0.5)
    assert spurious.tolist() == [[True, False], [False, False]]
    loss, _ = stapo_policy_loss(old, new, adv, mask, spurious, clip_low=0.2, clip_high=0.28, clip_ratio_c=10.0,
                                loss_agg_mode="seq-mean-token-mean", aggregate=agg("seq-mean-token-mean"))
    # row 0: mean over its one kept token = -1; row 1: +1; seq-mean over 2 rows
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    loss, _ = stapo_policy_loss(old, new, adv, mask, spurious, clip_low=0.2, clip_high=0.28, clip_ratio_c=10.0,
                                loss_agg_mode="token-sum", aggregate=agg("token-sum"))
    assert loss.item() == pytest.approx(-1.0 + 2.0, rel=1e-6)


def test_quantile_form_of_the_entropy_threshold():
    g = torch.Generator().manual_seed(2)
    entropy = torch.rand(7, 13, generator=g) * 3
    mask = torch.rand(7, 13, generator=g) > 0.3
    assert entropy_quantile(entropy, mask, 0.05) == pytest.approx(torch.quantile(entropy[mask].double(), 0.05).item())
    # through compute_policy_loss the glue computes it over the tokens passed in; the trainer over the whole step
    old = torch.log(torch.full((1, 20), 0.005))
    entropy = torch.arange(20, dtype=torch.float32)[None, :] / 10  # 0.0 .. 1.9; 5th pct = 0.095
    adv, mask = torch.ones(1, 20), torch.ones(1, 20, dtype=torch.bool)
    cfg = actor_config(loss_mode="stapo", spurious_entropy_quantile=0.05)
    _, metrics = compute_policy_loss("stapo", old, old.clone(), adv, mask, "token-mean", cfg, entropy=entropy)
    assert metrics["actor/stapo/entropy_threshold"].item() == pytest.approx(0.095, rel=1e-5)
    assert metrics["actor/stapo/spurious_frac"].item() == pytest.approx(1 / 20)  # only H = 0.0
    _, given = compute_policy_loss("stapo", old, old.clone(), adv, mask, "token-mean", cfg, entropy=entropy,
                                   batch_stats={"entropy_threshold": 0.35})
    assert given["actor/stapo/spurious_frac"].item() == pytest.approx(4 / 20)


def test_old_policy_variant_reads_pi_old():
    old = torch.log(torch.tensor([[0.005, 0.5]]))
    new = torch.log(torch.tensor([[0.05, 0.5]]))  # the update already raised token 0 above τ_p
    adv, entropy, mask = torch.ones(1, 2), torch.full((1, 2), 0.1), torch.ones(1, 2, dtype=torch.bool)
    cur = compute_policy_loss("stapo", old, new, adv, mask, "token-mean", actor_config(loss_mode="stapo", **ABS),
                              entropy=entropy)[1]
    was = compute_policy_loss("stapo", old, new, adv, mask, "token-mean",
                              actor_config(loss_mode="stapo", spurious_policy="old", **ABS), entropy=entropy)[1]
    assert cur["actor/stapo/spurious_frac"].item() == 0.0 and was["actor/stapo/spurious_frac"].item() == 0.5


def test_needs_and_the_trainer_path_requires_the_current_entropy():
    from hapo_verl.registry import BATCH_STATS, CURRENT_ENTROPY, OLD_ENTROPY

    assert stapo_needs(STAPOOptions()) == {CURRENT_ENTROPY, BATCH_STATS}
    assert stapo_needs(STAPOOptions(spurious_policy="old", spurious_entropy_threshold_type="absolute")) == {
        OLD_ENTROPY}
    old, new, adv, mask, entropy, _ = random_batch(B=2)
    with identity_padding(), pytest.raises(RuntimeError, match="calculate_entropy=true"):
        registered_ppo_loss(actor_config(loss_mode="stapo", **ABS), {"log_probs": new},
                            worker_data(old, adv, mask, entropy))


def _spurious_batch(seed):
    old, new, adv, mask, entropy, _ = random_batch(B=8, L=9, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    new = torch.where(torch.rand(8, 9, generator=g) < 0.3, torch.full_like(new, math.log(0.004)), new)
    adv = adv.abs()
    return old, new, adv, mask, entropy


def test_worker_loss_with_one_micro_batch_is_exact():
    old, new, adv, mask, entropy = _spurious_batch(30)
    cfg = actor_config(loss_mode="stapo", **ABS)
    ref, ref_m = compute_policy_loss("stapo", old, new, adv, mask, "token-mean", cfg, entropy=entropy)
    assert 0 < ref_m["actor/stapo/spurious_frac"].item() < 1
    with identity_padding():
        loss, _ = registered_ppo_loss(actor_config(loss_mode="stapo", **ABS), {"log_probs": new, "entropy": entropy},
                                      worker_data(old, adv, mask, entropy, global_batch_size=8,
                                                  batch_num_tokens=int(mask.sum())))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_micro_batch_split_normaliser_is_what_the_docs_say():
    """Each micro-batch is renormalised by its own kept fraction (summed over the data-parallel ranks): exact when
    the micro-batches keep the same fraction, the documented approximation otherwise."""
    old, new, adv, mask, entropy = _spurious_batch(31)
    n_tok = int(mask.sum())

    def worker(rows):
        with identity_padding():
            loss, _ = registered_ppo_loss(
                actor_config(loss_mode="stapo", **ABS), {"log_probs": new[rows], "entropy": entropy[rows]},
                worker_data(old[rows], adv[rows], mask[rows], entropy[rows], global_batch_size=8,
                            batch_num_tokens=n_tok))
        return loss.item()

    cfg = actor_config(loss_mode="stapo", **ABS)
    from hapo_verl.algorithms.ppo import dual_clip_ppo_token_loss

    pg, _ = dual_clip_ppo_token_loss(old, new, adv, 0.2, 0.28, 10.0)
    spur = spurious_mask(new, entropy, adv, mask, 0.01, 0.5)
    keep = mask & ~spur
    parts = ([0, 1, 2], [3, 4, 5, 6, 7])
    expected = sum((pg[r] * keep[r]).sum().item() / n_tok * mask[r].sum().item() / keep[r].sum().item()
                   for r in parts)
    assert sum(worker(r) for r in parts) == pytest.approx(expected, rel=1e-6)
    exact = compute_policy_loss("stapo", old, new, adv, mask, "token-mean", cfg, entropy=entropy)[0].item()
    assert exact == pytest.approx((pg * keep).sum().item() / keep.sum().item(), rel=1e-6)


def _dp_job(rank, world, group):
    old, new, adv, mask, entropy = _spurious_batch(40)
    rows = list(range(rank, 8, world))
    spec = registry.get("stapo")
    cfg = actor_config(loss_mode="stapo", **ABS)
    cfg.global_batch_info.update(dp_size=world, batch_num_tokens=int(mask.sum()), global_batch_size=8,
                                 loss_scale_factor=None)
    options = STAPOOptions(**ABS)
    lp = new[rows].clone().requires_grad_(True)
    loss, metrics = run_loss(spec, options, old_log_prob=old[rows], log_prob=lp, advantages=adv[rows],
                             response_mask=mask[rows], loss_agg_mode="token-mean", config=cfg, entropy=entropy[rows],
                             dp_group=group)
    loss.backward()
    return {"rows": rows, "loss": loss.item(), "grad": lp.grad,
            "frac": float(metrics["actor/stapo/spurious_frac_global"])}


def test_two_data_parallel_ranks_renormalise_with_the_global_count(tmp_path):
    (single,) = run_on_ranks(_dp_job, 1, tmp_path / "one")
    ranks = run_on_ranks(_dp_job, 2, tmp_path / "two")
    assert 0 < single["frac"] < 1
    assert all(r["frac"] == pytest.approx(single["frac"]) for r in ranks)
    assert_ranks_equal_single(single, ranks)


@pytest.mark.parametrize("key,value,match", [
    ("spurious_prob_threshold", 1.5, r"policy_loss\.spurious_prob_threshold must be in \[0, 1\]"),
    ("spurious_entropy_threshold", -0.1, r"policy_loss\.spurious_entropy_threshold must be in \[0, inf\)"),
    ("spurious_entropy_quantile", 0.0, r"policy_loss\.spurious_entropy_quantile must be in \(0, 1\)"),
    ("spurious_entropy_threshold_type", "relative", r"policy_loss\.spurious_entropy_threshold_type must be one of"),
    ("spurious_policy", "new", r"policy_loss\.spurious_policy must be one of current, old"),
    ("spurious_prob", 0.01, r"unknown option actor_rollout_ref\.actor\.policy_loss\.spurious_prob\b"),
])
def test_bad_options_are_rejected_at_start_up_naming_the_key(key, value, match):
    assert_loss_option_rejected("stapo", key, value, match)


def test_two_step_cpu_run_through_the_trainer(tmp_path):
    metrics = two_step_run_metrics("stapo", tmp_path)
    for step in (1, 2):
        for key in ("actor/stapo/spurious_frac", "actor/stapo/spurious_frac_global", "actor/stapo/entropy_threshold",
                    "stapo/entropy_threshold", "actor/entropy", "actor/pg_loss"):
            assert key in metrics[step], (step, key, sorted(metrics[step]))
            assert math.isfinite(float(metrics[step][key])), (step, key, metrics[step][key])
        assert 0.0 <= float(metrics[step]["actor/stapo/spurious_frac"]) <= 1.0
