"""Fused entropy/scale fast path (pure torch) vs the reference math of hapo_verl.algorithms.entropy; package
import lightness; processor_fqcn. No vLLM needed."""

import math
import shutil
import subprocess
import sys

import pytest
import torch

from hapo_verl.algorithms.entropy import (
    EntropyStats,
    row_temperature_factor,
    row_temperature_factor_from_entropy,
    token_entropy_from_logits,
)
from hapo_verl.sampling import fast_path as fp
from hapo_verl.sampling.params import NUM_PARAMS, pack_params

STATS = EntropyStats(pivot=0.5, scale=1.2, pos_scale=0.7, neg_scale=0.4)
#: the CPU backends; "cpu_kernel" needs a C compiler (tests/test_sampling_cpu_kernel_on_cpu.py covers it in depth)
CPU_BACKENDS = ["torch", pytest.param("cpu_kernel", marks=pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler: torch path only"))]


def make_logits(rows=7, vocab=5003, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * torch.linspace(0.3, 8.0, rows)[:, None]
    x[1, ::3] = float("-inf")   # masked vocabulary (allowed ids / grammar / min_p)
    x[2] *= 1000.0              # numerically one-hot: H ~ 0
    x[3] = float("-inf")        # fully masked row: H := 0
    x[3, 11] = 4.0              # ... except one token: exactly one-hot, H = 0
    x[4] = float("-inf")        # all -inf
    return x


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hand_computed_uniform_row(backend):
    # uniform over 8 tokens (others -inf): H = log 8; e = log(log 8) = 0.73210; pivot 0, scale 1 -> h = 0.73210
    # h > 0: ĥ = 0.5 h = 0.36605; tau 0.5 -> f = 1.183025
    x = torch.full((1, 64), float("-inf"))
    x[0, :8] = 3.0
    f = fp.scale_logits_by_entropy_(x, pivot=0.0, scale=1.0, pos_scale=0.5, neg_scale=2.0, tau=0.5, backend=backend)
    expected = 1.0 + 0.5 * 0.5 * math.log(math.log(8.0))
    assert f.item() == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(x[0, :8], torch.full((8,), 3.0 / expected))
    assert torch.isinf(x[0, 8:]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hand_computed_low_entropy_signed_vs_reference_compat(backend):
    # two live tokens with logit gap 4: p = sigmoid(4), H = 0.0715 nats, log H < pivot -> h < 0
    p = 1.0 / (1.0 + math.exp(-4.0))
    H = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    x = torch.full((2, 16), float("-inf"))
    x[:, 0], x[:, 1] = 4.0, 0.0
    pivot, scale, pos, neg, tau = 0.0, 2.0, 0.5, 0.25, 0.4
    h = (math.log(H) - pivot) / scale                      # < 0
    f_signed = 1 + tau * max(-1.0, h * neg)                 # intended: cools
    h_ref = (math.log(max(H, 1e-6)) - pivot) / (scale + 1e-6)
    f_ref = 1 + tau * min(1.0, -h_ref * neg)                # fork: |ĥ|, heats
    f = fp.scale_logits_by_entropy_(x, pivot, scale, pos, neg, tau, reference_compat=torch.tensor([0.0, 1.0]),
                                    backend=backend)
    assert f[0].item() == pytest.approx(f_signed, rel=1e-5) and f_signed < 1
    assert f[1].item() == pytest.approx(f_ref, rel=1e-5) and f_ref > 1


@pytest.mark.parametrize("reference_compat", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 3, 64])
def test_torch_path_equals_row_temperature_factor(reference_compat, chunk_rows):
    x = make_logits()
    expected = row_temperature_factor(x, STATS, 0.3, reference_compat=reference_compat)
    y = x.clone()
    f = fp.scale_logits_by_entropy_(y, STATS.pivot, STATS.scale, STATS.pos_scale, STATS.neg_scale, 0.3,
                                    reference_compat=reference_compat, backend="torch", chunk_rows=chunk_rows)
    assert torch.allclose(f, expected, rtol=1e-6, atol=1e-6)
    assert torch.allclose(y, x / expected[:, None], rtol=1e-6, equal_nan=True)
    assert not torch.isnan(y).any()
    # H=0 rows (one-hot, all -inf) are at the bottom: ĥ = -1 (signed) or +1 (fork) -> f = 1 -+ tau
    assert f[3].item() == pytest.approx(1.3 if reference_compat else 0.7)
    assert f[4].item() == pytest.approx(1.3 if reference_compat else 0.7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_row_entropy_matches_reference_and_input_scale(backend):
    x = make_logits()
    assert torch.allclose(fp.row_entropy(x, backend=backend), token_entropy_from_logits(x), rtol=1e-5, atol=1e-6)
    a = torch.linspace(0.5, 2.0, x.shape[0])
    assert torch.allclose(fp.row_entropy(x, input_scale=a, backend=backend),
                          token_entropy_from_logits(x * a[:, None]), rtol=1e-5, atol=1e-5)
    rows = torch.tensor([5, 0, 2])
    assert torch.allclose(fp.row_entropy(x, rows=rows, backend=backend), token_entropy_from_logits(x[rows]),
                          rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_per_row_parameters_rows_subset_and_disabled_rows(backend):
    x = make_logits(rows=6)
    rows = torch.tensor([4, 0, 5, 2])
    pivot = torch.tensor([0.5, -1.0, 1.0, 0.0])
    scale = torch.tensor([1.2, 0.5, 2.0, 1.0])
    pos = torch.tensor([0.7, 0.3, 1.0, 0.2])
    neg = torch.tensor([0.4, 0.9, 0.1, 0.6])
    tau = torch.tensor([0.3, 0.05, 0.9, 0.5])
    compat = torch.tensor([0.0, 1.0, 0.0, 1.0])
    temp = torch.tensor([1.0, 0.7, 1.3, 2.0])   # input scale: entropy is measured on temp * x
    y = x.clone()
    f = fp.scale_logits_by_entropy_(y, pivot, scale, pos, neg, tau, compat, input_scale=temp, rows=rows,
                                    chunk_rows=3, backend=backend)
    for i, r in enumerate(rows.tolist()):
        st = EntropyStats(pivot[i].item(), scale[i].item(), pos[i].item(), neg[i].item())
        ref = row_temperature_factor(x[r:r + 1] * temp[i], st, tau[i].item(), reference_compat=bool(compat[i]))
        assert f[i].item() == pytest.approx(ref.item(), rel=1e-5)
        assert torch.allclose(y[r], x[r] / f[i], rtol=1e-6, equal_nan=True)
    for r in (1, 3):  # not selected: untouched, bit for bit
        assert torch.equal(y[r], x[r])
    # the packed form with a disabled row: f = 1 and the row is untouched
    params = pack_params(pivot, scale, pos, neg, tau, compat, temp, enabled=torch.tensor([1.0, 0.0, 1.0, 0.0]))
    z = x.clone()
    f2 = fp.apply_packed_(z, params, rows=rows, backend=backend)
    assert f2[1].item() == 1.0 and f2[3].item() == 1.0
    assert torch.equal(z[0], x[0]) and torch.equal(z[2], x[2])
    assert torch.allclose(f2[[0, 2]], f[[0, 2]])
    assert torch.allclose(z[4], y[4], equal_nan=True)


def test_factors_from_entropy_helper_equals_scalar_function():
    H = torch.tensor([0.0, 1e-9, 0.05, 0.7, 2.0, 11.0])
    for compat in (False, True):
        got = row_temperature_factor_from_entropy(H, torch.full((6,), 0.5), torch.full((6,), 1.2),
                                                  torch.full((6,), 0.7), torch.full((6,), 0.4),
                                                  torch.full((6,), 0.3), torch.full((6,), compat))
        # rows of logits with these exact entropies are hard to build; compare with the scalar path on H
        from hapo_verl.algorithms.entropy import entropy_score, temperature_factor
        kw = dict(log_floor=1e-6, scale_eps=1e-6) if compat else {}
        ref = temperature_factor(entropy_score(H, STATS, reference_compat=compat, clamp=True, **kw), 0.3)
        assert torch.allclose(got, ref)


def test_one_packed_layout_for_every_writer():
    from hapo_verl.sampling import cpu_kernel
    from hapo_verl.sampling.params import COL, DISABLED_ROW, PARAM_COLUMNS, layout_constants, pack_request, request_row
    from hapo_verl.sampling.request import AdaptiveTemperatureRequest

    req = AdaptiveTemperatureRequest(STATS, 0.3, reference_compat=True)
    row = request_row(req, input_scale=0.7)
    assert len(row) == NUM_PARAMS == len(DISABLED_ROW) and row[COL["enabled"]] == 1.0
    assert dict(zip(PARAM_COLUMNS, row)) == {"enabled": 1.0, "input_scale": 0.7, "pivot": 0.5, "scale": 1.2,
                                             "pos_scale": 0.7, "neg_scale": 0.4, "tau": 0.3, "reference_compat": 1.0}
    table = pack_request(req, 3, input_scale=0.7)
    assert table.shape == (3, NUM_PARAMS) and torch.equal(table, torch.tensor([row] * 3, dtype=torch.float32))
    assert torch.equal(pack_params(0.5, 1.2, 0.7, 0.4, 0.3, True, 0.7, rows=3), table)
    assert layout_constants() == {f"C_{name.upper()}": i for i, name in enumerate(PARAM_COLUMNS)}
    assert f"-DHAPO_NUM_PARAMS={NUM_PARAMS}" in cpu_kernel.LAYOUT_DEFINES
    assert "-DHAPO_C_REFERENCE_COMPAT=%d" % COL["reference_compat"] in cpu_kernel.LAYOUT_DEFINES


def test_apply_packed_rejects_bad_inputs():
    with pytest.raises(TypeError, match="float32"):
        fp.apply_packed_(torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, NUM_PARAMS))
    with pytest.raises(ValueError, match="params"):
        fp.apply_packed_(torch.zeros(2, 4), torch.zeros(3, NUM_PARAMS))
    with pytest.raises(ValueError, match="backend"):
        fp.apply_packed_(torch.zeros(2, 4), torch.zeros(2, NUM_PARAMS), backend="cuda")
    assert fp.choose_backend(torch.zeros(1, 1)) != "triton"  # CPU tensors never pick Triton automatically


def test_package_imports_do_not_import_vllm_triton_verl_or_ray():
    code = (
        "import sys\n"
        "import hapo_verl, hapo_verl.vllm, hapo_verl.sampling\n"
        "assert 'torch' not in sys.modules, 'hapo_verl.vllm and hapo_verl.sampling must stay light'\n"
        "from hapo_verl.vllm import processor_fqcn\n"
        "processor_fqcn(); processor_fqcn('0.33.0')\n"
        "import hapo_verl.sampling.fast_path, hapo_verl.sampling.request, hapo_verl.sampling.params\n"
        "import hapo_verl.sampling.cpu_kernel\n"
        "bad = [m for m in ('vllm', 'triton', 'verl', 'ray') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_processor_fqcn_by_version():
    import hapo_verl.vllm as hv

    assert hv.processor_fqcn("0.24.0") == "hapo_verl.vllm.processors:HapoAdaptiveTemperatureV1"
    assert hv.processor_fqcn("0.31.2") == "hapo_verl.vllm.processors:HapoAdaptiveTemperatureV1"
    assert hv.processor_fqcn("0.33.0") == "hapo_verl.vllm.processors:HapoAdaptiveTemperature"
    assert hv.processor_fqcn("v0.32.0+cpu") == "hapo_verl.vllm.processors:HapoAdaptiveTemperature"
    assert hv.processor_fqcn("1.0") == "hapo_verl.vllm.processors:HapoAdaptiveTemperature"
    with pytest.raises(ValueError, match="version"):
        hv.processor_fqcn("latest")
    fqcn = hv.processor_fqcn()  # installed vLLM (0.24.0 in CI) or verl's pin
    module, cls = fqcn.split(":")
    assert module == hv.PROCESSORS_MODULE and cls in (hv.V1_CLASS, hv.DUAL_CLASS)
    if hv.installed_vllm_version() in (None, "0.24.0"):
        assert cls == hv.V1_CLASS
