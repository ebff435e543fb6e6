"""``hapo-verl bench-learning --quick``: end to end in both engines (one seed, a few steps), table and plots.

Everything is written to a tmp dir (never docs/). The fast mode takes ~30-60 s on 2 cores, the verl mode
(one method through verl's real trainer, Ray start-up included) ~2 min.
"""

import json
import os

import pytest
import torch

from hapo_verl.bench_learning import main
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
    common = ["--quick", "--out", str(tmp / "runs"), "--cache", str(tmp / "cache"), "--report",
              str(tmp / "report" / "results.md"), "--jobs", "1"]
    assert main(common + ["--engine", "fast"]) == 0
    assert main(common + ["--engine", "verl"]) == 0
    return tmp


def test_quick_fast_mode(quick_run):
    runs = quick_run / "runs" / "fast"
    for method in ("grpo", "dapo", "hapo", "hapo_ref"):
        rec = json.loads((runs / f"{method}_s0.json").read_text())
        assert rec["evals"][0]["step"] == 0 and rec["evals"][-1]["step"] == 6
        assert len(rec["history"]) == 6
        assert all(torch.isfinite(torch.tensor(h["pg_loss"])) for h in rec["history"] if "pg_loss" in h)
    hapo = json.loads((runs / "hapo_s0.json").read_text())["history"]
    # adaptive temperature from step 2 on (statistics of the previous step), within [1 - tau, 1 + tau]
    assert hapo[0]["temperature_std"] == 0.0 and hapo[-1]["temperature_std"] > 0
    assert all(0.95 - 1e-6 <= h["temperature_mean"] <= 1.05 + 1e-6 for h in hapo)
    dapo = json.loads((runs / "dapo_s0.json").read_text())["history"]
    assert all(h["samples_generated"] >= 128 for h in dapo)
    grpo = json.loads((runs / "grpo_s0.json").read_text())["history"]
    assert all(h["samples_generated"] == 128 and h["temperature_std"] == 0.0 for h in grpo)


def test_quick_verl_mode(quick_run):
    rec = json.loads((quick_run / "runs" / "verl" / "hapo_s0.json").read_text())
    assert rec["returncode"] == 0, (quick_run / "runs" / "verl" / "hapo_s0" / "trainer.log").read_text()[-3000:]
    assert [e["step"] for e in rec["evals"]] == [0, 2]
    # same start as the fast mode: the same checkpoint evaluated greedily on the same held-out prompts
    fast = json.loads((quick_run / "runs" / "fast" / "hapo_s0.json").read_text())
    assert rec["evals"][0]["acc"] == pytest.approx(fast["evals"][0]["acc"], abs=0.02)
    assert len(rec["history"]) == 2


def test_quick_report_and_plots(quick_run):
    text = (quick_run / "report" / "results.md").read_text()
    assert "| GRPO |" in text and "| DAPO |" in text and "| HAPO (default) |" in text
    assert "| HAPO (reference_compat) |" in text and "verl trainer" in text
    for name in ("accuracy.png", "accuracy_vs_samples.png", "entropy.png", "response_length.png",
                 "train_score.png", "verl_vs_fast.png"):
        path = quick_run / "report" / "results" / name
        assert path.is_file() and path.stat().st_size > 1000
    assert not os.path.exists(quick_run / "docs")


def test_rerun_skips_finished_verl_runs_and_keeps_their_files(quick_run, capsys):
    runs = quick_run / "runs" / "verl"
    record, metrics = runs / "hapo_s0.json", runs / "hapo_s0" / "metrics.jsonl"
    before = (record.read_text(), metrics.read_text())
    common = ["--quick", "--out", str(quick_run / "runs"), "--cache", str(quick_run / "cache"), "--jobs", "1"]
    assert main(common + ["--engine", "verl"]) == 0
    assert "verl hapo s0: record exists, skipped" in capsys.readouterr().out
    assert (record.read_text(), metrics.read_text()) == before
    assert (quick_run / "runs" / "results.md").exists()  # the default report goes under --out, not docs/
