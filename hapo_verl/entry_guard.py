"""Stop ``python -m verl.trainer.main_ppo`` at start-up when it is asked for the parts of HAPO it cannot run.

verl's own entry point builds verl's trainer: a registered estimator or loss that needs nothing from the old
policy works there (e.g. ``adv_estimator=hapo``), but a loss that needs per-token entropy or batch statistics, an
estimator that needs old-policy tensors, and adaptive temperature (statistics sent with each request) need
hapo-verl's trainer (``hapo-verl``). Installing that trainer
from the plugin would mean replacing verl's ``sync`` trainer at import time in every process, a patch we do not
ship. So the plugin checks the driver's command line once and stops with the equivalent ``hapo-verl`` command
instead of letting a silently degraded HAPO run.
"""

from __future__ import annotations

import os
import shlex
import sys



def _needs_trainer() -> tuple[str, ...]:
    """Command-line settings that only hapo-verl's trainer can run, from the registry."""
    from hapo_verl import registry

    settings = []
    for spec in registry.specs():
        if spec.loss is not None and not spec.standard_signature:
            settings.append(f"policy_loss.loss_mode={spec.name}")
        if spec.advantage is not None and spec.needs_of_estimator(spec.estimator_options()):
            settings.append(f"algorithm.adv_estimator={spec.name}")
        if spec.sampling_options is not None:
            settings += [f"{spec.name}.adaptive_temperature=true", f"{spec.name}.adaptive_temperature=True"]
    return tuple(settings)


def _verl_main_args(orig_argv: list[str]) -> list[str] | None:
    """The arguments after ``-m verl.trainer.main_ppo`` (or the script path), None for any other program.
    ``sys.orig_argv`` is used because ``sys.argv[0]`` is still ``-m`` while ``-m`` imports the package."""
    for i, arg in enumerate(orig_argv):
        if arg == "-m" and i + 1 < len(orig_argv) and orig_argv[i + 1] == "verl.trainer.main_ppo":
            return orig_argv[i + 2:]
        if arg.replace(os.sep, "/").endswith("verl/trainer/main_ppo.py"):
            return orig_argv[i + 1:]
    return None


def check_entry_point(orig_argv: list[str] | None = None) -> str | None:
    """Return the stop message for this command line, or None when it is fine."""
    args = _verl_main_args(list(sys.orig_argv if orig_argv is None else orig_argv))
    if args is None:
        return None
    argv = ["main_ppo", *args]
    needs_trainer = _needs_trainer()
    offending = [a for a in argv[1:] if any(a.lstrip("+").endswith(k) for k in needs_trainer)]
    if not offending:
        return None
    equivalent = "hapo-verl train " + " ".join(shlex.quote(a) for a in argv[1:])
    return (
        f"hapo-verl: {', '.join(offending)} needs hapo-verl's trainer (per-token entropy, old-policy tensors or "
        "batch statistics in the loss or estimator, adaptive temperature), which `python -m verl.trainer.main_ppo` "
        f"does not build. Run the same job with:\n\n    {equivalent}\n"
    )


def stop_if_unsupported() -> None:
    message = check_entry_point()
    if message:
        sys.stderr.write(message)
        raise SystemExit(2)  # BaseException: not swallowed by verl's plugin loader
