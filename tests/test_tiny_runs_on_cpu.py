"""End to end through verl's real v1 trainer on CPU (Ray, FSDP2, hfcpu rollout), as a user runs it:
``hapo-verl tiny``. Each run takes about a minute and a half on 2 cores."""

import json
import math
import os
import subprocess
import sys

import pytest

TAU = 0.05
T = 1.0


def tiny(out, *args, steps=2, timeout=1200):
    cmd = [sys.executable, "-m", "hapo_verl.cli", "tiny", "--steps", str(steps), "--out", str(out), *args]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, start_new_session=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return log


def read_metrics(path):
    steps = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            steps.setdefault(record["step"], {}).update(record["data"])
    return steps


def finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.fixture(scope="module")
def hapo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hapo_tiny")
    log = tiny(out, "--config", "hapo")
    return out, log, read_metrics(out / "hapo" / "metrics.jsonl")


def test_hapo_run_prints_progress_and_summary(hapo_run):
    out, log, metrics = hapo_run
    assert "[hapo-verl] done in" in log
    assert "per-step summary" in log and "Training Progress" in log
    assert "metrics log (JSONL)" in log and "checkpoint:" in log
    assert sorted(metrics) == [1, 2]
    # quiet by default: nothing a user cannot act on (even with Ray's log deduplication off)
    for noise in ("engine is not available: ModuleNotFoundError", "target_num_threads 8 should not exceed",
                  "'calculate_entropy': ", "UserWarning: Disabled critic", "'set_vital' is deprecated, please"):
        assert noise not in log, noise


def test_estimator_and_loss_metrics_are_finite(hapo_run):
    _, _, metrics = hapo_run
    for step in (1, 2):
        m = metrics[step]
        assert 0.0 <= m["hapo/estimator/fallback_group_frac"] <= 1.0
        for key in ("hapo/stats/pivot", "hapo/stats/scale", "hapo/h_hat/mean", "hapo/h_hat/p50",
                    "actor/hapo/h_hat_mean", "actor/hapo/clipfrac_high_entropy", "actor/hapo/clipfrac_low_entropy",
                    "actor/hapo/amplified_frac", "actor/hapo/attenuated_frac", "actor/hapo/clip_lower_bound_mean",
                    "actor/hapo/clip_upper_bound_mean", "actor/pg_loss"):
            assert key in m and finite(m[key]), (step, key, m.get(key))
        assert m["hapo/stats/num_tokens"] > 0


def test_statistics_reach_step_two_requests_only(hapo_run):
    _, _, metrics = hapo_run
    assert metrics[1]["hapo/rollout/requests_with_stats"] == 0
    assert metrics[2]["hapo/rollout/requests_with_stats"] > 0
    # step 1: no statistics, every token at T; step 2: within [T(1 - tau), T(1 + tau)]
    assert metrics[1]["hapo/rollout/temperature_min"] == pytest.approx(T)
    assert metrics[1]["hapo/rollout/temperature_max"] == pytest.approx(T)
    assert metrics[2]["hapo/rollout/temperature_min"] >= T * (1 - TAU) - 1e-6
    assert metrics[2]["hapo/rollout/temperature_max"] <= T * (1 + TAU) + 1e-6
    assert metrics[2]["hapo/rollout/temperature_max"] > metrics[2]["hapo/rollout/temperature_min"]


def test_trainer_side_temperature_estimate_matches_what_the_rollout_did(hapo_run):
    # vLLM cannot return per-token factors; the trainer recomputes T*f from the old-policy entropy and the
    # statistics the requests carried. The CPU rollout reports the real ones: per token they must agree.
    _, _, metrics = hapo_run
    assert "hapo/rollout/temperature_est_mean" not in metrics[1]  # step 1 sent no statistics
    m = metrics[2]
    assert m["hapo/rollout/temperature_est_max_abs_err"] < 1e-3
    for stat in ("min", "mean", "max"):
        assert m[f"hapo/rollout/temperature_est_{stat}"] == pytest.approx(m[f"hapo/rollout/temperature_{stat}"],
                                                                          abs=1e-3)


def test_rerun_then_resume_keep_every_attempts_records_and_statistics(hapo_run):
    out, _, metrics = hapo_run
    path = out / "hapo" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    state = json.load(open(out / "hapo" / "checkpoints" / "global_step_2" / "hapo_state.json"))
    assert state["rollout_stats"]["pivot"] == pytest.approx(metrics[2]["hapo/stats/pivot"])
    # the same command again: nothing left to train; it says so, shows the earlier summary and starts no Ray
    log = tiny(out, "--config", "hapo", steps=2)
    assert "[hapo-verl] nothing to train:" in log and "--steps 4 continues it" in log
    assert "per-step summary" in log and "Started a local Ray" not in log
    assert path.read_text().splitlines() == lines
    # --steps 3 continues from the checkpoint of step 2 and appends to the same log
    log = tiny(out, "--config", "hapo", "trainer.resume_mode=auto", steps=3)
    assert "steps 3..3 (resuming from its checkpoint)" in log and "restored entropy statistics" in log
    after = path.read_text().splitlines()
    assert after[:len(lines)] == lines and len(after) > len(lines)
    resumed = read_metrics(path)
    assert sorted(resumed) == [1, 2, 3]
    assert all(resumed[s][k] == metrics[s][k] for s in (1, 2) for k in metrics[s])
    # the first step after resume already samples with the saved statistics (the fork would start without)
    assert resumed[3]["hapo/rollout/requests_with_stats"] > 0
    assert resumed[3]["hapo/rollout/temperature_max"] > resumed[3]["hapo/rollout/temperature_min"]


def test_reference_compat_run(tmp_path):
    tiny(tmp_path, "--config", "hapo", "hapo.reference_compat=true")
    metrics = read_metrics(tmp_path / "hapo" / "metrics.jsonl")
    m = metrics[2]
    # the fork's unsigned score: only heats, never attenuates, never widens the lower clip bound
    assert m["hapo/rollout/temperature_min"] >= T - 1e-6
    assert m["hapo/rollout/temperature_max"] <= T * (1 + TAU) + 1e-6
    assert m["actor/hapo/attenuated_frac"] == 0.0
    assert m["actor/hapo/clip_lower_bound_mean"] == pytest.approx(0.8)
    assert m["hapo/h_hat/p10"] >= 0.0


def test_dapo_run_has_no_hapo_component(tmp_path):
    tiny(tmp_path, "--config", "dapo")
    metrics = read_metrics(tmp_path / "dapo" / "metrics.jsonl")
    assert sorted(metrics) == [1, 2]
    for m in metrics.values():
        assert not any(k.startswith("actor/hapo/") or k.startswith("hapo/") for k in m), sorted(m)
        assert finite(m["actor/pg_loss"])


def test_plain_verl_entry_point_runs_the_hapo_estimator(tmp_path):
    """A user's habit: keep `python -m verl.trainer.main_ppo` and add algorithm.adv_estimator=hapo."""
    sys.path.insert(0, os.path.dirname(__file__))
    from cpu_run_utils import grpo_smoke_overrides, run_verl

    from hapo_verl.cpu import ensure_tiny_assets

    overrides = [o if o != "algorithm.adv_estimator=grpo" else "algorithm.adv_estimator=hapo"
                 for o in grpo_smoke_overrides(ensure_tiny_assets(), steps=1, n=4, batch_size=4)]
    assert "algorithm.adv_estimator=hapo" in overrides
    res = run_verl(overrides, timeout=600, log_path=tmp_path / "main_ppo_hapo.log")
    assert not res.timed_out and res.rc == 0, res.tail()
    metrics = res.step_metrics[1]
    assert math.isfinite(metrics["actor/pg_loss"])
    # verl would stop with "Unknown advantage estimator" had the plugin not registered hapo in its workers
    assert math.isfinite(metrics["critic/advantages/max"])
