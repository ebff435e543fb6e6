"""vLLM logits processors for HAPO's Adaptive Temperature Sampling (imported by vLLM itself, by FQCN).

This module imports vLLM at its top; ``import hapo_verl`` and ``import hapo_verl.vllm`` never import it.
Which class to name (``hapo_verl.vllm.processor_fqcn()`` picks it):

- ``HapoAdaptiveTemperatureV1``: vLLM's V1 interface (``vllm.v1.sample.logits_processor.LogitsProcessor``).
  This is what runs on vLLM 0.24.0 (verl 0.9.1's pin): a custom processor makes 0.24.0 use the V1 model runner.
- ``HapoAdaptiveTemperatureV2``: Model Runner V2 interface (``vllm.v1.worker.gpu.sample.logits_processor``),
  defined only when that interface exists (0.32/0.33 line, not 0.24.0).
- ``HapoAdaptiveTemperature``: on a vLLM with both interfaces, one class deriving from both ABCs that acts as
  V1 or V2 depending on how the runner constructs it (the runner is chosen at engine start: V2 by default on
  CUDA, V1 on CPU / without Triton / with VLLM_USE_V2_MODEL_RUNNER=0); on 0.24.0 it is the V1 class.

Per request, the flat ``hapo_*`` keys of ``SamplingParams.extra_args`` (``hapo_verl.sampling.request``) give the
statistics, tau and the mode; the scaling itself is ``hapo_verl.sampling.fast_path``. Rows without them, greedy
rows (T < 1e-5) and warm-up/dummy requests are untouched. See docs/vllm_logits_processor.md.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate
from vllm.v1.sample.logits_processor import LogitsProcessor as _V1LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from hapo_verl.sampling.fast_path import apply_packed_, prepare_backend
from hapo_verl.sampling.params import COL, DISABLED_ROW, NUM_PARAMS, request_row
from hapo_verl.sampling.request import has_adaptive_temperature_args, parse_adaptive_temperature_args

try:  # Model Runner V2 custom-logits-processor interface: absent in vLLM 0.24.0
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as _V2LogitsProcessor

    HAS_V2_INTERFACE = True
except ImportError:
    LogitsContext = _V2LogitsProcessor = None
    HAS_V2_INTERFACE = False

logger = logging.getLogger(__name__)

#: vLLM's greedy threshold (``vllm.v1.sample.sampler._SAMPLING_EPS``)
SAMPLING_EPS = 1e-5

__all__ = ["HAS_V2_INTERFACE", "HapoAdaptiveTemperature", "HapoAdaptiveTemperatureV1", "request_row_params",
           "validate_sampling_params", "collect_factor_summaries"]


def validate_sampling_params(sampling_params: SamplingParams) -> None:
    """Raise ValueError naming the key when the request's ``hapo_*`` extra_args are partial or invalid."""
    parse_adaptive_temperature_args(sampling_params.extra_args)


def request_row_params(sampling_params: SamplingParams, input_scale_is_temperature: bool) -> tuple | None:
    """The packed parameter row of a request (``hapo_verl.sampling.params.request_row``), or None when the processor
    must leave it untouched.

    None for: greedy requests, requests without ``hapo_*`` keys (validation, warm-up, dummy, other users), and
    (logged, never raised inside the engine) requests whose keys are invalid.
    """
    extra = sampling_params.extra_args
    if not has_adaptive_temperature_args(extra):
        return None
    temperature = float(sampling_params.temperature)
    if temperature < SAMPLING_EPS:
        return None
    try:
        req = parse_adaptive_temperature_args(extra)
    except ValueError as exc:  # validate_params rejects these at admission; never crash the engine here
        logger.warning("hapo adaptive temperature disabled for a request: %s", exc)
        return None
    if req is None or req.tau == 0.0:
        return None
    return request_row(req, input_scale=temperature if input_scale_is_temperature else 1.0)


class _FactorRecorder:
    """Keeps the last step's factors (device tensors, no host sync) and a running summary, for logging."""

    def _init_recorder(self, device) -> None:
        self.last_factors: torch.Tensor | None = None  # [k] f of the rows processed in the last apply (V1) or
        self.last_rows: torch.Tensor | None = None      # of all rows, 1 where disabled (V2); V1 row indices
        self._acc = torch.zeros(3, dtype=torch.float64, device=device)  # count, sum f, sum f^2
        self._min = torch.full((1,), float("inf"), dtype=torch.float64, device=device)
        self._max = torch.full((1,), float("-inf"), dtype=torch.float64, device=device)

    def _record(self, factors: torch.Tensor, rows: torch.Tensor | None, mask: torch.Tensor | None = None):
        """Sync-free on GPU (device ops only; the summary is read on demand by ``factor_summary``); on CPU the
        five numbers are taken with numpy, which is ~10x cheaper than a dozen tiny torch ops per decode step."""
        self.last_factors, self.last_rows = factors, rows
        if factors.numel() == 0:
            return
        if factors.device.type == "cpu":
            f = factors.numpy().astype(np.float64)
            if mask is not None:
                f = f[mask.numpy()]
            if f.size:
                self._acc.numpy()[:] += (f.size, f.sum(), (f * f).sum())
                self._min.numpy()[0] = min(self._min.numpy()[0], f.min())
                self._max.numpy()[0] = max(self._max.numpy()[0], f.max())
            return
        f = factors.double()
        w = torch.ones_like(f) if mask is None else mask.to(f.dtype)
        self._acc += torch.stack([w.sum(), (w * f).sum(), (w * f * f).sum()])
        inf = torch.full_like(f, float("inf"))
        torch.minimum(self._min, torch.where(w > 0, f, inf).min().reshape(1), out=self._min)
        torch.maximum(self._max, torch.where(w > 0, f, -inf).max().reshape(1), out=self._max)

    def factor_summary(self, reset: bool = True) -> dict:
        """count / mean / std / min / max of the factors f applied since the last reset (one host sync)."""
        count, total, total_sq = self._acc.tolist()
        out = {"count": int(count)}
        if count:
            mean = total / count
            out.update(mean=mean, std=max(total_sq / count - mean * mean, 0.0) ** 0.5,
                       min=float(self._min.item()), max=float(self._max.item()))
        if reset:
            self._acc.zero_()
            self._min.fill_(float("inf"))
            self._max.fill_(float("-inf"))
        return out


class HapoAdaptiveTemperatureV1(_V1LogitsProcessor, _FactorRecorder):
    """V1 interface. Declared argmax-invariant, so vLLM calls it after penalties and after its temperature
    division (and after the built-in min_p), and skips it for all-greedy batches. It receives z / T, measures the
    entropy on z = T * input (the post-penalty, pre-temperature logits the fork used) and divides the row by f:
    vLLM's sampling temperature becomes T * f."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.req: dict[int, tuple] = {}
        self._rows: torch.Tensor | None = None
        self._params: torch.Tensor | None = None
        self._prefix = False  # rows are exactly 0..k-1
        self._init_recorder(self.device)
        self.backend = prepare_backend(self.device)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        validate_sampling_params(sampling_params)

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        new = lambda params, _prompt, _out: request_row_params(params, input_scale_is_temperature=True)  # noqa: E731
        if not process_dict_updates(self.req, batch_update, new):
            return
        if not self.req:
            self._rows = self._params = None
            return
        idx = sorted(self.req)
        self._prefix = idx == list(range(len(idx)))
        self._rows = torch.tensor(idx, dtype=torch.long).to(self.device, non_blocking=True)
        self._params = torch.tensor([self.req[i] for i in idx], dtype=torch.float32).to(
            self.device, non_blocking=True)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self._rows is None:
            return logits
        rows = self._rows
        if self._prefix and rows.numel() == logits.shape[0]:
            rows = None  # every row enabled: work on the batch in place, no gather
        factors = apply_packed_(logits, self._params, rows=rows)
        self._record(factors, self._rows)
        return logits


if HAS_V2_INTERFACE:

    class HapoAdaptiveTemperatureV2(_V2LogitsProcessor, _FactorRecorder):
        """Model Runner V2 interface. vLLM calls it with penalised, not yet temperature-scaled fp32 logits
        (after logit bias / allowed ids / min_tokens, penalties, bad words), so the entropy is measured on the
        input directly; the runner divides by T afterwards. State is per slot (``req_idx``), overwritten on
        every ``add_request``; ``apply`` maps rows to slots with ``ctx.expanded_idx_mapping`` (no host sync)."""

        def __init__(self, vllm_config, req_states):
            self._v2_init(req_states.max_num_reqs, req_states.device)

        def _v2_init(self, max_num_reqs: int, device) -> None:
            self.device = torch.device(device)
            self.enabled = np.zeros(max_num_reqs, dtype=bool)
            self.table_cpu = torch.zeros((max_num_reqs, NUM_PARAMS), dtype=torch.float32)
            self.table = self.table_cpu if self.device.type == "cpu" else self.table_cpu.to(self.device)
            self._dirty = False
            self._init_recorder(self.device)
            self.backend = prepare_backend(self.device)

        @classmethod
        def validate_params(cls, sampling_params: SamplingParams) -> None:
            validate_sampling_params(sampling_params)

        def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
            row = request_row_params(sampling_params, input_scale_is_temperature=False)
            self.enabled[req_idx] = row is not None
            self.table_cpu[req_idx] = torch.tensor(row if row is not None else DISABLED_ROW)
            self._dirty = True
            return row is not None

        def apply_staged_writes(self) -> None:
            if self._dirty and self.table is not self.table_cpu:
                self.table.copy_(self.table_cpu, non_blocking=True)
            self._dirty = False

        def apply(self, logits: torch.Tensor, ctx: "LogitsContext") -> torch.Tensor:
            if not self.enabled[ctx.idx_mapping_np].any():
                return logits
            slots = ctx.expanded_idx_mapping.to(self.table.device)
            params = self.table.index_select(0, slots)  # [rows, NUM_PARAMS]; disabled slots have enabled = 0
            factors = apply_packed_(logits, params)
            self._record(factors, None, params[:, COL["enabled"]] > 0)
            return logits

    class HapoAdaptiveTemperature(HapoAdaptiveTemperatureV1, HapoAdaptiveTemperatureV2):
        """One FQCN for both runners of a vLLM that has both interfaces: constructed as
        ``(vllm_config, device, is_pin_memory)`` by the V1 runner and ``(vllm_config, req_states)`` by V2."""

        def __init__(self, vllm_config, *args, **kwargs):
            if len(args) + len(kwargs) == 1:
                req_states = args[0] if args else kwargs["req_states"]
                self._mode = "v2"
                HapoAdaptiveTemperatureV2.__init__(self, vllm_config, req_states)
            else:
                self._mode = "v1"
                HapoAdaptiveTemperatureV1.__init__(self, vllm_config, *args, **kwargs)

        @classmethod
        def validate_params(cls, sampling_params: SamplingParams) -> None:
            validate_sampling_params(sampling_params)

        def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
            if self._mode == "v2":
                return HapoAdaptiveTemperatureV2.apply(self, logits, ctx)
            return HapoAdaptiveTemperatureV1.apply(self, logits)

    __all__ += ["HapoAdaptiveTemperatureV2"]
else:
    HapoAdaptiveTemperatureV2 = None

    class HapoAdaptiveTemperature(HapoAdaptiveTemperatureV1):
        """On a vLLM without the Model Runner V2 interface (e.g. 0.24.0): the V1 class."""


def collect_factor_summaries(worker, reset: bool = True) -> list[dict]:
    """For ``LLM.collective_rpc(collect_factor_summaries)``: the factor summaries of our processors in a V1-runner
    worker (``worker.model_runner.input_batch.logitsprocs``), each with the fast-path ``backend`` it runs on.
    Returns [] when none is found."""
    out = []
    runner = getattr(worker, "model_runner", None)
    batch = getattr(runner, "input_batch", None)
    procs = getattr(getattr(batch, "logitsprocs", None), "all", None) or []
    for proc in procs:
        if isinstance(proc, _FactorRecorder):
            out.append({**proc.factor_summary(reset=reset), "backend": getattr(proc, "backend", None)})
    return out
