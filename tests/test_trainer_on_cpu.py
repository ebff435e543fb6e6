"""Unit tests of the HAPO trainer glue with stubs (no Ray), config composition and start-up checks."""

import json
import os
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from hapo_verl.algorithms.entropy import EntropyStats
from hapo_verl.sampling.request import AdaptiveTemperatureRequest, parse_adaptive_temperature_args
from hapo_verl.entry_guard import check_entry_point
from hapo_verl.integration.loss import BATCH_STATS_FIELD
from hapo_verl.trainer.agent_loop import SAMPLING_ARGS_FIELD, add_sampling_args


def compose(name="hapo", overrides=()):
    from hapo_verl.launcher import compose as _compose

    return _compose(name, list(overrides))


BASE = [
    "actor_rollout_ref.model.path=/nonexistent",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.name=hfcpu",
    "actor_rollout_ref.actor.strategy=fsdp2",
    "data.train_batch_size=4",
    "actor_rollout_ref.actor.ppo_mini_batch_size=4",
    "trainer.n_gpus_per_node=1",
    "actor_rollout_ref.rollout.n=2",
]


class TestConfig:
    def test_hapo_config_composes_links_reference_compat_and_validates(self):
        from verl.trainer.main_ppo import need_critic, need_reference_policy
        from verl.utils.config import omega_conf_to_dataclass, validate_config

        from hapo_verl.config import HAPOPolicyLossConfig
        from hapo_verl.launcher import prepare_config

        cfg = compose("hapo", BASE + ["hapo.reference_compat=true"])
        assert cfg.algorithm.adv_estimator == "hapo"
        assert cfg.algorithm.hapo.reference_compat is True
        assert cfg.actor_rollout_ref.actor.policy_loss.reference_compat is True
        assert cfg.actor_rollout_ref.actor.calculate_entropy is True
        prepare_config(cfg)
        assert cfg.actor_rollout_ref.rollout.agent.agent_loop_config_path.endswith("agent_loops.yaml")
        validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
        actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
        assert isinstance(actor.policy_loss, HAPOPolicyLossConfig)
        assert actor.policy_loss.reference_compat is True

    def test_dapo_config_has_no_hapo_component(self):
        from hapo_verl.launcher import prepare_config
        from hapo_verl.trainer.hapo_trainer import StepPlan

        cfg = compose("dapo", BASE)
        prepare_config(cfg)
        plan = StepPlan.from_config(cfg)
        assert plan.loss_spec is None and plan.estimator_spec is None
        assert not plan.adaptive_temperature and not plan.needs_old_policy
        assert cfg.algorithm.adv_estimator == "grpo"
        assert cfg.algorithm.filter_groups.enable is True
        assert (cfg.actor_rollout_ref.actor.clip_ratio_low, cfg.actor_rollout_ref.actor.clip_ratio_high) == (0.2, 0.28)
        assert cfg.reward.reward_kwargs.overlong_buffer_cfg.enable is True

    @pytest.mark.parametrize(
        "override, pattern",
        [
            ("+hapo.temperture_tau=0.1", r"unknown option hapo\.temperture_tau"),
            ("hapo.temperature_tau=1.5", r"hapo\.temperature_tau must be in \[0, 1\)"),
            ("+algorithm.hapo.threshold=3", r"unknown option algorithm\.hapo\.threshold"),
            ("actor_rollout_ref.actor.policy_loss.clip_alpha=-1", r"policy_loss\.clip_alpha must be in \[0"),
            ("actor_rollout_ref.actor.policy_loss.reference_compat=true",
             r"policy_loss\.reference_compat must equal hapo\.reference_compat"),
            ("actor_rollout_ref.rollout.agent.default_agent_loop=single_turn_agent",
             r"default_agent_loop=hapo_single_turn"),
            ("actor_rollout_ref.rollout.n=1", r"actor_rollout_ref\.rollout\.n must be >= 2, got 1"),
            ("algorithm.rollout_correction.bypass_mode=true",
             r"algorithm\.rollout_correction\.bypass_mode=true skips .* set algorithm\.rollout_correction\.bypass_mode=false"),
            ("actor_rollout_ref.rollout.name=sglang",
             r"hapo\.adaptive_temperature=true needs a rollout that applies it .*rollout\.name=sglang"),
            ("trainer.v1.trainer_mode=async", r"trainer\.v1\.trainer_mode=async is not supported"),
        ],
    )
    def test_mistakes_stop_at_start_up_naming_the_key(self, override, pattern):
        from hapo_verl.launcher import prepare_config

        with pytest.raises(ValueError, match=pattern):
            prepare_config(compose("hapo", BASE + [override]))

    def test_missing_rollout_name_is_one_line_not_a_hydra_traceback(self):
        from hapo_verl.launcher import prepare_config

        base = [o for o in BASE if not o.startswith("actor_rollout_ref.rollout.name=")]
        with pytest.raises(ValueError, match=r"actor_rollout_ref\.rollout\.name is not set: use vllm .* or hfcpu"):
            prepare_config(compose("hapo", base))

    @pytest.mark.parametrize("estimator", ["grpo", "rloo", "grpo_vectorized"])
    def test_verl_group_estimators_need_two_responses_per_prompt(self, estimator):
        from hapo_verl.launcher import prepare_config

        with pytest.raises(ValueError, match=rf"adv_estimator={estimator} .*rollout\.n must be >= 2, got 1"):
            prepare_config(compose("dapo", BASE + [f"algorithm.adv_estimator={estimator}",
                                                   "actor_rollout_ref.rollout.n=1"]))
        prepare_config(compose("dapo", BASE + ["algorithm.adv_estimator=remax", "actor_rollout_ref.rollout.n=1"]))

    def test_verl_group_estimator_list_matches_verl(self):
        # verl's estimators that take the group index; the list must follow verl when it adds or drops one
        import inspect

        from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY

        from hapo_verl.launcher import VERL_GROUP_ESTIMATORS

        grouped = {name for name, fn in ADV_ESTIMATOR_REGISTRY.items()
                   if fn.__module__.startswith("verl.") and "index" in inspect.signature(fn).parameters}
        assert grouped == set(VERL_GROUP_ESTIMATORS)

    def test_nothing_left_to_train_is_detected_before_ray(self, tmp_path):
        from hapo_verl.launcher import nothing_left_to_train, resume_step

        ckpt = tmp_path / "ckpt"
        cfg = compose("hapo", BASE + [f"trainer.default_local_dir={ckpt}", "trainer.total_training_steps=4"])
        assert resume_step(cfg) is None and nothing_left_to_train(cfg) is None
        (ckpt / "global_step_4").mkdir(parents=True)
        (ckpt / "latest_checkpointed_iteration.txt").write_text("4")
        assert resume_step(cfg) == 4
        assert "nothing to train" in nothing_left_to_train(cfg) and "trainer.total_training_steps=4" in \
            nothing_left_to_train(cfg)
        more = compose("hapo", BASE + [f"trainer.default_local_dir={ckpt}", "trainer.total_training_steps=6"])
        assert nothing_left_to_train(more) is None  # continues from 4 to 6
        fresh = compose("hapo", BASE + [f"trainer.default_local_dir={ckpt}", "trainer.total_training_steps=4",
                                        "trainer.resume_mode=disable"])
        assert resume_step(fresh) is None

    def test_output_dir_puts_every_output_of_train_under_project_and_experiment(self, tmp_path):
        from hapo_verl.launcher import apply_output_dir
        from hapo_verl.outputs import OutputError

        plain = compose("hapo", BASE)
        assert apply_output_dir(plain) == {}  # unset: verl's own defaults
        cfg = compose("hapo", BASE + [f"trainer.output_dir={tmp_path}", "trainer.project_name=p",
                                      "trainer.experiment_name=e"])
        env = apply_output_dir(cfg)
        run = tmp_path / "p" / "e"
        assert cfg.trainer.default_local_dir == str(run / "checkpoints")
        assert env["VERL_FILE_LOGGER_PATH"] == str(run / "metrics.jsonl")
        assert env["TENSORBOARD_DIR"] == str(run / "tensorboard")
        with pytest.raises(OutputError, match=r"trainer\.output_dir='runs' is relative"):
            apply_output_dir(compose("hapo", BASE + ["trainer.output_dir=runs"]))

    def test_bypass_mode_is_fine_for_what_needs_no_old_policy(self):
        from hapo_verl.launcher import prepare_config

        prepare_config(compose("dapo", BASE + ["algorithm.rollout_correction.bypass_mode=true"]))

    def test_vllm_rollout_gets_the_logits_processor(self):
        pytest.importorskip("hapo_verl.vllm")
        from hapo_verl.launcher import prepare_config
        from hapo_verl.vllm import processor_fqcn

        cfg = compose("hapo", BASE + ["actor_rollout_ref.rollout.name=vllm"])
        prepare_config(cfg)
        assert processor_fqcn() in cfg.actor_rollout_ref.rollout.engine_kwargs.vllm.logits_processors


class TestEntryGuard:
    def test_plain_verl_with_hapo_loss_stops_with_equivalent_command(self):
        msg = check_entry_point(["python", "-m", "verl.trainer.main_ppo", "algorithm.adv_estimator=hapo",
                                 "actor_rollout_ref.actor.policy_loss.loss_mode=hapo"])
        assert msg and "hapo-verl train algorithm.adv_estimator=hapo" in msg

    def test_estimator_alone_and_other_programs_pass(self):
        assert check_entry_point(["python", "-m", "verl.trainer.main_ppo", "algorithm.adv_estimator=hapo"]) is None
        assert check_entry_point(["python", "-m", "hapo_verl.main", "policy_loss.loss_mode=hapo"]) is None

    def test_real_process_stops_at_start_up(self):
        import subprocess
        import sys

        proc = subprocess.run([sys.executable, "-m", "verl.trainer.main_ppo",
                               "actor_rollout_ref.actor.policy_loss.loss_mode=hapo"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2
        assert "hapo-verl train actor_rollout_ref.actor.policy_loss.loss_mode=hapo" in proc.stderr


def test_agent_loop_merges_stats_into_extra_args():
    stats = EntropyStats(pivot=0.1, scale=1.0, pos_scale=0.5, neg_scale=0.4)
    args = AdaptiveTemperatureRequest(stats, 0.05).to_extra_args()
    params = add_sampling_args({"temperature": 1.0, "extra_args": {"other": 1}}, args)
    assert params["extra_args"]["other"] == 1
    assert parse_adaptive_temperature_args(params["extra_args"]).stats.pivot == 0.1
    assert add_sampling_args({"temperature": 0.0}, args) == {"temperature": 0.0}  # greedy untouched
    assert add_sampling_args({"temperature": 1.0}, None) == {"temperature": 1.0}


def make_stub_trainer(tmp_path, hapo_overrides=()):
    """A HAPOTrainerSync without verl's __init__ (no Ray): the overrides are tested against mocked parents."""
    from loss_test_utils import stub_trainer

    trainer = stub_trainer(compose("hapo", BASE + [f"trainer.default_local_dir={tmp_path}"] + list(hapo_overrides)))
    trainer.global_steps = 1
    return trainer


class TestTrainerOverrides:
    def test_no_stats_at_step_one_then_stats_in_every_request(self, tmp_path):
        from tensordict import TensorDict
        from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
        from verl.utils import tensordict_utils as tu

        trainer = make_stub_trainer(tmp_path)
        with mock.patch.object(PPOTrainerSync, "_next_train_batch", lambda self, n=None: TensorDict({}, batch_size=[3])):
            first = trainer._next_train_batch()
            assert tu.get_non_tensor_data(first, SAMPLING_ARGS_FIELD, None) is None
            trainer.hapo_rollout_stats = EntropyStats(pivot=0.2, scale=1.0, pos_scale=1.0, neg_scale=1.0)
            second = trainer._next_train_batch()
        args = tu.get_non_tensor_data(second, SAMPLING_ARGS_FIELD, None)
        assert parse_adaptive_temperature_args(args).tau == pytest.approx(0.05)

    def test_adaptive_temperature_off_sends_nothing(self, tmp_path):
        from tensordict import TensorDict
        from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
        from verl.utils import tensordict_utils as tu

        trainer = make_stub_trainer(tmp_path, ["hapo.adaptive_temperature=false"])
        trainer.hapo_rollout_stats = EntropyStats(pivot=0.2, scale=1.0, pos_scale=1.0, neg_scale=1.0)
        with mock.patch.object(PPOTrainerSync, "_next_train_batch", lambda self, n=None: TensorDict({}, batch_size=[3])):
            batch = trainer._next_train_batch()
        assert tu.get_non_tensor_data(batch, SAMPLING_ARGS_FIELD, None) is None

    @pytest.mark.parametrize("compat", [False, True])
    def test_rollout_temperature_estimate_by_hand(self, tmp_path, compat):
        """T*f recomputed per valid token from the entropy and the statistics the requests carried; compared
        token by token with what the rollout reported, when it reports."""
        import math

        import torch

        trainer = make_stub_trainer(tmp_path, ["actor_rollout_ref.rollout.temperature=0.7",
                                               f"hapo.reference_compat={str(compat).lower()}"])
        sent = EntropyStats(pivot=0.0, scale=2.0, pos_scale=0.5, neg_scale=0.25, num_tokens=5)
        entropy = torch.tensor([[math.e, 1.0, 9.9], [math.exp(-2.0), 5.0, 5.0]])
        mask = torch.tensor([[True, True, False], [True, False, False]])
        # h = (log H - 0) / 2: e -> 0.5, 1 -> 0, e^-2 -> -1. Default: h*0.5 if h > 0 else h*0.25; fork: |h|*...
        # (and its floors 1e-6, scale + 1e-6); f = 1 + 0.05 * clamp(h_hat, -1, 1); temperature 0.7 * f
        eps = 1e-6 if compat else 0.0
        h = [0.5 * 2.0 / (2.0 + eps), 0.0, -1.0 * 2.0 / (2.0 + eps)]
        h_hat = [x * 0.5 if x > 0 else (abs(x) if compat else x) * 0.25 for x in h]
        expected = [0.7 * (1 + 0.05 * x) for x in h_hat]
        reported = [[expected[0] + 1e-4, expected[1]], [expected[2]]]
        extras = [{"hapo_token_temperatures": r, "hapo_stats_sent": True} for r in reported]
        fake = SimpleNamespace(get=lambda key, default=None: extras if key == "extra_fields" else default)
        with mock.patch("transfer_queue.kv_batch_get", lambda **kw: fake):
            out = trainer._rollout_temperature_metrics(SimpleNamespace(keys=[0, 1], partition_id="p"), entropy,
                                                       mask, sent)
            none_sent = trainer._rollout_temperature_metrics(SimpleNamespace(keys=[0, 1], partition_id="p"),
                                                             entropy, mask, None)
        assert out["hapo/rollout/requests_with_stats"] == 2.0
        assert out["hapo/rollout/temperature_est_min"] == pytest.approx(min(expected), abs=1e-6)
        assert out["hapo/rollout/temperature_est_max"] == pytest.approx(max(expected), abs=1e-6)
        assert out["hapo/rollout/temperature_est_mean"] == pytest.approx(sum(expected) / 3, abs=1e-6)
        assert out["hapo/rollout/temperature_est_max_abs_err"] == pytest.approx(1e-4, abs=1e-6)
        assert "hapo/rollout/temperature_est_mean" not in none_sent  # step 1: nothing was sent
        assert none_sent["hapo/rollout/temperature_mean"] == pytest.approx(sum(sum(r) for r in reported) / 3)

    def test_update_actor_sends_batch_stats_or_fails(self, tmp_path):
        from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

        trainer = make_stub_trainer(tmp_path)
        batch = SimpleNamespace(extra_info={})
        with mock.patch.object(PPOTrainerSync, "_update_actor", lambda self, b, m: b):
            with pytest.raises(RuntimeError, match="no batch statistics"):
                trainer._update_actor(batch, {})
            stats = EntropyStats(pivot=0.3, scale=2.0, pos_scale=1.0, neg_scale=1.0, num_tokens=9).to_dict()
            trainer.batch_stats = {"hapo": stats}
            trainer._update_actor(batch, {})
        assert batch.extra_info[BATCH_STATS_FIELD] == {"hapo": stats}

    def test_reference_compat_sends_no_batch_stats(self, tmp_path):
        from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

        trainer = make_stub_trainer(tmp_path, ["hapo.reference_compat=true"])
        batch = SimpleNamespace(extra_info={})
        with mock.patch.object(PPOTrainerSync, "_update_actor", lambda self, b, m: b):
            trainer._update_actor(batch, {})
        assert BATCH_STATS_FIELD not in batch.extra_info

    def test_checkpoint_round_trip_restores_stats(self, tmp_path):
        from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

        trainer = make_stub_trainer(tmp_path)
        trainer.global_steps = 3
        trainer.hapo_rollout_stats = EntropyStats(pivot=-0.4, scale=1.5, pos_scale=0.9, neg_scale=0.3, num_tokens=7)
        with mock.patch.object(PPOTrainerSync, "_save_checkpoint", lambda self: None):
            trainer._save_checkpoint()
        saved = json.load(open(os.path.join(tmp_path, "global_step_3", "hapo_state.json")))
        assert saved["rollout_stats"]["pivot"] == -0.4

        fresh = make_stub_trainer(tmp_path)

        def fake_load(self):
            self.global_steps = 3

        with mock.patch.object(PPOTrainerSync, "_load_checkpoint", fake_load):
            fresh._load_checkpoint()
        assert fresh.hapo_rollout_stats == trainer.hapo_rollout_stats

    def test_estimator_runs_through_the_trainer_hook_and_logs_its_metrics(self, tmp_path):
        import numpy as np
        from verl import DataProto
        from verl.trainer.ppo.ray_trainer import compute_advantage
        from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

        trainer = make_stub_trainer(tmp_path)
        assert trainer.plan.estimator_needs == frozenset()  # TLGA needs nothing from the old policy

        def parent(self, batch, metrics):
            data = DataProto.from_dict(tensors={"token_level_rewards": torch.tensor([[0, 0, 1.0], [0, 0, 0.0]]),
                                                "response_mask": torch.ones(2, 3)},
                                       non_tensors={"uid": np.array(["a", "a"], dtype=object)})
            compute_advantage(data, adv_estimator="hapo", config=self.config.algorithm)
            return batch

        metrics = {}
        with mock.patch.object(PPOTrainerSync, "_compute_advantage", parent):
            trainer._compute_advantage("batch", metrics)
        assert metrics["hapo/estimator/fallback_group_frac"] == 0.0
