"""HAPO on verl 0.9.1's default v1 trainer (``PPOTrainerSync``), through subclassing and verl's hooks.

One step, in verl's order, with what this class adds:

1. ``_next_train_batch``: attach the previous step's entropy statistics + tau to the training batch
   (``hapo_sampling_args``; read by :class:`~hapo_verl.trainer.agent_loop.HAPOSingleTurnAgentLoop`). Also
   covers DAPO refill batches. None at step 1 (and after a resume without saved statistics); never in
   validation, whose batches are built elsewhere.
2. ``_compute_old_log_prob``: verl computes old log-probs and the old-policy entropy; we compute the entropy
   statistics once over all valid tokens of the global batch, log ĥ and rollout-temperature metrics.
3. ``_compute_advantage``: the ``hapo`` estimator runs through verl's registry, with the old-policy entropy
   made available to it (:func:`hapo_verl.integration.estimator.entropy_for_estimator`).
4. ``_update_actor``: the batch statistics travel to the actor workers in the batch meta; the HAPO loss is
   installed in the workers at start-up with ``set_loss_fn``.
5. ``_save_checkpoint`` / ``_load_checkpoint``: the statistics are saved with verl's checkpoint and restored.
"""

from __future__ import annotations

import json
import logging
import os
from functools import partial

import numpy as np
import torch

from hapo_verl.algorithms.entropy import (
    AdaptiveTemperatureRequest,
    EntropyStats,
    compute_entropy_stats,
    entropy_score,
    row_temperature_factor_from_entropy,
)
from hapo_verl.trainer.agent_loop import SAMPLING_ARGS_FIELD
from hapo_verl.trainer.ppo_loss import STATS_FIELD, hapo_ppo_loss

logger = logging.getLogger("hapo_verl")

STATE_FILE = "hapo_state.json"
TOKEN_TEMPERATURES_KEY = "hapo_token_temperatures"

from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync  # noqa: E402

from hapo_verl.trainer.baselines import BaselinesTrainerMixin  # noqa: E402  (HAEPO, forking, Archer, EDGE-GRPO)


class HAPOSettings:
    """The trainer-level HAPO options (``hapo.*`` of our config), validated."""

    KEYS = {"reference_compat", "adaptive_temperature", "temperature_tau"}

    def __init__(self, config):
        from hapo_verl.algorithms.entropy import validate_tau
        from hapo_verl.config import check_unknown_keys

        options = dict(config.get("hapo", None) or {})
        check_unknown_keys("hapo", options, self.KEYS)
        self.reference_compat = bool(options.get("reference_compat", False))
        self.adaptive_temperature = bool(options.get("adaptive_temperature", False))
        self.temperature_tau = float(options.get("temperature_tau", 0.0))
        validate_tau(self.temperature_tau, key="hapo.temperature_tau")
        policy_loss = config.actor_rollout_ref.actor.policy_loss
        self.loss_active = policy_loss.get("loss_mode", "vanilla") == "hapo"
        self.entropy_pivot = float(policy_loss.get("entropy_pivot", 0.8)) if self.loss_active else 0.8
        self.estimator_active = config.algorithm.adv_estimator == "hapo"
        self.active = self.loss_active or self.adaptive_temperature or self.estimator_active


class HAPOTrainerSync(BaselinesTrainerMixin, PPOTrainerSync):
    def __init__(self, config):
        super().__init__(config)
        self.hapo = HAPOSettings(config)
        #: statistics of the current step's batch (loss) and of the previous step (next rollout)
        self.hapo_step_stats: EntropyStats | None = None
        self.hapo_rollout_stats: EntropyStats | None = None
        self.hapo_requests_with_stats = 0

    # ---------------------------------------------------------------- start-up: the loss in every worker
    def on_init_end(self):
        if self.hapo.loss_active:
            from verl.utils.config import omega_conf_to_dataclass

            actor_config = omega_conf_to_dataclass(self.config.actor_rollout_ref.actor)
            self.actor_rollout_wg.set_loss_fn(partial(hapo_ppo_loss, config=actor_config))
            logger.info("hapo-verl: HAPO loss installed in the actor workers")
        super().on_init_end()

    # ---------------------------------------------------------------- 1. statistics into the requests
    def _next_train_batch(self, num_prompts: int | None = None):
        from verl.utils import tensordict_utils as tu

        batch = super()._next_train_batch(num_prompts)
        if self.hapo.adaptive_temperature and self.hapo_rollout_stats is not None:
            request = AdaptiveTemperatureRequest(self.hapo_rollout_stats, self.hapo.temperature_tau,
                                                 self.hapo.reference_compat)
            tu.assign_non_tensor_data(batch, SAMPLING_ARGS_FIELD, request.to_extra_args())
            self.hapo_requests_with_stats += len(batch)
        return batch

    # ---------------------------------------------------------------- 2. batch statistics
    def _compute_old_log_prob(self, batch, metrics: dict):
        import transfer_queue as tq

        batch = super()._compute_old_log_prob(batch, metrics)
        if not self.hapo.active:
            return batch
        fields = ["entropy", "response_mask"]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        if "entropy" not in data.keys():
            raise RuntimeError(
                "HAPO needs the old-policy entropy that verl computes in its old-log-prob step, but the batch has "
                "none: algorithm.rollout_correction.bypass_mode=true skips that step. Disable bypass_mode."
            )
        padded = data.to_padded_tensor()
        entropy, mask = padded["entropy"].float(), padded["response_mask"].bool()
        sent_stats = self.hapo_rollout_stats  # what this step's requests carried (None at step 1)
        stats = compute_entropy_stats(entropy, mask, self.hapo.entropy_pivot)
        self.hapo_step_stats = stats
        self.hapo_rollout_stats = stats  # used by the next step's generation requests
        self._hapo_entropy = (entropy, mask)
        metrics.update(self._entropy_metrics(entropy, mask, stats))
        metrics.update(self._rollout_temperature_metrics(batch, entropy, mask, sent_stats))
        return batch

    def _entropy_metrics(self, entropy, mask, stats: EntropyStats) -> dict:
        h_hat = entropy_score(entropy, stats, reference_compat=self.hapo.reference_compat,
                              clamp=not self.hapo.reference_compat)[mask]
        out = {"hapo/stats/pivot": stats.pivot, "hapo/stats/scale": stats.scale,
               "hapo/stats/pos_scale": stats.pos_scale, "hapo/stats/neg_scale": stats.neg_scale,
               "hapo/stats/num_tokens": stats.num_tokens}
        if h_hat.numel():
            q = torch.quantile(h_hat.float()[: 1 << 24], torch.tensor([0.1, 0.5, 0.9]))
            out.update({"hapo/h_hat/mean": h_hat.mean().item(), "hapo/h_hat/p10": q[0].item(),
                        "hapo/h_hat/p50": q[1].item(), "hapo/h_hat/p90": q[2].item(),
                        "hapo/h_hat/positive_frac": (h_hat > 0).float().mean().item()})
        return out

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
        if not (self.hapo.adaptive_temperature and sent and sent_stats is not None and entropy is not None):
            return out
        temperature = float(self.config.actor_rollout_ref.rollout.temperature)
        st = sent_stats
        est = temperature * row_temperature_factor_from_entropy(
            entropy, st.pivot, st.scale, st.pos_scale, st.neg_scale, self.hapo.temperature_tau,
            self.hapo.reference_compat).double()
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

    # ---------------------------------------------------------------- 3. estimator with entropy
    def _compute_advantage(self, batch, metrics: dict):
        from hapo_verl.integration.estimator import LAST_CALL, entropy_for_estimator

        if not self.hapo.estimator_active:
            return super()._compute_advantage(batch, metrics)
        entropy = getattr(self, "_hapo_entropy", (None, None))[0]
        LAST_CALL.clear()
        with entropy_for_estimator(entropy):
            batch = super()._compute_advantage(batch, metrics)
        metrics["hapo/estimator/received_entropy"] = float(LAST_CALL.get("entropy_shape") is not None)
        return batch

    # ---------------------------------------------------------------- 4. statistics to the actor workers
    def _update_actor(self, batch, metrics: dict):
        if self.hapo.loss_active and not self.hapo.reference_compat:
            if self.hapo_step_stats is None:
                raise RuntimeError("HAPO loss: no entropy statistics were computed for this step")
            batch.extra_info[STATS_FIELD] = self.hapo_step_stats.to_dict()
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
