"""scripts/ray_head.sh and scripts/ray_worker.sh without a cluster: --dry-run in any position prints the exact
command with the environment it sets and runs nothing (a fake ``ray`` records every call), the GPU count with and
without nvidia-smi, token authentication on by default, the --no-auth / --dashboard-host opt-outs and their
warnings, and the refusals of a real start (old Ray, no token on a worker)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hapo_verl.tools import ray_submit

REPO = Path(__file__).resolve().parents[1]
HEAD_SH = REPO / "scripts" / "ray_head.sh"
WORKER_SH = REPO / "scripts" / "ray_worker.sh"
BASH = shutil.which("bash")
#: the only programs the scripts may find: no nvidia-smi, no real ray
TOOLS = ("awk", "grep", "sed", "env", "hostname", "cat", "mkdir")

FAKE_RAY = """#!{bash}
echo "RAY_AUTH_MODE=${{RAY_AUTH_MODE:-}} $*" >> "{log}"
if [[ "$1" == "--version" ]]; then echo "ray, version {version}"; exit 0; fi
if [[ "$1" == "get-auth-token" ]]; then mkdir -p "$HOME/.ray"; printf tok > "$HOME/.ray/auth_token"; echo tok; fi
exit 0
"""


class Sandbox:
    def __init__(self, root: Path, ray_version: str = "2.60.0"):
        self.bin = root / "bin"
        self.bin.mkdir()
        for tool in TOOLS:
            os.symlink(shutil.which(tool), self.bin / tool)
        self.log = root / "ray_calls.log"
        self.home = root / "home"
        self.home.mkdir()
        fake = self.bin / "ray"
        fake.write_text(FAKE_RAY.format(bash=BASH, log=self.log, version=ray_version))
        fake.chmod(0o755)

    def nvidia_smi(self, text: str, rc: int = 0) -> None:
        fake = self.bin / "nvidia-smi"
        fake.write_text(f"#!{BASH}\ncat <<'EOF'\n{text}\nEOF\nexit {rc}\n")
        fake.chmod(0o755)

    def token(self) -> Path:
        path = self.home / ".ray" / "auth_token"
        path.parent.mkdir(exist_ok=True)
        path.write_text("secret-token")
        return path

    def run(self, script: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
        full_env = {"PATH": str(self.bin), "HOME": str(self.home), **env}
        return subprocess.run([BASH, str(script), *args], capture_output=True, text=True, env=full_env, timeout=60)

    def ray_calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture
def box(tmp_path):
    return Sandbox(tmp_path)


HEAD_CMD = ("RAY_AUTH_MODE=token ray start --head --node-ip-address=10.0.0.1 --port=6379 --dashboard-host=10.0.0.1 "
            "--dashboard-port=8265 --num-gpus=8 --disable-usage-stats")


def test_sandbox_has_no_nvidia_smi_and_only_the_fake_ray(box):
    proc = subprocess.run([BASH, "-c", "command -v nvidia-smi; command -v ray"], capture_output=True, text=True,
                          env={"PATH": str(box.bin)})
    assert proc.stdout.strip() == str(box.bin / "ray")


@pytest.mark.parametrize("args", [["--dry-run"], ["--dry-run", "--dashboard-host", "10.0.0.1"],
                                  ["--dashboard-host=10.0.0.1", "--dry-run"]])
def test_head_dry_run_prints_the_command_with_its_env_and_runs_nothing(box, args):
    box.token()
    proc = box.run(HEAD_SH, *args, HEAD_IP="10.0.0.1", NUM_GPUS="8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [HEAD_CMD]
    assert f"token: {box.home}/.ray/auth_token" in proc.stderr and "nothing was started" in proc.stderr
    assert box.ray_calls() == []


def test_head_dry_run_without_a_token_shows_the_token_generation(box):
    proc = box.run(HEAD_SH, "--dry-run", HEAD_IP="10.0.0.1", NUM_GPUS="8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["RAY_AUTH_MODE=token ray get-auth-token --generate >/dev/null", HEAD_CMD]
    assert box.ray_calls() == [] and not (box.home / ".ray").exists()


def test_head_binds_the_dashboard_to_the_cluster_address_from_hostname(box):
    fake = box.bin / "hostname"
    fake.unlink()
    fake.write_text(f"#!{BASH}\n[[ \"$1\" == -I ]] && echo '10.9.8.7 fd00::7'\n")
    fake.chmod(0o755)
    proc = box.run(HEAD_SH, "--dry-run", NUM_GPUS="8")
    assert proc.returncode == 0, proc.stderr
    assert "--node-ip-address=10.9.8.7 " in proc.stdout and "--dashboard-host=10.9.8.7 " in proc.stdout
    assert "0.0.0.0" not in proc.stdout
    fake.write_text(f"#!{BASH}\nexit 1\n")
    proc = box.run(HEAD_SH, "--dry-run", NUM_GPUS="8")
    assert proc.returncode == 2 and "set HEAD_IP" in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("args", [["--no-auth", "--dry-run"], ["--dry-run", "--no-auth"]])
def test_head_opt_out_of_auth_is_explicit_and_warned(box, args):
    proc = box.run(HEAD_SH, *args, HEAD_IP="10.0.0.1", NUM_GPUS="8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [HEAD_CMD.replace("RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled")]
    assert "WARNING: --no-auth" in proc.stderr and "run any code on every node" in proc.stderr
    assert box.ray_calls() == []


def test_head_dashboard_on_every_interface_is_warned(box):
    box.token()
    proc = box.run(HEAD_SH, "--dashboard-host", "0.0.0.0", "--dry-run", HEAD_IP="10.0.0.1", NUM_GPUS="8")
    assert proc.returncode == 0, proc.stderr
    assert "--dashboard-host=0.0.0.0 " in proc.stdout and "RAY_AUTH_MODE=token " in proc.stdout
    assert "WARNING: --dashboard-host 0.0.0.0" in proc.stderr


def test_auth_mode_disabled_in_the_environment_needs_the_flag(box):
    for script, args in ((HEAD_SH, ["--dry-run"]), (WORKER_SH, ["10.0.0.1", "--dry-run"])):
        proc = box.run(script, *args, HEAD_IP="10.0.0.1", NUM_GPUS="8", RAY_AUTH_MODE="disabled")
        assert proc.returncode == 2 and "RAY_AUTH_MODE=disabled" in proc.stderr and "--no-auth" in proc.stderr
        assert proc.stdout == ""


@pytest.mark.parametrize("args", [["10.0.0.1", "--dry-run"], ["--dry-run", "10.0.0.1"],
                                  ["--dry-run", "10.0.0.1:6379"]])
def test_worker_dry_run_flag_in_any_position(box, args):
    box.token()
    proc = box.run(WORKER_SH, *args, NUM_GPUS="8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "RAY_AUTH_MODE=token ray start --address=10.0.0.1:6379 --num-gpus=8 --disable-usage-stats"]
    assert box.ray_calls() == []


def test_worker_no_auth_and_head_address_env(box):
    proc = box.run(WORKER_SH, "--no-auth", "--dry-run", HEAD_ADDRESS="10.0.0.1:7000", NUM_GPUS="4",
                   NODE_IP="10.0.0.2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["RAY_AUTH_MODE=disabled ray start --address=10.0.0.1:7000 "
                                        "--node-ip-address=10.0.0.2 --num-gpus=4 --disable-usage-stats"]
    assert "WARNING: --no-auth" in proc.stderr and box.ray_calls() == []


def test_worker_usage_errors(box):
    for args, message in (([], "usage"), (["--dry-run"], "usage"), (["a", "b", "--dry-run"], "one head address"),
                          (["10.0.0.1", "--dryrun"], "unknown option '--dryrun'")):
        proc = box.run(WORKER_SH, *args)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert proc.stdout == ""
    proc = box.run(HEAD_SH, "--dryrun", HEAD_IP="10.0.0.1")
    assert proc.returncode == 2 and "unknown argument '--dryrun'" in proc.stderr
    assert box.ray_calls() == []


@pytest.mark.parametrize("script,args", [(HEAD_SH, ["--dry-run"]), (WORKER_SH, ["10.0.0.1", "--dry-run"])])
def test_gpu_count(box, script, args):
    box.token()
    # no nvidia-smi, no NUM_GPUS: Ray counts the GPUs itself, and the command says nothing wrong
    proc = box.run(script, *args, HEAD_IP="10.0.0.1")
    assert proc.returncode == 0, proc.stderr
    assert "--num-gpus" not in proc.stdout and "\n0" not in proc.stdout and len(proc.stdout.splitlines()) == 1
    assert "nvidia-smi not found" in proc.stderr
    # nvidia-smi -L: GPU lines counted, MIG lines not
    box.nvidia_smi("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\n  MIG 1g.10gb Device 0: (UUID: MIG-1)\n"
                   "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2)")
    proc = box.run(script, *args, HEAD_IP="10.0.0.1")
    assert proc.returncode == 0 and " --num-gpus=2 " in proc.stdout, proc.stderr
    assert box.run(script, *args, HEAD_IP="10.0.0.1", NUM_GPUS="3").stdout.count(" --num-gpus=3 ") == 1
    # a listing without GPU lines: 0, once (grep -c fails on no match: no second "0")
    box.nvidia_smi("No devices were found")
    proc = box.run(script, *args, HEAD_IP="10.0.0.1")
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 1 and " --num-gpus=0 " in proc.stdout
    # nvidia-smi present but failing, or a bad NUM_GPUS: refused, not a count of 0
    box.nvidia_smi("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", rc=9)
    proc = box.run(script, *args, HEAD_IP="10.0.0.1")
    assert proc.returncode == 2 and "set NUM_GPUS" in proc.stderr and proc.stdout == ""
    proc = box.run(script, *args, HEAD_IP="10.0.0.1", NUM_GPUS="eight")
    assert proc.returncode == 2 and "NUM_GPUS must be" in proc.stderr
    assert box.ray_calls() == []


def test_scripts_print_what_submit_dry_run_shows(box):
    """hapo-verl submit --dry-run lists the cluster commands: the scripts' own commands, word for word."""
    box.token()
    head, worker = ray_submit.cluster_commands(4, 8)
    assert box.run(HEAD_SH, "--dry-run", HEAD_IP="HEAD_IP", NUM_GPUS="8").stdout.strip() == head[0]
    assert box.run(WORKER_SH, "HEAD_IP", "--dry-run", NUM_GPUS="8").stdout.strip() == worker[0]
    head, worker = ray_submit.cluster_commands(4, 8, auth=False)
    assert box.run(HEAD_SH, "--no-auth", "--dry-run", HEAD_IP="HEAD_IP", NUM_GPUS="8").stdout.strip() == head[0]
    assert box.run(WORKER_SH, "HEAD_IP", "--dry-run", "--no-auth", NUM_GPUS="8").stdout.strip() == worker[0]
    assert box.ray_calls() == []


# ------------------------------------------------------------------------------------------------ real runs
def test_head_start_generates_a_token_then_starts_with_token_auth(box):
    proc = box.run(HEAD_SH, HEAD_IP="10.0.0.1", NUM_GPUS="8")
    assert proc.returncode == 0, proc.stderr
    assert box.ray_calls() == [
        "RAY_AUTH_MODE= --version",
        "RAY_AUTH_MODE=token get-auth-token --generate",
        "RAY_AUTH_MODE=token " + HEAD_CMD.split(" ray ", 1)[1],
    ]
    assert "tok\n" not in proc.stdout  # the token printed by get-auth-token does not reach the terminal
    assert "ssh -N -L 8265:10.0.0.1:8265" in proc.stdout and "bash scripts/ray_worker.sh 10.0.0.1:6379" in proc.stdout


def test_head_start_refuses_a_ray_without_token_auth(tmp_path):
    box = Sandbox(tmp_path, ray_version="2.51.0")
    proc = box.run(HEAD_SH, HEAD_IP="10.0.0.1", NUM_GPUS="8")
    assert proc.returncode == 2 and "needs Ray >= 2.52" in proc.stderr and "2.51" in proc.stderr
    assert box.ray_calls() == ["RAY_AUTH_MODE= --version"]  # neither the token nor the cluster


def test_worker_start_needs_the_heads_token(box):
    proc = box.run(WORKER_SH, "10.0.0.1", NUM_GPUS="8")
    assert proc.returncode == 2 and "no Ray auth token" in proc.stderr and "auth_token" in proc.stderr
    assert box.ray_calls() == []
    token = box.token()
    token.rename(box.home / "shared_token")
    proc = box.run(WORKER_SH, "10.0.0.1", NUM_GPUS="8", RAY_AUTH_TOKEN_PATH=str(box.home / "missing"))
    assert proc.returncode == 2 and "RAY_AUTH_TOKEN_PATH" in proc.stderr and box.ray_calls() == []
    proc = box.run(WORKER_SH, "10.0.0.1", NUM_GPUS="8", RAY_AUTH_TOKEN_PATH=str(box.home / "shared_token"))
    assert proc.returncode == 0, proc.stderr
    assert box.ray_calls()[-1] == ("RAY_AUTH_MODE=token start --address=10.0.0.1:6379 --num-gpus=8 "
                                   "--disable-usage-stats")
