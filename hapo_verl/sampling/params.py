"""The packed per-row sampler parameters: the one definition of their layout, used by every backend.

A float32 [rows, NUM_PARAMS] table, one row per logits row, its columns in the order of ``PARAM_COLUMNS``:

    enabled           1: apply the adaptive temperature to the row; 0: leave it untouched (f = 1)
    input_scale       a: the entropy is measured on softmax(a * x) (the request temperature when the logits were
                      already divided by it, as in vLLM V1's argmax-invariant stage); else 1
    pivot, scale, pos_scale, neg_scale      the entropy statistics (``EntropyStats``)
    tau               f = 1 + tau * clamp(ĥ, -1, 1)
    reference_compat  1: the authors' fork's sampler rule; 0: the intended rule

Readers: ``fast_path`` (torch path, through ``COL``), ``triton_kernel`` (``layout_constants`` as constexprs) and
``cpu_kernel.c`` (``layout_constants`` passed to the compiler as ``-DHAPO_C_...`` by ``cpu_kernel``). Writers:
``pack_params`` (tables from scalars or columns), ``request_row`` (one request's row: the vLLM processors),
``pack_request`` (one request's row repeated: the CPU rollout).

Pure torch; a leaf (imports nothing of the package).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hapo_verl.sampling.request import AdaptiveTemperatureRequest

#: columns of the packed per-row parameter table, in order
PARAM_COLUMNS = ("enabled", "input_scale", "pivot", "scale", "pos_scale", "neg_scale", "tau", "reference_compat")
NUM_PARAMS = len(PARAM_COLUMNS)
#: column index by name
COL = {name: i for i, name in enumerate(PARAM_COLUMNS)}
#: the row of a request the sampler leaves untouched (every column 0, ``enabled`` included)
DISABLED_ROW = (0.0,) * NUM_PARAMS


def layout_constants() -> dict[str, int]:
    """The column indices as named integer constants for the kernels: ``{"C_ENABLED": 0, "C_INPUT_SCALE": 1, ...,
    "C_REFERENCE_COMPAT": 7}`` (Triton constexpr arguments; C macros, prefixed ``HAPO_``)."""
    return {f"C_{name.upper()}": i for i, name in enumerate(PARAM_COLUMNS)}


def _columns(pivot, scale, pos_scale, neg_scale, tau, reference_compat, input_scale, enabled) -> tuple:
    values = {"enabled": enabled, "input_scale": input_scale, "pivot": pivot, "scale": scale,
              "pos_scale": pos_scale, "neg_scale": neg_scale, "tau": tau, "reference_compat": reference_compat}
    return tuple(values[name] for name in PARAM_COLUMNS)


def pack_params(
    pivot,
    scale,
    pos_scale,
    neg_scale,
    tau,
    reference_compat=False,
    input_scale=1.0,
    enabled=True,
    rows: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Build the float32 [rows, NUM_PARAMS] table from scalars or [rows] sequences/tensors (one per column)."""
    cols = _columns(pivot, scale, pos_scale, neg_scale, tau, reference_compat, input_scale, enabled)
    tensors = [torch.as_tensor(c, dtype=torch.float32) for c in cols]
    if rows is None:
        rows = max((t.numel() for t in tensors if t.dim() > 0), default=1)
    table = torch.empty((rows, NUM_PARAMS), dtype=torch.float32)
    for j, t in enumerate(tensors):
        table[:, j] = t.reshape(-1) if t.dim() > 0 else t
    return table.to(device) if device is not None else table


def request_row(request: "AdaptiveTemperatureRequest", input_scale: float = 1.0) -> tuple[float, ...]:
    """The enabled parameter row of one request, as a tuple of Python floats in ``PARAM_COLUMNS`` order."""
    st = request.stats
    return _columns(st.pivot, st.scale, st.pos_scale, st.neg_scale, request.tau,
                    1.0 if request.reference_compat else 0.0, input_scale, 1.0)


def pack_request(request: "AdaptiveTemperatureRequest", rows: int, input_scale=1.0,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The [rows, NUM_PARAMS] table of ``rows`` rows that all carry ``request`` (enabled)."""
    st = request.stats
    return pack_params(st.pivot, st.scale, st.pos_scale, st.neg_scale, request.tau, request.reference_compat,
                       input_scale, True, rows=rows, device=device)
