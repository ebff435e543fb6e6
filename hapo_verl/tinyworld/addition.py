"""The CPU quickstart's task (``hapo-verl tiny``): "a+b=" with operands 0-19, answer the sum, then eos.

All 400 pairs, shuffled (seeded) into 64 RL train + 16 RL val prompts and 320 supervised warm-up problems. The
reward is :func:`hapo_verl.cpu.reward.compute_score`.
"""

from __future__ import annotations

import random

from hapo_verl.tinyworld.world import ModelShape

#: ~0.3 M parameters with the world's 400-token vocabulary
SHAPE = ModelShape(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256)
NUM_TRAIN, NUM_VAL, SEED = 64, 16, 1234
#: operands are 0..OPERAND_MAX (sums have at most 2 digits: 2 answer tokens + eos)
OPERAND_MAX = 19


def question(a: int, b: int) -> str:
    return f"{a}+{b}="


def answer(a: int, b: int) -> str:
    return str(a + b)


def problem_splits() -> dict[str, list[tuple[int, int]]]:
    """All (a, b) with 0 <= a, b <= OPERAND_MAX, shuffled (seeded) into disjoint RL train / RL val / warm-up."""
    pairs = [(a, b) for a in range(OPERAND_MAX + 1) for b in range(OPERAND_MAX + 1)]
    random.Random(SEED).shuffle(pairs)
    return {"train": pairs[:NUM_TRAIN], "val": pairs[NUM_TRAIN:NUM_TRAIN + NUM_VAL],
            "warmup": pairs[NUM_TRAIN + NUM_VAL:]}
