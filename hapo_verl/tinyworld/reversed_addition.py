"""The learning benchmark's task family (``hapo-verl bench-learning``): reversed addition.

Prompt ``"aaa+bbb="`` (operands zero-padded to ``digits``, so every prompt has the same length), answer the
digits of ``a+b`` least-significant first (natural length, no padding) followed by eos. Every digit and sign is
one token of the world's tokenizer, so the answer length in tokens is ``len(answer) + 1``.

Kinds (the difficulty knob is ``digits``):

* ``add``: both operands uniform in ``[0, 10**digits)``; answers have ``digits`` or ``digits + 1`` characters
  (nearly fixed length, as in the feasibility study).
* ``addvar`` (default): each operand first draws its own number of digits uniformly in ``1..digits``, then a
  value of exactly that many digits; answers range from 1 to ``digits + 1`` characters, so token-level vs
  sequence-level weighting (DAPO's token-mean vs GRPO's seq-mean-token-mean) and DAPO's overlong shaping act.

Generation limit ``max_new_tokens = digits + 4``: the longest correct response is ``digits + 2`` tokens
(with eos), and DAPO's overlong buffer of 2 tokens penalises only responses longer than that.

Reward (:func:`compute_score`, verl's ``custom_reward_function`` signature): 1.0 when the response text,
stripped, equals the answer, else 0.0. A response that is truncated without eos is always longer than any
answer, so it scores 0 in both the fast mode and verl's trainer.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass

from hapo_verl.tinyworld.problems import ExcludingSampler, distinct_draws
from hapo_verl.tinyworld.world import CHAT_FRAME_TOKENS, ModelShape, prompt_ids, rl_row

DATA_SOURCE = "hapo_bench_reversed_add"
KINDS = ("add", "addvar")
#: the feasibility study's shape: ~0.89 M parameters with the world's 400-token vocabulary
SHAPE = ModelShape(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=64)


@dataclass(frozen=True)
class TaskConfig:
    kind: str = "addvar"
    digits: int = 3
    #: fixed held-out prompts (the same for every seed and method), disjoint from training prompts
    num_heldout: int = 500
    heldout_seed: int = 12345
    #: DAPO overlong buffer (tokens); max_new_tokens - overlong_buffer = longest correct response
    overlong_buffer: int = 2

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task kind must be one of {KINDS}, got {self.kind!r}")
        if not 1 <= self.digits <= 6:
            raise ValueError(f"digits must be in 1..6, got {self.digits}")

    @property
    def tag(self) -> str:
        """Short name of the task family and size (cache directories)."""
        return f"{self.kind}{self.digits}"

    def describe(self) -> str:
        return (f"{self.kind}, {self.digits} digits, reversed answer, {self.num_heldout} held-out prompts (greedy), "
                f"max {self.max_new_tokens} new tokens, DAPO overlong buffer {self.overlong_buffer}")

    @property
    def max_new_tokens(self) -> int:
        return self.digits + 2 + self.overlong_buffer

    @property
    def prompt_len(self) -> int:
        """Prompt tokens: the chat frame and one token per character of ``aaa+bbb=``."""
        return CHAT_FRAME_TOKENS + 2 * self.digits + 2

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]

    def to_dict(self) -> dict:
        return asdict(self)


def prompt_text(task: TaskConfig, a: int, b: int) -> str:
    return f"{a:0{task.digits}d}+{b:0{task.digits}d}="


def answer_text(a: int, b: int) -> str:
    return str(a + b)[::-1]


def _operand(task: TaskConfig, rng: random.Random) -> int:
    if task.kind == "add":
        return rng.randrange(10 ** task.digits)
    n = rng.randint(1, task.digits)
    low = 0 if n == 1 else 10 ** (n - 1)
    return rng.randrange(low, 10 ** n)


def _draw_pair(task: TaskConfig, rng: random.Random) -> tuple[int, int]:
    return _operand(task, rng), _operand(task, rng)


def heldout_problems(task: TaskConfig) -> list[tuple[int, int]]:
    limit = min(task.num_heldout, 10 ** (2 * task.digits) // 4)
    return distinct_draws(lambda rng: _draw_pair(task, rng), random.Random(task.heldout_seed), limit)


class ProblemSampler(ExcludingSampler):
    """Training problems of one seed, never one of the held-out problems."""

    def __init__(self, task: TaskConfig, seed: int):
        self.task = task
        super().__init__(lambda rng: _draw_pair(task, rng), heldout_problems(task), seed)


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict:
    """``score`` = ``acc`` = 1.0 iff the response text (special tokens removed, stripped) equals the reversed sum.

    ``acc`` is what DAPO's dynamic sampling filters on (``algorithm.filter_groups.metric=acc``, the task accuracy
    without the overlong penalty), as the fast mode does."""
    score = 1.0 if (solution_str or "").strip() == str(ground_truth).strip() else 0.0
    return {"score": score, "acc": score}


def rl_rows(task: TaskConfig, problems, split: str) -> list[dict]:
    """The verl RL parquet rows of ``problems``."""
    return [rl_row(DATA_SOURCE, "arithmetic", prompt_text(task, a, b), answer_text(a, b), split, i, a, b)
            for i, (a, b) in enumerate(problems)]


class Codec:
    """Text <-> ids for the task (prompt ids are those of verl's agent loop: chat template, generation prompt).

    A problem is ``(a, b)``; :meth:`encode_prompt`, :meth:`reference_ids` and :meth:`score` are the interface every
    task's codec has (:mod:`hapo_verl.tinyworld.tasks`)."""

    def __init__(self, tokenizer, task: TaskConfig):
        self.tokenizer = tokenizer
        self.task = task
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        probe = self.prompt_ids(10 ** task.digits - 1, 0)
        if len(probe) != task.prompt_len:
            raise RuntimeError(f"expected {task.prompt_len} prompt tokens (chat frame + one token per character), "
                               f"got {len(probe)}: {probe}")

    def prompt_ids(self, a: int, b: int) -> list[int]:
        return prompt_ids(self.tokenizer, prompt_text(self.task, a, b))

    def answer_ids(self, a: int, b: int) -> list[int]:
        return self.tokenizer.encode(answer_text(a, b), add_special_tokens=False) + [self.eos]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def encode_prompt(self, problem) -> list[int]:
        return self.prompt_ids(*problem)

    def reference_ids(self, problem, rng=None) -> list[int]:
        """The answer and eos (the warm-up's target; one answer per problem, so ``rng`` is unused)."""
        return self.answer_ids(*problem)

    def score(self, problem, text: str) -> float:
        """1.0 iff the response text, stripped, equals the reversed sum."""
        return 1.0 if text.strip() == answer_text(*problem) else 0.0
