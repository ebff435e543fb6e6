"""Registration through verl's ``verl.plugins`` entry point: every import order, re-entrancy, loud failure,
and visibility inside a local Ray worker."""

import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest


def run_python(code: str, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_entry_point_is_declared():
    names = {ep.name: ep.value for ep in entry_points(group="verl.plugins")}
    assert names.get("hapo") == "hapo_verl.plugin"


@pytest.mark.parametrize(
    "first_import",
    ["import verl", "import hapo_verl.config", "from hapo_verl.integration import loss",
     "from verl.trainer.ppo import core_algos", "import hapo_verl", "import hapo_verl.integration.estimator",
     "import hapo_verl.registry", "import hapo_verl.algorithms", "import hapo_verl.launcher",
     "import hapo_verl.trainer.hapo_trainer"],
)
def test_registered_whatever_the_import_order(first_import):
    code = f"""{first_import}
import verl
from verl.trainer.ppo import core_algos
from hapo_verl import compute_hapo_advantage, registry
assert core_algos.ADV_ESTIMATOR_REGISTRY.get('hapo') is compute_hapo_advantage, core_algos.ADV_ESTIMATOR_REGISTRY.keys()
assert set(registry.loss_specs()) <= set(core_algos.POLICY_LOSS_REGISTRY)
assert set(registry.estimator_specs()) <= set(core_algos.ADV_ESTIMATOR_REGISTRY)
from hapo_verl.registration import ensure_registered, is_registered, register
assert is_registered()  # every name, baselines included
register(); register()  # re-entrant
ensure_registered()
print('OK')
"""
    proc = run_python(code)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
    assert "registration with verl failed" not in proc.stderr


def test_failure_is_loud():
    code = """
import verl
from verl.trainer.ppo import core_algos
core_algos.register_adv_est('hapo')(lambda **kw: None)  # another package took the name
from hapo_verl.registration import ensure_registered
try:
    ensure_registered()
except RuntimeError as exc:
    print('RAISED', exc)
"""
    proc = run_python(code, VERL_USE_EXTERNAL_PLUGINS="none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RAISED hapo-verl failed to register" in proc.stdout
    assert "already registered" in proc.stdout
    assert "registration with verl failed" in proc.stderr  # logged at ERROR, not swallowed


def test_registered_inside_a_local_ray_worker():
    code = """
import ray
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)

@ray.remote
def probe():
    import verl
    from verl.trainer.ppo import core_algos
    return ('hapo' in core_algos.ADV_ESTIMATOR_REGISTRY, 'hapo' in core_algos.POLICY_LOSS_REGISTRY)

@ray.remote
class Actor:
    def probe(self):
        import verl
        from verl.trainer.ppo import core_algos
        return ('hapo' in core_algos.ADV_ESTIMATOR_REGISTRY, 'hapo' in core_algos.POLICY_LOSS_REGISTRY)

print('TASK', ray.get(probe.remote()))
print('ACTOR', ray.get(Actor.remote().probe.remote()))
ray.shutdown()
"""
    proc = run_python(code, RAY_USAGE_STATS_ENABLED="0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TASK (True, True)" in proc.stdout
    assert "ACTOR (True, True)" in proc.stdout
