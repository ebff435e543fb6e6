"""ASPO (arXiv 2510.06062): every branch's gradient by autograd against the hand-computed value (boundaries
included), the defaults (the paper's §6, v2) against a per-token loop, the authors' code's gradient (soft negative dual
clip and entropy clip as they run it), the entropy split and its inverted-name mask, micro-batch invariance of the
worker-side loss, verl's standard signature without the entropy clip, option checks, and a 2-step CPU run."""

import math

import pytest
import torch
from loss_test_utils import (actor_config, agg, assert_loss_option_rejected, assert_split_invariant, identity_padding,
                             random_batch, two_step_run_metrics, worker_data)

from hapo_verl import compute_policy_loss
from hapo_verl.algorithms.aspo import ASPOOptions, aspo_policy_loss, response_high_entropy_mask
from hapo_verl.integration.loss import LossNeedsTrainerError, registered_ppo_loss

EPS_L, EPS_H, C = 0.2, 0.28, 3.0


def token_grads(ratios, advs, high=None, clip_low=EPS_L, clip_high=EPS_H, high_clip=0.4, c=C, soft_neg=False):
    """(value, ∂loss/∂log π per token) with token-sum aggregation, float64."""
    old = torch.zeros(1, len(ratios), dtype=torch.float64)
    new = torch.tensor([[math.log(r) for r in ratios]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([advs], dtype=torch.float64)
    mask = torch.ones_like(adv, dtype=torch.bool)
    high_t = None if high is None else torch.tensor([high])
    loss, metrics = aspo_policy_loss(old, new, adv, mask, high_t, clip_low=clip_low, clip_high=clip_high,
                                     high_clip=high_clip, clip_ratio_c=c, aggregate=agg("token-sum"),
                                     negative_soft_dual_clip=soft_neg)
    loss.backward()
    return loss.item(), new.grad[0].tolist(), metrics


def test_every_branch_gradient_is_the_papers():
    cases = [  # (r, A, expected ∂loss/∂log π)
        (1.1, 2.0, -2.0 / 1.1),  # A>0 in the band: flipped weight 1/r
        (0.8, 1.0, -1.0 / 0.8),
        (0.25, 1.0, -1.0 * C),  # A>0, 1/r = 4 > c: soft dual clip caps the weight at c
        (1.5, 2.0, 0.0),  # A>0, r > 1+ε_h: clipped
        (0.9, -2.0, -0.9 * -2.0),  # A<0 in the band: -r·A
        (2.0, -1.0, -2.0 * -1.0),  # A<0 above the band, below c: -r·A
        (0.5, -1.0, 0.0),  # A<0, r < 1-ε_l: clipped
        (4.0, -1.0, 0.0),  # A<0, r > c: dual clip
        (1.1, 0.0, 0.0),
    ]
    value, grads, metrics = token_grads([c[0] for c in cases], [c[1] for c in cases])
    assert grads == pytest.approx([c[2] for c in cases], rel=1e-12, abs=1e-15)
    # values: positive tokens -A/min(r, 1+ε_h); negative ones verl's dual-clip values
    expected = (-2.0 / 1.1 - 1.0 / 0.8 - 1.0 / 0.25 - 2.0 / (1 + EPS_H)
                + 0.9 * 2.0 + 2.0 * 1.0 + (1 - EPS_L) * 1.0 + C * 1.0)
    assert value == pytest.approx(expected, rel=1e-12)
    assert metrics["pos_soft_dual_clip_frac"].item() == pytest.approx(1 / 9)


def paper_gradient_loop(ratios, advs, eps_l, eps_h, c):
    """∂loss/∂log π of each token by the paper's §6 (v2), one token at a time: Step 1 hard clip, Step 2 flipped
    weight 1/r for A > 0 (Eq. 3, 12), Step 3 soft dual clip of that weight at c; A < 0: PPO with its dual clip."""
    out = []
    for r, a in zip(ratios, advs):
        if a > 0:
            out.append(0.0 if r > 1 + eps_h else -a * min(1 / r, c))
        elif a < 0:
            out.append(-r * a if 1 - eps_l <= r <= c else 0.0)
        else:
            out.append(0.0)
    return out


def test_defaults_are_the_papers():
    # one clip range for every token (ε = 0.2, Appendix B: no entropy clip), negative tokens' usual dual clip
    assert (ASPOOptions().entropy_clip, ASPOOptions().negative_soft_dual_clip) == (False, False)
    old, new, adv, mask, _, _ = random_batch(B=16, L=12, seed=31)
    old, adv = old.double(), adv.double()
    new = (old + (new.double() - old) * 6).requires_grad_(True)
    cfg = actor_config(clip=(EPS_L, EPS_H), loss_mode="aspo")
    loss, _ = compute_policy_loss("aspo", old, new, adv, mask, "token-sum", cfg)  # needs no entropy
    loss.backward()
    ratios = torch.exp(new.detach() - old)[mask].tolist()
    expected = paper_gradient_loop(ratios, adv[mask].tolist(), EPS_L, EPS_H, cfg.clip_ratio_c)
    assert new.grad[mask].tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # every branch occurs: positive in the band / above it / soft-dual-clipped, negative below / in / past c
    r, a = torch.tensor(ratios), torch.tensor(adv[mask].tolist())
    pos, neg = a > 0, a < 0
    assert (pos & (r > 1 + EPS_H)).any() and (pos & (1 / r > cfg.clip_ratio_c)).any()
    assert (pos & (r <= 1 + EPS_H) & (1 / r < cfg.clip_ratio_c)).any()
    assert (neg & (r < 1 - EPS_L)).any() and (neg & (r > cfg.clip_ratio_c)).any()


def test_boundaries():
    # r exactly 1+ε_h (float64: 1 + (r-1) == r): still in the band, weight 1/r; r exactly 1/c: weight c either way
    r_up = 1.25
    _, grads, _ = token_grads([r_up, 0.5, r_up * (1 + 1e-9)], [1.0, 1.0, 1.0], clip_high=r_up - 1, c=2.0)
    assert grads[0] == pytest.approx(-1.0 / r_up)
    assert grads[1] == pytest.approx(-2.0)  # 1/r == c
    assert grads[2] == 0.0
    # A<0 at exactly 1-ε_l: in the band (verl's clamp is inclusive)
    _, grads, _ = token_grads([0.75], [-1.0], clip_low=0.25)
    assert grads[0] == pytest.approx(0.75)


def test_negative_soft_dual_clip_is_the_authors_variant():
    _, grads, _ = token_grads([4.0, 2.0, 0.5], [-1.0, -1.0, -1.0], soft_neg=True)
    assert grads == pytest.approx([-C * -1.0, 2.0, 0.0])


def test_entropy_clip_widens_the_band_of_high_entropy_tokens():
    # same ratios, A>0 r=1.35 and A<0 r=0.7: clipped with ε=0.28/0.2, inside with ε=0.4
    _, low_tok, _ = token_grads([1.35, 0.7], [1.0, -1.0], high=[False, False])
    _, high_tok, metrics = token_grads([1.35, 0.7], [1.0, -1.0], high=[True, True])
    assert low_tok == [0.0, 0.0]
    assert high_tok == pytest.approx([-1.0 / 1.35, 0.7])
    assert metrics["high_entropy_frac"].item() == 1.0


def test_high_entropy_mask_is_above_the_response_quantile():
    entropy = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
                            [5.0, 0.0, 1.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0]])
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 3:] = False
    high = response_high_entropy_mask(entropy, mask, 0.8)
    assert high[0].nonzero().flatten().tolist() == [8, 9]  # q0.8 = 0.82
    assert high[1].nonzero().flatten().tolist() == [0]  # q0.8 of (5, 0, 1) = 3.4


def nanquantile_high_entropy_mask(entropy, mask, quantile):
    """The split as first written (and as the authors' code computes it): torch.nanquantile of each row's valid
    entropies, NaN at the padding."""
    masked = torch.where(mask, entropy.to(torch.float32), torch.full_like(entropy, float("nan"), dtype=torch.float32))
    return mask & (masked > torch.nanquantile(masked, quantile, dim=-1, keepdim=True))


@pytest.mark.parametrize("quantile", [0.0, 0.1, 0.25, 0.5, 0.8, 0.9, 0.999])
def test_high_entropy_mask_equals_nanquantile_with_ties_and_padding(quantile):
    gen = torch.Generator().manual_seed(int(quantile * 1000) + 7)
    for trial in range(40):
        B, L = int(torch.randint(1, 9, (1,), generator=gen)), int(torch.randint(1, 80, (1,), generator=gen))
        if trial % 2:  # ties: a few distinct values
            entropy = torch.randint(0, 4, (B, L), generator=gen).float() / 2
        else:
            entropy = torch.rand(B, L, generator=gen) * 3
        if trial % 3 == 0:  # right padding, empty rows included
            lengths = torch.randint(0, L + 1, (B,), generator=gen)
            mask = torch.arange(L)[None] < lengths[:, None]
        else:  # scattered padding
            mask = torch.rand(B, L, generator=gen) < 0.7
        if trial % 5 == 0:  # NaN and inf entropies (nanquantile skips NaN)
            entropy[torch.rand(B, L, generator=gen) < 0.1] = float("nan")
            entropy[torch.rand(B, L, generator=gen) < 0.05] = float("inf")
        if trial % 7 == 0:
            entropy = entropy.to(torch.bfloat16)
        expected = nanquantile_high_entropy_mask(entropy, mask, quantile)
        assert torch.equal(response_high_entropy_mask(entropy, mask, quantile), expected), (trial, B, L)
    # the split is strict: rows of equal entropies have no high-entropy token
    flat = torch.ones(2, 6)
    assert not response_high_entropy_mask(flat, torch.ones(2, 6, dtype=torch.bool), quantile).any()


def authors_code(old, new, adv, mask, high_entropy_mask_theirs, c=3.0):
    """wizard-III/Archer2.0 ``compute_policy_loss_archer`` before aggregation, transcribed (token-sum), with its
    clip values 0.2 / 0.4 and its mask argument (True for the *low*-entropy tokens)."""
    ratio = torch.exp(torch.clamp(new - old, min=-20.0, max=20.0))
    neg_clip = torch.where(high_entropy_mask_theirs, torch.clamp(ratio, min=1 - 0.2), torch.clamp(ratio, min=1 - 0.4))
    pos_clip = torch.where(high_entropy_mask_theirs, torch.clamp(ratio, max=1 + 0.2), torch.clamp(ratio, max=1 + 0.4))
    neg_losses_clip = -adv * neg_clip
    pos_losses_clip = -adv * (pos_clip / pos_clip.detach()) / pos_clip.detach()
    neg_dual = torch.clamp(neg_clip, max=c)
    neg_masked = torch.gt(neg_clip, neg_dual)
    neg_losses = torch.where(neg_masked, -adv * neg_dual.detach() * new, neg_losses_clip)
    pos_dual = torch.clamp(1 / pos_clip, max=c)
    pos_masked = torch.gt(1 / pos_clip, pos_dual)
    pos_losses = torch.where(pos_masked, -adv * pos_dual.detach() * new, pos_losses_clip)
    return (torch.where(adv < 0, neg_losses, pos_losses) * mask).sum()


def test_gradient_equals_the_authors_code_with_their_mask():
    old, new, adv, mask, entropy, _ = random_batch(B=16, L=12, seed=11)
    new = old + (new - old) * 6
    # their dp_actor: high_entropy_mask = (entropy <= q80) & mask, i.e. the LOW-entropy tokens
    masked = torch.where(mask, entropy, torch.nan)
    theirs_mask = (masked <= torch.nanquantile(masked, 0.8, dim=-1, keepdim=True)) & mask
    ours_high = response_high_entropy_mask(entropy, mask, 0.8)
    assert torch.equal(ours_high, mask & ~theirs_mask)  # the names are inverted, the split is the same
    a, b = new.clone().requires_grad_(True), new.clone().requires_grad_(True)
    ours, _ = aspo_policy_loss(old, a, adv, mask, ours_high, clip_low=0.2, clip_high=0.2, high_clip=0.4,
                               clip_ratio_c=3.0, aggregate=agg("token-sum"), negative_soft_dual_clip=True)
    authors_code(old, b, adv, mask, theirs_mask).backward()
    ours.backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)
    assert (a.grad != 0).any()


def test_worker_loss_invariant_to_micro_batch_split():
    old, new, adv, mask, entropy, _ = random_batch(B=8, seed=12)
    new = old + (new - old) * 4
    n_tok = int(mask.sum())

    def run(rows):
        lp = new[rows].clone().requires_grad_(True)
        cfg = actor_config(clip=(0.2, 0.2), loss_mode="aspo", entropy_clip=True, entropy_source="current")
        with identity_padding():
            loss, metrics = registered_ppo_loss(
                cfg, {"log_probs": lp, "entropy": entropy[rows]},
                worker_data(old[rows], adv[rows], mask[rows], entropy[rows], global_batch_size=8,
                            batch_num_tokens=n_tok))
        loss.backward()
        return loss.item(), lp.grad, metrics

    metrics = assert_split_invariant(run)
    assert "actor/aspo/high_entropy_frac" in metrics


def test_standard_signature_without_entropy_clip_and_refusal_with_it():
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    old, new, adv, mask, _, _ = random_batch()
    cfg = actor_config(loss_mode="aspo")  # the default (the paper's) needs no entropy
    loss, _ = get_policy_loss_fn("aspo")(old, new, adv, mask, "token-mean", cfg)
    direct, _ = compute_policy_loss("aspo", old, new, adv, mask, "token-mean", cfg)
    assert loss.item() == direct.item()
    with pytest.raises(LossNeedsTrainerError, match="hapo-verl"):
        get_policy_loss_fn("aspo")(old, new, adv, mask, "token-mean", actor_config(loss_mode="aspo", entropy_clip=True))


@pytest.mark.parametrize("key,value,match", [
    ("high_entropy_clip_ratio", 1.5, r"policy_loss\.high_entropy_clip_ratio must be in \[0, 1\]"),
    ("entropy_quantile", 1.0, r"policy_loss\.entropy_quantile must be in \[0, 1\)"),
    ("entropy_source", "both", r"policy_loss\.entropy_source must be one of current, old"),
    ("entropy_clip", 3, r"policy_loss\.entropy_clip must be true or false"),
    ("entropy_quantil", 0.8, r"unknown option actor_rollout_ref\.actor\.policy_loss\.entropy_quantil"),
])
def test_bad_options_are_rejected_at_start_up_naming_the_key(key, value, match):
    assert_loss_option_rejected("aspo", key, value, match)


def test_two_step_cpu_run_through_the_trainer(tmp_path):
    metrics = two_step_run_metrics("aspo", tmp_path)  # conf/aspo.yaml: the paper's, no entropy clip
    for step in (1, 2):
        for key in ("actor/aspo/pos_soft_dual_clip_frac", "actor/pg_clipfrac", "actor/pg_loss"):
            assert key in metrics[step], (step, key, sorted(metrics[step]))
            assert math.isfinite(float(metrics[step][key])), (step, key, metrics[step][key])
        assert "actor/aspo/high_entropy_frac" not in metrics[step]
