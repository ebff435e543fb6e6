"""Tiny CPU assets: the supervised warm-up stops at its target accuracy; the task reward's hand-computed cases.

The warm-up test builds a fresh cache in a temporary directory with a low target (0.1) so that it stays
small (~100 steps, well under a minute on 2 cores); the shared cache uses :class:`WarmupConfig`'s defaults.
"""

from __future__ import annotations

import json

import pytest

from hapo_verl.cpu.assets import ASSETS_VERSION, WarmupConfig, ensure_tiny_assets, sampled_accuracy
from hapo_verl.cpu.reward import DATA_SOURCE, compute_score, extract_answer
from hapo_verl.tinyworld.addition import OPERAND_MAX, problem_splits, question
from hapo_verl.tinyworld.world import prompt_ids


# ------------------------------------------------------------------------------------------------- reward
@pytest.mark.parametrize("response, truth, expected", [
    ("19", "19", 1.0),
    ("12+7=19", "19", 1.0),            # last integer counts
    ("19 is 20", "19", 0.0),           # ... and only the last one
    ("7", "19", 0.0),
    ("", "19", 0.0),
    ("no number", "0", 0.0),
    ("0", "0", 1.0),
    ("019", "19", 1.0),                # compared as integers
    ("-3", "-3", 1.0),
    ("x=38<|im_end|>", "38", 1.0),
    ("3 8", "38", 0.0),
    ("38", " 38 ", 1.0),               # ground truth is stripped
    ("38", "not an int", 0.0),
    (None, "1", 0.0),
])
def test_reward_hand_computed_cases(response, truth, expected):
    assert compute_score(DATA_SOURCE, response, truth) == expected


def test_extract_answer():
    assert extract_answer("1+2=3") == "3" and extract_answer("abc") is None and extract_answer("a-12b") == "-12"


# ------------------------------------------------------------------------------------------------ splits
def test_problem_splits_are_disjoint_and_fit_the_response_length():
    splits = problem_splits()
    sets = {k: set(v) for k, v in splits.items()}
    assert len(sets["train"]) == 64 and len(sets["val"]) == 16
    assert not (sets["train"] & sets["val"]) and not (sets["warmup"] & (sets["train"] | sets["val"]))
    assert sum(len(s) for s in sets.values()) == (OPERAND_MAX + 1) ** 2
    assert len(str(2 * OPERAND_MAX)) + 1 <= 16  # answer digits + eos fit max_response_length


# ------------------------------------------------------------------------------------------------ warm-up
@pytest.mark.timeout(1200)  # ~60 s alone; generous for a loaded machine
def test_warm_up_stops_at_target_accuracy_on_fresh_cache(tmp_path):
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = WarmupConfig(target_accuracy=0.1, eval_every=10, max_steps=600)
    root = tmp_path / "tiny"
    assets = ensure_tiny_assets(root, warmup=cfg)
    outcome = json.loads((root / "warmup.json").read_text())
    assert outcome["reached_target"], outcome
    assert outcome["sampled_accuracy"] >= cfg.target_accuracy
    # it stopped at the FIRST periodic check that reached the target, before the cap
    assert outcome["steps"] < cfg.max_steps and outcome["steps"] % cfg.eval_every == 0
    history = outcome["history"]
    assert history[-1] == [outcome["steps"], outcome["sampled_accuracy"]]
    assert all(acc < cfg.target_accuracy for _, acc in history[:-1])
    marker = json.loads((root / "assets.json").read_text())
    assert marker["version"] == ASSETS_VERSION and marker["warmup"]["steps"] == outcome["steps"]

    # idempotent: a second call reuses the cache (no rebuild, whatever warm-up config it is given)
    mtime = (root / "assets.json").stat().st_mtime_ns
    assert ensure_tiny_assets(root, warmup=WarmupConfig(target_accuracy=0.9)) == assets
    assert (root / "assets.json").stat().st_mtime_ns == mtime

    # the saved model reproduces the recorded accuracy (deterministic sampling, same seed as the last check)
    tok = AutoTokenizer.from_pretrained(assets.model_path)
    model = AutoModelForCausalLM.from_pretrained(assets.model_path, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    held_out = problem_splits()["train"] + problem_splits()["val"]
    acc = sampled_accuracy(model, tok, held_out, samples=cfg.eval_samples, seed=cfg.seed + outcome["steps"])
    assert acc == pytest.approx(outcome["sampled_accuracy"], abs=0.03)  # thread-count float noise may flip a sample

    # the RL parquet prompts tokenize exactly like the warm-up's (chat template + generation prompt)
    row = pd.read_parquet(assets.train_file).iloc[0]
    a, b = int(row["extra_info"]["a"]), int(row["extra_info"]["b"])
    assert (a, b) in set(problem_splits()["train"])
    ids = prompt_ids(tok, question(a, b))
    text = tok.apply_chat_template(list(row["prompt"]), add_generation_prompt=True, tokenize=False)
    assert tok.decode(ids) == text and text.endswith("<|im_start|>assistant\n")
    assert len(ids) <= assets.max_prompt_length
