"""One prepared GPU check: every GPU number of docs/benchmarks.md in one command.

    PYTHONPATH=. python bench/gpu_check.py --out DIR            # one CUDA GPU; sized for < 8 min on an H100/H200
    PYTHONPATH=. python bench/gpu_check.py --out DIR --smoke    # every code path on CPU at tiny sizes (< 60 s)

Runs from a plain checkout (the checkout's ``hapo_verl`` is put first on ``sys.path``) and needs only torch,
numpy and, for part 1, triton: no verl, vLLM or Ray. Where a comparison needs one of verl's functions, this
file carries a short reference copy of it (``ref_*`` below); ``tests/test_gpu_check_on_cpu.py`` checks on CPU
that each copy equals verl 0.9.1's function, and that the way this script calls the registered algorithms
equals the plugin's own path (``hapo_verl.integration``).

What it measures, side by side in one run (interleaved repeats; CUDA events; warm-up; medians):

1. ``triton``: the Triton adaptive-temperature kernel (``hapo_verl.sampling.triton_kernel``) against one
   elementwise pass (``logits.div_(T)``, vLLM's temperature step), fp32 and bf16, vocabulary 151,936, rows
   1, 64, 132, 256, 1024; each call on logits just restored from a source copy, with the L2 cache flushed
   before it (a 256 MiB buffer zeroed). Achieved bandwidth against the device's (theoretical peak from the
   device properties, and a measured device-to-device copy). Correctness on the GPU: factors and scaled
   logits against the torch path (``fast_path`` backend ``torch``), max differences.
2. ``hapo_loss``: the HAPO loss forward + backward against the reference vanilla PPO loss at 8192 x 4096
   tokens, bf16 and fp32, token-mean over the global batch, with the batch statistics computed beforehand
   (as the trainer does once per step); peak memory of each.
3. ``registered``: every registered policy loss (8192 x 1024, fp32, forward + backward) against the vanilla
   reference, every registered advantage estimator (512 prompts x 16 responses, 4096 tokens) against the
   reference ``grpo_vectorized``, and every batch-statistics hook (8192 x 4096): the sizes of bench/bench_core.py.
   The algorithms come from ``hapo_verl.registry``: a new one joins without an edit here.
4. ``correctness``: every algorithm's math (loss value, gradient, metrics; advantages, returns, metrics; batch
   statistics) on the device against the same call on CPU tensors, tolerance stated in the JSON; under a
   dispatch mode that records every op producing a CPU tensor and every op that reads device values on the
   host; on CUDA also ``torch.cuda.set_sync_debug_mode("warn")``, whose warnings are the host-sync count per
   call. On CPU (``--smoke``) the host-tensor check runs each loss on ``meta`` tensors instead.

Prints Markdown tables and writes ``DIR/gpu_check.json`` (and ``DIR/gpu_check.md``). Exit status 1 when a
correctness check fails or a part raises (the other parts still run and are written). ``--parts`` reruns a subset,
``--repeats`` changes the repeats of parts 2-3. Not yet run on a GPU: the sizing (a few hundred timed calls, two
Triton compilations) is an estimate; ``meta.section_s`` and ``meta.within_8_min`` record what it took.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__" and "--smoke" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"  # read by Triton when first imported: before anything imports it

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path[:1]:
    sys.path.insert(0, str(ROOT))  # the checkout's hapo_verl, installed or not

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

FRAMEWORKS = ("verl", "vllm", "ray")
SYNC_WARNING = "synchronizing CUDA operation"

# verl's actor settings used throughout (clip ranges as DAPO's recipes, verl's default KL settings)
CLIP_LOW, CLIP_HIGH, CLIP_RATIO_C = 0.2, 0.28, 10.0
KL_COEF, KL_TYPE = 0.001, "low_var_kl"
# device-vs-CPU tolerance: |device - cpu| <= ATOL + RTOL * |cpu| elementwise (fp32 on both sides)
RTOL, ATOL = 1e-4, 1e-6


@dataclass(frozen=True)
class Sizes:
    vocab: int
    rows: tuple
    triton_warmup: int
    triton_repeats: int
    loss: tuple           # part 2: (rows, length)
    loss_dtypes: tuple
    bench_loss: tuple     # part 3 losses: (rows, length)
    estimator: tuple      # part 3 estimators and batch statistics: (prompts, n, length)
    warmup: int
    repeats: int
    correctness: tuple    # part 4: (groups, n, length)
    copy_bytes: int


FULL = Sizes(vocab=151_936, rows=(1, 64, 132, 256, 1024), triton_warmup=5, triton_repeats=50, loss=(8192, 4096),
             loss_dtypes=("bf16", "fp32"), bench_loss=(8192, 1024), estimator=(512, 16, 4096), warmup=3, repeats=15,
             correctness=(12, 4, 96), copy_bytes=1 << 30)
SMOKE = Sizes(vocab=5000, rows=(1, 3), triton_warmup=1, triton_repeats=2, loss=(16, 48), loss_dtypes=("bf16", "fp32"),
              bench_loss=(16, 32), estimator=(4, 4, 32), warmup=1, repeats=2, correctness=(3, 4, 24),
              copy_bytes=1 << 20)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ================================================================================================ references
# Short copies of verl 0.9.1's functions (verl/trainer/ppo/core_algos.py, verl/utils/torch_functional.py,
# verl/utils/groupwise.py), op for op. tests/test_gpu_check_on_cpu.py checks each against verl's.
def ref_masked_sum(values, mask, axis=None):
    """verl.utils.torch_functional.masked_sum."""
    valid_values = torch.where(mask.bool(), values, 0.0)
    return (valid_values * mask).sum(axis=axis)


def ref_masked_mean(values, mask, axis=None):
    """verl.utils.torch_functional.masked_mean."""
    return ref_masked_sum(values, mask, axis) / (mask.sum(axis=axis) + 1e-8)


def ref_agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                 loss_scale_factor=None):
    """verl.trainer.ppo.core_algos.agg_loss."""
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            batch_num_tokens = loss_mask.sum()
        loss = ref_masked_sum(loss_mat, loss_mask) / batch_num_tokens * dp_size
    elif loss_agg_mode == "token-sum":
        loss = ref_masked_sum(loss_mat, loss_mask) * dp_size
    elif loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        seq_mask = (torch.sum(loss_mask, dim=-1) > 0).float()
        if global_batch_size is None:
            if dp_size > 1:
                raise ValueError("global_batch_size is required when dp_size > 1")
            global_batch_size = seq_mask.sum()
        loss = ref_masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            loss /= loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
    elif loss_agg_mode == "seq-mean-token-mean":
        seq_mask = torch.sum(loss_mask, dim=-1)
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / (seq_mask + 1e-8)
        seq_mask = (seq_mask > 0).float()
        if global_batch_size is None:
            if dp_size > 1:
                raise ValueError("global_batch_size is required when dp_size > 1")
            global_batch_size = seq_mask.sum()
        loss = ref_masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size
    else:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    return loss


def ref_vanilla_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                            clip_ratio_low=CLIP_LOW, clip_ratio_high=CLIP_HIGH, clip_ratio_c=CLIP_RATIO_C,
                            global_batch_info=None, rollout_is_weights=None):
    """verl.trainer.ppo.core_algos.compute_policy_loss_vanilla with the clip settings as arguments instead of an
    ActorConfig (``global_batch_info`` is ``config.global_batch_info``). Its three ``.item()`` metrics included:
    they are part of what verl's vanilla loss costs."""
    assert clip_ratio_c > 1.0
    negative_approx_kl = log_prob - old_log_prob
    negative_approx_kl = torch.clamp(negative_approx_kl, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = ref_masked_mean(-negative_approx_kl, response_mask)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = ref_masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = ref_masked_mean(torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(),
                                        response_mask)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    pg_loss = ref_agg_loss(loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode,
                           **(global_batch_info or {}))
    pg_metrics = {
        "actor/pg_clipfrac": pg_clipfrac.detach().item(),
        "actor/ppo_kl": ppo_kl.detach().item(),
        "actor/pg_clipfrac_lower": pg_clipfrac_lower.detach().item(),
    }
    return pg_loss, pg_metrics


def ref_kl_penalty(logprob, ref_logprob, kl_penalty):
    """verl.trainer.ppo.core_algos.kl_penalty (with kl_penalty_forward), "full" excluded."""
    base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    if base in ("kl", "k1"):
        forward = logprob - ref_logprob
    elif base == "abs":
        forward = (logprob - ref_logprob).abs()
    elif base in ("mse", "k2"):
        forward = 0.5 * (logprob - ref_logprob).square()
    elif base in ("low_var_kl", "k3"):
        kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
        forward = torch.clamp((torch.exp(kl) - kl - 1).contiguous(), min=-10, max=10)
    else:
        raise NotImplementedError(kl_penalty)
    if not kl_penalty.endswith("+") or kl_penalty in ("mse", "k2"):
        return forward
    backward = 0.5 * (logprob - ref_logprob).square()
    return backward - backward.detach() + forward.detach()


def ref_group_mean_std(scores, gidx, eps=1e-6):
    """verl.utils.groupwise.group_mean_std on the input's device (its two host syncs included)."""
    scores = scores.reshape(-1).to(dtype=torch.float32)
    gidx = gidx.reshape(-1).to(dtype=torch.long)
    device = scores.device
    G = int(torch.max(gidx).item()) + 1 if gidx.numel() > 0 else 0
    if G == 0:
        empty = torch.empty(0, device=device, dtype=torch.float32)
        return empty, empty, empty
    ones = torch.ones_like(scores, dtype=torch.float32)
    count = torch.zeros(G, device=device, dtype=torch.float32).index_add_(0, gidx, ones)
    s1 = torch.zeros(G, device=device, dtype=torch.float32).index_add_(0, gidx, scores)
    mean = s1 / count.clamp_min(1.0)
    centered = scores - mean[gidx]
    var_num = torch.zeros(G, device=device, dtype=torch.float32).index_add_(0, gidx, centered * centered)
    var = var_num / (count - 1.0).clamp_min(1.0)
    std = torch.sqrt(torch.clamp(var, min=eps))
    single = count <= 1.0
    if torch.any(single):
        mean = mean.clone()
        std = std.clone()
        mean[single] = 0.0
        std[single] = 1.0
    return mean, std, count


def ref_grpo_vectorized(token_level_rewards, response_mask, group_ids, epsilon=1e-6, norm_adv_by_std=True):
    """verl.trainer.ppo.core_algos.compute_grpo_vectorized_outcome_advantage, given the group ids as a (B,) long
    tensor on the device (verl converts its uid array with ``as_torch_index`` first)."""
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        g = group_ids
        mean_g, std_g, _ = ref_group_mean_std(scores, g, eps=0.0)
        if norm_adv_by_std:
            scalars = (scores - mean_g[g]) / (std_g[g] + epsilon)
        else:
            scalars = scores - mean_g[g]
        advantages = scalars.unsqueeze(-1) * response_mask
        return advantages, advantages


# ================================================================================================ the harness
@dataclass
class Batch:
    """One batch of (B, L) inputs on one device."""

    old: torch.Tensor
    new: torch.Tensor
    adv: torch.Tensor
    mask: torch.Tensor       # bool, as verl's worker hands it to a loss
    entropy: torch.Tensor
    ref: torch.Tensor
    rewards: torch.Tensor    # token-level rewards (outcome at the last valid token)
    group_ids: torch.Tensor  # (B,) long, contiguous
    step_ends: torch.Tensor  # bool, the tokens that end a step (lines of 20 tokens on average)

    def to(self, device=None, dtype=None) -> "Batch":
        def move(t):
            t = t.to(device) if device is not None else t
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return Batch(**{k: move(v) for k, v in vars(self).items()})

    def global_batch_info(self) -> dict:
        """What verl's worker binds for the loss aggregation: global token and sequence counts (Python ints)."""
        return {"dp_size": 1, "batch_num_tokens": int(self.mask.sum()),
                "global_batch_size": int(self.mask.any(-1).sum()), "loss_scale_factor": None}


def make_batch(rows: int, length: int, n: int, device, seed: int = 0, min_len: int | None = None) -> Batch:
    g = torch.Generator(device=device).manual_seed(seed)
    kw = dict(generator=g, device=device)
    lengths = torch.randint(min_len if min_len is not None else max(1, length // 4), length + 1, (rows,), **kw)
    mask = torch.arange(length, device=device)[None, :] < lengths[:, None]
    old = -torch.rand(rows, length, **kw) * 2
    new = old + torch.randn(rows, length, **kw) * 0.1
    adv = (torch.randn(rows, 1, **kw).expand(rows, length) * mask).contiguous()
    entropy = torch.rand(rows, length, **kw) * 3
    ref = old + torch.randn(rows, length, **kw) * 0.05
    rewards = torch.zeros(rows, length, device=device)
    outcome = torch.randint(0, 2, (rows,), **kw).float() * 2 - 1
    rewards[torch.arange(rows, device=device), lengths - 1] = outcome
    group_ids = torch.arange(rows, device=device) // n
    step_ends = torch.rand(rows, length, **kw) < 0.05  # drawn last: the other tensors are those of earlier runs
    return Batch(old, new, adv, mask, entropy, ref, rewards, group_ids, step_ends)


def registry_module():
    from hapo_verl import registry

    registry.discover()
    return registry


def loss_call(spec, options, batch: Batch, batch_stats=None, with_kl: bool = False, loss_agg_mode="token-mean",
              info: dict | None = None, minibatch_stats=None):
    """``new -> (loss, metrics)``: the spec's loss as ``hapo_verl.integration.loss.run_loss`` calls it in the
    workers (verl's clip settings, aggregation over the global batch bound to ``info``, verl's KL estimator),
    without verl. ``info`` defaults to :meth:`Batch.global_batch_info` (computed here, once)."""
    registry = registry_module()
    needs = spec.needs_of_loss(options)
    entropy = batch.entropy if needs & {registry.OLD_ENTROPY, registry.CURRENT_ENTROPY} else None
    stats = batch_stats if registry.BATCH_STATS in needs else None
    minibatch = None
    if registry.MINIBATCH_STATS in needs:  # given (the meta check's), or computed as the pass does
        minibatch = minibatch_stats if minibatch_stats is not None else minibatch_stats_of(spec, options, batch, stats)
    use_kl = with_kl and spec.loss_handles_kl
    info = batch.global_batch_info() if info is None else info

    def aggregate(loss_mat, mask, mode=None):
        return ref_agg_loss(loss_mat=loss_mat, loss_mask=mask, loss_agg_mode=mode or loss_agg_mode, **info)

    def call(new):
        inputs = registry.LossInputs(
            old_log_prob=batch.old, log_prob=new, advantages=batch.adv, response_mask=batch.mask,
            loss_agg_mode=loss_agg_mode, aggregate=aggregate, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
            clip_ratio_c=CLIP_RATIO_C, entropy=entropy, batch_stats=stats, rollout_is_weights=None,
            ref_log_prob=batch.ref if use_kl else None, kl_coef=KL_COEF if use_kl else 0.0, kl_type=KL_TYPE,
            kl=ref_kl_penalty, minibatch_stats=minibatch)
        return spec.loss(inputs, options)

    return call


def minibatch_stats_of(spec, options, batch: Batch, batch_stats=None):
    """The statistics the plugin's mini-batch pass hands a loss that needs them (``MINIBATCH_STATS``): the batch as
    one mini-batch of one micro-batch, the current log-probs ``batch.new`` (``hapo_verl.integration.minibatch``,
    pure torch), computed before the loss as the pass does."""
    registry = registry_module()
    from hapo_verl.integration.minibatch import combine, part_statistics

    needs = spec.needs_of_loss(options)
    part = registry.MiniBatchPart(
        old_log_prob=batch.old, advantages=batch.adv, response_mask=batch.mask,
        log_prob=batch.new if spec.minibatch_pass_runs_forward(options) else None,
        entropy=batch.entropy if needs & {registry.OLD_ENTROPY, registry.CURRENT_ENTROPY} else None,
        batch_stats=batch_stats)
    return combine(spec, options, [part_statistics(spec, options, part)])


def vanilla_call(batch: Batch, loss_agg_mode="token-mean", info: dict | None = None):
    info = batch.global_batch_info() if info is None else info

    def call(new):
        return ref_vanilla_policy_loss(batch.old, new, batch.adv, batch.mask, loss_agg_mode, global_batch_info=info)

    return call


def loss_options_of(spec):
    return spec.loss_options() if spec.loss_options is not None else None


def batch_stats_of(spec, batch: Batch, options=None):
    """The spec's batch statistics over the whole batch, as the trainer computes them on the driver."""
    registry = registry_module()
    old = registry.OldPolicyBatch(response_mask=batch.mask, entropy=batch.entropy, old_log_prob=batch.old)
    return spec.batch_stats(old, options if options is not None else loss_options_of(spec))


def estimator_call(spec, batch: Batch, options=None):
    """``() -> (advantages, returns, metrics)``: the spec's estimator as ``integration.estimator`` calls it, with
    the group ids already on the device and what the spec needs provided (batch statistics computed here)."""
    registry = registry_module()
    options = options if options is not None else (spec.estimator_options() if spec.estimator_options else None)
    needs = spec.needs_of_estimator(options)
    stats = batch_stats_of(spec, batch) if registry.BATCH_STATS in needs and spec.batch_stats is not None else None
    inputs = registry.AdvantageInputs(
        token_level_rewards=batch.rewards, response_mask=batch.mask.float(), group_ids=batch.group_ids,
        old_log_prob=batch.old if registry.OLD_LOG_PROB in needs else None,
        entropy=batch.entropy if registry.OLD_ENTROPY in needs else None, batch_stats=stats,
        step_ends=batch.step_ends if registry.RESPONSE_STEPS in needs else None)
    return lambda: spec.advantage(inputs, options)


def loss_needs_stats(spec, options) -> bool:
    registry = registry_module()
    return spec.batch_stats is not None and registry.BATCH_STATS in spec.needs_of_loss(options)


class Timer:
    """Median times of several candidates measured interleaved (a, b, a, b, ...) after a warm-up: CUDA events
    on a GPU, ``time.perf_counter`` on CPU. Each candidate is ``(setup, fn)``; only ``fn`` is timed."""

    def __init__(self, device: torch.device, flush_l2: bool = False):
        self.cuda = device.type == "cuda"
        self.flush = None
        if self.cuda and flush_l2:
            self.flush = torch.empty(256 << 20, dtype=torch.int8, device=device)

    def run(self, cases: dict, warmup: int, repeats: int) -> dict:
        for setup, fn in cases.values():
            for _ in range(warmup):
                setup()
                fn()
        if self.cuda:
            torch.cuda.synchronize()
        samples = {name: [] for name in cases}
        for _ in range(repeats):
            for name, (setup, fn) in cases.items():
                setup()
                if self.flush is not None:
                    self.flush.zero_()
                if self.cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    samples[name].append((start, end))
                else:
                    t0 = time.perf_counter()
                    fn()
                    samples[name].append((time.perf_counter() - t0) * 1e3)
        if self.cuda:
            torch.cuda.synchronize()
            samples = {n: [s.elapsed_time(e) for s, e in pairs] for n, pairs in samples.items()}
        return {n: {"median_ms": statistics.median(ms), "min_ms": min(ms), "repeats": len(ms)}
                for n, ms in samples.items()}


def nothing():
    return None


def backward_step(call, base: torch.Tensor):
    """(setup, fn) of one forward + backward from a fresh leaf copy of ``base`` (the copy is not timed)."""
    holder = {}

    def setup():
        holder.pop("new", None)
        holder["new"] = base.detach().clone().requires_grad_(True)

    def fn():
        loss = call(holder["new"])[0]
        loss.backward()

    return setup, fn


def peak_memory(setup, fn, device) -> dict | None:
    """Peak allocated CUDA memory during one ``fn`` (total and above what was allocated before it)."""
    if device.type != "cuda":
        return None
    setup()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    setup()  # drop the graph and gradient of that call
    return {"peak_allocated_bytes": int(peak), "peak_above_inputs_bytes": int(peak - before)}


# ------------------------------------------------------------------------------------------------ host watch
_SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "_unique2", "unique_dim",
             "unique_consecutive", "allclose")


class HostWatch(TorchDispatchMode):
    """Records, per op: ops that read device values on the host (a host sync on a GPU: ``.item()``/``float()``,
    ``nonzero``, boolean indexing, ``unique``...), device-to-host and host-to-device copies, and ops whose output
    is a CPU tensor while the watched inputs live elsewhere (``device`` is that device type)."""

    def __init__(self, device_type: str):
        super().__init__()
        self.device_type = device_type
        self.sync_ops: list[str] = []
        self.d2h: list[str] = []
        self.h2d: list[str] = []
        self.cpu_tensors: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _SYNC_OPS or (name == "repeat_interleave" and "output_size" not in kwargs):
            self.sync_ops.append(str(func))
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ())):
            self.sync_ops.append(f"{func} (boolean index)")
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        out = func(*args, **kwargs)
        if name in ("_to_copy", "copy_") and src is not None:
            source = args[1] if name == "copy_" else src
            target = out
            if isinstance(source, torch.Tensor) and isinstance(target, torch.Tensor):
                if source.device.type != "cpu" and target.device.type == "cpu":
                    self.d2h.append(str(func))
                elif source.device.type == "cpu" and target.device.type != "cpu":
                    self.h2d.append(str(func))
        if self.device_type != "cpu":
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    self.cpu_tensors.append(str(func))
        return out


class SyncCount:
    """Host syncs of a block of code: a :class:`HostWatch`, plus on CUDA the warnings of
    ``torch.cuda.set_sync_debug_mode("warn")`` (the authoritative count there)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.watch = HostWatch(device.type)
        self.cuda_syncs = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self._warnings = warnings.catch_warnings(record=True)
            self._records = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        self.watch.__enter__()
        return self

    def __exit__(self, *exc):
        self.watch.__exit__(*exc)
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            self._warnings.__exit__(*exc)
            self.cuda_syncs = [str(w.message).splitlines()[0][:120] for w in self._records
                               if SYNC_WARNING in str(w.message)]
        return False

    def report(self) -> dict:
        w = self.watch
        out = {"host_read_ops": len(w.sync_ops), "d2h_copies": len(w.d2h), "h2d_copies": len(w.h2d),
               "ops": sorted(set(w.sync_ops + w.d2h + w.h2d))}
        if self.device.type != "cpu":
            out["cpu_tensors"] = len(w.cpu_tensors)
            out["cpu_tensor_ops"] = sorted(set(w.cpu_tensors))
        if self.cuda_syncs is not None:
            out["cuda_sync_debug_syncs"] = len(self.cuda_syncs)
            out["cuda_sync_debug_messages"] = sorted(set(self.cuda_syncs))
        out["host_syncs_per_call"] = (out["cuda_sync_debug_syncs"] if self.cuda_syncs is not None
                                      else out["host_read_ops"] + out["d2h_copies"])
        return out


def compare(cpu_values: dict, dev_values: dict, rtol=RTOL, atol=ATOL) -> dict:
    """Max differences of device results against the CPU ones, key by key; ``ok`` when every element is within
    ``atol + rtol * |cpu|``."""
    out, ok = {}, True
    for key, ref in cpu_values.items():
        got = dev_values.get(key)
        if got is None:
            out[key] = {"missing": True}
            ok = False
            continue
        ref_t = torch.as_tensor(ref, dtype=torch.float64).cpu()
        got_t = torch.as_tensor(got.detach().cpu() if isinstance(got, torch.Tensor) else got,
                                dtype=torch.float64).cpu()
        if ref_t.shape != got_t.shape:
            out[key] = {"shape": [list(ref_t.shape), list(got_t.shape)]}
            ok = False
            continue
        diff = (got_t - ref_t).abs()
        finite = bool(torch.isfinite(ref_t).all() and torch.isfinite(got_t).all())
        max_abs = float(diff.max()) if diff.numel() else 0.0
        max_rel = float((diff / ref_t.abs().clamp_min(1e-30)).max()) if diff.numel() else 0.0
        bound = atol + rtol * ref_t.abs()
        worst = float((diff / bound).max()) if diff.numel() else 0.0  # <= 1: within the tolerance
        within = finite and bool((diff <= bound).all())
        out[key] = {"max_abs": max_abs, "max_rel": min(max_rel, 1e30), "worst_over_tol": worst if finite else None,
                    "ok": within}
        ok = ok and within
    return {"ok": ok, "values": out}


def _loss_values(call, batch: Batch) -> dict:
    new = batch.new.detach().clone().requires_grad_(True)  # a leaf, as the model's log-probs
    loss, metrics = call(new)
    loss.backward()
    values = {"loss": loss.detach(), "grad": new.grad.detach()}
    values.update({f"metric/{k}": v for k, v in metrics.items()})
    return values


def _meta_check(spec, options, batch_cpu: Batch, stats, info: dict) -> dict:
    """The loss on ``meta`` tensors (no data: a host read raises) under a :class:`HostWatch` that records any op
    producing a CPU tensor: the CPU-side check that the loss creates no host tensor and reads nothing back."""
    meta = batch_cpu.to("meta")
    watch = HostWatch("meta")
    minibatch = None  # the mini-batch pass's statistics come from data: computed on the CPU batch, then moved
    if registry_module().MINIBATCH_STATS in spec.needs_of_loss(options):
        minibatch = {k: v.to("meta") for k, v in minibatch_stats_of(spec, options, batch_cpu, stats).items()}
    call = loss_call(spec, options, meta, stats, with_kl=True, info=info, minibatch_stats=minibatch)
    try:
        with watch:
            loss, metrics = call(meta.new)
        ok = loss.device.type == "meta" and all(v.device.type == "meta" for v in metrics.values())
        return {"ok": ok and not watch.cpu_tensors, "cpu_tensors": len(watch.cpu_tensors),
                "cpu_tensor_ops": sorted(set(watch.cpu_tensors)), "h2d_copies": len(watch.h2d)}
    except Exception as exc:  # a host read on meta data raises: report it as the failure it is
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300], "cpu_tensors": len(watch.cpu_tensors)}


# ================================================================================================ the parts
def device_info(device: torch.device, sizes: Sizes) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = None
        info["triton_error"] = f"{type(exc).__name__}: {exc}"[:200]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, cuda=torch.version.cuda, sm_count=props.multi_processor_count,
                    total_memory_bytes=int(props.total_memory), l2_cache_bytes=getattr(props, "L2_cache_size", None),
                    capability=f"{props.major}.{props.minor}")
        clock_khz = getattr(props, "memory_clock_rate", 0) or 0
        bus_bits = getattr(props, "memory_bus_width", 0) or 0
        source = "torch device properties"
        if not (clock_khz and bus_bits):
            try:
                from triton.runtime import driver

                p = driver.active.utils.get_device_properties(device.index or 0)
                clock_khz, bus_bits, source = p.get("mem_clock_rate", 0), p.get("mem_bus_width", 0), "triton driver"
            except Exception:
                pass
        info["peak_bandwidth_GBps"] = 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None
        info["peak_bandwidth_source"] = f"{source}: 2 x memory clock x bus width" if clock_khz and bus_bits else None
    else:
        info["name"] = platform.processor() or platform.machine()
        info["peak_bandwidth_GBps"] = None
    # measured device-to-device copy (1 read + 1 write), the achievable bandwidth
    n = sizes.copy_bytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    t = Timer(device).run({"copy": (nothing, lambda: dst.copy_(src))}, warmup=2, repeats=10)["copy"]
    info["copy_bandwidth_GBps"] = 2 * n * 4 / (t["median_ms"] * 1e-3) / 1e9
    info["copy_bytes"] = n * 4
    return info


def part_triton(device: torch.device, sizes: Sizes, peak_gbps: float | None) -> dict:
    from hapo_verl.sampling import fast_path
    from hapo_verl.sampling.params import pack_params

    if not fast_path.triton_available():
        return {"skipped": f"Triton not importable: {fast_path._TRITON_STATE.get('error')}"}
    from hapo_verl.sampling.triton_kernel import DEFAULT_BLOCK, adaptive_temperature_

    timer = Timer(device, flush_l2=True)
    V = sizes.vocab
    entries, checks = [], []
    g = torch.Generator(device=device).manual_seed(0)
    for dtype_name in ("fp32", "bf16"):
        dtype = DTYPES[dtype_name]
        for rows in sizes.rows:
            scale = torch.linspace(0.5, 6.0, rows, device=device)[:, None]
            src = (torch.randn(rows, V, generator=g, device=device) * scale).to(dtype)
            params = pack_params(0.4, 1.1, 0.6, 0.3, 0.05, 0.0, 1.0, True, rows=rows, device=device)
            temperature = torch.full((rows, 1), 0.8, device=device)
            x_kernel, x_pass = torch.empty_like(src), torch.empty_like(src)
            cases = {
                "kernel": (lambda: x_kernel.copy_(src), lambda: adaptive_temperature_(x_kernel, params)),
                "pass": (lambda: x_pass.copy_(src), lambda: x_pass.div_(temperature)),
            }
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's numpy warnings on masked lanes
                times = timer.run(cases, sizes.triton_warmup, sizes.triton_repeats)
            row_bytes = rows * V * src.element_size()
            k_ms, p_ms = times["kernel"]["median_ms"], times["pass"]["median_ms"]
            entry = {"dtype": dtype_name, "rows": rows, "vocab": V, "kernel_ms": k_ms, "pass_ms": p_ms,
                     "kernel_min_ms": times["kernel"]["min_ms"], "pass_min_ms": times["pass"]["min_ms"],
                     "ratio": k_ms / p_ms, "repeats": times["kernel"]["repeats"],
                     "kernel_GBps": 3 * row_bytes / (k_ms * 1e-3) / 1e9,  # 2 reads + 1 write of the rows
                     "pass_GBps": 2 * row_bytes / (p_ms * 1e-3) / 1e9}    # 1 read + 1 write
            if peak_gbps:
                entry["kernel_frac_of_peak"] = entry["kernel_GBps"] / peak_gbps
                entry["pass_frac_of_peak"] = entry["pass_GBps"] / peak_gbps
            entries.append(entry)
            # correctness on the device: the kernel against the torch path (fp32 logits; bf16 rows upcast)
            y_kernel = src.clone()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's numpy warnings on masked lanes
                f_kernel = adaptive_temperature_(y_kernel, params)
            y_torch = src.float().clone()
            f_torch = fast_path.apply_packed_(y_torch, params, backend="torch")
            y_torch = y_torch.to(dtype)
            f_diff = (f_kernel - f_torch).abs().max().item()
            diff = (y_kernel.float() - y_torch.float()).abs()
            rel = (diff / y_torch.float().abs().clamp_min(1e-30)).max().item()
            # fp32: 1e-5 relative; bf16: the kernel rounds x * (1/f) once, the reference too: at most 1 ulp (2^-7)
            rel_tol = 1e-5 if dtype == torch.float32 else 2.0 ** -7
            checks.append({"dtype": dtype_name, "rows": rows, "max_abs_diff_factor": f_diff,
                           "max_abs_diff_logits": diff.max().item(), "max_rel_diff_logits": rel,
                           "factor_tol": 1e-5, "logits_rel_tol": rel_tol,
                           "ok": bool(f_diff <= 1e-5 and rel <= rel_tol and torch.isfinite(y_kernel.float()).all())})
            del src, x_kernel, x_pass, y_kernel, y_torch
    return {"vocab": V, "block": DEFAULT_BLOCK, "timing": "cold L2 (256 MiB zeroed before each call)"
            if device.type == "cuda" else "perf_counter (CPU, Triton interpreter: not a GPU number)",
            "bytes_model": "kernel 2 reads + 1 write of the rows; pass 1 read + 1 write", "entries": entries,
            "correctness": checks, "ok": all(c["ok"] for c in checks)}


def part_hapo_loss(device: torch.device, sizes: Sizes) -> dict:
    registry = registry_module()
    spec = registry.get("hapo")
    options = loss_options_of(spec)
    rows, length = sizes.loss
    timer = Timer(device)
    entries = []
    for dtype_name in sizes.loss_dtypes:
        batch = make_batch(rows, length, 16, device).to(dtype=DTYPES[dtype_name])
        t0 = time.perf_counter()
        stats = batch_stats_of(spec, batch, options)
        stats_s = time.perf_counter() - t0
        cases = {"vanilla": backward_step(vanilla_call(batch), batch.new),
                 "hapo": backward_step(loss_call(spec, options, batch, stats), batch.new)}
        times = timer.run(cases, sizes.warmup, sizes.repeats)
        entry = {"dtype": dtype_name, "rows": rows, "length": length, "tokens": int(batch.mask.sum()),
                 "vanilla_ms": times["vanilla"]["median_ms"], "hapo_ms": times["hapo"]["median_ms"],
                 "ratio": times["hapo"]["median_ms"] / times["vanilla"]["median_ms"],
                 "repeats": times["hapo"]["repeats"], "batch_stats_s": stats_s}
        for name, case in cases.items():
            entry[f"{name}_memory"] = peak_memory(*case, device)
        entries.append(entry)
        del batch, cases
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"what": "forward + backward, token-mean over the global batch, batch statistics given",
            "entries": entries}


def part_registered(device: torch.device, sizes: Sizes) -> dict:
    registry = registry_module()
    timer = Timer(device)
    out = {"losses": {}, "estimators": {}, "batch_stats": {}}
    rows, length = sizes.bench_loss
    batch = make_batch(rows, length, 16, device)
    cases = {"vanilla": backward_step(vanilla_call(batch), batch.new)}
    for name, spec in registry.loss_specs().items():
        options = loss_options_of(spec)
        stats = batch_stats_of(spec, batch, options) if loss_needs_stats(spec, options) else None
        cases[name] = backward_step(loss_call(spec, options, batch, stats), batch.new)
    times = timer.run(cases, sizes.warmup, sizes.repeats)
    base = times["vanilla"]["median_ms"]
    out["loss_baseline"] = {"name": "reference vanilla PPO (verl compute_policy_loss_vanilla)", "ms": base,
                            "memory": peak_memory(*cases["vanilla"], device), "rows": rows, "length": length}
    for name in registry.loss_specs():
        out["losses"][name] = {"ms": times[name]["median_ms"], "vanilla_ms": base,
                               "ratio": times[name]["median_ms"] / base, "repeats": times[name]["repeats"],
                               "memory": peak_memory(*cases[name], device)}
    del batch, cases

    prompts, n, length = sizes.estimator
    batch = make_batch(prompts * n, length, n, device, min_len=1)
    est_cases = {"grpo_vectorized": (nothing, lambda: ref_grpo_vectorized(batch.rewards, batch.mask.float(),
                                                                          batch.group_ids))}
    for name, spec in registry.estimator_specs().items():
        est_cases[name] = (nothing, estimator_call(spec, batch))
    times = timer.run(est_cases, sizes.warmup, sizes.repeats)
    base = times["grpo_vectorized"]["median_ms"]
    out["estimator_baseline"] = {"name": "reference grpo_vectorized (verl)", "ms": base, "prompts": prompts, "n": n,
                                 "length": length}
    for name in registry.estimator_specs():
        out["estimators"][name] = {"ms": times[name]["median_ms"], "grpo_ms": base,
                                   "ratio": times[name]["median_ms"] / base, "repeats": times[name]["repeats"]}
    stat_cases = {name: (nothing, lambda spec=spec: batch_stats_of(spec, batch))
                  for name, spec in registry.discover().items() if spec.batch_stats is not None}
    times = timer.run(stat_cases, 1, max(1, sizes.repeats // 3))
    for name in stat_cases:
        out["batch_stats"][name] = {"ms": times[name]["median_ms"], "repeats": times[name]["repeats"],
                                    "tokens": int(batch.mask.sum())}
    return out


def part_correctness(device: torch.device, sizes: Sizes) -> dict:
    registry = registry_module()
    groups, n, length = sizes.correctness
    cpu = make_batch(groups * n, length, n, torch.device("cpu"), seed=1, min_len=1)
    dev = cpu.to(device)
    info = cpu.global_batch_info()  # the global counts a worker is handed (Python ints)
    out = {"device": str(device), "tolerance": {"rtol": RTOL, "atol": ATOL, "rule": "|device - cpu| <= atol + "
                                                "rtol * |cpu|, elementwise, fp32 on both sides"},
           "rows": groups * n, "length": length, "losses": {}, "estimators": {}, "batch_stats": {},
           "references": {}}
    if device.type == "cpu":
        out["note"] = ("CPU smoke: the 'device' is the CPU itself (the comparison only exercises the code path); "
                       "the host-tensor check runs each loss on meta tensors; host reads are counted by dispatch")

    def watched(fn):
        fn()  # warm-up (first-call effects are not per-call costs)
        counter = SyncCount(device)
        with counter:
            result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return result, counter.report()

    for name, spec in registry.discover().items():
        if spec.batch_stats is None:
            continue
        try:
            stats_cpu = batch_stats_of(spec, cpu)
            stats_dev, syncs = watched(lambda spec=spec: batch_stats_of(spec, dev))
            entry = compare({k: v for k, v in stats_cpu.items() if isinstance(v, (int, float))},
                            {k: v for k, v in stats_dev.items() if isinstance(v, (int, float))})
            entry.update(syncs)
            out["batch_stats"][name] = _with_ok(entry, host_tensor_check=device.type != "cpu")
        except Exception as exc:
            out["batch_stats"][name] = _error(exc)

    for name, spec in registry.loss_specs().items():
        try:
            options = loss_options_of(spec)
            needs_stats = loss_needs_stats(spec, options)
            stats_cpu = batch_stats_of(spec, cpu, options) if needs_stats else None
            stats_dev = batch_stats_of(spec, dev, options) if needs_stats else None
            ref = _loss_values(loss_call(spec, options, cpu, stats_cpu, with_kl=True, info=info), cpu)
            call = loss_call(spec, options, dev, stats_dev, with_kl=True, info=info)
            got, syncs = watched(lambda: _loss_values(call, dev))
            entry = compare(ref, got)
            entry.update(syncs)
            entry["per"] = "one loss call, forward + backward"
            if device.type == "cpu":
                entry["meta_check"] = _meta_check(spec, options, cpu, stats_cpu, info)
            out["losses"][name] = _with_ok(entry, host_tensor_check=device.type != "cpu")
        except Exception as exc:
            out["losses"][name] = _error(exc)

    for name, spec in registry.estimator_specs().items():
        try:
            def values(call):
                adv, ret, metrics = call()
                v = {"advantages": adv, "returns": ret}
                v.update({f"metric/{k}": m for k, m in metrics.items()})
                return v
            call = estimator_call(spec, dev)  # the batch statistics it needs are computed here, not in the call
            got, syncs = watched(lambda: values(call))
            entry = compare(values(estimator_call(spec, cpu)), got)
            entry.update(syncs)
            entry["per"] = "one estimator call"
            out["estimators"][name] = _with_ok(entry, host_tensor_check=device.type != "cpu")
        except Exception as exc:
            out["estimators"][name] = _error(exc)

    try:  # the baselines, for scale: their host syncs per call
        ref = _loss_values(vanilla_call(cpu, info=info), cpu)
        call = vanilla_call(dev, info=info)
        got, syncs = watched(lambda: _loss_values(call, dev))
        entry = compare({k: v for k, v in ref.items()}, got)
        entry.update(syncs)
        out["references"]["vanilla_ppo"] = _with_ok(entry, host_tensor_check=False)
        ref = dict(zip(("advantages", "returns"), ref_grpo_vectorized(cpu.rewards, cpu.mask.float(), cpu.group_ids)))
        got, syncs = watched(lambda: dict(zip(("advantages", "returns"),
                                              ref_grpo_vectorized(dev.rewards, dev.mask.float(), dev.group_ids))))
        entry = compare(ref, got)
        entry.update(syncs)
        out["references"]["grpo_vectorized"] = _with_ok(entry, host_tensor_check=False)
    except Exception as exc:
        out["references"]["error"] = _error(exc)
    parts = [e for group in ("losses", "estimators", "batch_stats", "references") for e in out[group].values()]
    out["ok"] = all(e.get("ok", False) for e in parts)
    return out


def _with_ok(entry: dict, host_tensor_check: bool) -> dict:
    ok = entry["ok"]
    if host_tensor_check:
        ok = ok and entry.get("cpu_tensors", 0) == 0
    if "meta_check" in entry:
        ok = ok and entry["meta_check"]["ok"]
    entry["values_ok"] = entry["ok"]
    entry["ok"] = ok
    return entry


def _error(exc) -> dict:
    return {"ok": False, "error": "".join(traceback.format_exception(exc))[-2000:]}


# ================================================================================================ report
def _fmt(x, digits=3):
    if x is None:
        return "—"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def _mib(mem):
    return "—" if not mem else f"{mem['peak_above_inputs_bytes'] / 2**20:,.0f}"


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"# GPU check: {meta.get('name')} ({meta['device']}), torch {meta['torch']}, triton {meta.get('triton')}",
             ""]
    if meta["smoke"]:
        lines += ["**SMOKE RUN on CPU at tiny sizes: no number below is a GPU number.**", ""]
    lines += [f"Peak bandwidth {_fmt(meta.get('peak_bandwidth_GBps'))} GB/s ({meta.get('peak_bandwidth_source')}); "
              f"measured copy {_fmt(meta.get('copy_bandwidth_GBps'))} GB/s. Wall time {meta.get('wall_s', 0):.0f} s.",
              ""]
    if "triton" in result:
        tri = result.get("triton", {})
        lines += ["## 1. Triton adaptive-temperature kernel vs one elementwise pass (`logits.div_(T)`)", ""]
        if "entries" in tri:
            checks = {(c["dtype"], c["rows"]): c for c in tri["correctness"]}
            lines += [f"vocab {tri['vocab']}, {tri['timing']}; {tri['bytes_model']}.", "",
                      "| dtype | rows | kernel µs | pass µs | kernel / pass | kernel GB/s | % peak | pass GB/s "
                      "| % peak | max Δf | max rel Δlogits | ok |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
            for e in tri["entries"]:
                c = checks.get((e["dtype"], e["rows"]), {})
                pk = e.get("kernel_frac_of_peak")
                pp = e.get("pass_frac_of_peak")
                lines.append(f"| {e['dtype']} | {e['rows']} | {_fmt(e['kernel_ms'] * 1e3)} "
                             f"| {_fmt(e['pass_ms'] * 1e3)} "
                             f"| {e['ratio']:.2f} | {_fmt(e['kernel_GBps'])} | {_fmt(pk and 100 * pk)} "
                             f"| {_fmt(e['pass_GBps'])} | {_fmt(pp and 100 * pp)} "
                             f"| {_fmt(c.get('max_abs_diff_factor'))} "
                             f"| {_fmt(c.get('max_rel_diff_logits'))} | {c.get('ok')} |")
        else:
            lines.append(str(tri.get("skipped") or tri.get("error", "")[-500:]))
        lines.append("")
    if "hapo_loss" in result:
        hl = result.get("hapo_loss", {})
        lines += ["## 2. HAPO loss vs reference vanilla PPO loss (forward + backward, batch statistics given)", ""]
        if "entries" in hl:
            lines += ["| dtype | rows × length | vanilla ms | HAPO ms | HAPO / vanilla | vanilla peak MiB "
                      "| HAPO peak MiB "
                      "| batch stats s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
            for e in hl["entries"]:
                lines.append(f"| {e['dtype']} | {e['rows']} × {e['length']} | {_fmt(e['vanilla_ms'])} "
                             f"| {_fmt(e['hapo_ms'])} | {e['ratio']:.2f} | {_mib(e['vanilla_memory'])} "
                             f"| {_mib(e['hapo_memory'])} | {_fmt(e['batch_stats_s'])} |")
            lines += ["", "Peak MiB: allocated above the inputs during one forward + backward."]
        else:
            lines.append(hl.get("error", "")[-500:])
        lines.append("")
    if "registered" in result:
        reg = result.get("registered", {})
        lines += ["## 3. Every registered loss and estimator", ""]
        if "losses" in reg and "loss_baseline" in reg:
            b = reg["loss_baseline"]
            lines += [f"Losses: fp32, {b['rows']} × {b['length']}, forward + backward; vanilla {_fmt(b['ms'])} ms.",
                      "",
                      "| loss | ms | / vanilla | peak MiB |", "|---|---:|---:|---:|"]
            lines += [f"| {n} | {_fmt(e['ms'])} | {e['ratio']:.2f} | {_mib(e['memory'])} |"
                      for n, e in reg["losses"].items()]
            b = reg["estimator_baseline"]
            lines += ["", f"Estimators: {b['prompts']} prompts × {b['n']}, {b['length']} tokens; grpo_vectorized "
                      f"{_fmt(b['ms'])} ms.", "", "| estimator | ms | / grpo_vectorized |", "|---|---:|---:|"]
            lines += [f"| {n} | {_fmt(e['ms'])} | {e['ratio']:.2f} |" for n, e in reg["estimators"].items()]
            lines += ["", "| batch statistics hook | ms |", "|---|---:|"]
            lines += [f"| {n} | {_fmt(e['ms'])} |" for n, e in reg["batch_stats"].items()]
        else:
            lines.append(reg.get("error", "")[-500:])
        lines.append("")
    if "correctness" in result:
        cor = result.get("correctness", {})
        lines += ["## 4. Device correctness and host syncs", ""]
        if "losses" in cor:
            tol = cor["tolerance"]
            counted = ("`torch.cuda.set_sync_debug_mode` warnings per call" if cor["device"].startswith("cuda")
                       else "ops reading values on the host, counted by dispatch")
            lines += [f"Device vs CPU, {cor['rows']} × {cor['length']}; tolerance rtol {tol['rtol']}, "
                      f"atol {tol['atol']}.",
                      "", "worst diff / tolerance: the largest abs(device - cpu) / (atol + rtol·abs(cpu)) over every "
                      f"value compared (≤ 1 passes). Host syncs: {counted}.",
                      "", "| part | name | worst diff / tol | CPU tensors | host syncs / call | ok |",
                      "|---|---|---:|---:|---:|---|"]
            for group in ("losses", "estimators", "batch_stats", "references"):
                for name, e in cor[group].items():
                    worst = [v.get("worst_over_tol") for v in e.get("values", {}).values()]
                    rel = None if not worst or None in worst else max(worst)
                    cpu_t = e.get("cpu_tensors", e.get("meta_check", {}).get("cpu_tensors"))
                    lines.append(f"| {group} | {name} | {_fmt(rel)} | {_fmt(cpu_t)} "
                                 f"| {_fmt(e.get('host_syncs_per_call'))} "
                                 f"| {e.get('ok')} |")
        else:
            lines.append(cor.get("error", "")[-500:])
    lines += ["", f"**All checks ok: {result.get('ok')}**", ""]
    return "\n".join(lines)


# ================================================================================================ main
PARTS = ("triton", "hapo_loss", "registered", "correctness")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for gpu_check.json and gpu_check.md")
    parser.add_argument("--smoke", action="store_true", help="every code path on CPU at tiny sizes (Triton under "
                        "TRITON_INTERPRET=1); no GPU number")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--repeats", type=int, default=None, help="override the repeats of parts 2-3")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    if args.smoke:
        device, sizes = torch.device("cpu"), SMOKE
    elif torch.cuda.is_available():
        device, sizes = torch.device("cuda", torch.cuda.current_device()), FULL
    else:
        print("no CUDA device: run with --smoke for the CPU smoke check", file=sys.stderr)
        return 2
    if args.repeats is not None:
        sizes = Sizes(**{**vars(sizes), "repeats": args.repeats})
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    meta = device_info(device, sizes)
    meta.update(smoke=args.smoke, started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), parts=parts, sizes=vars(sizes),
                settings={"clip_low": CLIP_LOW, "clip_high": CLIP_HIGH, "clip_ratio_c": CLIP_RATIO_C,
                          "kl_coef": KL_COEF, "kl_type": KL_TYPE},
                triton_interpret=os.environ.get("TRITON_INTERPRET"))
    result = {"meta": meta}
    section_s = {}
    ok = True
    for part in parts:
        t0 = time.perf_counter()
        try:
            if part == "triton":
                result[part] = part_triton(device, sizes, meta.get("peak_bandwidth_GBps"))
            elif part == "hapo_loss":
                result[part] = part_hapo_loss(device, sizes)
            elif part == "registered":
                result[part] = part_registered(device, sizes)
            else:
                result[part] = part_correctness(device, sizes)
            ok = ok and result[part].get("ok", True)
        except Exception as exc:
            result[part] = _error(exc)
            ok = False
        section_s[part] = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.empty_cache()
    import hapo_verl

    meta.update(section_s=section_s, wall_s=time.perf_counter() - started, hapo_verl_file=hapo_verl.__file__,
                frameworks_imported=sorted(m for m in sys.modules
                                           if m.split(".")[0] in FRAMEWORKS and sys.modules[m] is not None))
    if not args.smoke:
        meta["within_8_min"] = meta["wall_s"] <= 480  # the budget this check is sized for (H100/H200 class)
    result["ok"] = ok
    text = markdown(result)
    print(text)
    (out_dir / "gpu_check.md").write_text(text)
    with open(out_dir / "gpu_check.json", "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    print(f"wrote {out_dir / 'gpu_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
