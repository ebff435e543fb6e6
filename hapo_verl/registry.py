"""The algorithm registry: what an algorithm is, declared on its own module.

An algorithm module in :mod:`hapo_verl.algorithms` holds its pure-torch math, its options as plain dataclasses
whose fields carry their help, range and paper reference (:func:`option`), and one :class:`AlgorithmSpec`
declared with :func:`register_algorithm`. Everything else (verl registration, the trainer, the worker-side loss,
config loading, CLI choices, docs) is generic and reads the registry.

This module is pure Python: it imports nothing from torch, verl, vLLM, Ray, Hydra or OmegaConf.
"""

from __future__ import annotations

import functools
import importlib
import math
import pkgutil
import threading
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Callable, Mapping

# What a part of an algorithm needs from the old-policy pass that verl runs before the update.
OLD_ENTROPY = "old_entropy"  # per-token entropy of π_old (verl's old-log-prob step, field ``entropy``)
OLD_LOG_PROB = "old_log_prob"  # per-token log π_old (on the driver: verl passes none to estimators)
CURRENT_ENTROPY = "current_entropy"  # per-token entropy of π_θ in the update's forward pass
BATCH_STATS = "batch_stats"  # the spec's batch statistics, computed once per step over the whole batch
# statistics over the whole update mini-batch at the current θ: a forward-only pass over the mini-batch before its
# update, summed over its micro-batches and the data-parallel ranks (spec.minibatch_stats / minibatch_finalize)
MINIBATCH_STATS = "minibatch_stats"
# (B, L) bool, true at the token that ends a reasoning step, for step-level estimators (EMPG): single-turn responses
# have no agent turns, so a step is a line: it ends with a token whose text holds a newline (estimators only)
RESPONSE_STEPS = "response_steps"
NEEDS = (OLD_ENTROPY, OLD_LOG_PROB, CURRENT_ENTROPY, BATCH_STATS, MINIBATCH_STATS, RESPONSE_STEPS)

# Metric names a loss returns that verl logs under ``actor/`` (verl's own names); others go to actor/<name>/.
VERL_LOSS_METRICS = ("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower")


# ------------------------------------------------------------------------------------------------ options
def option(default: Any, help: str, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, choices: tuple | None = None, paper: str | None = None):
    """A dataclass field of an algorithm's options: default, meaning, allowed range or choices, paper reference.

    The metadata feeds validation (:func:`validate_options`), the CLI's help and docs/configuration.md.
    """
    return field(default=default, metadata={"help": help, "low": low, "high": high, "low_open": low_open,
                                             "high_open": high_open, "choices": choices, "paper": paper})


def describe_range(meta: Mapping) -> str:
    """The allowed values of an option as a user reads them: ``[0, 1)``, ``one of group, batch``, ``true/false``."""
    if meta.get("choices"):
        return "one of " + ", ".join(str(c) for c in meta["choices"])
    low, high = meta.get("low"), meta.get("high")
    if low is None and high is None:
        return ""
    lo = "-inf" if low is None else _fmt(low)
    hi = "inf" if high is None else _fmt(high)
    left = "(" if meta.get("low_open") or low is None else "["
    right = ")" if meta.get("high_open") or high is None else "]"
    return f"{left}{lo}, {hi}{right}"


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def field_type(cls, f) -> Any:
    """The resolved type of a dataclass field (annotations may be strings under ``from __future__``)."""
    return _type_hints(cls).get(f.name, f.type)


@functools.lru_cache(maxsize=None)
def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def coerce_value(key: str, value: Any, expected: Any) -> Any:
    """Type-driven coercion of a YAML/CLI value: ints are accepted for floats; a bool is never a number."""
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected in (float, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        if expected is int and not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
    elif expected is bool and not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    elif expected is str and not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}")
    return value


def validate_value(key: str, value: Any, meta: Mapping) -> None:
    """Check one option value against its metadata (range / choices); errors name the key and the range."""
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ValueError(f"{key} must be {describe_range(meta)}, got {value!r}")
    low, high = meta.get("low"), meta.get("high")
    if low is None and high is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number in {describe_range(meta)}, got {value!r}")
    too_low = low is not None and (value <= low if meta.get("low_open") else value < low)
    too_high = high is not None and (value >= high if meta.get("high_open") else value > high)
    if too_low or too_high:
        raise ValueError(f"{key} must be in {describe_range(meta)}, got {value!r}")


def validate_options(options, prefix: str) -> None:
    """Validate every field of an options dataclass instance against its metadata and type."""
    for f in fields(options):
        key = f"{prefix}.{f.name}"
        value = coerce_value(key, getattr(options, f.name), field_type(type(options), f))
        validate_value(key, value, f.metadata)


def load_options(cls, data: Mapping | None, prefix: str):
    """Build an options dataclass from a mapping: unknown keys rejected with their full key path, values coerced by
    the field types and validated against the field metadata. ``None`` gives the defaults."""
    if data is None:
        data = {}
    elif isinstance(data, cls):
        validate_options(data, prefix)
        return data
    elif is_dataclass(data):
        data = {f.name: getattr(data, f.name) for f in fields(data)}
    data = {str(k): v for k, v in dict(data.items()).items()}
    allowed = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        names = ", ".join(f"{prefix}.{k}" for k in unknown)
        raise ValueError(f"unknown option {names}; allowed keys under {prefix}: {', '.join(sorted(allowed))}")
    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}"
        value = coerce_value(key, value, field_type(cls, allowed[name]))
        validate_value(key, value, allowed[name].metadata)
        values[name] = value
    return cls(**values)


def option_defaults(cls) -> dict[str, Any]:
    return {f.name: (f.default if f.default is not MISSING else f.default_factory()) for f in fields(cls)}


# ------------------------------------------------------------------------------------------------ contexts
@dataclass
class LossInputs:
    """What a registered per-token loss receives. Tensors are (B, L) on one device (any device).

    ``entropy`` is the per-token entropy the spec asked for (old or current policy), else None.
    ``aggregate(loss_mat, mask, mode=None)`` is verl's ``agg_loss`` over the global batch (``mode`` defaults to
    ``loss_agg_mode``), so results do not depend on the micro-batch split. ``kl(log_prob, other, kind)`` is verl's
    ``kl_penalty``; ``ref_log_prob`` / ``kl_coef`` are set when ``actor.use_kl_loss`` is on.
    ``all_reduce(tensor)`` sums a tensor over the data-parallel ranks of the update (the identity on one process,
    and in direct calls); a loss whose statistic must agree on every rank reduces with it.
    ``minibatch_stats`` is what the spec's ``minibatch_finalize`` made of the whole update mini-batch (the
    :data:`MINIBATCH_STATS` need); None in direct calls, where the tokens passed in are the whole batch.
    """

    old_log_prob: Any
    log_prob: Any
    advantages: Any
    response_mask: Any
    loss_agg_mode: str
    aggregate: Callable
    clip_low: float
    clip_high: float
    clip_ratio_c: float
    entropy: Any = None
    batch_stats: Mapping | None = None
    rollout_is_weights: Any = None
    ref_log_prob: Any = None
    kl_coef: float = 0.0
    kl_type: str = "low_var_kl"
    kl: Callable | None = None
    all_reduce: Callable = lambda tensor: tensor
    minibatch_stats: Mapping | None = None


@dataclass
class AdvantageInputs:
    """What a registered advantage estimator receives: (B, L) tensors, (B,) contiguous group ids, and the old-policy
    tensors, batch statistics or step ends (:data:`RESPONSE_STEPS`: bool, true at the last token of each step; a
    row's last step also ends at its last position) its spec asked for (None otherwise)."""

    token_level_rewards: Any
    response_mask: Any
    group_ids: Any
    old_log_prob: Any = None
    entropy: Any = None
    batch_stats: Mapping | None = None
    step_ends: Any = None


@dataclass
class OldPolicyBatch:
    """The whole step's old-policy tensors on the driver, padded (B, L): input of a spec's batch statistics."""

    response_mask: Any
    entropy: Any = None
    old_log_prob: Any = None


@dataclass
class SelectionInputs:
    """What a registered selection step receives on the driver, after the advantage and before the update: the
    whole batch padded (B, L), (B,) contiguous group ids, the old-policy tensors its spec asked for (None otherwise),
    the training step (1-based) out of ``total_steps``, for schedules, and ``lengths`` (B,): each row's response
    length, every token of the row lying before it (None when unknown)."""

    advantages: Any
    response_mask: Any
    group_ids: Any
    entropy: Any = None
    old_log_prob: Any = None
    step: int = 1
    total_steps: int = 1
    lengths: Any = None


@dataclass
class MiniBatchPart:
    """One micro-batch of the pass that precedes each update mini-batch (:data:`MINIBATCH_STATS`), padded (B, L):
    input of a spec's ``minibatch_stats``. ``log_prob`` is the current policy's (None when the spec's
    ``minibatch_forward`` is false: the pass then reads only the stored fields, the whole mini-batch at once);
    ``entropy`` is the one the loss receives (old or current policy, per its needs), else None."""

    old_log_prob: Any
    advantages: Any
    response_mask: Any
    log_prob: Any = None
    entropy: Any = None
    batch_stats: Mapping | None = None


@dataclass(frozen=True)
class Gathered:
    """A value of a spec's ``minibatch_stats`` that the mini-batch pass concatenates (1-D) over the micro-batches and
    the data-parallel ranks instead of summing (e.g. the candidates' entropies of a quantile); the finalize function
    receives the concatenated tensor."""

    values: Any


@dataclass(frozen=True)
class Variant:
    """A reading of an algorithm that its docs page compares with the algorithm as configured: its config plus
    Hydra overrides. The learning benchmark runs it on request as ``<algorithm>_<name>``, titled
    ``<title> (<variant title>)``, and pairs it with the algorithm."""

    name: str
    title: str
    overrides: tuple[str, ...]
    why: str = ""


# ------------------------------------------------------------------------------------------------ the spec
@dataclass(frozen=True)
class AlgorithmSpec:
    """An algorithm as the generic glue sees it.

    Args:
        name: the registered verl name(s): ``algorithm.adv_estimator=<name>`` and/or
            ``actor_rollout_ref.actor.policy_loss.loss_mode=<name>``; also the config file ``conf/<name>.yaml``.
        title: human name (e.g. ``HAPO``); the verl loss config class is ``<title>PolicyLossConfig``.
        paper: citation with link.
        summary: one line.
        loss: ``loss(inputs: LossInputs, options) -> (loss, metrics)``, metrics 0-dim tensors on the input's
            device; None when the algorithm has no policy loss.
        loss_options: dataclass of the loss's keys (``actor_rollout_ref.actor.policy_loss.*``).
        loss_needs: ``options -> set`` of :data:`NEEDS` (a set or a function of the loss options).
        loss_handles_kl: the loss adds the KL-to-reference term itself (verl's KL loss is then not added).
        advantage: ``advantage(inputs: AdvantageInputs, options) -> (advantages, returns, metrics)``; metrics floats.
        estimator_options: dataclass of the estimator's keys (``algorithm.<name>.*``).
        estimator_needs: like ``loss_needs``, for the estimator (computed on the driver); only an estimator can
            need :data:`RESPONSE_STEPS`.
        batch_stats: ``batch_stats(old: OldPolicyBatch, options) -> stats``, once per step on the driver over the
            whole batch, with the loss options when the loss is active (else the defaults); ``stats`` is a JSON-able
            dict sent to the workers and handed to the loss and estimator.
        batch_metrics: ``batch_metrics(old, options, stats) -> dict`` of floats the trainer logs with them.
        minibatch_stats: ``minibatch_stats(part: MiniBatchPart, options) -> {name: tensor | Gathered}``, sums over
            one micro-batch of the pass before each update mini-batch; they are summed (a :class:`Gathered` value:
            concatenated) over the mini-batch's micro-batches and the data-parallel ranks (needs
            :data:`MINIBATCH_STATS`).
        minibatch_finalize: ``minibatch_finalize(totals, options) -> {name: tensor}`` handed to every micro-batch's
            loss of that mini-batch as ``LossInputs.minibatch_stats``; None hands the totals.
        minibatch_forward: ``options -> bool`` (or a bool): the pass runs the model forward (the current policy's
            log-probs and entropy); false reads only the mini-batch's stored fields (no forward).
        needs_groups: the advantage needs several responses per prompt (``rollout.n >= 2``).
        loss_requires_estimator: the loss works only with this spec's estimator (it uses what the estimator computed).
        rollout_entropy_stats: the batch statistics are the entropy statistics adaptive temperature sends to
            the next rollout.
        sampling_options: dataclass of the top-level ``<name>.*`` section that configures adaptive temperature
            sampling (read by the trainer; the spec must have ``rollout_entropy_stats``).
        selection: ``selection(inputs: SelectionInputs, options) -> (keep, metrics)``: a driver-side step after
            the advantage, composable with any estimator and any loss; ``keep`` (B, L) bool marks the tokens the
            update uses (the trainer masks the others out of ``response_mask`` for the update), metrics floats.
        selection_options: dataclass of the step's keys (``algorithm.<name>.*``); its bool field ``enable``
            (default false) switches the step on.
        selection_needs: like ``loss_needs``, for the selection step (computed on the driver).
        variants: :class:`Variant` readings the algorithm's page compares with it (benchmarked on request).
    """

    name: str
    title: str
    paper: str
    summary: str
    loss: Callable | None = None
    loss_options: type | None = None
    loss_needs: Callable | frozenset = frozenset()
    loss_handles_kl: bool = False
    advantage: Callable | None = None
    estimator_options: type | None = None
    estimator_needs: Callable | frozenset = frozenset()
    batch_stats: Callable | None = None
    batch_metrics: Callable | None = None
    minibatch_stats: Callable | None = None
    minibatch_finalize: Callable | None = None
    minibatch_forward: Callable | bool = True
    needs_groups: bool = True
    loss_requires_estimator: bool = False
    rollout_entropy_stats: bool = False
    sampling_options: type | None = None
    selection: Callable | None = None
    selection_options: type | None = None
    selection_needs: Callable | frozenset = frozenset()
    variants: tuple[Variant, ...] = ()
    module: str = ""

    def needs_of_loss(self, options) -> frozenset:
        return _needs(self.loss_needs, options)

    def needs_of_estimator(self, options) -> frozenset:
        return _needs(self.estimator_needs, options)

    def needs_of_selection(self, options) -> frozenset:
        return _needs(self.selection_needs, options)

    def minibatch_pass_runs_forward(self, options) -> bool:
        return bool(self.minibatch_forward(options) if callable(self.minibatch_forward) else self.minibatch_forward)

    @property
    def standard_signature(self) -> bool:
        """The loss runs through verl's standard policy-loss signature (it needs nothing verl does not pass)."""
        if self.loss is None or self.loss_options is None:
            return self.loss is not None
        return not self.needs_of_loss(self.loss_options())


def _needs(needs, options) -> frozenset:
    value = needs(options) if callable(needs) else needs
    value = frozenset(value)
    unknown = value - set(NEEDS)
    if unknown:
        raise ValueError(f"unknown needs {sorted(unknown)}; known: {NEEDS}")
    return value


_lock = threading.RLock()
_SPECS: dict[str, AlgorithmSpec] = {}
_discovered = False


def register_algorithm(**kwargs) -> AlgorithmSpec:
    """Declare a spec. Re-declaring from the same module (a reload) replaces it; another module claiming the
    name fails loudly."""
    spec = AlgorithmSpec(**kwargs)
    _check_selection(spec)
    with _lock:
        current = _SPECS.get(spec.name)
        if current is not None and current.module != spec.module:
            raise RuntimeError(f"algorithm {spec.name!r} is declared twice: in {current.module} and {spec.module}")
        _SPECS[spec.name] = spec
    return spec


def _check_selection(spec: AlgorithmSpec) -> None:
    """A selection step has options with a bool ``enable`` defaulting to false (how the trainer knows it is on);
    its keys live under ``algorithm.<name>``, so it cannot share that section with an estimator's options."""
    if spec.selection is None:
        return
    names = {f.name: f for f in fields(spec.selection_options)} if is_dataclass(spec.selection_options) else {}
    if "enable" not in names or names["enable"].default is not False:
        raise ValueError(f"algorithm {spec.name!r}: selection_options must be a dataclass with a field "
                         "'enable' defaulting to false")
    if spec.estimator_options is not None:
        raise ValueError(f"algorithm {spec.name!r}: a selection step and an estimator cannot share the keys "
                         f"algorithm.{spec.name}.*")


def algorithm(role: str, **kwargs) -> Callable:
    """Decorator that declares an algorithm on the function computing its loss (``role="loss"``), its advantage
    (``role="advantage"``) or its selection step (``role="selection"``); the other parts are keyword arguments.
    Returns the function unchanged.

        @algorithm("loss", name="my_loss", title="MyLoss", paper=..., loss_options=MyLossOptions, ...)
        def my_loss(inputs: LossInputs, options: MyLossOptions): ...
    """
    if role not in ("loss", "advantage", "selection"):
        raise ValueError(f"role must be 'loss', 'advantage' or 'selection', got {role!r}")

    def wrap(fn):
        register_algorithm(**{role: fn, "module": fn.__module__, **kwargs})
        return fn

    return wrap


def discover() -> dict[str, AlgorithmSpec]:
    """Import every module of :mod:`hapo_verl.algorithms` once, so that their specs are declared."""
    global _discovered
    with _lock:
        if not _discovered:
            package = importlib.import_module("hapo_verl.algorithms")
            for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
                importlib.import_module(f"{package.__name__}.{info.name}")
            _discovered = True
        return dict(sorted(_SPECS.items()))


def specs() -> list[AlgorithmSpec]:
    return list(discover().values())


def get(name: str) -> AlgorithmSpec | None:
    return discover().get(name)


def rollout_stats_spec() -> AlgorithmSpec:
    """The spec whose batch statistics adaptive temperature sends to the rollout (and whose top-level section
    configures it)."""
    found = [s for s in specs() if s.rollout_entropy_stats and s.sampling_options is not None]
    if len(found) != 1:
        raise RuntimeError(f"exactly one algorithm must provide the rollout's entropy statistics, found {found}")
    return found[0]


def batch_stats_hooks(loss_spec, loss_options, estimator_spec, estimator_options,
                      rollout_spec=None) -> list[tuple[AlgorithmSpec, object]]:
    """(spec, options) of every batch-statistics hook one step runs, each once: the loss's and the estimator's
    when they need batch statistics, and ``rollout_spec``'s when adaptive temperature is on. A hook gets its
    spec's loss options when that loss is the active one, else the defaults."""
    def options_of(spec):
        return loss_options if spec is loss_spec else spec.loss_options()

    hooks: dict[str, tuple] = {}
    if loss_spec is not None and BATCH_STATS in loss_spec.needs_of_loss(loss_options):
        hooks[loss_spec.name] = (loss_spec, loss_options)
    if estimator_spec is not None and BATCH_STATS in estimator_spec.needs_of_estimator(estimator_options):
        hooks.setdefault(estimator_spec.name, (estimator_spec, options_of(estimator_spec)))
    if rollout_spec is not None:
        hooks.setdefault(rollout_spec.name, (rollout_spec, options_of(rollout_spec)))
    return list(hooks.values())


def loss_specs() -> dict[str, AlgorithmSpec]:
    return {n: s for n, s in discover().items() if s.loss is not None}


def estimator_specs() -> dict[str, AlgorithmSpec]:
    return {n: s for n, s in discover().items() if s.advantage is not None}


def selection_specs() -> dict[str, AlgorithmSpec]:
    return {n: s for n, s in discover().items() if s.selection is not None}


__all__ = [
    "AdvantageInputs", "AlgorithmSpec", "BATCH_STATS", "CURRENT_ENTROPY", "Gathered", "LossInputs", "MINIBATCH_STATS",
    "MiniBatchPart", "NEEDS", "OLD_ENTROPY", "OLD_LOG_PROB", "OldPolicyBatch", "RESPONSE_STEPS", "VERL_LOSS_METRICS", "Variant", "algorithm", "describe_range", "discover",
    "batch_stats_hooks", "estimator_specs", "get", "load_options", "rollout_stats_spec", "loss_specs", "option", "option_defaults", "register_algorithm",
    "specs", "validate_options",
]
__all__ += ["SelectionInputs", "selection_specs"]
