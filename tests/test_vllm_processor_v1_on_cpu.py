"""HapoAdaptiveTemperatureV1 with vLLM 0.24.0's real V1 Sampler on CPU tensors (scripts/install_vllm_cpu.sh).

Expectations are computed by hand (float64, the fork's formula written out here), not with the code under test.
"""

import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")  # guard only: CI installs vLLM 0.24.0 (scripts/install_vllm_cpu.sh)

from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import (  # noqa: E402
    BatchUpdateBuilder,
    LogitsProcessors,
    MoveDirectionality,
    build_logitsprocs,
)
from vllm.v1.sample.logits_processor import _load_logitsprocs_by_fqcns  # noqa: E402
from vllm.v1.sample.metadata import SamplingMetadata  # noqa: E402
from vllm.v1.sample.sampler import Sampler  # noqa: E402

from hapo_verl.algorithms.entropy import EntropyStats  # noqa: E402
from hapo_verl.sampling.request import AdaptiveTemperatureRequest  # noqa: E402
from hapo_verl.vllm import processor_fqcn  # noqa: E402
from hapo_verl.vllm.processors import HapoAdaptiveTemperature, HapoAdaptiveTemperatureV1  # noqa: E402

VOCAB = 2053


@pytest.fixture(autouse=True)
def _no_pinned_memory(monkeypatch):
    # vLLM's UnspecifiedPlatform (a CUDA build without a GPU) claims pinned memory; a CPU-only torch has none
    import vllm.utils.torch_utils as tu

    import vllm.v1.sample.ops.penalties as pen
    import vllm.v1.sample.sampler as smp

    for mod in (tu, pen, smp):
        monkeypatch.setattr(mod, "PIN_MEMORY", False)


def xargs(pivot=0.5, scale=1.2, pos=0.7, neg=0.4, tau=0.3, compat=False):
    return AdaptiveTemperatureRequest(EntropyStats(pivot, scale, pos, neg), tau, compat).to_extra_args()


def make_logits(rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, VOCAB, generator=g) * torch.linspace(0.5, 6.0, rows)[:, None]
    if rows > 2:
        x[2, ::4] = float("-inf")
    return x


def entropy64(z):
    z = z.double()
    p = torch.softmax(z, -1)
    return -(torch.where(p > 0, p * torch.log_softmax(z, -1), torch.zeros_like(p))).sum(-1)


def factor_by_hand(z_row, a):
    """f = 1 + tau * clamp(ĥ) for one row of pre-temperature logits z, request args ``a`` (float64)."""
    H = entropy64(z_row[None])[0].item()
    piv, sc, pos, neg, tau = (a[k] for k in ("hapo_pivot", "hapo_scale", "hapo_pos_scale", "hapo_neg_scale",
                                             "hapo_tau"))
    if a.get("hapo_reference_compat"):
        # the fork's sampler: e = log(max(H, 1e-6)); h = (e - m)/(s + 1e-6); ĥ = h*scale_pos or h*scale_neg
        # with scale_neg = 1/N < 0 (so ĥ = |h|/|N|); clamp to [-1, 1]; T_dyn = T (1 + tau ĥ)
        h = (math.log(max(H, 1e-6)) - piv) / (sc + 1e-6)
        h_hat = h * pos if h > 0 else h * (-neg)
    else:
        h = (math.log(max(H, 1e-8)) - piv) / sc
        h_hat = h * pos if h > 0 else h * neg
    return 1.0 + tau * min(1.0, max(-1.0, h_hat))


def metadata(temps, procs, gens=None, max_logprobs=-1):
    n = len(temps)
    t = torch.tensor(temps, dtype=torch.float32)
    return SamplingMetadata(
        temperature=t, all_greedy=bool((t < 1e-5).all()), all_random=bool((t >= 1e-5).all()),
        top_p=None, top_k=None, generators=gens or {}, max_num_logprobs=max_logprobs, no_penalties=True,
        prompt_token_ids=None, frequency_penalties=torch.zeros(n), presence_penalties=torch.zeros(n),
        repetition_penalties=torch.ones(n), output_token_ids=[[] for _ in range(n)],
        allowed_token_ids_mask=None, bad_words_token_ids={}, logitsprocs=procs)


def fake_vllm_config(max_num_seqs=16):
    return SimpleNamespace(speculative_config=None, scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs))


def add_requests(procs, params, batch_size=None):
    b = BatchUpdateBuilder()
    for i, p in enumerate(params):
        b.added.append((i, p, [1, 2, 3], []))
    upd = b.get_and_reset(batch_size or len(params))
    for proc in procs.all:
        proc.update_state(upd)


def gens(n, seed=1234):
    return {i: torch.Generator().manual_seed(seed + i) for i in range(n)}


@pytest.mark.parametrize("compat", [False, True])
def test_real_sampler_equals_plain_sampling_at_T_times_f(compat):
    # built the way the V1 model runner builds it: builtins [MinTokens, LogitBias, MinP] + ours, by FQCN
    procs = build_logitsprocs(fake_vllm_config(), torch.device("cpu"), False, False, [processor_fqcn()])
    assert [type(p).__name__ for p in procs.argmax_invariant] == ["MinPLogitsProcessor", "HapoAdaptiveTemperatureV1"]
    temps = [0.7, 1.0, 1.5, 0.9, 1.2]
    args = [xargs(compat=compat), xargs(tau=0.05, compat=compat), xargs(pivot=-0.5, compat=compat),
            xargs(scale=0.3, tau=0.9, compat=compat), xargs(pivot=2.0, neg=1.0, compat=compat)]
    add_requests(procs, [SamplingParams(temperature=T, extra_args=a, seed=7) for T, a in zip(temps, args)])
    z = make_logits(len(temps))
    f = torch.tensor([factor_by_hand(z[i], args[i]) for i in range(len(temps))], dtype=torch.float64)
    assert (f != 1).all() and (f.min() < 0.99 or compat) and f.max() > 1.01
    sampler = Sampler(logprobs_mode="processed_logits")
    out = sampler(z.clone(), metadata(temps, procs, gens(len(temps))))
    T = torch.tensor(temps, dtype=torch.float64)
    expect = (z.double() / (T * f)[:, None]).float()
    assert torch.allclose(out.logprobs_tensors.logprobs, expect, rtol=1e-5, atol=1e-6, equal_nan=True)
    plain = sampler(z.clone(), metadata((T * f).float().tolist(), LogitsProcessors(), gens(len(temps))))
    assert torch.equal(out.sampled_token_ids, plain.sampled_token_ids)
    ours = procs.argmax_invariant[1]
    assert torch.allclose(ours.last_factors.double(), f, rtol=1e-5)


def test_sampled_tokens_match_over_many_draws():
    procs = LogitsProcessors([HapoAdaptiveTemperatureV1(None, torch.device("cpu"), False)])
    temps = [0.8, 1.3]
    args = [xargs(tau=0.9, scale=0.5), xargs(tau=0.9, pivot=3.0)]
    add_requests(procs, [SamplingParams(temperature=T, extra_args=a) for T, a in zip(temps, args)])
    z = make_logits(2, seed=5) * 0.3  # flat rows: sampling is far from greedy, tokens really depend on T
    f = [factor_by_hand(z[i], args[i]) for i in range(2)]
    sampler = Sampler()
    for draw in range(20):
        a = sampler(z.clone(), metadata(temps, procs, gens(2, draw), max_logprobs=None)).sampled_token_ids
        b = sampler(z.clone(), metadata([temps[i] * f[i] for i in range(2)], LogitsProcessors(), gens(2, draw),
                                        max_logprobs=None)).sampled_token_ids
        assert torch.equal(a, b)


def test_entropy_is_measured_after_penalties_and_before_temperature():
    procs = LogitsProcessors([HapoAdaptiveTemperatureV1(None, torch.device("cpu"), False)])
    z = make_logits(1, seed=3) * 8.0  # peaked row: penalising its top tokens changes the entropy a lot
    prev = [int(z[0].argmax()), int(z[0].argmax()), 5, 5, 9]
    # pivot at the unpenalised row's log-entropy: f(z) = 1 exactly, f(z - penalties) != 1
    a = xargs(pivot=math.log(entropy64(z)[0].item()), scale=1.0, pos=1.0, neg=1.0, tau=0.8)
    add_requests(procs, [SamplingParams(temperature=0.6, extra_args=a, frequency_penalty=1.5)])
    md = metadata([0.6], procs)
    md.no_penalties = False
    md.prompt_token_ids = torch.tensor([[1, 2]])
    md.frequency_penalties = torch.tensor([1.5])
    md.output_token_ids = [prev]
    out = Sampler(logprobs_mode="processed_logits")(z.clone(), md)
    zp = z.clone()
    for tok in set(prev):
        zp[0, tok] -= 1.5 * prev.count(tok)  # the frequency penalty vLLM applies before temperature
    f = factor_by_hand(zp[0], a)
    assert factor_by_hand(z[0], a) == pytest.approx(1.0) and abs(f - 1.0) > 0.05  # penalties change H
    assert torch.allclose(out.logprobs_tensors.logprobs, zp / (0.6 * f), rtol=1e-5, atol=1e-6)


def test_untouched_rows_greedy_no_args_and_all_greedy_batches():
    lp = HapoAdaptiveTemperatureV1(None, torch.device("cpu"), False)
    procs = LogitsProcessors([lp])
    params = [SamplingParams(temperature=0.0, extra_args=xargs()),        # greedy
              SamplingParams(temperature=0.8),                              # no statistics (validation)
              SamplingParams(temperature=0.8, extra_args={"other": 1}),    # someone else's extra_args
              SamplingParams(temperature=0.8, extra_args=xargs(tau=0.0)),  # tau 0: identity
              SamplingParams(temperature=0.8, extra_args=xargs())]
    add_requests(procs, params)
    assert sorted(lp.req) == [4]
    z = make_logits(5, seed=4)
    out = Sampler(logprobs_mode="processed_logits")(z.clone(), metadata([0.0, 0.8, 0.8, 0.8, 0.8], procs))
    got = out.logprobs_tensors.logprobs
    assert out.sampled_token_ids[0, 0].item() == int(z[0].argmax())
    assert torch.equal(got[0], z[0])                       # greedy row: T set to 1, untouched by us
    for r in (1, 2, 3):
        assert torch.equal(got[r], z[r] / torch.tensor(0.8))
    f = factor_by_hand(z[4], xargs())
    assert torch.allclose(got[4], z[4] / (0.8 * f), rtol=1e-5)
    # an all-greedy batch never reaches argmax-invariant processors
    lp2 = HapoAdaptiveTemperatureV1(None, torch.device("cpu"), False)
    add_requests(LogitsProcessors([lp2]), [SamplingParams(temperature=0.0, extra_args=xargs())])
    assert lp2.req == {}


def test_batch_update_added_removed_moved_keep_row_parameters():
    lp = HapoAdaptiveTemperatureV1(None, torch.device("cpu"), False)
    b = BatchUpdateBuilder()
    tau = {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4, 4: 0.5}
    for i in range(5):
        b.added.append((i, SamplingParams(temperature=1.0, extra_args=xargs(tau=tau[i])), None, []))
    lp.update_state(b.get_and_reset(5))
    assert {i: v[6] for i, v in lp.req.items()} == tau

    def check(expected_tau_by_row, batch_size):
        z = make_logits(batch_size, seed=9)
        y = lp.apply(z.clone())
        for r in range(batch_size):
            if r in expected_tau_by_row:
                f = factor_by_hand(z[r], xargs(tau=expected_tau_by_row[r]))
                assert torch.allclose(y[r], z[r] / f, rtol=1e-5, equal_nan=True), r
            else:
                assert torch.equal(y[r], z[r]), r

    check(tau, 5)
    # finish rows 1 and 3; condense 4 -> 1 (unidirectional); a new request without args lands in row 3
    b.removed_append(1)
    b.removed_append(3)
    b.moved.append((4, 1, MoveDirectionality.UNIDIRECTIONAL))
    b.added.append((3, SamplingParams(temperature=1.0), None, []))
    lp.update_state(b.get_and_reset(4))
    check({0: 0.1, 1: 0.5, 2: 0.3}, 4)
    # swap rows 0 <-> 2 and 1 <-> 3 (3 has no args)
    b.moved.append((0, 2, MoveDirectionality.SWAP))
    b.moved.append((1, 3, MoveDirectionality.SWAP))
    lp.update_state(b.get_and_reset(4))
    check({2: 0.1, 3: 0.5, 0: 0.3}, 4)
    # no update: state unchanged
    lp.update_state(None)
    check({2: 0.1, 3: 0.5, 0: 0.3}, 4)
    # a new request replaces an old one in row 0 (added over an existing index)
    b.added.append((0, SamplingParams(temperature=1.0, extra_args=xargs(tau=0.7)), None, []))
    lp.update_state(b.get_and_reset(4))
    check({0: 0.7, 2: 0.1, 3: 0.5}, 4)
    # everything removed: apply is the identity
    for r in (0, 2, 3, 1):
        b.removed_append(r)
    lp.update_state(b.get_and_reset(0))
    assert lp.req == {}
    z = make_logits(2)
    assert torch.equal(lp.apply(z.clone()), z)


def test_validate_params_names_the_key():
    V = HapoAdaptiveTemperatureV1.validate_params
    V(SamplingParams(extra_args=xargs()))
    V(SamplingParams())                       # no args: accepted, untouched
    V(SamplingParams(extra_args={"unrelated": "x"}))
    cases = {
        "hapo_tau": dict(xargs(), hapo_tau=1.0),
        "hapo_tau'": dict(xargs(), hapo_tau=-0.1),
        "hapo_scale": dict(xargs(), hapo_scale=0.0),
        "hapo_neg_scale": dict(xargs(), hapo_neg_scale=-1.0),
        "hapo_pivot": dict(xargs(), hapo_pivot="0.5"),
        "hapo_pos_scale": dict(xargs(), hapo_pos_scale=float("nan")),
        "hapo_reference_compat": dict(xargs(), hapo_reference_compat="yes"),
    }
    for key, bad in cases.items():
        with pytest.raises(ValueError, match=key.rstrip("'")):
            V(SamplingParams(extra_args=bad))
    partial = {"hapo_tau": 0.2}
    with pytest.raises(ValueError, match="missing"):
        V(SamplingParams(extra_args=partial))
    # inside the engine an invalid request (had validation been bypassed) is left untouched, never raises
    lp = HapoAdaptiveTemperatureV1(None, torch.device("cpu"), False)
    add_requests(LogitsProcessors([lp]), [SamplingParams(temperature=1.0, extra_args=cases["hapo_tau"])])
    assert lp.req == {}


def test_loader_accepts_our_fqcn_and_the_dual_name():
    assert _load_logitsprocs_by_fqcns([processor_fqcn()]) == [HapoAdaptiveTemperatureV1]
    loaded = _load_logitsprocs_by_fqcns(["hapo_verl.vllm.processors:HapoAdaptiveTemperature"])
    assert loaded == [HapoAdaptiveTemperature] and issubclass(HapoAdaptiveTemperature, HapoAdaptiveTemperatureV1)


def test_factor_summary():
    lp = HapoAdaptiveTemperatureV1(None, torch.device("cpu"), False)
    add_requests(LogitsProcessors([lp]), [SamplingParams(temperature=1.0, extra_args=xargs(tau=0.5)),
                                          SamplingParams(temperature=1.0)])
    z = make_logits(2)
    lp.apply(z.clone())
    lp.apply(z.clone())
    f = factor_by_hand(z[0], xargs(tau=0.5))
    s = lp.factor_summary()
    assert s["count"] == 2 and s["mean"] == pytest.approx(f, rel=1e-5) and s["std"] == pytest.approx(0, abs=1e-6)
    assert lp.last_rows.tolist() == [0]
    assert lp.factor_summary() == {"count": 0}
