"""``hapo-verl submit`` without a cluster: --dry-run output (resolved config, output paths, runtime env, Ray
commands), the output root and the paths derived from it, token authentication of ``ray job submit``, the staged
job (recipes + a wheel whose entry point registers HAPO) and the ``ray job submit`` call.
scripts/ray_head.sh and ray_worker.sh: tests/test_cluster_scripts_on_cpu.py."""

import json
import os
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
RUN = f"/shared/runs/hapo/{RECIPE}"
#: the submitting shell's variables that decide what submit does
SHELL_VARS = ("HAPO_OUTPUT_DIR", "HAPO_DATA_DIR", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
              "VERL_FILE_LOGGER_PATH", "VERL_FILE_LOGGER_ROOT", "TENSORBOARD_DIR")


def split_dry_run(stdout: str):
    config_part, _, rest = stdout.partition("# ---- outputs ----")
    outputs_part, _, ray_part = rest.partition("# ---- Ray ----")
    config_text = config_part.split("----\n", 1)[1]
    return yaml.safe_load(config_text), yaml.safe_load(outputs_part), ray_part


def clean_env(home: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in SHELL_VARS and not k.startswith(ray_submit.FORWARD_PREFIXES)}
    return {**env, "HOME": str(home), **extra}


def write_token(home: Path) -> Path:
    path = home / ".ray" / "auth_token"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("the-cluster-token")
    return path


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    token = write_token(home)
    env = clean_env(home, HAPO_DATA_DIR="/shared/hapo", HAPO_OUTPUT_DIR="/shared/runs/", WANDB_API_KEY="s3cret",
                    WANDB_ENTITY="team", WANDB_RUN_GROUP="g1", TENSORBOARD_DIR="tensorboard_log")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "submit.sh"), RECIPE, "--dry-run", "--address",
                           "http://10.1.2.3:8265", "trainer.total_training_steps=3",
                           "trainer.rollout_data_dir=rollouts"],
                          capture_output=True, text=True, timeout=300, env=env, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, proc.stderr, token


def test_dry_run_prints_the_fully_resolved_config(dry_run):
    dry_run = dry_run[0]
    config, _, _ = split_dry_run(dry_run)
    assert config["recipe"]["name"] == RECIPE and config["trainer"]["experiment_name"] == RECIPE
    assert config["trainer"]["total_training_steps"] == 3  # the override
    assert config["data"]["train_files"] == "/shared/hapo/dapo-math-17k.parquet"  # resolved with HAPO_DATA_DIR
    assert config["reward"]["reward_kwargs"]["max_resp_len"] == 10240
    assert config["algorithm"]["adv_estimator"] == "hapo"
    # launcher-owned keys are filled as at start-up (prepare_config ran)
    assert config["actor_rollout_ref"]["rollout"]["agent"]["agent_loop_config_path"].endswith("agent_loops.yaml")
    assert "${" not in dry_run.split("# ---- Ray ----")[0]
    # the output paths are in the config the job runs
    assert config["trainer"]["output_dir"] == "/shared/runs"
    assert config["trainer"]["default_local_dir"] == f"{RUN}/checkpoints"
    assert config["trainer"]["rollout_data_dir"] == f"{RUN}/rollouts"


def test_dry_run_shows_the_paths_the_cluster_uses(dry_run):
    stdout, stderr, _ = dry_run
    _, outputs, _ = split_dry_run(stdout)
    assert outputs["output_root"] == "/shared/runs" and outputs["run_dir"] == RUN
    assert outputs["config"] == {"trainer.output_dir": "/shared/runs",
                                 "trainer.default_local_dir": f"{RUN}/checkpoints",
                                 "trainer.rollout_data_dir": f"{RUN}/rollouts",
                                 "global_profiler.save_path": f"{RUN}/outputs/profile"}
    assert outputs["env"] == {"VERL_FILE_LOGGER_PATH": f"{RUN}/metrics.jsonl", "TENSORBOARD_DIR": f"{RUN}/tensorboard",
                              "WANDB_DIR": RUN, "SWANLAB_LOG_DIR": f"{RUN}/swanlog",
                              "MLFLOW_TRACKING_URI": f"sqlite:///{RUN}/mlruns.db"}
    assert outputs["hapo_state"] == f"{RUN}/checkpoints/global_step_N/hapo_state.json"
    assert f"resumes from {RUN}/checkpoints" in stdout
    # the relative TENSORBOARD_DIR of the shell is not forwarded, and that is said
    assert "TENSORBOARD_DIR=tensorboard_log in your environment is not forwarded" in stderr


def test_dry_run_prints_runtime_env_and_ray_commands(dry_run):
    stdout, _, token = dry_run
    _, _, ray_part = split_dry_run(stdout)
    assert "# layout: 4 node(s) x 8 GPU(s)" in ray_part
    assert ("RAY_AUTH_MODE=token ray start --head --node-ip-address=HEAD_IP --port=6379 --dashboard-host=HEAD_IP "
            "--dashboard-port=8265 --num-gpus=8 --disable-usage-stats") in ray_part
    assert "0.0.0.0" not in ray_part
    assert "RAY_AUTH_MODE=token ray start --address=HEAD_IP:6379 --num-gpus=8" in ray_part and "nodes 2..4" in ray_part
    assert f"# auth: RAY_AUTH_MODE=token, token from {token}" in ray_part
    submit = next(line for line in ray_part.splitlines() if "ray job submit" in line)
    argv = shlex.split(submit)
    assert argv[:6] == ["RAY_AUTH_MODE=token", "ray", "job", "submit", "--address", "http://10.1.2.3:8265"]
    env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert env["pip"]["packages"] == ["${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}/wheels/hapo_verl-0.1.0-py3-none-any.whl"]
    assert env["env_vars"]["HAPO_DATA_DIR"] == "/shared/hapo"
    assert env["env_vars"]["WANDB_API_KEY"] == "***" and "s3cret" not in stdout
    # every WANDB_* of the shell travels (WANDB_DIR is the run's)
    assert env["env_vars"]["WANDB_ENTITY"] == "team" and env["env_vars"]["WANDB_RUN_GROUP"] == "g1"
    assert env["env_vars"]["WANDB_DIR"] == RUN and env["env_vars"]["VERL_FILE_LOGGER_PATH"] == f"{RUN}/metrics.jsonl"
    assert env["env_vars"]["TENSORBOARD_DIR"] == f"{RUN}/tensorboard"
    assert "the-cluster-token" not in stdout and not any(k.startswith("RAY_AUTH") for k in env["env_vars"])
    assert argv[argv.index("--") + 1:] == [
        "python", "-m", "hapo_verl.cli", "train", "--recipe", RECIPE, "--recipes-dir", "recipes",
        "trainer.total_training_steps=3", "trainer.output_dir=/shared/runs",
        f"trainer.default_local_dir={RUN}/checkpoints", f"trainer.rollout_data_dir={RUN}/rollouts",
        f"global_profiler.save_path={RUN}/outputs/profile"]


def test_bad_override_fails_before_anything_is_submitted(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hapo_verl.cli", "submit", "--recipe", RECIPE, "--dry-run",
                           "hapo.temperature_tau=2"], capture_output=True, text=True, timeout=300,
                          env=clean_env(tmp_path, HAPO_OUTPUT_DIR="/shared/runs"))
    assert proc.returncode != 0 and "hapo.temperature_tau must be in [0, 1)" in proc.stderr


def test_install_variants():
    env = ray_submit.runtime_env("pip:hapo-verl==0.1.0", None, {}, "/stage")
    assert env["pip"]["packages"] == ["hapo-verl==0.1.0"] and env["working_dir"] == "/stage"
    assert "pip" not in ray_submit.runtime_env("none", None, {}, "/stage")
    with pytest.raises(ValueError, match="--install"):
        ray_submit.runtime_env("conda", None, {}, "/stage")


class FakeRay:
    """Stands in for subprocess.run: answers ``ray --version`` with ``version``, records ``ray job submit`` (argv,
    environment, staged working_dir), passes anything else (pip wheel) to the real subprocess.run."""

    def __init__(self, monkeypatch, version="2.60.0"):
        self.version, self.submits, self.version_calls = version, [], 0
        self.real_run = subprocess.run
        monkeypatch.setattr(ray_submit.subprocess, "run", self)

    def __call__(self, cmd, *args, **kwargs):
        if cmd[1:] == ["--version"]:
            self.version_calls += 1
            return subprocess.CompletedProcess(cmd, 0, stdout=f"ray, version {self.version}\n", stderr="")
        if cmd[1:3] == ["job", "submit"]:
            env = json.loads(cmd[cmd.index("--runtime-env-json") + 1])
            record = {"cmd": cmd, "env": env, "process_env": kwargs.get("env")}
            stage = Path(env["working_dir"])
            record["recipes"] = sorted(p.name for p in (stage / "recipes").glob("*.yaml"))
            record["models"] = sorted(p.name for p in (stage / "recipes" / "model").glob("*.yaml"))
            wheels = sorted((stage / "wheels").glob("*.whl"))
            if wheels:
                with zipfile.ZipFile(wheels[0]) as archive:
                    record["entry_points"] = next(archive.read(n).decode() for n in archive.namelist()
                                                  if n.endswith("entry_points.txt"))
                    record["names"] = archive.namelist()
                record["wheel"] = wheels[0].name
            self.submits.append(record)
            return subprocess.CompletedProcess(cmd, 0)
        return self.real_run(cmd, *args, **kwargs)


@pytest.fixture
def shell(monkeypatch, tmp_path):
    """A submitting shell without the variables submit reads, HOME in tmp_path (no token yet)."""
    for key in list(os.environ):
        if key in SHELL_VARS or key.startswith(ray_submit.FORWARD_PREFIXES):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))
    return monkeypatch


def submit(*args: str) -> int:
    return ray_submit.main(["--recipe", RECIPE, "--recipes-dir", str(REPO / "recipes"), "--address", "http://h:8265",
                            "--no-validate", *args])


def test_submit_stages_recipes_and_a_wheel_with_the_plugin_entry_point(shell, tmp_path):
    """Without --dry-run: the staged working_dir holds recipes/ and a wheel of hapo-verl whose entry point
    ``verl.plugins: hapo`` is what registers HAPO in every Ray worker; ``ray job submit`` gets that dir."""
    shell.setenv("HAPO_OUTPUT_DIR", "/shared/runs")
    write_token(tmp_path)
    fake = FakeRay(shell)
    rc = submit("--no-wait")
    assert rc == 0 and len(fake.submits) == 1
    call = fake.submits[0]
    assert f"{RECIPE}.yaml" in call["recipes"] and "tiny_cpu.yaml" in call["recipes"]
    assert "qwen3_8b_base.yaml" in call["models"]
    assert call["wheel"].startswith("hapo_verl-") and call["env"]["pip"]["packages"][0].endswith(call["wheel"])
    assert "[verl.plugins]" in call["entry_points"] and "hapo = hapo_verl.plugin" in call["entry_points"]
    assert "hapo_verl/conf/hapo.yaml" in call["names"] and "hapo_verl/tools/reward.py" in call["names"]
    assert "hapo_verl/sampling/cpu_kernel.c" in call["names"]  # built on first use where the wheel is installed
    assert "--no-wait" in call["cmd"] and Path(call["cmd"][0]).name == "ray"


def test_submit_sends_the_token_by_auth_mode_not_in_the_job_env(shell, tmp_path, capsys):
    """``ray job submit`` runs with RAY_AUTH_MODE=token (Ray then reads the token file and sends it as a header);
    the token itself never enters the runtime env, which anyone allowed to read the job can see."""
    shell.setenv("HAPO_OUTPUT_DIR", "/shared/runs")
    shell.setenv("RAY_AUTH_TOKEN", "tok-from-env")
    shell.setenv("WANDB_API_KEY", "wandb-secret")
    shell.setenv("WANDB_TAGS", "a,b")
    fake = FakeRay(shell)
    assert submit("--install", "none") == 0 and fake.version_calls == 1
    call = fake.submits[0]
    assert call["process_env"]["RAY_AUTH_MODE"] == "token" and call["process_env"]["RAY_AUTH_TOKEN"] == "tok-from-env"
    assert "tok-from-env" not in json.dumps(call["env"]) and "RAY_AUTH_TOKEN" not in call["env"]["env_vars"]
    assert call["env"]["env_vars"]["WANDB_API_KEY"] == "wandb-secret" and call["env"]["env_vars"]["WANDB_TAGS"] == "a,b"
    out = capsys.readouterr().out
    assert "RAY_AUTH_MODE=token ray job submit" in out and "wandb-secret" not in out and "tok-from-env" not in out
    # the job's command line carries the output paths
    assert f"trainer.default_local_dir={RUN}/checkpoints" in call["cmd"]
    assert call["env"]["env_vars"]["VERL_FILE_LOGGER_PATH"] == f"{RUN}/metrics.jsonl"


def test_submit_refuses_without_a_token_or_with_an_old_ray(shell, tmp_path, capsys):
    shell.setenv("HAPO_OUTPUT_DIR", "/shared/runs")
    fake = FakeRay(shell)
    assert submit("--install", "none") == 2 and fake.submits == []
    assert "no Ray auth token here" in capsys.readouterr().err
    shell.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    assert submit("--install", "none") == 2 and "RAY_AUTH_TOKEN_PATH" in capsys.readouterr().err
    shell.delenv("RAY_AUTH_TOKEN_PATH")
    write_token(tmp_path)
    fake.version = "2.51.0"
    assert submit("--install", "none") == 2 and fake.submits == []
    assert "needs Ray >= 2.52" in capsys.readouterr().err
    shell.setenv("RAY_AUTH_MODE", "disabled")
    fake.version = "2.60.0"
    assert submit("--install", "none") == 2 and fake.submits == []
    err = capsys.readouterr().err
    assert "RAY_AUTH_MODE=disabled" in err and "--no-auth" in err
    with pytest.raises(SystemExit):
        submit("--install", "none", "--env", "RAY_AUTH_TOKEN=x")
    assert fake.submits == []


def test_no_auth_is_explicit_and_warned(shell, tmp_path, capsys):
    shell.setenv("HAPO_OUTPUT_DIR", "/shared/runs")
    fake = FakeRay(shell)
    assert submit("--install", "none", "--no-auth") == 0
    assert fake.submits[0]["process_env"]["RAY_AUTH_MODE"] == "disabled" and fake.version_calls == 0
    assert "WARNING: --no-auth" in capsys.readouterr().err


@pytest.mark.parametrize("setting,message", [
    ({}, "needs an output root that every node sees"),
    ({"HAPO_OUTPUT_DIR": "runs"}, "$HAPO_OUTPUT_DIR='runs' is relative"),
    ({"HAPO_OUTPUT_DIR": "~/runs"}, "is relative"),
    ({"override": "trainer.output_dir=runs"}, "trainer.output_dir='runs' is relative"),
    ({"HAPO_OUTPUT_DIR": "/shared/runs", "override": "trainer.experiment_name=a/b"}, "trainer.experiment_name='a/b'"),
    ({"HAPO_OUTPUT_DIR": "/shared/runs", "override": "trainer.default_local_dir=../../elsewhere"},
     "leaves the run directory"),
    ({"HAPO_OUTPUT_DIR": "/shared/runs", "env": "VERL_FILE_LOGGER_PATH=/x.jsonl"}, "submit sets VERL_FILE_LOGGER_PATH"),
    ({"HAPO_OUTPUT_DIR": "/shared/runs", "WANDB_DIR": "wandb"}, "WANDB_DIR='wandb' is relative"),
])
def test_output_root_is_required_and_absolute(shell, tmp_path, capsys, setting, message):
    """Refused before anything is built or sent, dry run included, with the key / variable to set."""
    write_token(tmp_path)
    setting = dict(setting)
    args = [setting.pop("override")] if "override" in setting else []
    if "env" in setting:
        args += ["--env", setting.pop("env")]
    for key, value in setting.items():
        shell.setenv(key, value)
    fake = FakeRay(shell)
    for extra in ([], ["--dry-run"]):
        assert submit("--install", "none", *extra, *args) == 2
        err = capsys.readouterr().err
        assert message in err, err
    if not setting:
        assert "trainer.output_dir=" in err and "HAPO_OUTPUT_DIR=" in err
    assert fake.submits == [] and fake.version_calls == 0


def test_two_experiments_never_share_a_path_and_a_rerun_resumes(shell):
    """Paths of two experiment names are disjoint; the same name gives the same paths (verl's auto-resume)."""
    from hapo_verl.tools.recipes import resolve_recipe

    shell.setenv("HAPO_OUTPUT_DIR", "/shared/runs")
    root, name = resolve_recipe(RECIPE, REPO / "recipes")

    def paths(*overrides):
        layout = ray_submit.output_layout(ray_submit.compose(name, list(overrides), root), dict(os.environ), {})
        found = {k: v for k, v in layout.overrides.items() if k != "trainer.output_dir"}
        found.update({k: v.replace("sqlite:///", "") for k, v in layout.env.items()})
        return found

    a, b = paths("trainer.experiment_name=a"), paths("trainer.experiment_name=b")
    assert a["trainer.default_local_dir"] == "/shared/runs/hapo/a/checkpoints"
    assert set(a) == set(b)
    for x in a.values():
        for y in b.values():
            assert x != y and not y.startswith(x.rstrip("/") + "/") and not x.startswith(y.rstrip("/") + "/"), (x, y)
    assert paths("trainer.experiment_name=a") == a
    assert paths("trainer.project_name=p2", "trainer.experiment_name=a")["VERL_FILE_LOGGER_PATH"] == \
        "/shared/runs/p2/a/metrics.jsonl"


def test_output_layout_rules():
    from omegaconf import OmegaConf

    def config(**trainer):
        return OmegaConf.create({"trainer": {"output_dir": None, "project_name": "p", "experiment_name": "e",
                                             "default_local_dir": "checkpoints/p/e", "rollout_data_dir": None,
                                             "validation_data_dir": None, **trainer},
                                 "global_profiler": {"save_path": "outputs/profile"}})

    env = {"HAPO_OUTPUT_DIR": "/r"}
    layout = ray_submit.output_layout(config(), env, {})
    assert layout.run_dir == "/r/p/e" and layout.root_source == "$HAPO_OUTPUT_DIR"
    assert layout.overrides == {"trainer.output_dir": "/r", "trainer.default_local_dir": "/r/p/e/checkpoints",
                                "global_profiler.save_path": "/r/p/e/outputs/profile"}
    # the key wins over the variable; absolute paths given by the user are kept, relative ones go in the run dir
    layout = ray_submit.output_layout(config(output_dir="/k", default_local_dir="/ckpt/e", validation_data_dir="val"),
                                      env, {})
    assert layout.root == "/k" and layout.overrides["trainer.default_local_dir"] == "/ckpt/e"
    assert layout.overrides["trainer.validation_data_dir"] == "/k/p/e/val"
    with pytest.raises(ray_submit.SubmitError, match="'~' is the home directory"):
        ray_submit.output_layout(config(rollout_data_dir="~/dumps"), env, {})
    # loggers' own locations: owned ones are not taken from the shell (said in a note); absolute user ones kept
    shell_env = {**env, "VERL_FILE_LOGGER_PATH": "/shared/all.jsonl", "WANDB_DIR": "/wandb",
                 "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    layout = ray_submit.output_layout(config(), shell_env, {})
    assert layout.env["VERL_FILE_LOGGER_PATH"] == "/r/p/e/metrics.jsonl" and "VERL_FILE_LOGGER_PATH=/shared/all.jsonl" \
        in layout.notes[0]
    assert layout.env["WANDB_DIR"] == "/wandb" and layout.env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    with pytest.raises(ray_submit.SubmitError, match="MLFLOW_TRACKING_URI"):
        ray_submit.output_layout(config(), {**env, "MLFLOW_TRACKING_URI": "sqlite:///mlruns.db"}, {})
    # the user's overrides of these keys are replaced by the derived ones, the others kept in order
    assert ray_submit.job_overrides(["trainer.default_local_dir=x", "a.b=1", "+trainer.output_dir=/r"], layout) == [
        "a.b=1", "trainer.output_dir=/r", "trainer.default_local_dir=/r/p/e/checkpoints",
        "global_profiler.save_path=/r/p/e/outputs/profile"]


def test_forwarded_env():
    environ = {"HAPO_DATA_DIR": "/d", "HF_TOKEN": "hf", "WANDB_API_KEY": "k", "WANDB_PROJECT": "p", "WANDB_DIR": "/w",
               "WANDB_X": "", "SWANLAB_API_KEY": "s", "MLFLOW_TRACKING_URI": "http://m", "RAY_AUTH_TOKEN": "t",
               "TENSORBOARD_DIR": "/tb", "HOME": "/home/u", "HAPO_OUTPUT_DIR": "/r"}
    assert ray_submit.forwarded_env(environ) == {"HAPO_DATA_DIR": "/d", "HF_TOKEN": "hf", "SWANLAB_API_KEY": "s",
                                                 "WANDB_API_KEY": "k", "WANDB_PROJECT": "p"}
    redacted = ray_submit._redacted({"env_vars": {"HF_TOKEN": "hf", "WANDB_API_KEY": "k", "WANDB_PROJECT": "p"}})
    assert redacted["env_vars"] == {"HF_TOKEN": "***", "WANDB_API_KEY": "***", "WANDB_PROJECT": "p"}
