"""KL-Cov over the whole update mini-batch (``loss_mode=kl_cov_global``): hand values, equality with verl's
``kl_cov`` on one micro-batch, the mini-batch pass (independent of the micro-batch split and the data-parallel size;
no forward with ``covariance_policy=old``), degenerate inputs, start-up validation and a 2-step CPU run."""

import math

import pytest
import torch
from dp_test_utils import assert_ranks_equal_single, run_on_ranks
from loss_test_utils import (SPLIT, actor_config, assert_loss_option_rejected, assert_split_invariant,
                             minibatch_split_run, random_batch, two_step_run_metrics)

from hapo_verl import compute_policy_loss
from hapo_verl.algorithms.kl_cov_global import covariance_threshold


def cfg(loss_mode="kl_cov_global", **keys):
    return actor_config(clip=(0.2, 0.2), loss_mode=loss_mode, **keys)


def test_hand_computed_value_and_gradient():
    # as verl's kl_cov test: token 0 has the largest (A - mean A)(log π - mean log π); k = max(1, ⌊4·0.25⌋) = 1
    old = torch.zeros(1, 4, dtype=torch.float64)
    r = [1.5, 0.5, 1.1, 0.9]
    lp = torch.log(torch.tensor([r], dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([[2.0, -1.0, 0.5, -1.5]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, metrics = compute_policy_loss("kl_cov_global", old, lp, adv, mask, "token-sum",
                                        cfg(kl_cov_ratio=0.25, ppo_kl_coef=0.7, covariance_policy="current"))
    expected = sum(-ri * ai for ri, ai in zip(r, adv[0].tolist())) + 0.7 * abs(math.log(1.5))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    grads = [-ri * ai for ri, ai in zip(r, adv[0].tolist())]
    grads[0] += 0.7
    assert lp.grad[0].tolist() == pytest.approx(grads, rel=1e-12)
    assert metrics["actor/kl_cov_global/selected_frac"].item() == pytest.approx(0.25)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_micro_batch_equals_verls_kl_cov(seed):
    old, new, adv, mask, _, _ = random_batch(B=8, L=9, seed=seed)
    adv = adv + torch.randn(8, 9, generator=torch.Generator().manual_seed(seed)) * 0.1 * mask  # distinct A per token
    keys = dict(kl_cov_ratio=0.1, ppo_kl_coef=1.0)
    results = []
    for mode, extra in (("kl_cov", {}), ("kl_cov_global", {"covariance_policy": "current"})):
        lp = new.clone().requires_grad_(True)
        loss, _ = compute_policy_loss(mode, old, lp, adv, mask, "token-mean", cfg(mode, **keys, **extra))
        loss.backward()
        results.append((loss.item(), lp.grad))
    (verl_loss, verl_grad), (ours, our_grad) = results
    assert ours == pytest.approx(verl_loss, rel=1e-6)
    assert torch.allclose(our_grad, verl_grad, atol=1e-7)


def test_old_policy_covariance_equals_current_on_policy():
    old, _, adv, mask, _, _ = random_batch(B=8, seed=3)
    on_policy = {}
    for policy in ("old", "current"):
        on_policy[policy], _ = compute_policy_loss("kl_cov_global", old, old.clone(), adv, mask, "token-mean",
                                                   cfg(covariance_policy=policy, kl_cov_ratio=0.2))
    assert on_policy["old"].item() == on_policy["current"].item()


def _batch(seed=11):
    old, new, adv, mask, entropy, ref = random_batch(B=8, L=9, seed=seed)
    adv = adv + torch.randn(8, 9, generator=torch.Generator().manual_seed(seed)) * 0.2 * mask
    return old, new + 0.3, adv, mask, entropy, ref


@pytest.mark.parametrize("split", [SPLIT, ([0, 1, 2, 3], [4, 5, 6, 7]), ([5], [0, 1, 2, 3, 4, 6, 7])])
@pytest.mark.parametrize("policy", ["old", "current"])
def test_minibatch_pass_does_not_depend_on_the_micro_batch_split(split, policy):
    batch = _batch()
    old, new, adv, mask, _, _ = batch
    run, loss_fn, engine = minibatch_split_run("kl_cov_global", batch, split, clip=(0.2, 0.2), kl_cov_ratio=0.1,
                                               covariance_policy=policy)
    assert engine.forward_calls == (1 if policy == "current" else 0)
    assert_split_invariant(run, abs_tol=1e-7)  # the loss is ~1e-2 here: float32 sums of ±1 terms
    direct, metrics = compute_policy_loss("kl_cov_global", old, new, adv, mask, "token-mean",
                                          cfg(kl_cov_ratio=0.1, covariance_policy=policy))
    assert run(list(range(8)))[0] == pytest.approx(direct.item(), rel=1e-6, abs=1e-7)
    n = int(mask.sum())
    assert metrics["actor/kl_cov_global/selected_frac"].item() == pytest.approx(max(1, math.floor(n * 0.1)) / n)
    assert float(loss_fn.minibatch_stats["minibatch_tokens"]) == n


def test_verls_per_micro_batch_selection_depends_on_the_split():
    # the control: verl's kl_cov ranks within each micro-batch
    old, new, adv, mask, _, _ = _batch()
    full, _ = compute_policy_loss("kl_cov", old, new, adv, mask, "token-sum", cfg("kl_cov", kl_cov_ratio=0.1))
    parts = sum(compute_policy_loss("kl_cov", old[r], new[r], adv[r], mask[r], "token-sum",
                                    cfg("kl_cov", kl_cov_ratio=0.1))[0].item() for r in SPLIT)
    assert parts != pytest.approx(full.item(), rel=1e-6)


def test_degenerate_inputs_are_finite():
    empty = covariance_threshold(torch.zeros(0), torch.zeros(0), 0.1)
    assert empty["threshold"].item() == math.inf  # nothing to penalise
    one = covariance_threshold(torch.tensor([2.0]), torch.tensor([-1.0]), 0.1)
    assert one["threshold"].item() == 0.0  # a single token: Cov 0, selected (k >= 1)
    old = torch.zeros(2, 3)
    mask = torch.zeros(2, 3, dtype=torch.bool)  # all padding
    loss, metrics = compute_policy_loss("kl_cov_global", old, old.clone(), torch.ones(2, 3), mask, "token-mean",
                                        cfg())
    assert math.isfinite(loss.item()) and all(math.isfinite(float(v)) or k.endswith("cov_threshold")
                                              for k, v in metrics.items())
    equal = torch.ones(2, 3)  # all-equal advantages: Cov 0 everywhere, every token tied at the threshold
    loss, _ = compute_policy_loss("kl_cov_global", old, old + 0.1, equal, torch.ones(2, 3, dtype=torch.bool),
                                  "token-mean", cfg())
    assert math.isfinite(loss.item())


def _dp_job(rank, world, group):
    batch = _batch(seed=21)
    rows = list(range(rank, 8, world))
    local = list(range(len(rows)))
    split = (local[:1], local[1:]) if world > 1 else SPLIT
    run, loss_fn, _ = minibatch_split_run("kl_cov_global", batch, split, dp_group=group, rows_of_rank=rows,
                                          world=world, clip=(0.2, 0.2), kl_cov_ratio=0.1, covariance_policy="current")
    loss, grad, _ = run(local)
    return {"rows": rows, "loss": loss, "grad": grad, "threshold": float(loss_fn.minibatch_stats["threshold"])}


def test_two_data_parallel_ranks_equal_one_process(tmp_path):
    (single,) = run_on_ranks(_dp_job, 1, tmp_path / "one")
    ranks = run_on_ranks(_dp_job, 2, tmp_path / "two")
    assert all(r["threshold"] == single["threshold"] for r in ranks)
    assert_ranks_equal_single(single, ranks)


@pytest.mark.parametrize("key,value,match", [
    ("kl_cov_ratio", 0.0, r"policy_loss\.kl_cov_ratio must be in \(0, 1\]"),
    ("ppo_kl_coef", -1.0, r"policy_loss\.ppo_kl_coef must be in \[0, inf\)"),
    ("covariance_policy", "new", r"policy_loss\.covariance_policy must be one of old, current"),
    ("kl_cov_ration", 0.1, r"unknown option actor_rollout_ref\.actor\.policy_loss\.kl_cov_ration"),
])
def test_bad_options_are_rejected_at_start_up_naming_the_key(key, value, match):
    assert_loss_option_rejected("kl_cov_global", key, value, match)


def test_two_step_cpu_run_through_the_trainer(tmp_path):
    metrics = two_step_run_metrics("kl_cov_global", tmp_path)
    for step in (1, 2):
        for key in ("actor/kl_cov_global/selected_frac", "actor/kl_cov_global/cov_threshold", "actor/ppo_kl",
                    "actor/pg_loss"):
            assert key in metrics[step], (step, key, sorted(metrics[step]))
            assert math.isfinite(float(metrics[step][key])), (step, key, metrics[step][key])
        # ranked over the whole mini-batch (tiny: 32 responses, one mini-batch, two micro-batches of 16)
        tokens = float(metrics[step]["response_length/mean"]) * 32
        assert float(metrics[step]["actor/kl_cov_global/minibatch_tokens"]) == pytest.approx(tokens)
        assert 0.0 < float(metrics[step]["actor/kl_cov_global/selected_frac"]) <= 1.0
