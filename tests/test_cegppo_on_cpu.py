"""CE-GPPO (arXiv 2509.20712): every branch's gradient by autograd against the hand-computed value (boundaries
included), β₁ = β₂ = 0 equals verl's vanilla loss (value and gradient, every aggregation), the authors' code's
gradient, micro-batch invariance of the worker-side loss, verl's standard signature, option checks, and a 2-step
CPU run."""

import dataclasses
import math

import pytest
import torch
from loss_test_utils import (AGG_MODES, actor_config, agg, assert_loss_option_rejected, assert_split_invariant,
                             identity_padding, random_batch, two_step_run_metrics, vanilla, worker_data)

from hapo_verl import compute_policy_loss
from hapo_verl.algorithms.cegppo import cegppo_policy_loss
from hapo_verl.integration.loss import registered_ppo_loss

EPS_L, EPS_H, C = 0.2, 0.28, 3.0


def token_grads(ratios, advs, beta_low=0.5, beta_high=0.75, clip_low=EPS_L, clip_high=EPS_H, c=C):
    """∂loss/∂log π per token with token-sum aggregation (so each token's gradient is its own), float64."""
    old = torch.zeros(1, len(ratios), dtype=torch.float64)
    new = torch.tensor([[math.log(r) for r in ratios]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([advs], dtype=torch.float64)
    mask = torch.ones_like(adv, dtype=torch.bool)
    loss, metrics = cegppo_policy_loss(old, new, adv, mask, clip_low=clip_low, clip_high=clip_high, clip_ratio_c=c,
                                       beta_low=beta_low, beta_high=beta_high, aggregate=agg("token-sum"))
    loss.backward()
    return loss.item(), new.grad[0].tolist(), metrics


@pytest.mark.parametrize("b1,b2", [(0.5, 0.75), (0.6, 0.6)])
def test_every_branch_gradient_is_the_papers(b1, b2):
    cases = [  # (r, A, expected ∂loss/∂log π)
        (0.5, -2.0, -b1 * (1 - EPS_L) * -2.0),  # A<0, r<1-ε_l: preserved (vanilla: 0)
        (1.6, 1.5, -b2 * (1 + EPS_H) * 1.5),  # A>0, r>1+ε_h: preserved (vanilla: 0)
        (3.5, -1.0, 0.0),  # A<0, r>c: dual clip
        (1.1, 1.5, -1.1 * 1.5),  # inside the band
        (0.9, -2.0, -0.9 * -2.0),
        (2.0, -1.0, -2.0 * -1.0),  # A<0 above the band, below c: -r·A (as vanilla)
        (0.5, 1.0, -0.5 * 1.0),  # A>0 below the band: -r·A (as vanilla)
        (1.6, 0.0, 0.0),  # A = 0
    ]
    _, grads, metrics = token_grads([c[0] for c in cases], [c[1] for c in cases], b1, b2)
    assert grads == pytest.approx([c[2] for c in cases], rel=1e-12, abs=1e-15)
    assert metrics["preserved_low_frac"].item() == pytest.approx(1 / 8)
    assert metrics["pg_clipfrac"].item() - metrics["preserved_low_frac"].item() == pytest.approx(1 / 8)


def test_boundaries_belong_to_the_band():
    # r exactly 1-ε_l / 1+ε_h / c: the band (-r·A), as the authors' strict inequalities; float64 values chosen so
    # that 1 - ε and 1 + ε equal r exactly
    r_low, r_high, c = 0.75, 1.25, 2.0
    _, grads, _ = token_grads([r_low, r_high, c], [-1.0, 1.0, -1.0], clip_low=1 - r_low, clip_high=r_high - 1, c=c)
    assert grads[0] == pytest.approx(-r_low * -1.0)
    assert grads[1] == pytest.approx(-r_high * 1.0)
    # at r == c vanilla's min() ties; just past c the dual clip is active
    _, past, _ = token_grads([c * (1 + 1e-9)], [-1.0], clip_low=1 - r_low, clip_high=r_high - 1, c=c)
    assert past == [0.0]


def test_loss_value_is_vanillas_on_every_token():
    cfg = dataclasses.replace(actor_config(clip=(EPS_L, EPS_H)), clip_ratio_c=C)
    ratios, advs = [0.5, 1.6, 3.5, 1.1, 0.9, 2.0], [-2.0, 1.5, -1.0, 1.5, -2.0, -1.0]
    value, _, _ = token_grads(ratios, advs)
    old = torch.zeros(1, 6, dtype=torch.float64)
    new = torch.tensor([[math.log(r) for r in ratios]], dtype=torch.float64)
    ref, _ = vanilla(old, new, torch.tensor([advs], dtype=torch.float64), torch.ones(1, 6, dtype=torch.bool),
                     "token-sum", cfg)
    assert value == pytest.approx(ref.item(), rel=1e-12)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_zero_betas_equal_verls_vanilla_loss_value_and_gradient(mode):
    old, new, adv, mask, _, _ = random_batch(B=16, L=12, seed=3)
    new = old + (new - old) * 4  # many tokens outside the band
    cfg = actor_config(clip=(EPS_L, EPS_H), loss_mode="cegppo", beta_low=0.0, beta_high=0.0)
    lp_a, lp_b = new.clone().requires_grad_(True), new.clone().requires_grad_(True)
    ours, metrics = compute_policy_loss("cegppo", old, lp_a, adv, mask, mode, cfg)
    ref, ref_metrics = vanilla(old, lp_b, adv, mask, mode, actor_config(clip=(EPS_L, EPS_H)))
    ours.backward()
    ref.backward()
    assert ours.item() == ref.item()
    assert torch.equal(lp_a.grad, lp_b.grad)
    assert metrics["actor/pg_clipfrac"].item() == pytest.approx(ref_metrics["actor/pg_clipfrac"])
    assert (lp_a.grad != 0).sum() < mask.sum()  # the batch does have clipped tokens


def authors_code(old, new, adv, mask, clip_low, clip_high, c, beta1, beta2):
    """Kwai-Klear/CE-GPPO ``compute_gppo_loss_general_beta`` before aggregation, transcribed (token-sum)."""
    ratio = torch.exp(new - old)
    rd = ratio.detach()
    low = (ratio < 1 - clip_low) & (adv < 0)
    high = (ratio > 1 + clip_high) & (adv > 0)
    other = ~(low | high)
    loss1 = torch.zeros_like(adv)
    loss1 = torch.where(low, -beta1 * (1 - clip_low) / rd * ratio * adv, loss1)
    loss1 = torch.where(high, -beta2 * (1 + clip_high) / rd * ratio * adv, loss1)
    loss1 = torch.where(other, -ratio * adv, loss1)
    loss = torch.where(adv < 0, torch.min(-adv * c, loss1), loss1)
    return (loss * mask).sum()


def test_gradient_equals_the_authors_code():
    old, new, adv, mask, _, _ = random_batch(B=16, L=12, seed=5)
    new = old + (new - old) * 5
    a, b = new.clone().requires_grad_(True), new.clone().requires_grad_(True)
    ours, _ = cegppo_policy_loss(old, a, adv, mask, clip_low=0.2, clip_high=0.2, clip_ratio_c=10.0, beta_low=0.75,
                                 beta_high=1.0, aggregate=agg("token-sum"))
    authors_code(old, b, adv, mask, 0.2, 0.2, 10.0, 0.75, 1.0).backward()
    ours.backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_worker_loss_invariant_to_micro_batch_split():
    old, new, adv, mask, entropy, _ = random_batch(B=8, seed=9)
    new = old + (new - old) * 4
    n_tok = int(mask.sum())

    def run(rows):
        lp = new[rows].clone().requires_grad_(True)
        cfg = actor_config(clip=(0.2, 0.2), loss_mode="cegppo", beta_low=0.75, beta_high=1.0)
        with identity_padding():
            loss, metrics = registered_ppo_loss(cfg, {"log_probs": lp}, worker_data(
                old[rows], adv[rows], mask[rows], entropy[rows], global_batch_size=8, batch_num_tokens=n_tok))
        loss.backward()
        return loss.item(), lp.grad, metrics

    metrics = assert_split_invariant(run)
    assert "actor/cegppo/preserved_low_frac" in metrics


def test_runs_through_verls_standard_signature():
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    old, new, adv, mask, _, _ = random_batch()
    cfg = actor_config(loss_mode="cegppo", beta_low=0.5, beta_high=1.0)
    loss, metrics = get_policy_loss_fn("cegppo")(old, new, adv, mask, "token-mean", cfg)
    direct, _ = compute_policy_loss("cegppo", old, new, adv, mask, "token-mean", cfg)
    assert loss.item() == direct.item() and "actor/pg_clipfrac" in metrics


@pytest.mark.parametrize("key,value,match", [
    ("beta_low", -0.1, r"policy_loss\.beta_low must be in \[0, inf\)"),
    ("beta_high", float("nan"), r"policy_loss\.beta_high must be a finite number"),
    ("beta_hi", 1.0, r"unknown option actor_rollout_ref\.actor\.policy_loss\.beta_hi"),
])
def test_bad_options_are_rejected_at_start_up_naming_the_key(key, value, match):
    assert_loss_option_rejected("cegppo", key, value, match)


def test_two_step_cpu_run_through_the_trainer(tmp_path):
    metrics = two_step_run_metrics("cegppo", tmp_path)
    for step in (1, 2):
        for key in ("actor/cegppo/preserved_low_frac", "actor/pg_clipfrac", "actor/pg_loss"):
            assert key in metrics[step], (step, key, sorted(metrics[step]))
            assert math.isfinite(float(metrics[step][key])), (step, key, metrics[step][key])
