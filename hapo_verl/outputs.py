"""Where a run writes: every output under ``<trainer.output_dir>/<project_name>/<experiment_name>/``.

The output root is ``trainer.output_dir`` (default ``$HAPO_OUTPUT_DIR``, hapo_verl/conf/base/common.yaml). When it
is set, :func:`output_layout` derives the checkpoint directory, the metrics JSONL, TensorBoard, W&B/SwanLab/MLflow
files and any relative dump directory from it, so two experiments never share a file and the same experiment
resumes from its own checkpoints. ``hapo-verl submit`` requires it (a Ray job's working directory is temporary);
``hapo-verl train`` applies it when set.
"""

from __future__ import annotations

import os
import re

#: output locations submit derives from the run directory (name -> value for a run directory)
OUTPUT_ENV = {
    "VERL_FILE_LOGGER_PATH": lambda run: os.path.join(run, "metrics.jsonl"),
    "TENSORBOARD_DIR": lambda run: os.path.join(run, "tensorboard"),
    "WANDB_DIR": lambda run: run,                       # wandb writes <WANDB_DIR>/wandb/run-*
    "SWANLAB_LOG_DIR": lambda run: os.path.join(run, "swanlog"),
    "MLFLOW_TRACKING_URI": lambda run: "sqlite:///" + os.path.join(run, "mlruns.db"),
}
#: the run's own files: always derived, never taken from the submitting shell nor from --env
#: (VERL_FILE_LOGGER_ROOT is overridden by VERL_FILE_LOGGER_PATH in verl's FileLogger)
OWNED_ENV = ("VERL_FILE_LOGGER_PATH", "VERL_FILE_LOGGER_ROOT", "TENSORBOARD_DIR")
#: separate runs keep apart inside these themselves (run ids): a value of the user's is kept when it is an
#: absolute path (a URI for MLflow), else derived
SHARED_OK_ENV = ("WANDB_DIR", "SWANLAB_LOG_DIR", "MLFLOW_TRACKING_URI")
#: names containing one of these are masked in printed output
SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
OUTPUT_ROOT_KEY = "trainer.output_dir"
OUTPUT_ROOT_ENV = "HAPO_OUTPUT_DIR"
#: config keys that hold output paths: relative values are placed under the run directory
#: (trainer.default_local_dir: verl's default -> <run>/checkpoints); absolute values are kept; null stays null
PATH_KEYS = ("trainer.default_local_dir", "trainer.rollout_data_dir", "trainer.validation_data_dir",
             "global_profiler.save_path")
#: what a path or name may contain to travel as a Hydra override unquoted
_SAFE_NAME = re.compile(r"[A-Za-z0-9._+@-]+")
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._+@/-]*")


class OutputError(ValueError):
    """An output setting refused before anything runs or is sent."""


def is_secret(name: str) -> bool:
    return any(marker in name.upper() for marker in SECRET_MARKERS)


# ------------------------------------------------------------------------------------------------ outputs
NO_OUTPUT_ROOT = (
    f"hapo-verl submit needs an output root that every node sees: pass {OUTPUT_ROOT_KEY}=/shared/runs (an override "
    f"or a key of the recipe) or export {OUTPUT_ROOT_ENV}=/shared/runs. The job runs in a temporary working "
    "directory: checkpoints, hapo_state.json and logs written there are lost, and a later job cannot resume from them."
)


class OutputLayout:
    """Where a submitted run writes: the config overrides and job env vars that put every output under
    ``<root>/<project_name>/<experiment_name>``."""

    def __init__(self, root: str, root_source: str, run_dir: str, overrides: dict[str, str], add_keys: set[str],
                 env: dict[str, str], notes: list[str]):
        self.root, self.root_source, self.run_dir = root, root_source, run_dir
        self.overrides, self.add_keys, self.env, self.notes = overrides, add_keys, env, notes

    def override_args(self) -> list[str]:
        return [("+" if key in self.add_keys else "") + f"{key}={value}" for key, value in self.overrides.items()]

    def apply(self, config) -> None:
        from omegaconf import OmegaConf

        for key, value in self.overrides.items():
            OmegaConf.update(config, key, value, merge=False, force_add=True)

    def describe(self) -> dict:
        return {"output_root": self.root, "output_root_from": self.root_source, "run_dir": self.run_dir,
                "config": dict(self.overrides), "env": {k: ("***" if is_secret(k) else v) for k, v in self.env.items()},
                "hapo_state": os.path.join(self.overrides["trainer.default_local_dir"], "global_step_N",
                                           "hapo_state.json")}


def _check_path(what: str, value: str) -> str:
    if not _SAFE_PATH.fullmatch(value):
        raise OutputError(f"{what}={value!r}: use an absolute path of letters, digits and . _ - + @ / (it is passed "
                          "to the job as a Hydra override)")
    return value


def _mlflow_uri_is_relative(uri: str) -> bool:
    if uri.startswith("sqlite:///"):
        return not uri[len("sqlite:///"):].startswith("/")
    if uri.startswith("file:"):
        return not uri[len("file:"):].startswith("/")
    return "://" not in uri and not os.path.isabs(uri)


def output_layout(config, environ: dict, extra_env: dict) -> OutputLayout:
    """Derive every output location of a submitted run from the output root and the experiment; refuse (OutputError)
    a missing or relative root, names that are not one path component, and output locations the user set that
    would land in the job's temporary directory or be shared by two experiments."""
    from omegaconf import OmegaConf

    root = OmegaConf.select(config, OUTPUT_ROOT_KEY, default=None)
    raw = OmegaConf.to_container(config.trainer, resolve=False).get("output_dir") if "trainer" in config else None
    # hapo_verl/conf/base/common.yaml: output_dir: ${oc.env:HAPO_OUTPUT_DIR,null}
    source = f"${OUTPUT_ROOT_ENV}" if isinstance(raw, str) and f"oc.env:{OUTPUT_ROOT_ENV}" in raw else OUTPUT_ROOT_KEY
    if root in (None, "") and environ.get(OUTPUT_ROOT_ENV):
        root, source = environ[OUTPUT_ROOT_ENV], f"${OUTPUT_ROOT_ENV}"
    if root in (None, ""):
        raise OutputError(NO_OUTPUT_ROOT)
    root = str(root)
    if not os.path.isabs(root):
        raise OutputError(f"{source}={root!r} is relative: the output root must be an absolute path that every node "
                          f"sees (e.g. /shared/runs); a relative path lands in the job's temporary working directory. "
                          f"Set {OUTPUT_ROOT_KEY}=/abs/path or {OUTPUT_ROOT_ENV}=/abs/path.")
    root = _check_path(source, os.path.normpath(root))

    names = {}
    for key in ("trainer.project_name", "trainer.experiment_name"):
        value = OmegaConf.select(config, key, default=None)
        if not isinstance(value, str) or not _SAFE_NAME.fullmatch(value) or value in (".", ".."):
            raise OutputError(f"{key}={value!r}: it names a directory under the output root; use letters, digits "
                              "and . _ - + @ (not '.' or '..')")
        names[key] = value
    project, experiment = names["trainer.project_name"], names["trainer.experiment_name"]
    run_dir = os.path.join(root, project, experiment)

    overrides: dict[str, str] = {OUTPUT_ROOT_KEY: root}
    add_keys = set() if "output_dir" in config.trainer else {OUTPUT_ROOT_KEY}  # a recipe not built on hapo_verl/conf
    verl_default_ckpt = f"checkpoints/{project}/{experiment}"
    for key in PATH_KEYS:
        value = OmegaConf.select(config, key, default=None)
        if key == "trainer.default_local_dir" and (value is None or value == verl_default_ckpt):
            value = "checkpoints"
        if value is None:
            continue  # e.g. trainer.rollout_data_dir: null = no dump
        value = str(value)
        if value.startswith("~"):
            raise OutputError(f"{key}={value!r}: '~' is the home directory of whichever node writes; give an absolute "
                              f"path on shared storage, or a relative one (placed under the run directory {run_dir})")
        if not os.path.isabs(value):
            placed = os.path.normpath(os.path.join(run_dir, value))
            if placed != run_dir and not placed.startswith(run_dir + os.sep):
                raise OutputError(f"{key}={value!r} leaves the run directory {run_dir}: give a path inside it or an "
                                  "absolute one")
            value = placed
        overrides[key] = _check_path(key, os.path.normpath(value))

    env: dict[str, str] = {}
    notes: list[str] = []
    for name in OWNED_ENV:
        if name in extra_env:
            raise OutputError(f"--env {name}=...: submit sets {name} itself, under the run directory {run_dir}; "
                              f"move it with {OUTPUT_ROOT_KEY} or {OUTPUT_ROOT_ENV}")
        if environ.get(name):
            where = (f"TensorBoard logs in {OUTPUT_ENV['TENSORBOARD_DIR'](run_dir)}" if name == "TENSORBOARD_DIR"
                     else f"metrics in {OUTPUT_ENV['VERL_FILE_LOGGER_PATH'](run_dir)}")
            notes.append(f"{name}={environ[name]} in your environment is not forwarded: submit puts this run's {where}")
    for name, derive in OUTPUT_ENV.items():
        if name in OWNED_ENV:
            env[name] = derive(run_dir)
            continue
        given = extra_env.get(name) or environ.get(name)
        if given:
            relative = _mlflow_uri_is_relative(given) if name == "MLFLOW_TRACKING_URI" else not os.path.isabs(given)
            if relative:
                raise OutputError(f"{name}={given!r} is relative: it would land in the job's temporary working "
                                  f"directory. Unset it (submit then uses {derive(run_dir)}) or give an absolute "
                                  "path every node sees")
            env[name] = given
        else:
            env[name] = derive(run_dir)
    return OutputLayout(root, source, run_dir, overrides, add_keys, env, notes)
