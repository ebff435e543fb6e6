"""Advantage estimators of the registry through verl's ``compute_advantage``.

verl passes a fixed set of tensors to registered estimators (rewards, mask, uids, config): no old log-probs, no
entropy, no batch statistics, no token ids. The trainer makes what a spec needs available for the duration of that call
(:func:`estimator_inputs`); the adapter reads it, calls the spec, and leaves the metrics for the trainer.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from hapo_verl import registry
from hapo_verl.algorithms.groups import group_ids_from_index
from hapo_verl.integration.options import estimator_options

_provided: contextvars.ContextVar = contextvars.ContextVar("hapo_verl_estimator_inputs", default=None)
#: metrics of the last estimator call (driver-side floats), read and cleared by the trainer
LAST_METRICS: dict = {}


class EstimatorNeedsTrainerError(RuntimeError):
    pass


@contextlib.contextmanager
def estimator_inputs(old_log_prob: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
                     batch_stats=None, step_ends: torch.Tensor | None = None):
    token = _provided.set({registry.OLD_LOG_PROB: old_log_prob, registry.OLD_ENTROPY: entropy,
                           registry.BATCH_STATS: batch_stats, registry.RESPONSE_STEPS: step_ends})
    try:
        yield
    finally:
        _provided.reset(token)


def _provided_value(spec, need: str, response_mask: torch.Tensor):
    value = (_provided.get() or {}).get(need)
    if value is None:
        raise EstimatorNeedsTrainerError(
            f"adv_estimator={spec.name} needs the {need.replace('_', ' ')} of the batch, which verl does not pass to "
            "advantage estimators; launch with `hapo-verl` (python -m hapo_verl.main), whose trainer provides it")
    if isinstance(value, torch.Tensor):
        if tuple(value.shape) != tuple(response_mask.shape):
            raise ValueError(f"{need} shape {tuple(value.shape)} does not match response_mask shape "
                             f"{tuple(response_mask.shape)}")
        value = value.to(response_mask.device)
    return value


def verl_estimator(spec: registry.AlgorithmSpec):
    """The function registered as ``adv_estimator=<spec.name>`` in verl's ``ADV_ESTIMATOR_REGISTRY``."""

    def estimator(token_level_rewards, response_mask, index=None, config=None, **unused):
        if index is None:
            raise ValueError(f"adv_estimator={spec.name} needs the prompt group ids ('uid' in the batch)")
        options = estimator_options(spec, config)
        needs = spec.needs_of_estimator(options)
        inputs = registry.AdvantageInputs(
            token_level_rewards=token_level_rewards, response_mask=response_mask,
            group_ids=group_ids_from_index(index).to(token_level_rewards.device),
            old_log_prob=_provided_value(spec, registry.OLD_LOG_PROB, response_mask)
            if registry.OLD_LOG_PROB in needs else None,
            entropy=_provided_value(spec, registry.OLD_ENTROPY, response_mask)
            if registry.OLD_ENTROPY in needs else None,
            batch_stats=_provided_value(spec, registry.BATCH_STATS, response_mask)
            if registry.BATCH_STATS in needs else None,
            step_ends=_provided_value(spec, registry.RESPONSE_STEPS, response_mask)
            if registry.RESPONSE_STEPS in needs else None)
        advantages, returns, metrics = spec.advantage(inputs, options)
        LAST_METRICS.clear()
        LAST_METRICS.update(metrics)
        return advantages, returns

    estimator.__name__ = estimator.__qualname__ = f"compute_{spec.name}_advantage"
    estimator.__module__ = __name__
    estimator.__doc__ = f"``adv_estimator={spec.name}`` with verl's estimator signature ({spec.title}; {spec.module})."
    return estimator
