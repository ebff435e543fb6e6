"""EDGE-GRPO's Entropy-Driven Advantage (arXiv 2507.21848): hand-computed values, reduction to verl's GRPO with
equal entropies, the estimator's need for the trainer, and a 2-step CPU run."""

import math

import numpy as np
import pytest
import torch
from loss_test_utils import two_step_run_metrics

from hapo_verl.algorithms.edge_grpo import entropy_driven_advantage
from hapo_verl.integration.estimator import LAST_METRICS, EstimatorNeedsTrainerError, estimator_inputs


def test_entropy_driven_advantage_hand_values():
    adv = torch.tensor([[0.7, 0.7], [-0.7, -0.7], [1.0, 0.0]])
    mask = torch.tensor([[True, True], [True, True], [True, False]])
    entropy = torch.tensor([[0.4, 0.6], [1.0, 2.0], [3.0, 99.0]])  # P = 0.5, 1.5 (group 0), 3.0 (group 1)
    out, info = entropy_driven_advantage(adv, mask, entropy, torch.tensor([0, 0, 1]), normalization="group")
    # group 0: P̄ = 1 -> scales 2 and 2/3 ; group 1 alone: scale 1
    assert info["scale"].tolist() == pytest.approx([2.0, 2 / 3, 1.0])
    assert out[:, 0].tolist() == pytest.approx([1.4, -0.7 * 2 / 3, 1.0])
    out_b, info_b = entropy_driven_advantage(adv, mask, entropy, torch.tensor([0, 0, 1]), normalization="batch")
    assert info_b["scale"].tolist() == pytest.approx([5 / 3 / 0.5, 5 / 3 / 1.5, 5 / 3 / 3.0])
    with pytest.raises(ValueError, match="normalization"):
        entropy_driven_advantage(adv, mask, entropy, None, normalization="token")


def test_edge_estimator_reduces_to_grpo_with_equal_entropies_and_needs_the_trainer():
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, get_adv_estimator_fn

    g = torch.Generator().manual_seed(0)
    B, L = 8, 5
    mask = torch.ones(B, L)
    rewards = torch.zeros(B, L)
    rewards[:, -1] = torch.randint(0, 2, (B,), generator=g).float()
    uid = np.array(["a", "b"] * 4, dtype=object)
    grpo, _ = compute_grpo_outcome_advantage(rewards, mask, uid)
    estimator = get_adv_estimator_fn("edge_grpo")
    with pytest.raises(EstimatorNeedsTrainerError, match="hapo-verl"):
        estimator(rewards, mask, index=uid, config={})
    with estimator_inputs(entropy=torch.full((B, L), 0.7)):
        out, _ = estimator(rewards, mask, index=uid, config={})
    assert torch.allclose(out, grpo, atol=1e-6)
    ent = torch.rand(B, L, generator=g) + 0.1
    with estimator_inputs(entropy=ent):
        out, _ = estimator(rewards, mask, index=uid, config={"edge_grpo": {"normalization": "batch"}})
    scale = ent.mean(-1).mean() / ent.mean(-1)
    assert torch.allclose(out, grpo * scale[:, None], atol=1e-5)
    assert LAST_METRICS["edge_grpo/scale_max"] == pytest.approx(scale.max().item(), rel=1e-5)


def test_two_step_cpu_run_through_the_trainer(tmp_path):
    metrics = two_step_run_metrics("edge_grpo", tmp_path)
    for step in (1, 2):
        for key in ("edge_grpo/scale_mean", "edge_grpo/scale_max", "actor/pg_loss"):
            assert key in metrics[step], (step, key, sorted(metrics[step]))
            assert math.isfinite(float(metrics[step][key])), (step, key, metrics[step][key])
