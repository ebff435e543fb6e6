"""The learning benchmark's statistics, on hand-made records: paired differences, their 95% t intervals, the
generated verdicts and the summary (no model, no run)."""

import math

import pytest

from hapo_verl.bench_learning import report


def _record(method, seed, accs, samples=128, clip=0.01):
    evals = [{"step": 5 * i, "acc": a} for i, a in enumerate(accs)]
    history = [{"step": s, "samples_generated": samples, "pg_clipfrac": clip, "response_length": 24.0}
               for s in range(1, 5 * (len(accs) - 1) + 1)]
    return {"method": method, "seed": seed, "evals": evals, "history": history, "task": {"kind": "countdown"},
            "rl": {"steps": 5 * (len(accs) - 1), "lr": 5e-5, "prompts_per_step": 16, "n": 8, "ppo_mini_batches": 4,
                   "ppo_epochs": 2, "eval_every": 5, "threads": 1}}


def test_confidence_interval_by_hand():
    mean, low, high = report.confidence_interval([0.1, 0.2, 0.3])
    half = 4.303 * 0.1 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert (mean, low, high) == pytest.approx((0.2, 0.2 - half, 0.2 + half))
    assert math.isnan(report.confidence_interval([0.5])[1])


def test_paired_differences_and_verdicts():
    # A beats B by 0.1 on every seed at the end (and 0.05 on average over the run): supported
    runs = [_record("hapo", s, [0.2, 0.3, 0.4, 0.5]) for s in range(3)]
    runs += [_record("dapo", s, [0.2, 0.25, 0.3, 0.4 - 0.001 * s], samples=300) for s in range(3)]
    d = report.paired_differences(runs, "hapo", "dapo", last=1)
    assert d["seeds"] == [0, 1, 2]
    assert d["end_acc"]["per_seed"] == pytest.approx([0.1, 0.101, 0.102])
    assert d["end_acc"]["ci95"][0] > 0
    # at equal samples DAPO (300 per step) is compared at its last evaluation within 15 x 128 samples
    assert report.budget_accuracy(runs[3]) == (0.25, 5)
    text = report.verdicts(runs, last=1)
    assert "HAPO > DAPO (HAPO without dynamic sampling, DAPO with it): **supported**" in text
    assert "HAPO > GRPO: no data" in text
    # reversed: contradicted; mixed signs: not shown
    flipped = [dict(r, method={"hapo": "dapo", "dapo": "hapo"}[r["method"]]) for r in runs]
    assert "**contradicted**" in report.verdicts(flipped, last=1).splitlines()[0]
    noisy = [_record("hapo", s, [0.2, 0.3, 0.3, 0.3 + (0.1 if s % 2 else -0.1)]) for s in range(3)]
    noisy += [_record("dapo", s, [0.2, 0.3, 0.3, 0.3]) for s in range(3)]
    assert "**not shown**" in report.verdicts(noisy, last=1).splitlines()[0]


def test_summary_has_every_cell_and_its_command():
    runs = [_record("grpo", 0, [0.2, 0.3]), _record("hapo", 0, [0.2, 0.4])]
    cells = report.summary(runs, last=1)["tasks"]["countdown"]["cells"]
    assert [(c["method"], c["end_acc"], c["auc"]) for c in cells] == \
        [("grpo", 0.3, pytest.approx(0.25)), ("hapo", 0.4, pytest.approx(0.3))]
    assert cells[0]["mean_clip_fraction"] == 0.01 and cells[0]["samples_per_step"] == 128
    assert cells[1]["command"] == ("hapo-verl bench-learning --task countdown --methods hapo --seeds 0 --steps 5 "
                                   "--lr 5e-05 --prompts 16 --mini-batches 4 --epochs 2 --eval-every 5 --threads 1 "
                                   "--jobs 1")
