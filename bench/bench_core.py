"""Speed of the HAPO estimator and loss, as ratios measured side by side in one run.

    .venv/bin/python bench/bench_core.py [--quick]

1. Estimator at 512 prompts x 16 responses, 4096 response tokens:
   hapo (ours) / verl's grpo_vectorized        (target <= 1.2)
   authors' algorithm as a per-group loop / hapo (target >= 10)
2. Loss forward+backward at 8192 x 1024 tokens:
   hapo (ours, batch statistics given) / verl's vanilla policy loss      (target <= 1.5)
   fork-style (statistics sorted inside the loss) / vanilla, for reference
3. Every registered loss (hapo_verl.registry.loss_specs(), default options, batch statistics computed beforehand
   as the trainer does), forward+backward at 8192 x 1024 tokens / verl's vanilla policy loss (target <= 1.3 for the
   losses added since the registry); losses registered later join without edits.
   ``--section registry`` runs only this part, ``--losses NAME,...`` a subset.
4. Every registered estimator (hapo_verl.registry.estimator_specs(), default options, given what its spec needs as
   the trainer gives it: old-policy entropy and log-probs, batch statistics computed beforehand) at 512 prompts x 16,
   4096 tokens (random interleaved groups) / verl's grpo_vectorized (target <= 2); estimators registered later join
   without edits. ``--section estimators`` runs only this part, ``--estimators NAME,...`` a subset.
5. Every registered selection step (hapo_verl.registry.selection_specs(), enabled, at its first step's keep ratios,
   given what the trainer gives it: verl's GRPO advantages, the old-policy entropy, the rows' response lengths) at
   512 prompts x 16, 4096 tokens (the batch of section 4) / verl's grpo_vectorized (target <= 2), both with one
   torch thread by default (``--selection-threads``): both run in verl's TaskRunner, a Ray actor with num_cpus=1,
   which Ray starts with OMP_NUM_THREADS=1. ``--section selections`` runs only this part.
Timings are medians over repeats; only the ratios are meaningful across machines.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import numpy as np
import torch


def median_times(fns: dict, repeats: int) -> dict:
    """Median seconds of each function, measured interleaved (a, b, c, a, b, c, ...) so that a load change on
    the machine hits every candidate alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def loop_estimator(token_level_rewards, response_mask, index, epsilon=1e-6, threshold=5.0):
    """The authors' estimator as they wrote it: Python loops over rows and groups on the (rows x L) block."""
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    grpo, _ = compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon)
    scores = token_level_rewards.sum(dim=-1).unsqueeze(-1) * response_mask
    rows_of = defaultdict(list)
    for i in range(scores.shape[0]):
        rows_of[index[i]].append(i)
    for rows in rows_of.values():
        block, masks = scores[rows], response_mask[rows]
        valid = block.masked_select(masks.bool())
        normed = (block - valid.mean()) / (valid.std(unbiased=False) + epsilon)
        scores[rows] = grpo[rows] if torch.any(normed.abs() >= threshold) else normed
    return scores, scores


def bench_estimator(prompts: int, n: int, length: int, repeats: int) -> dict:
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn
    from omegaconf import OmegaConf

    import hapo_verl  # noqa: F401  (registration through verl's plugin)

    torch.manual_seed(0)
    B = prompts * n
    lengths = torch.randint(1, length + 1, (B,))
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()
    tlr = torch.zeros(B, length)
    tlr[torch.arange(B), lengths - 1] = torch.randint(0, 2, (B,)).float() * 2 - 1
    index = np.array([f"uid-{i // n}" for i in range(B)], dtype=object)
    algo = OmegaConf.create({"hapo": {}})

    grpo = get_adv_estimator_fn("grpo_vectorized")
    hapo = get_adv_estimator_fn("hapo")
    fast = median_times({
        "grpo": lambda: grpo(token_level_rewards=tlr, response_mask=mask, index=index),
        "hapo": lambda: hapo(token_level_rewards=tlr, response_mask=mask, index=index, config=algo),
    }, repeats)
    t_grpo, t_hapo = fast["grpo"], fast["hapo"]
    start = time.perf_counter()
    loop_estimator(tlr, mask, index)
    t_loop = time.perf_counter() - start
    # the loop and ours must agree (default mode checks valid tokens only; compare on a case without fallback)
    ours, _ = hapo(token_level_rewards=tlr, response_mask=mask, index=index,
                   config=OmegaConf.create({"hapo": {"reference_compat": True}}))
    theirs, _ = loop_estimator(tlr, mask, index)
    agree = torch.allclose(ours, theirs * mask, atol=1e-4)
    return {"grpo_vectorized_s": t_grpo, "hapo_s": t_hapo, "loop_s": t_loop, "agree": agree}


def bench_loss(rows: int, length: int, repeats: int) -> dict:
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla
    from verl.workers.config import ActorConfig

    from hapo_verl.algorithms.entropy import compute_entropy_stats
    from hapo_verl.config import HAPOPolicyLossConfig
    from hapo_verl.integration.loss import compute_hapo_policy_loss

    torch.manual_seed(0)
    lengths = torch.randint(length // 4, length + 1, (rows,))
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()
    old = -torch.rand(rows, length) * 2
    base = old + torch.randn(rows, length) * 0.1
    adv = torch.randn(rows, 1).expand(rows, length).contiguous() * mask
    entropy = torch.rand(rows, length) * 3
    vanilla_cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_c=10.0)
    hapo_cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_c=10.0,
                           policy_loss=HAPOPolicyLossConfig())
    stats = compute_entropy_stats(entropy, mask)

    def step(fn):
        def run():
            new = base.clone().requires_grad_(True)
            loss = fn(new)
            loss.backward()
        return run

    vanilla = step(lambda new: compute_policy_loss_vanilla(old, new, adv, mask, "token-mean", vanilla_cfg)[0])
    ours = step(lambda new: compute_hapo_policy_loss(old, new, adv, mask, entropy, "token-mean", hapo_cfg,
                                                     entropy_stats=stats)[0])
    in_loss_stats = step(lambda new: compute_hapo_policy_loss(old, new, adv, mask, entropy, "token-mean",
                                                              hapo_cfg)[0])
    times = median_times({"vanilla": vanilla, "ours": ours, "in_loss": in_loss_stats}, repeats)
    t_vanilla, t_ours, t_in_loss = times["vanilla"], times["ours"], times["in_loss"]
    return {"vanilla_s": t_vanilla, "hapo_s": t_ours, "hapo_stats_in_loss_s": t_in_loss}


#: verl's built-in losses with a config here, measured beside the registered ones
VERL_COV_LOSSES = ("clip_cov", "kl_cov")


def bench_registry_losses(rows: int, length: int, repeats: int, names: list[str] | None = None) -> dict:
    """Median fwd+bwd seconds of verl's vanilla loss and of every registered loss, measured interleaved. Each loss
    gets its default options, the per-token entropy when it needs one, and its batch statistics computed beforehand
    over the whole batch (the trainer's driver-side hook), so the timing is the worker-side loss alone."""
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla, get_policy_loss_fn
    from verl.workers.config import ActorConfig
    from verl.workers.config.actor import PolicyLossConfig

    from hapo_verl import config as loss_configs
    from hapo_verl import registry
    from hapo_verl.integration.loss import run_loss

    torch.manual_seed(0)
    lengths = torch.randint(length // 4, length + 1, (rows,))
    mask = torch.arange(length)[None, :] < lengths[:, None]
    old = -torch.rand(rows, length) * 2
    base = old + torch.randn(rows, length) * 0.1
    adv = torch.randn(rows, 1).expand(rows, length).contiguous() * mask
    entropy = torch.rand(rows, length) * 3
    n_tok = int(mask.sum())

    def actor(policy_loss=None):
        kw = {} if policy_loss is None else {"policy_loss": policy_loss}
        cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_c=10.0, **kw)
        cfg.global_batch_info.update(dp_size=1, batch_num_tokens=n_tok, global_batch_size=rows, loss_scale_factor=None)
        return cfg

    def step(fn):
        def run():
            new = base.clone().requires_grad_(True)
            fn(new).backward()
        return run

    vanilla_cfg = actor()
    fns = {"vanilla": step(lambda new: compute_policy_loss_vanilla(old, new, adv, mask, "token-mean", vanilla_cfg)[0])}
    for mode in VERL_COV_LOSSES:  # verl's own covariance losses (configs conf/<mode>.yaml), for reference
        if names and mode not in names:
            continue
        cov_cfg = actor(PolicyLossConfig(loss_mode=mode))
        fns[f"verl {mode}"] = step(lambda new, fn=get_policy_loss_fn(mode), cfg=cov_cfg:
                                   fn(old, new, adv, mask, "token-mean", cfg)[0])
    for name, spec in registry.loss_specs().items():
        if names and name not in names:
            continue
        cls = loss_configs.LOSS_CONFIG_CLASSES[loss_configs.loss_config_name(spec)]
        cfg = actor(cls())
        options = spec.loss_options()
        stats = None
        if spec.batch_stats is not None and registry.BATCH_STATS in spec.needs_of_loss(options):
            stats = spec.batch_stats(registry.OldPolicyBatch(response_mask=mask, entropy=entropy, old_log_prob=old),
                                     options)
        minibatch = None
        if registry.MINIBATCH_STATS in spec.needs_of_loss(options):
            # the mini-batch pass's statistics (its forward excluded: the model's), timed on their own below
            def pass_stats(spec=spec, options=options, stats=stats):
                return _minibatch_pass_statistics(spec, options, old, base, adv, mask, entropy, stats)

            minibatch = pass_stats()
            fns[f"{name} (mini-batch pass statistics)"] = pass_stats

        def loss_fn(new, spec=spec, options=options, cfg=cfg, stats=stats, minibatch=minibatch):
            return run_loss(spec, options, old_log_prob=old, log_prob=new, advantages=adv, response_mask=mask,
                            loss_agg_mode="token-mean", config=cfg, entropy=entropy, batch_stats=stats,
                            minibatch_stats=minibatch)[0]

        fns[name] = step(loss_fn)
    return median_times(fns, repeats)


def _minibatch_pass_statistics(spec, options, old, log_prob, adv, mask, entropy, batch_stats):
    """What the mini-batch pass computes besides the model's forward: the spec's statistics over the whole batch as
    one micro-batch (padding is the identity here), reduced and finalized."""
    from unittest import mock

    from tensordict import TensorDict

    from hapo_verl.integration.minibatch import minibatch_statistics

    class Engine:  # hands the given log-probs and entropy as the model output of one micro-batch
        def forward_backward_batch(self, data, loss_function, forward_only=False):
            loss_function(model_output={"log_probs": log_prob, "entropy": entropy}, data=data)

        def get_data_parallel_group(self):
            return None

    data = TensorDict({"response_mask": mask.float(), "old_log_probs": old, "advantages": adv, "entropy": entropy},
                      batch_size=[old.shape[0]])
    with torch.no_grad(), mock.patch("verl.workers.utils.padding.no_padding_2_padding", lambda t, d: t):
        return minibatch_statistics(spec, options, Engine(), data, batch_stats=batch_stats)


def grouped_batch(prompts: int, n: int, length: int):
    """The estimator sections' batch (seed 0): B = prompts·n rows of random lengths, 0/1 rewards at each response's
    last token, and the rows of each prompt group shuffled over the batch (as after verl's balance_batch). Returns
    (B, lengths, mask, token_level_rewards, index)."""
    torch.manual_seed(0)
    B = prompts * n
    lengths = torch.randint(1, length + 1, (B,))
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()
    tlr = torch.zeros(B, length)
    tlr[torch.arange(B), lengths - 1] = torch.randint(0, 2, (B,)).float()
    index = np.array([f"uid-{i // n}" for i in torch.randperm(B).tolist()], dtype=object)
    return B, lengths, mask, tlr, index


def bench_registry_estimators(prompts: int, n: int, length: int, repeats: int,
                              names: list[str] | None = None) -> dict:
    """Median seconds of verl's grpo_vectorized and of every registered estimator through verl's registry, measured
    interleaved on one batch: 0/1 rewards at each response's last token, random lengths, the rows of each prompt
    group shuffled over the batch (as after verl's balance_batch). Each estimator gets its default options and what
    its spec needs (estimator_inputs, as the trainer provides it); batch statistics and step ends (lines of 20 tokens
    on average) are computed beforehand."""
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    from hapo_verl import registry
    from hapo_verl.integration.estimator import estimator_inputs

    B, lengths, mask, tlr, index = grouped_batch(prompts, n, length)
    entropy = torch.rand(B, length) * 3
    old_log_prob = -torch.rand(B, length) * 2
    # the step ends of step-level estimators: lines of 20 tokens on average (a line ends at random)
    steps = torch.rand(B, length) < 0.05
    grpo = get_adv_estimator_fn("grpo_vectorized")
    fns = {"grpo_vectorized": lambda: grpo(token_level_rewards=tlr, response_mask=mask, index=index)}
    for name, spec in registry.estimator_specs().items():
        if names and name not in names:
            continue
        options = spec.estimator_options() if spec.estimator_options else None
        stats = None
        if spec.batch_stats is not None and registry.BATCH_STATS in spec.needs_of_estimator(options):
            hook_options = spec.loss_options() if spec.loss_options else options
            stats = spec.batch_stats(registry.OldPolicyBatch(response_mask=mask, entropy=entropy,
                                                             old_log_prob=old_log_prob), hook_options)
        fn = get_adv_estimator_fn(name)

        def run(fn=fn, stats=stats):
            with estimator_inputs(old_log_prob=old_log_prob, entropy=entropy, batch_stats=stats, step_ends=steps):
                fn(token_level_rewards=tlr, response_mask=mask, index=index, config={})

        fns[name] = run
    return median_times(fns, repeats)


def bench_registry_selections(prompts: int, n: int, length: int, repeats: int) -> dict:
    """Median seconds of verl's grpo_vectorized and of every registered selection step, measured interleaved on
    the batch of :func:`bench_registry_estimators`: each step enabled with its other options at their defaults, at
    step 1 of 100 (the most aggressive keep ratios of a schedule), on verl's GRPO advantages of that batch, the
    old-policy entropy and the rows' response lengths (the trainer has them from TransferQueue's offsets)."""
    import dataclasses

    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    from hapo_verl import registry
    from hapo_verl.algorithms.groups import group_ids_from_index

    B, lengths, mask, tlr, index = grouped_batch(prompts, n, length)
    entropy = torch.rand(B, length) * 3 * mask  # zero-padded, as the trainer's (verl's to_padded_tensor)
    old_log_prob = -torch.rand(B, length) * 2 * mask
    grpo = get_adv_estimator_fn("grpo_vectorized")
    advantages, _ = grpo(token_level_rewards=tlr, response_mask=mask, index=index)
    group_ids = group_ids_from_index(index)
    fns = {"grpo_vectorized": lambda: grpo(token_level_rewards=tlr, response_mask=mask, index=index)}
    for name, spec in registry.selection_specs().items():
        options = dataclasses.replace(spec.selection_options(), enable=True)
        inputs = registry.SelectionInputs(advantages=advantages, response_mask=mask, group_ids=group_ids,
                                          entropy=entropy, old_log_prob=old_log_prob, step=1, total_steps=100,
                                          lengths=lengths)
        fns[name] = lambda spec=spec, inputs=inputs, options=options: spec.selection(inputs, options)
    return median_times(fns, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke check")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--section", choices=("all", "core", "registry", "estimators", "selections"), default="all",
                        help="core: sections 1-2 (HAPO); registry: section 3 (every registered loss)")
    parser.add_argument("--losses", default="", help="comma-separated registered losses for section 3 (default all)")
    parser.add_argument("--estimators", default="", help="comma-separated registered estimators for section 4")
    parser.add_argument("--selection-threads", type=int, default=1,
                        help="torch threads for section 5 (verl's driver has 1; 0 keeps the current number)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"torch threads: {torch.get_num_threads()}")
    if args.section in ("all", "core"):
        core(args)
    if args.section in ("all", "registry"):
        rows, length = (64, 32) if args.quick else (8192, 1024)
        names = [n for n in args.losses.split(",") if n] or None
        times = bench_registry_losses(rows, length, 3 if args.quick else args.repeats, names)
        print(f"registered losses, forward+backward ({rows} x {length}, token-mean; median of "
              f"{3 if args.quick else args.repeats}, interleaved)")
        print(f"  {'verl vanilla':44s} {times['vanilla'] * 1e3:9.1f} ms")
        for name, t in times.items():
            if name != "vanilla":
                print(f"  {name:44s} {t * 1e3:9.1f} ms   ratio / vanilla = {t / times['vanilla']:.2f}")
    if args.section in ("all", "estimators"):
        estimators(args)
    if args.section in ("all", "selections"):
        selections(args)


def selections(args):
    prompts, n, length = (16, 4, 64) if args.quick else (512, 16, 4096)
    repeats = 3 if args.quick else args.repeats
    threads = torch.get_num_threads()
    if args.selection_threads:
        torch.set_num_threads(args.selection_threads)
    try:
        times = bench_registry_selections(prompts, n, length, repeats)
    finally:
        torch.set_num_threads(threads)
    print(f"registered selection steps ({prompts} prompts x {n}, {length} tokens, groups interleaved, first-step "
          f"ratios; {args.selection_threads or threads} torch thread(s); median of {repeats}, interleaved)")
    print(f"  {'verl grpo_vectorized':24s} {times['grpo_vectorized'] * 1e3:9.1f} ms")
    for name, t in times.items():
        if name != "grpo_vectorized":
            print(f"  {name:24s} {t * 1e3:9.1f} ms   ratio / grpo_vectorized = {t / times['grpo_vectorized']:.2f}"
                  "   (target <= 2)")


def estimators(args):
    prompts, n, length = (16, 4, 64) if args.quick else (512, 16, 4096)
    repeats = 3 if args.quick else args.repeats
    names = [n for n in args.estimators.split(",") if n] or None
    times = bench_registry_estimators(prompts, n, length, repeats, names)
    print(f"registered estimators ({prompts} prompts x {n}, {length} tokens, groups interleaved; median of {repeats}, "
          "interleaved)")
    print(f"  {'verl grpo_vectorized':24s} {times['grpo_vectorized'] * 1e3:9.1f} ms")
    for name, t in times.items():
        if name != "grpo_vectorized":
            print(f"  {name:24s} {t * 1e3:9.1f} ms   ratio / grpo_vectorized = {t / times['grpo_vectorized']:.2f}"
                  "   (target <= 2)")


def core(args):
    if args.quick:
        est = bench_estimator(16, 4, 64, 3)
        loss = bench_loss(64, 32, 3)
    else:
        est = bench_estimator(512, 16, 4096, args.repeats)
        loss = bench_loss(8192, 1024, args.repeats)
    print("estimator (512 prompts x 16, 4096 tokens)" if not args.quick else "estimator (quick)")
    print(f"  verl grpo_vectorized   {est['grpo_vectorized_s'] * 1e3:9.1f} ms")
    print(f"  hapo (ours)            {est['hapo_s'] * 1e3:9.1f} ms")
    print(f"  fork-style group loop  {est['loop_s'] * 1e3:9.1f} ms   (agrees with ours: {est['agree']})")
    print(f"  ratio hapo / grpo_vectorized = {est['hapo_s'] / est['grpo_vectorized_s']:.2f}   (target <= 1.2)")
    print(f"  ratio loop / hapo            = {est['loop_s'] / est['hapo_s']:.1f}   (target >= 10)")
    print("loss forward+backward (8192 x 1024)" if not args.quick else "loss (quick)")
    print(f"  verl vanilla           {loss['vanilla_s'] * 1e3:9.1f} ms")
    print(f"  hapo, batch stats      {loss['hapo_s'] * 1e3:9.1f} ms")
    print(f"  hapo, stats in loss    {loss['hapo_stats_in_loss_s'] * 1e3:9.1f} ms   (reference_compat path)")
    print(f"  ratio hapo / vanilla               = {loss['hapo_s'] / loss['vanilla_s']:.2f}   (target <= 1.5)")
    print(f"  ratio hapo(stats in loss) / vanilla = {loss['hapo_stats_in_loss_s'] / loss['vanilla_s']:.2f}")


if __name__ == "__main__":
    main()
