"""The supervised warm-up loop shared by the tiny CPU assets (``hapo_verl.cpu.assets``) and the learning benchmark
(``hapo_verl.bench_learning.warmup``): answer-only cross-entropy, AdamW, gradient clipping, and a stop at the first
accuracy check that reaches a target. Each caller owns its task, its batches (and their RNG) and its check.
"""

from __future__ import annotations

import contextlib
import fcntl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock on ``path`` (created) for processes building the same cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def answer_only_batch(examples: Sequence[tuple[list[int], list[int]]], pad_id: int,
                      attention_mask: bool = True) -> dict:
    """Model inputs for (prompt ids, answer ids) pairs: right padding, labels only on the answer tokens (-100
    elsewhere; HF shifts them), plus ``attention_mask`` unless asked not to."""
    import torch

    width = max(len(p) + len(a) for p, a in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (prompt, answer) in enumerate(examples):
        seq = prompt + answer
        input_ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
        labels[row, len(prompt):len(seq)] = torch.tensor(answer)
    batch = {"input_ids": input_ids, "labels": labels}
    if attention_mask:
        batch["attention_mask"] = mask
    return batch


@dataclass
class SupervisedOutcome:
    steps: int = 0
    accuracy: float = 0.0
    reached_target: bool = False
    final_loss: float = float("nan")
    #: (step, accuracy, loss) at every check
    history: list = field(default_factory=list)


def train_until_accurate(
    model,
    next_batch: Callable[[], dict],
    accuracy: Callable[[int], float],
    *,
    lr: float,
    grad_clip: float,
    max_steps: int,
    check_every: int,
    target_accuracy: float,
    check_last_step: bool = False,
) -> SupervisedOutcome:
    """Train ``model`` on ``next_batch()`` until ``accuracy(step)`` (measured every ``check_every`` steps, in eval
    mode, and at ``max_steps`` too if ``check_last_step``) reaches ``target_accuracy``, or ``max_steps``."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    out = SupervisedOutcome()
    model.train()
    while out.steps < max_steps:
        loss = model(**next_batch()).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        out.steps += 1
        out.final_loss = float(loss.detach())
        if out.steps % check_every == 0 or (check_last_step and out.steps == max_steps):
            model.eval()
            out.accuracy = accuracy(out.steps)
            model.train()
            out.history.append((out.steps, round(out.accuracy, 4), round(out.final_loss, 4)))
            if out.accuracy >= target_accuracy:
                out.reached_target = True
                break
    model.eval()
    return out
