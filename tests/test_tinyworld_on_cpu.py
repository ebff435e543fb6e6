"""The tiny world: the quickstart assets and the learning benchmark build their model directories with the same
tokenizer, chat template and model builder; only the model shape differs."""

from __future__ import annotations

import json

import pytest

from hapo_verl.bench_learning.warmup import ensure_warm_checkpoint
from hapo_verl.cpu.assets import ensure_tiny_assets
from hapo_verl.tinyworld import addition, reversed_addition, world


class _Built(Exception):
    pass


def test_both_tasks_build_through_the_world(tmp_path, monkeypatch):
    calls = []

    def create(model_dir, shape, seed):
        calls.append(shape)
        raise _Built

    monkeypatch.setattr(world, "create", create)
    with pytest.raises(_Built):
        ensure_tiny_assets(tmp_path / "tiny")
    with pytest.raises(_Built):
        ensure_warm_checkpoint(tmp_path / "bench", reversed_addition.TaskConfig(), seed=0, log=lambda *a: None)
    assert calls == [addition.SHAPE, reversed_addition.SHAPE]


def test_both_tasks_get_the_same_tokenizer_and_chat_template(tmp_path):
    dirs = {"addition": tmp_path / "addition", "reversed": tmp_path / "reversed"}
    world.create(dirs["addition"], addition.SHAPE, addition.SEED)
    world.create(dirs["reversed"], reversed_addition.SHAPE, seed=0)
    for name in ("tokenizer.json", "chat_template.jinja"):
        assert (dirs["addition"] / name).read_bytes() == (dirs["reversed"] / name).read_bytes(), name
    configs = {k: json.loads((d / "config.json").read_text()) for k, d in dirs.items()}
    differing = {k for k in configs["addition"] if configs["addition"][k] != configs["reversed"].get(k)}
    assert differing and differing <= set(vars(addition.SHAPE)) | {"layer_types"}  # one entry per layer
    tokenizers = {k: world.load(d)[0] for k, d in dirs.items()}
    assert tokenizers["addition"].chat_template == tokenizers["reversed"].chat_template == world.CHAT_TEMPLATE
    ids = {k: world.prompt_ids(t, "12+345=") for k, t in tokenizers.items()}
    assert ids["addition"] == ids["reversed"] and len(ids["addition"]) == world.CHAT_FRAME_TOKENS + 7
