"""Forking tokens (arXiv 2506.01939): hand-computed values, autograd vs hand formula, reduction to verl's vanilla
loss, micro-batch invariance with the global threshold, the worker-side loss, the trainer's batch statistics, and a
2-step CPU run."""

import math
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from loss_test_utils import (
    AGG_MODES,
    actor_config,
    agg,
    identity_padding,
    metric_value,
    policy_loss_config,
    random_batch,
    stub_trainer,
    two_step_run_metrics,
    vanilla,
    worker_data,
)

from hapo_verl.algorithms.forking import entropy_quantile_threshold, forking_policy_loss
from hapo_verl.integration.loss import BATCH_STATS_FIELD, registered_ppo_loss


def test_threshold_hand_values():
    entropy = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5], [0.6, 0.7, 0.8, 0.9, 1.0]])
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert entropy_quantile_threshold(entropy, mask, 0.8) == pytest.approx(0.9)  # top 2 of 10 kept
    assert entropy_quantile_threshold(entropy, mask, 0.0) == pytest.approx(0.1)  # minimum: all kept
    assert entropy_quantile_threshold(entropy, mask, 0.7) == pytest.approx(0.8)  # top 3 (0.7·10 rounding)
    mask[1, 3:] = False  # 0.9 and 1.0 are padding: top 20 % of 8 valid tokens = 2 tokens -> 0.7
    assert entropy_quantile_threshold(entropy, mask, 0.8) == pytest.approx(0.7)
    assert math.isnan(entropy_quantile_threshold(entropy, torch.zeros_like(mask), 0.8))
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        entropy_quantile_threshold(entropy, mask, 1.0)


def test_forking_hand_computed_loss_and_gradient():
    # 4 valid tokens, ratios 1 (θ = θ_old), advantages 1, -1, 2, 0.5, entropies 0.1, 2.0, 0.3, 1.5; q = 0.5 keeps 2
    old = torch.zeros(1, 4)
    new = torch.zeros(1, 4, requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 2.0, 0.5]])
    entropy = torch.tensor([[0.1, 2.0, 0.3, 1.5]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    tau = entropy_quantile_threshold(entropy, mask, 0.5)
    assert tau == pytest.approx(1.5)
    loss, metrics = forking_policy_loss(old, new, adv, mask, entropy, tau, clip_low=0.2, clip_high=0.28,
                                        clip_ratio_c=10.0, aggregate=agg("token-mean"))
    # kept tokens 1 and 3: (-(-1) - 0.5) / 4 ; the normalizer counts all 4 valid tokens
    assert loss.item() == pytest.approx((1.0 - 0.5) / 4)
    loss.backward()
    assert new.grad[0].tolist() == pytest.approx([0.0, 0.25, 0.0, -0.125])  # -A·keep/N
    assert metrics["kept_frac"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_forking_quantile_zero_equals_verl_vanilla(mode):
    old, new, adv, mask, entropy, _ = random_batch(seed=1)
    cfg = actor_config()
    ref_loss, ref_metrics = vanilla(old, new, adv, mask, mode, cfg)
    for threshold in (None, entropy_quantile_threshold(entropy, mask, 0.0)):
        loss, metrics = forking_policy_loss(old, new, adv, mask, entropy, threshold, clip_low=0.2, clip_high=0.28,
                                            clip_ratio_c=10.0, aggregate=agg(mode))
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6, abs=1e-7)
        assert metrics["pg_clipfrac"].item() == pytest.approx(ref_metrics["actor/pg_clipfrac"], abs=1e-6)
        assert metrics["ppo_kl"].item() == pytest.approx(ref_metrics["actor/ppo_kl"], abs=1e-6)


def test_forking_gradient_matches_autograd_of_hand_formula():
    old, new, adv, mask, entropy, _ = random_batch(seed=2)
    tau = entropy_quantile_threshold(entropy, mask, 0.8)
    lp = new.clone().requires_grad_(True)
    loss, _ = forking_policy_loss(old, lp, adv, mask, entropy, tau, clip_low=0.2, clip_high=0.28, clip_ratio_c=10.0,
                                  aggregate=agg("token-mean"))
    loss.backward()
    # hand formula of the (dual-)clipped PPO gradient: -A r where the unclipped branch is active, 0 elsewhere
    r = torch.exp(new - old)
    clipped = torch.clamp(r, 0.8, 1.28)
    unclipped_active = torch.where(adv >= 0, -adv * r >= -adv * clipped, -adv * r >= -adv * clipped)
    dual = (adv < 0) & (torch.maximum(-adv * r, -adv * clipped) > -adv * 10.0)
    keep = mask & (entropy >= tau)
    grad = torch.where(unclipped_active & ~dual & keep, -adv * r, torch.zeros_like(r)) / mask.sum()
    assert torch.allclose(lp.grad, grad, atol=1e-7)
    assert keep.sum() == math.ceil(0.2 * mask.sum().item())


def test_forking_invariant_to_micro_batch_split_with_global_threshold():
    old, new, adv, mask, entropy, _ = random_batch(B=8, seed=3)
    tau = entropy_quantile_threshold(entropy, mask, 0.8)  # the trainer's global-batch threshold
    info = dict(dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=8)
    for mode in AGG_MODES[:4]:
        lp = new.clone().requires_grad_(True)
        full, _ = forking_policy_loss(old, lp, adv, mask, entropy, tau, clip_low=0.2, clip_high=0.28,
                                      clip_ratio_c=10.0, aggregate=agg(mode, **info))
        full.backward()
        g_full = lp.grad.clone()
        lp.grad = None
        total = 0.0
        for rows in ([0, 1, 2], [3, 4], [5, 6, 7]):
            part, _ = forking_policy_loss(old[rows], lp[rows], adv[rows], mask[rows], entropy[rows], tau,
                                          clip_low=0.2, clip_high=0.28, clip_ratio_c=10.0,
                                          aggregate=agg(mode, **info))
            part.backward()
            total += part.item()
        assert total == pytest.approx(full.item(), rel=1e-6, abs=1e-7)
        assert torch.allclose(lp.grad, g_full, atol=1e-7)


# ---------------------------------------------------------------- worker-side loss (verl's ppo_loss bookkeeping)
@pytest.mark.parametrize("use_kl", [False, True])
def test_worker_loss_quantile_zero_equals_verl_ppo_loss(use_kl):
    from verl.workers.utils import losses as verl_losses

    old, new, adv, mask, entropy, ref = random_batch(seed=4)
    current_entropy = torch.rand_like(old)
    outs = []
    for fn, loss_kw in ((verl_losses.ppo_loss, {}), (registered_ppo_loss, {"loss_mode": "forking",
                                                                            "top_entropy_quantile": 0.0})):
        cfg = actor_config(use_kl_loss=use_kl, entropy_coeff=0.01, **loss_kw)
        data = worker_data(old, adv, mask, entropy, ref=ref if use_kl else None, global_batch_size=8,
                           batch_num_tokens=int(mask.sum()))
        with identity_padding(), mock.patch.object(verl_losses, "no_padding_2_padding", lambda t, d: t):
            loss, metrics = fn(cfg, {"log_probs": new, "entropy": current_entropy}, data)
        outs.append((loss, metrics))
    assert outs[1][0].item() == pytest.approx(outs[0][0].item(), rel=1e-6)
    for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/entropy_loss") + (("kl_loss",) if use_kl else ()):
        a, b = metric_value(outs[0][1][key]), metric_value(outs[1][1][key])
        assert b == pytest.approx(a, rel=1e-6, abs=1e-8), key


def test_worker_loss_uses_the_trainer_threshold_and_fails_without_it():
    old, new, adv, mask, entropy, _ = random_batch(seed=5)
    tau = entropy_quantile_threshold(entropy, mask, 0.8)
    cfg = actor_config(loss_mode="forking", top_entropy_quantile=0.8)
    with identity_padding():
        with pytest.raises(RuntimeError, match=BATCH_STATS_FIELD):
            registered_ppo_loss(cfg, {"log_probs": new}, worker_data(old, adv, mask, entropy, global_batch_size=8,
                                                                  batch_num_tokens=int(mask.sum())))
        loss, metrics = registered_ppo_loss(cfg, {"log_probs": new}, worker_data(
            old, adv, mask, entropy, batch_stats={"forking": {"threshold": tau}}, global_batch_size=8, batch_num_tokens=int(mask.sum())))
    expected, _ = forking_policy_loss(old, new, adv, mask, entropy, tau, clip_low=0.2, clip_high=0.28,
                                      clip_ratio_c=10.0, aggregate=agg("token-mean", dp_size=1,
                                                                       batch_num_tokens=int(mask.sum()),
                                                                       global_batch_size=8))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert metric_value(metrics["actor/forking/kept_frac"]) == pytest.approx(0.2, abs=0.05)
    assert metric_value(metrics["actor/forking/threshold"]) == pytest.approx(tau)


def test_trainer_computes_global_threshold_and_sends_it():
    from omegaconf import OmegaConf
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    trainer = stub_trainer(OmegaConf.create({"algorithm": {"adv_estimator": "grpo"}, "actor_rollout_ref": {"actor": {
        "policy_loss": {"loss_mode": "forking", "top_entropy_quantile": 0.8}}}}))
    _, _, _, mask, entropy, _ = random_batch(seed=6)
    old = {"old_log_probs": torch.zeros_like(entropy), "entropy": entropy, "response_mask": mask}
    metrics = {}
    with mock.patch.object(PPOTrainerSync, "_compute_old_log_prob", lambda self, b, m: b), \
            mock.patch("hapo_verl.trainer.hapo_trainer.fetch_old_policy", lambda b: old):
        trainer._compute_old_log_prob("batch", metrics)
    assert metrics["forking/threshold"] == pytest.approx(entropy_quantile_threshold(entropy, mask, 0.8))
    batch = SimpleNamespace(extra_info={})
    with mock.patch.object(PPOTrainerSync, "_update_actor", lambda self, b, m: b):
        trainer._update_actor(batch, {})
    sent = batch.extra_info[BATCH_STATS_FIELD]
    assert sent == {"forking": {"threshold": pytest.approx(metrics["forking/threshold"])}}


def test_forking_config_validation():
    with pytest.raises(ValueError, match=r"policy_loss\.top_entropy_quantile must be in \[0, 1\)"):
        policy_loss_config("forking", top_entropy_quantile=1.0)
    with pytest.raises(ValueError, match=r"unknown option .*policy_loss\.top_entropy_quantile"):
        policy_loss_config("hapo").__class__.from_mapping({"loss_mode": "hapo", "top_entropy_quantile": 0.5})


def test_two_step_cpu_run_through_the_trainer(tmp_path):
    metrics = two_step_run_metrics("forking", tmp_path)
    for step in (1, 2):
        for key in ("forking/threshold", "forking/kept_frac_batch", "actor/forking/kept_frac",
                    "actor/forking/threshold", "actor/pg_loss"):
            assert key in metrics[step], (step, key, sorted(metrics[step]))
            assert math.isfinite(float(metrics[step][key])), (step, key, metrics[step][key])
