"""Registration of the CPU backend in the current process (light; called from the verl.plugins entry point).

verl imports our ``verl.plugins`` entry point (:mod:`hapo_verl.plugin`) in every process that imports verl:
the driver, the TaskRunner and every Ray worker. :func:`register_cpu_backend` does nothing unless
``VERL_PLATFORM=cpu``; then it applies the runtime shims (:func:`hapo_verl.patches.apply_all`), registers the
``cpu`` platform with verl's ``PlatformRegistry`` and the ``hfcpu`` rollout replica with
``RolloutReplicaRegistry`` (the in-worker rollout class is registered by the ``rollout_registry`` shim).
Heavy modules (transformers model code, the Ray server) are imported lazily by the registered loaders.

verl swallows exceptions raised by entry points at DEBUG level, so a failure is recorded, logged at ERROR
and re-raised by :func:`ensure_cpu_backend_registered`.
"""

from __future__ import annotations

import logging
import threading

from hapo_verl.cpu.names import ROLLOUT_NAME

logger = logging.getLogger("hapo_verl")

_lock = threading.Lock()
_registered = False
_error: BaseException | None = None


def _load_replica():
    from hapo_verl.cpu.rollout import HFCPUReplica

    return HFCPUReplica


def register_cpu_backend(force: bool = False) -> bool:
    """Register platform ``cpu`` + rollout ``hfcpu`` if ``VERL_PLATFORM=cpu`` (or ``force``). Re-entrant.

    Returns True when the backend is registered in this process.
    """
    global _registered, _error
    if not (force or _env_selects_cpu()):
        return False
    with _lock:
        if _registered:
            return True
        try:
            from verl.workers.rollout.replica import RolloutReplicaRegistry

            import hapo_verl.cpu.platform  # noqa: F401  registers "cpu" with PlatformRegistry
            from hapo_verl.patches import apply_all

            apply_all()
            RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_replica)
        except BaseException as exc:  # noqa: BLE001 - recorded and re-raised by ensure_cpu_backend_registered
            _error = exc
            logger.error("hapo-verl: CPU backend registration with verl failed: %r", exc)
            raise
        _registered = True
        _error = None
        return True


def _env_selects_cpu() -> bool:
    import os

    return os.environ.get("VERL_PLATFORM", "").strip().lower() == "cpu"


def is_cpu_backend_registered() -> bool:
    """True when platform ``cpu`` and rollout ``hfcpu`` are known to verl in this process."""
    from verl.plugin.platform import PlatformRegistry
    from verl.workers.rollout import base
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    return (
        PlatformRegistry.get("cpu") is not None
        and ROLLOUT_NAME in RolloutReplicaRegistry._registry
        and (ROLLOUT_NAME, "async") in base._ROLLOUT_REGISTRY
    )


def ensure_cpu_backend_registered() -> None:
    """Raise loudly if the CPU backend failed to register (or is missing) in this process."""
    if _error is not None:
        raise RuntimeError(f"hapo-verl CPU backend failed to register in this process: {_error!r}") from _error
    if not is_cpu_backend_registered():
        register_cpu_backend(force=True)
    if not is_cpu_backend_registered():
        raise RuntimeError("hapo-verl CPU backend (platform 'cpu', rollout 'hfcpu') is not registered")
