"""CPU backend for verl 0.9.1: platform ``cpu`` (gloo), rollout ``hfcpu`` (HF transformers), tiny assets.

This room may import verl, Ray, transformers and the pure rooms of the package (``sampling`` for the rollout's
adaptive temperature, ``algorithms``, ``tinyworld``), never vLLM; this ``__init__``, ``names`` and ``registration``
stay light (no torch / verl import at module level).

Use from a launcher::

    from hapo_verl.cpu import cpu_env, cpu_overrides, ensure_tiny_assets
    env = {**os.environ, **cpu_env()}
    overrides = cpu_overrides(ensure_tiny_assets())      # + your own (algorithm, batch sizes, steps, ...)
    subprocess.run([python, "-m", "verl.trainer.main_ppo", *overrides], env=env)

``cpu_env()`` must be in the environment of the driver (verl resolves its platform once per process and the
local Ray cluster inherits the driver's environment); ``cpu_overrides`` also forwards it to Ray workers
through ``ray_kwargs.ray_init.runtime_env.env_vars``. Registration in every process is done by the
``verl.plugins`` entry point (:mod:`hapo_verl.plugin` -> :func:`register_cpu_backend`).

This module is light (no torch / verl import); see docs/cpu_backend.md.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from hapo_verl.cpu.names import ROLLOUT_NAME
from hapo_verl.cpu.registration import ensure_cpu_backend_registered, register_cpu_backend

if TYPE_CHECKING:
    from hapo_verl.cpu.assets import TinyAssets

__all__ = [
    "ROLLOUT_NAME",
    "cpu_env",
    "cpu_overrides",
    "ensure_cpu_backend_registered",
    "ensure_tiny_assets",
    "register_cpu_backend",
]


def cpu_env() -> dict[str, str]:
    """Environment variables for running verl's trainer on CPU (driver and Ray workers)."""
    return {
        # select our platform in verl.plugin.platform (resolved once per process)
        "VERL_PLATFORM": "cpu",
        # training-engine registry lookup: verl registers its FSDP engines for cuda/npu only
        # (workers/engine/fsdp/transformer_impl.py); this env override is verl's own escape hatch
        "VERL_ENGINE_DEVICE": "cuda",
        # keep the plugin discovery on (default "auto"), so hapo_verl.plugin runs in every process
        "VERL_USE_EXTERNAL_PLUGINS": "auto",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "disabled",
        # verl's TransferQueue asks torch for 8 threads per call and warns on every call (hundreds of lines) when
        # the machine has fewer physical cores
        "TQ_NUM_THREADS": str(min(8, physical_cores())),
    }


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def cpu_overrides(
    assets: "TinyAssets | None" = None,
    n_gpus: int = 1,
    ray_num_cpus: int = 8,
    forward_env: bool = True,
) -> list[str]:
    """Hydra overrides for ``verl.trainer.main_ppo`` (or a launcher composing ppo_trainer) on CPU.

    Args:
        assets: tiny model / data / reward to train on (:func:`ensure_tiny_assets`); None = backend only.
        n_gpus: number of *logical* Ray GPUs = trainer processes (each is one FSDP rank and one hfcpu replica).
        ray_num_cpus: logical Ray CPUs (verl's placement bundles ask for several CPUs per GPU).
        forward_env: also pass :func:`cpu_env` to Ray workers via ``runtime_env.env_vars``.
    """
    overrides = [
        # platform: FSDP2 (FSDP1 needs an accelerator for sync_module_states), fp32, sdpa, no compile
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.actor.fsdp_config.dtype=float32",
        "actor_rollout_ref.ref.fsdp_config.dtype=float32",
        # FSDP's mixed-precision policy computes in bf16 by default; fp32 matches the fp32 rollout (and is faster
        # than emulated bf16 on most CPUs)
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
        "+actor_rollout_ref.ref.fsdp_config.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
        "actor_rollout_ref.actor.use_torch_compile=False",
        "actor_rollout_ref.ref.use_torch_compile=False",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.model.use_remove_padding=False",
        "actor_rollout_ref.model.enable_gradient_checkpointing=False",
        # rollout: our HF backend, one process per replica
        f"actor_rollout_ref.rollout.name={ROLLOUT_NAME}",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        # resources: Ray needs GPU bundles (verl hard-codes use_gpu=True) -> logical GPUs; torch sees none
        "trainer.device=cpu",
        f"trainer.n_gpus_per_node={int(n_gpus)}",
        "trainer.nnodes=1",
        f"ray_kwargs.ray_init.num_cpus={int(ray_num_cpus)}",
        f"+ray_kwargs.ray_init.num_gpus={int(n_gpus)}",
        # v1 trainer: 8 TransferQueue storage actors do not fit a small box (hang after tq.init)
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
        "reward.num_workers=1",
        "data.dataloader_num_workers=0",
    ]
    if forward_env:
        # quoted: Hydra would turn "1" / "false" into int / bool, and Ray requires str values
        overrides += [f'+ray_kwargs.ray_init.runtime_env.env_vars.{k}="{v}"' for k, v in cpu_env().items()]
    if assets is not None:
        overrides += [
            f"actor_rollout_ref.model.path={assets.model_path}",
            f"data.train_files={assets.train_file}",
            f"data.val_files={assets.val_file}",
            f"data.max_prompt_length={assets.max_prompt_length}",
            f"data.max_response_length={assets.max_response_length}",
            # top-level custom_reward_function.* is silently ignored in 0.9.1: it lives under reward.
            f"reward.custom_reward_function.path={assets.reward_path}",
            f"reward.custom_reward_function.name={assets.reward_name}",
        ]
    return overrides


def ensure_tiny_assets(root=None):
    """See :func:`hapo_verl.cpu.assets.ensure_tiny_assets` (imported lazily: it needs transformers)."""
    from hapo_verl.cpu.assets import ensure_tiny_assets as _ensure

    return _ensure(root)
