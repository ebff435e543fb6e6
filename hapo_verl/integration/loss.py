"""Policy losses of the registry through verl: the public entry points, verl's standard signature, and the
worker-side loss that the trainer installs with ``set_loss_fn``.

verl 0.9.1 calls a registered policy loss with a fixed signature that carries no entropy and no batch statistics
(``verl/workers/utils/losses.py::ppo_loss``). A loss that needs neither runs through that signature (so
``python -m verl.trainer.main_ppo`` can use it); one that needs them runs in :func:`registered_ppo_loss`, which
does verl's ``ppo_loss`` bookkeeping and hands the loss what its spec asks for. Called through the standard
signature, such a loss refuses with instructions instead of running degraded.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from hapo_verl import registry
from hapo_verl.integration.collectives import dp_all_reduce
from hapo_verl.integration.options import LOSS_KEY, active_loss_spec, loss_options

#: batch meta key carrying the active loss's batch statistics (trainer -> workers)
BATCH_STATS_FIELD = "hapo_batch_stats"
#: data field holding the old-policy token entropy written by verl's old-log-prob step
OLD_ENTROPY_FIELD = "entropy"
OPTIONAL_FIELDS = ("rollout_is_weights", "ref_log_prob")


class LossNeedsTrainerError(RuntimeError):
    pass


def clip_settings(config) -> tuple[float, float, float]:
    """(ε_low, ε_high, c) from verl's actor config: ``clip_ratio_low/high`` default to ``clip_ratio``."""
    clip_ratio = config.get("clip_ratio", 0.2)
    clip_low = config.get("clip_ratio_low", None)
    clip_high = config.get("clip_ratio_high", None)
    clip_low = clip_ratio if clip_low is None else clip_low
    clip_high = clip_ratio if clip_high is None else clip_high
    clip_c = float(config.get("clip_ratio_c", 3.0))
    if not clip_c > 1.0:
        raise ValueError(f"actor_rollout_ref.actor.clip_ratio_c must be > 1.0 for dual-clip PPO, got {clip_c}")
    return float(clip_low), float(clip_high), clip_c


def global_aggregate(config, loss_agg_mode: str, response_mask: torch.Tensor):
    """``aggregate(loss_mat, mask, mode=None)``: verl's ``agg_loss`` with ``config.global_batch_info`` bound, so
    results do not depend on the micro-batch split or the data-parallel size."""
    from verl.trainer.ppo.core_algos import agg_loss

    info = dict((config.get("global_batch_info", None) if config is not None else None) or {})
    # no global count and no valid token (a direct call on an empty batch): agg_loss would divide 0 by 0
    if info.get("batch_num_tokens") is None and not response_mask.bool().any():
        info["batch_num_tokens"] = 1
        info.setdefault("global_batch_size", 1)

    def aggregate(loss_mat, mask, mode=None):
        return agg_loss(loss_mat=loss_mat, loss_mask=mask, loss_agg_mode=mode or loss_agg_mode, **info)

    return aggregate


def _kl(log_prob, other, kind):
    from verl.trainer.ppo.core_algos import kl_penalty

    return kl_penalty(logprob=log_prob, ref_logprob=other, kl_penalty=kind)


def _check_shapes(log_prob, named: Mapping[str, Any]) -> None:
    shape = tuple(log_prob.shape)
    for name, tensor in named.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} does not match log_prob shape {shape}")


def _require_entropy(spec, needs, entropy) -> None:
    if needs & {registry.OLD_ENTROPY, registry.CURRENT_ENTROPY} and entropy is None:
        raise ValueError(f"loss_mode={spec.name} needs the per-token entropy")


def run_loss(spec: registry.AlgorithmSpec, options, *, old_log_prob, log_prob, advantages, response_mask,
             loss_agg_mode: str, config, entropy=None, rollout_is_weights=None, batch_stats=None,
             ref_log_prob=None, dp_group=None, minibatch_stats=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Call ``spec.loss`` with verl's clip settings, global aggregation and the data-parallel sum over ``dp_group``
    (none: one process). Metrics: 0-dim tensors named as verl logs them (``actor/pg_clipfrac`` ..., else
    ``actor/<name>/<key>``)."""
    needs = spec.needs_of_loss(options)
    _require_entropy(spec, needs, entropy)
    _check_shapes(log_prob, {"old_log_prob": old_log_prob, "advantages": advantages, "response_mask": response_mask,
                             "entropy": entropy, "rollout_is_weights": rollout_is_weights})
    clip_low, clip_high, clip_c = clip_settings(config)
    use_kl = ref_log_prob is not None and spec.loss_handles_kl
    inputs = registry.LossInputs(
        old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages, response_mask=response_mask,
        loss_agg_mode=loss_agg_mode, aggregate=global_aggregate(config, loss_agg_mode, response_mask),
        clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_c, entropy=entropy,
        batch_stats=batch_stats if registry.BATCH_STATS in needs else None, rollout_is_weights=rollout_is_weights,
        ref_log_prob=ref_log_prob if use_kl else None, kl_coef=float(config.get("kl_loss_coef", 0.0)) if use_kl else 0.0,
        kl_type=str(config.get("kl_loss_type", "low_var_kl")), kl=_kl, all_reduce=dp_all_reduce(dp_group),
        minibatch_stats=minibatch_stats if registry.MINIBATCH_STATS in needs else None)
    loss, raw = spec.loss(inputs, options)
    prefix = f"actor/{spec.name}/"
    metrics = {(f"actor/{k}" if k in registry.VERL_LOSS_METRICS else prefix + k): v for k, v in raw.items()}
    return loss, metrics


def compute_policy_loss(
    loss_mode: str,
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str,
    config,
    entropy: torch.Tensor | None = None,
    rollout_is_weights: torch.Tensor | None = None,
    batch_stats: Mapping | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Any registered policy loss, including those that need per-token entropy.

    Args:
        loss_mode: a registered loss name (``hapo_verl.registry.loss_specs()``), or one of verl's own losses
            (``clip_cov``, ``kl_cov``, ...: called through verl's registry; ``entropy`` and ``batch_stats`` unused).
        old_log_prob, log_prob, advantages, response_mask: (B, L), as verl's policy losses.
        loss_agg_mode: verl's aggregation mode; ``config.global_batch_info`` is honoured.
        config: verl's actor config (``ActorConfig`` or a DictConfig); the loss's options are read from
            ``config.policy_loss`` (verl's plain ``PolicyLossConfig`` reads as the defaults).
        entropy: (B, L) per-token entropy, for losses that need it.
        rollout_is_weights: optional (B, L) importance weights from verl's rollout correction.
        batch_stats: the loss's batch statistics (as the trainer computes them over the whole step). ``None``
            computes them over the tokens passed in.

    Returns:
        (loss, metrics), metrics as 0-dim tensors on the input's device (no host sync).
    """
    spec = registry.get(loss_mode)
    if spec is None or spec.loss is None:
        return _verl_policy_loss(loss_mode, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                                 rollout_is_weights)
    options = loss_options(spec, config.get("policy_loss", None))
    _check_shapes(log_prob, {"old_log_prob": old_log_prob, "advantages": advantages, "response_mask": response_mask,
                             "entropy": entropy, "rollout_is_weights": rollout_is_weights})
    _require_entropy(spec, spec.needs_of_loss(options), entropy)
    if batch_stats is None and spec.batch_stats is not None and registry.BATCH_STATS in spec.needs_of_loss(options):
        old = registry.OldPolicyBatch(response_mask=response_mask.bool(),
                                      entropy=None if entropy is None else entropy.detach(),
                                      old_log_prob=old_log_prob.detach())
        batch_stats = spec.batch_stats(old, options)
    return run_loss(spec, options, old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages,
                    response_mask=response_mask, loss_agg_mode=loss_agg_mode, config=config, entropy=entropy,
                    rollout_is_weights=rollout_is_weights, batch_stats=batch_stats)


def _verl_policy_loss(loss_mode, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                      rollout_is_weights):
    """One of verl's own policy losses (``clip_cov``, ``kl_cov``, ...) through verl's registry, metrics as 0-dim
    tensors on the input's device; it takes no entropy and no batch statistics."""
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

    if loss_mode not in POLICY_LOSS_REGISTRY:
        raise ValueError(f"{LOSS_KEY}.loss_mode={loss_mode!r} is not a hapo-verl loss; registered: "
                         f"{', '.join(registry.loss_specs())}; verl's own: {', '.join(sorted(POLICY_LOSS_REGISTRY))}")
    _check_shapes(log_prob, {"old_log_prob": old_log_prob, "advantages": advantages, "response_mask": response_mask,
                             "rollout_is_weights": rollout_is_weights})
    loss, metrics = POLICY_LOSS_REGISTRY[loss_mode](old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                                                    config, rollout_is_weights)
    return loss, {k: v if isinstance(v, torch.Tensor) else torch.full((), float(v), device=log_prob.device)
                  for k, v in metrics.items()}


def _raise_on_nan_inputs(named: dict, response_mask: torch.Tensor) -> None:
    mask = response_mask.bool()
    for name, tensor in named.items():
        if tensor is not None and torch.isnan(tensor.detach()[mask]).any():
            raise ValueError(f"{name} contains NaN at valid (response_mask) positions")


def compute_hapo_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    entropy: torch.Tensor,
    loss_agg_mode: str,
    config,
    rollout_is_weights: torch.Tensor | None = None,
    entropy_stats=None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """HAPO policy loss (adaptive clipping + advantage redistribution + dual-clip PPO); public API since 0.1.

    ``entropy`` (B, L) defines ĥ; ``entropy_stats`` (an ``EntropyStats`` or its dict) are the statistics of the
    whole training batch, ``None`` computes them over the valid tokens passed in. ``config.policy_loss`` must be
    a ``HAPOPolicyLossConfig`` (or its mapping). Returns (loss, metrics) with verl's ``actor/pg_clipfrac``,
    ``actor/ppo_kl``, ``actor/pg_clipfrac_lower`` and ``actor/hapo/*`` metrics as Python floats. Same as
    ``compute_policy_loss("hapo", ...)`` plus NaN diagnostics and float metrics.
    """
    policy_loss = config.get("policy_loss", None)
    if policy_loss is None or getattr(policy_loss, "get", lambda *_: None)("loss_mode", None) != "hapo":
        raise ValueError(f"the HAPO loss needs {LOSS_KEY} to be a HAPOPolicyLossConfig: set {LOSS_KEY}.loss_mode=hapo "
                         f"and {LOSS_KEY}._target_=hapo_verl.config.HAPOPolicyLossConfig")
    if entropy is None:
        raise ValueError("compute_hapo_policy_loss: entropy is required")
    stats = entropy_stats.to_dict() if hasattr(entropy_stats, "to_dict") else entropy_stats
    if stats is not None and not isinstance(stats, Mapping):
        raise TypeError(f"entropy_stats must be an EntropyStats or a dict, got {type(entropy_stats).__name__}")
    loss, metrics = compute_policy_loss("hapo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                                        config, entropy=entropy, rollout_is_weights=rollout_is_weights,
                                        batch_stats=stats)
    if not torch.isfinite(loss.detach()):
        _raise_on_nan_inputs({"old_log_prob": old_log_prob, "log_prob": log_prob, "advantages": advantages,
                              "entropy": entropy, "rollout_is_weights": rollout_is_weights}, response_mask)
    return loss, {k: float(v) for k, v in metrics.items()}


# ------------------------------------------------------------------------------ verl's standard signature
def verl_policy_loss(spec: registry.AlgorithmSpec):
    """The function registered as ``loss_mode=<spec.name>`` in verl's ``POLICY_LOSS_REGISTRY``."""

    def policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                    rollout_is_weights=None):
        options = loss_options(spec, config.get("policy_loss", None))
        if spec.needs_of_loss(options):
            raise LossNeedsTrainerError(
                f"{LOSS_KEY}.loss_mode={spec.name} was called through verl's standard policy-loss signature, which "
                f"carries no {', '.join(sorted(spec.needs_of_loss(options)))}. Launch with `hapo-verl` "
                "(python -m hapo_verl.main), whose trainer installs the loss in the actor workers, or call "
                f"hapo_verl.compute_policy_loss({spec.name!r}, ...) directly.")
        loss, metrics = run_loss(spec, options, old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages,
                                 response_mask=response_mask, loss_agg_mode=loss_agg_mode, config=config,
                                 rollout_is_weights=rollout_is_weights)
        return loss, metrics

    policy_loss.__name__ = policy_loss.__qualname__ = f"{spec.name}_policy_loss"
    policy_loss.__module__ = __name__
    policy_loss.__doc__ = f"``loss_mode={spec.name}`` with verl's standard signature ({spec.title}; {spec.module})."
    return policy_loss


# ------------------------------------------------------------------------------ worker side
def registered_ppo_loss(config, model_output, data, dp_group=None, minibatch_stats=None):
    """The worker-side loss for every registered loss (called by :class:`RegisteredLoss`): verl's ``ppo_loss``
    bookkeeping (global batch info, metric aggregation, entropy bonus, KL loss) around the spec's loss, fed with the
    old-policy entropy stored by verl's old-log-prob step, the current entropy, the batch statistics the trainer sent
    (``BATCH_STATS_FIELD``) or the mini-batch pass's statistics (``minibatch_stats``), as the spec asks."""
    from verl.trainer.ppo.core_algos import agg_loss, kl_penalty
    from verl.utils import tensordict_utils as tu
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils.padding import no_padding_2_padding

    spec = active_loss_spec(config)
    options = loss_options(spec, config.policy_loss)
    needs = spec.needs_of_loss(options)
    log_prob = no_padding_2_padding(model_output["log_probs"], data)
    current_entropy = model_output.get("entropy", None)
    if current_entropy is not None:
        current_entropy = no_padding_2_padding(current_entropy, data)

    info = config.global_batch_info
    info["dp_size"] = data["dp_size"]
    info["batch_num_tokens"] = data["batch_num_tokens"]
    info["global_batch_size"] = data["global_batch_size"]
    info["loss_scale_factor"] = config.loss_scale_factor
    summed = (data["dp_size"] > 1 or data["batch_num_tokens"] is not None or data["global_batch_size"] is not None
              or config.loss_scale_factor is not None)
    metric_aggregation = AggregationType.SUM if summed else AggregationType.MEAN

    fields = ["response_mask", "old_log_probs", "advantages"]
    entropy = None
    if registry.OLD_ENTROPY in needs:
        if OLD_ENTROPY_FIELD not in data.keys():
            raise RuntimeError(
                f"loss_mode={spec.name}: the old-policy entropy ('entropy') is missing from the actor batch; it is "
                "computed by verl's old-log-prob step, which algorithm.rollout_correction.bypass_mode=true skips")
        fields.append(OLD_ENTROPY_FIELD)
    elif registry.CURRENT_ENTROPY in needs:
        if current_entropy is None:
            raise RuntimeError(f"loss_mode={spec.name} with these options needs the current-policy entropy: set "
                               "actor_rollout_ref.actor.calculate_entropy=true")
        entropy = current_entropy
    batch_stats = None
    if registry.BATCH_STATS in needs:
        sent = tu.get_non_tensor_data(data=data, key=BATCH_STATS_FIELD, default=None)
        if sent is None or spec.name not in sent:
            raise RuntimeError(f"loss_mode={spec.name}: the trainer did not send this step's batch statistics "
                               f"({BATCH_STATS_FIELD})")
        batch_stats = sent[spec.name]
    if registry.MINIBATCH_STATS in needs and minibatch_stats is None:
        raise RuntimeError(
            f"loss_mode={spec.name}: the mini-batch pass did not run before this update mini-batch; it is installed "
            "with the loss by hapo-verl's trainer (hapo_verl.patches.minibatch_prepass)")
    padded = data.select(*fields, *[n for n in OPTIONAL_FIELDS if n in data.keys()]).to_padded_tensor()
    response_mask = padded["response_mask"].to(bool)
    if registry.OLD_ENTROPY in needs:
        entropy = padded[OLD_ENTROPY_FIELD].to(log_prob.dtype)
    use_kl = bool(config.use_kl_loss)

    pg_loss, pg_metrics = run_loss(
        spec, options, old_log_prob=padded["old_log_probs"], log_prob=log_prob, advantages=padded["advantages"],
        response_mask=response_mask, loss_agg_mode=config.loss_agg_mode, config=config, entropy=entropy,
        rollout_is_weights=padded.get("rollout_is_weights", None), batch_stats=batch_stats,
        ref_log_prob=padded["ref_log_prob"] if use_kl else None, dp_group=dp_group, minibatch_stats=minibatch_stats)
    if minibatch_stats is not None:
        from hapo_verl.integration.minibatch import TOKENS

        pg_metrics[f"actor/{spec.name}/{TOKENS}"] = minibatch_stats[TOKENS].to(torch.float32)
    metrics = dict(Metric.from_dict(pg_metrics, aggregation=AggregationType.MEAN))
    metrics["actor/pg_loss"] = Metric(value=pg_loss, aggregation=metric_aggregation)
    policy_loss = pg_loss
    if current_entropy is not None:
        entropy_loss = agg_loss(loss_mat=current_entropy, loss_mask=response_mask, loss_agg_mode=config.loss_agg_mode,
                                **info)
        policy_loss = policy_loss - config.entropy_coeff * entropy_loss
        metrics["actor/entropy_loss"] = Metric(value=entropy_loss, aggregation=metric_aggregation)
    if use_kl and not spec.loss_handles_kl:
        kld = kl_penalty(logprob=log_prob, ref_logprob=padded["ref_log_prob"], kl_penalty=config.kl_loss_type)
        kl_loss = agg_loss(loss_mat=kld, loss_mask=response_mask, loss_agg_mode=config.loss_agg_mode, **info)
        policy_loss = policy_loss + kl_loss * config.kl_loss_coef
        metrics["kl_loss"] = Metric(value=kl_loss, aggregation=metric_aggregation)
        metrics["kl_coef"] = config.kl_loss_coef
    return policy_loss, metrics


class RegisteredLoss:
    """The loss the trainer installs in the actor workers with ``set_loss_fn``: verl calls it per micro-batch as
    ``loss_fn(model_output=, data=, dp_group=)`` (:func:`registered_ppo_loss`). For a loss that needs statistics of
    the whole update mini-batch (``MINIBATCH_STATS``), verl's engine calls :meth:`before_mini_batch` before each
    mini-batch's micro-batches and :meth:`after_mini_batch` after them (:mod:`hapo_verl.patches.minibatch_prepass`,
    applied when the loss arrives in a worker process)."""

    def __init__(self, config):
        self.config = config
        self.minibatch_stats = None

    def __call__(self, model_output, data, dp_group=None):
        return registered_ppo_loss(self.config, model_output, data, dp_group=dp_group,
                                   minibatch_stats=self.minibatch_stats)

    def _spec_and_options(self):
        spec = active_loss_spec(self.config)
        return spec, loss_options(spec, self.config.policy_loss)

    @property
    def needs_minibatch_pass(self) -> bool:
        spec, options = self._spec_and_options()
        return registry.MINIBATCH_STATS in spec.needs_of_loss(options)

    def before_mini_batch(self, engine, data) -> None:
        """The mini-batch pass over ``data`` (one update mini-batch, on this data-parallel rank) with ``engine``."""
        self.minibatch_stats = None
        spec, options = self._spec_and_options()
        if registry.MINIBATCH_STATS not in spec.needs_of_loss(options):
            return
        from verl.utils import tensordict_utils as tu

        from hapo_verl.integration.minibatch import minibatch_statistics

        sent = tu.get_non_tensor_data(data=data, key=BATCH_STATS_FIELD, default=None)
        batch_stats = sent.get(spec.name) if sent and registry.BATCH_STATS in spec.needs_of_loss(options) else None
        self.minibatch_stats = minibatch_statistics(spec, options, engine, data, batch_stats=batch_stats,
                                                    old_entropy_field=OLD_ENTROPY_FIELD)

    def after_mini_batch(self) -> None:
        self.minibatch_stats = None

    def _apply_worker_shim(self) -> None:
        if self.needs_minibatch_pass:
            from hapo_verl.patches import shim_module

            shim_module("minibatch_prepass").apply()

    def __getstate__(self):
        return {"config": self.config}

    def __setstate__(self, state):
        # unpickled in each actor worker by set_loss_fn: install the engine hook in that process (not on the
        # driver, which runs no engine)
        self.config = state["config"]
        self.minibatch_stats = None
        self._apply_worker_shim()
