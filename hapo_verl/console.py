"""What a run prints. By default: verl's per-step metric lines, its progress bar and hapo-verl's own lines, but not
the warnings nobody running a job can act on. ``--verbose`` (or ``HAPO_VERL_VERBOSE=1``) shows everything.

Hidden by default, in the driver and (through the environment) in every Ray worker:

- verl's "<engine> engine is not available" warnings for optional training engines (torchtitan, veomni,
  automodel, mindspeed, megatron) that a job does not use; about 10 lines per process;
- verl's INFO logs (``VERL_LOGGING_LEVEL=WARN``, verl's own switch), its "Disabled critic" note for
  critic-free estimators, and torchdata's "'set_vital' is deprecated" (raised inside verl's dataloader);
- on CPU, TransferQueue's "target_num_threads 8 should not exceed total physical CPU cores" (hundreds of lines):
  :func:`hapo_verl.cpu.cpu_env` sets ``TQ_NUM_THREADS`` to the machine's physical cores instead;
- the resolved-config dump of verl's TaskRunner (about 600 lines; ``hapo-verl train --cfg job ...`` prints the
  same config without running) -- see :mod:`hapo_verl.patches.quiet_config_dump`.
"""

from __future__ import annotations

import os
import warnings

VERBOSE_ENV = "HAPO_VERL_VERBOSE"
#: ``PYTHONWARNINGS`` entries (read by every new Python process, Ray's workers included)
QUIET_PYTHONWARNINGS = ("ignore::UserWarning:verl.workers.engine",
                        "ignore:Disabled critic as algorithm.adv_estimator != gae",
                        "ignore:'set_vital' is deprecated")
#: in-process filters of the driver (message regex, module regex)
QUIET_DRIVER_WARNINGS = ((r".* engine is not available", r"verl\.workers\.engine"),
                         (r"Disabled critic as algorithm\.adv_estimator != gae", r""))


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") not in ("", "0", "false", "False")


def quiet_env(show_everything: bool) -> dict[str, str]:
    """The variables to set in the driver and to forward to Ray's workers."""
    if show_everything:
        return {VERBOSE_ENV: "1"}
    entries = [e for e in os.environ.get("PYTHONWARNINGS", "").split(",") if e]
    entries += [e for e in QUIET_PYTHONWARNINGS if e not in entries]
    return {VERBOSE_ENV: "0", "PYTHONWARNINGS": ",".join(entries),
            "VERL_LOGGING_LEVEL": os.environ.get("VERL_LOGGING_LEVEL", "WARN")}


def set_console(show_everything: bool) -> dict[str, str]:
    """Apply the console policy to this process (before verl is imported) and return the variables to forward."""
    env = quiet_env(show_everything)
    os.environ.update(env)
    if not show_everything:
        for message, module in QUIET_DRIVER_WARNINGS:
            warnings.filterwarnings("ignore", message=message, module=module)
    return env
