"""The launcher: compose a config of ``hapo_verl/conf``, check it before any Ray process starts, and run verl's
``run_ppo`` with the one trainer. Used by the CLI, ``python -m hapo_verl.main``, the recipes and the benchmarks.
"""

from __future__ import annotations

import warnings
from importlib import resources

import ray
from omegaconf import OmegaConf, open_dict
from verl.trainer.main_ppo import TaskRunnerV1, run_ppo

from hapo_verl import registry
from hapo_verl.conf import config_names  # noqa: F401  (re-exported: the launcher's configs)
from hapo_verl.config import LEGACY_LOSS_CONFIG, LOSS_KEY, LOSS_CONFIG_CLASSES, VERL_LOSS_FIELDS, loss_config_target
from hapo_verl.integration.verl_losses import check_verl_loss_keys
from hapo_verl.registration import ensure_registered

CONFIG_PACKAGE = "hapo_verl.conf"
AGENT_LOOP = "hapo_single_turn"
#: rollouts that apply adaptive temperature: vLLM (logits processor) and the CPU rollout
ADAPTIVE_TEMPERATURE_ROLLOUTS = ("vllm", "hfcpu")
#: verl 0.9.1's estimators that compare the responses of each prompt (their functions take the group ``index``)
VERL_GROUP_ESTIMATORS = ("grpo", "grpo_vectorized", "grpo_passk", "gdpo", "rloo", "rloo_vectorized", "opo", "gpg",
                         "reinforce_plus_plus_baseline", "optimal_token_baseline", "tir_optimal_token_baseline")


def agent_loop_config_path() -> str:
    return str(resources.files(CONFIG_PACKAGE).joinpath("verl", "agent_loops.yaml"))


def compose(config_name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module=CONFIG_PACKAGE, version_base=None):
        return hydra_compose(config_name=config_name, overrides=overrides)


def _translate_legacy_loss(policy_loss) -> None:
    """hapo-verl 0.1 configs: ``_target_=hapo_verl.config.BaselinePolicyLossConfig`` and ``loss_mode=vanilla`` with
    another loss's keys (forking tokens were ``vanilla`` + ``top_entropy_quantile``). Deprecated, rewritten here."""
    if str(policy_loss.get("_target_", "")).endswith(f".{LEGACY_LOSS_CONFIG}"):
        warnings.warn(f"{LOSS_KEY}._target_={policy_loss._target_} is deprecated: drop it (hapo-verl sets the "
                      "class from loss_mode)", DeprecationWarning, stacklevel=3)
        policy_loss._target_ = "verl.workers.config.PolicyLossConfig"
    if policy_loss.get("loss_mode", "vanilla") != "vanilla":
        return
    extra = {k: policy_loss[k] for k in policy_loss if k not in VERL_LOSS_FIELDS}
    for key in [k for k, v in extra.items() if not v]:  # a legacy key left at its "off" value
        policy_loss.pop(key)
        extra.pop(key)
    if not extra:
        return
    owners = [s for s in registry.loss_specs().values()
              if set(extra) <= {f for f in s.loss_options.__dataclass_fields__}]
    if len(owners) != 1:
        keys = ", ".join(f"{LOSS_KEY}.{k}" for k in sorted(extra))
        raise ValueError(f"unknown option {keys} for loss_mode=vanilla (verl's loss has no such keys); "
                         f"choose a loss_mode among {', '.join(registry.loss_specs())}")
    warnings.warn(f"{LOSS_KEY}.loss_mode=vanilla with {', '.join(sorted(extra))} is deprecated: use "
                  f"loss_mode={owners[0].name}", DeprecationWarning, stacklevel=3)
    policy_loss.loss_mode = owners[0].name


def _check_rollout_and_trainer(config) -> None:
    """What verl would only reject (or silently ignore) after Ray started."""
    rollout = config.actor_rollout_ref.rollout
    if OmegaConf.is_missing(rollout, "name"):
        raise ValueError("actor_rollout_ref.rollout.name is not set: use vllm on GPU machines "
                         "(pip install 'hapo-verl[vllm]'), or hfcpu on CPU (hapo-verl tiny sets it)")
    mode = OmegaConf.select(config, "trainer.v1.trainer_mode", default="sync")
    if mode != "sync":
        raise ValueError(f"trainer.v1.trainer_mode={mode} is not supported: hapo-verl's trainer extends verl's "
                         "synchronous trainer; use trainer.v1.trainer_mode=sync")


def prepare_config(config) -> None:
    """Fill launcher-owned keys and check every algorithm option before any Ray process starts."""
    from hapo_verl.trainer.hapo_trainer import StepPlan

    _check_rollout_and_trainer(config)
    with open_dict(config):
        policy_loss = config.actor_rollout_ref.actor.policy_loss
        _translate_legacy_loss(policy_loss)
        agent = config.actor_rollout_ref.rollout.agent
        if agent.get("default_agent_loop") == AGENT_LOOP and not agent.get("agent_loop_config_path"):
            agent.agent_loop_config_path = agent_loop_config_path()
    check_verl_loss_keys(config.actor_rollout_ref.actor.policy_loss, LOSS_KEY)  # verl's clip_cov / kl_cov keys
    plan = StepPlan.from_config(config)
    _check_group_size(config, plan.estimator_spec)
    if plan.loss_spec is not None:
        target = loss_config_target(plan.loss_spec)
        with open_dict(config):
            policy_loss._target_ = target
        LOSS_CONFIG_CLASSES[target.rsplit(".", 1)[1]].from_mapping(OmegaConf.to_container(policy_loss, resolve=True))
    _check_reference_compat(config, plan)
    if plan.needs_old_policy or plan.loss_needs & {registry.OLD_ENTROPY}:
        if OmegaConf.select(config, "algorithm.rollout_correction.bypass_mode", default=False):
            raise ValueError(
                "algorithm.rollout_correction.bypass_mode=true skips verl's old-log-prob step, which computes the "
                "old-policy entropy and log-probs this configuration needs (the loss, estimator or adaptive "
                "temperature): set algorithm.rollout_correction.bypass_mode=false")
    sampling = plan.sampling
    rollout_name = config.actor_rollout_ref.rollout.name
    if sampling.adaptive_temperature and rollout_name not in ADAPTIVE_TEMPERATURE_ROLLOUTS:
        raise ValueError(
            f"{plan.sampling_spec.name}.adaptive_temperature=true needs a rollout that applies it "
            f"({', '.join(ADAPTIVE_TEMPERATURE_ROLLOUTS)}); with actor_rollout_ref.rollout.name={rollout_name} the "
            f"temperature would never change: set {plan.sampling_spec.name}.adaptive_temperature=false or use vllm")
    if sampling.adaptive_temperature and config.actor_rollout_ref.rollout.agent.get("default_agent_loop") != AGENT_LOOP:
        raise ValueError(
            f"{plan.sampling_spec.name}.adaptive_temperature=true needs "
            f"actor_rollout_ref.rollout.agent.default_agent_loop={AGENT_LOOP} (the agent loop that sends the entropy "
            "statistics to the sampler)")
    if sampling.adaptive_temperature and rollout_name == "vllm":
        from hapo_verl.vllm import processor_fqcn

        with open_dict(config):
            engine_kwargs = config.actor_rollout_ref.rollout.engine_kwargs
            vllm_kwargs = engine_kwargs.get("vllm", None) or {}
            processors = list(vllm_kwargs.get("logits_processors", []) or [])
            fqcn = processor_fqcn()
            if fqcn not in processors:
                processors.append(fqcn)
            engine_kwargs["vllm"] = {**OmegaConf.to_container(OmegaConf.create(vllm_kwargs)),
                                     "logits_processors": processors}


def _check_group_size(config, spec) -> None:
    estimator = str(config.algorithm.adv_estimator)
    needs_groups = spec.needs_groups if spec is not None else estimator in VERL_GROUP_ESTIMATORS
    n = config.actor_rollout_ref.rollout.get("n", 1)
    if needs_groups and not (isinstance(n, int) and n >= 2):
        raise ValueError(f"algorithm.adv_estimator={estimator} compares the responses of each prompt: "
                         f"actor_rollout_ref.rollout.n must be >= 2, got {n!r} (with one response per prompt the "
                         "group has nothing to compare, and the advantages lose their baseline)")


def _check_reference_compat(config, plan) -> None:
    """The fork-compatibility switch is one decision: every ``reference_compat`` option of the active loss and
    estimator must equal the sampling section's (the shipped YAMLs link them)."""
    wanted = plan.sampling.reference_compat
    for options, key in ((plan.loss_options, LOSS_KEY),
                         (plan.estimator_options, f"algorithm.{getattr(plan.estimator_spec, 'name', '')}")):
        value = getattr(options, "reference_compat", wanted)
        if value != wanted:
            raise ValueError(f"{key}.reference_compat must equal {plan.sampling_spec.name}.reference_compat "
                             f"({value} vs {wanted})")


@ray.remote(num_cpus=1)
class HAPOTaskRunner(TaskRunnerV1.__ray_actor_class__):
    """verl's v1 TaskRunner whose ``sync`` trainer is :class:`HAPOTrainerSync`.

    verl picks the trainer class by ``trainer.v1.trainer_mode`` from its registry; several code paths compare the
    mode to ``"sync"``, so the mode keeps its name and only this (dedicated) TaskRunner process maps it to ours.
    """

    def run(self, config):
        ensure_registered()
        from verl.trainer.ppo.v1 import trainer_base

        from hapo_verl.patches import shim_module

        shim_module("file_logger_append").apply()  # a rerun or resume appends to the metrics log
        shim_module("quiet_config_dump").apply()

        from hapo_verl.trainer.hapo_trainer import HAPOTrainerSync

        trainer_base.TRAINER_REGISTRY["sync"] = HAPOTrainerSync  # the launcher refused every other mode
        return super().run(config)


def validate(config) -> None:
    """Everything checked at start-up: :func:`prepare_config` and verl's ``validate_config``."""
    from verl.trainer.main_ppo import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    ensure_registered()
    prepare_config(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    if not config.trainer.get("use_v1", True):
        raise ValueError("hapo-verl runs on verl's v1 trainer: trainer.use_v1 must be true")


def checkpoint_dir(config) -> str:
    """``trainer.default_local_dir`` as verl resolves it (relative to the working directory)."""
    import os

    return os.path.abspath(config.trainer.default_local_dir)


def resume_step(config) -> int | None:
    """The step verl will resume from (``trainer.resume_mode`` auto or resume_path); None when it starts fresh."""
    import os
    import re

    mode = config.trainer.get("resume_mode", "auto")
    if mode == "resume_path":
        found = re.search(r"global_step_(\d+)", str(config.trainer.get("resume_from_path") or ""))
        return int(found.group(1)) if found else None
    if mode != "auto":
        return None
    tracker = os.path.join(checkpoint_dir(config), "latest_checkpointed_iteration.txt")
    try:
        with open(tracker) as f:
            step = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return step if os.path.isdir(os.path.join(checkpoint_dir(config), f"global_step_{step}")) else None


def nothing_left_to_train(config) -> str | None:
    """A one-line reason when verl would resume at or past ``trainer.total_training_steps`` (and train nothing)."""
    total = config.trainer.get("total_training_steps")
    done = resume_step(config)
    if total is None or done is None or done < total:
        return None
    return (f"nothing to train: {checkpoint_dir(config)} already has global_step_{done} and "
            f"trainer.total_training_steps={total}; raise trainer.total_training_steps to continue, or set "
            "trainer.default_local_dir to a new directory (or trainer.resume_mode=disable) to start over")


def apply_output_dir(config) -> dict[str, str]:
    """With ``trainer.output_dir`` (or ``$HAPO_OUTPUT_DIR``) set: every output path under
    ``<output_dir>/<project>/<experiment>/`` (:func:`hapo_verl.outputs.output_layout`), as ``hapo-verl submit``
    does; returns the environment variables of that layout (metrics JSONL, TensorBoard, ...). Unset: nothing."""
    import os

    from hapo_verl.outputs import OUTPUT_ROOT_KEY, output_layout

    if not OmegaConf.select(config, OUTPUT_ROOT_KEY, default=None):
        return {}
    layout = output_layout(config, dict(os.environ), {})
    with open_dict(config):
        layout.apply(config)
    print(f"[hapo-verl] outputs under {layout.run_dir} ({layout.root_source})", flush=True)
    return layout.env


def run(config) -> bool:
    """Check ``config``, then train with verl's ``run_ppo``. False (and one line) when a rerun has nothing left to
    train: verl would start Ray, load the checkpoint and stop."""
    import os

    from hapo_verl.console import quiet_env, verbose

    output_env = apply_output_dir(config)
    os.environ.update(output_env)
    validate(config)
    reason = nothing_left_to_train(config)
    if reason is not None:
        print(f"[hapo-verl] {reason}", flush=True)
        return False
    # verl hands runtime_env to Ray unresolved: an interpolation there (${oc.env:...}) would reach the workers as text
    OmegaConf.resolve(config.ray_kwargs)
    with open_dict(config):  # the console policy of this process reaches every Ray worker
        ray_init = config.ray_kwargs.ray_init
        if ray_init.get("runtime_env") is None:
            ray_init.runtime_env = {}
        if ray_init.runtime_env.get("env_vars") is None:
            ray_init.runtime_env.env_vars = {}
        for key, value in quiet_env(verbose()).items():
            ray_init.runtime_env.env_vars.setdefault(key, value)
        ray_init.runtime_env.env_vars.update(output_env)
    run_ppo(config, task_runner_class=HAPOTaskRunner)
    return True
