"""STAPO (arXiv 2602.15620): every branch of the spurious-token test, a hand-computed loss and gradient with the
renormalised token mean, reduction to verl's vanilla loss without spurious tokens, per-sequence modes, the quantile
form of τ_h, the old-policy variant, the worker-side normaliser (the mini-batch pass: the kept-token count of the
whole mini-batch, independent of the micro-batch split and the data-parallel size; the per-micro-batch form as
documented), start-up validation and a 2-step CPU run."""

import math

import pytest
import torch
from dp_test_utils import assert_ranks_equal_single, run_on_ranks
from loss_test_utils import (AGG_MODES, SPLIT, actor_config, agg, assert_loss_option_rejected, assert_split_invariant,
                             identity_padding, minibatch_split_run, random_batch, two_step_run_metrics, vanilla,
                             worker_data)

from hapo_verl import compute_policy_loss, registry
from hapo_verl.algorithms.stapo import (STAPOOptions, masked_quantile, spurious_mask, stapo_needs,
                                        stapo_policy_loss)
from hapo_verl.integration.loss import registered_ppo_loss, run_loss

ABS = dict(spurious_entropy_threshold_type="absolute", spurious_prob_threshold=0.01, spurious_entropy_threshold=0.5)
PER_MICRO = dict(ABS, normalizer_per="micro_batch")
QUANT = dict(spurious_entropy_threshold_type="quantile", spurious_prob_threshold=0.01, spurious_entropy_quantile=0.5)


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
def test_without_spurious_tokens_and_with_the_dual_clip_it_is_verls_vanilla_loss(mode):
    old, new, adv, mask, entropy, _ = random_batch(seed=4)
    new = new.clone()
    new[0, 0] = old[0, 0] + 3.0  # r = e³ > c = 10 where A < 0: only the dual clip caps it
    assert adv[0, 0] < 0
    cfg = actor_config(loss_mode="stapo", dual_clip=True, **{**ABS, "spurious_prob_threshold": 0.0})
    ref, _ = vanilla(old, new, adv, mask, mode, actor_config(clip=(0.2, 0.28)))
    loss, _ = compute_policy_loss("stapo", old, new, adv, mask, mode, cfg, entropy=entropy)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-7)


def test_the_papers_token_loss_has_no_dual_clip():
    old = torch.log(torch.tensor([[0.5, 0.5]]))
    new = (old + torch.tensor([[3.0, 0.0]])).requires_grad_(True)  # r = e³ > c = 10 on the A < 0 token
    adv, entropy = torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, _ = compute_policy_loss("stapo", old, new, adv, mask, "token-mean", actor_config(loss_mode="stapo", **ABS),
                                  entropy=entropy)
    loss.backward()
    # DAPO's min(r·A, clip(r)·A) for A < 0 is r·A: loss (e³ − 1) / 2, gradient of token 0 r·(−A)/2 = e³/2
    assert loss.item() == pytest.approx((math.exp(3.0) - 1.0) / 2, rel=1e-6)
    assert new.grad[0].tolist() == pytest.approx([math.exp(3.0) / 2, -0.5], rel=1e-6)
    capped, _ = compute_policy_loss("stapo", old, new.detach(), adv, mask, "token-mean",
                                    actor_config(loss_mode="stapo", dual_clip=True, **ABS), entropy=entropy)
    assert capped.item() == pytest.approx((10.0 - 1.0) / 2, rel=1e-6)  # verl's dual clip: −A·c


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


@pytest.mark.parametrize("q", [0.05, 0.5, 0.75, 0.999])
def test_masked_quantile_is_torch_quantile_over_the_mask(q):
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        entropy = torch.rand(7, 13, generator=g) * 3
        mask = torch.rand(7, 13, generator=g) > 0.6
        expected = torch.quantile(entropy[mask].double(), q).item()
        assert masked_quantile(entropy, mask, q).item() == pytest.approx(expected, rel=1e-12)
    one = torch.zeros(2, 3, dtype=torch.bool)
    one[1, 2] = True
    assert masked_quantile(torch.full((2, 3), 0.7), one, q).item() == pytest.approx(0.7)
    assert masked_quantile(entropy, torch.zeros_like(mask), q).item() == 0.0  # no candidate: nothing spurious
    empty = torch.zeros(0)
    assert masked_quantile(empty, empty.bool(), q).item() == 0.0


def test_a_mini_batch_without_candidates_keeps_every_token():
    from hapo_verl.algorithms.stapo import stapo_minibatch_finalize

    valid = torch.tensor(40.0, dtype=torch.float64)
    stats = stapo_minibatch_finalize({"valid": valid, "candidate_entropy": torch.zeros(0, dtype=torch.float64)},
                                     STAPOOptions())
    assert (stats["kept"].item(), stats["entropy_threshold"].item(), stats["candidates"].item()) == (40.0, 0.0, 0.0)


def test_quantile_form_is_over_the_candidates_only():
    # 20 candidates (A > 0, π = 0.001 < τ_p = 0.002) with H = 0.0 .. 1.9, and 10 non-candidates with H = 0 that
    # must not move the quantile: 5 with π = 0.5, 5 with A < 0
    n = 30
    old = torch.log(torch.full((1, n), 0.001))
    old[0, 20:25] = math.log(0.5)
    adv = torch.ones(1, n)
    adv[0, 25:] = -1.0
    entropy = torch.zeros(1, n)
    entropy[0, :20] = torch.arange(20) / 10
    mask = torch.ones(1, n, dtype=torch.bool)
    cfg = actor_config(loss_mode="stapo")  # the paper's τ_p = 0.002, q = 0.75
    _, metrics = compute_policy_loss("stapo", old, old.clone(), adv, mask, "token-mean", cfg, entropy=entropy)
    # τ_h = the 0.75-quantile of 0.0 .. 1.9 = 1.425: the 15 candidates with H ≤ 1.4 are spurious
    assert metrics["actor/stapo/entropy_threshold"].item() == pytest.approx(1.425, rel=1e-6)
    assert metrics["actor/stapo/spurious_frac"].item() == pytest.approx(15 / n)


def test_defaults_are_the_papers():
    o = STAPOOptions()
    assert (o.spurious_prob_threshold, o.spurious_entropy_quantile, o.spurious_entropy_threshold_type) == \
        (0.002, 0.75, "quantile")
    assert (o.spurious_policy, o.normalizer_per, o.dual_clip) == ("current", "mini_batch", False)


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
    from hapo_verl.registry import CURRENT_ENTROPY, MINIBATCH_STATS, OLD_ENTROPY

    assert stapo_needs(STAPOOptions()) == {CURRENT_ENTROPY, MINIBATCH_STATS}
    assert stapo_needs(STAPOOptions(spurious_policy="old", spurious_entropy_threshold_type="absolute")) == {
        OLD_ENTROPY, MINIBATCH_STATS}
    assert stapo_needs(STAPOOptions(spurious_policy="old", spurious_entropy_threshold_type="absolute",
                                    normalizer_per="micro_batch")) == {OLD_ENTROPY}
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


def test_per_micro_batch_normaliser_with_one_micro_batch_is_exact():
    old, new, adv, mask, entropy = _spurious_batch(30)
    cfg = actor_config(loss_mode="stapo", **ABS)
    ref, ref_m = compute_policy_loss("stapo", old, new, adv, mask, "token-mean", cfg, entropy=entropy)
    assert 0 < ref_m["actor/stapo/spurious_frac"].item() < 1
    with identity_padding():
        loss, _ = registered_ppo_loss(actor_config(loss_mode="stapo", **PER_MICRO),
                                      {"log_probs": new, "entropy": entropy},
                                      worker_data(old, adv, mask, entropy, global_batch_size=8,
                                                  batch_num_tokens=int(mask.sum())))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_per_micro_batch_normaliser_is_what_the_docs_say():
    """normalizer_per=micro_batch: each micro-batch is renormalised by its own kept fraction (summed over the
    data-parallel ranks): exact when the micro-batches keep the same fraction, the documented approximation
    otherwise."""
    old, new, adv, mask, entropy = _spurious_batch(31)
    n_tok = int(mask.sum())

    def worker(rows):
        with identity_padding():
            loss, _ = registered_ppo_loss(
                actor_config(loss_mode="stapo", **PER_MICRO), {"log_probs": new[rows], "entropy": entropy[rows]},
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


@pytest.mark.parametrize("form", [ABS, QUANT], ids=["absolute", "quantile"])
@pytest.mark.parametrize("split", [SPLIT, ([0, 1, 2, 3], [4, 5, 6, 7])])
@pytest.mark.parametrize("policy", ["current", "old"])
def test_minibatch_pass_does_not_depend_on_the_micro_batch_split(split, policy, form):
    old, new, adv, mask, entropy = _spurious_batch(31)
    if policy == "old":  # the low-probability tokens under π_old
        old, new = new, old
    batch = (old, new, adv, mask, entropy, None)
    run, loss_fn, engine = minibatch_split_run("stapo", batch, split, current_entropy=entropy, spurious_policy=policy,
                                               **form)
    assert engine.forward_calls == (1 if policy == "current" else 0)  # π_old needs no forward
    metrics = assert_split_invariant(run)
    direct, ref_m = compute_policy_loss("stapo", old, new, adv, mask, "token-mean",
                                        actor_config(loss_mode="stapo", spurious_policy=policy, **form), entropy=entropy)
    assert run(list(range(8)))[0] == pytest.approx(direct.item(), rel=1e-6)
    frac = metrics["actor/stapo/spurious_frac_global"]
    assert float(frac.values[0] if hasattr(frac, "values") else frac) == \
        pytest.approx(float(ref_m["actor/stapo/spurious_frac"]))
    assert 0 < float(ref_m["actor/stapo/spurious_frac"]) < 1
    assert float(loss_fn.minibatch_stats["minibatch_tokens"]) == int(mask.sum())


def test_per_micro_batch_normaliser_depends_on_the_split():
    # the control of the test above
    old, new, adv, mask, entropy = _spurious_batch(31)
    run, _, engine = minibatch_split_run("stapo", (old, new, adv, mask, entropy, None), SPLIT,
                                         current_entropy=entropy, **PER_MICRO)
    assert engine.forward_calls == 0
    with pytest.raises(AssertionError):
        assert_split_invariant(run)


def _dp_minibatch_job(rank, world, group):
    old, new, adv, mask, entropy = _spurious_batch(40)
    rows = list(range(rank, 8, world))
    local = list(range(len(rows)))
    split = (local[:1], local[1:]) if world > 1 else SPLIT
    run, loss_fn, _ = minibatch_split_run("stapo", (old, new, adv, mask, entropy, None), split,
                                          current_entropy=entropy, dp_group=group, rows_of_rank=rows, world=world,
                                          **QUANT)
    loss, grad, metrics = run(local)
    frac = metrics["actor/stapo/spurious_frac_global"]
    return {"rows": rows, "loss": loss, "grad": grad, "frac": float(frac.values[0] if hasattr(frac, "values") else frac),
            "tau_h": float(loss_fn.minibatch_stats["entropy_threshold"])}


def test_minibatch_pass_on_two_data_parallel_ranks_equals_one_process(tmp_path):
    (single,) = run_on_ranks(_dp_minibatch_job, 1, tmp_path / "one")
    ranks = run_on_ranks(_dp_minibatch_job, 2, tmp_path / "two")
    assert 0 < single["frac"] < 1
    # τ_h is the quantile of the candidates gathered from both ranks
    assert all(r["frac"] == pytest.approx(single["frac"]) and r["tau_h"] == single["tau_h"] for r in ranks)
    assert_ranks_equal_single(single, ranks)


def _dp_job(rank, world, group):
    old, new, adv, mask, entropy = _spurious_batch(40)
    rows = list(range(rank, 8, world))
    spec = registry.get("stapo")
    cfg = actor_config(loss_mode="stapo", **PER_MICRO)
    cfg.global_batch_info.update(dp_size=world, batch_num_tokens=int(mask.sum()), global_batch_size=8,
                                 loss_scale_factor=None)
    options = STAPOOptions(**PER_MICRO)
    lp = new[rows].clone().requires_grad_(True)
    loss, metrics = run_loss(spec, options, old_log_prob=old[rows], log_prob=lp, advantages=adv[rows],
                             response_mask=mask[rows], loss_agg_mode="token-mean", config=cfg, entropy=entropy[rows],
                             dp_group=group)
    loss.backward()
    return {"rows": rows, "loss": loss.item(), "grad": lp.grad,
            "frac": float(metrics["actor/stapo/spurious_frac_global"])}


def test_per_micro_batch_counts_are_summed_over_data_parallel_ranks(tmp_path):
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
                    "actor/stapo/candidate_frac", "actor/entropy", "actor/pg_loss"):
            assert key in metrics[step], (step, key, sorted(metrics[step]))
            assert math.isfinite(float(metrics[step][key])), (step, key, metrics[step][key])
        assert 0.0 <= float(metrics[step]["actor/stapo/spurious_frac"]) <= 1.0
        # the mini-batch pass saw the whole mini-batch (tiny: 8 prompts x 4 responses, one mini-batch, two
        # micro-batches of 16), not one micro-batch
        tokens = float(metrics[step]["response_length/mean"]) * 32
        assert float(metrics[step]["actor/stapo/minibatch_tokens"]) == pytest.approx(tokens), (step, tokens)
