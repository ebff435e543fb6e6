"""Entry point of the ``verl.plugins`` group: loaded by every ``import verl``, in every Ray worker.

It calls :func:`hapo_verl.registration.register` (light: verl's core_algos, our math) and, only when
``VERL_PLATFORM=cpu``, :func:`hapo_verl.cpu.registration.register_cpu_backend` (CPU platform, hfcpu rollout,
runtime shims); otherwise the CPU backend costs one env lookup. A failure is logged at ERROR level by each
function because verl would swallow it. Finally, :func:`hapo_verl.entry_guard.stop_if_unsupported` stops
``python -m verl.trainer.main_ppo`` with the equivalent ``hapo-verl`` command when it is asked for what only
hapo-verl's trainer provides: a loss or estimator that needs old-policy tensors, per-token entropy or batch
statistics, or adaptive temperature.
"""

from hapo_verl.cpu.registration import register_cpu_backend
from hapo_verl.entry_guard import stop_if_unsupported
from hapo_verl.registration import register

register()
register_cpu_backend()
stop_if_unsupported()
