"""CPU backend: batched HF generation (hfcpu rollout) unit tests, registration, and a real verl GRPO run.

(a) Unit tests drive :mod:`hapo_verl.cpu.generation` and the server class directly (no Ray).
(b) ``test_main_ppo_grpo_two_steps_on_cpu`` runs ``python -m verl.trainer.main_ppo`` (v1 trainer, GRPO) for 2
    steps with platform ``cpu`` + rollout ``hfcpu`` + the tiny assets, in a subprocess with a timeout.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hapo_verl.algorithms.entropy import EntropyStats, row_temperature_factor
from hapo_verl.cpu import cpu_env, cpu_overrides, ensure_tiny_assets
from hapo_verl.sampling.request import TOKEN_TEMPERATURES_KEY, AdaptiveTemperatureRequest
from hapo_verl.cpu.generation import (
    BatchGenerator,
    GenerationRequest,
    RequestBatcher,
    SamplingSpec,
    sample_next_tokens,
)

TESTS_DIR = Path(__file__).resolve().parent
PROMPTS = [[1, 87, 85, 378, 201, 19, 20, 13, 25, 31, 2, 201, 1, 67], [5, 6, 7], [9] * 20, [40, 41]]
STATS = EntropyStats(pivot=math.log(4.0), scale=1.0, pos_scale=0.7, neg_scale=0.4)


@pytest.fixture(scope="module")
def assets():
    return ensure_tiny_assets()


@pytest.fixture(scope="module")
def model(assets):
    from hapo_verl.cpu.rollout import load_hf_model

    return load_hf_model(assets.model_path)


@pytest.fixture
def engine(model, assets):
    from hapo_verl.cpu.rollout import eos_and_pad

    eos, pad = eos_and_pad(model, assets.model_path)
    return BatchGenerator(model, eos, pad, max_model_len=64, seed=0)


def _full_logits(model, prompt, response):
    """Logits predicting each response token, from one un-batched full forward (no cache, no padding)."""
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(response)])).logits[0].float()
    return logits[len(prompt) - 1: len(prompt) + len(response) - 1]


def _req(prompt, **spec):
    return GenerationRequest(prompt, SamplingSpec(**spec))


# ------------------------------------------------------------------------------------------------- assets
def test_assets_are_generated_once_and_complete(assets):
    from transformers import AutoTokenizer

    assert ensure_tiny_assets() == assets  # idempotent: same paths, no rebuild
    tok = AutoTokenizer.from_pretrained(assets.model_path)
    assert len(tok.encode("\n", add_special_tokens=False)) == 1  # verl's Qwen continuous-token builder needs it
    text = tok.apply_chat_template([{"role": "user", "content": "1+2="}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    import pandas as pd

    train, val = pd.read_parquet(assets.train_file), pd.read_parquet(assets.val_file)
    assert len(train) > len(val) > 0
    row = train.iloc[0]
    a, b = row["extra_info"]["a"], row["extra_info"]["b"]
    assert row["reward_model"]["ground_truth"] == str(a + b)
    from hapo_verl.cpu.reward import compute_score

    assert compute_score(row["data_source"], f"{a}+{b}={a + b}", row["reward_model"]["ground_truth"]) == 1.0
    assert compute_score(row["data_source"], f"{a + b + 1}", row["reward_model"]["ground_truth"]) == 0.0
    assert compute_score(row["data_source"], "no number", row["reward_model"]["ground_truth"]) == 0.0


# ------------------------------------------------------------------------------------- batched generation
def test_greedy_batch_equals_unbatched_argmax(engine, model):
    results = engine.generate([_req(p, temperature=0.0, max_tokens=8, ignore_eos=True) for p in PROMPTS])
    assert engine.batch_sizes[-1] == len(PROMPTS)
    for prompt, res in zip(PROMPTS, results):
        logits = _full_logits(model, prompt, res.token_ids)
        assert res.token_ids == logits.argmax(-1).tolist()
        ref_lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(res.token_ids)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(res.log_probs), ref_lp, atol=1e-4)
        assert res.temperatures == [0.0] * 8 and res.finish_reason == "length"


def test_adaptive_temperature_rows_and_plain_rows_in_one_batch(engine, model):
    tau, temp = 0.3, 0.8
    adaptive = AdaptiveTemperatureRequest(stats=STATS, tau=tau)
    specs = [dict(temperature=temp, adaptive=adaptive), dict(temperature=temp), dict(temperature=0.0),
             dict(temperature=temp, adaptive=adaptive)]
    results = engine.generate([_req(p, max_tokens=10, ignore_eos=True, **s) for p, s in zip(PROMPTS, specs)])
    for prompt, spec, res in zip(PROMPTS, specs, results):
        temps = torch.tensor(res.temperatures)
        logits = _full_logits(model, prompt, res.token_ids)
        toks = torch.tensor(res.token_ids)[:, None]
        if spec["temperature"] == 0.0:  # greedy rows untouched
            assert res.token_ids == logits.argmax(-1).tolist() and (temps == 0).all()
            continue
        if "adaptive" in spec:
            # per step and row: f from the entropy of the pre-temperature logits, sampled at T*f
            expected_t = temp * row_temperature_factor(logits, STATS, tau)
            assert torch.allclose(temps, expected_t, atol=1e-4)
            assert (temps >= temp * (1 - tau) - 1e-6).all() and (temps <= temp * (1 + tau) + 1e-6).all()
            assert temps.std() > 0  # the factor moves with the token's entropy
        else:  # requests without stats: plain T
            expected_t = torch.full_like(temps, temp)
            assert torch.allclose(temps, expected_t)
        # log-prob of the sampled token under the distribution actually sampled from (T*f)
        ref_lp = torch.log_softmax(logits / expected_t[:, None], -1).gather(-1, toks).squeeze(-1)
        assert torch.allclose(torch.tensor(res.log_probs), ref_lp, atol=1e-4)


def test_reference_compat_mode_only_heats(engine):
    adaptive = AdaptiveTemperatureRequest(stats=STATS, tau=0.5, reference_compat=True)
    (res,) = engine.generate([_req(PROMPTS[0], temperature=1.0, adaptive=adaptive, max_tokens=12, ignore_eos=True)])
    assert all(1.0 - 1e-6 <= t <= 1.5 + 1e-6 for t in res.temperatures)  # |ĥ| >= 0 -> f >= 1


def test_eos_stops_a_row_and_ignore_eos_does_not(model):
    greedy = BatchGenerator(model, eos_token_ids=[], pad_token_id=0).generate(
        [_req(PROMPTS[0], temperature=0.0, max_tokens=6, ignore_eos=True)])[0].token_ids
    stop_id = greedy[2]
    if stop_id in greedy[:2]:
        pytest.skip("degenerate greedy continuation")
    eng = BatchGenerator(model, eos_token_ids=[stop_id], pad_token_id=0)
    stopped, ignored, other = eng.generate([
        _req(PROMPTS[0], temperature=0.0, max_tokens=6),
        _req(PROMPTS[0], temperature=0.0, max_tokens=6, ignore_eos=True),
        _req(PROMPTS[1], temperature=0.0, max_tokens=6),
    ])
    assert stopped.token_ids == greedy[:3] and stopped.finish_reason == "stop"  # eos is included, then stops
    assert ignored.token_ids == greedy and ignored.finish_reason == "length"
    assert len(other.log_probs) == len(other.token_ids) == len(other.temperatures)


def test_max_tokens_per_row(engine):
    limits = [1, 3, 7, 5]
    results = engine.generate([_req(p, temperature=1.0, max_tokens=m, ignore_eos=True) for p, m in zip(PROMPTS, limits)])
    assert [len(r.token_ids) for r in results] == limits
    assert all(r.finish_reason == "length" for r in results)
    # the context bound caps max_tokens (max_model_len=64)
    (res,) = engine.generate([_req(list(range(3, 63)), temperature=1.0, max_tokens=50, ignore_eos=True)])
    assert len(res.token_ids) == 4


def test_top_k_and_top_p_truncate_the_sampled_distribution():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    specs = [SamplingSpec(temperature=1.0, top_k=1), SamplingSpec(temperature=2.0, top_p=1e-6),
             SamplingSpec(temperature=1.0, top_k=3), SamplingSpec(temperature=1.0, top_p=0.5),
             SamplingSpec(temperature=0.0), SamplingSpec(temperature=1.0)]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        tok, lp, temps = sample_next_tokens(logits, specs, g)
        assert tok[0] == logits[0].argmax() and abs(lp[0]) < 1e-6
        assert tok[1] == logits[1].argmax() and abs(lp[1]) < 1e-6
        assert tok[2] in logits[2].topk(3).indices
        ref = torch.log_softmax(logits[2].masked_fill(logits[2] < logits[2].topk(3).values[-1], -math.inf), -1)
        assert torch.isclose(lp[2], ref[tok[2]], atol=1e-5)
        probs = torch.softmax(logits[3], -1)
        sp, order = probs.sort(descending=True)
        nucleus = order[: int(((sp.cumsum(0) - sp) < 0.5).sum())]
        assert tok[3] in nucleus
        assert torch.isclose(lp[3], torch.log(probs[tok[3]] / probs[nucleus].sum()), atol=1e-5)
        assert tok[4] == logits[4].argmax() and temps[4] == 0
        assert torch.isclose(lp[5], torch.log_softmax(logits[5], -1)[tok[5]], atol=1e-5)


def test_weight_update_changes_outputs(engine):
    req = [_req(p, temperature=0.0, max_tokens=8, ignore_eos=True) for p in PROMPTS]
    before = [r.token_ids for r in engine.generate(req)]
    original = {k: v.clone() for k, v in engine.model.state_dict().items()}
    torch.manual_seed(1)
    perturbed = {k: v + 0.5 * torch.randn_like(v) for k, v in original.items() if k.endswith("weight")}
    info = engine.load_weights(perturbed)
    assert info["loaded"] == len(perturbed)
    after = [r.token_ids for r in engine.generate(req)]
    assert after != before
    engine.load_weights(original)
    assert [r.token_ids for r in engine.generate(req)] == before
    with pytest.raises(KeyError):
        engine.load_weights({"not.a.param": torch.zeros(1)})


def test_request_batcher_batches_concurrent_requests(engine):
    reqs = [_req(p, temperature=0.0, max_tokens=5, ignore_eos=True) for p in PROMPTS * 3]
    expected = [r.token_ids for r in engine.generate(reqs)]

    async def main():
        batcher = RequestBatcher(engine, max_batch_size=8, batch_wait_s=0.01)
        try:
            results = await asyncio.gather(*[batcher.submit(r) for r in reqs])
            # a weight update waits for the running batch, then applies
            await batcher.load_weights({k: v.clone() for k, v in engine.model.state_dict().items()})
            return results, dict(batcher.stats)
        finally:
            await batcher.close()

    results, stats = asyncio.run(main())
    assert [r.token_ids for r in results] == expected  # each caller gets its own row back
    assert stats["requests"] == len(reqs) and stats["max_batch"] == 8 and stats["batches"] == 2


def test_sampling_params_parsing():
    spec = SamplingSpec.from_sampling_params(
        {"temperature": 0.7, "top_p": 0.9, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True,
         "max_new_tokens": 5, "extra_args": {**AdaptiveTemperatureRequest(STATS, 0.2).to_extra_args()}}, 16)
    assert (spec.temperature, spec.top_p, spec.max_tokens, spec.adaptive.tau) == (0.7, 0.9, 5, 0.2)
    assert SamplingSpec.from_sampling_params({"temperature": 0}, 16).greedy
    assert SamplingSpec.from_sampling_params({}, 16).max_tokens == 16
    assert SamplingSpec.from_sampling_params({"extra_args": {"other": 1}}, 16).adaptive is None
    with pytest.raises(ValueError, match="hapo_tau"):
        SamplingSpec.from_sampling_params({"extra_args": {"hapo_pivot": 0.0}}, 16)
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingSpec.from_sampling_params({"repetition_penalty": 1.2}, 16)


# ------------------------------------------------------------------------------ server and verl plumbing
def test_server_token_output_reaches_verl_batch_structures(assets):
    """HFCPUServer.generate (called in-process, no Ray) -> TokenOutput -> verl's AgentLoopOutput.as_dict ->
    the TransferQueue TensorDict (v1) keeps the per-token temperatures under extra_fields."""
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    from hapo_verl.cpu.rollout import HFCPUServer

    server = HFCPUServer(config={"prompt_length": 48, "response_length": 6, "seed": 0, "max_num_seqs": 8},
                         model_config={"local_path": assets.model_path})
    adaptive = AdaptiveTemperatureRequest(STATS, 0.25).to_extra_args()

    async def main():
        outs = await asyncio.gather(
            server.generate(PROMPTS[0], {"temperature": 1.0, "logprobs": True, "extra_args": adaptive}),
            server.generate(PROMPTS[1], {"temperature": 1.0, "logprobs": True}),
            server.generate(PROMPTS[2], {"temperature": 1.0, "logprobs": False}),
        )
        info = await server.update_weights(dict(server.engine.model.state_dict()), global_steps=3)
        after = await server.generate(PROMPTS[1], {"temperature": 0.0})
        return outs, info, after, await server.get_stats()

    outs, info, after, stats = asyncio.run(main())
    assert stats["max_batch"] == 3  # the three concurrent requests ran as one batch
    for out in outs:
        temps = out.extra_fields[TOKEN_TEMPERATURES_KEY]
        assert 1 <= len(out.token_ids) <= 6 and len(temps) == len(out.token_ids)
        assert out.stop_reason == "completed" and out.extra_fields["global_steps"] is None
    assert all(0.75 - 1e-6 <= t <= 1.25 + 1e-6 for t in outs[0].extra_fields[TOKEN_TEMPERATURES_KEY])
    assert outs[1].extra_fields[TOKEN_TEMPERATURES_KEY] == [1.0] * len(outs[1].token_ids)
    assert outs[2].log_probs is None and len(outs[0].log_probs) == len(outs[0].token_ids)
    assert info["weight_version"] == 1 and after.extra_fields["global_steps"] == 3

    samples = []
    with_logprobs = outs[:2]  # a verl batch is homogeneous (all samples carry rollout log-probs or none)
    for out in with_logprobs:
        alo = AgentLoopOutput(prompt_ids=[1, 2], response_ids=out.token_ids, response_mask=[1] * len(out.token_ids),
                              response_logprobs=out.log_probs, metrics=AgentLoopMetrics(),
                              extra_fields=out.extra_fields)
        samples.append(alo.as_dict())
    td = list_of_dict_to_tensordict(samples)
    for i, out in enumerate(with_logprobs):
        assert td["extra_fields"][i][TOKEN_TEMPERATURES_KEY] == out.extra_fields[TOKEN_TEMPERATURES_KEY]


def _run_python(code: str, env_extra: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if k not in cpu_env()}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


_PROBE = """
import verl
from verl.plugin.platform import PlatformRegistry, get_platform
from verl.workers.rollout import base
from verl.workers.rollout.replica import RolloutReplicaRegistry
import hapo_verl.patches as patches
print("PLATFORM", get_platform().device_name, get_platform().communication_backend_name())
print("APPLIED", ",".join(patches.APPLIED))
print("HFCPU", ("hfcpu", "async") in base._ROLLOUT_REGISTRY, "hfcpu" in RolloutReplicaRegistry._registry)
if get_platform().device_name == "cpu":
    from hapo_verl.cpu.registration import ensure_cpu_backend_registered
    ensure_cpu_backend_registered()
    assert RolloutReplicaRegistry.get("hfcpu").__name__ == "HFCPUReplica"
    assert base.get_rollout_class("hfcpu").__name__ == "HFCPURollout"
    from verl.utils.device import get_device_id, get_torch_device
    assert get_device_id() == "cpu" and get_torch_device().get_device_name() == "CPU"
"""


def test_plugin_registers_cpu_backend_only_when_selected():
    on = _run_python(_PROBE, cpu_env())
    assert on.returncode == 0, on.stderr[-3000:]
    assert "PLATFORM cpu gloo" in on.stdout
    assert "APPLIED gloo_backend_dedup,fsdp2_cpu_offload_no_pin,rollout_registry" in on.stdout
    assert "HFCPU True True" in on.stdout
    off = _run_python(_PROBE, {"VERL_PLATFORM": "nvidia"})
    assert off.returncode == 0, off.stderr[-3000:]
    assert "APPLIED \n" in off.stdout and "HFCPU False False" in off.stdout


def test_cpu_overrides_compose_with_verl_config(assets):
    """The overrides are valid for verl's ppo_trainer config (composition + dataclass validation)."""
    from hydra import compose, initialize_config_module
    from verl.utils.config import omega_conf_to_dataclass

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=cpu_overrides(assets))
    assert cfg.actor_rollout_ref.rollout.name == "hfcpu"
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars.VERL_PLATFORM == "cpu"
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars.HF_HUB_OFFLINE == "1"  # str, as Ray requires
    rollout = omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
    assert rollout.tensor_model_parallel_size == 1


# ----------------------------------------------------------------------------------------- end to end
@pytest.mark.timeout(400)
def test_main_ppo_grpo_two_steps_on_cpu(assets, tmp_path):
    from cpu_run_utils import REWARD_LOG_ENV, grpo_smoke_overrides, run_verl

    reward_log = tmp_path / "reward_calls.jsonl"
    overrides = grpo_smoke_overrides(assets, steps=2, extra=[
        f"reward.custom_reward_function.path={TESTS_DIR / 'cpu_run_utils.py'}",
        "reward.custom_reward_function.name=recording_compute_score",
    ])
    res = run_verl(overrides, timeout=300, env_extra={REWARD_LOG_ENV: str(reward_log)},
                   log_path=tmp_path / "main_ppo.log")
    print(f"main_ppo: rc={res.rc} in {res.elapsed_s:.1f}s; log {res.log_path}")
    assert not res.timed_out, res.tail()
    assert res.rc == 0, res.tail()
    for step in (1, 2):
        metrics = res.step_metrics.get(step)
        assert metrics, f"no metrics for step {step}\n{res.tail()}"
        for key in ("timing_s/step", "timing_s/gen", "actor/pg_loss", "critic/score/mean", "response_length/mean"):
            assert key in metrics, f"step {step}: {key} missing"
        # rollout log-probs (hfcpu, fp32) agree with the actor's recomputation: weights are in sync. The tiny
        # model is warmed up (assets v2): peaked distributions, so absolute prob diffs are larger than with the
        # old random model (~8e-5 then; observed 4e-3..1.2e-2 max, ~1e-3 mean now)
        assert metrics["training/rollout_probs_diff_max"] < 5e-2
        assert metrics["training/rollout_actor_probs_pearson_corr"] > 0.999
    # weights were pushed to the rollout server after each step, and generation was batched
    syncs = re.findall(r"\[hfcpu\] replica 0: weights v(\d+) loaded .*max batch (\d+)", res.output)
    assert syncs, res.tail()
    assert max(int(b) for _, b in syncs) > 1
    # per-token temperatures travelled with each sample (TokenOutput.extra_fields -> agent loop -> reward)
    records = [json.loads(line) for line in reward_log.read_text().splitlines()]
    assert len(records) >= 2 * 4 * 2
    for rec in records:
        assert rec["temperatures"] and 1 <= len(rec["temperatures"]) <= assets.max_response_length
        assert all(t == 1.0 for t in rec["temperatures"])  # plain GRPO: no statistics -> rollout.temperature
