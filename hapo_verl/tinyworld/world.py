"""The world's tokenizer (byte-level BPE, ChatML), its chat template and the Qwen2 model of a given shape.

Byte level matters with transformers 5: verl's Qwen continuous-token builder requires ``"\\n"`` to be one token,
and transformers 5 reloads tokenizers of ``qwen2`` models as ``Qwen2Tokenizer`` (Qwen's pre-tokenizer: every
digit is its own token). Load a model directory with :func:`load` to see the tokenizer as verl does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

PAD_TOKEN, IM_START, EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, EOS_TOKEN]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
#: tokens the template adds around one user message, generation prompt included ("user", "assistant" are 3 and 8)
CHAT_FRAME_TOKENS = 17
VOCAB_SIZE = 400


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int


def _tokenizer_corpus() -> list[str]:
    """The BPE training text: the chat frame and "a+b=c" lines (the system line is the quickstart's v1 prompt)."""
    corpus = [f"{IM_START}system\nAdd the numbers.{EOS_TOKEN}\n", f"{IM_START}user\n", f"{IM_START}assistant\n"]
    corpus += [f"{a}+{b}={a + b}\n" for a in range(100) for b in range(0, 100, 7)]
    corpus += ["system user assistant Add the numbers. " * 4]
    return corpus


def build_tokenizer(out_dir: str | Path, max_length: int):
    """Train the world's tokenizer (deterministic), save it to ``out_dir`` and return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   unk_token=None, bos_token=None, additional_special_tokens=[IM_START])
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = max_length
    fast.save_pretrained(str(out_dir))
    return fast


def build_model(tokenizer, shape: ModelShape, seed: int):
    """A seeded fp32 ``Qwen2ForCausalLM`` of ``shape`` for ``tokenizer`` (eos ``<|im_end|>``, pad ``<|endoftext|>``)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    config = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=False, bos_token_id=None,
                         eos_token_id=eos, pad_token_id=pad, torch_dtype="float32", **asdict(shape))
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=[eos], pad_token_id=pad, bos_token_id=None)
    return model


def create(model_dir: str | Path, shape: ModelShape, seed: int) -> None:
    """Write the tokenizer and a freshly initialised model of ``shape`` to the HF directory ``model_dir``."""
    tokenizer = build_tokenizer(model_dir, shape.max_position_embeddings)
    build_model(tokenizer, shape, seed).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))


def load(model_dir: str | Path):
    """(tokenizer, fp32 model) of ``model_dir`` as transformers and verl load them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
    return tokenizer, model


def user_messages(content: str) -> list[dict]:
    """The chat of one prompt: a single user message (the parquet ``prompt`` column)."""
    return [{"role": "user", "content": content}]


def prompt_ids(tokenizer, content: str) -> list[int]:
    """Prompt ids exactly as verl 0.9.1's agent loop builds them (``ContinuousTokenBuilder.build_initial_tokens``
    -> ``tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)``; transformers 5
    returns a BatchEncoding, verl's ``normalize_token_ids`` takes its ``input_ids``)."""
    out = tokenizer.apply_chat_template(user_messages(content), tokenize=True, add_generation_prompt=True)
    if hasattr(out, "keys"):
        out = out["input_ids"]
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(t) for t in out]


def rl_row(data_source: str, ability: str, question: str, answer: str, split: str, index: int, a: int, b: int) -> dict:
    """One row of a verl RL parquet file (``data_source, prompt, ability, reward_model, extra_info``)."""
    return {"data_source": data_source, "prompt": user_messages(question), "ability": ability,
            "reward_model": {"style": "rule", "ground_truth": answer},
            "extra_info": {"split": split, "index": index, "a": a, "b": b}}
