"""CE-GPPO (arXiv 2509.20712): every branch's gradient by autograd against the hand-computed value of Eq. 10
(boundaries included, with and without the dual clip), the vectorised loss against a per-token loop of Eq. 10,
β₁ = β₂ = 0 equals PPO (Eq. 8's remark: verl's vanilla loss with the dual clip, the plain clipped objective without),
the authors' code's gradient (dual_clip=true), the defaults, micro-batch invariance of the worker-side loss, verl's
standard signature, option checks, and a 2-step CPU run."""

import dataclasses
import math

import pytest
import torch
from loss_test_utils import (AGG_MODES, actor_config, agg, assert_loss_option_rejected, assert_split_invariant,
                             identity_padding, random_batch, two_step_run_metrics, vanilla, worker_data)

from hapo_verl import compute_policy_loss
from hapo_verl.algorithms.cegppo import CEGPPOOptions, cegppo_policy_loss
from hapo_verl.integration.loss import registered_ppo_loss

EPS_L, EPS_H, C = 0.2, 0.28, 3.0


def token_grads(ratios, advs, beta_low=0.5, beta_high=0.75, clip_low=EPS_L, clip_high=EPS_H, c=C, dual_clip=False):
    """∂loss/∂log π per token with token-sum aggregation (so each token's gradient is its own), float64."""
    old = torch.zeros(1, len(ratios), dtype=torch.float64)
    new = torch.tensor([[math.log(r) for r in ratios]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([advs], dtype=torch.float64)
    mask = torch.ones_like(adv, dtype=torch.bool)
    loss, metrics = cegppo_policy_loss(old, new, adv, mask, clip_low=clip_low, clip_high=clip_high, clip_ratio_c=c,
                                       beta_low=beta_low, beta_high=beta_high, aggregate=agg("token-sum"),
                                       dual_clip=dual_clip)
    loss.backward()
    return loss.item(), new.grad[0].tolist(), metrics


@pytest.mark.parametrize("dual_clip", [False, True])
@pytest.mark.parametrize("b1,b2", [(0.5, 0.75), (0.6, 0.6)])
def test_every_branch_gradient_is_the_papers(b1, b2, dual_clip):
    cases = [  # (r, A, expected ∂loss/∂log π = -F·A, Eq. 10)
        (0.5, -2.0, -b1 * (1 - EPS_L) * -2.0),  # A<0, r<1-ε_l: preserved (vanilla: 0)
        (1.6, 1.5, -b2 * (1 + EPS_H) * 1.5),  # A>0, r>1+ε_h: preserved (vanilla: 0)
        # A<0, r>c: the paper keeps -r·A; the dual clip (authors' code) zeroes it
        (3.5, -1.0, 0.0 if dual_clip else -3.5 * -1.0),
        (1.1, 1.5, -1.1 * 1.5),  # inside the band
        (0.9, -2.0, -0.9 * -2.0),
        (2.0, -1.0, -2.0 * -1.0),  # A<0 above the band, below c: -r·A (as vanilla)
        (0.5, 1.0, -0.5 * 1.0),  # A>0 below the band: -r·A (as vanilla)
        (1.6, 0.0, 0.0),  # A = 0
    ]
    _, grads, metrics = token_grads([c[0] for c in cases], [c[1] for c in cases], b1, b2, dual_clip=dual_clip)
    assert grads == pytest.approx([c[2] for c in cases], rel=1e-12, abs=1e-15)
    assert metrics["preserved_low_frac"].item() == pytest.approx(1 / 8)
    assert metrics["pg_clipfrac"].item() - metrics["preserved_low_frac"].item() == pytest.approx(1 / 8)
    assert metrics["pg_clipfrac_lower"].item() == pytest.approx(1 / 8 if dual_clip else 0.0)


def paper_gradient_loop(ratios, advs, b1, b2, eps_l, eps_h, c=None):
    """∂loss/∂log π of each token by Eq. 10, one token at a time (c: the authors' dual clip, None: the paper)."""
    out = []
    for r, a in zip(ratios, advs):
        if a < 0 and r < 1 - eps_l:
            f = b1 * (1 - eps_l)
        elif a > 0 and r > 1 + eps_h:
            f = b2 * (1 + eps_h)
        elif c is not None and a < 0 and r > c:
            f = 0.0
        else:
            f = r
        out.append(-f * a)
    return out


@pytest.mark.parametrize("dual_clip", [False, True])
def test_vectorised_gradient_equals_a_loop_over_eq_10(dual_clip):
    old, new, adv, mask, _, _ = random_batch(B=16, L=12, seed=21)
    old, adv = old.double(), adv.double()
    new = (old + (new.double() - old) * 5).requires_grad_(True)  # ratios far outside the band, some beyond c
    loss, _ = cegppo_policy_loss(old, new, adv, mask, clip_low=EPS_L, clip_high=EPS_H, clip_ratio_c=C, beta_low=0.3,
                                 beta_high=0.9, aggregate=agg("token-sum"), dual_clip=dual_clip)
    loss.backward()
    ratios = torch.exp(new.detach() - old)[mask].tolist()
    expected = paper_gradient_loop(ratios, adv[mask].tolist(), 0.3, 0.9, EPS_L, EPS_H, C if dual_clip else None)
    assert new.grad[mask].tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert (new.grad[~mask] == 0).all()
    # the batch exercises every branch, the dual-clip one included
    r, a = torch.tensor(ratios), torch.tensor(adv[mask].tolist())
    assert ((a < 0) & (r < 1 - EPS_L)).any() and ((a > 0) & (r > 1 + EPS_H)).any() and ((a < 0) & (r > C)).any()


def test_boundaries_belong_to_the_band():
    # r exactly 1-ε_l / 1+ε_h / c: the band (-r·A), as the authors' strict inequalities; float64 values chosen so
    # that 1 - ε and 1 + ε equal r exactly
    r_low, r_high, c = 0.75, 1.25, 2.0
    _, grads, _ = token_grads([r_low, r_high, c], [-1.0, 1.0, -1.0], clip_low=1 - r_low, clip_high=r_high - 1, c=c)
    assert grads[0] == pytest.approx(-r_low * -1.0)
    assert grads[1] == pytest.approx(-r_high * 1.0)
    # at r == c vanilla's min() ties; just past c the dual clip is active (dual_clip=true), the paper keeps -r·A
    past_c = c * (1 + 1e-9)
    _, past, _ = token_grads([past_c], [-1.0], clip_low=1 - r_low, clip_high=r_high - 1, c=c, dual_clip=True)
    assert past == [0.0]
    _, past, _ = token_grads([past_c], [-1.0], clip_low=1 - r_low, clip_high=r_high - 1, c=c)
    assert past == pytest.approx([past_c])


def test_loss_value_is_ppos_on_every_token():
    cfg = dataclasses.replace(actor_config(clip=(EPS_L, EPS_H)), clip_ratio_c=C)
    ratios, advs = [0.5, 1.6, 3.5, 1.1, 0.9, 2.0], [-2.0, 1.5, -1.0, 1.5, -2.0, -1.0]
    # the paper's (no dual clip), by hand: max(-A·r, -A·clip(r)) per token
    value, _, _ = token_grads(ratios, advs)
    by_hand = [1.6, -1.5 * 1.28, 3.5, -1.5 * 1.1, 1.8, 2.0]
    assert value == pytest.approx(sum(by_hand), rel=1e-12)
    # with the dual clip: verl's vanilla value
    value, _, _ = token_grads(ratios, advs, dual_clip=True)
    old = torch.zeros(1, 6, dtype=torch.float64)
    new = torch.tensor([[math.log(r) for r in ratios]], dtype=torch.float64)
    ref, _ = vanilla(old, new, torch.tensor([advs], dtype=torch.float64), torch.ones(1, 6, dtype=torch.bool),
                     "token-sum", cfg)
    assert value == pytest.approx(ref.item(), rel=1e-12)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_zero_betas_equal_verls_vanilla_loss_value_and_gradient(mode):
    old, new, adv, mask, _, _ = random_batch(B=16, L=12, seed=3)
    new = old + (new - old) * 4  # many tokens outside the band
    cfg = actor_config(clip=(EPS_L, EPS_H), loss_mode="cegppo", beta_low=0.0, beta_high=0.0, dual_clip=True)
    lp_a, lp_b = new.clone().requires_grad_(True), new.clone().requires_grad_(True)
    ours, metrics = compute_policy_loss("cegppo", old, lp_a, adv, mask, mode, cfg)
    ref, ref_metrics = vanilla(old, lp_b, adv, mask, mode, actor_config(clip=(EPS_L, EPS_H)))
    ours.backward()
    ref.backward()
    assert ours.item() == ref.item()
    assert torch.equal(lp_a.grad, lp_b.grad)
    assert metrics["actor/pg_clipfrac"].item() == pytest.approx(ref_metrics["actor/pg_clipfrac"])
    assert (lp_a.grad != 0).sum() < mask.sum()  # the batch does have clipped tokens


def test_zero_betas_without_dual_clip_are_ppos_clipped_objective():
    # Eq. 8: "when β1 = β2 = 0, CE-GPPO is equivalent to PPO" (Eq. 1, no dual clip): loss max(-A·r, -A·clip(r))
    old, new, adv, mask, _, _ = random_batch(B=16, L=12, seed=4)
    old, adv = old.double(), adv.double()
    new = old + (new.double() - old) * 6
    a, b = new.clone().requires_grad_(True), new.clone().requires_grad_(True)
    ours, metrics = cegppo_policy_loss(old, a, adv, mask, clip_low=EPS_L, clip_high=EPS_H, clip_ratio_c=C,
                                       beta_low=0.0, beta_high=0.0, aggregate=agg("token-mean"))
    ratio = torch.exp(b - old)
    ref = agg("token-mean")(torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - EPS_L, 1 + EPS_H)), mask)
    ours.backward()
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(a.grad, b.grad, rtol=1e-12, atol=1e-15)
    assert ((adv < 0) & (ratio.detach() > C) & mask).any()  # tokens the dual clip would have silenced
    assert metrics["pg_clipfrac_lower"].item() == 0.0


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
                                 beta_high=1.0, aggregate=agg("token-sum"), dual_clip=True)
    authors_code(old, b, adv, mask, 0.2, 0.2, 10.0, 0.75, 1.0).backward()
    ours.backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)
    assert ((adv < 0) & (torch.exp(new - old) > 10.0) & mask).any()  # the dual clip does act in this batch


def test_defaults_are_the_papers():
    # β₁ = 0.5, β₂ = 1 ("a generally effective setting", Limitations; Table 1), no dual clip (Eq. 8)
    assert (CEGPPOOptions().beta_low, CEGPPOOptions().beta_high, CEGPPOOptions().dual_clip) == (0.5, 1.0, False)
    old, new, adv, mask, _, _ = random_batch(B=8, L=12, seed=6)
    new = (old + (new - old) * 8).requires_grad_(True)
    loss, _ = compute_policy_loss("cegppo", old, new, adv, mask, "token-sum",
                                  dataclasses.replace(actor_config(clip=(EPS_L, EPS_H), loss_mode="cegppo"),
                                                      clip_ratio_c=C))
    loss.backward()
    ratios = torch.exp(new.detach() - old)[mask].tolist()
    expected = paper_gradient_loop(ratios, adv[mask].tolist(), 0.5, 1.0, EPS_L, EPS_H)
    assert new.grad[mask].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)


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
    ("dual_clip", 3, r"policy_loss\.dual_clip must be true or false"),
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
