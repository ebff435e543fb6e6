"""HAEPO: hand-computed weights, gradient of the surrogate vs autograd of the exact objective and vs the hand
formula, reductions, micro-batch / data-parallel invariance, estimator plumbing, and a 2-step CPU run."""

import math
from unittest import mock

import numpy as np
import pytest
import torch

from hapo_verl.algorithms.haepo import (
    group_normalized_returns,
    group_softmax,
    haepo_advantages,
    haepo_objective,
    haepo_weights,
    sequence_scores,
)
from hapo_verl.integration.estimator import LAST_METRICS, EstimatorNeedsTrainerError, estimator_inputs
from hapo_verl.registration import ADV_ESTIMATOR, POLICY_LOSS, verl_function

compute_haepo_advantage = verl_function(ADV_ESTIMATOR, "haepo")
compute_haepo_policy_loss = verl_function(POLICY_LOSS, "haepo")


def actor_config(**loss_kw):
    from loss_test_utils import policy_loss_config
    from verl.workers.config import ActorConfig

    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_c=10.0,
                       policy_loss=policy_loss_config("haepo", **loss_kw))


def algo(**kw):
    return {"haepo": kw}


def batch(G=3, n=4, L=7, seed=0):
    """G prompt groups of n responses, rows shuffled so that groups are interleaved."""
    g = torch.Generator().manual_seed(seed)
    B = G * n
    perm = torch.randperm(B, generator=g)
    uid = np.array([f"p{i // n}" for i in range(B)], dtype=object)[perm.numpy()]
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    mask = (torch.arange(L)[None, :] < lengths[:, None])
    old = -torch.rand(B, L, generator=g) * 2 * mask
    rewards = torch.zeros(B, L)
    rewards[torch.arange(B), lengths - 1] = torch.randint(0, 2, (B,), generator=g).float()
    return old, mask, rewards, uid


def group_ids(uid):
    from hapo_verl.algorithms.groups import group_ids_from_index

    return group_ids_from_index(uid)


# ------------------------------------------------------------------------------------------ pieces
def test_group_softmax_matches_per_group_softmax_and_is_stable():
    scores = torch.tensor([-1000.0, -1001.0, 3.0, -999.5, 0.0])
    gid = torch.tensor([0, 0, 1, 0, 1])
    w = group_softmax(scores, gid)
    ref0 = torch.softmax(scores[[0, 1, 3]], 0)
    ref1 = torch.softmax(scores[[2, 4]], 0)
    assert torch.allclose(w[[0, 1, 3]], ref0) and torch.allclose(w[[2, 4]], ref1)
    assert torch.isfinite(w).all()


def test_hand_computed_weights_and_coefficients():
    # one group of two 2-token responses; sums L = (-1, -2); returns 1 and 0
    old = torch.tensor([[-0.5, -0.5], [-1.0, -1.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    info = haepo_weights(old, mask, torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), temperature=1.0,
                         length_normalize=False)
    w0 = math.exp(-1) / (math.exp(-1) + math.exp(-2))  # 0.7311
    assert info["weights"].tolist() == pytest.approx([w0, 1 - w0])
    # R̃ with unbiased std: mean .5, std .7071 -> ±0.7071
    r = 1 / math.sqrt(2)
    assert info["norm_returns"].tolist() == pytest.approx([r, -r], rel=1e-5)
    baseline = w0 * r - (1 - w0) * r
    assert info["baseline"].tolist() == pytest.approx([baseline, baseline], rel=1e-5)
    # coef = (B/G) w (R̃ - R̄) with B/G = 2
    assert info["coef"].tolist() == pytest.approx([2 * w0 * (r - baseline), 2 * (1 - w0) * (-r - baseline)], rel=1e-5)
    # length normalization: mean log-probs (-0.5, -1) -> softmax gap 0.5
    info_n = haepo_weights(old, mask, torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), length_normalize=True)
    assert info_n["weights"][0].item() == pytest.approx(1 / (1 + math.exp(-0.5)))


def test_padding_rows_do_not_change_the_coefficients():
    # verl appends synthetic rows (no valid token, their own uid) to make the batch divisible by dp size
    old, mask, rewards, uid = batch(G=3, n=4, seed=5)
    gid = group_ids(uid)
    R = (rewards * mask).sum(-1)
    ref = haepo_weights(old, mask, R, gid)["coef"]
    pad = 2
    old_p = torch.cat([old, torch.zeros(pad, old.shape[1])])
    mask_p = torch.cat([mask, torch.zeros(pad, old.shape[1], dtype=torch.bool)])
    gid_p = torch.cat([gid, torch.full((pad,), int(gid.max()) + 1)])
    coef = haepo_weights(old_p, mask_p, torch.cat([R, torch.zeros(pad)]), gid_p)["coef"]
    assert torch.allclose(coef[:-pad], ref) and torch.count_nonzero(coef[-pad:]) == 0


def test_group_normalized_returns_conventions():
    gid = torch.tensor([0, 0, 0, 1])
    out = group_normalized_returns(torch.tensor([1.0, 0.0, 0.0, 5.0]), gid)
    std = torch.tensor([1.0, 0.0, 0.0]).std().item()
    assert out[:3].tolist() == pytest.approx([(1 - 1 / 3) / std, -1 / 3 / std, -1 / 3 / std], rel=1e-5)
    assert out[3].item() == 5.0  # a group of one keeps R (verl GRPO convention); HAEPO's baseline cancels it


def test_raw_sums_make_the_softmax_one_hot_and_length_normalization_does_not():
    # 4 responses of 500 tokens with realistic per-token log-likelihoods -0.30 .. -0.36
    per_token = torch.tensor([-0.30, -0.32, -0.34, -0.36])
    old = per_token[:, None].expand(4, 500).clone()
    mask = torch.ones(4, 500, dtype=torch.bool)
    gid = torch.zeros(4, dtype=torch.long)
    raw = group_softmax(sequence_scores(old, mask, 1.0, length_normalize=False), gid)
    norm = group_softmax(sequence_scores(old, mask, 1.0, length_normalize=True), gid)
    assert raw.max().item() > 0.9999  # sums differ by 10 nats: one-hot
    assert norm.max().item() < 0.26  # means differ by 0.02 nats: close to uniform 0.25


# ------------------------------------------------------------------------------------------ gradients
def _surrogate_grad(old, mask, rewards, uid, temperature, length_normalize, kl_coef=0.0, split=None, dp=1,
                    shift=None):
    """Gradient of the registered loss at log_prob = old (θ = θ_old; or old + ``shift``), accumulated over
    micro-batches/ranks."""
    with estimator_inputs(old_log_prob=old):
        adv, _ = compute_haepo_advantage(rewards, mask.float(), index=uid,
                                         config=algo(temperature=temperature, length_normalize=length_normalize))
    B = old.shape[0]
    lp = (old if shift is None else old + shift).clone().requires_grad_(True)
    splits = split or [list(range(B))]
    total = torch.zeros(())
    for rank in range(dp):
        for rows in splits[rank::dp]:
            cfg = actor_config(haepo_kl_coef=kl_coef)
            cfg.global_batch_info.update(dp_size=dp, batch_num_tokens=int(mask.sum()), global_batch_size=B)
            loss, metrics = compute_haepo_policy_loss(old[rows], lp[rows], adv[rows], mask[rows], config=cfg)
            (loss / dp).backward()  # FSDP averages gradients over ranks
            total = total + loss.detach() / dp
    return lp.grad, total, metrics


@pytest.mark.parametrize("temperature,length_normalize", [(1.0, True), (0.25, True), (3.0, False), (50.0, False)])
def test_surrogate_gradient_equals_autograd_of_exact_objective_and_hand_formula(temperature, length_normalize):
    old, mask, rewards, uid = batch(seed=1)
    grad, _, _ = _surrogate_grad(old, mask, rewards, uid, temperature, length_normalize)
    # autograd of -J(θ) with the exact in-group softmax (needs whole groups, which the full batch has)
    gid = group_ids(uid)
    R = (rewards * mask).sum(-1)
    norm_R = group_normalized_returns(R, gid)
    lp = old.clone().requires_grad_(True)
    (-haepo_objective(lp, mask, norm_R, gid, temperature=temperature, length_normalize=length_normalize)).backward()
    assert torch.allclose(grad, lp.grad, atol=1e-6)
    # hand formula: d(-J)/d logp_{k,t} = -(1/G) w_k (R̃_k - R̄_g) / (κ T_k^[norm]) on valid tokens
    scores = sequence_scores(old, mask, temperature, length_normalize)
    G = int(gid.max()) + 1
    hand = torch.zeros_like(old)
    for k in range(old.shape[0]):
        members = (gid == gid[k]).nonzero().flatten()
        w = torch.softmax(scores[members], 0)
        wk = w[(members == k).nonzero().item()]
        rbar = (w * norm_R[members]).sum()
        T = mask[k].sum() if length_normalize else 1.0
        hand[k] = -(wk * (norm_R[k] - rbar) / (temperature * T) / G) * mask[k]
    assert torch.allclose(grad, hand, atol=1e-6)


def test_invariant_to_micro_batch_split_and_data_parallel_with_groups_split():
    old, mask, rewards, uid = batch(G=3, n=4, seed=2)
    # a current policy away from θ_old, so that the ratio and KL terms are not trivial
    shift = torch.randn(old.shape, generator=torch.Generator().manual_seed(9)) * 0.2 * mask
    kw = dict(kl_coef=0.1, shift=shift)
    full_grad, full_loss, _ = _surrogate_grad(old, mask, rewards, uid, 1.0, True, **kw)
    assert full_grad.abs().sum() > 0
    gid = group_ids(uid)
    # micro-batches of 5/4/3 rows: every group is split (rows are interleaved)
    split = [[0, 1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]
    assert all(len(set(gid[rows].tolist())) > 1 for rows in split)
    g1, l1, _ = _surrogate_grad(old, mask, rewards, uid, 1.0, True, split=split, **kw)
    assert torch.allclose(full_grad, g1, atol=1e-7) and l1.item() == pytest.approx(full_loss.item(), abs=1e-6)
    split4 = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    g2, l2, _ = _surrogate_grad(old, mask, rewards, uid, 1.0, True, split=split4, dp=2, **kw)
    assert torch.allclose(full_grad, g2, atol=1e-7) and l2.item() == pytest.approx(full_loss.item(), abs=1e-6)


def test_off_policy_value_and_kl_gradient_are_hand_values():
    # one sequence of two tokens, Â = 0.5 per token (given), ratios e^{0.1}, e^{-0.2}; B = 1
    old = torch.tensor([[-1.0, -2.0]])
    lp = (old + torch.tensor([[0.1, -0.2]])).requires_grad_(True)
    adv = torch.full((1, 2), 0.5)
    mask = torch.ones(1, 2, dtype=torch.bool)
    cfg = actor_config(haepo_kl_coef=0.3, haepo_kl_type="k3")
    cfg.global_batch_info.update(dp_size=1, batch_num_tokens=2, global_batch_size=1)
    loss, metrics = compute_haepo_policy_loss(old, lp, adv, mask, config=cfg)
    r = torch.exp(torch.tensor([0.1, -0.2]))
    d = torch.tensor([-0.1, 0.2])  # old - new
    k3 = torch.exp(d) - d - 1
    expected = -(0.5 * r).sum() + 0.3 * k3.mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    # d/dlp [-Â r] = -Â r ; d/dlp k3 = 1 - exp(old - lp) ; KL is a token mean (1/2)
    hand = -0.5 * r + 0.3 * (1 - torch.exp(d)) / 2
    assert torch.allclose(lp.grad[0], hand, atol=1e-6)
    assert metrics["actor/haepo/kl_prev"] == pytest.approx(k3.mean().item(), rel=1e-5)
    assert metrics["actor/ppo_kl"] == pytest.approx(0.05, rel=1e-5)


# ------------------------------------------------------------------------------------------ reductions
def test_one_response_per_group_gives_zero_policy_gradient():
    old, mask, rewards, _ = batch(G=6, n=1, seed=3)
    uid = np.array([f"p{i}" for i in range(6)], dtype=object)
    with estimator_inputs(old_log_prob=old):
        adv, _ = compute_haepo_advantage(rewards, mask.float(), index=uid, config=algo())
    assert torch.count_nonzero(adv) == 0
    grad, loss, _ = _surrogate_grad(old, mask, rewards, uid, 1.0, True, kl_coef=0.5)
    assert torch.count_nonzero(grad) == 0 and loss.item() == 0.0  # KL to π_old is 0 with 0 gradient at θ_old


def test_high_temperature_reduces_to_group_mean_baseline_reinforce():
    old, mask, rewards, uid = batch(seed=4)
    gid = group_ids(uid)
    R = (rewards * mask).sum(-1)
    info = haepo_weights(old, mask, R, gid, temperature=1e9, length_normalize=False)
    norm_R = group_normalized_returns(R, gid)
    # uniform weights: (B/G) (1/n) (R̃ - mean R̃) = R̃ (R̃ already has group mean 0)
    assert torch.allclose(info["coef"].float(), norm_R, atol=1e-6)


# ------------------------------------------------------------------------------------------ plumbing / errors
def test_estimator_needs_old_log_probs_from_the_trainer():
    old, mask, rewards, uid = batch()
    with pytest.raises(EstimatorNeedsTrainerError, match="hapo-verl"):
        compute_haepo_advantage(rewards, mask.float(), index=uid, config=algo())
    with estimator_inputs(old_log_prob=old[:, :3]):
        with pytest.raises(ValueError, match="shape"):
            compute_haepo_advantage(rewards, mask.float(), index=uid, config=algo())


def test_estimator_metrics_and_advantage_shape():
    old, mask, rewards, uid = batch()
    with estimator_inputs(old_log_prob=old):
        adv, ret = compute_haepo_advantage(rewards, mask.float(), index=uid, config=algo())
    assert adv.shape == old.shape and torch.all(adv[~mask] == 0)
    assert 0 < LAST_METRICS["haepo/effective_group_frac"] <= 1.0
    assert 0.25 <= LAST_METRICS["haepo/weight_max"] <= 1.0


@pytest.mark.parametrize("kw,pattern", [
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"length_normalize": "yes"}, "length_normalize"),
])
def test_estimator_config_validation(kw, pattern):
    from hapo_verl import registry
    from hapo_verl.integration.options import estimator_options

    spec = registry.get("haepo")
    with pytest.raises(ValueError, match=rf"algorithm\.haepo\.{pattern}"):
        estimator_options(spec, {"haepo": kw})
    with pytest.raises(ValueError, match="unknown option algorithm.haepo.temp"):
        estimator_options(spec, {"haepo": {"temp": 1.0}})


def test_loss_config_validation():
    from loss_test_utils import policy_loss_config

    with pytest.raises(ValueError, match=r"policy_loss\.haepo_kl_coef must be in \[0, inf\)"):
        policy_loss_config("haepo", haepo_kl_coef=-1.0)
    with pytest.raises(ValueError, match=r"policy_loss\.haepo_kl_type must be one of"):
        policy_loss_config("haepo", haepo_kl_type="nope")
    with pytest.raises(ValueError, match=r"policy_loss\.loss_mode must be haepo"):
        policy_loss_config("haepo").__class__(loss_mode="gspo")


def test_registered_names():
    from verl.trainer.ppo import core_algos

    from hapo_verl.registration import register

    register()
    assert core_algos.POLICY_LOSS_REGISTRY["haepo"] is compute_haepo_policy_loss
    assert core_algos.ADV_ESTIMATOR_REGISTRY["haepo"] is compute_haepo_advantage


def test_trainer_requires_estimator_and_loss_together_and_passes_old_log_probs():
    from omegaconf import OmegaConf
    from verl import DataProto
    from verl.trainer.ppo.ray_trainer import compute_advantage
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    from loss_test_utils import stub_trainer

    from hapo_verl.trainer.hapo_trainer import StepPlan

    def cfg(loss_mode, estimator):
        return OmegaConf.create({"algorithm": {"adv_estimator": estimator, "haepo": {}},
                                 "actor_rollout_ref": {"actor": {"policy_loss": {"loss_mode": loss_mode}}}})

    with pytest.raises(ValueError, match="both"):
        StepPlan.from_config(cfg("haepo", "grpo"))
    with pytest.raises(ValueError, match="both"):
        StepPlan.from_config(cfg("vanilla", "haepo"))

    trainer = stub_trainer(cfg("haepo", "haepo"))
    old, mask, rewards, uid = batch()
    trainer._old_policy = {"old_log_probs": old, "entropy": torch.rand_like(old)}

    def parent(self, b, metrics):
        data = DataProto.from_dict(tensors={"token_level_rewards": rewards, "response_mask": mask.float()},
                                   non_tensors={"uid": uid})
        out = compute_advantage(data, adv_estimator="haepo", config=self.config.algorithm)
        self.advantages = out.batch["advantages"]
        return b

    metrics = {}
    with mock.patch.object(PPOTrainerSync, "_compute_advantage", parent):
        trainer._compute_advantage("batch", metrics)
    assert trainer.advantages.shape == old.shape
    assert {"haepo/weight_max", "haepo/effective_group_frac"} <= set(metrics)


# ------------------------------------------------------------------------------------------ 2-step CPU run
def test_two_step_cpu_run_through_the_trainer(tmp_path):
    from loss_test_utils import two_step_run_metrics

    metrics = two_step_run_metrics("haepo", tmp_path)
    for step in (1, 2):
        data = metrics[step]
        for key in ("haepo/weight_max", "haepo/effective_group_frac", "actor/haepo/kl_prev",
                    "actor/haepo/ratio_mean", "actor/pg_loss"):
            assert key in data, (step, key, sorted(data))
            assert math.isfinite(float(data[key])), (step, key, data[key])
