"""Archer (arXiv 2507.15778): the per-response entropy split, hand-computed loss, gradient and KL, reduction to
verl's vanilla loss plus KL, micro-batch invariance of the worker-side loss, the refusal through verl's standard
signature, and a 2-step CPU run."""

import math

import pytest
import torch
from loss_test_utils import (
    AGG_MODES,
    actor_config,
    agg,
    assert_split_invariant,
    identity_padding,
    random_batch,
    two_step_run_metrics,
    vanilla,
    worker_data,
)

from hapo_verl.algorithms.archer import archer_policy_loss, response_entropy_quantile_mask
from hapo_verl.integration.loss import LossNeedsTrainerError, registered_ppo_loss


def test_response_level_split_hand_values():
    entropy = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
                            [5.0, 0.0, 1.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0]])
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 3:] = False  # row 2 has 3 valid tokens (5, 0, 1): q0.8 = 1 + 0.6·(5-1) = 3.4 -> only 5.0 is high
    high = response_entropy_quantile_mask(entropy, mask, 0.8)
    # row 1: q0.8 of 0.1..1.0 (linear) = 0.82 -> 0.9 and 1.0
    assert high[0].nonzero().flatten().tolist() == [8, 9]
    assert high[1].nonzero().flatten().tolist() == [0]
    assert not response_entropy_quantile_mask(entropy, torch.zeros_like(mask), 0.8).any()


def test_archer_hand_computed_loss_gradient_and_kl():
    # token 0 high-entropy, token 1 low-entropy; both ratio 1.4 with A = 1
    old = torch.zeros(1, 2)
    new = torch.full((1, 2), math.log(1.4), requires_grad=True)
    adv = torch.ones(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    high = torch.tensor([[True, False]])
    ref = torch.full((1, 2), math.log(1.4) - 0.1)  # log π - log π_ref = 0.1 on both tokens
    from verl.trainer.ppo.core_algos import kl_penalty

    loss, metrics = archer_policy_loss(old, new, adv, mask, high, clip_low=0.2, clip_high=0.2, high_clip_low=0.5,
                                       high_clip_high=0.5, clip_ratio_c=10.0, aggregate=agg("token-mean"),
                                       ref_log_prob=ref, kl_fn=lambda lp, r: kl_penalty(lp, r, "k3"),
                                       low_kl_coef=0.3, high_kl_coef=0.05)
    k3 = math.exp(-0.1) + 0.1 - 1
    # high token: clip at 1.5 -> -1.4 ; low token: clipped at 1.2 -> -1.2 ; KL: (0.05 k3 + 0.3 k3) / 2
    assert loss.item() == pytest.approx((-1.4 - 1.2) / 2 + (0.05 + 0.3) * k3 / 2, rel=1e-6)
    loss.backward()
    dk3 = 1 - math.exp(-0.1)  # d/dlogπ of k3
    assert new.grad[0].tolist() == pytest.approx([(-1.4 + 0.05 * dk3) / 2, (0.0 + 0.3 * dk3) / 2], rel=1e-5)
    assert metrics["clipfrac_high_entropy"].item() == 0.0 and metrics["clipfrac_low_entropy"].item() == 1.0
    assert metrics["high_entropy_frac"].item() == 0.5


@pytest.mark.parametrize("mode", AGG_MODES)
def test_archer_with_equal_constraints_equals_vanilla_plus_kl(mode):
    from verl.trainer.ppo.core_algos import agg_loss, kl_penalty

    old, new, adv, mask, entropy, ref = random_batch(seed=7)
    high = response_entropy_quantile_mask(entropy, mask, 0.8)
    cfg = actor_config(clip=(0.2, 0.28))
    ref_pg, _ = vanilla(old, new, adv, mask, mode, cfg)
    kld = kl_penalty(new, ref, "low_var_kl")
    ref_kl = agg_loss(loss_mat=kld, loss_mask=mask, loss_agg_mode=mode)
    loss, _ = archer_policy_loss(old, new, adv, mask, high, clip_low=0.2, clip_high=0.28, high_clip_low=0.2,
                                 high_clip_high=0.28, clip_ratio_c=10.0, aggregate=agg(mode), ref_log_prob=ref,
                                 kl_fn=lambda lp, r: kl_penalty(lp, r, "low_var_kl"), low_kl_coef=0.01,
                                 high_kl_coef=0.01)
    assert loss.item() == pytest.approx((ref_pg + 0.01 * ref_kl).item(), rel=1e-6, abs=1e-7)


def test_archer_worker_loss_invariant_to_micro_batch_split():
    old, new, adv, mask, entropy, ref = random_batch(B=8, seed=8)
    cfg_kw = dict(clip=(0.2, 0.2), use_kl_loss=True, kl_loss_coef=0.1, loss_mode="archer", high_entropy_kl_coef=0.02)
    n_tok = int(mask.sum())

    def run(rows):
        lp = new[rows].clone().requires_grad_(True)
        cfg = actor_config(**cfg_kw)
        with identity_padding():
            loss, metrics = registered_ppo_loss(cfg, {"log_probs": lp}, worker_data(
                old[rows], adv[rows], mask[rows], entropy[rows], ref=ref[rows], global_batch_size=8,
                batch_num_tokens=n_tok))
        loss.backward()
        return loss.item(), lp.grad, metrics

    metrics = assert_split_invariant(run)
    assert "actor/archer/kl_low" in metrics and "actor/archer/high_entropy_frac" in metrics


def test_archer_standard_signature_refuses():
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    old, new, adv, mask, _, _ = random_batch()
    with pytest.raises(LossNeedsTrainerError, match="hapo-verl"):
        get_policy_loss_fn("archer")(old, new, adv, mask, "token-mean", actor_config(loss_mode="archer"))


def test_two_step_cpu_run_through_the_trainer(tmp_path):
    metrics = two_step_run_metrics("archer", tmp_path)
    for step in (1, 2):
        for key in ("actor/archer/high_entropy_frac", "actor/archer/kl_low", "actor/archer/clipfrac_high_entropy",
                    "actor/pg_loss"):
            assert key in metrics[step], (step, key, sorted(metrics[step]))
            assert math.isfinite(float(metrics[step][key])), (step, key, metrics[step][key])
