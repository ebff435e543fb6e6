"""HAPO policy loss: hand-computed pieces, reductions to verl's vanilla loss, micro-batch invariance, errors."""

import pytest
import torch

from hapo_verl.algorithms.entropy import compute_entropy_stats, entropy_score
from hapo_verl.algorithms.policy_loss import adaptive_clip_ranges, redistribute_advantage
from hapo_verl.config import HAPOPolicyLossConfig
from hapo_verl.integration.loss import LossNeedsTrainerError, compute_hapo_policy_loss

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def actor_config(**loss_kw):
    from verl.workers.config import ActorConfig

    clip = loss_kw.pop("clip", (0.2, 0.28))
    return ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio_low=clip[0],
        clip_ratio_high=clip[1],
        clip_ratio_c=10.0,
        policy_loss=HAPOPolicyLossConfig(**loss_kw),
    )


def random_batch(B=6, L=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).float()
    old = -torch.rand(B, L, generator=g) * 3
    new = (old + torch.randn(B, L, generator=g) * 0.3).requires_grad_(True)
    adv = (torch.randn(B, 1, generator=g)).expand(B, L) * mask
    entropy = torch.rand(B, L, generator=g) * 2
    return old, new, adv.contiguous(), mask, entropy


def test_adaptive_clip_ranges_hand_values():
    h = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    low, high = adaptive_clip_ranges(h, 0.2, 0.28, clip_alpha=1.0)
    assert low.tolist() == pytest.approx([0.4, 0.3, 0.2, 0.2, 0.2])
    assert high.tolist() == pytest.approx([0.28, 0.28, 0.28, 0.42, 0.56])
    low0, high0 = adaptive_clip_ranges(h, 0.2, 0.2, clip_alpha=0.0)
    assert low0.tolist() == pytest.approx([0.2] * 5) and high0.tolist() == pytest.approx([0.2] * 5)


def test_redistribute_advantage_hand_values():
    # band with eps 0.2/0.2: (0.9, 1.1)
    adv = torch.full((4,), 2.0)
    ratio = torch.tensor([1.0, 1.3, 1.0, 1.3])
    h = torch.tensor([0.5, 0.5, -0.5, -0.5])
    out, modulated = redistribute_advantage(adv, ratio, h, 0.2, 0.2, adv_beta=1.0)
    # high entropy: in band -> unchanged, out of band -> x1.5 ; low entropy: in band -> x0.5, out -> unchanged
    assert out.tolist() == pytest.approx([2.0, 3.0, 1.0, 2.0])
    assert modulated.tolist() == [False, True, True, False]


def test_hand_computed_loss_one_token_each_branch():
    # two tokens, token-mean; ĥ given through stats so that token 0 has ĥ=+1, token 1 ĥ=-1
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.3, 0.7]])).requires_grad_(True)  # ratios 1.3 and 0.7
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    entropy = torch.tensor([[2.0, 0.5]])
    # population log-entropies (ln 2, -ln 2, 0): pivot 0, symmetric extremes
    stats = compute_entropy_stats(torch.tensor([2.0, 0.5, 1.0]), torch.ones(3), 0.5)
    h = entropy_score(entropy, stats)
    assert h.tolist()[0] == pytest.approx([1.0, -1.0], abs=1e-6)
    cfg = actor_config(clip=(0.2, 0.2))
    loss, metrics = compute_hapo_policy_loss(old, new, adv, mask, entropy, "token-mean", cfg, entropy_stats=stats)
    # token 0: eps_high' = 0.4 -> clip at 1.4 (ratio 1.3 not clipped); r outside band (0.9,1.1) and ĥ>0 -> A'=2
    #          loss = -2*1.3 = -2.6
    # token 1: eps_low' = 0.4 -> floor 0.6 (ratio 0.7 not clipped); r out of band (0.8, 1.1) -> A' = A = -1
    #          loss = max(0.7, 0.7) = 0.7 ; dual clip min(0.7, 10) = 0.7
    assert loss.item() == pytest.approx((-2.6 + 0.7) / 2, rel=1e-5)
    assert metrics["actor/pg_clipfrac"] == 0.0
    assert metrics["actor/hapo/amplified_frac"] == pytest.approx(0.5)
    assert metrics["actor/hapo/attenuated_frac"] == 0.0
    assert metrics["actor/hapo/clip_upper_bound_mean"] == pytest.approx((1.4 + 1.2) / 2)
    assert metrics["actor/hapo/clip_lower_bound_mean"] == pytest.approx((0.8 + 0.6) / 2)
    loss.backward()
    # d/dlogp of -A' r = -A' r
    assert new.grad.tolist()[0] == pytest.approx([-2.6 / 2, 0.7 / 2], rel=1e-5)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("with_weights", [False, True])
def test_components_off_equal_verl_vanilla(mode, with_weights):
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla

    old, new, adv, mask, entropy = random_batch(seed=3)
    weights = torch.rand_like(old) if with_weights else None
    cfg = actor_config(adaptive_clip=False, adaptive_advantage=False)
    loss, metrics = compute_hapo_policy_loss(old, new, adv, mask, entropy, mode, cfg, rollout_is_weights=weights)
    (g_hapo,) = torch.autograd.grad(loss, new)
    ref_loss, ref_metrics = compute_policy_loss_vanilla(old, new, adv, mask.bool(), mode, cfg, weights)
    (g_ref,) = torch.autograd.grad(ref_loss, new)
    assert torch.equal(loss, ref_loss)
    assert torch.equal(g_hapo, g_ref)
    for key, value in ref_metrics.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6)


def test_gradient_matches_hand_formula():
    old, new, adv, mask, entropy = random_batch(seed=5)
    cfg = actor_config()
    stats = compute_entropy_stats(entropy, mask)
    loss, _ = compute_hapo_policy_loss(old, new, adv, mask, entropy, "token-mean", cfg, entropy_stats=stats)
    (grad,) = torch.autograd.grad(loss, new)
    # hand formula: d loss / d logp = -A' r / N on tokens where the unclipped branch is active, else 0
    with torch.no_grad():
        h = entropy_score(entropy, stats)
        lo, hi = adaptive_clip_ranges(h, 0.2, 0.28, 1.0)
        r = torch.exp(new - old)
        a2, _ = redistribute_advantage(adv, r, h, lo, hi, 1.0)
        unclipped = -a2 * r >= -a2 * torch.clamp(r, 1 - lo, 1 + hi)
        dual = (a2 < 0) & (-a2 * 10.0 < torch.maximum(-a2 * r, -a2 * torch.clamp(r, 1 - lo, 1 + hi)))
        active = unclipped & ~dual & (r.clamp(1 - lo, 1 + hi) != r) | ((r >= 1 - lo) & (r <= 1 + hi) & ~dual)
        expected = torch.where(active, -a2 * r, torch.zeros_like(r)) * mask / mask.sum()
    assert torch.allclose(grad, expected, atol=1e-6)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_invariant_to_micro_batch_split_with_global_batch_info(mode):
    old, new, adv, mask, entropy = random_batch(B=8, seed=11)
    stats = compute_entropy_stats(entropy, mask)
    cfg = actor_config()
    cfg.global_batch_info.update(dp_size=1, batch_num_tokens=mask.sum(), global_batch_size=8,
                                 loss_scale_factor=None)
    full, _ = compute_hapo_policy_loss(old, new, adv, mask, entropy, mode, cfg, entropy_stats=stats)
    (g_full,) = torch.autograd.grad(full, new)
    total = 0
    for sl in (slice(0, 3), slice(3, 8)):
        part, _ = compute_hapo_policy_loss(old[sl], new[sl], adv[sl], mask[sl], entropy[sl], mode, cfg,
                                           entropy_stats=stats)
        total = total + part
    (g_split,) = torch.autograd.grad(total, new)
    assert total.item() == pytest.approx(full.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(g_split, g_full, atol=1e-6)


def test_data_parallel_split_matches_single_rank():
    # two ranks each hold half the batch; DDP averages gradients: mean of rank losses == single-rank loss
    old, new, adv, mask, entropy = random_batch(B=8, seed=13)
    stats = compute_entropy_stats(entropy, mask)
    cfg1 = actor_config()
    cfg1.global_batch_info.update(dp_size=1, batch_num_tokens=mask.sum(), global_batch_size=8)
    single, _ = compute_hapo_policy_loss(old, new, adv, mask, entropy, "token-mean", cfg1, entropy_stats=stats)
    cfg2 = actor_config()
    cfg2.global_batch_info.update(dp_size=2, batch_num_tokens=mask.sum(), global_batch_size=8)
    ranks = [compute_hapo_policy_loss(old[s], new[s], adv[s], mask[s], entropy[s], "token-mean", cfg2,
                                      entropy_stats=stats)[0] for s in (slice(0, 4), slice(4, 8))]
    assert (sum(ranks) / 2).item() == pytest.approx(single.item(), rel=1e-6)


def test_reference_compat_uses_per_micro_batch_stats_and_unsigned_score():
    old, new, adv, mask, entropy = random_batch(seed=17)
    cfg = actor_config(reference_compat=True)
    loss, metrics = compute_hapo_policy_loss(old, new, adv, mask, entropy, "token-mean", cfg)
    assert 0.0 <= metrics["actor/hapo/h_hat_mean"] <= 1.0
    assert metrics["actor/hapo/attenuated_frac"] == 0.0  # the fork never attenuates
    assert metrics["actor/hapo/clip_lower_bound_mean"] == pytest.approx(0.8)  # never widens the floor
    # without stats the statistics come from these tokens only
    stats_here = compute_entropy_stats(entropy, mask, 0.8)
    loss2, _ = compute_hapo_policy_loss(old, new, adv, mask, entropy, "token-mean", cfg, entropy_stats=stats_here)
    assert torch.equal(loss, loss2)


def test_metrics_present_and_finite():
    old, new, adv, mask, entropy = random_batch(seed=19)
    _, metrics = compute_hapo_policy_loss(old, new, adv, mask, entropy, "token-mean", actor_config())
    for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower", "actor/hapo/h_hat_mean",
                "actor/hapo/clipfrac_high_entropy", "actor/hapo/clipfrac_low_entropy", "actor/hapo/amplified_frac",
                "actor/hapo/attenuated_frac", "actor/hapo/clip_lower_bound_mean", "actor/hapo/clip_upper_bound_mean"):
        assert key in metrics and torch.isfinite(torch.tensor(metrics[key])), key


def test_degenerate_batches():
    cfg = actor_config()
    # zero entropy everywhere, length-1 responses, one all-padding row
    old = torch.zeros(3, 4)
    new = torch.zeros(3, 4, requires_grad=True)
    adv = torch.ones(3, 4)
    mask = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0.0, 0, 0, 0]])
    loss, metrics = compute_hapo_policy_loss(old, new, adv, mask, torch.zeros(3, 4), "token-mean", cfg)
    assert torch.isfinite(loss) and all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    # all padding
    loss, metrics = compute_hapo_policy_loss(old, new, adv, torch.zeros(3, 4), torch.rand(3, 4), "token-mean", cfg)
    assert torch.isfinite(loss)


class TestBadInput:
    @pytest.mark.parametrize(
        "kwargs, pattern",
        [
            ({"clip_alpha": -0.1}, r"policy_loss\.clip_alpha must be in \[0"),
            ({"adv_beta": -1.0}, r"policy_loss\.adv_beta must be in \[0"),
            ({"entropy_pivot": 1.0}, r"policy_loss\.entropy_pivot must be in \(0, 1\)"),
            ({"entropy_pivot": 0.0}, r"entropy_pivot"),
            ({"adaptive_clip": "yes"}, r"policy_loss\.adaptive_clip must be true or false"),
        ],
    )
    def test_config_ranges(self, kwargs, pattern):
        with pytest.raises(ValueError, match=pattern):
            HAPOPolicyLossConfig(**kwargs)

    def test_unknown_option_names_key_and_allowed(self):
        with pytest.raises(ValueError, match=r"policy_loss\.clip_alfa.*allowed keys.*clip_alpha"):
            HAPOPolicyLossConfig.from_mapping({"loss_mode": "hapo", "clip_alfa": 1.0})

    def test_shape_mismatch_and_nan(self):
        old, new, adv, mask, entropy = random_batch()
        cfg = actor_config()
        with pytest.raises(ValueError, match="entropy shape"):
            compute_hapo_policy_loss(old, new, adv, mask, entropy[:, :-1], "token-mean", cfg)
        with pytest.raises(ValueError, match="response_mask shape"):
            compute_hapo_policy_loss(old, new, adv, mask[:-1], entropy, "token-mean", cfg)
        bad = old.clone()
        bad[0, 0] = float("nan")
        with pytest.raises(ValueError, match="old_log_prob contains NaN"):
            compute_hapo_policy_loss(bad, new, adv, mask, entropy, "token-mean", cfg)

    def test_non_hapo_policy_loss_config(self):
        from verl.workers.config import ActorConfig

        cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1)
        old, new, adv, mask, entropy = random_batch()
        with pytest.raises(ValueError, match=r"policy_loss\._target_=hapo_verl\.config\.HAPOPolicyLossConfig"):
            compute_hapo_policy_loss(old, new, adv, mask, entropy, "token-mean", cfg)


def test_registered_name_refuses_the_standard_signature():
    """verl's own ppo_loss reaches loss_mode=hapo without entropy: it must stop, not degrade."""
    from tensordict import TensorDict
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    fn = get_policy_loss_fn("hapo")
    old, new, adv, mask, _ = random_batch()
    with pytest.raises(LossNeedsTrainerError, match="hapo-verl"):
        fn(old_log_prob=old, log_prob=new, advantages=adv, response_mask=mask, loss_agg_mode="token-mean",
           config=actor_config(), rollout_is_weights=None)
    assert TensorDict  # tensordict is importable for the trainer path


# ------------------------------------------------------------------------------ hapo_verl.compute_policy_loss
def test_compute_policy_loss_is_the_hapo_loss_and_defaults_to_the_statistics_of_the_tokens_passed_in():
    from hapo_verl import compute_policy_loss

    old, new, adv, mask, entropy = random_batch(seed=11)
    cfg = actor_config()
    stats = compute_entropy_stats(entropy, mask.bool(), 0.8)
    ref_loss, ref_metrics = compute_hapo_policy_loss(old, new, adv, mask, entropy, "token-mean", cfg,
                                                     entropy_stats=stats)
    (ref_grad,) = torch.autograd.grad(ref_loss, new)
    for batch_stats in (stats.to_dict(), None):  # None: statistics of the tokens passed in, the same ones here
        loss, metrics = compute_policy_loss("hapo", old, new, adv, mask, "token-mean", cfg, entropy=entropy,
                                            batch_stats=batch_stats)
        (grad,) = torch.autograd.grad(loss, new)
        assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())
        assert {k: float(v) for k, v in metrics.items()} == ref_metrics
    half = compute_entropy_stats(entropy[:3], mask[:3].bool(), 0.8)
    other, _ = compute_policy_loss("hapo", old, new, adv, mask, "token-mean", cfg, entropy=entropy,
                                   batch_stats=half.to_dict())
    assert not torch.equal(other, ref_loss)  # the statistics given are the ones used


def test_compute_policy_loss_names_unknown_losses_and_missing_entropy():
    from hapo_verl import compute_policy_loss

    old, new, adv, mask, entropy = random_batch()
    with pytest.raises(ValueError, match=r"loss_mode='nope' is not a hapo-verl loss; registered: .*hapo"):
        compute_policy_loss("nope", old, new, adv, mask, "token-mean", actor_config())
    with pytest.raises(ValueError, match="loss_mode=hapo needs the per-token entropy"):
        compute_policy_loss("hapo", old, new, adv, mask, "token-mean", actor_config())
