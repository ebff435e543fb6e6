"""Shared helpers of the per-algorithm loss tests: verl actor configs of any registered loss, random batches,
verl's aggregation and vanilla loss, GRPO's loop reference, worker-side batches, stub trainers and 2-step CPU runs."""

import json
import random
from unittest import mock

import torch

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def policy_loss_config(loss_mode="vanilla", **loss_kw):
    """verl's PolicyLossConfig for verl's own losses, the generated class of a registered one."""
    from verl.workers.config.actor import PolicyLossConfig

    from hapo_verl import config, registry

    spec = registry.get(loss_mode)
    if spec is None or spec.loss is None:
        return PolicyLossConfig(loss_mode=loss_mode, **loss_kw)
    return config.LOSS_CONFIG_CLASSES[config.loss_config_name(spec)](**loss_kw)


def actor_config(clip=(0.2, 0.28), use_kl_loss=False, kl_loss_coef=0.001, entropy_coeff=0.0, loss_mode="vanilla",
                 **loss_kw):
    from verl.workers.config import ActorConfig

    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=clip[0],
                       clip_ratio_high=clip[1], clip_ratio_c=10.0, use_kl_loss=use_kl_loss, kl_loss_coef=kl_loss_coef,
                       kl_loss_type="low_var_kl", entropy_coeff=entropy_coeff,
                       policy_loss=policy_loss_config(loss_mode, **loss_kw))


def random_batch(B=8, L=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    old = -torch.rand(B, L, generator=g) * 3
    new = old + torch.randn(B, L, generator=g) * 0.3
    adv = (torch.randn(B, 1, generator=g)).expand(B, L) * mask
    entropy = torch.rand(B, L, generator=g) * 2
    ref = old + torch.randn(B, L, generator=g) * 0.1
    return old, new, adv.contiguous(), mask, entropy, ref


def agg(mode, **info):
    from verl.trainer.ppo.core_algos import agg_loss

    return lambda mat, mask: agg_loss(loss_mat=mat, loss_mask=mask, loss_agg_mode=mode, **info)


def vanilla(old, new, adv, mask, mode, cfg):
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla

    return compute_policy_loss_vanilla(old_log_prob=old, log_prob=new, advantages=adv, response_mask=mask,
                                       loss_agg_mode=mode, config=cfg)


def worker_data(old, adv, mask, entropy, ref=None, batch_stats=None, global_batch_size=None, batch_num_tokens=None,
                dp_size=1):
    """The actor batch verl's workers hand to a loss function (padded: padding is mocked as identity)."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    from hapo_verl.integration.loss import BATCH_STATS_FIELD

    fields = {"response_mask": mask.float(), "old_log_probs": old, "advantages": adv, "entropy": entropy}
    if ref is not None:
        fields["ref_log_prob"] = ref
    data = TensorDict(fields, batch_size=[old.shape[0]])
    tu.assign_non_tensor(data, dp_size=dp_size, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size)
    if batch_stats is not None:
        tu.assign_non_tensor(data, **{BATCH_STATS_FIELD: batch_stats})
    return data


def metric_value(m):
    """A float from verl's Metric (one value) or a plain number."""
    values = getattr(m, "values", None)
    if values is not None:
        assert len(values) == 1
        m = values[0]
    return float(m.item() if isinstance(m, torch.Tensor) else m)


def identity_padding():
    return mock.patch("verl.workers.utils.padding.no_padding_2_padding", lambda tensor, data: tensor)


def stub_trainer(config):
    """The trainer without verl's start-up (no workers): its plan and per-step state from ``config``."""
    from hapo_verl.trainer.hapo_trainer import HAPOTrainerSync, StepPlan

    trainer = object.__new__(HAPOTrainerSync)
    trainer.config = config
    trainer.plan = StepPlan.from_config(config)
    trainer.batch_stats = {}
    trainer.hapo_rollout_stats = None
    trainer._old_policy = None
    return trainer


def read_metrics(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return {row["step"]: row["data"] for row in rows}


def run_tiny(config, out, timeout=900, overrides=()):
    """``python -m hapo_verl.cli tiny --config <config> --steps 2 --out <out> [overrides]`` through the shared CPU
    runner (private Ray temp dir, process-group cleanup, timeout). Returns (rc, output); rc is None on timeout."""
    from cpu_run_utils import run_verl

    res = run_verl(["tiny", "--config", config, "--steps", "2", "--out", str(out), *overrides], timeout=timeout,
                   module="hapo_verl.cli")
    return res.rc, res.output


def assert_loss_option_rejected(config, key, value, match):
    """``actor_rollout_ref.actor.policy_loss.<key>=<value>`` stops the launcher's start-up checks with ``match``
    (a GPU run's rollout is set: the launcher checks it first)."""
    import pytest

    from hapo_verl.launcher import compose, prepare_config

    composed = compose(config, ["actor_rollout_ref.rollout.name=vllm",
                                f"++actor_rollout_ref.actor.policy_loss.{key}={value}"])
    with pytest.raises(ValueError, match=match):
        prepare_config(composed)


def two_step_run_metrics(config, tmp_path, overrides=()):
    """The per-step metrics of a 2-step tiny CPU run of ``config`` with Hydra ``overrides`` (asserting it
    succeeded)."""
    rc, output = run_tiny(config, tmp_path, overrides=overrides)
    assert rc == 0, output[-6000:]
    metrics = read_metrics(tmp_path / config / "metrics.jsonl")
    assert {1, 2} <= set(metrics), metrics.keys()
    return metrics


#: a micro-batch split of the 8 rows of :func:`random_batch`
SPLIT = ([0, 1, 2], [3, 4, 5, 6], [7])


def assert_split_invariant(run, n_rows=8, split=SPLIT, abs_tol=None):
    """``run(rows) -> (loss value, gradient of those rows' log-probs, metrics)``: the micro-batches' losses sum to the
    whole batch's (relative 1e-6; ``abs_tol`` for a loss near 0, whose float32 sums cancel), and their gradients
    equal its gradient (verl's global-batch aggregation). Returns the whole batch's metrics."""
    import pytest

    full, g_full, metrics = run(list(range(n_rows)))
    total, grads = 0.0, torch.zeros_like(g_full)
    for rows in split:
        part, g, _ = run(rows)
        total += part
        grads[rows] = g
    assert total == pytest.approx(full, rel=1e-6, abs=abs_tol)
    assert torch.allclose(grads, g_full, atol=1e-7)
    return metrics


class MicroBatchEngine:
    """verl's engine as the mini-batch pass drives it: ``forward_backward_batch(data, loss_fn, forward_only=True)``
    calls ``loss_fn`` on each micro-batch of ``split`` (row lists of ``data``) with the model outputs taken from the
    given (B, L) ``log_prob`` / ``entropy`` (padding mocked as identity by the caller). ``forward_calls`` counts the
    passes."""

    def __init__(self, log_prob, split, entropy=None, dp_group=None):
        self.log_prob, self.split, self.entropy, self.dp_group = log_prob, split, entropy, dp_group
        self.forward_calls = 0

    def forward_backward_batch(self, data, loss_function, forward_only=False):
        assert forward_only
        self.forward_calls += 1
        for rows in self.split:
            idx = torch.tensor(rows)
            out = {"log_probs": self.log_prob[idx]}
            if self.entropy is not None:
                out["entropy"] = self.entropy[idx]
            loss_function(model_output=out, data=data[idx], dp_group=self.dp_group)

    def get_data_parallel_group(self):
        return self.dp_group


def minibatch_split_run(loss_mode, batch, split, current_entropy=None, dp_group=None, rows_of_rank=None, world=1,
                        **loss_kw):
    """The worker path of a loss with the mini-batch pass: ``RegisteredLoss.before_mini_batch`` over this rank's rows
    (micro-batches ``split``, local row lists), then ``run(rows)`` for :func:`assert_split_invariant`: the loss of
    those local rows alone with the pass's statistics. ``batch`` is :func:`random_batch`'s tuple for the whole
    mini-batch; ``rows_of_rank`` this data-parallel rank's rows of it (all by default). Returns (run, loss_fn,
    engine)."""
    from hapo_verl.integration.loss import RegisteredLoss

    old, new, adv, mask, entropy, _ = batch
    n_rows = old.shape[0]
    rows_of_rank = list(range(n_rows)) if rows_of_rank is None else rows_of_rank
    mine = torch.tensor(rows_of_rank)
    loss_fn = RegisteredLoss(actor_config(loss_mode=loss_mode, **loss_kw))
    data = worker_data(old[mine], adv[mine], mask[mine], entropy[mine], global_batch_size=n_rows,
                       batch_num_tokens=int(mask.sum()), dp_size=world)
    local_entropy = None if current_entropy is None else current_entropy[mine]
    engine = MicroBatchEngine(new[mine], split, local_entropy, dp_group)
    with identity_padding():
        loss_fn.before_mini_batch(engine, data)

    def run(rows):
        idx = torch.tensor(rows)
        lp = new[mine][idx].clone().requires_grad_(True)
        out = {"log_probs": lp}
        if local_entropy is not None:
            out["entropy"] = local_entropy[idx]
        with identity_padding():
            loss, metrics = loss_fn(out, data[idx], dp_group)
        loss.backward()
        return loss.item(), lp.grad, metrics

    return run, loss_fn, engine


#: overrides that let a GPU config pass the launcher's start-up checks without a model or a GPU (start-up tests)
START_UP_OVERRIDES = [
    "actor_rollout_ref.model.path=/nonexistent",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.name=vllm",
    "actor_rollout_ref.actor.strategy=fsdp2",
    "data.train_batch_size=4",
    "actor_rollout_ref.actor.ppo_mini_batch_size=4",
    "trainer.n_gpus_per_node=1",
    "actor_rollout_ref.rollout.n=2",
]


def grpo_loop(values, groups, eps=1e-6, norm_by_std=True):
    """GRPO's normalisation of per-response values within each group, one response at a time, with verl's
    conventions: unbiased std, a group of one has mean 0 and std 1."""
    import math

    adv = [0.0] * len(values)
    for g in set(groups):
        rows = [i for i in range(len(values)) if groups[i] == g]
        vals = [values[i] for i in rows]
        if len(rows) == 1:
            mean, std = 0.0, 1.0
        else:
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        for i in rows:
            adv[i] = (values[i] - mean) / (std + eps) if norm_by_std else values[i] - mean
    return adv


def random_group_batch(seed, max_len=9, holes=True):
    """The estimator tests' batch: interleaved groups of sizes 1..16 (shuffled rows), 0/1 or ±1 rewards, prefix masks
    (some of length 0 or 1) with optional holes (multi-turn masks), entropies with exact zeros and ties. Returns
    (scores (B,), mask (B, L), entropy (B, L), group of each row)."""
    rng = random.Random(seed)
    sizes = [rng.randint(1, 16) for _ in range(rng.randint(1, 6))]
    groups = [g for g, n in enumerate(sizes) for _ in range(n)]
    rng.shuffle(groups)
    B, L = len(groups), rng.randint(1, max_len)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, L + 1, (B,), generator=g)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).float()
    if holes:
        mask = mask * (torch.rand(B, L, generator=g) > 0.15).float()
    entropy = torch.rand(B, L, generator=g) * 3
    entropy[torch.rand(B, L, generator=g) < 0.1] = 0.0
    entropy[torch.rand(B, L, generator=g) < 0.1] = 0.5
    if seed % 2:
        scores = torch.randint(0, 2, (B,), generator=g).float()
    else:
        scores = torch.randint(0, 2, (B,), generator=g).float() * 2 - 1
    return scores, mask, entropy, groups
