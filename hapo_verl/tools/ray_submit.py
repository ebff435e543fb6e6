"""``hapo-verl submit``: run a recipe as a Ray job on a multi-node cluster (scripts/ray_head.sh, ray_worker.sh).

    HAPO_OUTPUT_DIR=/shared/runs hapo-verl submit --recipe qwen2.5_math_1.5b_hapo --address http://HEAD:8265 [k=v ...]
    hapo-verl submit --recipe qwen2.5_math_1.5b_hapo --dry-run        # resolved config, paths, commands; no cluster

What is submitted:

- a staging directory as the job's ``working_dir``: ``recipes/`` and a wheel of hapo-verl built from this
  checkout (``pip wheel --no-deps``);
- ``runtime_env.pip`` installing that wheel on every node the job uses (Ray builds a virtualenv per node that
  inherits the node's site-packages, so verl/vLLM/torch of the node image are reused). Installing the
  distribution, not just putting the source on ``PYTHONPATH``, matters: verl discovers HAPO through the
  ``verl.plugins`` entry point in every worker process. ``--install pip:SPEC`` installs SPEC instead
  (an index version or a git URL); ``--install none`` when the image already has hapo-verl;
- ``runtime_env.env_vars``: the variables of :data:`FORWARD_ENV` and every ``WANDB_*``, ``SWANLAB_*`` and
  ``MLFLOW_*`` variable set here, the logger locations derived from the output root, and ``--env K=V``;
- the entrypoint ``python -m hapo_verl.cli train --recipe NAME --recipes-dir recipes key=value ...``, with the
  output paths added as overrides.

Outputs: the job's working directory is a temporary directory, so every output path is put under the output
root, ``trainer.output_dir`` (default ``$HAPO_OUTPUT_DIR``; an absolute path every node sees), in the run
directory ``<root>/<trainer.project_name>/<trainer.experiment_name>``: ``checkpoints/`` (trainer.default_local_dir,
with hapo_state.json in each global_step_N), ``metrics.jsonl`` (VERL_FILE_LOGGER_PATH), ``tensorboard/``
(TENSORBOARD_DIR), ``WANDB_DIR``, ``SWANLAB_LOG_DIR``, ``MLFLOW_TRACKING_URI`` and any relative
``trainer.rollout_data_dir`` / ``trainer.validation_data_dir`` / ``global_profiler.save_path``. Two experiments never
share a path; the same experiment submitted again finds its checkpoints and resumes (trainer.resume_mode=auto).

Authentication: ``ray job submit`` runs with ``RAY_AUTH_MODE=token`` and the token Ray reads (``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``: a copy of the head's); ``--no-auth`` for a cluster started
with ``--no-auth``. The token goes in an HTTP header, never into the job's runtime env.

The config is composed and validated here first (prepare_config + verl's validate_config), so a bad override
fails before anything is uploaded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from hapo_verl.outputs import (OUTPUT_ENV, OUTPUT_ROOT_ENV, OUTPUT_ROOT_KEY, OWNED_ENV, OutputError,  # noqa: F401
                               OutputLayout, is_secret, output_layout)

DEFAULT_ADDRESS = os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265")
#: forwarded to the job (and so to every worker) when set in the submitting shell
FORWARD_ENV = ("HAPO_DATA_DIR", "HF_HOME", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_TOKEN")
#: every variable with one of these prefixes is forwarded too (the loggers verl supports read them), except
#: the output locations of OUTPUT_ENV
FORWARD_PREFIXES = ("WANDB_", "SWANLAB_", "MLFLOW_")
#: token authentication exists from this Ray on
MIN_RAY_FOR_AUTH = (2, 52)
STAGE_WHEEL_DIR = "wheels"


#: a setting that makes the submission refused before anything is built or sent
SubmitError = OutputError


def repo_root() -> Path | None:
    root = Path(__file__).resolve().parents[2]
    return root if (root / "setup.py").is_file() else None


def build_wheel(dest: Path) -> Path:
    root = repo_root()
    if root is None:
        raise RuntimeError("no hapo-verl source checkout next to the package: use --install pip:SPEC or --install none")
    dest.mkdir(parents=True, exist_ok=True)
    # build from a copy: setuptools writes build/ and *.egg-info next to setup.py
    with tempfile.TemporaryDirectory(prefix="hapo_wheel_src_") as tmp:
        source = Path(tmp) / "src"
        shutil.copytree(root, source, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "outputs", "runs", "__pycache__", "*.pyc", "tests",
            "bench", ".pytest_cache"))
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(dest), str(source)], check=True)
    wheels = sorted(dest.glob("hapo_verl-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip wheel wrote no hapo_verl wheel to {dest}")
    return wheels[-1]


def wheel_name() -> str:
    try:
        from importlib.metadata import version

        ver = version("hapo-verl")
    except Exception:  # noqa: BLE001
        ver = "0.1.0"
    return f"hapo_verl-{ver}-py3-none-any.whl"


def runtime_env(install: str, wheel: str | None, env: dict[str, str], working_dir: str) -> dict:
    result: dict = {"working_dir": working_dir}
    if install == "wheel":
        # ${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}: where Ray unpacked working_dir on that node
        result["pip"] = {"packages": [f"${{RAY_RUNTIME_ENV_CREATE_WORKING_DIR}}/{STAGE_WHEEL_DIR}/{wheel}"],
                         "pip_check": False}
    elif install.startswith("pip:"):
        result["pip"] = {"packages": [install[len("pip:"):]], "pip_check": False}
    elif install != "none":
        raise ValueError(f"--install must be wheel, pip:SPEC or none, got {install!r}")
    env_vars = {
        # verl calls ray.init(runtime_env=...) inside the job: let its env vars win over the job's on a clash
        # instead of failing the merge
        "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
        **env,
    }
    result["env_vars"] = env_vars
    return result


def entrypoint(recipe: str, overrides: list[str]) -> list[str]:
    return ["python", "-m", "hapo_verl.cli", "train", "--recipe", recipe, "--recipes-dir", "recipes", *overrides]


def job_submit_command(address: str, env: dict, entry: list[str], submission_id: str | None, no_wait: bool) -> list[str]:
    cmd = ["ray", "job", "submit", "--address", address, "--runtime-env-json", json.dumps(env)]
    if submission_id:
        cmd += ["--submission-id", submission_id]
    if no_wait:
        cmd.append("--no-wait")
    return cmd + ["--", *entry]




def _redacted(env: dict) -> dict:
    env = json.loads(json.dumps(env))
    for key in env.get("env_vars", {}):
        if is_secret(key):
            env["env_vars"][key] = "***"
    return env


def stage(recipes: Path, install: str, dest: Path) -> str | None:
    shutil.copytree(recipes, dest / "recipes", ignore=shutil.ignore_patterns("*.sh", "__pycache__"))
    if install == "wheel":
        return build_wheel(dest / STAGE_WHEEL_DIR).name
    return None


def compose(recipe: str, overrides: list[str], recipes_dir):
    from hapo_verl.tools.recipes import compose_recipe

    return compose_recipe(recipe, overrides, recipes_dir)


def validate_config(config) -> None:
    """The launcher's start-up checks (verl's own messages go to stderr)."""
    import contextlib

    from hapo_verl.launcher import validate

    with contextlib.redirect_stdout(sys.stderr):
        validate(config)


def resolved_config(recipe: str, overrides: list[str], recipes_dir):
    """The recipe composed, checked as at start-up, and resolved."""
    from omegaconf import OmegaConf

    config = compose(recipe, overrides, recipes_dir)
    validate_config(config)
    OmegaConf.resolve(config)
    return config


def forwarded_env(environ: dict) -> dict[str, str]:
    """The submitting shell's variables that travel to the job: FORWARD_ENV and every WANDB_*/SWANLAB_*/MLFLOW_*
    variable (output locations excepted: :func:`output_layout` sets those)."""
    env = {k: environ[k] for k in FORWARD_ENV if environ.get(k)}
    env.update({k: v for k, v in sorted(environ.items())
                if k.startswith(FORWARD_PREFIXES) and v and k not in OUTPUT_ENV})
    return env


def _override_key(item: str) -> str | None:
    key, sep, _ = item.partition("=")
    return key.lstrip("+~") if sep else None


def job_overrides(user: list[str], layout: OutputLayout) -> list[str]:
    """The user's overrides, less those the layout replaces, then the layout's."""
    return [item for item in user if _override_key(item) not in layout.overrides] + layout.override_args()


# ------------------------------------------------------------------------------------------------ auth
NO_TOKEN = ("no Ray auth token here: copy the head's ~/.ray/auth_token (written by scripts/ray_head.sh with "
            "`ray get-auth-token --generate`) to ~/.ray/auth_token on this machine, or set RAY_AUTH_TOKEN_PATH to a "
            "copy, or RAY_AUTH_TOKEN; pass --no-auth only for a cluster started with --no-auth")


def token_source(environ: dict) -> str | None:
    """Where Ray will read the token from (its order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token); None
    when there is none. Never the token itself."""
    if environ.get("RAY_AUTH_TOKEN"):
        return "the RAY_AUTH_TOKEN environment variable"
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(environ["RAY_AUTH_TOKEN_PATH"])
        if not path.is_file() or path.stat().st_size == 0:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path} is not a non-empty file (Ray refuses it): point it at a "
                              "copy of the head's ~/.ray/auth_token, or unset it")
        return f"{path} (RAY_AUTH_TOKEN_PATH)"
    path = Path(environ["HOME"]) if environ.get("HOME") else Path.home()
    path = path / ".ray" / "auth_token"
    if path.is_file() and path.stat().st_size > 0:
        return str(path)
    return None


def auth_env(no_auth: bool, environ: dict) -> tuple[dict[str, str], str | None]:
    """The env ``ray job submit`` runs with, and where its token comes from (None: none found, or --no-auth)."""
    if no_auth:
        return {"RAY_AUTH_MODE": "disabled"}, None
    mode = environ.get("RAY_AUTH_MODE")
    if mode and mode != "token":
        raise SubmitError(f"RAY_AUTH_MODE={mode} is set in your environment, but hapo-verl submit uses token "
                          "authentication (RAY_AUTH_MODE=token): unset it, or pass --no-auth for a cluster started "
                          "with --no-auth")
    return {"RAY_AUTH_MODE": "token"}, token_source(environ)


def ray_cli() -> str:
    """The ``ray`` of this Python's environment (the one that composed the config), else the first on PATH."""
    sibling = Path(sys.executable).with_name("ray")
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    found = shutil.which("ray")
    if found is None:
        raise SubmitError("no `ray` command next to this Python or on PATH: pip install 'ray[default]'")
    return found


def check_ray_for_auth(ray: str) -> None:
    """Token authentication exists from Ray 2.52 on: refuse an older ``ray`` client."""
    proc = subprocess.run([ray, "--version"], capture_output=True, text=True)
    found = re.search(r"version\s+(\d+)\.(\d+)", (proc.stdout or "") + (proc.stderr or ""))
    if found is None:
        raise SubmitError(f"cannot read the Ray version from `{ray} --version` "
                          f"({(proc.stdout or proc.stderr or '').strip()!r}); token authentication needs Ray >= 2.52")
    if (int(found.group(1)), int(found.group(2))) < MIN_RAY_FOR_AUTH:
        raise SubmitError(f"token authentication (RAY_AUTH_MODE=token) needs Ray >= 2.52, `{ray} --version` says "
                          f"{found.group(0)}: upgrade Ray here and on the cluster "
                          "(pip install -U 'ray[default]>=2.52'), or pass --no-auth for a cluster started with --no-auth")


def cluster_commands(nnodes: int, gpus: int, port: int = 6379, dashboard_port: int = 8265,
                     auth: bool = True) -> list[tuple[str, str]]:
    """(command, how the scripts run it) for the head and the workers, as scripts/ray_head.sh and ray_worker.sh
    print them with --dry-run (HEAD_IP: the head's cluster address)."""
    mode = "RAY_AUTH_MODE=token" if auth else "RAY_AUTH_MODE=disabled"
    flag = "" if auth else " --no-auth"
    head = (f"{mode} ray start --head --node-ip-address=HEAD_IP --port={port} --dashboard-host=HEAD_IP "
            f"--dashboard-port={dashboard_port} --num-gpus={gpus} --disable-usage-stats")
    commands = [(head, f"node 1: HEAD_IP=HEAD_IP NUM_GPUS={gpus} bash scripts/ray_head.sh{flag}")]
    if nnodes > 1:
        worker = f"{mode} ray start --address=HEAD_IP:{port} --num-gpus={gpus} --disable-usage-stats"
        commands.append((worker, f"nodes 2..{nnodes}: NUM_GPUS={gpus} bash scripts/ray_worker.sh HEAD_IP:{port}{flag}"))
    return commands


def _warn(message: str) -> None:
    print(f"[hapo-verl] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hapo-verl submit", description="submit a recipe as a Ray job",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--recipe", required=True, help="recipe name (recipes/<name>.yaml) or a path to one")
    parser.add_argument("--recipes-dir", default=None)
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help="Ray dashboard address of the head node "
                                                                     "(default $RAY_ADDRESS or http://127.0.0.1:8265)")
    parser.add_argument("--install", default="wheel", help="wheel (build from this checkout, default), pip:SPEC, none")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra job env var")
    parser.add_argument("--submission-id", default=None)
    parser.add_argument("--no-wait", action="store_true", help="return after submitting (ray job logs -f ID)")
    parser.add_argument("--no-auth", action="store_true",
                        help="submit without Ray token authentication (only for a cluster started with --no-auth)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config, output paths, runtime env and commands; build and submit "
                             "nothing")
    parser.add_argument("--no-validate", action="store_true", help="skip the start-up checks of the config here")
    args, overrides = parser.parse_known_args(argv)
    if args.install != "wheel" and args.install != "none" and not args.install.startswith("pip:"):
        parser.error(f"--install must be wheel, pip:SPEC or none, got {args.install!r}")

    extra_env: dict[str, str] = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--env expects KEY=VALUE, got {item!r}")
        if key.startswith("RAY_AUTH_"):
            parser.error(f"--env {key}: the cluster's nodes have their own token; a token in the job's env would be "
                         "visible to anyone who can read the job's runtime env")
        extra_env[key] = value

    from omegaconf import OmegaConf

    from hapo_verl.tools.recipes import resolve_recipe

    recipes_root, recipe = resolve_recipe(args.recipe, args.recipes_dir)
    environ = dict(os.environ)
    try:
        ray_env, token = auth_env(args.no_auth, environ)
        config = compose(recipe, overrides, recipes_root)
        layout = output_layout(config, environ, extra_env)
    except SubmitError as err:
        print(f"hapo-verl submit: error: {err}", file=sys.stderr)
        return 2
    layout.apply(config)
    if not args.no_validate or args.dry_run:
        validate_config(config)
    for note in layout.notes:
        _warn(note)
    if args.no_auth:
        _warn("WARNING: --no-auth: submitting without Ray token authentication; a cluster without it runs jobs for "
              "anyone who reaches its dashboard port (docs/gpu_cluster.md)")

    env = {**forwarded_env(environ), **layout.env,
           **{k: v for k, v in extra_env.items() if k not in layout.env}}
    entry = entrypoint(recipe, job_overrides(overrides, layout))
    env_prefix = [f"{k}={v}" for k, v in ray_env.items()]

    if args.dry_run:
        import yaml

        OmegaConf.resolve(config)
        wheel = wheel_name() if args.install == "wheel" else None
        renv = runtime_env(args.install, wheel, env, "<staging dir>")
        nnodes, gpus = int(config.trainer.nnodes), int(config.trainer.n_gpus_per_node)
        print(f"# ---- resolved config ({recipe}) ----")
        print(OmegaConf.to_yaml(config))
        print("# ---- outputs ----")
        print(f"# every path below is what the cluster uses; a second submission with the same "
              f"trainer.experiment_name resumes from {layout.overrides['trainer.default_local_dir']}")
        print(yaml.safe_dump(layout.describe(), sort_keys=False, width=1000), end="")
        print("# ---- Ray ----")
        print(f"# layout: {nnodes} node(s) x {gpus} GPU(s) (trainer.nnodes x trainer.n_gpus_per_node)")
        print(f"# staging dir: recipes/ from {recipes_root}"
              + (f" + {STAGE_WHEEL_DIR}/{wheel} (pip wheel --no-deps {repo_root()})" if wheel else ""))
        print("# cluster:")
        for command, how in cluster_commands(nnodes, gpus, auth=not args.no_auth):
            print(f"{command}   # {how}")
        if args.no_auth:
            print("# auth: none (--no-auth)")
        elif token:
            print(f"# auth: RAY_AUTH_MODE=token, token from {token} (sent as an HTTP header, not in the runtime env)")
        else:
            print(f"# auth: RAY_AUTH_MODE=token, but {NO_TOKEN}")
            _warn(f"WARNING: {NO_TOKEN}")
        print("# runtime env:")
        print(json.dumps(_redacted(renv), indent=2))
        print("# submit:")
        print(shlex.join(env_prefix + job_submit_command(args.address, _redacted(renv), entry, args.submission_id,
                                                         args.no_wait)))
        return 0

    try:
        ray = ray_cli()
        if not args.no_auth:
            if token is None:
                raise SubmitError(NO_TOKEN)
            check_ray_for_auth(ray)
    except SubmitError as err:
        print(f"hapo-verl submit: error: {err}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="hapo_submit_") as tmp:
        staging = Path(tmp)
        wheel = stage(recipes_root, args.install, staging)
        renv = runtime_env(args.install, wheel, env, str(staging))
        cmd = job_submit_command(args.address, renv, entry, args.submission_id, args.no_wait)
        shown = job_submit_command(args.address, _redacted(renv), entry, args.submission_id, args.no_wait)
        print("[hapo-verl] " + shlex.join(env_prefix + shown), flush=True)
        print(f"[hapo-verl] outputs: {layout.run_dir}", flush=True)
        return subprocess.run([ray, *cmd[1:]], env={**environ, **ray_env}).returncode


if __name__ == "__main__":
    raise SystemExit(main())
