"""The mini-batch pass: statistics over a whole update mini-batch at the current policy, for losses that need them
(the ``MINIBATCH_STATS`` need of :mod:`hapo_verl.registry`).

verl 0.9.1's engines run a mini-batch's loss micro-batch by micro-batch and back-propagate each one before the next
forward, so no loss sees the whole mini-batch at the current θ. Before each mini-batch's update (verl's
``BaseEngine.train_batch``, hooked by :mod:`hapo_verl.patches.minibatch_prepass`), this pass runs the engine's own
forward-only loop over the mini-batch with the spec's ``minibatch_stats`` in place of the loss, sums the results over
the micro-batches and the data-parallel ranks, and hands ``minibatch_finalize`` of the totals to every micro-batch's
loss of that mini-batch. A spec whose ``minibatch_forward`` is false reads only the stored fields (no forward).

Cost: one forward pass (no backward) per mini-batch with ``minibatch_forward``, about a third of the update's compute.
"""

from __future__ import annotations

from typing import Mapping

import torch

from hapo_verl import registry
from hapo_verl.integration.collectives import dp_all_gather, dp_all_reduce

#: key of the glue's own count in the totals: the valid response tokens the pass saw (all micro-batches and ranks)
TOKENS = "minibatch_tokens"


def _part(spec, needs, data, model_output, batch_stats, old_entropy_field) -> registry.MiniBatchPart:
    """The padded tensors of one micro-batch (``model_output`` None: of the stored fields only)."""
    fields = ["response_mask", "old_log_probs", "advantages"]
    if registry.OLD_ENTROPY in needs:
        fields.append(old_entropy_field)
    padded = data.select(*fields).to_padded_tensor()
    log_prob = entropy = None
    if model_output is not None:
        from verl.workers.utils.padding import no_padding_2_padding

        log_prob = no_padding_2_padding(model_output["log_probs"], data)
        if registry.CURRENT_ENTROPY in needs:
            current = model_output.get("entropy", None)
            if current is None:
                raise RuntimeError(f"loss_mode={spec.name}: the mini-batch pass needs the current-policy entropy: set "
                                   "actor_rollout_ref.actor.calculate_entropy=true")
            entropy = no_padding_2_padding(current, data)
    if registry.OLD_ENTROPY in needs:
        entropy = padded[old_entropy_field]
    mask = padded["response_mask"].to(bool)
    if log_prob is not None:
        padded_old = padded["old_log_probs"]
        log_prob = log_prob.to(padded_old.dtype)
    return registry.MiniBatchPart(old_log_prob=padded["old_log_probs"], advantages=padded["advantages"],
                                  response_mask=mask, log_prob=log_prob, entropy=entropy, batch_stats=batch_stats)


def _combine_parts(parts: list[Mapping]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(sums, gathered): the micro-batches' values summed, and the :class:`registry.Gathered` ones concatenated."""
    sums, gathered = {}, {}
    for key, first in parts[0].items():
        if isinstance(first, registry.Gathered):
            gathered[key] = torch.cat([p[key].values.reshape(-1) for p in parts])
        else:
            sums[key] = torch.stack([p[key] for p in parts]).sum(0)
    return sums, gathered


def part_statistics(spec: registry.AlgorithmSpec, options, part: registry.MiniBatchPart) -> dict:
    """The spec's statistics of one micro-batch, plus the glue's count of its valid tokens (:data:`TOKENS`)."""
    stats = dict(spec.minibatch_stats(part, options))
    stats[TOKENS] = part.response_mask.sum().to(torch.float64)
    return stats


def combine(spec: registry.AlgorithmSpec, options, parts: list[Mapping], dp_group=None) -> dict:
    """The statistics of a whole mini-batch from its micro-batches' :func:`part_statistics`: sums all-reduced and
    :class:`registry.Gathered` values all-gathered over ``dp_group`` (None: one process), then
    ``minibatch_finalize`` (or the totals), plus :data:`TOKENS`. Pure torch: the GPU check calls it too."""
    if not parts:
        raise RuntimeError(f"loss_mode={spec.name}: the mini-batch pass saw no micro-batch")
    totals, gathered = _combine_parts(parts)
    names = list(totals)
    # one collective for every sum
    flat = dp_all_reduce(dp_group)(torch.cat([totals[k].reshape(-1).to(torch.float64) for k in names]))
    offset = 0
    for k in names:
        size = totals[k].numel()
        totals[k] = flat[offset:offset + size].reshape(totals[k].shape)
        offset += size
    for k, values in gathered.items():
        totals[k] = dp_all_gather(dp_group)(values)
    tokens = totals.pop(TOKENS)
    result = dict(spec.minibatch_finalize(totals, options)) if spec.minibatch_finalize is not None else totals
    result[TOKENS] = tokens
    return result


def minibatch_statistics(spec: registry.AlgorithmSpec, options, engine, data, batch_stats=None,
                         old_entropy_field: str = "entropy") -> dict:
    """Run the pass over one update mini-batch ``data`` (verl's TensorDict, as ``BaseEngine.train_batch`` gets it)
    with ``engine``'s forward-only loop, and :func:`combine` the micro-batches over the engine's data-parallel
    group."""
    needs = spec.needs_of_loss(options)
    parts: list[dict] = []

    def collect(model_output, data, dp_group=None):
        part = _part(spec, needs, data, model_output, batch_stats, old_entropy_field)
        parts.append(part_statistics(spec, options, part))
        return torch.zeros((), device=part.response_mask.device), {}

    if spec.minibatch_pass_runs_forward(options):
        from verl.utils.tensordict_utils import maybe_fix_3d_position_ids

        # a shallow copy: the engine writes its micro-batch settings into the TensorDict it is given
        copy = data.copy()
        maybe_fix_3d_position_ids(copy)  # as train_batch does before its forward
        engine.forward_backward_batch(copy, collect, forward_only=True)
    else:
        collect(None, data)
    return combine(spec, options, parts, engine.get_data_parallel_group())
