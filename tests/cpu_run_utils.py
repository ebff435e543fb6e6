"""Run verl's trainer (or any launcher) on CPU in a subprocess, with a timeout and full cleanup.

Shared by the CPU end-to-end tests. The child runs in its own process group with its own Ray temp dir; on
exit or timeout the group is killed and any leftover process of that Ray session (found by its temp dir in
/proc/*/cmdline) is killed by pid. Nothing else is touched.

    from cpu_run_utils import grpo_smoke_overrides, run_verl   # tests/ is on sys.path under pytest
    res = run_verl(grpo_smoke_overrides(assets, steps=2), timeout=240)
    assert res.rc == 0, res.tail()
    assert {1, 2} <= set(res.step_metrics)
"""

# no ``from __future__ import annotations``: verl loads reward files by path without registering them in
# sys.modules, and @dataclass needs that module entry to resolve string annotations.
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

_STEP_LINE = re.compile(r"(?:^|\s)step:(\d+) - (.*)$")


@dataclass
class RunResult:
    rc: Optional[int]
    output: str
    elapsed_s: float
    timed_out: bool
    cmd: list[str]
    log_path: Optional[str] = None
    #: step -> {metric: float} parsed from verl's console logger lines "step:N - key:value - ..."
    step_metrics: dict[int, dict[str, float]] = field(default_factory=dict)

    def tail(self, n: int = 80) -> str:
        return "\n".join(self.output.splitlines()[-n:])


def parse_step_metrics(output: str) -> dict[int, dict[str, float]]:
    steps: dict[int, dict[str, float]] = {}
    for line in output.splitlines():
        m = _STEP_LINE.search(line)
        if not m:
            continue
        metrics = steps.setdefault(int(m.group(1)), {})
        for item in m.group(2).split(" - "):
            key, sep, value = item.rpartition(":")
            if not sep:
                continue
            try:
                metrics[key.strip()] = float(value)
            except ValueError:
                continue
    return steps


def cpu_subprocess_env(extra: Optional[dict] = None) -> dict[str, str]:
    """The current environment + :func:`hapo_verl.cpu.cpu_env` + quieter Ray logs + ``extra``."""
    from hapo_verl.cpu import cpu_env

    env = dict(os.environ)
    env.update(cpu_env())
    env.setdefault("RAY_DEDUP_LOGS", "0")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def grpo_smoke_overrides(assets, steps: int = 2, n: int = 2, batch_size: int = 4,
                         extra: Sequence[str] = ()) -> list[str]:
    """Plain-verl GRPO on the tiny task: CPU backend overrides + tiny batch sizes + console logging."""
    from hapo_verl.cpu import cpu_overrides

    return [
        *cpu_overrides(assets),
        "algorithm.adv_estimator=grpo",
        f"data.train_batch_size={batch_size}",
        f"actor_rollout_ref.rollout.n={n}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={batch_size}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={batch_size * n}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={batch_size * n}",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.actor.optim.lr=1e-3",
        "trainer.logger=[console]",
        "trainer.val_before_train=False",
        f"trainer.total_training_steps={steps}",
        "trainer.save_freq=-1",
        "trainer.test_freq=-1",
        "trainer.project_name=hapo_cpu_test",
        "trainer.experiment_name=smoke",
        *extra,
    ]


def _kill_session_leftovers(marker: str) -> list[int]:
    """Kill (by pid) processes whose command line mentions ``marker`` (our private Ray temp dir)."""
    killed = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
            except OSError:
                pass
    return killed


def run_verl(
    overrides: Sequence[str],
    timeout: float = 240,
    module: str = "verl.trainer.main_ppo",
    env_extra: Optional[dict] = None,
    log_path: Optional[str | os.PathLike] = None,
    cwd: Optional[str | os.PathLike] = None,
) -> RunResult:
    """``python -m <module> <overrides>`` on CPU; returns rc (None on timeout), output, parsed step metrics.

    A private Ray temp dir (``+ray_kwargs.ray_init._temp_dir``) isolates the run from other Ray users.
    """
    ray_tmp = tempfile.mkdtemp(prefix="rhv", dir="/tmp")  # short: Ray's unix socket paths are length-limited
    run_dir = cwd or tempfile.mkdtemp(prefix="hapo_cpu_run_")
    cmd = [PYTHON, "-m", module, *overrides, f"+ray_kwargs.ray_init._temp_dir={ray_tmp}"]
    env = cpu_subprocess_env(env_extra)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=str(run_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            output, _ = proc.communicate(timeout=15)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            output, _ = proc.communicate()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # Ray processes left in the child's group
        except (ProcessLookupError, PermissionError):
            pass
        _kill_session_leftovers(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    elapsed = time.monotonic() - start
    output = output or ""
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        Path(log_path).write_text(output)
    return RunResult(rc=None if timed_out else proc.returncode, output=output, elapsed_s=elapsed,
                     timed_out=timed_out, cmd=cmd, log_path=None if log_path is None else str(log_path),
                     step_metrics=parse_step_metrics(output))


# ---------------------------------------------------------------------------------------------------------
# A reward function for e2e tests (``reward.custom_reward_function.path=<this file>``): the tiny task's score,
# plus a record of what verl handed to it. verl's naive reward manager merges the agent-loop output's
# ``extra_fields`` into ``extra_info``, so this shows rollout extra fields reaching the trainer side.
# ---------------------------------------------------------------------------------------------------------
REWARD_LOG_ENV = "HAPO_TEST_REWARD_LOG"


def recording_compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    import json

    from hapo_verl.sampling.request import TOKEN_TEMPERATURES_KEY
    from hapo_verl.cpu.reward import compute_score

    path = os.environ.get(REWARD_LOG_ENV)
    if path:
        temps = (extra_info or {}).get(TOKEN_TEMPERATURES_KEY)
        record = {"data_source": data_source, "temperatures": None if temps is None else [float(t) for t in temps],
                  "global_steps": (extra_info or {}).get("global_steps")}
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    return compute_score(data_source, solution_str, ground_truth, extra_info)
