"""Registration of every registered algorithm in verl's registries: one loop, re-entrant, loud on a collision.

verl loads the ``verl.plugins`` entry point in every process that imports verl (driver, TaskRunner, Ray
workers) and swallows any exception from it at DEBUG level. :func:`register` therefore records its own
failure, logs it at ERROR level, and :func:`ensure_registered` re-raises it where it matters.
"""

from __future__ import annotations

import logging
import threading

from hapo_verl import registry

logger = logging.getLogger("hapo_verl")

_lock = threading.Lock()
_registered = False
_error: BaseException | None = None
#: one verl-facing function per (registry kind, name), so that re-registration finds the same object
_functions: dict[tuple[str, str], object] = {}

ADV_ESTIMATOR = "adv_estimator"
POLICY_LOSS = "loss_mode"


def verl_function(kind: str, name: str):
    """The function registered in verl for ``algorithm.adv_estimator=name`` or ``policy_loss.loss_mode=name``."""
    key = (kind, name)
    if key not in _functions:
        spec = registry.get(name)
        if kind == ADV_ESTIMATOR and spec is not None and spec.advantage is not None:
            from hapo_verl.integration.estimator import verl_estimator

            _functions[key] = verl_estimator(spec)
        elif kind == POLICY_LOSS and spec is not None and spec.loss is not None:
            from hapo_verl.integration.loss import verl_policy_loss

            _functions[key] = verl_policy_loss(spec)
        else:
            raise KeyError(f"no registered {kind}={name!r}")
    return _functions[key]


def registered_names() -> dict[str, list[str]]:
    return {ADV_ESTIMATOR: list(registry.estimator_specs()), POLICY_LOSS: list(registry.loss_specs())}


def _register_one(verl_registry: dict, name: str, fn) -> None:
    current = verl_registry.get(name)
    if current is fn:
        return
    if current is not None and (getattr(current, "__module__", None), getattr(current, "__qualname__", None)) != \
            (fn.__module__, fn.__qualname__):
        raise RuntimeError(f"'{name}' is already registered in verl by {current.__module__}.{current.__qualname__}; "
                           "another package claims the same name")
    verl_registry[name] = fn  # new, or our own function from a reloaded module


def register() -> None:
    """Register every algorithm's estimator and loss with verl. Safe to call again."""
    global _registered, _error
    with _lock:
        if _registered:
            return
        try:
            from verl.trainer.ppo import core_algos

            tables = {ADV_ESTIMATOR: core_algos.ADV_ESTIMATOR_REGISTRY, POLICY_LOSS: core_algos.POLICY_LOSS_REGISTRY}
            for kind, names in registered_names().items():
                for name in names:
                    _register_one(tables[kind], name, verl_function(kind, name))
        except BaseException as exc:  # noqa: BLE001 - recorded and re-raised by ensure_registered
            _error = exc
            logger.error("hapo-verl: registration with verl failed: %r", exc)
            raise
        _registered = True
        _error = None


def is_registered() -> bool:
    """True when every hapo-verl name is present in verl's registries of this process."""
    from verl.trainer.ppo import core_algos

    names = registered_names()
    return all(n in core_algos.ADV_ESTIMATOR_REGISTRY for n in names[ADV_ESTIMATOR]) and all(
        n in core_algos.POLICY_LOSS_REGISTRY for n in names[POLICY_LOSS])


def ensure_registered() -> None:
    """Raise loudly if the names are not registered in this process (e.g. the plugin failed to import)."""
    if is_registered() and _registered:
        return
    first_error = _error
    try:
        register()
    except BaseException as exc:
        cause = first_error or exc
        raise RuntimeError(
            f"hapo-verl failed to register with verl in this process: {cause!r}. verl hides errors of its "
            "plugins; check that hapo-verl is installed in this Python environment (pip show hapo-verl)"
        ) from exc
    if not is_registered():
        raise RuntimeError("hapo-verl names are missing from verl's registries after registration")
