"""``hapo-verl submit``: run a recipe as a Ray job on a multi-node cluster (scripts/ray_head.sh, ray_worker.sh).

    hapo-verl submit --recipe qwen2.5_math_1.5b_hapo --address http://HEAD:8265 [key=value ...]
    hapo-verl submit --recipe qwen2.5_math_1.5b_hapo --dry-run        # resolved config + commands, no cluster

What is submitted:

- a staging directory as the job's ``working_dir``: ``recipes/`` and a wheel of hapo-verl built from this
  checkout (``pip wheel --no-deps``);
- ``runtime_env.pip`` installing that wheel on every node the job uses (Ray builds a virtualenv per node that
  inherits the node's site-packages, so verl/vLLM/torch of the node image are reused). Installing the
  distribution, not just putting the source on ``PYTHONPATH``, matters: verl discovers HAPO through the
  ``verl.plugins`` entry point in every worker process. ``--install pip:SPEC`` installs SPEC instead
  (an index version or a git URL); ``--install none`` when the image already has hapo-verl;
- ``runtime_env.env_vars``: ``HAPO_DATA_DIR`` (and the file/TensorBoard logger locations) when set here;
- the entrypoint ``python -m hapo_verl.cli train --recipe NAME --recipes-dir recipes key=value ...``.

The config is composed and validated here first (prepare_config + verl's validate_config), so a bad override
fails before anything is uploaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_ADDRESS = os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265")
#: forwarded to the job (and so to every worker) when set in the submitting shell
FORWARD_ENV = ("HAPO_DATA_DIR", "VERL_FILE_LOGGER_ROOT", "VERL_FILE_LOGGER_PATH", "TENSORBOARD_DIR", "HF_HOME",
               "HF_HUB_OFFLINE", "WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "HF_TOKEN")
#: never printed in --dry-run output
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN")
STAGE_WHEEL_DIR = "wheels"


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
    for key in SECRET_ENV:
        if key in env.get("env_vars", {}):
            env["env_vars"][key] = "***"
    return env


def stage(recipes: Path, install: str, dest: Path) -> str | None:
    shutil.copytree(recipes, dest / "recipes", ignore=shutil.ignore_patterns("*.sh", "__pycache__"))
    if install == "wheel":
        return build_wheel(dest / STAGE_WHEEL_DIR).name
    return None


def resolved_config(recipe: str, overrides: list[str], recipes_dir):
    """The recipe composed, checked as at start-up, and resolved (verl's own messages go to stderr)."""
    import contextlib

    from omegaconf import OmegaConf

    from hapo_verl.launcher import validate
    from hapo_verl.tools.recipes import compose_recipe

    config = compose_recipe(recipe, overrides, recipes_dir)
    with contextlib.redirect_stdout(sys.stderr):
        validate(config)
    OmegaConf.resolve(config)
    return config


def cluster_commands(nnodes: int, gpus: int, port: int = 6379, dashboard_port: int = 8265) -> list[str]:
    return [
        f"ray start --head --port={port} --dashboard-host=0.0.0.0 --dashboard-port={dashboard_port} "
        f"--num-gpus={gpus}            # node 1 (scripts/ray_head.sh)",
        f"ray start --address=HEAD_IP:{port} --num-gpus={gpus}      # nodes 2..{nnodes} (scripts/ray_worker.sh HEAD_IP)"
        if nnodes > 1 else "# single node: no worker to join",
    ]


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
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config, runtime env and commands; build and submit nothing")
    parser.add_argument("--no-validate", action="store_true", help="skip composing/validating the config here")
    args, overrides = parser.parse_known_args(argv)

    from hapo_verl.tools.recipes import resolve_recipe

    recipes_root, recipe = resolve_recipe(args.recipe, args.recipes_dir)

    env = {k: os.environ[k] for k in FORWARD_ENV if os.environ.get(k)}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--env expects KEY=VALUE, got {item!r}")
        env[key] = value

    config = None
    if not args.no_validate or args.dry_run:
        config = resolved_config(recipe, overrides, recipes_root)
    entry = entrypoint(recipe, overrides)

    if args.dry_run:
        wheel = wheel_name() if args.install == "wheel" else None
        renv = runtime_env(args.install, wheel, env, "<staging dir>")
        from omegaconf import OmegaConf

        nnodes, gpus = int(config.trainer.nnodes), int(config.trainer.n_gpus_per_node)
        print(f"# ---- resolved config ({recipe}) ----")
        print(OmegaConf.to_yaml(config))
        print("# ---- Ray ----")
        print(f"# layout: {nnodes} node(s) x {gpus} GPU(s) (trainer.nnodes x trainer.n_gpus_per_node)")
        print(f"# staging dir: recipes/ from {recipes_root}"
              + (f" + {STAGE_WHEEL_DIR}/{wheel} (pip wheel --no-deps {repo_root()})" if wheel else ""))
        print("# cluster:")
        print("\n".join(cluster_commands(nnodes, gpus)))
        print("# runtime env:")
        print(json.dumps(_redacted(renv), indent=2))
        print("# submit:")
        print(shlex.join(job_submit_command(args.address, _redacted(renv), entry, args.submission_id, args.no_wait)))
        return 0

    with tempfile.TemporaryDirectory(prefix="hapo_submit_") as tmp:
        staging = Path(tmp)
        wheel = stage(recipes_root, args.install, staging)
        renv = runtime_env(args.install, wheel, env, str(staging))
        cmd = job_submit_command(args.address, renv, entry, args.submission_id, args.no_wait)
        print("[hapo-verl] " + shlex.join(job_submit_command(args.address, _redacted(renv), entry, args.submission_id,
                                                             args.no_wait)), flush=True)
        ray_cli = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
        return subprocess.run([ray_cli, *cmd[1:]]).returncode


if __name__ == "__main__":
    raise SystemExit(main())
