"""The learning benchmark's task families by name, and the interface the benchmark uses to drive any of them.

A family is a module with ``TaskConfig`` (frozen dataclass: ``kind``, ``tag``, ``describe()``, ``max_new_tokens``,
``prompt_len``, ``overlong_buffer``, ``num_heldout``, ``key()``, ``to_dict()``), ``SHAPE`` (the model shape),
``DATA_SOURCE``, ``ProblemSampler(task, seed).sample(n)``, ``heldout_problems(task)``, ``rl_rows(task, problems,
split)``, ``compute_score`` (verl's ``custom_reward_function``) and ``Codec(tokenizer, task)`` with
``encode_prompt(problem)``, ``reference_ids(problem, rng)``, ``score(problem, text)``, ``decode(ids)``, ``eos``
and ``pad``. Problems are opaque to the benchmark.

Task names (``hapo-verl bench-learning --task``): ``addvar`` and ``add`` (reversed addition, the kinds of
:mod:`.reversed_addition`) and ``countdown`` (:mod:`.countdown`).
"""

from __future__ import annotations

from types import ModuleType

from hapo_verl.tinyworld import countdown, reversed_addition

#: task name -> family module
FAMILIES: dict[str, ModuleType] = {"addvar": reversed_addition, "add": reversed_addition, "countdown": countdown}
TASK_NAMES = tuple(FAMILIES)


def make_task(name: str, **options):
    """The ``TaskConfig`` of task ``name``; ``options`` are the family's fields (e.g. ``digits`` for addition)."""
    if name not in FAMILIES:
        raise ValueError(f"task must be one of {TASK_NAMES}, got {name!r}")
    return FAMILIES[name].TaskConfig(kind=name, **options)


def family(task) -> ModuleType:
    """The family module of a ``TaskConfig``."""
    for module in (reversed_addition, countdown):
        if isinstance(task, module.TaskConfig):
            return module
    raise TypeError(f"not a task config of a known family: {task!r}")
