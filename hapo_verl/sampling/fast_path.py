"""Fused "row entropy -> adaptive-temperature factor -> in-place scale" on a [rows, vocab] block of logits.

Importable without vLLM or a compiler (nothing is built at import). Per selected row r, with input scale a_r:

    z        = a_r * x_r                                   logits the entropy is measured on
    H_r      = log s + E_p[m - z],  m = max z,  s = Σ exp(z - m)       (``token_entropy_from_logits``)
    f_r      = 1 + tau_r * clamp(ĥ(H_r; stats_r, mode_r), -1, 1)    (``row_temperature_factor_from_entropy``)
    x_r     <- x_r * (1 / f_r)                             in place; a later division by T gives T * f_r

Three backends, same math:
- ``cpu_kernel`` (``hapo_verl.sampling.cpu_kernel``; the default on CPU when it builds): a small C kernel compiled on
  first use; per row a max pass, one fused exp2/sum/dot pass, the factor and the in-place scaling, the row
  staying in L2 after its first read; rows split over torch's thread count; no temporaries. Falls back to
  ``torch`` (reason logged once) where there is no C compiler.
- ``torch``: per chunk of rows, one amax pass, one "x - m" pass into a scratch buffer, one exp pass into a second
  scratch buffer, a sum and a dot product per row (BLAS), then one in-place scaling. Scratch memory is bounded by ``chunk_rows``
  rows (two [chunk_rows, vocab] fp32 buffers), never a full [rows, vocab] copy.
- ``triton`` (``hapo_verl.sampling.triton_kernel``, imported lazily; GPU, or CPU tensors under TRITON_INTERPRET=1):
  one program per row, an online max / sum-exp / expectation pass and an in-place scale pass; no temporaries.

Per-row parameters are packed in a float32 [rows, 8] table laid out by :mod:`hapo_verl.sampling.params`.
"""

from __future__ import annotations

import os

import torch

from hapo_verl.algorithms.entropy import row_temperature_factor_from_entropy
from hapo_verl.sampling.params import COL, NUM_PARAMS, pack_params

#: rows processed together by the torch backend (bounds its two scratch buffers to 2 x chunk_rows x vocab fp32)
DEFAULT_CHUNK_ROWS = 4
#: set to "0" to never use the Triton kernel (e.g. to compare backends on a GPU)
TRITON_ENV = "HAPO_VLLM_TRITON"
BACKENDS = ("auto", "torch", "triton", "cpu_kernel")

_TRITON_STATE: dict = {}


def triton_available() -> bool:
    """True if the Triton kernel can be imported (Triton installed). Cached."""
    if "ok" not in _TRITON_STATE:
        try:
            from hapo_verl.sampling import triton_kernel  # noqa: F401

            _TRITON_STATE["ok"] = True
        except Exception as exc:  # ImportError, or a Triton that fails to initialise
            _TRITON_STATE["ok"] = False
            _TRITON_STATE["error"] = f"{type(exc).__name__}: {exc}"
    return _TRITON_STATE["ok"]


def prepare_backend(device: torch.device | str) -> str:
    """Build/import what ``auto`` will use on ``device`` now (processors call it at construction, so the first
    decode step does not pay a compile); returns the backend name ``auto`` picks for fp32 logits there."""
    return choose_backend(torch.empty((1, 1), dtype=torch.float32, device=device))


def choose_backend(logits: torch.Tensor, backend: str = "auto") -> str:
    """``auto``: Triton on CUDA (unless HAPO_VLLM_TRITON=0), the compiled kernel on CPU when it builds
    (unless HAPO_VERL_CPU_KERNEL=0), else torch."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cpu_kernel":
        from hapo_verl.sampling import cpu_kernel

        if not cpu_kernel.supports(logits):
            raise ValueError("backend 'cpu_kernel' needs fp32 CPU logits with contiguous rows, got "
                             f"{logits.dtype} on {logits.device} with strides {tuple(logits.stride())}")
    if backend != "auto":
        return backend
    if logits.device.type == "cuda" and os.environ.get(TRITON_ENV, "1") != "0" and triton_available():
        return "triton"
    if logits.device.type == "cpu":
        from hapo_verl.sampling import cpu_kernel

        if cpu_kernel.supports(logits) and cpu_kernel.available():
            return "cpu_kernel"
    return "torch"


def row_entropy(
    logits: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    backend: str = "auto",
) -> torch.Tensor:
    """Entropy (nats) of softmax(input_scale * logits[rows]) per row, same value as ``token_entropy_from_logits``.

    ``-inf`` entries contribute 0, a one-hot row gives 0, an all ``-inf`` row gives 0. Torch backend scratch
    memory: two [chunk_rows, vocab] fp32 buffers (plus one more for the gathered rows when ``rows`` is given);
    the CPU kernel needs none. (``triton`` has no entropy-only entry point: it falls back to torch here.)
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [rows, vocab], got shape {tuple(logits.shape)}")
    if choose_backend(logits, backend) == "cpu_kernel":
        from hapo_verl.sampling import cpu_kernel

        return cpu_kernel.row_entropy(logits, rows, input_scale)
    n = logits.shape[0] if rows is None else rows.numel()
    out = torch.empty(n, dtype=torch.float32, device=logits.device)
    for start, block in _row_blocks(logits, rows, chunk_rows):
        k = block.shape[0]
        a = None if input_scale is None else input_scale[start:start + k]
        out[start:start + k] = _block_entropy(block, a)
    return out


def scale_logits_by_entropy_(
    logits: torch.Tensor,
    pivot,
    scale,
    pos_scale,
    neg_scale,
    tau,
    reference_compat=False,
    input_scale=None,
    rows: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """Divide each selected row of ``logits`` in place by its adaptive-temperature factor; return the factors.

    Args:
        logits: float32 [rows, vocab]; modified in place.
        pivot, scale, pos_scale, neg_scale, tau, reference_compat: per selected row ([k] tensors/sequences) or
            scalars; validated beforehand (``request.parse_adaptive_temperature_args``).
        input_scale: multiplier applied to a row before measuring its entropy (the request's temperature when
            the logits were already divided by it, as in vLLM V1's argmax-invariant stage); default 1.
        rows: LongTensor [k] of row indices to process (others untouched); default all rows.
    Returns:
        f: float32 [k], the factor of each selected row (the sampling temperature becomes T * f).
    """
    k = logits.shape[0] if rows is None else rows.numel()
    params = pack_params(pivot, scale, pos_scale, neg_scale, tau, reference_compat,
                         1.0 if input_scale is None else input_scale, True, rows=k, device=logits.device)
    return apply_packed_(logits, params, rows=rows, backend=backend, chunk_rows=chunk_rows)


def apply_packed_(
    logits: torch.Tensor,
    params: torch.Tensor,
    rows: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """Core of ``scale_logits_by_entropy_`` with a packed [k, 8] table (``params.pack_params``) (row i of it belongs to ``rows[i]``, or to
    logits row i when ``rows`` is None). Rows whose ``enabled`` column is 0 are left untouched (f = 1)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [rows, vocab], got shape {tuple(logits.shape)}")
    if logits.dtype != torch.float32:
        raise TypeError(f"logits must be float32 (vLLM's sampler works in fp32), got {logits.dtype}")
    k = logits.shape[0] if rows is None else rows.numel()
    if params.shape != (k, NUM_PARAMS):
        raise ValueError(f"params must be [{k}, {NUM_PARAMS}], got {tuple(params.shape)}")
    if k == 0:
        return torch.ones(0, dtype=torch.float32, device=logits.device)
    chosen = choose_backend(logits, backend)
    if chosen == "triton":
        from hapo_verl.sampling.triton_kernel import adaptive_temperature_

        return adaptive_temperature_(logits, params, rows)
    if chosen == "cpu_kernel":
        from hapo_verl.sampling.cpu_kernel import adaptive_temperature_

        return adaptive_temperature_(logits, params, rows)
    return _apply_packed_torch_(logits, params, rows, chunk_rows)


def factors_from_entropy(entropy: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """f per row from its entropy and its packed parameters (1 where disabled)."""
    c = COL
    f = row_temperature_factor_from_entropy(
        entropy, params[:, c["pivot"]], params[:, c["scale"]], params[:, c["pos_scale"]],
        params[:, c["neg_scale"]], params[:, c["tau"]], params[:, c["reference_compat"]] > 0)
    return torch.where(params[:, c["enabled"]] > 0, f, torch.ones_like(f))


# ------------------------------------------------------------------------------------------------ internals
def _row_blocks(logits, rows, chunk_rows):
    """Yield (start, block) with block = logits rows [start, start+k) (a view) or gathered ``rows`` (a copy)."""
    chunk_rows = max(1, int(chunk_rows))
    n = logits.shape[0] if rows is None else rows.numel()
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        if rows is None:
            yield start, logits[start:stop]
        else:
            yield start, logits.index_select(0, rows[start:stop])


def _block_entropy(x: torch.Tensor, a: torch.Tensor | None, d: torch.Tensor | None = None,
                   e: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy per row of softmax(a * x) for a small block; ``d``/``e`` are optional scratch of x's shape."""
    m = x.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf row (or +inf): keep finite
    d = torch.sub(x, m, out=d) if d is not None else x - m      # <= 0, -inf where masked
    if a is not None:
        d.mul_(a.reshape(-1, 1))                                 # a * (x - max x) = a*x - max(a*x) for a > 0
    e = torch.exp(d, out=e) if e is not None else d.exp()
    s = e.sum(dim=-1)
    # Σ e * (z - m) <= 0 per row; NaN if the row has -inf entries (0 * -inf). On CPU a BLAS dot per row (no
    # product temporary, faster than vecdot/bmm here); elsewhere one vecdot (a chunk-sized temporary)
    if x.device.type == "cpu":
        t = torch.stack([torch.dot(e[i], d[i]) for i in range(x.shape[0])])
    else:
        t = torch.linalg.vecdot(e, d)
    bad = torch.isnan(t)
    if bad.any():  # rows with masked (-inf) entries: 0 * -inf; recompute those rows with the masked product
        t = torch.where(bad, torch.where(e > 0, e * d, torch.zeros_like(e)).sum(dim=-1), t)
    entropy = torch.log(s) - t / s
    return torch.where(s > 0, entropy, torch.zeros_like(entropy)).clamp_min(0.0)


def _apply_packed_torch_(logits, params, rows, chunk_rows):
    c = COL
    enabled = params[:, c["enabled"]] > 0
    a = params[:, c["input_scale"]]
    use_a = not bool((a == 1).all())
    f = torch.ones(params.shape[0], dtype=torch.float32, device=logits.device)
    vocab = logits.shape[1]
    chunk_rows = max(1, int(chunk_rows))
    d_buf = torch.empty((chunk_rows, vocab), dtype=torch.float32, device=logits.device)
    e_buf = torch.empty_like(d_buf)
    all_enabled = bool(enabled.all())
    n = params.shape[0]
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        if not all_enabled:
            sel = torch.nonzero(enabled[start:stop]).flatten()
            if sel.numel() == 0:
                continue
            idx = sel + start
        else:
            idx = None
        if rows is None and idx is None:
            block = logits[start:stop]
        else:
            r = rows[start:stop] if rows is not None else torch.arange(start, stop, device=logits.device)
            if idx is not None:
                r = r[idx - start]
            block = logits.index_select(0, r)
        k = block.shape[0]
        p = params[start:stop] if idx is None else params[idx]
        h = _block_entropy(block, p[:, c["input_scale"]] if use_a else None, d_buf[:k], e_buf[:k])
        fb = factors_from_entropy(h, p)
        block.mul_(fb.reciprocal().reshape(-1, 1))  # scale by 1/f, as the kernels do
        if rows is None and idx is None:
            f[start:stop] = fb
        else:
            logits.index_copy_(0, r, block)
            if idx is None:
                f[start:stop] = fb
            else:
                f[idx] = fb
    return f
