"""``hapo-verl submit`` / scripts/*.sh without a cluster: --dry-run output (resolved config, runtime env, Ray
commands), the staged job (recipes + a wheel whose entry point registers HAPO) and the ``ray job submit`` call."""

import json
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from hapo_verl.tools import ray_submit

REPO = Path(__file__).resolve().parents[1]
RECIPE = "qwen2.5_math_1.5b_hapo"


def split_dry_run(stdout: str):
    config_part, _, ray_part = stdout.partition("# ---- Ray ----")
    config_text = config_part.split("----\n", 1)[1]
    return yaml.safe_load(config_text), ray_part


@pytest.fixture(scope="module")
def dry_run():
    env = {**__import__("os").environ, "HAPO_DATA_DIR": "/shared/hapo", "WANDB_API_KEY": "s3cret"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "submit.sh"), RECIPE, "--dry-run", "--address",
                           "http://10.1.2.3:8265", "trainer.total_training_steps=3"],
                          capture_output=True, text=True, timeout=300, env=env, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_dry_run_prints_the_fully_resolved_config(dry_run):
    config, _ = split_dry_run(dry_run)
    assert config["recipe"]["name"] == RECIPE and config["trainer"]["experiment_name"] == RECIPE
    assert config["trainer"]["total_training_steps"] == 3  # the override
    assert config["data"]["train_files"] == "/shared/hapo/dapo-math-17k.parquet"  # resolved with HAPO_DATA_DIR
    assert config["reward"]["reward_kwargs"]["max_resp_len"] == 10240
    assert config["algorithm"]["adv_estimator"] == "hapo"
    # launcher-owned keys are filled as at start-up (prepare_config ran)
    assert config["actor_rollout_ref"]["rollout"]["agent"]["agent_loop_config_path"].endswith("agent_loops.yaml")
    assert "${" not in dry_run.split("# ---- Ray ----")[0]


def test_dry_run_prints_runtime_env_and_ray_commands(dry_run):
    _, ray_part = split_dry_run(dry_run)
    assert "# layout: 4 node(s) x 8 GPU(s)" in ray_part
    assert "ray start --head --port=6379 --dashboard-host=0.0.0.0 --dashboard-port=8265 --num-gpus=8" in ray_part
    assert "ray start --address=HEAD_IP:6379 --num-gpus=8" in ray_part and "nodes 2..4" in ray_part
    submit = next(line for line in ray_part.splitlines() if line.startswith("ray job submit"))
    argv = shlex.split(submit)
    assert argv[:5] == ["ray", "job", "submit", "--address", "http://10.1.2.3:8265"]
    env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert env["pip"]["packages"] == ["${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}/wheels/hapo_verl-0.1.0-py3-none-any.whl"]
    assert env["env_vars"]["HAPO_DATA_DIR"] == "/shared/hapo"
    assert env["env_vars"]["WANDB_API_KEY"] == "***" and "s3cret" not in dry_run
    assert argv[argv.index("--") + 1:] == ["python", "-m", "hapo_verl.cli", "train", "--recipe", RECIPE,
                                           "--recipes-dir", "recipes", "trainer.total_training_steps=3"]


def test_bad_override_fails_before_anything_is_submitted():
    proc = subprocess.run([sys.executable, "-m", "hapo_verl.cli", "submit", "--recipe", RECIPE, "--dry-run",
                           "hapo.temperature_tau=2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "hapo.temperature_tau must be in [0, 1)" in proc.stderr


def test_install_variants():
    env = ray_submit.runtime_env("pip:hapo-verl==0.1.0", None, {}, "/stage")
    assert env["pip"]["packages"] == ["hapo-verl==0.1.0"] and env["working_dir"] == "/stage"
    assert "pip" not in ray_submit.runtime_env("none", None, {}, "/stage")
    with pytest.raises(ValueError, match="--install"):
        ray_submit.runtime_env("conda", None, {}, "/stage")


def test_submit_stages_recipes_and_a_wheel_with_the_plugin_entry_point(monkeypatch, tmp_path):
    """Without --dry-run: the staged working_dir holds recipes/ and a wheel of hapo-verl whose entry point
    ``verl.plugins: hapo`` is what registers HAPO in every Ray worker; ``ray job submit`` gets that dir."""
    calls = []

    def fake_run(cmd, *args, **kwargs):
        if "job" in cmd and "submit" in cmd:
            env = json.loads(cmd[cmd.index("--runtime-env-json") + 1])
            stage = Path(env["working_dir"])
            wheels = sorted((stage / "wheels").glob("*.whl"))
            with zipfile.ZipFile(wheels[0]) as archive:
                entry_points = next(archive.read(n).decode() for n in archive.namelist()
                                    if n.endswith("entry_points.txt"))
                names = archive.namelist()
            calls.append({"cmd": cmd, "env": env, "recipes": sorted(p.name for p in (stage / "recipes").glob("*.yaml")),
                          "models": sorted(p.name for p in (stage / "recipes" / "model").glob("*.yaml")),
                          "wheel": wheels[0].name, "entry_points": entry_points, "names": names})
            return subprocess.CompletedProcess(cmd, 0)
        return real_run(cmd, *args, **kwargs)

    real_run = subprocess.run
    monkeypatch.setattr(ray_submit.subprocess, "run", fake_run)
    rc = ray_submit.main(["--recipe", RECIPE, "--recipes-dir", str(REPO / "recipes"), "--address", "http://h:8265",
                          "--no-validate", "--no-wait"])
    assert rc == 0 and len(calls) == 1
    call = calls[0]
    assert f"{RECIPE}.yaml" in call["recipes"] and "tiny_cpu.yaml" in call["recipes"]
    assert "qwen3_8b_base.yaml" in call["models"]
    assert call["wheel"].startswith("hapo_verl-") and call["env"]["pip"]["packages"][0].endswith(call["wheel"])
    assert "[verl.plugins]" in call["entry_points"] and "hapo = hapo_verl.plugin" in call["entry_points"]
    assert "hapo_verl/conf/hapo.yaml" in call["names"] and "hapo_verl/tools/reward.py" in call["names"]
    assert "hapo_verl/sampling/cpu_kernel.c" in call["names"]  # built on first use where the wheel is installed
    assert "--no-wait" in call["cmd"] and Path(call["cmd"][0]).name == "ray"


def test_cluster_scripts_dry_run():
    head = subprocess.run(["bash", str(REPO / "scripts" / "ray_head.sh"), "--dry-run"], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "NUM_GPUS": "8"}, timeout=60)
    assert head.returncode == 0
    assert "ray start --head --port=6379 --dashboard-host=0.0.0.0 --dashboard-port=8265 --num-gpus=8" in head.stdout
    worker = subprocess.run(["bash", str(REPO / "scripts" / "ray_worker.sh"), "10.0.0.1", "--dry-run"],
                            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "NUM_GPUS": "8"}, timeout=60)
    assert worker.returncode == 0 and "ray start --address=10.0.0.1:6379 --num-gpus=8" in worker.stdout
    usage = subprocess.run(["bash", str(REPO / "scripts" / "ray_worker.sh")], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "usage" in usage.stderr
