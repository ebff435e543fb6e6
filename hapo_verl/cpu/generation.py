"""Batched token generation on CPU with a Hugging Face causal LM, and an asyncio request batcher.

Pure torch + transformers (no Ray, no verl): the ``hfcpu`` rollout server (:mod:`hapo_verl.cpu.rollout`)
wraps these classes, and tests drive them directly.

* :class:`BatchGenerator` runs ONE padded batched decode for a list of requests: left-padded prefill, then
  one token per step for every row with the KV cache, each row with its own sampling parameters and limits.
* :class:`RequestBatcher` collects requests that arrive concurrently (an ``asyncio.Queue``) and hands them
  to the generator as one batch; requests arriving while a batch runs form the next batch.

Sampling, per row and per decode step (the vLLM order: logits processors, temperature, top-k, top-p):

1. greedy rows (temperature < 1e-5, vLLM's epsilon): ``argmax`` of the raw logits; the reported log-prob is
   ``log_softmax(raw logits)`` at that token (what vLLM reports for greedy) and the reported temperature 0.
2. adaptive rows (request ``extra_args`` with HAPO statistics, :func:`parse_adaptive_temperature_args`):
   ``f`` from the entropy of the pre-temperature distribution (``hapo_verl.sampling.fast_path.row_entropy``, the
   logits processor's fast path, then ``factors_from_entropy`` on the request's packed parameters, i.e.
   ``row_temperature_factor_from_entropy``), effective temperature ``T * f`` in ``[T(1-tau), T(1+tau)]``. Other
   rows: ``T``.
3. logits / effective temperature, then top-k, then top-p (nucleus on the tempered distribution).
4. sample; the log-prob returned is that of the sampled token under exactly this distribution.

Per-token effective temperatures are returned with every result (:attr:`GenerationResult.temperatures`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from hapo_verl.sampling.fast_path import factors_from_entropy, row_entropy
from hapo_verl.sampling.params import pack_request
from hapo_verl.sampling.request import AdaptiveTemperatureRequest, parse_adaptive_temperature_args

logger = logging.getLogger("hapo_verl.cpu")

#: temperatures below this are greedy (vLLM's ``_SAMPLING_EPS``)
GREEDY_EPS = 1e-5

#: sampling-parameter keys verl's agent loops send that this backend honours or may safely ignore
_IGNORED_KEYS = {"logprobs", "repetition_penalty", "n", "seed", "detokenize", "skip_special_tokens",
                 "spaces_between_special_tokens", "include_stop_str_in_output", "prompt_logprobs"}


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling parameters of one request (already validated)."""

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    max_tokens: int = 16
    ignore_eos: bool = False
    adaptive: Optional[AdaptiveTemperatureRequest] = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @classmethod
    def from_sampling_params(cls, params: dict[str, Any], default_max_tokens: int) -> "SamplingSpec":
        """Build from the dict verl's agent loop sends (vLLM ``SamplingParams`` names)."""
        params = dict(params or {})
        if "max_tokens" in params:
            max_tokens = params.pop("max_tokens")
        elif "max_new_tokens" in params:
            max_tokens = params.pop("max_new_tokens")
        else:
            max_tokens = default_max_tokens
        params.pop("max_new_tokens", None)
        temperature = params.pop("temperature", 1.0)
        temperature = 1.0 if temperature is None else float(temperature)
        top_k = params.pop("top_k", -1)
        top_k = -1 if top_k is None else int(top_k)
        top_p = params.pop("top_p", 1.0)
        top_p = 1.0 if top_p is None else float(top_p)
        ignore_eos = bool(params.pop("ignore_eos", False))
        adaptive = parse_adaptive_temperature_args(params.pop("extra_args", None))
        repetition_penalty = params.get("repetition_penalty", 1.0)
        if repetition_penalty is not None and float(repetition_penalty) != 1.0:
            raise ValueError(f"hfcpu rollout: repetition_penalty={repetition_penalty} is not supported (only 1.0)")
        unknown = sorted(set(params) - _IGNORED_KEYS)
        if unknown:
            logger.debug("hfcpu rollout: ignoring sampling params %s", unknown)
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"hfcpu rollout: temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"hfcpu rollout: top_p must be in (0, 1], got {top_p}")
        if int(max_tokens) < 1:
            raise ValueError(f"hfcpu rollout: max_tokens must be >= 1, got {max_tokens}")
        return cls(temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=int(max_tokens),
                   ignore_eos=ignore_eos, adaptive=adaptive)


@dataclass
class GenerationRequest:
    prompt_ids: Sequence[int]
    spec: SamplingSpec


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)
    #: log-prob of each sampled token under the distribution it was sampled from (T*f, top-k, top-p)
    log_probs: list[float] = field(default_factory=list)
    #: effective sampling temperature of each token (T*f; T without statistics; 0.0 for greedy rows)
    temperatures: list[float] = field(default_factory=list)
    #: "stop" (eos) or "length" (max_tokens reached)
    finish_reason: str = "length"


def sample_next_tokens(
    logits: torch.Tensor,
    specs: Sequence[SamplingSpec],
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode step for a [rows, vocab] block of raw logits, each row with its own spec.

    Returns (tokens [rows] int64, log_probs [rows] float32, effective temperatures [rows] float32).
    """
    logits = logits.float()
    rows, vocab = logits.shape
    if rows != len(specs):
        raise ValueError(f"{rows} logit rows for {len(specs)} sampling specs")
    device = logits.device
    greedy = torch.tensor([s.greedy for s in specs], device=device)
    base_t = torch.tensor([s.temperature for s in specs], dtype=torch.float32, device=device)
    factor = torch.ones(rows, dtype=torch.float32, device=device)

    # adaptive temperature: rows grouped by identical (stats, tau, mode); entropy of the raw logits
    groups: dict[AdaptiveTemperatureRequest, list[int]] = {}
    for i, s in enumerate(specs):
        if s.adaptive is not None and not s.greedy:
            groups.setdefault(s.adaptive, []).append(i)
    for req, idx in groups.items():
        index = torch.tensor(idx, device=device)
        entropy = row_entropy(logits, rows=index)  # the logits processor's fast path (compiled CPU kernel)
        factor[index] = factors_from_entropy(entropy, pack_request(req, len(idx), device=device)).float()
    eff_t = torch.where(greedy, torch.zeros_like(base_t), base_t * factor)

    tokens = torch.empty(rows, dtype=torch.long, device=device)
    log_probs = torch.empty(rows, dtype=torch.float32, device=device)

    if bool(greedy.any()):
        g_idx = greedy.nonzero(as_tuple=True)[0]
        g_logits = logits.index_select(0, g_idx)
        g_tok = g_logits.argmax(dim=-1)
        tokens[g_idx] = g_tok
        log_probs[g_idx] = torch.log_softmax(g_logits, dim=-1).gather(-1, g_tok[:, None]).squeeze(-1)

    s_mask = ~greedy
    if bool(s_mask.any()):
        s_idx = s_mask.nonzero(as_tuple=True)[0]
        scaled = logits.index_select(0, s_idx) / eff_t.index_select(0, s_idx)[:, None]
        # top-k (k <= 0 or k >= vocab: off)
        ks = torch.tensor([specs[i].top_k for i in s_idx.tolist()], device=device)
        k_on = (ks > 0) & (ks < vocab)
        if bool(k_on.any()):
            sorted_desc = scaled.sort(dim=-1, descending=True).values
            kth = sorted_desc.gather(-1, (ks.clamp(1, vocab) - 1)[:, None])
            scaled = torch.where(k_on[:, None] & (scaled < kth), torch.full_like(scaled, float("-inf")), scaled)
        # top-p on the tempered (and top-k filtered) distribution; always keeps the most likely token
        ps = torch.tensor([specs[i].top_p for i in s_idx.tolist()], dtype=torch.float32, device=device)
        p_on = ps < 1.0
        if bool(p_on.any()):
            probs = torch.softmax(scaled, dim=-1)
            sorted_p, order = probs.sort(dim=-1, descending=True)
            mass_before = sorted_p.cumsum(dim=-1) - sorted_p
            remove_sorted = (mass_before >= ps[:, None]) & p_on[:, None]
            remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
            scaled = scaled.masked_fill(remove, float("-inf"))
        logp = torch.log_softmax(scaled, dim=-1)
        s_tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
        tokens[s_idx] = s_tok
        log_probs[s_idx] = logp.gather(-1, s_tok[:, None]).squeeze(-1)

    return tokens, log_probs, eff_t


class BatchGenerator:
    """Padded batched decoding with KV cache for a causal LM (``model(input_ids, attention_mask,
    position_ids, past_key_values, use_cache)`` returning ``logits`` and ``past_key_values``)."""

    def __init__(
        self,
        model: torch.nn.Module,
        eos_token_ids: Sequence[int] | int | None,
        pad_token_id: Optional[int] = None,
        max_model_len: Optional[int] = None,
        seed: Optional[int] = 0,
    ):
        self.model = model.eval()
        if eos_token_ids is None:
            eos = []
        elif isinstance(eos_token_ids, int):
            eos = [eos_token_ids]
        else:
            eos = list(eos_token_ids)
        self.eos_token_ids = frozenset(int(e) for e in eos)
        if pad_token_id is None:
            pad_token_id = min(self.eos_token_ids) if self.eos_token_ids else 0
        self.pad_token_id = int(pad_token_id)
        self.max_model_len = max_model_len
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(int(seed))
        else:
            self.generator.seed()
        #: sizes of the batches run so far (for tests / metrics)
        self.batch_sizes: list[int] = []

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if not requests:
            return []
        with torch.inference_mode():
            return self._generate(list(requests))

    def _generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        batch = len(requests)
        self.batch_sizes.append(batch)
        prompts = [list(map(int, r.prompt_ids)) for r in requests]
        if any(len(p) == 0 for p in prompts):
            raise ValueError("hfcpu rollout: empty prompt")
        specs = [r.spec for r in requests]
        limits = [s.max_tokens for s in specs]
        if self.max_model_len is not None:
            limits = [max(1, min(lim, self.max_model_len - len(p))) for lim, p in zip(limits, prompts)]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: the last column is every row's last prompt token
            input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, width - len(p):] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        next_position = attention_mask.sum(-1)

        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True)
        past = out.past_key_values
        logits = out.logits[:, -1, :]

        results = [GenerationResult() for _ in range(batch)]
        done = [False] * batch
        for _step in range(max(limits)):
            tokens, log_probs, temps = sample_next_tokens(logits, specs, self.generator)
            tok_list, lp_list, t_list = tokens.tolist(), log_probs.tolist(), temps.tolist()
            for i in range(batch):
                if done[i]:
                    continue
                res = results[i]
                res.token_ids.append(tok_list[i])
                res.log_probs.append(lp_list[i])
                res.temperatures.append(t_list[i])
                if tok_list[i] in self.eos_token_ids and not specs[i].ignore_eos:
                    res.finish_reason, done[i] = "stop", True
                elif len(res.token_ids) >= limits[i]:
                    res.finish_reason, done[i] = "length", True
            if all(done):
                break
            feed = torch.tensor([self.pad_token_id if d else t for d, t in zip(done, tok_list)], dtype=torch.long)
            attention_mask = torch.cat([attention_mask, torch.ones((batch, 1), dtype=torch.long)], dim=-1)
            out = self.model(input_ids=feed[:, None], attention_mask=attention_mask,
                             position_ids=next_position[:, None], past_key_values=past, use_cache=True)
            next_position = next_position + 1
            past = out.past_key_values
            logits = out.logits[:, -1, :]
        return results

    def load_weights(self, named_tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Copy trainer weights into the model (names as in the HF ``state_dict``); strict about names."""
        state = self.model.state_dict()
        unexpected = sorted(set(named_tensors) - set(state))
        if unexpected:
            raise KeyError(f"hfcpu rollout: weights not in the rollout model: {unexpected[:5]}")
        with torch.no_grad():
            for name, tensor in named_tensors.items():
                target = state[name]
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ValueError(f"hfcpu rollout: {name} has shape {tuple(tensor.shape)}, "
                                     f"model expects {tuple(target.shape)}")
                target.copy_(tensor.to(dtype=target.dtype, device=target.device))
        missing = sorted(set(state) - set(named_tensors))
        return {"loaded": len(named_tensors), "missing": missing}


@dataclass
class _Pending:
    request: GenerationRequest
    future: asyncio.Future


class RequestBatcher:
    """Collects concurrent requests into batches for a :class:`BatchGenerator`.

    ``submit`` enqueues and awaits; one background task takes the first waiting request, waits
    ``batch_wait_s`` for concurrent arrivals, drains up to ``max_batch_size`` and runs one batched decode in a
    worker thread (the event loop keeps accepting requests meanwhile). Weight updates go through
    :meth:`load_weights`, which waits for the running batch: a batch never mixes two weight versions.
    """

    def __init__(self, engine: BatchGenerator, max_batch_size: int = 256, batch_wait_s: float = 0.005):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.engine = engine
        self.max_batch_size = int(max_batch_size)
        self.batch_wait_s = float(batch_wait_s)
        self._queue: Optional[asyncio.Queue] = None
        self._task: Optional[asyncio.Task] = None
        self._lock: Optional[asyncio.Lock] = None
        self.stats = {"batches": 0, "requests": 0, "max_batch": 0, "busy_s": 0.0}

    def _ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._lock = asyncio.Lock()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, request: GenerationRequest) -> GenerationResult:
        self._ensure_started()
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(request, future))
        return await future

    async def load_weights(self, named_tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        self._ensure_started()
        async with self._lock:
            return await asyncio.to_thread(self.engine.load_weights, named_tensors)

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            if self.batch_wait_s > 0:
                await asyncio.sleep(self.batch_wait_s)
            pending = [first]
            while len(pending) < self.max_batch_size and not self._queue.empty():
                pending.append(self._queue.get_nowait())
            pending = [p for p in pending if not p.future.done()]  # cancelled callers
            if not pending:
                continue
            start = time.perf_counter()
            try:
                async with self._lock:
                    results = await asyncio.to_thread(self.engine.generate, [p.request for p in pending])
            except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
                for p in pending:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            self.stats["batches"] += 1
            self.stats["requests"] += len(pending)
            self.stats["max_batch"] = max(self.stats["max_batch"], len(pending))
            self.stats["busy_s"] += time.perf_counter() - start
            for p, r in zip(pending, results):
                if not p.future.done():
                    p.future.set_result(r)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
