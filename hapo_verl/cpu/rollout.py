"""``hfcpu``: a verl 0.9.1 rollout backend on Hugging Face transformers, for machines without a GPU.

verl 0.9.1 generates only through rollout *servers* (vLLM / SGLang / TRT-LLM). This module provides the
three pieces a server backend consists of, on CPU:

* :class:`HFCPUServer` — the Ray actor the agent loops call (``generate`` = token-in/token-out, returning
  verl's ``TokenOutput``), plus the control methods the trainer calls on servers (wake_up, sleep, ...).
  Concurrent requests are batched (:class:`hapo_verl.cpu.generation.RequestBatcher`) and decoded together
  with a KV cache (:class:`hapo_verl.cpu.generation.BatchGenerator`).
* :class:`HFCPUReplica` — the ``RolloutReplica`` verl's ``LLMServerManager`` creates per replica
  (registered as ``hfcpu`` in ``RolloutReplicaRegistry``); it launches one named server actor.
* :class:`HFCPURollout` — the in-worker ``BaseRollout`` (``_ROLLOUT_REGISTRY[("hfcpu", "async")]``) through
  which the trainer pushes new weights after each step (``ActorRolloutRefWorker.update_weights``, naive
  checkpoint backend) or a ``CheckpointEngineWorker`` does in standalone mode.

Sampling semantics (temperature, top-k, top-p, eos, max_tokens, greedy at temperature 0, HAPO adaptive
temperature from ``sampling_params["extra_args"]``) are documented in :mod:`hapo_verl.cpu.generation`.

Per-token temperatures. Every ``TokenOutput`` carries
``extra_fields["hapo_token_temperatures"]`` (:data:`hapo_verl.sampling.request.TOKEN_TEMPERATURES_KEY`): a
``list[float]`` aligned with ``token_ids``, the effective temperature each token was sampled at (``T*f``;
``T`` for requests without statistics; 0.0 for greedy requests). verl 0.9.1 keeps ``extra_fields`` intact
on the way to the trainer: ``LLMServerClient.generate`` returns the server's output, the single-turn and
tool agent loops copy ``output.extra_fields`` into ``AgentLoopOutput.extra_fields``, and then
  - v1 trainer (``AgentLoopWorkerTQ._agent_loop_postprocess``): ``AgentLoopOutput.as_dict()`` keeps the dict
    under the TransferQueue field ``"extra_fields"`` (a ``NonTensorStack`` of per-sample dicts); read it with
    ``tq.kv_batch_get(keys=..., select_fields=["extra_fields"])`` and take ``[TOKEN_TEMPERATURES_KEY]``;
  - legacy trainer (``AgentLoopWorker._postprocess``): every extra_fields key becomes a
    ``non_tensor_batch`` column, i.e. ``batch.non_tensor_batch["hapo_token_temperatures"]`` (object array of
    lists).
  The list covers the tokens the server generated; the agent loop truncates responses to
  ``rollout.response_length``, which max_tokens already respects. ``FullyAsyncLLMServerClient`` (fully-async
  mode) rebuilds the output and keeps only its own keys, so the list is lost there.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import ray
import torch

from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica, TokenOutput

from hapo_verl.cpu.generation import BatchGenerator, GenerationRequest, RequestBatcher, SamplingSpec
from hapo_verl.cpu.names import ROLLOUT_NAME
from hapo_verl.sampling.request import TOKEN_TEMPERATURES_KEY

logger = logging.getLogger("hapo_verl.cpu")

THREADS_ENV = "HAPO_VERL_HFCPU_THREADS"
BATCH_WAIT_ENV = "HAPO_VERL_HFCPU_BATCH_WAIT_S"
DEFAULT_BATCH_WAIT_S = 0.02


def server_actor_name(replica_rank: int, node_rank: int = 0, kind: str = "", name_suffix: str = "") -> str:
    """Ray actor name of a replica's server (vLLM's scheme: ``{backend}_server_[kind_]{replica}_{node}``)."""
    kind = f"{kind}_" if kind else ""
    return f"{ROLLOUT_NAME}_server_{kind}{replica_rank}_{node_rank}{name_suffix}"


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    getter = getattr(cfg, "get", None)
    if callable(getter):
        try:
            return getter(key, default)
        except Exception:  # noqa: BLE001 - dataclass .get may not accept a default
            pass
    return getattr(cfg, key, default)


def load_hf_model(model_path: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa").eval()


def eos_and_pad(model: torch.nn.Module, model_path: Optional[str] = None) -> tuple[list[int], Optional[int]]:
    """eos ids from the generation config (else model config, else tokenizer) and a pad id."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    if (eos is None or pad is None) and model_path is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_path)
        eos = tok.eos_token_id if eos is None else eos
        pad = tok.pad_token_id if pad is None else pad
    eos_list = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    return eos_list, (None if pad is None else int(pad))


class HFCPUServer:
    """Rollout server actor (wrapped with ``ray.remote`` by :class:`HFCPUReplica`)."""

    def __init__(self, config, model_config, replica_rank: int = 0, node_rank: int = 0):
        threads = int(os.environ.get(THREADS_ENV, min(os.cpu_count() or 1, 4)))
        torch.set_num_threads(max(1, threads))
        self.config = config
        self.replica_rank = replica_rank
        self.prompt_length = int(_get(config, "prompt_length", 512))
        self.response_length = int(_get(config, "response_length", 512))
        self.max_model_len = int(_get(config, "max_model_len", None) or (self.prompt_length + self.response_length))
        model_path = _get(model_config, "local_path", None) or _get(model_config, "path")
        model = load_hf_model(model_path)
        eos, pad = eos_and_pad(model, model_path)
        seed = _get(config, "seed", 0)
        self.engine = BatchGenerator(model, eos, pad, max_model_len=self.max_model_len,
                                     seed=None if seed is None else int(seed) + int(replica_rank))
        self.batcher = RequestBatcher(self.engine, max_batch_size=int(_get(config, "max_num_seqs", 256) or 256),
                                      batch_wait_s=float(os.environ.get(BATCH_WAIT_ENV, DEFAULT_BATCH_WAIT_S)))
        self.global_steps: Optional[int] = None
        self.weight_version = 0

    def default_max_tokens(self, prompt_len: int) -> int:
        return min(self.response_length, self.prompt_length + self.response_length - prompt_len)

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: Optional[str] = None,
        image_data: Optional[list[Any]] = None,
        video_data: Optional[list[Any]] = None,
        audio_data: Optional[list[Any]] = None,
        mm_processor_kwargs: Optional[dict[str, Any]] = None,
        priority: int = 0,
        **kwargs: Any,
    ) -> TokenOutput:
        if image_data or video_data or audio_data:
            raise NotImplementedError("hfcpu rollout: multimodal inputs are not supported")
        prompt_ids = [int(t) for t in prompt_ids]
        if self.max_model_len - len(prompt_ids) < 1:
            raise ValueError(f"hfcpu rollout: prompt of {len(prompt_ids)} tokens leaves no room in "
                             f"max_model_len={self.max_model_len}")
        want_logprobs = bool((sampling_params or {}).get("logprobs", False))
        spec = SamplingSpec.from_sampling_params(sampling_params, self.default_max_tokens(len(prompt_ids)))
        result = await self.batcher.submit(GenerationRequest(prompt_ids, spec))
        return TokenOutput(
            token_ids=result.token_ids,
            log_probs=result.log_probs if want_logprobs else None,
            stop_reason="completed",
            extra_fields={"global_steps": self.global_steps, TOKEN_TEMPERATURES_KEY: result.temperatures},
        )

    async def update_weights(self, named_tensors: dict[str, torch.Tensor], global_steps: Optional[int] = None):
        info = await self.batcher.load_weights(named_tensors)
        self.weight_version += 1
        if global_steps is not None:
            self.global_steps = global_steps
        stats = self.batcher.stats
        # one line per weight sync (stdout reaches the driver's log): proof of sync and of batching
        print(f"[hfcpu] replica {self.replica_rank}: weights v{self.weight_version} loaded "
              f"({info['loaded']} tensors, global_steps={self.global_steps}); generated so far: "
              f"{stats['requests']} requests in {stats['batches']} batches, max batch {stats['max_batch']}",
              flush=True)
        return {**info, "weight_version": self.weight_version}

    async def set_global_steps(self, global_steps: int):
        self.global_steps = global_steps

    async def get_stats(self) -> dict:
        return {**self.batcher.stats, "batch_sizes": list(self.engine.batch_sizes),
                "weight_version": self.weight_version, "global_steps": self.global_steps}

    # control plane called by RolloutReplica / CheckpointEngineManager: the model stays resident on CPU,
    # there is no KV cache between requests, and requests are never aborted (sync training only).
    async def wake_up(self, tags: Optional[list[str]] = None):
        return None

    async def sleep(self):
        return None

    async def abort_all_requests(self, reject_request: bool = False):
        return None

    async def resume_generation(self):
        return None

    async def clear_kv_cache(self):
        return None

    async def release_kv_cache(self):
        return None

    async def resume_kv_cache(self):
        return None

    async def start_profile(self, **kwargs):
        return None

    async def stop_profile(self):
        return None


class HFCPUReplica(RolloutReplica):
    """One ``hfcpu`` replica = one server actor (placed on the node of the replica's first worker)."""

    async def launch_servers(self):
        if self.is_reward_model:
            kind = "reward"
        elif self.is_teacher_model:
            kind = "teacher"
        else:
            kind = ""
        name = server_actor_name(self.replica_rank, 0, kind, self.name_suffix)
        options: dict[str, Any] = dict(name=name, max_concurrency=self.max_concurrency, num_cpus=0)
        if self.workers:
            node_id = await self.workers[0].__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
            options["scheduling_strategy"] = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                node_id=node_id, soft=False)
        server = ray.remote(HFCPUServer).options(**options).remote(
            config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
        await server.get_stats.remote()  # wait until the model is loaded (fail here, not at first request)
        self.servers = [server]
        self._server_handle = server
        self._server_address = f"{ROLLOUT_NAME}://{name}"


class HFCPURollout(BaseRollout):
    """In-worker adapter: forwards the trainer's weights to this replica's :class:`HFCPUServer`.

    Every rank consumes the weight generator (it may run collectives); the first rank of each replica
    sends the full tensors to its server, which swaps them in between two batches.
    """

    def __init__(self, config, model_config, device_mesh=None, replica_rank: int = -1, *args, **kwargs):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", 0))
        world = (self.config.tensor_model_parallel_size * self.config.data_parallel_size
                 * self.config.pipeline_model_parallel_size)
        self.replica_rank = rank // world if replica_rank == -1 else replica_rank
        self.rollout_rank = rank % world
        self.is_leader_rank = self.rollout_rank == 0
        self._server = None

    def _server_handle(self):
        if self._server is None:
            self._server = ray.get_actor(server_actor_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]):
        return None

    async def release(self):
        return None

    async def update_weights(self, weights, wire_format: str = "named_tensors", global_steps: Optional[int] = None,
                             peft_config=None, **kwargs):
        if wire_format != "named_tensors":
            raise NotImplementedError(f"hfcpu rollout: wire_format={wire_format!r} (only named_tensors)")
        if peft_config is not None:
            raise NotImplementedError("hfcpu rollout: LoRA adapters are not supported (use model.lora.merge=True)")
        from verl.workers.rollout.utils import ensure_async_iterator

        state: dict[str, torch.Tensor] = {}
        async for name, tensor in ensure_async_iterator(weights):
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            if self.is_leader_rank:
                state[name] = tensor.detach().to("cpu", torch.float32).clone()
        if self.is_leader_rank:
            info = await self._server_handle().update_weights.remote(state, global_steps)
            logger.info("hfcpu replica %d: loaded %d tensors (missing %s)", self.replica_rank, info["loaded"],
                        info["missing"][:3])
