"""bench/gpu_check.py, the one prepared GPU check, on CPU: its smoke run covers every part and every registered
algorithm without verl, vLLM or Ray; its reference copies equal verl's functions; the way it calls the registered
algorithms equals the plugin's own path; its host-sync and host-tensor counters see what they must see."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hapo_verl import registry

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
SMOKE_LIMIT_S = 60.0


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gc = _load_script()


# ------------------------------------------------------------------------------------------------ the smoke run
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """``PYTHONPATH=. python bench/gpu_check.py --smoke --out DIR`` in a fresh interpreter where verl, vLLM and Ray
    cannot be imported: an import finder refuses them and records every attempt (even one caught by the code)."""
    out = tmp_path_factory.mktemp("gpu_check")
    code = ("import atexit, json, runpy, sys\n"
            "attempts = []\n"
            "class Refuse:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('verl', 'vllm', 'ray'):\n"
            "            attempts.append(name)\n"
            "            raise ModuleNotFoundError(f'{name} is refused in this check')\n"
            "        return None\n"
            "sys.meta_path.insert(0, Refuse())\n"
            f"atexit.register(lambda: open({str(out / 'attempts.json')!r}, 'w').write(json.dumps(attempts)))\n"
            f"sys.argv = [{str(SCRIPT)!r}, '--smoke', '--out', {str(out)!r}]\n"
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself under --smoke
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    elapsed = time.monotonic() - start
    result = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").is_file() else None
    return proc, result, elapsed, out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_smoke_runs_every_part_without_verl_within_a_minute(smoke):
    proc, result, elapsed, out = smoke
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    assert result is not None and result["ok"] is True
    meta = result["meta"]
    assert meta["smoke"] is True and meta["device"] == "cpu"
    assert meta["frameworks_imported"] == []
    assert json.loads((out / "attempts.json").read_text()) == []  # nothing even tried to import them
    assert Path(meta["hapo_verl_file"]).resolve().is_relative_to(ROOT)  # the checkout's package
    assert set(meta["section_s"]) == set(gc.PARTS)
    assert elapsed < SMOKE_LIMIT_S, f"the smoke run took {elapsed:.0f} s (limit {SMOKE_LIMIT_S:.0f} s)"
    assert "# GPU check" in proc.stdout and "SMOKE RUN" in proc.stdout  # the Markdown report
    assert (out / "gpu_check.md").read_text().startswith("# GPU check")


def test_smoke_part_1_triton_kernel(smoke):
    _, result, _, _ = smoke
    tri = result["triton"]
    if importlib.util.find_spec("triton") is None:
        assert "skipped" in tri
        pytest.skip("Triton is not installed")
    assert result["meta"]["triton_interpret"] == "1"
    sizes = gc.SMOKE
    want = {(d, r) for d in ("fp32", "bf16") for r in sizes.rows}
    assert {(e["dtype"], e["rows"]) for e in tri["entries"]} == want
    for e in tri["entries"]:
        for key in ("kernel_ms", "pass_ms", "ratio", "kernel_GBps", "pass_GBps"):
            assert _finite(e[key]) and e[key] > 0, (key, e)
    assert {(c["dtype"], c["rows"]) for c in tri["correctness"]} == want
    for c in tri["correctness"]:
        assert c["ok"] is True and _finite(c["max_abs_diff_factor"]) and _finite(c["max_rel_diff_logits"]), c
    assert tri["ok"] is True


def test_smoke_part_2_hapo_loss(smoke):
    _, result, _, _ = smoke
    entries = result["hapo_loss"]["entries"]
    assert [e["dtype"] for e in entries] == ["bf16", "fp32"]
    for e in entries:
        assert (e["rows"], e["length"]) == gc.SMOKE.loss
        for key in ("vanilla_ms", "hapo_ms", "ratio", "batch_stats_s"):
            assert _finite(e[key]) and e[key] > 0, (key, e)
        assert "vanilla_memory" in e and "hapo_memory" in e  # None on CPU: CUDA allocator statistics only


def test_smoke_part_3_has_every_registered_loss_and_estimator(smoke):
    _, result, _, _ = smoke
    reg = result["registered"]
    assert set(reg["losses"]) == set(registry.loss_specs()) and len(reg["losses"]) >= 4
    assert set(reg["estimators"]) == set(registry.estimator_specs()) and len(reg["estimators"]) >= 3
    assert set(reg["batch_stats"]) == {n for n, s in registry.discover().items() if s.batch_stats is not None}
    assert _finite(reg["loss_baseline"]["ms"]) and _finite(reg["estimator_baseline"]["ms"])
    for e in reg["losses"].values():
        assert _finite(e["ms"]) and _finite(e["ratio"]) and e["ms"] > 0, e
    for e in reg["estimators"].values():
        assert _finite(e["ms"]) and _finite(e["ratio"]) and e["ms"] > 0, e
    for e in reg["batch_stats"].values():
        assert _finite(e["ms"]), e


def test_smoke_part_4_correctness_entries(smoke):
    _, result, _, _ = smoke
    cor = result["correctness"]
    assert cor["ok"] is True and cor["tolerance"]["rtol"] == gc.RTOL
    assert set(cor["losses"]) == set(registry.loss_specs())
    assert set(cor["estimators"]) == set(registry.estimator_specs())
    assert set(cor["references"]) == {"vanilla_ppo", "grpo_vectorized"}
    for group in ("losses", "estimators", "batch_stats", "references"):
        for name, e in cor[group].items():
            assert e["ok"] is True, (group, name, e)
            assert isinstance(e["host_syncs_per_call"], int), (group, name, e)
            assert e["values"] and all(_finite(v["max_abs"]) for v in e["values"].values()), (group, name, e)
    for name, e in cor["losses"].items():
        assert {"loss", "grad"} <= set(e["values"]), e
        # the registered losses read nothing back to the host and make no host tensor (checked on meta tensors)
        assert e["host_syncs_per_call"] == 0, (name, e["ops"])
        assert e["meta_check"]["ok"] is True and e["meta_check"]["cpu_tensors"] == 0, (name, e["meta_check"])
    # verl's vanilla loss reads its three metrics with .item()
    assert cor["references"]["vanilla_ppo"]["host_syncs_per_call"] == 3


# ------------------------------------------------------------------------------------------------ references = verl
def _batch(B=10, L=13, seed=0):
    batch = gc.make_batch(B, L, 4, torch.device("cpu"), seed=seed, min_len=1)
    batch.mask[3] = False  # a row without a valid token
    batch.adv[3] = 0.0
    return batch


@pytest.mark.parametrize("mode", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                                  "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("global_info", [False, True])
def test_reference_agg_loss_equals_verl(mode, global_info):
    from verl.trainer.ppo.core_algos import agg_loss

    batch = _batch()
    mat = torch.randn(batch.mask.shape)
    info = {"dp_size": 2, "batch_num_tokens": 77, "global_batch_size": 19, "loss_scale_factor": 5} \
        if global_info else {}
    for mask in (batch.mask, batch.mask.float()):
        assert torch.equal(gc.ref_agg_loss(mat, mask, mode, **info), agg_loss(mat, mask, mode, **info))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_vanilla_loss_equals_verl(dtype):
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla
    from verl.workers.config import ActorConfig

    batch = _batch().to(dtype=dtype)
    batch.new = batch.old + torch.randn(batch.old.shape).to(dtype) * 0.4  # both clip branches active
    info = batch.global_batch_info()
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=gc.CLIP_LOW,
                         clip_ratio_high=gc.CLIP_HIGH, clip_ratio_c=gc.CLIP_RATIO_C)
    config.global_batch_info.update(info)
    for mode in ("token-mean", "seq-mean-token-sum"):
        new_a = batch.new.clone().requires_grad_(True)
        new_b = batch.new.clone().requires_grad_(True)
        ours, ours_m = gc.ref_vanilla_policy_loss(batch.old, new_a, batch.adv, batch.mask, mode,
                                                  global_batch_info=info)
        theirs, theirs_m = compute_policy_loss_vanilla(batch.old, new_b, batch.adv, batch.mask, mode, config)
        ours.backward()
        theirs.backward()
        assert torch.equal(ours, theirs) and torch.equal(new_a.grad, new_b.grad)
        assert ours_m == theirs_m
        assert 0 < ours_m["actor/pg_clipfrac"] < 1


@pytest.mark.parametrize("kind", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "k3+", "low_var_kl+"])
def test_reference_kl_penalty_equals_verl(kind):
    from verl.trainer.ppo.core_algos import kl_penalty

    batch = _batch()
    ref = batch.ref + torch.linspace(-30.0, 30.0, batch.ref.numel()).reshape(batch.ref.shape)  # the clamps act
    a = batch.new.clone().requires_grad_(True)
    b = batch.new.clone().requires_grad_(True)
    ours, theirs = gc.ref_kl_penalty(a, ref, kind), kl_penalty(b, ref, kind)
    ours.sum().backward()
    theirs.sum().backward()
    assert torch.equal(ours, theirs) and torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("norm", [True, False])
def test_reference_grpo_equals_verl(norm):
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, compute_grpo_vectorized_outcome_advantage

    batch = gc.make_batch(23, 11, 4, torch.device("cpu"), seed=3, min_len=1)  # 23 rows: a group of 3
    group_ids = batch.group_ids.clone()
    group_ids[-1] = int(group_ids.max()) + 1  # and a singleton group: mean 0, std 1
    index = np.array([f"uid-{i}" for i in group_ids.tolist()], dtype=object)
    mask = batch.mask.float()
    ours, ours_r = gc.ref_grpo_vectorized(batch.rewards, mask, group_ids, norm_adv_by_std=norm)
    vec, _ = compute_grpo_vectorized_outcome_advantage(batch.rewards, mask, index, norm_adv_by_std_in_grpo=norm)
    loop, _ = compute_grpo_outcome_advantage(batch.rewards.clone(), mask, index, norm_adv_by_std_in_grpo=norm)
    assert torch.equal(ours, vec) and torch.equal(ours, ours_r)
    torch.testing.assert_close(ours, loop, rtol=1e-5, atol=1e-6)
    assert ours.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ harness = plugin
@pytest.mark.parametrize("name", sorted(registry.loss_specs()))
def test_the_harness_calls_each_loss_as_the_plugin_does(name):
    """``gc.loss_call`` (no verl) equals ``hapo_verl.integration.loss.run_loss`` with verl's actor config and
    global batch info, KL on: the loss measured on the GPU is the loss trained with."""
    from loss_test_utils import actor_config

    from hapo_verl.integration.loss import run_loss
    from hapo_verl.integration.options import loss_options

    spec = registry.get(name)
    config = actor_config(clip=(gc.CLIP_LOW, gc.CLIP_HIGH), use_kl_loss=True, kl_loss_coef=gc.KL_COEF,
                          loss_mode=name)
    assert config.clip_ratio_c == gc.CLIP_RATIO_C and config.kl_loss_type == gc.KL_TYPE
    options = loss_options(spec, config.policy_loss)
    assert options == gc.loss_options_of(spec)
    batch = _batch(seed=5)
    info = batch.global_batch_info()
    config.global_batch_info.update(info)
    stats = gc.batch_stats_of(spec, batch, options) if gc.loss_needs_stats(spec, options) else None
    new_a = batch.new.clone().requires_grad_(True)
    new_b = batch.new.clone().requires_grad_(True)
    ours, ours_m = gc.loss_call(spec, options, batch, stats, with_kl=True)(new_a)
    # the worker hands a loss that needs them the mini-batch pass's statistics (its equality with the pass over
    # micro-batches and ranks: tests/test_{bapo,stapo,kl_cov_global}_on_cpu.py)
    minibatch = gc.minibatch_stats_of(spec, options, batch, stats) if registry.MINIBATCH_STATS in \
        spec.needs_of_loss(options) else None
    theirs, theirs_m = run_loss(spec, options, old_log_prob=batch.old, log_prob=new_b, advantages=batch.adv,
                                response_mask=batch.mask, loss_agg_mode="token-mean", config=config,
                                entropy=batch.entropy, batch_stats=stats, ref_log_prob=batch.ref,
                                minibatch_stats=minibatch)
    ours.backward()
    theirs.backward()
    assert torch.equal(ours, theirs) and torch.equal(new_a.grad, new_b.grad)
    assert {k.rsplit("/", 1)[-1] for k in theirs_m} == set(ours_m)
    for key, value in theirs_m.items():
        assert torch.equal(value, ours_m[key.rsplit("/", 1)[-1]]), key


@pytest.mark.parametrize("name", sorted(registry.estimator_specs()))
def test_the_harness_calls_each_estimator_as_the_plugin_does(name):
    from omegaconf import OmegaConf

    from hapo_verl.integration.estimator import LAST_METRICS, estimator_inputs, verl_estimator

    spec = registry.get(name)
    batch = gc.make_batch(24, 15, 4, torch.device("cpu"), seed=6, min_len=1)
    adv, ret, metrics = gc.estimator_call(spec, batch)()
    stats = gc.batch_stats_of(spec, batch) if spec.batch_stats is not None else None
    index = np.array([f"uid-{i}" for i in batch.group_ids.tolist()], dtype=object)
    with estimator_inputs(old_log_prob=batch.old, entropy=batch.entropy, batch_stats=stats, step_ends=batch.step_ends):
        theirs, theirs_r = verl_estimator(spec)(token_level_rewards=batch.rewards, response_mask=batch.mask.float(),
                                                index=index, config=OmegaConf.create({}))
    assert torch.equal(adv, theirs) and torch.equal(ret, theirs_r)
    assert metrics == LAST_METRICS


# ------------------------------------------------------------------------------------------------ the counters
def test_the_host_watch_counts_host_reads_and_sees_no_false_ones():
    x = torch.arange(6.0)
    with gc.SyncCount(torch.device("cpu")) as counter:
        _ = float(x.sum())          # .item(): 1
        _ = x[x > 2]                # boolean index: 1
        _ = torch.nonzero(x)        # 1
        _ = (x * 2).exp().sum()     # nothing
    report = counter.report()
    assert report["host_read_ops"] == 3 and report["host_syncs_per_call"] == 3, report
    with gc.SyncCount(torch.device("cpu")) as counter:
        _ = torch.where(x > 2, x, torch.zeros_like(x)).sum()
    assert counter.report()["host_syncs_per_call"] == 0


def test_the_meta_check_catches_a_host_tensor_and_a_host_read():
    watch = gc.HostWatch("meta")
    with watch:
        _ = torch.zeros(3, device="meta") * 2.0
    assert watch.cpu_tensors == []
    with watch:
        _ = torch.ones(3)  # a factory call without device=
    assert watch.cpu_tensors == ["aten.ones.default"]

    spec = registry.get("hapo")
    batch = _batch()
    options = gc.loss_options_of(spec)

    def reading_loss(inputs, opts):  # a loss that reads a value back to the host must fail the check
        loss, metrics = spec.loss(inputs, opts)
        return loss * float(inputs.log_prob.mean()), metrics

    fields = {f: getattr(spec, f) for f in spec.__dataclass_fields__}
    reading = registry.AlgorithmSpec(**{**fields, "loss": reading_loss})
    stats = gc.batch_stats_of(spec, batch, options)
    bad = gc._meta_check(reading, options, batch, stats, batch.global_batch_info())
    assert bad["ok"] is False and "meta" in bad["error"]
    good = gc._meta_check(spec, options, batch, stats, batch.global_batch_info())
    assert good["ok"] is True and good["cpu_tensors"] == 0


def test_compare_flags_a_difference_beyond_the_tolerance():
    a = torch.tensor([1.0, 2.0, 3.0])
    assert gc.compare({"x": a}, {"x": a * (1 + 0.5 * gc.RTOL)})["ok"] is True
    out = gc.compare({"x": a, "y": a}, {"x": a * (1 + 3 * gc.RTOL), "y": a})
    assert out["ok"] is False and out["values"]["x"]["ok"] is False and out["values"]["y"]["ok"] is True
    assert gc.compare({"x": a}, {})["ok"] is False
    assert gc.compare({"x": a}, {"x": torch.tensor([1.0, float("nan"), 3.0])})["ok"] is False
