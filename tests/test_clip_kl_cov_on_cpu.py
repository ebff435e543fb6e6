"""Clip-Cov / KL-Cov (arXiv 2505.22617), verl's built-in loss modes made first-class: hand-computed branches of
both through ``hapo_verl.compute_policy_loss``, the per-micro-batch selection caveat, start-up checks of their keys,
and a 2-step CPU run of each config."""

import math

import pytest
import torch
from loss_test_utils import actor_config, random_batch, two_step_run_metrics

from hapo_verl import compute_policy_loss


def cov_config(loss_mode, clip=(0.2, 0.2), **keys):
    return actor_config(clip=clip, loss_mode=loss_mode, **keys)


def test_kl_cov_hand_computed_value_and_gradient():
    # 4 tokens; A and log π chosen so that token 0 has the largest covariance (A - mean A)(log π - mean log π)
    old = torch.zeros(1, 4, dtype=torch.float64)
    lp_values = [math.log(1.5), math.log(0.5), math.log(1.1), math.log(0.9)]
    adv = torch.tensor([[2.0, -1.0, 0.5, -1.5]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    lp = torch.tensor([lp_values], dtype=torch.float64, requires_grad=True)
    a, p = adv[0], torch.tensor(lp_values, dtype=torch.float64)
    cov = (a - a.mean()) * (p - p.mean())
    assert int(cov.argmax()) == 0
    cfg = cov_config("kl_cov", kl_cov_ratio=0.25, ppo_kl_coef=0.7)  # k = max(1, int(4 * 0.25)) = 1 token
    loss, metrics = compute_policy_loss("kl_cov", old, lp, adv, mask, "token-sum", cfg)
    r = [1.5, 0.5, 1.1, 0.9]
    # every token: -r·A (no PPO clip in KL-Cov); token 0 adds 0.7·|log r|
    expected = sum(-ri * ai for ri, ai in zip(r, adv[0].tolist())) + 0.7 * abs(math.log(1.5))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    grads = [-ri * ai for ri, ai in zip(r, adv[0].tolist())]
    grads[0] += 0.7  # d|log r|/d log π = sign(log r) = +1
    assert lp.grad[0].tolist() == pytest.approx(grads, rel=1e-12)
    assert isinstance(metrics["actor/ppo_kl"], torch.Tensor)


def test_clip_cov_hand_computed_gradient():
    # clip 1/1 (the authors' band [0, 2]); covariance of tokens 0 and 2 is inside (lb, ub) = (0.01, 5)
    old = torch.zeros(1, 4, dtype=torch.float64)
    r = [1.6, 0.5, 0.7, 1.2]
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    lp = torch.tensor([[math.log(x) for x in r]], dtype=torch.float64, requires_grad=True)
    mask = torch.ones(1, 4, dtype=torch.bool)
    a, p = adv[0], lp.detach()[0]
    cov = (a - a.mean()) * (p - p.mean())
    inside = ((cov > 0.01) & (cov < 5.0)).tolist()
    assert inside == [True, False, True, False]
    # ratio 0.5 -> int(0.5 * 4) = 2 tokens to clip: both candidates, so the random pick is deterministic
    cfg = cov_config("clip_cov", clip=(1.0, 1.0), clip_cov_ratio=0.5, clip_cov_lb=0.01, clip_cov_ub=5.0)
    loss, metrics = compute_policy_loss("clip_cov", old, lp, adv, mask, "token-sum", cfg)
    loss.backward()
    expected = [0.0 if inside[i] else -r[i] * adv[0, i].item() for i in range(4)]
    assert lp.grad[0].tolist() == pytest.approx(expected, rel=1e-12)
    assert metrics["actor/pg_clipfrac"].item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(-0.5 * 1.0 + 1.2 * 1.0, rel=1e-12)


def test_selection_is_per_micro_batch_the_documented_caveat():
    """verl ranks the covariance over the tokens of one call (one micro-batch on one GPU): the same global batch
    split differently selects different tokens. docs/clip_kl_cov.md states it; this fails if verl changes."""
    old, new, adv, mask, _, _ = random_batch(B=8, L=9, seed=21)
    n_tok = int(mask.sum())
    cfg = cov_config("kl_cov", kl_cov_ratio=0.05, ppo_kl_coef=1.0)
    cfg.global_batch_info.update(dp_size=1, batch_num_tokens=n_tok, global_batch_size=8)

    def grads(parts):
        g = torch.zeros_like(new)
        total = 0.0
        for rows in parts:
            lp = new[rows].clone().requires_grad_(True)
            loss, _ = compute_policy_loss("kl_cov", old[rows], lp, adv[rows], mask[rows], "token-mean", cfg)
            loss.backward()
            g[rows] = lp.grad
            total += loss.item()
        return total, g

    full, g_full = grads([list(range(8))])
    split, g_split = grads([[0, 1, 2, 3], [4, 5, 6, 7]])
    assert not torch.allclose(g_full, g_split, atol=1e-9) or full != pytest.approx(split, rel=1e-9)


@pytest.mark.parametrize("config,key,value,match", [
    ("clip_cov", "clip_cov_ratio", 0.0, r"policy_loss\.clip_cov_ratio must be in \(0, 1\], got 0"),
    ("clip_cov", "clip_cov_ub", 0.5, r"policy_loss\.clip_cov_lb must be below .*policy_loss\.clip_cov_ub"),
    ("kl_cov", "kl_cov_ratio", 1.5, r"policy_loss\.kl_cov_ratio must be in \(0, 1\]"),
    ("kl_cov", "ppo_kl_coef", -1.0, r"policy_loss\.ppo_kl_coef must be in \[0, inf\)"),
])
def test_bad_ranges_are_rejected_at_start_up_naming_the_key(config, key, value, match):
    from hapo_verl.launcher import compose, prepare_config

    cfg = compose(config, ["actor_rollout_ref.rollout.name=vllm", f"actor_rollout_ref.actor.policy_loss.{key}={value}"])
    with pytest.raises(ValueError, match=match):
        prepare_config(cfg)


def test_unknown_key_is_rejected_naming_it():
    from hapo_verl.launcher import compose

    with pytest.raises(Exception, match="clip_cov_ratoi"):
        compose("clip_cov", ["actor_rollout_ref.actor.policy_loss.clip_cov_ratoi=0.001"])


def test_configs_hold_the_authors_7b_values():
    from hapo_verl.launcher import compose

    clip = compose("clip_cov", []).actor_rollout_ref.actor
    assert clip.policy_loss.loss_mode == "clip_cov"
    assert (clip.policy_loss.clip_cov_ratio, clip.policy_loss.clip_cov_lb, clip.policy_loss.clip_cov_ub) == (
        0.0002, 1.0, 5.0)
    assert (clip.clip_ratio_low, clip.clip_ratio_high) == (1.0, 1.0)
    kl = compose("kl_cov", []).actor_rollout_ref.actor
    assert (kl.policy_loss.loss_mode, kl.policy_loss.kl_cov_ratio, kl.policy_loss.ppo_kl_coef) == ("kl_cov", 0.002, 1.0)


@pytest.mark.parametrize("config", ["clip_cov", "kl_cov"])
def test_two_step_cpu_run_through_the_trainer(config, tmp_path):
    metrics = two_step_run_metrics(config, tmp_path)
    for step in (1, 2):
        for key in ("actor/ppo_kl", "actor/pg_loss"):
            assert key in metrics[step], (step, key, sorted(metrics[step]))
            assert math.isfinite(float(metrics[step][key])), (step, key, metrics[step][key])

