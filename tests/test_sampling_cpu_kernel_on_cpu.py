"""The compiled CPU kernel (hapo_verl/sampling/cpu_kernel.c) against float64 references and the torch path: entropy,
factor rule, in-place scaling, masked / one-hot / non-finite rows, row subsets and strides, every SIMD variant the
machine can run, thread counts, the build cache and the fallback when no compiler works."""

import logging
import math
import shutil

import pytest
import torch

from hapo_verl.algorithms.entropy import row_temperature_factor_from_entropy
from hapo_verl.sampling import cpu_kernel as ck
from hapo_verl.sampling import fast_path as fp
from hapo_verl.sampling.params import pack_params

HAVE_CC = ck._compiler() is not None
pytestmark = pytest.mark.skipif(not HAVE_CC, reason="no C compiler on this machine: the torch path is used")


def entropy64(x, a=None):
    """float64 entropy of softmax(a * x) per row; 0 for rows with no finite entry."""
    z = x.double() * (1.0 if a is None else a.double()[:, None])
    lp = torch.log_softmax(z, dim=-1)
    p = lp.exp()
    h = -torch.where(p > 0, p * lp, torch.zeros_like(p)).sum(-1)
    return torch.nan_to_num(h, nan=0.0)


def make_logits(rows=9, vocab=5003, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * torch.linspace(0.3, 8.0, rows)[:, None]
    x[1, ::3] = float("-inf")   # masked vocabulary
    x[2] *= 1000.0              # numerically one-hot
    x[3] = float("-inf")
    x[3, 11] = 4.0              # exactly one-hot
    x[4] = float("-inf")        # all -inf
    x[5] = 0.0                  # uniform: H = log(vocab)
    return x


def variants():
    """(name, cflags) of every SIMD level this CPU can run: the default build plus AVX2-only and plain C."""
    out = [("native", ck.CFLAGS)]
    base = tuple(f for f in ck.CFLAGS if not f.startswith("-march"))
    cpu = ck._cpu_signature()
    if " avx2 " in f" {cpu} " and " fma " in f" {cpu} " and " avx512f " in f" {cpu} ":
        out.append(("avx2", base + ("-mavx2", "-mfma", "-mno-avx512f")))
    out.append(("plain C", base))
    return out


@pytest.fixture(scope="module", params=variants(), ids=lambda v: v[0])
def lib(request):
    return ck.load_library(request.param[1])


def test_builds_here_and_reports_its_simd_level():
    assert ck.available(), ck.status()
    assert ck.status().startswith("ok (simd=")
    if " avx2 " in f" {ck._cpu_signature()} ":
        assert "scalar" not in ck.status()
    assert fp.choose_backend(torch.zeros(2, 3)) == "cpu_kernel"
    assert fp.choose_backend(torch.zeros(2, 3, dtype=torch.float64)) == "torch"  # only fp32 rows


@pytest.mark.parametrize("vocab", [1, 7, 17, 64, 5003, 151_936])
def test_row_entropy_matches_float64_reference(lib, vocab):
    x = make_logits(vocab=vocab) if vocab > 11 else torch.randn(6, vocab) * 3
    got = ck.row_entropy(x, lib=lib)
    ref = entropy64(x).float()
    assert torch.allclose(got, ref, rtol=2e-6 * max(1.0, math.log(vocab)), atol=2e-6), (got - ref).abs().max()
    if vocab > 11:
        assert got[3].item() == pytest.approx(0.0, abs=1e-6) and got[4].item() == 0.0
        assert got[5].item() == pytest.approx(math.log(vocab), rel=1e-6)


def test_two_token_rows_measure_the_exp_itself(lib):
    # entropy of a two-token row is as sensitive to an error in exp as the exp itself (a shared error cancels in
    # wider rows); gaps sweep the fractional part of the base-2 exponent many times. (Beyond gap ~3 the entropy
    # is small and fp32 rounding of the row sum, ~6e-8 nats, dominates its relative error.)
    gaps = torch.linspace(0.01, 3.0, 997)
    x = torch.full((gaps.numel(), 64), float("-inf"))
    x[:, 5], x[:, 40] = 0.25, 0.25 - gaps
    got = ck.row_entropy(x, lib=lib).double()
    ref = entropy64(x)
    rel = ((got - ref).abs() / ref).max().item()
    assert rel < 1.5e-6, rel


def test_input_scale_rows_subset_and_row_stride(lib):
    big = make_logits(rows=8, vocab=6000)
    x = big[:, 500:5503]  # rows with a stride larger than the vocabulary
    assert x.stride() == (6000, 1)
    a = torch.linspace(0.25, 3.0, 5)
    rows = torch.tensor([7, 0, 3, 5, 1])
    got = ck.row_entropy(x, rows=rows, input_scale=a, lib=lib)
    ref = entropy64(x[rows], a).float()
    assert torch.allclose(got, ref, rtol=1e-5, atol=2e-6)
    with pytest.raises(IndexError, match="out of range"):
        ck.row_entropy(x, rows=torch.tensor([8]), lib=lib)


@pytest.mark.parametrize("compat", [0.0, 1.0])
def test_factor_rule_equals_row_temperature_factor_from_entropy(lib, compat):
    # uniform rows over k tokens have entropy log k exactly; a grid of k, pivots and scales covers both signs of
    # h, the log floor (k = 1: H = 0) and both clamps
    ks = [1, 2, 3, 5, 9, 40, 300, 2999]
    x = torch.full((len(ks), 3000), float("-inf"))
    for i, k in enumerate(ks):
        x[i, :k] = 1.5
    for pivot, scale, pos, neg, tau in [(0.5, 1.2, 0.7, 0.4, 0.3), (-1.0, 0.3, 2.0, 3.0, 0.9), (2.0, 5.0, 0.1, 0.2, 0.05)]:
        params = pack_params(pivot, scale, pos, neg, tau, compat, rows=len(ks))
        y = x.clone()
        f = ck.adaptive_temperature_(y, params, lib=lib)
        H = torch.tensor([math.log(k) for k in ks])
        ref = row_temperature_factor_from_entropy(H, torch.tensor(pivot), torch.tensor(scale), torch.tensor(pos),
                                                  torch.tensor(neg), torch.tensor(tau), torch.tensor(bool(compat)))
        assert torch.allclose(f, ref, rtol=1e-6, atol=1e-6), (f, ref)
        assert torch.allclose(y, x * (1.0 / ref)[:, None], rtol=1e-6, equal_nan=True)
        assert f.min() >= 1 - tau - 1e-6 and f.max() <= 1 + tau + 1e-6


@pytest.mark.parametrize("with_rows", [False, True])
def test_adaptive_temperature_equals_torch_path(lib, with_rows):
    x = make_logits(rows=9)
    g = torch.Generator().manual_seed(3)
    k = 6 if with_rows else 9
    rows = torch.tensor([8, 0, 5, 2, 6, 3]) if with_rows else None
    params = pack_params(torch.rand(k, generator=g) * 2 - 0.5, torch.rand(k, generator=g) + 0.2,
                            torch.rand(k, generator=g), torch.rand(k, generator=g), 0.4,
                            (torch.arange(k) % 2).float(), input_scale=torch.rand(k, generator=g) + 0.5,
                            enabled=(torch.arange(k) % 3 != 1).float())
    y_torch, y_kernel = x.clone(), x.clone()
    f_torch = fp.apply_packed_(y_torch, params, rows=rows, backend="torch")
    f_kernel = ck.adaptive_temperature_(y_kernel, params, rows=rows, lib=lib)
    assert torch.allclose(f_kernel, f_torch, rtol=1e-6, atol=1e-6)
    assert torch.allclose(y_kernel, y_torch, rtol=2e-6, atol=0, equal_nan=True)
    touched = set((rows if with_rows else torch.arange(9))[params[:, 0] > 0].tolist())
    for r in range(9):
        if r not in touched:  # disabled or not selected: bit for bit
            assert torch.equal(y_kernel[r], x[r]), r
    assert (f_kernel[params[:, 0] == 0] == 1).all()


def test_non_finite_rows_get_a_finite_factor_and_do_not_disturb_others(lib):
    x = make_logits(rows=6)
    x[0, 7] = float("nan")
    x[1, 9] = float("inf")
    params = pack_params(0.5, 1.2, 0.7, 0.4, 0.3, rows=6)
    y = x.clone()
    f = ck.adaptive_temperature_(y, params, lib=lib)
    assert torch.isfinite(f).all()
    assert f[0].item() == pytest.approx(0.7) and f[1].item() == pytest.approx(0.7)  # treated as H = 0
    ref = fp.apply_packed_(x[2:].clone(), params[2:], backend="torch")
    assert torch.allclose(f[2:], ref, rtol=1e-6)


def test_thread_count_does_not_change_results(lib, monkeypatch):
    monkeypatch.setattr(ck, "MIN_LOGITS_PER_THREAD", 1)  # let even this small block use every thread
    x = make_logits(rows=13, vocab=20_000, seed=4)
    params = pack_params(0.3, 1.0, 0.6, 0.6, 0.2, input_scale=0.9, rows=13)
    outs = []
    old = torch.get_num_threads()
    try:
        for n in (1, 2, 5):
            torch.set_num_threads(n)
            assert ck._threads(13, 20_000) == n
            y = x.clone()
            outs.append((ck.adaptive_temperature_(y, params, lib=lib), y))
    finally:
        torch.set_num_threads(old)
    for f, y in outs[1:]:
        assert torch.equal(f, outs[0][0]) and torch.equal(y, outs[0][1])


def test_build_is_cached_per_source_flags_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv(ck.ENV_CACHE, str(tmp_path))
    cc = ck._compiler()
    first = ck._build(cc)
    mtime = first.stat().st_mtime_ns
    assert ck._build(cc) == first and first.stat().st_mtime_ns == mtime  # reused, not rebuilt
    other = ck._build(cc, tuple(f for f in ck.CFLAGS if not f.startswith("-march")))
    assert other != first and other.exists()
    assert sorted(p.name for p in (tmp_path / "kernels").iterdir()) == sorted([first.name, other.name])


@pytest.mark.parametrize("how", ["switch", "broken compiler", "no compiler"])
def test_falls_back_to_torch_path_with_one_clear_log_line(tmp_path, monkeypatch, caplog, how):
    monkeypatch.setenv(ck.ENV_CACHE, str(tmp_path))
    if how == "switch":
        monkeypatch.setenv(ck.ENV_SWITCH, "0")
        reason = "disabled by HAPO_VERL_CPU_KERNEL=0"
    elif how == "broken compiler":
        bad = tmp_path / "badcc"
        bad.write_text("#!/bin/sh\necho 'cc: error: cannot compile' >&2\nexit 1\n")
        bad.chmod(0o755)
        monkeypatch.setenv("CC", str(bad))
        reason = "cannot compile"
    else:
        monkeypatch.delenv("CC", raising=False)
        monkeypatch.setattr(shutil, "which", lambda name: None)
        reason = "no C compiler found"
    ck.reset_for_tests()
    try:
        with caplog.at_level(logging.WARNING, logger=ck.__name__):
            x = make_logits(rows=6)
            assert fp.choose_backend(x) == "torch"
            y = x.clone()
            f = fp.apply_packed_(y, pack_params(0.5, 1.2, 0.7, 0.4, 0.3, rows=6))
            fp.apply_packed_(y.clone(), pack_params(0.5, 1.2, 0.7, 0.4, 0.3, rows=6))
        assert reason in ck.status()
        assert f.shape == (6,) and torch.isfinite(f).all()
        lines = [r.getMessage() for r in caplog.records if "compiled CPU kernel" in r.getMessage()]
        assert len(lines) == 1 and reason in lines[0] and "torch path" in lines[0]
        with pytest.raises(RuntimeError, match="CPU kernel"):
            ck.row_entropy(x)
    finally:
        ck.reset_for_tests()  # later tests build/load under the real environment again
