"""The learning benchmark's reasoning task (``hapo-verl bench-learning --task countdown``): Countdown.

Prompt ``"03,04,07:25"``: ``count`` numbers (sorted, each zero-padded to the width of ``max_number``) and a target
(zero-padded to the width of ``max_target``), so every prompt has the same length. The response writes one
line per step, ``a op b = c``, combining two available values into a new one; every given number is used
exactly once, so a solution has ``count - 1`` lines, and the last line's value must be the target::

    7 * 4 = 28
    28 - 3 = 25

followed by eos. Choosing the operands and the operator of a line is a fork (a puzzle often has several
solutions); the spaces, ``=``, the arithmetic result and the newline are forced, and so is most of the last
line. Most tokens of a response are forced, a few are forks: the setting in which token-entropy-aware methods
are meant to act.

Reward (:func:`check_solution`; :func:`compute_score` has verl's ``custom_reward_function`` signature): 1.0 iff
every line is ``a op b = c`` (decimal integers without leading zeros, spaces optional) with ``c`` equal to
``a op b`` for an operator of ``+-*/`` (subtraction non-negative, division exact), each operand is an available
value (a given number or an earlier result, each used once), all given numbers are used, and the last value
equals the target. Validity is checked; the text is never compared with a reference solution.

Problems are sampled by drawing ``count`` numbers uniformly in ``1..max_number`` and then one of all their
solution paths (:func:`solutions`, with the solver's ``operators``) uniformly among those ending in
``[min_target, max_target]``: the target is that path's value. Targets with many solutions are therefore drawn
more often, and the supervised warm-up (one solver solution drawn uniformly per example,
:meth:`Codec.reference_ids`) shows several valid paths for the same puzzle: that is where the forks of the
warmed-up policy come from.

The held-out set is fixed by ``heldout_seed`` (the same for every seed and method); training problems of any
seed are never held-out ones.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import random
import re
from dataclasses import asdict, dataclass

from hapo_verl.tinyworld.problems import ExcludingSampler, distinct_draws
from hapo_verl.tinyworld.world import CHAT_FRAME_TOKENS, ModelShape, prompt_ids, user_messages

DATA_SOURCE = "hapo_bench_countdown"
KINDS = ("countdown",)
OPERATORS = "+-*/"
#: the reversed-addition shape (~0.89 M parameters); longer positions for the multi-line responses
SHAPE = ModelShape(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=128)

#: one step: (a, op, b, c)
Step = tuple[int, str, int, int]
#: one puzzle: (sorted numbers, target)
Problem = tuple[tuple[int, ...], int]


@dataclass(frozen=True)
class TaskConfig:
    kind: str = "countdown"
    #: numbers per puzzle; a solution has count - 1 lines
    count: int = 3
    max_number: int = 12
    min_target: int = 10
    max_target: int = 99
    #: operators of the solver (targets and warm-up solutions); the reward accepts all of +-*/
    operators: str = "+-*"
    #: reference solutions as "7 * 4 = 28" (spaced, 4 more forced tokens a line) or "7*4=28"; the reward accepts both
    spaced: bool = True
    #: fixed held-out prompts (the same for every seed and method), disjoint from training prompts
    num_heldout: int = 500
    heldout_seed: int = 12345
    #: DAPO overlong buffer (tokens); max_new_tokens - overlong_buffer = longest correct response
    overlong_buffer: int = 4

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task kind must be one of {KINDS}, got {self.kind!r}")
        if not 2 <= self.count <= 4:
            raise ValueError(f"count must be in 2..4, got {self.count}")
        if not 2 <= self.max_number <= 99:
            raise ValueError(f"max_number must be in 2..99, got {self.max_number}")
        if not 0 <= self.min_target <= self.max_target:
            raise ValueError(f"need 0 <= min_target <= max_target, got {self.min_target}, {self.max_target}")
        if not self.operators or set(self.operators) - set(OPERATORS) or len(set(self.operators)) != len(
                self.operators):
            raise ValueError(f"operators must be distinct characters of {OPERATORS!r}, got {self.operators!r}")

    @property
    def tag(self) -> str:
        """Short name of the task family and size (cache directories)."""
        return f"countdown{self.count}"

    def describe(self) -> str:
        return (f"countdown, {self.count} numbers in 1..{self.max_number}, targets {self.min_target}..{self.max_target}"
                f", solver operators {self.operators}, {self.num_heldout} held-out prompts (greedy), max "
                f"{self.max_new_tokens} new tokens, DAPO overlong buffer {self.overlong_buffer}")

    @property
    def longest_solution_tokens(self) -> int:
        """Tokens of the longest correct response (one token per character, eos included), over every puzzle
        of the task and every operand order, so the generation limit never cuts a correct response."""
        return _longest_solution_chars(self.count, self.max_number, self.min_target, self.max_target,
                                       self.spaced) + 1

    @property
    def max_new_tokens(self) -> int:
        return self.longest_solution_tokens + self.overlong_buffer

    @property
    def prompt_len(self) -> int:
        """Prompt tokens: the chat frame and one token per character of ``"n,n,n:t"``."""
        return CHAT_FRAME_TOKENS + self.count * len(str(self.max_number)) + (self.count - 1) + 1 + len(
            str(self.max_target))

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ the rules
def apply(a: int, op: str, b: int) -> int | None:
    """``a op b`` when it is a non-negative integer, else None (negative difference, inexact or zero division)."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b if a >= b else None
    if op == "*":
        return a * b
    if op == "/":
        return a // b if b != 0 and a % b == 0 else None
    return None


@functools.lru_cache(maxsize=65536)
def _solution_paths(pool: tuple[int, ...], operators: str) -> tuple[tuple[Step, ...], ...]:
    """Every way of reducing the sorted multiset ``pool`` to one value, one step a line, writing the larger
    operand first (one canonical order per pair, so the written order of two operands is never a fork)."""
    if len(pool) == 1:
        return ((),)
    out = set()
    for i in range(len(pool)):
        for j in range(len(pool)):
            if i == j or pool[i] < pool[j] or (pool[i] == pool[j] and i > j):
                continue
            a, b = pool[i], pool[j]
            rest = [v for k, v in enumerate(pool) if k not in (i, j)]
            for op in operators:
                c = apply(a, op, b)
                if c is None:
                    continue
                for tail in _solution_paths(tuple(sorted(rest + [c])), operators):
                    out.add(((a, op, b, c),) + tail)
    return tuple(sorted(out))


@functools.lru_cache(maxsize=64)
def _longest_solution_chars(count: int, max_number: int, min_target: int, max_target: int, spaced: bool) -> int:
    """The longest solution text of any puzzle, with any of the reward's operators (the policy may use all)."""
    longest = 0
    for numbers in itertools.combinations_with_replacement(range(1, max_number + 1), count):
        for path in _solution_paths(numbers, OPERATORS):
            if min_target <= path[-1][3] <= max_target:
                longest = max(longest, len(solution_text(path, spaced)))
    return longest


def solutions(numbers, target: int, operators: str = "+-*") -> list[tuple[Step, ...]]:
    """All canonical solutions (larger operand first) that use every number once and end in ``target``."""
    return [p for p in _solution_paths(tuple(sorted(numbers)), operators) if p[-1][3] == target]


def reachable_targets(task: TaskConfig, numbers) -> dict[int, int]:
    """target -> number of canonical solution paths, for targets in the task's range."""
    counts: dict[int, int] = {}
    for path in _solution_paths(tuple(sorted(numbers)), task.operators):
        value = path[-1][3]
        if task.min_target <= value <= task.max_target:
            counts[value] = counts.get(value, 0) + 1
    return counts


def format_step(step: Step, spaced: bool = True) -> str:
    a, op, b, c = step
    return f"{a} {op} {b} = {c}" if spaced else f"{a}{op}{b}={c}"


def solution_text(steps, spaced: bool = True) -> str:
    """The response of ``steps``: one line each, every line ending in a newline."""
    return "".join(format_step(s, spaced) + "\n" for s in steps)


_LINE = re.compile(r"^ *(0|[1-9][0-9]*) *([-+*/]) *(0|[1-9][0-9]*) *= *(0|[1-9][0-9]*) *$")


def check_solution(numbers, target: int, text: str) -> tuple[bool, str]:
    """(valid, reason): the reward's verdict on ``text`` for the puzzle (``numbers``, ``target``)."""
    lines = (text or "").strip().split("\n")
    if lines == [""]:
        return False, "empty response"
    pool = list(numbers)
    value = None
    for k, line in enumerate(lines, 1):
        m = _LINE.match(line)
        if m is None:
            return False, f"line {k} is not 'a op b = c': {line!r}"
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        if apply(a, op, b) != c:
            return False, f"line {k}: {a} {op} {b} is not {c}"
        for operand in (a, b):
            if operand not in pool:
                return False, f"line {k}: {operand} is not available (left: {sorted(pool)})"
            pool.remove(operand)
        pool.append(c)
        value = c
    if len(pool) != 1:
        return False, f"numbers left unused: {sorted(pool)}"
    if value != target:
        return False, f"last value {value} is not the target {target}"
    return True, "ok"


def score_text(problem: Problem, text: str) -> float:
    numbers, target = problem
    return 1.0 if check_solution(numbers, target, text)[0] else 0.0


# ------------------------------------------------------------------------------------------------ prompts, data
def prompt_text(task: TaskConfig, problem: Problem) -> str:
    numbers, target = problem
    width, target_width = len(str(task.max_number)), len(str(task.max_target))
    return ",".join(f"{n:0{width}d}" for n in numbers) + f":{target:0{target_width}d}"


def parse_prompt(text: str) -> Problem:
    """Inverse of :func:`prompt_text` (the verl reward gets the prompt text as ground truth)."""
    numbers, target = str(text).strip().split(":")
    return tuple(int(n) for n in numbers.split(",")), int(target)


def _draw(task: TaskConfig, rng: random.Random) -> Problem:
    while True:
        numbers = tuple(sorted(rng.randint(1, task.max_number) for _ in range(task.count)))
        paths = [p for p in _solution_paths(numbers, task.operators)
                 if task.min_target <= p[-1][3] <= task.max_target]
        if paths:
            return numbers, rng.choice(paths)[-1][3]


def heldout_problems(task: TaskConfig) -> list[Problem]:
    return distinct_draws(lambda rng: _draw(task, rng), random.Random(task.heldout_seed), task.num_heldout)


class ProblemSampler(ExcludingSampler):
    """Training problems of one seed, never one of the held-out problems."""

    def __init__(self, task: TaskConfig, seed: int):
        self.task = task
        super().__init__(lambda rng: _draw(task, rng), heldout_problems(task), seed)


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict:
    """verl's reward function: ``ground_truth`` is the prompt text (numbers and target), the response is checked
    line by line (:func:`check_solution`). ``acc`` is what DAPO's dynamic sampling filters on."""
    score = score_text(parse_prompt(ground_truth), solution_str or "")
    return {"score": score, "acc": score}


def rl_rows(task: TaskConfig, problems, split: str) -> list[dict]:
    """The verl RL parquet rows of ``problems``."""
    rows = []
    for i, problem in enumerate(problems):
        text = prompt_text(task, problem)
        rows.append({"data_source": DATA_SOURCE, "prompt": user_messages(text), "ability": "arithmetic",
                     "reward_model": {"style": "rule", "ground_truth": text},
                     "extra_info": {"split": split, "index": i, "numbers": list(problem[0]), "target": problem[1]}})
    return rows


class Codec:
    """Problems <-> ids (prompt ids are those of verl's agent loop: chat template, generation prompt)."""

    def __init__(self, tokenizer, task: TaskConfig):
        self.tokenizer = tokenizer
        self.task = task
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        probe = self.encode_prompt(((task.max_number,) * task.count, task.max_target))
        if len(probe) != task.prompt_len:
            raise RuntimeError(f"expected {task.prompt_len} prompt tokens (chat frame + one token per character), "
                               f"got {len(probe)}: {probe}")

    def encode_prompt(self, problem: Problem) -> list[int]:
        return prompt_ids(self.tokenizer, prompt_text(self.task, problem))

    def reference_ids(self, problem: Problem, rng: random.Random) -> list[int]:
        """One solver solution, drawn uniformly among all of the puzzle's (the warm-up's target), and eos."""
        steps = rng.choice(solutions(*problem, self.task.operators))
        return self.tokenizer.encode(solution_text(steps, self.task.spaced), add_special_tokens=False) + [self.eos]

    def score(self, problem: Problem, text: str) -> float:
        return score_text(problem, text)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
