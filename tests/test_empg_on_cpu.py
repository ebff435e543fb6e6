"""EMPG (arXiv 2509.09265): a loop reference written from the equations against the vectorised estimator, hand values,
degenerate inputs, the responses' lines as steps, start-up checks, composition with HAPO, and a 2-step CPU run
through the trainer."""

import math
import random

import numpy as np
import pytest
import torch
from loss_test_utils import START_UP_OVERRIDES, grpo_loop, random_group_batch, two_step_run_metrics

from hapo_verl.algorithms.empg import empg_step_advantages, per_position, step_cells
from hapo_verl.integration.estimator import LAST_METRICS, EstimatorNeedsTrainerError, estimator_inputs
from hapo_verl.integration.steps import line_end_tokens, step_ends


def _estimator(name="empg"):
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    import hapo_verl  # noqa: F401  (registration through verl's plugin)

    return get_adv_estimator_fn(name)


# ------------------------------------------------------------------------------------------------ loop reference
def empg_loop(scores, mask, entropy, ends, groups, *, k=1.0, k_f=1.0, zeta=0.1, center="step", eps=1e-8,
              norm_by_std=True):
    """Eq. 7-12 of arXiv 2509.09265 (v1 numbering), one response and one step at a time, in float64 Python. A step
    is the set of a response's active tokens between two step ends (``ends``: true at a step's last token)."""
    B, L = mask.shape
    scores, mask, entropy, ends = scores.tolist(), mask.tolist(), entropy.tolist(), ends.tolist()
    steps = []
    for i in range(B):  # the step number of each position: how many steps ended before it
        steps.append([sum(ends[i][:t]) for t in range(L)])
    outcome = grpo_loop(scores, groups, norm_by_std=norm_by_std)
    found = []  # (row, step id, [token positions]) in row order, steps in order
    for i in range(B):
        ids = sorted({steps[i][t] for t in range(L) if mask[i][t]})
        for s in ids:
            found.append((i, s, [t for t in range(L) if mask[i][t] and steps[i][t] == s]))
    out = [[0.0] * L for _ in range(B)]
    if not found:
        return torch.tensor(out, dtype=torch.float64)
    h = [sum(entropy[i][t] for t in ts) / len(ts) for i, _, ts in found]
    lo, hi = min(h), max(h)
    h_norm = [(x - lo) / (hi - lo + eps) for x in h]  # Eq. 12
    e = [math.exp(-k * x) for x in h_norm]
    g = [x / (sum(e) / len(e) + eps) for x in e]  # Eq. 10
    modulated = []
    for n, (i, _, _) in enumerate(found):
        has_next = n + 1 < len(found) and found[n + 1][0] == i
        bonus = math.exp(-k_f * h_norm[n + 1]) if has_next else 0.0  # Eq. 11
        modulated.append(g[n] * outcome[i] + zeta * bonus)  # Eq. 8
    if center == "step":
        mean = sum(modulated) / len(modulated)
    else:
        mean = sum(m * len(ts) for m, (_, _, ts) in zip(modulated, found)) / sum(len(ts) for *_, ts in found)
    for m, (i, _, ts) in zip(modulated, found):  # Eq. 7
        for t in ts:
            out[i][t] = m - mean
    return torch.tensor(out, dtype=torch.float64)


def random_batch(seed):
    """:func:`random_group_batch` with step ends at random: lines of a few tokens, or every row one line."""
    scores, mask, entropy, groups = random_group_batch(seed, max_len=12)
    g = torch.Generator().manual_seed(seed + 1000)
    ends = torch.rand(mask.shape, generator=g) < random.Random(seed).choice([0.0, 0.3, 0.5])
    return scores, mask, entropy, ends, groups


def _run(scores, mask, entropy, ends, groups, **options):
    tlr = torch.zeros_like(mask)
    tlr[:, 0] = scores
    uid = np.array([f"u{g}" for g in groups], dtype=object)
    with estimator_inputs(entropy=entropy, step_ends=ends):
        return _estimator()(tlr, mask, index=uid, config={"empg": options})


@pytest.mark.parametrize("seed", range(24))
def test_vectorised_equals_the_loop_reference(seed):
    scores, mask, entropy, ends, groups = random_batch(seed)
    rng = random.Random(seed)
    kw = dict(k=rng.choice([1.0, 0.5, 0.0]), k_f=rng.choice([1.0, 2.0]), zeta=rng.choice([0.1, 0.0, 0.3]),
              center=rng.choice(["step", "token"]))
    norm = rng.choice([True, False])
    expected = empg_loop(scores, mask, entropy, ends, groups, norm_by_std=norm, **kw)
    got, ret = _run(scores, mask, entropy, ends, groups, norm_adv_by_std=norm, **kw)
    assert torch.isfinite(got).all() and (got[mask == 0] == 0).all()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, ret)


def test_hand_values():
    # one group of two responses: the first right (3 tokens, lines [0, 0 | 1]), the second wrong (2 tokens, 1 line)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    entropy = torch.tensor([[0.2, 0.4, 1.0], [0.0, 0.6, 0.0]])
    ends = torch.tensor([[False, True, False], [False, False, False]])
    got, _ = _run(torch.tensor([1.0, 0.0]), mask, entropy, ends, [0, 0], k=1.0, k_f=1.0, zeta=0.1)
    # steps: H = 0.3, 1.0, 0.3; H̃ = 0, 1, 0 (ε = 1e-8); e^{-H̃} = 1, e^{-1}, 1; mean = (2 + e^{-1}) / 3
    # A = +1/√2, −1/√2 (GRPO, std of (1, 0) = 1/√2); the first step's next step has H̃ = 1: bonus 0.1·e^{-1}
    a = 1 / math.sqrt(2) / (1 / math.sqrt(2) + 1e-6) * (1 / math.sqrt(2))  # (1 − 0.5) / (std + 1e-6)
    mean_e = (2 + math.exp(-1)) / 3
    modulated = [1 / mean_e * a + 0.1 * math.exp(-1), math.exp(-1) / mean_e * a, 1 / mean_e * -a]
    centre = sum(modulated) / 3
    want = torch.tensor([[modulated[0] - centre] * 2 + [modulated[1] - centre], [modulated[2] - centre] * 2 + [0.0]])
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-6, atol=1e-6)
    # the confident step of the right answer gets more than its uncertain line, the confident wrong one the most blame
    assert got[0, 0] > got[0, 2] and got[1, 0] < 0


def test_k_and_zeta_zero_is_grpo_centred_over_steps():
    """With k = 0 every g is 1 and with ζ = 0 there is no bonus: A_final = A(i) − mean over steps."""
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    scores, mask, entropy, ends, groups = random_batch(3)
    got, _ = _run(scores, mask, entropy, ends, groups, k=0.0, zeta=0.0, center="token")
    tlr = torch.zeros_like(mask)
    tlr[:, 0] = scores
    want, _ = compute_grpo_outcome_advantage(tlr, mask, np.array([f"u{g}" for g in groups], dtype=object))
    want = want - (want * mask).sum() / mask.sum()  # centred over the tokens
    torch.testing.assert_close(got, want * mask, rtol=1e-5, atol=1e-5)


def test_degenerate_inputs_give_finite_advantages():
    L = 4
    cases = {
        "singletons": (torch.tensor([1.0, 0.0, 1.0]), torch.ones(3, L), [0, 1, 2]),
        "all equal rewards": (torch.ones(4), torch.ones(4, L), [0] * 4),
        "length 1": (torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([[1.0, 0, 0, 0]] * 4), [0, 0, 1, 1]),
        "all padding": (torch.tensor([1.0, 0.0, 1.0]), torch.zeros(3, L), [0, 0, 1]),
        "some padding rows": (torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([[1.0] * L, [0.0] * L] * 2), [0] * 4),
    }
    for case, (scores, mask, groups) in cases.items():
        for ends in (torch.zeros(len(groups), L, dtype=torch.bool), torch.ones(len(groups), L, dtype=torch.bool)):
            for entropy in (torch.zeros_like(mask), torch.full_like(mask, 0.7), torch.rand(mask.shape) * 5):
                adv, _ = _run(scores, mask, entropy, ends, groups)
                assert torch.isfinite(adv).all(), (case, adv)
                assert (adv[mask == 0] == 0).all(), case
                assert adv.abs().max() < 1e3, (case, adv)
            assert all(math.isfinite(v) for v in LAST_METRICS.values()), LAST_METRICS
    # zero entropy everywhere: every g is 1 and every bonus ζ, as with any equal entropies
    scores, mask, _, ends, groups = random_batch(5)
    outs = [_run(scores, mask, torch.full_like(mask, v), ends, groups)[0] for v in (0.0, 1.0)]
    torch.testing.assert_close(outs[0], outs[1])


def test_the_estimator_needs_entropy_and_steps_from_the_trainer_and_reports_metrics():
    mask = torch.ones(4, 3)
    tlr = torch.zeros(4, 3)
    tlr[:, -1] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    uid = np.array(["a", "a", "b", "b"], dtype=object)
    with pytest.raises(EstimatorNeedsTrainerError, match="response steps .*hapo-verl"):
        with estimator_inputs(entropy=torch.rand(4, 3)):
            _estimator()(tlr, mask, index=uid, config={})
    LAST_METRICS.clear()
    with estimator_inputs(entropy=torch.rand(4, 3), step_ends=torch.tensor([[False, True, False]] * 4)):
        _estimator()(tlr, mask, index=uid, config={})
    assert LAST_METRICS["empg/steps_per_response"] == 2.0 and 0 < LAST_METRICS["empg/g_min"] <= 1.0


# ------------------------------------------------------------------------------------------------ steps = lines
class _Vocab:
    """A tokenizer's decoding: id -> text."""

    name_or_path = "test-vocab"

    def __init__(self, texts):
        self.texts = texts

    def __len__(self):
        return len(self.texts)

    def batch_decode(self, ids, **_):
        return [self.texts[i[0]] for i in ids]


def test_a_step_is_a_line_of_the_response():
    vocab = _Vocab(["a", "b", "\n", "c.\n\n", "=", "x\ny"])
    ends = line_end_tokens(vocab)
    assert ends.tolist() == [False, False, True, True, False, True]
    responses = torch.tensor([[0, 1, 2, 0, 4, 3, 1], [0, 5, 1, 1, -1, -1, -1]])  # -1: padding
    assert step_ends(responses, ends).int().tolist() == [[0, 0, 1, 0, 0, 1, 0], [0, 1, 0, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="no token holding a newline"):
        line_end_tokens(_Vocab(["a", "b"]))


def test_step_cells_and_their_values_at_every_position():
    mask = torch.tensor([[1.0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 1]])
    ends = torch.tensor([[True, False, True, False], [False, True, False, False], [False, True, False, False]])
    cells = step_cells(torch.ones_like(mask), mask, ends)
    # row 0: [0] [1 2] [3: padding, no token]; row 1: [0 1] [2 3], no tokens; row 2: [0 1] [2 3]
    assert cells.first.tolist() == [0, 1, 3, 4, 6, 8, 10] and cells.row.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert cells.tokens.tolist() == [1, 2, 0, 0, 0, 1, 2]
    adv, _ = empg_step_advantages(cells, torch.tensor([1.0, 0.0, -1.0]))
    assert (adv[[2, 3, 4]] == 0).all() and (adv[[0, 1, 5, 6]] != 0).all()  # no step, no value
    values = torch.arange(7, dtype=torch.float64) * 1.5 - 4
    want = [[-4.0, -2.5, -2.5, -1.0], [0.5, 0.5, 2.0, 2.0], [3.5, 3.5, 5.0, 5.0]]
    assert per_position(cells, values).tolist() == want


# ------------------------------------------------------------------------------------------------ configuration
BASE = START_UP_OVERRIDES


@pytest.mark.parametrize("key,value,match", [
    ("kappa", 1.0, r"unknown option algorithm\.empg\.kappa\b"),
    ("k", -0.5, r"algorithm\.empg\.k must be in \[0, inf\)"),
    ("zeta", -0.1, r"algorithm\.empg\.zeta must be in \[0, inf\)"),
    ("center", "group", r"algorithm\.empg\.center must be one of step, token"),
    ("epsilon", 0.0, r"algorithm\.empg\.epsilon must be in \(0, 1\]"),
])
def test_bad_options_are_rejected_at_start_up_naming_the_key(key, value, match):
    from hapo_verl.launcher import compose, prepare_config

    with pytest.raises(ValueError, match=match):
        prepare_config(compose("empg", BASE + [f"++algorithm.empg.{key}={value}"]))


def test_needs_several_responses_per_prompt():
    from hapo_verl.launcher import compose, prepare_config

    with pytest.raises(ValueError, match=r"adv_estimator=empg .*rollout\.n must be >= 2, got 1"):
        prepare_config(compose("empg", BASE + ["actor_rollout_ref.rollout.n=1"]))


def test_composes_with_hapo_adaptive_temperature_and_hapo_loss():
    from hapo_verl import registry
    from hapo_verl.launcher import compose, prepare_config
    from hapo_verl.trainer.hapo_trainer import StepPlan

    cfg = compose("empg", BASE + ["hapo.adaptive_temperature=true",
                                  "actor_rollout_ref.actor.policy_loss.loss_mode=hapo",
                                  "actor_rollout_ref.rollout.agent.default_agent_loop=hapo_single_turn"])
    prepare_config(cfg)
    plan = StepPlan.from_config(cfg)
    assert plan.estimator_spec.name == "empg" and plan.loss_spec.name == "hapo" and plan.adaptive_temperature
    assert registry.RESPONSE_STEPS in plan.estimator_needs and plan.needs_old_policy


def test_two_step_cpu_run_through_the_trainer(tmp_path):
    metrics = two_step_run_metrics("empg", tmp_path)
    for step in (1, 2):
        for key in ("empg/steps_per_response", "empg/g_max", "empg/bonus_mean", "actor/pg_loss"):
            assert key in metrics[step], (step, key, sorted(metrics[step]))
            assert math.isfinite(float(metrics[step][key])), (step, key, metrics[step][key])
