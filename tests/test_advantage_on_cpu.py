"""Token-Level Group Average advantage: hand-computed cases, reductions, loop equivalence, verl registry."""

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from hapo_verl.algorithms.advantage import token_level_group_average_advantage
from hapo_verl.algorithms.groups import group_ids_from_index


def outcome_batch(rewards, lengths, width=None):
    """Rewards on the last valid token, as verl's reward managers place them."""
    width = width or max(max(lengths), 1)
    B = len(rewards)
    mask = torch.zeros(B, width)
    tlr = torch.zeros(B, width)
    for i, (r, n) in enumerate(zip(rewards, lengths)):
        mask[i, :n] = 1
        if n > 0:
            tlr[i, n - 1] = r
    return tlr, mask


def loop_tlga(rewards, lengths, width, groups, eps=1e-6, norm=True, thr=5.0, reference=False):
    """Straightforward per-group loop (the algorithm as written in the paper's code), for equivalence."""
    out = torch.zeros(len(rewards), width, dtype=torch.float64)
    # a row without valid tokens carries no reward token (verl puts R on the last valid token)
    rewards = [r if n > 0 else 0.0 for r, n in zip(rewards, lengths)]
    for g in sorted(set(groups)):
        rows = [i for i, x in enumerate(groups) if x == g]
        toks = [(rewards[i], lengths[i]) for i in rows]
        total = sum(n for _, n in toks)
        if total == 0:
            continue
        mu = sum(r * n for r, n in toks) / total
        sd = math.sqrt(sum(n * (r - mu) ** 2 for r, n in toks) / total)
        den = sd + eps if norm else 1.0
        vals = {i: (rewards[i] - mu) / den for i in rows}
        check = [vals[i] for i in rows if lengths[i] > 0]
        if reference:
            check += [(0 - mu) / den for i in rows if lengths[i] < width]
        if any(abs(v) >= thr for v in check):
            rs = [rewards[i] for i in rows]
            if len(rs) == 1:
                m, s = 0.0, 1.0
            else:
                m = sum(rs) / len(rs)
                s = math.sqrt(sum((r - m) ** 2 for r in rs) / (len(rs) - 1))
            vals = {i: ((rewards[i] - m) / (s + eps) if norm else rewards[i] - m) for i in rows}
        for i in rows:
            out[i, : lengths[i]] = vals[i]
    return out


def run(rewards, lengths, groups, width=None, **kw):
    tlr, mask = outcome_batch(rewards, lengths, width)
    adv, ret = token_level_group_average_advantage(tlr, mask, group_ids_from_index(np.array(groups, dtype=object)), **kw)
    assert torch.equal(adv, ret)
    return adv, mask


def test_hand_computed_two_responses():
    # lengths 1 and 3, rewards +1 and -1: mu = (1 - 3)/4 = -0.5, var = (1*1.5^2 + 3*0.5^2)/4 = 0.75
    adv, mask = run([1.0, -1.0], [1, 3], ["a", "a"])
    sd = math.sqrt(0.75)
    assert adv[0, 0].item() == pytest.approx(1.5 / (sd + 1e-6), rel=1e-6)
    assert adv[1, :3].tolist() == pytest.approx([-0.5 / (sd + 1e-6)] * 3, rel=1e-6)
    assert adv[0, 1:].abs().sum() == 0  # padding is zero
    # token mass is zero-sum within the group
    assert (adv * mask).sum().item() == pytest.approx(0.0, abs=1e-5)


def test_equal_lengths_give_grpo_with_population_std():
    torch.manual_seed(0)
    rewards = torch.randint(0, 2, (8,)).float().tolist()
    rewards[0], rewards[1] = 1.0, 0.0
    adv, _ = run(rewards, [5] * 8, ["g"] * 8)
    r = torch.tensor(rewards)
    expected = (r - r.mean()) / (r.std(unbiased=False) + 1e-6)
    assert torch.allclose(adv[:, 0], expected, atol=1e-6)


def test_extra_padding_changes_nothing_in_default_mode():
    rewards, lengths, groups = [1.0, -1.0, 0.5, 1.0], [3, 5, 2, 4], ["a", "a", "b", "b"]
    a1, _ = run(rewards, lengths, groups)
    a2, _ = run(rewards, lengths, groups, width=12)
    assert torch.equal(a1, a2[:, : a1.shape[1]]) and a2[:, a1.shape[1]:].abs().sum() == 0


def test_minority_class_falls_back_to_grpo():
    # one short correct answer among long wrong ones: its token share is tiny -> |A| >= 5 -> GRPO values
    rewards, lengths = [1.0] + [-1.0] * 7, [1] + [40] * 7
    adv, _ = run(rewards, lengths, ["q"] * 8)
    r = torch.tensor(rewards)
    grpo = (r - r.mean()) / (r.std() + 1e-6)
    assert torch.allclose(adv[:, 0], grpo, atol=1e-6)


def test_reference_mode_checks_padding_like_the_fork():
    # all-equal rewards with padding: default gives 0 without fallback; the fork falls back to GRPO (also 0)
    adv, _ = run([1.0, 1.0], [2, 4], ["a", "a"], reference_compat=False)
    assert adv.abs().sum() == 0
    # singleton group with padding: the fork's padding check fires and GRPO's singleton rule gives A = R
    adv_ref, _ = run([0.7], [2], ["s"], width=4, reference_compat=True)
    assert adv_ref[0, :2].tolist() == pytest.approx([0.7 / (1 + 1e-6)] * 2)
    adv_def, _ = run([0.7], [2], ["s"], width=4, reference_compat=False)
    assert adv_def.abs().sum() == 0


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("norm", [True, False])
def test_vectorized_equals_loop(reference, norm):
    rng = np.random.default_rng(7 + reference + 2 * norm)
    for trial in range(20):
        sizes = rng.integers(1, 17, size=rng.integers(1, 9))
        groups = np.concatenate([[f"uid{g}"] * s for g, s in enumerate(sizes)])
        rng.shuffle(groups)  # interleaved group order
        B, width = len(groups), int(rng.integers(1, 12))
        lengths = rng.integers(0, width + 1, size=B).tolist()
        if trial % 3 == 0:
            rewards = rng.choice([-1.0, 1.0], size=B).tolist()
        else:
            rewards = np.round(rng.normal(size=B), 3).tolist()
        thr = float(rng.choice([1.5, 5.0]))
        adv, _ = run(rewards, lengths, groups.tolist(), width=width, norm_adv_by_std=norm,
                     fallback_threshold=thr, reference_compat=reference)
        expected = loop_tlga(rewards, lengths, width, groups.tolist(), norm=norm, thr=thr, reference=reference)
        assert torch.allclose(adv.double(), expected, atol=1e-4, rtol=1e-4), (trial, groups, lengths, rewards)


def test_degenerate_inputs_are_finite():
    cases = [
        ([1.0], [3], ["solo"]),  # singleton
        ([1.0, 1.0, 1.0], [2, 2, 2], ["a"] * 3),  # all equal
        ([1.0, -1.0], [1, 1], ["a", "a"]),  # length 1
        ([1.0, -1.0, 0.0], [0, 0, 0], ["a"] * 3),  # all-padding rows
        ([1.0, -1.0, 0.5], [0, 3, 2], ["a"] * 3),  # one all-padding row
    ]
    for reference in (False, True):
        for rewards, lengths, groups in cases:
            adv, mask = run(rewards, lengths, groups, width=4, reference_compat=reference)
            assert torch.isfinite(adv).all()
            assert (adv[mask == 0] == 0).all()


def test_bad_input():
    tlr, mask = outcome_batch([1.0, 0.0], [2, 2])
    with pytest.raises(ValueError, match="fallback_threshold"):
        token_level_group_average_advantage(tlr, mask, torch.tensor([0, 0]), fallback_threshold=0)
    with pytest.raises(ValueError, match="group_ids"):
        token_level_group_average_advantage(tlr, mask, torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="response_mask"):
        token_level_group_average_advantage(tlr, mask[:, :1], torch.tensor([0, 0]))
    bad = tlr.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        token_level_group_average_advantage(bad, mask, torch.tensor([0, 0]))


class TestThroughVerl:
    """The registered estimator, reached the way verl's trainer reaches it."""

    def _data(self, rewards, lengths, groups, width=6):
        from verl import DataProto

        tlr, mask = outcome_batch(rewards, lengths, width)
        return DataProto.from_dict(
            tensors={"token_level_rewards": tlr, "response_mask": mask},
            non_tensors={"uid": np.array(groups, dtype=object)},
        )

    def test_compute_advantage_with_hapo_options(self):
        from verl.trainer.ppo.ray_trainer import compute_advantage

        data = self._data([1.0, -1.0, 1.0, 1.0], [1, 3, 2, 6], ["a", "a", "b", "b"])
        cfg = OmegaConf.create({"hapo": {"fallback_threshold": 5.0, "norm_adv_by_std": True, "epsilon": 1e-6,
                                         "reference_compat": False}})
        out = compute_advantage(data, adv_estimator="hapo", config=cfg)
        adv, mask = outcome_batch([1.0, -1.0, 1.0, 1.0], [1, 3, 2, 6], 6)
        expected, _ = token_level_group_average_advantage(adv, mask, torch.tensor([0, 0, 1, 1]))
        assert torch.allclose(out.batch["advantages"], expected)

    def test_unknown_and_out_of_range_options_name_the_key(self):
        from verl.trainer.ppo.ray_trainer import compute_advantage

        data = self._data([1.0, -1.0], [1, 3], ["a", "a"])
        with pytest.raises(ValueError, match=r"algorithm\.hapo\.fallback_treshold"):
            compute_advantage(data, adv_estimator="hapo", config=OmegaConf.create({"hapo": {"fallback_treshold": 3}}))
        with pytest.raises(ValueError, match=r"algorithm\.hapo\.epsilon"):
            compute_advantage(data, adv_estimator="hapo", config=OmegaConf.create({"hapo": {"epsilon": -1.0}}))

    def test_multi_trajectory_path_of_the_v1_trainer(self):
        from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories  # noqa: F401

        from verl.trainer.ppo import core_algos

        assert core_algos.get_adv_estimator_fn("hapo").__module__ == "hapo_verl.integration.estimator"
