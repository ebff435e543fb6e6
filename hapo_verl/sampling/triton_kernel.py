"""Triton kernel: fused row entropy + adaptive-temperature factor + in-place scale (one program per row).

Imported lazily by ``hapo_verl.sampling.fast_path`` (never by ``import hapo_verl`` / ``import hapo_verl.sampling``).
Runs on GPU, or on CPU tensors with ``TRITON_INTERPRET=1`` (how the tests check it).

Per row: pass 1 streams the row once keeping the running max m, s = Σ exp(z - m) and t = Σ exp(z - m)(z - m)
(rescaled when m grows: α = exp(m_old - m_new), t <- α (t + (m_old - m_new) s), s <- α s), so
H = log s - t / s with no [rows, vocab] temporary; then the factor f (same rule as
``hapo_verl.algorithms.entropy.row_temperature_factor_from_entropy``); pass 2 multiplies the row by 1/f in place.
Memory traffic: 2 reads + 1 write of the row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hapo_verl.algorithms.entropy import (
    LOG_ENTROPY_FLOOR,
    REFERENCE_SAMPLER_LOG_FLOOR,
    REFERENCE_SAMPLER_SCALE_EPS,
)
from hapo_verl.sampling.params import NUM_PARAMS, layout_constants

DEFAULT_BLOCK = 4096
#: the packed parameter layout (``hapo_verl.sampling.params``) as the kernel's constexpr column indices
LAYOUT_CONSTEXPRS = layout_constants()


@triton.jit
def _adaptive_temperature_kernel(
    logits_ptr,
    stride,
    rows_ptr,
    params_ptr,
    factors_ptr,
    V,
    LOG_FLOOR: tl.constexpr,
    REF_LOG_FLOOR: tl.constexpr,
    REF_SCALE_EPS: tl.constexpr,
    NPARAM: tl.constexpr,
    C_ENABLED: tl.constexpr,
    C_INPUT_SCALE: tl.constexpr,
    C_PIVOT: tl.constexpr,
    C_SCALE: tl.constexpr,
    C_POS_SCALE: tl.constexpr,
    C_NEG_SCALE: tl.constexpr,
    C_TAU: tl.constexpr,
    C_REFERENCE_COMPAT: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if HAS_ROWS:
        row = tl.load(rows_ptr + pid).to(tl.int64)
    else:
        row = pid.to(tl.int64)
    p = params_ptr + pid * NPARAM
    enabled = tl.load(p + C_ENABLED)
    if enabled == 0.0:
        tl.store(factors_ptr + pid, 1.0)
        return
    a = tl.load(p + C_INPUT_SCALE)          # input scale (entropy is of a * x)
    pivot = tl.load(p + C_PIVOT)
    scale = tl.load(p + C_SCALE)
    pos_scale = tl.load(p + C_POS_SCALE)
    neg_scale = tl.load(p + C_NEG_SCALE)
    tau = tl.load(p + C_TAU)
    compat = tl.load(p + C_REFERENCE_COMPAT) != 0.0
    base = logits_ptr + row * stride

    m = float("-inf")
    s = 0.0
    t = 0.0
    for i in range(0, V, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        z = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * a
        m_new = tl.maximum(m, tl.max(z, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        shift = tl.where(s > 0, m - m_safe, 0.0)        # <= 0
        alpha = tl.where(s > 0, tl.exp(shift), 0.0)
        t = alpha * (t + shift * s)
        s = alpha * s
        d = z - m_safe
        e = tl.exp(d)
        s += tl.sum(e, 0)
        t += tl.sum(tl.where(e > 0, e * d, 0.0), 0)
        m = m_new
    H = tl.where(s > 0, tl.log(s) - t / s, 0.0)
    H = tl.maximum(H, 0.0)

    floor = tl.where(compat, REF_LOG_FLOOR, LOG_FLOOR)
    eps = tl.where(compat, REF_SCALE_EPS, 0.0)
    h = (tl.log(tl.maximum(H, floor)) - pivot) / (scale + eps)
    neg = tl.where(compat, -neg_scale, neg_scale)
    h_hat = tl.where(h > 0, h * pos_scale, h * neg)
    h_hat = tl.minimum(tl.maximum(h_hat, -1.0), 1.0)
    f = 1.0 + tau * h_hat
    tl.store(factors_ptr + pid, f)
    r = 1.0 / f  # scale by 1/f, as the torch path and the CPU kernel do

    for i in range(0, V, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        msk = offs < V
        x = tl.load(base + offs, mask=msk)
        tl.store(base + offs, x * r, mask=msk)


def adaptive_temperature_(
    logits: torch.Tensor,
    params: torch.Tensor,
    rows: torch.Tensor | None = None,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """In place: divide ``logits[rows[i]]`` (or row i) by its factor; returns the factors [k] (fp32).

    ``params`` is the packed fp32 [k, 8] table of :mod:`hapo_verl.sampling.params` (contiguous)."""
    assert logits.dim() == 2 and logits.stride(1) == 1, "logits must be a row-major [rows, vocab] tensor"
    k = logits.shape[0] if rows is None else rows.numel()
    params = params.contiguous()
    factors = torch.empty(k, dtype=torch.float32, device=logits.device)
    if k == 0:
        return factors
    rows_arg = rows.contiguous() if rows is not None else factors  # unused pointer when HAS_ROWS is False
    _adaptive_temperature_kernel[(k,)](
        logits, logits.stride(0), rows_arg, params, factors, logits.shape[1],
        LOG_FLOOR=LOG_ENTROPY_FLOOR, REF_LOG_FLOOR=REFERENCE_SAMPLER_LOG_FLOOR,
        REF_SCALE_EPS=REFERENCE_SAMPLER_SCALE_EPS, NPARAM=NUM_PARAMS, HAS_ROWS=rows is not None, BLOCK=block,
        **LAYOUT_CONSTEXPRS,
    )
    return factors
