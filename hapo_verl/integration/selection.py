"""Selection steps of the registry (``AlgorithmSpec.selection``): on the driver, after the advantage and before the
actor update, whatever the estimator and the loss.

A selection marks the tokens the update learns from. It reaches every loss, verl's own included, through the one
field they all read: for the duration of the update, ``response_mask`` in TransferQueue is replaced by the kept
tokens (so verl's token-mean denominators count kept tokens only, and the KL and entropy terms see the same
tokens), and the original mask is put back afterwards, because verl computes its data metrics (response lengths,
...) from it after the update. Dropped samples are masked, not removed: verl's mini-batches keep their sizes, and
the forward and backward passes still run over them.

Steps run in name order, each on the mask the previous one left. Options live under ``algorithm.<name>.*``; a
step runs when its ``enable`` is true. Unknown keys and bad values are rejected at start-up (the step plan loads
them) even when the step is off.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from hapo_verl import registry
from hapo_verl.algorithms.groups import group_ids_from_index

#: what a selection step reads from TransferQueue (besides the old-policy tensors the trainer already holds)
SELECTION_FIELDS = ("uid", "response_mask", "advantages")
DRIVER_NEEDS = frozenset({registry.OLD_ENTROPY, registry.OLD_LOG_PROB})


def selection_options(spec: registry.AlgorithmSpec, algorithm_config):
    """The options of ``spec``'s selection step from verl's ``algorithm`` config (``algorithm.<name>.*``)."""
    getter = getattr(algorithm_config, "get", None)
    section = None if algorithm_config is None else (
        getter(spec.name, None) if getter else getattr(algorithm_config, spec.name, None))
    return registry.load_options(spec.selection_options, section, f"algorithm.{spec.name}")


def enabled_selections(algorithm_config) -> list[tuple[registry.AlgorithmSpec, object]]:
    """(spec, options) of every selection step switched on, in name order; every step's keys are checked."""
    chosen = []
    for spec in registry.selection_specs().values():
        options = selection_options(spec, algorithm_config)
        needs = spec.needs_of_selection(options)
        if needs - DRIVER_NEEDS:
            raise ValueError(f"algorithm.{spec.name}: a selection step can need {sorted(DRIVER_NEEDS)} only, "
                             f"not {sorted(needs - DRIVER_NEEDS)}")
        if options.enable:
            chosen.append((spec, options))
    return chosen


def selection_needs(selections) -> frozenset:
    needs = frozenset()
    for spec, options in selections:
        needs |= spec.needs_of_selection(options)
    return needs


def run_selections(selections, advantages: torch.Tensor, response_mask: torch.Tensor, group_ids: torch.Tensor,
                   old: dict | None = None, step: int = 1, total_steps: int = 1,
                   lengths: torch.Tensor | None = None) -> tuple[torch.Tensor | None, dict]:
    """Run the steps one after the other on padded (B, L) tensors: (the kept tokens (B, L) bool, or None when no
    step ran; their metrics). ``old``: the trainer's old-policy tensors (``entropy``, ``old_log_probs``)."""
    old = old or {}
    keep, metrics = None, {}
    for spec, options in selections:
        needs = spec.needs_of_selection(options)
        provided = {registry.OLD_ENTROPY: old.get("entropy"), registry.OLD_LOG_PROB: old.get("old_log_probs")}
        for need in needs:
            value = provided[need]
            if value is None:
                raise RuntimeError(f"algorithm.{spec.name} needs the {need.replace('_', ' ')} of the batch, which the "
                                   "trainer did not fetch")
            if tuple(value.shape) != tuple(advantages.shape):
                raise ValueError(f"{need} shape {tuple(value.shape)} does not match the advantages' "
                                 f"{tuple(advantages.shape)}")
        inputs = registry.SelectionInputs(
            advantages=advantages, response_mask=response_mask if keep is None else keep, group_ids=group_ids,
            entropy=provided[registry.OLD_ENTROPY] if registry.OLD_ENTROPY in needs else None,
            old_log_prob=provided[registry.OLD_LOG_PROB] if registry.OLD_LOG_PROB in needs else None,
            step=step, total_steps=total_steps, lengths=lengths)
        keep, step_metrics = spec.selection(inputs, options)
        metrics.update(step_metrics)
    return keep, metrics


@contextlib.contextmanager
def selected_for_update(batch, selections, old: dict | None, step: int, total_steps: int, metrics: dict):
    """Around the actor update: ``response_mask`` of ``batch`` in TransferQueue holds the kept tokens, and the
    original mask again on exit. Nothing happens without an enabled step."""
    if not selections:
        yield
        return
    import transfer_queue as tq
    from tensordict import TensorDict
    from verl.workers.utils.padding import response_to_nested

    data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=list(SELECTION_FIELDS))
    original = data["response_mask"]
    lengths = original.offsets().diff()
    padded = data.to_padded_tensor()
    uid = padded.get("uid")  # a stack of non-tensor values (indexing it gives a plain list)
    group_ids = group_ids_from_index(np.array(uid.tolist() if hasattr(uid, "tolist") else list(uid), dtype=object))
    mask = padded["response_mask"]
    keep, step_metrics = run_selections(selections, padded["advantages"].float(), mask.float(), group_ids, old,
                                        step=step, total_steps=total_steps, lengths=lengths)
    metrics.update(step_metrics)

    def put(value):
        tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id,
                        fields=TensorDict({"response_mask": value}, batch_size=len(batch.keys)))

    put(response_to_nested(keep.to(mask.dtype), original))
    try:
        yield
    finally:
        put(original)
