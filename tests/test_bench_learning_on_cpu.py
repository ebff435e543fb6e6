"""``hapo-verl bench-learning --quick``: end to end in both engines (one seed, a few steps), table and plots.

Everything is written to a tmp dir (never docs/). The fast mode takes ~30-60 s on 2 cores, the verl mode
(one method through verl's real trainer, Ray start-up included) ~2 min.
"""

import gzip
import json
import os

import pytest
import torch

from hapo_verl.bench_learning import main, quick_methods
from hapo_verl.tinyworld import world
from hapo_verl.tinyworld.reversed_addition import (SHAPE, Codec, ProblemSampler, TaskConfig, answer_text,
                                                   compute_score, heldout_problems, prompt_text)


def test_task_family(tmp_path):
    fixed = TaskConfig(kind="add", digits=3)
    var = TaskConfig(kind="addvar", digits=3)
    assert prompt_text(fixed, 7, 45) == "007+045=" and answer_text(7, 45) == "25"
    assert answer_text(999, 1) == "0001"
    assert fixed.max_new_tokens == 7 and var.prompt_len == world.CHAT_FRAME_TOKENS + 8
    lengths = {len(answer_text(a, b)) for a, b in ProblemSampler(var, 0).sample(2000)}
    assert lengths == {1, 2, 3, 4}  # the answer length varies with addvar
    fixed_lengths = [len(answer_text(a, b)) for a, b in ProblemSampler(fixed, 0).sample(2000)]
    assert sum(n in (3, 4) for n in fixed_lengths) > 0.98 * len(fixed_lengths)  # nearly fixed length
    held = set(heldout_problems(var))
    assert len(held) == 500 and not held & set(ProblemSampler(var, 3).sample(5000))
    assert compute_score("x", " 52 ", "52")["score"] == 1.0 and compute_score("x", "521", "52")["acc"] == 0.0
    world.create(tmp_path / "model", SHAPE, seed=0)
    codec = Codec(world.load(tmp_path / "model")[0], var)
    assert len(codec.prompt_ids(123, 4)) == var.prompt_len and codec.decode(codec.answer_ids(123, 4)) == "721"
    text = codec.tokenizer.decode(codec.prompt_ids(123, 4))
    assert text == "<|im_start|>user\n123+004=<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    common = ["--quick", "--task", "countdown", "--out", str(tmp / "runs"), "--cache", str(tmp / "cache"), "--report",
              str(tmp / "report" / "results.md"), "--jobs", "1"]
    assert main(common + ["--engine", "fast"]) == 0
    assert main(common + ["--engine", "verl"]) == 0
    return tmp


def test_quick_fast_mode(quick_run):
    runs = quick_run / "runs" / "fast"
    for method in quick_methods():
        rec = json.loads((runs / f"{method}_s0.json").read_text())
        assert rec["evals"][0]["step"] == 0 and rec["evals"][-1]["step"] == 4
        assert len(rec["history"]) == 4
        assert all(torch.isfinite(torch.tensor(h["pg_loss"])) for h in rec["history"] if "pg_loss" in h)
        assert all(0.0 <= h["clipfrac_high_entropy"] <= 1.0 for h in rec["history"] if "pg_loss" in h)
    hapo = json.loads((runs / "hapo_s0.json").read_text())["history"]
    # adaptive temperature from step 2 on (statistics of the previous step), within [1 - tau, 1 + tau]
    assert hapo[0]["temperature_std"] == 0.0 and hapo[-1]["temperature_std"] > 0
    assert all(0.95 - 1e-6 <= h["temperature_mean"] <= 1.05 + 1e-6 for h in hapo)
    assert all("actor/hapo/amplified_frac" in h for h in hapo)
    dapo = json.loads((runs / "dapo_s0.json").read_text())["history"]
    assert all(h["samples_generated"] >= 64 for h in dapo)
    grpo = json.loads((runs / "grpo_s0.json").read_text())["history"]
    assert all(h["samples_generated"] == 64 and h["temperature_std"] == 0.0 for h in grpo)
    # the mini-batch pass reached BAPO's loss: its bounds come from the whole mini-batch
    bapo = json.loads((runs / "bapo_s0.json").read_text())["history"]
    assert all("actor/bapo/clip_high" in h for h in bapo)
    # D³S's selection step ran: keep ratios anneal from the configured start to 1 at the last step
    d3s = json.loads((runs / "d3s_s0.json").read_text())["history"]
    assert d3s[0]["d3s/token_keep_ratio"] < d3s[-1]["d3s/token_keep_ratio"] == 1.0
    assert d3s[0]["d3s/kept_token_fraction"] < 1.0


def test_quick_verl_mode(quick_run):
    rec = json.loads((quick_run / "runs" / "verl" / "hapo_s0.json").read_text())
    assert rec["returncode"] == 0, (quick_run / "runs" / "verl" / "hapo_s0" / "trainer.log").read_text()[-3000:]
    assert [e["step"] for e in rec["evals"]] == [0, 2]
    # same start as the fast mode: the same checkpoint evaluated greedily on the same held-out prompts
    fast = json.loads((quick_run / "runs" / "fast" / "hapo_s0.json").read_text())
    assert rec["evals"][0]["acc"] == pytest.approx(fast["evals"][0]["acc"], abs=0.02)
    assert len(rec["history"]) == 2


def test_quick_reproduces_its_first_interval(quick_run):
    common = ["--quick", "--task", "countdown", "--out", str(quick_run / "runs"), "--cache",
              str(quick_run / "cache"), "--jobs", "1", "--methods", "hapo", "d3s"]
    assert main(common + ["--reproduce"]) == 0
    rows = json.loads((quick_run / "runs" / "reproduce.json").read_text())
    assert {(r["method"], r["step"]) for r in rows} == {("hapo", 2), ("d3s", 2)}
    assert all(r["recorded"] == r["rerun"] for r in rows)


def test_quick_summary_and_records(quick_run):
    summary = json.loads((quick_run / "report" / "results" / "summary.json").read_text())
    cells = summary["tasks"]["countdown"]["cells"]
    assert {c["method"] for c in cells} == set(quick_methods())
    for c in cells:
        assert 0.0 <= c["end_acc"] <= 1.0 and c["samples_per_step"] >= 64
        # a step dynamic sampling skips (no group with mixed rewards, likely after a 30-step warm-up) has no length
        if c["mean_response_length"] is None:
            assert c["method"] == "dapo"
        else:
            assert c["mean_response_length"] > 10
        assert c["command"].startswith(f"hapo-verl bench-learning --task countdown --methods {c['method']} --seeds 0")
    with gzip.open(quick_run / "report" / "results" / "records_countdown.json.gz", "rt") as f:
        records = json.load(f)
    assert len(records["fast"]) == len(quick_methods()) and records["verl"][0]["method"] == "hapo"


def test_quick_report_and_plots(quick_run):
    text = (quick_run / "report" / "results.md").read_text()
    assert "| GRPO |" in text and "| DAPO |" in text and "| HAPO |" in text and "| D³S |" in text
    assert "verl trainer" in text and "### Verdicts" in text and "HAPO > DAPO" in text
    assert "### Component activity" in text and "[95% CI]" in text
    for name in ("accuracy.png", "accuracy_vs_samples.png", "entropy.png", "response_length.png",
                 "train_score.png", "verl_vs_fast.png"):
        path = quick_run / "report" / "results" / name
        assert path.is_file() and path.stat().st_size > 1000
    assert not os.path.exists(quick_run / "docs")


def test_rerun_skips_finished_verl_runs_and_keeps_their_files(quick_run, capsys):
    runs = quick_run / "runs" / "verl"
    record, metrics = runs / "hapo_s0.json", runs / "hapo_s0" / "metrics.jsonl"
    before = (record.read_text(), metrics.read_text())
    common = ["--quick", "--task", "countdown", "--out", str(quick_run / "runs"), "--cache", str(quick_run / "cache"),
              "--jobs", "1"]
    assert main(common + ["--engine", "verl"]) == 0
    assert "verl hapo s0: record exists, skipped" in capsys.readouterr().out
    assert (record.read_text(), metrics.read_text()) == before
    assert (quick_run / "runs" / "results.md").exists()  # the default report goes under --out, not docs/


def test_forced_rerun_keeps_the_earlier_record(quick_run, capsys):
    fast = quick_run / "runs" / "fast"
    before = (fast / "grpo_s0.json").read_text()
    common = ["--quick", "--task", "countdown", "--out", str(quick_run / "runs"), "--cache", str(quick_run / "cache"),
              "--jobs", "1", "--methods", "grpo"]
    assert main(common) == 0
    assert "grpo s0: record exists, skipped" in capsys.readouterr().out
    assert main(common + ["--force"]) == 0
    kept = [p for p in fast.iterdir() if p.name.startswith("grpo_s0.json.")]
    assert len(kept) == 1 and kept[0].read_text() == before
    # bit-reproducible at a fixed seed and thread count: the rerun's evaluations equal the earlier ones
    accuracies = lambda text: [(e["step"], e["acc"]) for e in json.loads(text)["evals"]]  # noqa: E731
    assert accuracies((fast / "grpo_s0.json").read_text()) == accuracies(before)
