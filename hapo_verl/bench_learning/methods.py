"""The learning benchmark's methods, shared by its fast engine and its verl mode: each is a config of
``hapo_verl/conf`` plus Hydra overrides, the same thing ``hapo-verl tiny --config`` and the recipes run.

* one method per config: every registered algorithm, DAPO, and verl's Clip-Cov / KL-Cov (so an algorithm joins the
  grid with its config, without edits here);
* GRPO as verl users configure it (DAPO's config without dynamic sampling, clip-higher or overlong shaping);
* ``<name>_ref`` for an algorithm whose sampling section has the fork-compatibility switch ``reference_compat``;
* HAPO's variants: on DAPO's recipe (``hapo_ds``: dynamic sampling and overlong shaping, the paper's comparison) and
  with each component off, as the ``*_hapo_no_*`` recipes (docs/recipes.md);
* each algorithm's declared :class:`~hapo_verl.registry.Variant` readings, run on request.

The fast engine reads what it needs from the composed config (:func:`fast_settings`) and the plugin's own
:class:`~hapo_verl.trainer.hapo_trainer.StepPlan`, as the trainer does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

#: DAPO's reward on another config: overlong shaping (the length is the task's, set by the engines)
DAPO_REWARD = ["reward.reward_manager.name=dapo",
               "+reward.reward_kwargs.overlong_buffer_cfg={enable:true,len:4096,penalty_factor:1.0,log:false}",
               "+reward.reward_kwargs.max_resp_len=${data.max_response_length}"]

BASELINES = {
    # GRPO as verl users configure it: grpo estimator, symmetric clip, seq-mean-token-mean, no shaping
    "grpo": ("dapo", ["algorithm.filter_groups.enable=false",
                      "reward.reward_kwargs.overlong_buffer_cfg.enable=false",
                      "actor_rollout_ref.actor.clip_ratio_high=0.2",
                      "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean"]),
}

#: HAPO on DAPO's recipe, and with each component off (one key each, as the ``*_hapo_no_*`` recipes)
VARIANTS = {
    "hapo_ds": ("hapo", ["algorithm.filter_groups.enable=true", *DAPO_REWARD]),
    "hapo_no_ats": ("hapo", ["hapo.adaptive_temperature=false"]),
    "hapo_no_tlga": ("hapo", ["algorithm.adv_estimator=grpo"]),
    "hapo_no_dar": ("hapo", ["actor_rollout_ref.actor.policy_loss.adaptive_advantage=false"]),
    "hapo_no_aac": ("hapo", ["actor_rollout_ref.actor.policy_loss.adaptive_clip=false"]),
}

LABELS = {"grpo": "GRPO", "dapo": "DAPO", "hapo": "HAPO", "hapo_ds": "HAPO + dynamic sampling",
          "hapo_no_ats": "HAPO w/o ATS", "hapo_no_tlga": "HAPO w/o TLGA", "hapo_no_dar": "HAPO w/o DAR",
          "hapo_no_aac": "HAPO w/o AAC", "clip_cov": "Clip-Cov", "kl_cov": "KL-Cov"}


def spec_variants() -> dict[str, tuple]:
    """``<algorithm>_<variant>`` -> (spec, variant) for every :class:`~hapo_verl.registry.Variant` an algorithm
    declares: readings its page compares, run on request (``--methods``), not in the default grid."""
    from hapo_verl import registry

    return {f"{spec.name}_{v.name}": (spec, v) for spec in registry.specs() for v in spec.variants}


def methods() -> dict[str, tuple[str, list[str]]]:
    """name -> (config name, overrides), in the report's order: baselines, HAPO and its variants, the rest by name."""
    from hapo_verl import registry
    from hapo_verl.conf import config_names

    found = {name: (name, []) for name in config_names()}
    for spec in registry.specs():
        if spec.sampling_options is not None and "reference_compat" in {f.name for f in fields(spec.sampling_options)}:
            found[f"{spec.name}_ref"] = (spec.name, [f"{spec.name}.reference_compat=true"])
    found.update(VARIANTS)
    found.update({name: (spec.name, list(v.overrides)) for name, (spec, v) in spec_variants().items()})
    first = ["grpo", "dapo", "hapo", "hapo_ds", *[v for v in VARIANTS if v != "hapo_ds"], "hapo_ref"]
    ordered = {**BASELINES}
    ordered.update({name: found.pop(name) for name in first if name in found})
    ordered.update(dict(sorted(found.items())))
    return ordered


def grid_methods() -> list[str]:
    """The default grid: every method but the algorithms' variants (run on request)."""
    return [m for m in methods() if m not in spec_variants()]


def paired_with(method: str) -> str | None:
    """The algorithm an algorithm's variant is compared with, else None."""
    found = spec_variants().get(method)
    return found[0].name if found else None


def label(method: str) -> str:
    """A method's label: the ones above, an algorithm's variant as ``<title> (<variant>)``, else the registered
    algorithm's title."""
    if method in LABELS:
        return LABELS[method]
    from hapo_verl import registry

    variant = spec_variants().get(method)
    if variant is not None:
        return f"{variant[0].title} ({variant[1].title})"
    fork = method.endswith("_ref")
    spec = registry.get(method[: -len("_ref")] if fork else method)
    if spec is None:
        return method
    return f"{spec.title} (reference_compat)" if fork else spec.title


def overlong_shaping(config) -> bool:
    """The composed config has DAPO's reward with overlong shaping on."""
    from omegaconf import OmegaConf

    return OmegaConf.select(config, "reward.reward_manager.name") == "dapo" and bool(
        OmegaConf.select(config, "reward.reward_kwargs.overlong_buffer_cfg.enable", default=False))


@dataclass
class FastSettings:
    """What the fast engine takes from a method's composed config."""

    name: str
    config_name: str
    overrides: list
    plan: object  # the trainer's StepPlan
    actor: object  # verl's ActorConfig (clip ranges, loss aggregation, the loss's config)
    algorithm: dict  # verl's algorithm section, resolved (estimators and selection steps read their options there)
    estimator: str
    loss_mode: str
    dynamic_sampling: bool
    overlong_shaping: bool
    #: what verl's trainer would do that the fast engine does not (no reference model, no entropy bonus)
    not_applied: list = field(default_factory=list)

    def describe(self) -> dict:
        """The record's summary of the method (JSON)."""
        sampling = self.plan.sampling
        return {"config": self.config_name, "overrides": self.overrides, "estimator": self.estimator,
                "loss_mode": self.loss_mode, "clip_low": self.actor.clip_ratio_low,
                "clip_high": self.actor.clip_ratio_high, "loss_agg_mode": self.actor.loss_agg_mode,
                "dynamic_sampling": self.dynamic_sampling, "overlong_shaping": self.overlong_shaping,
                "adaptive_temperature": bool(sampling.adaptive_temperature),
                "temperature_tau": float(sampling.temperature_tau),
                "selections": [spec.name for spec, _ in self.plan.selections], "not_applied": self.not_applied}


def fast_settings(name: str) -> FastSettings:
    """Compose ``name``'s config and read what the fast engine needs, validated as the launcher does."""
    from omegaconf import OmegaConf
    from verl.workers.config import ActorConfig, PolicyLossConfig

    from hapo_verl.config import LOSS_CONFIG_CLASSES, loss_config_target
    from hapo_verl.integration.verl_losses import check_verl_loss_keys
    from hapo_verl.launcher import compose
    from hapo_verl.registration import ensure_registered
    from hapo_verl.trainer.hapo_trainer import StepPlan

    ensure_registered()
    config_name, overrides = methods()[name]
    config = compose(config_name, list(overrides))
    plan = StepPlan.from_config(config)
    actor = config.actor_rollout_ref.actor
    policy_loss = OmegaConf.to_container(actor.policy_loss, resolve=True)
    policy_loss.pop("_target_", None)
    check_verl_loss_keys(actor.policy_loss, "actor_rollout_ref.actor.policy_loss")
    if plan.loss_spec is not None:
        loss_config = LOSS_CONFIG_CLASSES[loss_config_target(plan.loss_spec).rsplit(".", 1)[1]].from_mapping(
            policy_loss)
    else:
        verl_keys = {f.name for f in fields(PolicyLossConfig)}
        loss_config = PolicyLossConfig(**{k: v for k, v in policy_loss.items() if k in verl_keys})
    actor_config = ActorConfig(strategy="fsdp", rollout_n=8, ppo_micro_batch_size_per_gpu=32,
                               clip_ratio_low=float(actor.clip_ratio_low), clip_ratio_high=float(actor.clip_ratio_high),
                               clip_ratio_c=float(actor.clip_ratio_c), loss_agg_mode=str(actor.loss_agg_mode),
                               policy_loss=loss_config)
    not_applied = []
    if actor.get("use_kl_loss", False):
        not_applied.append(f"KL loss to the reference policy (kl_loss_coef {actor.kl_loss_coef})")
    if float(actor.get("entropy_coeff", 0.0) or 0.0):
        not_applied.append(f"entropy bonus (entropy_coeff {actor.entropy_coeff})")
    if config.algorithm.get("use_kl_in_reward", False):
        not_applied.append("KL penalty in the reward")
    return FastSettings(name=name, config_name=config_name, overrides=list(overrides), plan=plan, actor=actor_config,
                        algorithm=OmegaConf.to_container(config.algorithm, resolve=True),
                        estimator=str(config.algorithm.adv_estimator),
                        loss_mode=str(policy_loss.get("loss_mode", "vanilla")),
                        dynamic_sampling=bool(config.algorithm.filter_groups.enable),
                        overlong_shaping=overlong_shaping(config), not_applied=not_applied)
