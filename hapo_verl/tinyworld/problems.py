"""Problem draws shared by the task families: a held-out set fixed by a seed, and per-seed training samplers that
never return a held-out problem. A family supplies ``draw(rng) -> problem`` (hashable)."""

from __future__ import annotations

import random
from typing import Callable, Hashable


def distinct_draws(draw: Callable[[random.Random], Hashable], rng: random.Random, count: int) -> list:
    """The first ``count`` distinct problems ``draw`` gives from ``rng``, in order."""
    seen, out = set(), []
    while len(out) < count:
        problem = draw(rng)
        if problem not in seen:
            seen.add(problem)
            out.append(problem)
    return out


class ExcludingSampler:
    """Training problems of one seed (``random.Random(seed * 7919 + 17)``), never one of ``excluded``."""

    def __init__(self, draw: Callable[[random.Random], Hashable], excluded, seed: int):
        self.draw = draw
        self.rng = random.Random(seed * 7919 + 17)
        self.excluded = set(excluded)

    def sample(self, n: int) -> list:
        out = []
        while len(out) < n:
            problem = self.draw(self.rng)
            if problem not in self.excluded:
                out.append(problem)
        return out
