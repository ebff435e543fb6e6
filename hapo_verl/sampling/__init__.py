"""Adaptive temperature per row: the request protocol (``request``), the packed per-row parameters (``params``), the
fused fast path (``fast_path``) and its kernels (``cpu_kernel`` + ``cpu_kernel.c``, ``triton_kernel``).

May import: torch, ``hapo_verl.algorithms`` and, optionally, Triton or a C compiler; never verl, vLLM or Ray (the
vLLM processors in ``hapo_verl.vllm`` and the CPU rollout in ``hapo_verl.cpu`` import this room). Importing this
package itself imports nothing. See docs/vllm_logits_processor.md.
"""
