"""Reasoning steps of single-turn responses, for the estimators that need them
(:data:`hapo_verl.registry.RESPONSE_STEPS`).

A single-turn response has no agent turns, so a step is a line: it ends with a token whose text holds a newline. The
tokenizer decides which token ids those are (:func:`line_end_tokens`, once per tokenizer); the responses' step ends
are then one lookup (:func:`step_ends`), the same on the driver of verl's trainer and in the learning benchmark's fast
engine.
"""

from __future__ import annotations

import torch

_LINE_ENDS: dict = {}


def line_end_tokens(tokenizer) -> torch.Tensor:
    """(vocab,) bool: the token ids whose text, decoded alone (as the rollout emits it), holds a newline. Computed
    once per tokenizer."""
    key = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer))
    found = _LINE_ENDS.get(key)
    if found is None:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
        found = torch.tensor(["\n" in t for t in texts], dtype=torch.bool)
        if not found.any():
            raise ValueError(f"tokenizer {key[1] or key[0]!r} has no token holding a newline: the responses cannot be "
                             "split into lines, the steps of the configured algorithm.adv_estimator")
        _LINE_ENDS[key] = found
    return found


def step_ends(responses: torch.Tensor, line_ends: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the tokens of the responses (B, L) token ids that end a line. Ids outside the vocabulary
    (padding) end nothing."""
    ids = responses.long()
    inside = (ids >= 0) & (ids < line_ends.numel())
    return line_ends.to(ids.device)[ids.clamp(0, line_ends.numel() - 1)] & inside
