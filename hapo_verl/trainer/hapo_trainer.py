"""The one trainer: verl 0.9.1's default v1 trainer (``PPOTrainerSync``) plus what the registered algorithms ask
for, through subclassing and verl's hooks. Nothing here names an algorithm; it reads the specs of the configured
``adv_estimator`` and ``loss_mode`` (:mod:`hapo_verl.registry`).

One step, in verl's order, with what this class adds:

1. ``_next_train_batch``: with adaptive temperature on, attach the previous step's entropy statistics + τ to the
   training batch (``hapo_sampling_args``, read by the agent loop). None at step 1 (and after a resume without saved
   statistics); never in validation.
2. ``_compute_old_log_prob``: verl computes old log-probs and the old-policy entropy. If a spec needs them on the
   driver, read them once for the whole batch (:func:`fetch_old_policy`) and run the specs' batch statistics.
3. ``_compute_advantage``: the estimator runs through verl's registry with what its spec needs made available
   (:func:`hapo_verl.integration.estimator.estimator_inputs`); its metrics are logged.
4. ``_update_actor``: every enabled selection step (``algorithm.<name>.enable``, e.g. a down-sampling of samples
   and tokens) marks the tokens the update uses, as ``response_mask`` for the update only
   (:func:`hapo_verl.integration.selection.selected_for_update`); the loss's batch statistics travel to the
   workers in the batch meta; the loss itself was
   installed in the workers at start-up with ``set_loss_fn`` (:class:`RegisteredLoss`, which also runs the
   mini-batch pass before each update mini-batch for a loss that needs it).
5. ``_save_checkpoint`` / ``_load_checkpoint``: the rollout's entropy statistics are saved and restored.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from hapo_verl import registry
from hapo_verl.algorithms.entropy import EntropyStats, row_temperature_factor_from_entropy
from hapo_verl.integration import estimator as estimator_glue
from hapo_verl.integration import selection as selection_glue
from hapo_verl.integration import steps as steps_glue
from hapo_verl.integration.loss import BATCH_STATS_FIELD, RegisteredLoss
from hapo_verl.integration.options import active_estimator_spec, active_loss_spec, estimator_options, loss_options
from hapo_verl.sampling.request import TOKEN_TEMPERATURES_KEY, AdaptiveTemperatureRequest
from hapo_verl.trainer.agent_loop import SAMPLING_ARGS_FIELD

logger = logging.getLogger("hapo_verl")

STATE_FILE = "hapo_state.json"
OLD_POLICY_FIELDS = ("old_log_probs", "entropy", "response_mask")


@dataclass
class StepPlan:
    """What the trainer does for the configured algorithms, read once from verl's config and validated."""

    loss_spec: registry.AlgorithmSpec | None
    loss_options: object
    estimator_spec: registry.AlgorithmSpec | None
    estimator_options: object
    sampling_spec: registry.AlgorithmSpec
    sampling: object  # the sampling spec's sampling_options: reference_compat, adaptive_temperature, temperature_tau
    selections: list = field(default_factory=list)  # (spec, options) of the enabled selection steps

    @classmethod
    def from_config(cls, config) -> "StepPlan":
        actor = config.actor_rollout_ref.actor
        loss_spec = active_loss_spec(actor)
        estimator_spec = active_estimator_spec(config.algorithm)
        sampler = registry.rollout_stats_spec()
        plan = cls(
            loss_spec=loss_spec,
            loss_options=None if loss_spec is None else loss_options(loss_spec, actor.policy_loss),
            estimator_spec=estimator_spec,
            estimator_options=None if estimator_spec is None else estimator_options(estimator_spec, config.algorithm),
            sampling_spec=sampler,
            sampling=registry.load_options(sampler.sampling_options, config.get(sampler.name, None), sampler.name),
            selections=selection_glue.enabled_selections(config.algorithm),
        )
        plan.validate(config)
        return plan

    def validate(self, config) -> None:
        if registry.RESPONSE_STEPS in self.loss_needs:
            raise ValueError(f"loss_mode={self.loss_spec.name}: only an advantage estimator can need the response "
                             "steps (registry.RESPONSE_STEPS)")
        for spec in {s.name: s for s in (self.loss_spec, self.estimator_spec) if s is not None}.values():
            if spec.loss_requires_estimator and not (self.loss_spec is spec and self.estimator_spec is spec):
                raise ValueError(
                    f"{spec.title} needs both actor_rollout_ref.actor.policy_loss.loss_mode={spec.name} and "
                    f"algorithm.adv_estimator={spec.name} (the estimator computes what the loss uses); got "
                    f"loss_mode={config.actor_rollout_ref.actor.policy_loss.get('loss_mode')!r}, "
                    f"adv_estimator={config.algorithm.adv_estimator!r}")

    @property
    def loss_needs(self) -> frozenset:
        return frozenset() if self.loss_spec is None else self.loss_spec.needs_of_loss(self.loss_options)

    @property
    def estimator_needs(self) -> frozenset:
        return frozenset() if self.estimator_spec is None else \
            self.estimator_spec.needs_of_estimator(self.estimator_options)

    @property
    def adaptive_temperature(self) -> bool:
        return bool(self.sampling.adaptive_temperature)

    def batch_stats_hooks(self) -> list[tuple[registry.AlgorithmSpec, object]]:
        """(spec, options) of every batch-statistics hook to run this step, each once."""
        return registry.batch_stats_hooks(self.loss_spec, self.loss_options, self.estimator_spec,
                                          self.estimator_options,
                                          self.sampling_spec if self.adaptive_temperature else None)

    @property
    def needs_old_policy(self) -> bool:
        driver = (self.estimator_needs | selection_glue.selection_needs(self.selections)) & {
            registry.OLD_LOG_PROB, registry.OLD_ENTROPY}
        return bool(driver or self.batch_stats_hooks())


def fetch_old_policy(batch) -> dict[str, torch.Tensor]:
    """The padded ``old_log_probs``, ``entropy`` and ``response_mask`` of the whole batch from TransferQueue."""
    import transfer_queue as tq

    data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=list(OLD_POLICY_FIELDS))
    if "entropy" not in data.keys() or "old_log_probs" not in data.keys():
        raise RuntimeError(
            "the configured loss/estimator needs the old-policy log-probs and entropy that verl computes in its "
            "old-log-prob step, but the batch has none: algorithm.rollout_correction.bypass_mode=true skips that "
            "step. Disable bypass_mode.")
    padded = data.to_padded_tensor()
    return {"old_log_probs": padded["old_log_probs"].float(), "entropy": padded["entropy"].float(),
            "response_mask": padded["response_mask"].bool()}


def fetch_step_ends(batch, tokenizer) -> torch.Tensor:
    """(B, L) bool: the response tokens of the batch that end a step (a line: :mod:`hapo_verl.integration.steps`)."""
    import transfer_queue as tq

    data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["responses"])
    responses = data["responses"].to_padded_tensor(padding=-1)  # -1: padding ends no line
    return steps_glue.step_ends(responses, steps_glue.line_end_tokens(tokenizer))


class HAPOTrainerSync(PPOTrainerSync):
    """verl's ``PPOTrainerSync`` for every registered algorithm (the module docstring lists what it adds)."""

    def __init__(self, config):
        super().__init__(config)
        self.plan = StepPlan.from_config(config)
        #: batch statistics of the current step, by spec name (sent to the workers, handed to the estimator)
        self.batch_stats: dict[str, dict] = {}
        #: entropy statistics the next rollout samples with (adaptive temperature), restored from checkpoints
        self.hapo_rollout_stats: EntropyStats | None = None
        self._old_policy: dict | None = None

    # ---------------------------------------------------------------- start-up: the loss in every worker
    def on_init_end(self):
        if self.plan.loss_spec is not None:
            from verl.utils.config import omega_conf_to_dataclass

            actor_config = omega_conf_to_dataclass(self.config.actor_rollout_ref.actor)
            self.actor_rollout_wg.set_loss_fn(RegisteredLoss(actor_config))
            logger.info("hapo-verl: %s loss installed in the actor workers", self.plan.loss_spec.title)
        super().on_init_end()

    # ---------------------------------------------------------------- 1. statistics into the requests
    def _next_train_batch(self, num_prompts: int | None = None):
        from verl.utils import tensordict_utils as tu

        batch = super()._next_train_batch(num_prompts)
        if self.plan.adaptive_temperature and self.hapo_rollout_stats is not None:
            request = AdaptiveTemperatureRequest(self.hapo_rollout_stats, self.plan.sampling.temperature_tau,
                                                 self.plan.sampling.reference_compat)
            tu.assign_non_tensor_data(batch, SAMPLING_ARGS_FIELD, request.to_extra_args())
        return batch

    # ---------------------------------------------------------------- 2. old policy, batch statistics
    def _compute_old_log_prob(self, batch, metrics: dict):
        batch = super()._compute_old_log_prob(batch, metrics)
        self.batch_stats = {}
        if not self.plan.needs_old_policy:
            return batch
        old = fetch_old_policy(batch)
        self._old_policy = old
        view = registry.OldPolicyBatch(response_mask=old["response_mask"], entropy=old["entropy"],
                                       old_log_prob=old["old_log_probs"])
        for spec, options in self.plan.batch_stats_hooks():
            stats = spec.batch_stats(view, options)
            self.batch_stats[spec.name] = stats
            if spec.batch_metrics is not None:
                metrics.update(spec.batch_metrics(view, options, stats))
        if self.plan.adaptive_temperature:
            sent_stats = self.hapo_rollout_stats  # what this step's requests carried (None at step 1)
            self.hapo_rollout_stats = EntropyStats.from_dict(self.batch_stats[self.plan.sampling_spec.name])
            metrics.update(self._rollout_temperature_metrics(batch, old["entropy"], old["response_mask"], sent_stats))
        return batch

    def _rollout_temperature_metrics(self, batch, entropy=None, mask=None, sent_stats=None) -> dict:
        """Effective per-token sampling temperatures of this step's rollout.

        ``hapo/rollout/temperature_{min,mean,max}``: as reported by the rollout (the CPU rollout reports every
        token's T*f; vLLM has no per-token side channel). ``hapo/rollout/temperature_est_{min,mean,max}``: T*f
        recomputed from the old-policy entropy with the statistics this step's requests carried, for any rollout
        (exact for T = 1 without penalties, up to rollout-vs-actor numerics; for T != 1 the actor's entropy is of
        z/T while the processor measured z). Where both exist per token, ``temperature_est_max_abs_err`` compares
        them.
        """
        import transfer_queue as tq

        try:
            data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
            extras = [getattr(e, "data", e) or {} for e in _as_list(data.get("extra_fields", None))]
        except Exception:  # noqa: BLE001 - a rollout that reports nothing
            extras = []
        reported = [list(e.get(TOKEN_TEMPERATURES_KEY, []) or []) for e in extras]
        sent = sum(int(bool(e.get("hapo_stats_sent", False))) for e in extras)
        out = {"hapo/rollout/requests_with_stats": float(sent)}
        values = [t for per_sample in reported for t in per_sample]
        if values:
            t = np.asarray(values, dtype=np.float64)
            out.update({"hapo/rollout/temperature_min": float(t.min()), "hapo/rollout/temperature_mean": float(t.mean()),
                        "hapo/rollout/temperature_max": float(t.max())})
        if not (sent and sent_stats is not None and entropy is not None):
            return out
        temperature = float(self.config.actor_rollout_ref.rollout.temperature)
        st = sent_stats
        est = temperature * row_temperature_factor_from_entropy(
            entropy, st.pivot, st.scale, st.pos_scale, st.neg_scale, self.plan.sampling.temperature_tau,
            self.plan.sampling.reference_compat).double()
        valid = est[mask]
        if valid.numel():
            out.update({"hapo/rollout/temperature_est_min": valid.min().item(),
                        "hapo/rollout/temperature_est_mean": valid.mean().item(),
                        "hapo/rollout/temperature_est_max": valid.max().item()})
        lengths = mask.sum(dim=-1).tolist()
        if len(reported) == len(lengths) and all(len(r) == n for r, n in zip(reported, lengths)) and values:
            exact = torch.tensor(values, dtype=torch.float64)
            out["hapo/rollout/temperature_est_max_abs_err"] = (valid - exact).abs().max().item()
        return out

    # ---------------------------------------------------------------- 3. estimator with what it needs
    def _compute_advantage(self, batch, metrics: dict):
        spec = self.plan.estimator_spec
        old, self._old_policy = self._old_policy or {}, None  # the step's last use of the old-policy tensors
        self._selection_old_policy = old if self.plan.selections else None  # ... but for the selection steps
        if spec is None:
            return super()._compute_advantage(batch, metrics)
        estimator_glue.LAST_METRICS.clear()
        steps = fetch_step_ends(batch, self.tokenizer) if registry.RESPONSE_STEPS in self.plan.estimator_needs else None
        with estimator_glue.estimator_inputs(old_log_prob=old.get("old_log_probs"), entropy=old.get("entropy"),
                                             batch_stats=self.batch_stats.get(spec.name), step_ends=steps):
            batch = super()._compute_advantage(batch, metrics)
        for key, value in estimator_glue.LAST_METRICS.items():
            if isinstance(value, float) and math.isfinite(value):
                metrics[key] = value
        return batch

    # ---------------------------------------------------------------- 4. batch statistics to the workers
    def _update_actor(self, batch, metrics: dict):
        spec = self.plan.loss_spec
        if spec is not None and registry.BATCH_STATS in self.plan.loss_needs:
            if spec.name not in self.batch_stats:
                raise RuntimeError(f"loss_mode={spec.name}: no batch statistics were computed for this step")
            batch.extra_info[BATCH_STATS_FIELD] = {spec.name: self.batch_stats[spec.name]}
        if not self.plan.selections:
            return super()._update_actor(batch, metrics)
        old, self._selection_old_policy = getattr(self, "_selection_old_policy", None), None
        with selection_glue.selected_for_update(batch, self.plan.selections, old, self.global_steps,
                                                self.total_training_steps, metrics):
            return super()._update_actor(batch, metrics)

    # ---------------------------------------------------------------- 5. checkpoints
    def _save_checkpoint(self):
        super()._save_checkpoint()
        folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        os.makedirs(folder, exist_ok=True)
        state = {"rollout_stats": None if self.hapo_rollout_stats is None else self.hapo_rollout_stats.to_dict(),
                 "global_steps": self.global_steps}
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump(state, f, indent=2)

    def _load_checkpoint(self):
        super()._load_checkpoint()
        if self.global_steps <= 0:
            return
        folder = self.config.trainer.get("resume_from_path", None) if self.config.trainer.resume_mode == "resume_path" \
            else os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        if folder and not os.path.isabs(folder):
            folder = os.path.join(os.getcwd(), folder)
        path = os.path.join(folder or "", STATE_FILE)
        if os.path.exists(path):
            with open(path) as f:
                state = json.load(f)
            if state.get("rollout_stats"):
                self.hapo_rollout_stats = EntropyStats.from_dict(state["rollout_stats"])
                logger.warning("hapo-verl: restored entropy statistics from %s", path)
        else:
            logger.warning("hapo-verl: no %s in the checkpoint; adaptive temperature starts without statistics", path)


def _as_list(value):
    if value is None:
        return []
    if hasattr(value, "tolist"):
        try:
            return value.tolist()
        except Exception:  # noqa: BLE001
            pass
    return list(value)
