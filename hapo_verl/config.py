"""verl-facing configuration, generated from the algorithm registry, and the one config loader.

For every registered policy loss there is a ``<Title>PolicyLossConfig`` here: a subclass of verl's
``PolicyLossConfig`` whose extra fields are the loss's options (same names, defaults, help and ranges). verl builds
it from ``actor_rollout_ref.actor.policy_loss._target_``, which the launcher sets from ``loss_mode``. The public
``HAPOPolicyLossConfig`` is the one generated for HAPO.

Errors name the config key as a user writes it in a verl recipe, with the allowed range.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import field, fields, make_dataclass
from typing import Any

from verl.trainer.config.algorithm import RolloutCorrectionConfig
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config.actor import PolicyLossConfig

from hapo_verl import registry
from hapo_verl.integration.options import LOSS_KEY, verl_loss_fields

VERL_LOSS_FIELDS = verl_loss_fields()
LEGACY_LOSS_CONFIG = "BaselinePolicyLossConfig"


def loss_config_name(spec: registry.AlgorithmSpec) -> str:
    return re.sub(r"[^0-9A-Za-z]", "", spec.title) + "PolicyLossConfig"


def loss_config_target(spec: registry.AlgorithmSpec) -> str:
    return f"{__name__}.{loss_config_name(spec)}"


def _options_of(instance, spec) -> Any:
    return spec.loss_options(**{f.name: getattr(instance, f.name) for f in fields(spec.loss_options)})


def _as_rollout_correction(value):
    if value is None or isinstance(value, RolloutCorrectionConfig):
        return value
    return omega_conf_to_dataclass(value, RolloutCorrectionConfig)


def _make_loss_config(spec: registry.AlgorithmSpec) -> type:
    """The verl ``PolicyLossConfig`` subclass of one registered loss."""
    option_fields = [(f.name, registry.field_type(spec.loss_options, f),
                      field(default=f.default, metadata=f.metadata)) for f in fields(spec.loss_options)]

    def __post_init__(self):
        if self.loss_mode != spec.name:
            raise ValueError(f"{LOSS_KEY}.loss_mode must be {spec.name} with {loss_config_target(spec)}, "
                             f"got {self.loss_mode!r}")
        registry.validate_options(_options_of(self, spec), LOSS_KEY)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)} | {"_target_"}

    @classmethod
    def from_mapping(cls, options):
        """Build from a dict / DictConfig / another PolicyLossConfig, rejecting unknown keys by name."""
        if isinstance(options, cls):
            return options
        if options is None:
            raise ValueError(f"{LOSS_KEY} is missing; set {LOSS_KEY}.loss_mode={spec.name}")
        data = dict(options.items())
        data.pop("_target_", None)
        names = {f.name for f in fields(spec.loss_options)}  # an option may reuse a verl key name (kl_cov_ratio)
        own = registry.load_options(spec.loss_options,
                                    {k: v for k, v in data.items() if k not in VERL_LOSS_FIELDS or k in names},
                                    LOSS_KEY)
        base = {k: v for k, v in data.items() if k in VERL_LOSS_FIELDS and k not in names}
        if "rollout_correction" in base:
            base["rollout_correction"] = _as_rollout_correction(base["rollout_correction"])
        if base.get("rollout_correction", "") is None:
            base.pop("rollout_correction")
        return cls(**base, **{f.name: getattr(own, f.name) for f in fields(own)})

    def options(self):
        """The algorithm's options dataclass (:attr:`AlgorithmSpec.loss_options`) of this config."""
        return _options_of(self, spec)

    cls = make_dataclass(
        loss_config_name(spec), [("loss_mode", str, field(default=spec.name)), *option_fields],
        bases=(PolicyLossConfig,),
        namespace={"__post_init__": __post_init__, "field_names": field_names, "from_mapping": from_mapping,
                   "options": options, "__module__": __name__,
                   "__doc__": f"Options of the {spec.title} loss ({LOSS_KEY}.*, loss_mode={spec.name}); generated "
                              f"from {spec.module}. {spec.paper}."})
    return cls


def _make_legacy_loss_config() -> type:
    """``BaselinePolicyLossConfig`` of hapo-verl 0.1: one class with the options of several losses. Deprecated:
    the launcher replaces it by the loss's own class; it stays importable for configs that name it."""
    seen: dict[str, tuple] = {}
    for spec in registry.loss_specs().values():
        for f in fields(spec.loss_options):
            seen.setdefault(f.name, (f.name, registry.field_type(spec.loss_options, f),
                                     field(default=f.default, metadata=f.metadata)))

    def __post_init__(self):
        warnings.warn(f"{__name__}.{LEGACY_LOSS_CONFIG} is deprecated: drop {LOSS_KEY}._target_ (hapo-verl sets it "
                      "from loss_mode)", DeprecationWarning, stacklevel=3)

    return make_dataclass(LEGACY_LOSS_CONFIG, list(seen.values()), bases=(PolicyLossConfig,),
                          namespace={"__post_init__": __post_init__, "__module__": __name__})


def _generate() -> dict[str, type]:
    classes = {loss_config_name(spec): _make_loss_config(spec) for spec in registry.loss_specs().values()}
    classes[LEGACY_LOSS_CONFIG] = _make_legacy_loss_config()
    return classes


LOSS_CONFIG_CLASSES: dict[str, type] = _generate()
globals().update(LOSS_CONFIG_CLASSES)
