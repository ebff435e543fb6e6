"""Reading an algorithm's options out of verl's config objects (DictConfig, dict, verl dataclasses): the one
config loader. Unknown keys are rejected with their full key path; values are coerced by the option types and
checked against their ranges (:func:`hapo_verl.registry.load_options`).

Imports no verl at module level: the ``verl.plugins`` entry point registers our names while verl itself is still
importing, and the registered functions import this module.
"""

from __future__ import annotations

import functools
from dataclasses import fields, is_dataclass

from hapo_verl import registry

LOSS_KEY = "actor_rollout_ref.actor.policy_loss"


@functools.lru_cache(maxsize=1)
def verl_loss_fields() -> frozenset:
    """The fields of verl's own ``PolicyLossConfig`` (and ``_target_``): never an algorithm option."""
    from verl.workers.config.actor import PolicyLossConfig

    return frozenset({f.name for f in fields(PolicyLossConfig)} | {"_target_"})


def _get(config, key: str, default=None):
    if config is None:
        return default
    getter = getattr(config, "get", None)
    return getter(key, default) if getter else getattr(config, key, default)


def loss_options(spec: registry.AlgorithmSpec, policy_loss):
    """The options of ``spec``'s loss in ``policy_loss``: a mapping (unknown keys rejected), the generated config
    class, or any other verl dataclass (its fields named like the options are read; verl's plain
    ``PolicyLossConfig`` reads as the defaults)."""
    if policy_loss is None:
        return spec.loss_options()
    names = {f.name for f in fields(spec.loss_options)}
    if is_dataclass(policy_loss):
        data = {f.name: getattr(policy_loss, f.name) for f in fields(policy_loss) if f.name in names}
    else:  # verl's own keys are not this loss's unless it declares an option of that name (kl_cov_ratio ...)
        data = {k: v for k, v in dict(policy_loss.items()).items() if k not in verl_loss_fields() or k in names}
    return registry.load_options(spec.loss_options, data, LOSS_KEY)


def estimator_options(spec: registry.AlgorithmSpec, algorithm_config):
    """The options of ``spec``'s estimator from verl's ``algorithm`` config (``algorithm.<name>.*``)."""
    return registry.load_options(spec.estimator_options, _get(algorithm_config, spec.name, None),
                                 f"algorithm.{spec.name}")


def active_loss_spec(actor_config) -> registry.AlgorithmSpec | None:
    """The registered spec of ``actor.policy_loss.loss_mode``, None for verl's own losses."""
    mode = _get(_get(actor_config, "policy_loss"), "loss_mode", "vanilla")
    spec = registry.get(str(mode))
    return spec if spec is not None and spec.loss is not None else None


def active_estimator_spec(algorithm_config) -> registry.AlgorithmSpec | None:
    """The registered spec of ``algorithm.adv_estimator``, None for verl's own estimators."""
    spec = registry.get(str(_get(algorithm_config, "adv_estimator", "")))
    return spec if spec is not None and spec.advantage is not None else None
