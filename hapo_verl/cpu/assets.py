"""Locally generated assets for CPU runs: a tiny Qwen2 model, its tokenizer, a synthetic verifiable task.

Nothing is downloaded. :func:`ensure_tiny_assets` builds everything on first use into a cache directory
(``$HAPO_VERL_CACHE`` if set, else ``~/.cache/hapo_verl/tiny``) and reuses it afterwards; the build is
deterministic, written to a temporary directory and renamed into place under a file lock, so concurrent
callers (pytest workers, Ray processes) see either nothing or the complete set.

* tokenizer: byte-level BPE trained with ``tokenizers`` on the task's own text, ChatML special tokens and
  chat template. Byte level matters with transformers 5: verl's Qwen continuous-token builder requires
  ``"\\n"`` to be a single token, and transformers 5 re-wraps tokenizers of ``qwen2`` models as byte-level
  ``Qwen2Tokenizer`` (a character-level WordLevel tokenizer breaks there).
* model: ``Qwen2ForCausalLM`` (seeded init), about 0.3 M parameters, fp32, eos = ``<|im_end|>``, then a
  short supervised **warm-up** (:func:`warm_up`) so that RL starts from a partial success rate instead of 0:
  answer-only cross-entropy on ``chat_template(prompt, add_generation_prompt=True) + digits(a+b) + eos`` for
  problems that are NOT in the RL parquet files, stopped as soon as the sampled (T=1) accuracy on the RL
  prompts, generated exactly as the ``hfcpu`` rollout does, reaches ``WarmupConfig.target_accuracy`` (step
  cap ``max_steps``). Outcome in ``warmup.json`` next to ``model/`` (and in ``assets.json``).
* data: "a+b=" with operands 0-19 (all 400 pairs, shuffled: 64 train + 16 val RL prompts, the other 320 for
  the warm-up), user message only, verl RL parquet (``data_source, prompt, ability, reward_model,
  extra_info``); reward :func:`hapo_verl.cpu.reward.compute_score`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from hapo_verl.cpu.reward import DATA_SOURCE
from hapo_verl.supervised import answer_only_batch, file_lock, train_until_accurate

#: bump when the generated content changes; a cache with another version is rebuilt
ASSETS_VERSION = 2
CACHE_ENV = "HAPO_VERL_CACHE"
DEFAULT_CACHE = Path("~/.cache/hapo_verl/tiny")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
#: only in the tokenizer corpus (the prompts carry no system message since v2: half the tokens)
SYSTEM_PROMPT = "Add the numbers."

#: Qwen2 shape: ~0.3 M parameters with the ~400-token vocabulary
MODEL_SHAPE = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256)
NUM_TRAIN, NUM_VAL, SEED = 64, 16, 1234
#: operands are 0..OPERAND_MAX (sums have at most 2 digits: 2 answer tokens + eos, max_response_length 16)
OPERAND_MAX = 19
WARMUP_THREADS_ENV = "HAPO_VERL_WARMUP_THREADS"


@dataclass(frozen=True)
class WarmupConfig:
    """Supervised warm-up of the tiny model (see :func:`warm_up`)."""

    #: stop at the first check whose held-out sampled accuracy (T=1) is >= this
    target_accuracy: float = 0.25
    max_steps: int = 2000
    eval_every: int = 25
    #: samples per held-out prompt at each check
    eval_samples: int = 2
    batch_size: int = 32
    lr: float = 3e-3
    grad_clip: float = 1.0
    seed: int = SEED


@dataclass(frozen=True)
class TinyAssets:
    root: str
    model_path: str
    train_file: str
    val_file: str
    warmup_file: str
    reward_path: str = "pkg://hapo_verl.cpu.reward"
    reward_name: str = "compute_score"
    data_source: str = DATA_SOURCE
    max_prompt_length: int = 48
    max_response_length: int = 16

    def to_dict(self) -> dict:
        return asdict(self)


def cache_dir(root: str | os.PathLike | None = None) -> Path:
    if root is not None:
        return Path(root).expanduser().resolve()
    env = os.environ.get(CACHE_ENV)
    return (Path(env) if env else DEFAULT_CACHE).expanduser().resolve()


def _assets_for(root: Path) -> TinyAssets:
    return TinyAssets(root=str(root), model_path=str(root / "model"), train_file=str(root / "data" / "train.parquet"),
                      val_file=str(root / "data" / "val.parquet"), warmup_file=str(root / "warmup.json"))


def problem_splits() -> dict[str, list[tuple[int, int]]]:
    """All (a, b) with 0 <= a, b <= OPERAND_MAX, shuffled (seeded) into disjoint RL train / RL val / warm-up."""
    pairs = [(a, b) for a in range(OPERAND_MAX + 1) for b in range(OPERAND_MAX + 1)]
    random.Random(SEED).shuffle(pairs)
    return {"train": pairs[:NUM_TRAIN], "val": pairs[NUM_TRAIN:NUM_TRAIN + NUM_VAL],
            "warmup": pairs[NUM_TRAIN + NUM_VAL:]}


def messages(a: int, b: int) -> list[dict]:
    """The chat messages of one problem (the parquet ``prompt`` column)."""
    return [{"role": "user", "content": _question(a, b)}]


def _question(a: int, b: int) -> str:
    return f"{a}+{b}="


def _build_tokenizer(out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n", "<|im_start|>user\n", "<|im_start|>assistant\n"]
    corpus += [f"{a}+{b}={a + b}\n" for a in range(100) for b in range(0, 100, 7)]
    corpus += ["system user assistant Add the numbers. " * 4]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None, additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = MODEL_SHAPE["max_position_embeddings"]
    fast.save_pretrained(str(out_dir))
    return fast


def _build_model(out_dir: Path, tokenizer) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=False, bos_token_id=None,
                         eos_token_id=eos, pad_token_id=pad, torch_dtype="float32", **MODEL_SHAPE)
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=[eos], pad_token_id=pad, bos_token_id=None)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def _build_data(out_dir: Path) -> None:
    import pandas as pd

    splits = problem_splits()
    for split in ("train", "val"):
        rows = []
        for i, (a, b) in enumerate(splits[split]):
            rows.append({
                "data_source": DATA_SOURCE,
                "prompt": messages(a, b),
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": str(a + b)},
                "extra_info": {"split": split, "index": i, "a": a, "b": b},
            })
        pd.DataFrame(rows).to_parquet(out_dir / f"{split}.parquet", index=False)


def prompt_token_ids(tokenizer, a: int, b: int) -> list[int]:
    """Prompt ids exactly as verl 0.9.1's agent loop builds them (``ContinuousTokenBuilder.build_initial_tokens``
    -> ``tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)``; transformers 5
    returns a BatchEncoding, verl's ``normalize_token_ids`` takes its ``input_ids``)."""
    out = tokenizer.apply_chat_template(messages(a, b), tokenize=True, add_generation_prompt=True)
    if hasattr(out, "keys"):
        out = out["input_ids"]
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(t) for t in out]


def sampled_accuracy(model, tokenizer, problems, *, samples: int = 1, temperature: float = 1.0, seed: int = SEED,
                     max_tokens: int = 16) -> float:
    """Mean reward of ``samples`` completions per problem, generated by the hfcpu rollout's batched decoder."""
    from hapo_verl.cpu.generation import BatchGenerator, GenerationRequest, SamplingSpec
    from hapo_verl.cpu.reward import compute_score

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    was_training = model.training
    engine = BatchGenerator(model, [eos], pad, seed=seed)
    spec = SamplingSpec(temperature=temperature, max_tokens=max_tokens)
    reqs = [GenerationRequest(prompt_token_ids(tokenizer, a, b), spec) for a, b in problems for _ in range(samples)]
    results = engine.generate(reqs)
    model.train(was_training)
    truths = [a + b for a, b in problems for _ in range(samples)]
    scores = [compute_score(DATA_SOURCE, tokenizer.decode(r.token_ids, skip_special_tokens=True), str(t))
              for r, t in zip(results, truths)]
    return sum(scores) / len(scores)


def warm_up(model_dir: Path, config: WarmupConfig | None = None, log=print) -> dict:
    """Supervised warm-up of the saved tiny model in ``model_dir`` (overwritten); returns the outcome.

    Examples: the warm-up problems (disjoint from the RL parquet files) in the token format the trainer sees:
    prompt ids from the chat template with the generation prompt, then the answer's tokens and eos; the loss
    is on the answer tokens (and eos) only. Every ``eval_every`` steps the sampled (T=1) accuracy on the RL
    train + val prompts (held out from the warm-up) is measured with the rollout's decoder; training stops at
    the first check reaching ``target_accuracy`` or at ``max_steps``. Deterministic (seeded init, batches,
    sampling); ``$HAPO_VERL_WARMUP_THREADS`` threads (default 2), restored afterwards.
    """
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = config or WarmupConfig()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(os.environ.get(WARMUP_THREADS_ENV, "2"))))
    try:
        # the tokenizer as transformers / verl reload it (Qwen2Tokenizer: digits are single tokens)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        splits = problem_splits()
        held_out = splits["train"] + splits["val"]
        examples = []
        for a, b in splits["warmup"]:
            prompt = prompt_token_ids(tokenizer, a, b)
            answer = tokenizer.encode(str(a + b), add_special_tokens=False) + [eos]
            examples.append((prompt, answer))
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        start = time.time()

        def next_batch():
            idx = torch.randint(len(examples), (cfg.batch_size,), generator=gen).tolist()
            return answer_only_batch([examples[i] for i in idx], pad)

        run = train_until_accurate(
            model, next_batch,
            lambda step: sampled_accuracy(model, tokenizer, held_out, samples=cfg.eval_samples, seed=cfg.seed + step),
            lr=cfg.lr, grad_clip=cfg.grad_clip, max_steps=cfg.max_steps, check_every=cfg.eval_every,
            target_accuracy=cfg.target_accuracy, check_last_step=True)
        greedy = sampled_accuracy(model, tokenizer, held_out, temperature=0.0)
        model.save_pretrained(str(model_dir))
        outcome = {"steps": run.steps, "seconds": round(time.time() - start, 2),
                   "sampled_accuracy": round(run.accuracy, 4), "greedy_accuracy": round(greedy, 4),
                   "target_accuracy": cfg.target_accuracy, "reached_target": run.reached_target,
                   "final_loss": round(run.final_loss, 4), "held_out_prompts": len(held_out),
                   "warmup_problems": len(examples), "threads": torch.get_num_threads(),
                   "history": [(step, acc) for step, acc, _ in run.history], "config": asdict(cfg)}
    finally:
        torch.set_num_threads(prev_threads)
    log(f"[hapo_verl] tiny model warm-up: {outcome['steps']} steps, {outcome['seconds']:.1f} s, held-out accuracy "
        f"sampled(T=1) {outcome['sampled_accuracy']:.3f} / greedy {outcome['greedy_accuracy']:.3f} "
        f"(target {cfg.target_accuracy}{'' if run.reached_target else ', NOT reached: step cap'})")
    return outcome


def _is_complete(root: Path) -> bool:
    marker = root / "assets.json"
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("version") == ASSETS_VERSION
    except (OSError, ValueError):
        return False


def ensure_tiny_assets(root: str | os.PathLike | None = None, warmup: WarmupConfig | None = None) -> TinyAssets:
    """Build (first call) or reuse the tiny model, tokenizer and parquet files; returns their paths.

    ``warmup`` only matters when the assets are built (a complete cache is reused whatever it says)."""
    root = cache_dir(root)
    if _is_complete(root):
        return _assets_for(root)
    with file_lock(root.parent / f".{root.name}.lock"):
        if _is_complete(root):
            return _assets_for(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp", dir=root.parent))
        try:
            tmp.chmod(0o755)
            (tmp / "model").mkdir()
            (tmp / "data").mkdir()
            tokenizer = _build_tokenizer(tmp / "model")
            _build_model(tmp / "model", tokenizer)
            _build_data(tmp / "data")
            outcome = warm_up(tmp / "model", warmup)
            (tmp / "warmup.json").write_text(json.dumps(outcome, indent=1))
            assets = _assets_for(root)
            (tmp / "assets.json").write_text(json.dumps({"version": ASSETS_VERSION, **assets.to_dict(),
                                                         "warmup": {k: v for k, v in outcome.items()
                                                                    if k not in ("history", "config")}}, indent=1))
            if root.exists():
                shutil.rmtree(root)
            os.replace(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return _assets_for(root)
