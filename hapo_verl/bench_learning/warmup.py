"""Supervised warm-up: one cached checkpoint per (task, seed), shared by every method and both engines.

From a seeded random init (the tiny world's model, :func:`hapo_verl.tinyworld.world.create`, in the task
family's shape, e.g. :data:`hapo_verl.tinyworld.reversed_addition.SHAPE`), answer-only cross-entropy on
training-distribution problems (never held-out ones) with the family's reference answer (Countdown: one solver
solution drawn uniformly among the puzzle's), AdamW, batch 128; every ``check_every`` steps the greedy
accuracy on a separate check set (not the held-out evaluation set) is measured and training stops at the first
check that reaches ``target_accuracy``: the supervised transition of this task is sharp, so a fixed step count
would give very different starts across seeds, while a target gives a reproducible partial start.

The checkpoint is an HF model directory with the tokenizer and chat template (what verl's trainer loads);
``warmup.json`` next to it records the outcome. It is reused when present (same task, seed, settings and
:data:`CHECKPOINT_VERSION`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hapo_verl.supervised import answer_only_batch, file_lock, train_until_accurate
from hapo_verl.tinyworld import world
from hapo_verl.tinyworld.tasks import family

#: bump when the checkpoint's tokenizer, template or model change: checkpoints of another version are not reused
CHECKPOINT_VERSION = 2


@dataclass(frozen=True)
class WarmupSettings:
    target_accuracy: float = 0.15
    max_steps: int = 3000
    check_every: int = 10
    check_problems: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    grad_clip: float = 1.0

    def key(self) -> str:
        import hashlib

        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]


def checkpoint_dir(cache_root: str | Path, task, settings: WarmupSettings, seed: int) -> Path:
    name = f"{task.tag}_{task.key()}_{settings.key()}_v{CHECKPOINT_VERSION}"
    return Path(cache_root).expanduser().resolve() / name / f"seed{seed}"


def ensure_warm_checkpoint(cache_root: str | Path, task, seed: int,
                           settings: WarmupSettings | None = None, threads: int = 2, log=print) -> tuple[str, dict]:
    """Return (model_dir, outcome); build the checkpoint on first use."""
    settings = settings or WarmupSettings()
    root = checkpoint_dir(cache_root, task, settings, seed)
    done = root / "warmup.json"
    with file_lock(root.parent / f".seed{seed}.lock"):
        if done.is_file():
            return str(root / "model"), json.loads(done.read_text())
        tmp = root.parent / f".seed{seed}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "model").mkdir(parents=True)
        outcome = _warm_up(tmp / "model", task, seed, settings, threads, log)
        (tmp / "warmup.json").write_text(json.dumps(outcome, indent=1))
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
        return str(root / "model"), outcome


def _warm_up(model_dir: Path, task, seed: int, cfg: WarmupSettings, threads: int, log) -> dict:
    import torch

    from hapo_verl.bench_learning.fast import greedy_accuracy

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tasks = family(task)
        world.create(model_dir, tasks.SHAPE, seed)
        tokenizer, model = world.load(model_dir)
        codec = tasks.Codec(tokenizer, task)
        sampler = tasks.ProblemSampler(task, seed + 100_000)
        check = tasks.ProblemSampler(task, 999_983).sample(cfg.check_problems)
        references = random.Random(seed + 200_000)  # which solution, where a problem has several
        torch.manual_seed(seed)
        start = time.time()

        def next_batch():  # fixed-length prompts, no padding inside them: the model sees no attention mask
            problems = sampler.sample(cfg.batch_size)
            return answer_only_batch([(codec.encode_prompt(p), codec.reference_ids(p, references)) for p in problems],
                                     codec.pad, attention_mask=False)

        run = train_until_accurate(model, next_batch, lambda step: greedy_accuracy(model, codec, check),
                                   lr=cfg.lr, grad_clip=cfg.grad_clip, max_steps=cfg.max_steps,
                                   check_every=cfg.check_every, target_accuracy=cfg.target_accuracy)
        model.save_pretrained(str(model_dir))
        outcome = {"seed": seed, "steps": run.steps, "seconds": round(time.time() - start, 2),
                   "check_accuracy": round(run.accuracy, 4), "reached_target": run.reached_target,
                   "final_loss": round(run.final_loss, 4), "settings": asdict(cfg), "task": task.to_dict(),
                   "history": run.history, "threads": threads}
    finally:
        torch.set_num_threads(prev)
    log(f"[bench] warm-up seed {seed}: {outcome['steps']} steps, {outcome['seconds']:.0f} s, check accuracy "
        f"{outcome['check_accuracy']:.3f} (target {cfg.target_accuracy}{'' if run.reached_target else ', NOT reached'})")
    return outcome
