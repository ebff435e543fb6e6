"""Make verl's JSONL file logger append instead of truncating.

Reason: ``verl.utils.tracking.FileLogger`` opens its file with ``open(path, "wb")``. A rerun or a resumed job
with the same ``VERL_FILE_LOGGER_PATH`` (or the same project and experiment names) therefore empties the
metrics of every earlier attempt before it logs its first step: ``hapo-verl tiny`` run twice left 0 of 4 lines.
``Tracking`` looks ``FileLogger`` up in its module when it is constructed, so replacing that module attribute
with a subclass that opens the same path in ``"ab"`` mode is enough. Records stay verl's ``{"step", "data"}``
lines; a step logged again after a resume from an earlier checkpoint appears twice, and readers keep the last.

Applied in every run's TaskRunner process (:class:`hapo_verl.launcher.HAPOTaskRunner`), where verl's trainer
creates its ``Tracking``, and with the other shims by :func:`hapo_verl.patches.apply_all`.

Targets: verl 0.9.1.
Expiry: ``tests/test_patches_on_cpu.py::test_file_logger_append_still_needed`` fails once verl's own
``FileLogger`` keeps the lines already in its file.
"""

from __future__ import annotations

import os

NAME = "file_logger_append"
REASON = "verl 0.9.1's FileLogger opens metrics JSONL with 'wb': a rerun or resume deletes earlier metrics"
TARGETS = {"verl": "0.9.1"}

#: the unpatched verl class (set on first apply)
ORIGINAL = None


def log_path(project_name: str, experiment_name: str) -> str:
    """Where verl's FileLogger writes: ``$VERL_FILE_LOGGER_PATH``, else
    ``$VERL_FILE_LOGGER_ROOT/<project>/<experiment>.jsonl`` (root default ``.``), as verl 0.9.1 resolves it."""
    path = os.getenv("VERL_FILE_LOGGER_PATH")
    if path is None:
        directory = os.path.join(os.path.expanduser(os.getenv("VERL_FILE_LOGGER_ROOT", ".")), project_name)
        path = os.path.join(directory, f"{experiment_name}.jsonl")
    return path


def _appending_class(base):
    class AppendingFileLogger(base):
        """verl's FileLogger, opening its file in append mode."""

        def __init__(self, project_name: str, experiment_name: str):
            self.project_name = project_name
            self.experiment_name = experiment_name
            self.filepath = log_path(project_name, experiment_name)
            directory = os.path.dirname(os.path.abspath(self.filepath))
            os.makedirs(directory, exist_ok=True)
            kept = os.path.getsize(self.filepath) if os.path.exists(self.filepath) else 0
            print(f"Creating file logger at {os.path.abspath(self.filepath)}"
                  + (f" (appending; {kept} bytes of earlier attempts kept)" if kept else ""))
            self.fp = open(self.filepath, "ab", buffering=0)

    AppendingFileLogger.__qualname__ = AppendingFileLogger.__name__ = "FileLogger"
    AppendingFileLogger._hapo_verl_appends = True
    return AppendingFileLogger


def is_applied() -> bool:
    from verl.utils import tracking

    return getattr(tracking.FileLogger, "_hapo_verl_appends", False)


def apply() -> None:
    global ORIGINAL
    from verl.utils import tracking

    if is_applied():
        return
    ORIGINAL = tracking.FileLogger
    tracking.FileLogger = _appending_class(ORIGINAL)
