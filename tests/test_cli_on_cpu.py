"""The ``hapo-verl`` command as a new user meets it: help, typos, the console policy, where reports go."""

import os
import subprocess
import sys

import pytest

from hapo_verl import cli
from hapo_verl.conf import config_names


def hapo_verl(*args, env=None, timeout=120):
    proc = subprocess.run([sys.executable, "-m", "hapo_verl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("args", [[], ["--help"], ["-h"]])
def test_help_lists_every_subcommand_with_an_example(args):
    rc, out, err = hapo_verl(*args)
    assert rc == 0, err
    for name in cli.COMMANDS:
        assert f"\n  {name} " in out, name
    assert out.count("    e.g. ") == len(cli.COMMANDS) and "hapo-verl tiny --config dapo" in out
    assert len(out.splitlines()) < 40  # not Hydra's dump of verl's whole config


def test_every_subcommand_has_its_own_help():
    for name in cli.COMMANDS:
        rc, out, err = hapo_verl(name, "--help")
        assert rc == 0, (name, err[-2000:])
        assert "usage" in out.lower() and len(out.splitlines()) < 80, name


@pytest.mark.parametrize("typo, suggestion", [("trian", "train"), ("tinny", "tiny"), ("sumbit", "submit")])
def test_mistyped_subcommand_gets_did_you_mean(typo, suggestion):
    rc, out, err = hapo_verl(typo)
    assert rc == 2 and f"unknown subcommand {typo!r}, did you mean {suggestion!r}?" in err


def test_tiny_help_lists_configs_and_overrides():
    rc, out, _ = hapo_verl("tiny", "--help")
    assert rc == 0
    assert ", ".join(config_names()) in out
    assert "key=value" in out and "--verbose" in out


def test_tiny_rejects_an_unknown_option_before_anything_runs():
    rc, _, err = hapo_verl("tiny", "--config", "hapo", "--vebrose")
    assert rc == 2 and "unknown argument '--vebrose', did you mean --verbose?" in err
    rc, _, err = hapo_verl("tiny", "--steps", "0")
    assert rc == 2 and "--steps must be >= 1" in err


def test_overrides_first_still_mean_train():
    assert cli.is_override("algorithm.adv_estimator=hapo") and cli.is_override("+a.b=1") and cli.is_override("~a")
    assert not cli.is_override("--config-name=hapo") and not cli.is_override("train")


# ------------------------------------------------------------------------------------------------ console
def _engine_warning_lines(env):
    code = "import verl.workers.engine"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in {**os.environ, **env}.items() if v is not None})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sum("engine is not available" in line for line in proc.stderr.splitlines())


def test_quiet_environment_silences_verls_engine_warnings_in_a_new_process():
    from hapo_verl.console import quiet_env

    loud = _engine_warning_lines({"PYTHONWARNINGS": None})
    quiet = _engine_warning_lines({"PYTHONWARNINGS": None, **quiet_env(False)})
    verbose = _engine_warning_lines({"PYTHONWARNINGS": None, **quiet_env(True)})
    assert loud > 0 and verbose == loud  # verl still warns: otherwise drop the filter
    assert quiet == 0


def test_quiet_environment_keeps_the_users_own_warning_filters(monkeypatch):
    from hapo_verl.console import QUIET_PYTHONWARNINGS, quiet_env

    monkeypatch.setenv("PYTHONWARNINGS", "error::DeprecationWarning")
    monkeypatch.setenv("VERL_LOGGING_LEVEL", "DEBUG")
    env = quiet_env(False)
    assert env["PYTHONWARNINGS"].split(",") == ["error::DeprecationWarning", *QUIET_PYTHONWARNINGS]
    assert env["VERL_LOGGING_LEVEL"] == "DEBUG"
    assert quiet_env(True) == {"HAPO_VERL_VERBOSE": "1"}


def test_cpu_runs_ask_transfer_queue_for_no_more_threads_than_cores():
    from hapo_verl.cpu import cpu_env, physical_cores

    assert 1 <= int(cpu_env()["TQ_NUM_THREADS"]) <= min(8, physical_cores())


# ----------------------------------------------------------------------------------------- bench-learning
def test_bench_learning_report_goes_under_runs_and_never_into_docs_by_default(tmp_path):
    from hapo_verl import bench_learning as bl

    parser = bl._parser()
    args = parser.parse_args(["--out", str(tmp_path / "runs")])
    assert bl.report_path(args, parser) == str(tmp_path / "runs" / "results.md")
    args = parser.parse_args(["--report", "docs/results.md"])
    with pytest.raises(SystemExit):
        bl.report_path(args, parser)
    args = parser.parse_args(["--report", "docs/results_addition.md"])
    with pytest.raises(SystemExit):
        bl.report_path(args, parser)
    # each task with a committed report has its own: Countdown's is docs/results.md
    args = parser.parse_args(["--update-docs", "--task", "countdown"])
    assert bl.report_path(args, parser) == os.path.join(bl.DOCS, "results.md")
    args = parser.parse_args(["--update-docs"])
    assert bl.report_path(args, parser) == os.path.join(bl.DOCS, "results_addition.md")


def test_train_help_example_passes_every_start_up_check():
    import shlex

    from hapo_verl.launcher import compose, validate

    text = cli.TRAIN_HELP.split("examples:\n", 1)[1].split("\n  hapo-verl train --config-name", 1)[0]
    words = shlex.split(text.replace("\\\n", " ").replace("$PWD", "/data"))
    assert words[:2] == ["hapo-verl", "train"]
    validate(compose("hapo", words[2:]))
