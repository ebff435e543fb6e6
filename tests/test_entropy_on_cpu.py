"""Entropy, ĥ and the adaptive-temperature factor: hand-computed cases and properties."""

import math

import pytest
import torch

from hapo_verl.algorithms.entropy import (
    EntropyStats,
    compute_entropy_stats,
    entropy_score,
    row_temperature_factor,
    temperature_factor,
    token_entropy_from_logits,
)

NEG_INF = float("-inf")


def naive_entropy(logits):
    p = torch.softmax(logits.double(), -1)
    return -(p * torch.log(p)).nan_to_num(0.0).sum(-1)


def fork_style_h_hat(entropy, mask, pivot_q):
    """The authors' normalizer written out step by step from its description (sorted list, nearest rank)."""
    e = torch.log(entropy.clamp_min(1e-8))
    vals = sorted(e[mask.bool()].tolist())
    m = vals[round(pivot_q * (len(vals) - 1))]
    h = e - m
    var = max(sum(((v - m) ** 2) for v in vals) / len(vals), 1e-8)
    h = h / math.sqrt(var)
    pos = max([v for v, k in zip(h[mask.bool()].tolist(), [1] * len(vals)) if v > 0] + [0.0])
    neg = min([v for v in h[mask.bool()].tolist() if v < 0] + [0.0])
    scale_pos = 1.0 / max(pos, 1e-8)
    scale_neg = 1.0 / min(neg, -1e-8)  # negative, as in the fork
    return torch.where(h > 0, h * scale_pos, h * scale_neg)


class TestTokenEntropy:
    def test_uniform_row_is_log_vocab(self):
        logits = torch.zeros(3, 7)
        assert torch.allclose(token_entropy_from_logits(logits), torch.full((3,), math.log(7)))

    def test_matches_naive_on_random_rows(self):
        torch.manual_seed(0)
        logits = torch.randn(16, 50) * 3
        assert torch.allclose(token_entropy_from_logits(logits).double(), naive_entropy(logits), atol=1e-5)

    def test_minus_inf_entries_are_ignored_and_finite(self):
        logits = torch.tensor([[0.0, 0.0, NEG_INF, NEG_INF]])
        out = token_entropy_from_logits(logits)
        assert torch.isfinite(out).all()
        assert out.item() == pytest.approx(math.log(2), abs=1e-6)

    def test_one_hot_and_all_minus_inf_rows(self):
        logits = torch.tensor([[1e4, 0.0, 0.0], [5.0, NEG_INF, NEG_INF], [NEG_INF, NEG_INF, NEG_INF]])
        out = token_entropy_from_logits(logits)
        assert torch.isfinite(out).all()
        assert out.tolist() == [0.0, 0.0, 0.0]

    def test_large_logits_are_stable(self):
        logits = torch.tensor([[1e30, 1e30, -1e30]])
        assert token_entropy_from_logits(logits).item() == pytest.approx(math.log(2), abs=1e-6)


class TestEntropyStats:
    def test_hand_computed(self):
        # log-entropies 0, 1, 2, 3 ; pivot q=0.5 -> rank round(1.5)=2 -> e=2
        H = torch.exp(torch.tensor([[0.0, 1.0, 2.0, 3.0]]))
        stats = compute_entropy_stats(H, torch.ones_like(H, dtype=torch.bool), entropy_pivot=0.5)
        assert stats.pivot == pytest.approx(2.0)
        rms = math.sqrt((4 + 1 + 0 + 1) / 4)
        assert stats.scale == pytest.approx(rms, rel=1e-6)
        assert stats.pos_scale == pytest.approx(rms / 1.0, rel=1e-6)  # largest positive h = 1/rms
        assert stats.neg_scale == pytest.approx(rms / 2.0, rel=1e-6)  # most negative h = -2/rms
        h_hat = entropy_score(H, stats)
        assert h_hat.tolist()[0] == pytest.approx([-1.0, -0.5, 0.0, 1.0], abs=1e-6)

    def test_reference_compat_is_the_fork_v_shape(self):
        torch.manual_seed(1)
        H = torch.rand(5, 9) * 3
        mask = torch.rand(5, 9) > 0.3
        stats = compute_entropy_stats(H, mask, 0.8)
        ref = entropy_score(H, stats, reference_compat=True, clamp=False)
        expected = fork_style_h_hat(H, mask, 0.8)
        assert torch.allclose(ref[mask], expected[mask].float(), atol=1e-5)
        assert ref[mask].min() >= 0 and ref[mask].max() <= 1 + 1e-6
        signed = entropy_score(H, stats)
        assert torch.allclose(signed.abs()[mask], ref[mask], atol=1e-6)
        assert signed[mask].min() == pytest.approx(-1.0, abs=1e-5)
        assert signed[mask].max() == pytest.approx(1.0, abs=1e-5)

    def test_padding_does_not_change_stats(self):
        torch.manual_seed(2)
        H = torch.rand(4, 6) + 0.1
        mask = torch.ones(4, 6, dtype=torch.bool)
        padded_H = torch.cat([H, torch.rand(4, 5) * 10], dim=1)
        padded_mask = torch.cat([mask, torch.zeros(4, 5, dtype=torch.bool)], dim=1)
        assert compute_entropy_stats(H, mask) == compute_entropy_stats(padded_H, padded_mask)

    def test_zero_entropy_everywhere_gives_zero_score(self):
        H = torch.zeros(3, 4)
        stats = compute_entropy_stats(H, torch.ones(3, 4))
        h_hat = entropy_score(H, stats)
        assert torch.isfinite(h_hat).all() and (h_hat == 0).all()

    def test_no_valid_token_gives_neutral_stats(self):
        stats = compute_entropy_stats(torch.rand(2, 3), torch.zeros(2, 3))
        assert stats == EntropyStats.neutral()
        assert stats.num_tokens == 0

    @pytest.mark.parametrize("pivot", [0.0, 1.0, -0.1, 1.5])
    def test_pivot_out_of_range_names_the_key(self, pivot):
        with pytest.raises(ValueError, match="entropy_pivot.*\\(0, 1\\)"):
            compute_entropy_stats(torch.rand(2, 2), torch.ones(2, 2), entropy_pivot=pivot)

    def test_shape_mismatch_and_nan(self):
        with pytest.raises(ValueError, match="shape"):
            compute_entropy_stats(torch.rand(2, 3), torch.ones(2, 4))
        bad = torch.rand(2, 3)
        bad[0, 1] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            compute_entropy_stats(bad, torch.ones(2, 3))

    def test_stats_round_trip_and_request_args(self):
        stats = EntropyStats(pivot=-0.5, scale=1.2, pos_scale=0.7, neg_scale=0.4, num_tokens=10)
        assert EntropyStats.from_dict(stats.to_dict()) == stats
        with pytest.raises(ValueError, match="scale must be > 0"):
            EntropyStats(pivot=0.0, scale=0.0, pos_scale=1.0, neg_scale=1.0)
        with pytest.raises(ValueError, match="finite"):
            EntropyStats(pivot=float("nan"), scale=1.0, pos_scale=1.0, neg_scale=1.0)


class TestTemperatureFactor:
    def test_bounds_and_values(self):
        h = torch.tensor([-5.0, -1.0, 0.0, 0.5, 1.0, 7.0])
        f = temperature_factor(h, 0.05)
        assert f.tolist() == pytest.approx([0.95, 0.95, 1.0, 1.025, 1.05, 1.05])
        assert temperature_factor(-0.5, 0.1) == pytest.approx(0.95)

    @pytest.mark.parametrize("tau", [-0.01, 1.0, 2.0, float("nan")])
    def test_tau_out_of_range(self, tau):
        with pytest.raises(ValueError, match="temperature_tau.*\\[0, 1\\)"):
            temperature_factor(torch.zeros(1), tau)

    def test_row_factor_cools_peaked_and_heats_flat_rows(self):
        logits = torch.stack([torch.zeros(10), torch.tensor([8.0] + [0.0] * 9), torch.tensor([2.0] + [0.0] * 9)])
        entropy = token_entropy_from_logits(logits)
        stats = compute_entropy_stats(entropy, torch.ones(3, dtype=torch.bool), 0.5)
        f = row_temperature_factor(logits, stats, tau=0.1)
        assert f[0] == pytest.approx(1.1)  # flattest row: highest entropy -> hotter
        assert f[1] == pytest.approx(0.9)  # peaked row: lowest entropy -> cooler
        f_ref = row_temperature_factor(logits, stats, tau=0.1, reference_compat=True)
        assert (f_ref >= 1.0).all()  # the fork only heats
