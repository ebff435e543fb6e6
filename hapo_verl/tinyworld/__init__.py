"""The tiny-task world of the CPU quickstart and the learning benchmark: one tokenizer, chat template and Qwen2
model builder (:mod:`.world`) and the tasks built on them (:mod:`.addition`, :mod:`.reversed_addition`,
:mod:`.countdown`; the benchmark's by name in :mod:`.tasks`; their shared held-out and training draws in
:mod:`.problems`).

Imports torch, transformers and tokenizers only (no verl, Ray or vLLM)."""
