"""The Triton kernel (hapo_verl.sampling.triton_kernel) against the torch fast path, on CPU tensors under
TRITON_INTERPRET=1. scripts/install_vllm_cpu.sh installs Triton; the tests skip only if it is not importable.

Triton reads TRITON_INTERPRET when it is first imported, and importing vLLM (other test files) imports Triton,
so every check runs in a fresh interpreter: ``python this_file.py CHECK`` with TRITON_INTERPRET=1.
"""

import os
import subprocess
import sys
import warnings
from importlib.util import find_spec

import pytest
import torch

from hapo_verl.algorithms.entropy import EntropyStats, row_temperature_factor
from hapo_verl.sampling import fast_path as fp
from hapo_verl.sampling.params import pack_params

CHECKS = ("check_kernel_matches_torch_path_and_reference_small", "check_kernel_matches_torch_path_and_reference_qwen",
          "check_kernel_rows_subset_and_disabled", "check_fast_path_dispatches_to_kernel")


@pytest.mark.parametrize("check", CHECKS)
def test_triton_kernel_in_interpreter(check):
    if find_spec("triton") is None:
        pytest.skip("Triton is not installed (scripts/install_vllm_cpu.sh installs it; its wheel installs on CPU)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), check], capture_output=True, text=True,
                         env=env, timeout=900)
    assert out.returncode == 0, f"{check} failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    assert out.stdout.strip().endswith(f"{check} ok"), out.stdout


def make_logits(rows, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * torch.linspace(0.5, 6.0, rows)[:, None]
    x[1, ::3] = float("-inf")     # masked entries
    x[2] *= 5000.0                # |x| ~ 1e4, numerically one-hot
    x[3] = float("-inf")
    x[3, vocab // 2] = 1.5        # exactly one-hot
    x[4] = float("-inf")          # all -inf
    return x


def _run(kernel, x, params, rows=None, block=1024):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy warnings of the interpreter on masked lanes
        return kernel.adaptive_temperature_(x, params, rows, block=block)


def _matches(kernel, vocab):
    rows = 6
    x = make_logits(rows, vocab)
    stats = EntropyStats(pivot=0.4, scale=1.1, pos_scale=0.6, neg_scale=0.3)
    compat = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    temp = torch.tensor([1.0, 1.0, 0.7, 1.0, 1.0, 1.6])
    params = pack_params(stats.pivot, stats.scale, stats.pos_scale, stats.neg_scale, 0.3, compat, temp,
                            rows=rows)
    y_k = x.clone()
    f_k = _run(kernel, y_k, params, block=4096 if vocab > 10_000 else 1024)
    y_t = x.clone()
    f_t = fp.apply_packed_(y_t, params, backend="torch")
    assert torch.allclose(f_k, f_t, rtol=1e-5, atol=1e-6), (f_k, f_t)
    assert torch.allclose(y_k, y_t, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert not torch.isnan(y_k).any()
    for r in range(rows):
        ref = row_temperature_factor(x[r:r + 1] * temp[r], stats, 0.3, reference_compat=bool(compat[r]))
        assert abs(f_k[r].item() - ref.item()) <= 1e-5 * abs(ref.item()) + 1e-6, (r, f_k[r], ref)
    # one-hot and all -inf rows: H = 0 -> ĥ = -1 (signed) / +1 (fork): f = 0.7 / 1.3
    assert abs(f_k[3].item() - 1.3) < 1e-6 and abs(f_k[4].item() - 0.7) < 1e-6, f_k
    assert torch.isinf(y_k[4]).all() and abs(y_k[3, vocab // 2].item() - 1.5 / 1.3) < 1e-6


def check_kernel_rows_subset_and_disabled(kernel):
    x = make_logits(6, 3001, seed=1)
    rows = torch.tensor([5, 1, 3])
    params = pack_params(0.2, 0.9, 0.5, 0.5, 0.2, 0.0, 1.0, enabled=torch.tensor([1.0, 0.0, 1.0]))
    y_k, y_t = x.clone(), x.clone()
    f_k = _run(kernel, y_k, params, rows)
    f_t = fp.apply_packed_(y_t, params, rows=rows, backend="torch")
    assert f_k[1].item() == 1.0
    assert torch.allclose(f_k, f_t, rtol=1e-5)
    assert torch.allclose(y_k, y_t, rtol=1e-5, equal_nan=True)
    for r in (0, 1, 2, 4):
        assert torch.equal(y_k[r], x[r])


def check_fast_path_dispatches_to_kernel(kernel):
    x = make_logits(5, 2048, seed=2)
    y = x.clone()
    f = fp.scale_logits_by_entropy_(y, 0.0, 1.0, 0.5, 0.5, 0.1, backend="triton")
    ref = row_temperature_factor(x, EntropyStats(0.0, 1.0, 0.5, 0.5), 0.1)
    assert torch.allclose(f, ref, rtol=1e-5)


def check_kernel_matches_torch_path_and_reference_small(kernel):
    _matches(kernel, 4099)


def check_kernel_matches_torch_path_and_reference_qwen(kernel):
    _matches(kernel, 151_936)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    from hapo_verl.sampling import triton_kernel

    name = sys.argv[1]
    globals()[name](triton_kernel)
    print(f"{name} ok")
