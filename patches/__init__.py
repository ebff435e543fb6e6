"""Runtime shims of verl / torch, installed as ``hapo_verl.patches``.

Each shim lives in its own module with: the reason, the upstream version it targets, and an expiry test in
tests/test_patches_on_cpu.py that fails once upstream no longer needs it. They are applied from one place,
:func:`apply_all`, and only by code paths that need them (the CPU backend,
:func:`hapo_verl.cpu.registration.register_cpu_backend`); a shim every run needs is also applied by name where it
acts (``file_logger_append`` and ``quiet_config_dump`` in :class:`hapo_verl.launcher.HAPOTaskRunner`,
``minibatch_prepass`` in the actor workers of a loss that needs it). Importing this package changes
nothing.

Every shim module defines ``NAME``, ``REASON``, ``TARGETS`` (upstream versions it was written against),
``apply()`` (idempotent) and ``is_applied()``.
"""

from __future__ import annotations

import importlib
import threading

#: names of the shims applied in this process, in order of application
APPLIED: list[str] = []

#: every shim module of this package, in application order
SHIM_MODULES: tuple[str, ...] = (
    "gloo_backend_dedup",
    "fsdp2_cpu_offload_no_pin",
    "rollout_registry",
    "file_logger_append",
    "quiet_config_dump",
    "minibatch_prepass",
)

_lock = threading.Lock()


def shim_module(name: str):
    """The module of shim ``name`` (one of :data:`SHIM_MODULES`)."""
    if name not in SHIM_MODULES:
        raise KeyError(f"unknown shim {name!r}; known: {SHIM_MODULES}")
    return importlib.import_module(f"{__name__}.{name}")


def apply_all() -> list[str]:
    """Apply every shim (idempotent, thread-safe); returns :data:`APPLIED`."""
    with _lock:
        for name in SHIM_MODULES:
            module = shim_module(name)
            module.apply()
            if not module.is_applied():
                raise RuntimeError(f"hapo_verl.patches: shim {name!r} did not apply")
            if module.NAME not in APPLIED:
                APPLIED.append(module.NAME)
        return list(APPLIED)
