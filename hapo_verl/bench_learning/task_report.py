"""``hapo-verl bench-learning --task-report``: what a task looks like to the warmed-up policy, before any RL.

Per seed's warm-up checkpoint:

* greedy held-out accuracy and response length;
* sampled responses (T=1, the RL sampler): length, accuracy, and the token entropy distribution: the share of
  tokens with H < 0.1 nats, the entropy mass held by the top 20% of tokens, quantiles, and the same split by
  token class (operand / result digit, operator, ``=``, space, newline, eos), which shows where the forks are;
* vanilla PPO (the ``grpo`` method: verl's vanilla loss, clip 0.2) for a few RL steps under each candidate
  setting (lr, mini-batches, epochs): clip fraction, train score, and the CPU seconds and wall seconds per step.

The clip fraction is what tells whether a token-level mechanism can act at all: with one mini-batch and one
epoch every update is on-policy (ratio 1) and nothing is clipped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace

import torch

#: entropy below this (nats) counts as a forced token
LOW_ENTROPY = 0.1
#: the top fraction of tokens, by entropy, whose share of the entropy mass is reported
TOP_FRACTION = 0.2


def entropy_profile(entropy: torch.Tensor, mask: torch.Tensor) -> dict:
    """Distribution of the per-token entropies ``entropy[mask]``: share below :data:`LOW_ENTROPY`, share of the
    entropy mass held by the top :data:`TOP_FRACTION` of tokens (``ceil``), mean and quantiles."""
    values = entropy[mask.bool()].double().flatten()
    n = values.numel()
    if n == 0:
        return {"tokens": 0}
    ranked = values.sort(descending=True).values
    top = max(1, math.ceil(TOP_FRACTION * n))
    total = float(ranked.sum())
    q = torch.quantile(values, torch.tensor([0.5, 0.8, 0.9, 0.99], dtype=torch.double)).tolist()
    return {"tokens": n, "mean": float(values.mean()), "share_below_0.1": float((values < LOW_ENTROPY).double().mean()),
            "top20_mass": float(ranked[:top].sum()) / total if total > 0 else float("nan"),
            "p50": q[0], "p80": q[1], "p90": q[2], "p99": q[3], "max": float(ranked[0])}


TOKEN_CLASSES = ("operand digit", "result digit", "operator", "=", "space", "newline", "eos", "other")


def token_classes(pieces: list[str], eos_piece: str | None = None) -> list[str]:
    """The class of each token of one response, from its decoded text: a digit is an operand digit before the
    line's ``=`` and a result digit after it (reversed addition's answer digits are operand digits)."""
    out, after_equals = [], False
    for piece in pieces:
        if piece == eos_piece or piece == "":
            out.append("eos")
        elif piece.isdigit():
            out.append("result digit" if after_equals else "operand digit")
        elif piece in ("+", "-", "*", "/"):
            out.append("operator")
        elif piece == "=":
            out.append("=")
            after_equals = True
        elif piece == "\n":
            out.append("newline")
            after_equals = False
        elif piece.isspace():
            out.append("space")
        else:
            out.append("other")
    return out


def entropy_by_class(tokenizer, tokens: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, eos: int) -> dict:
    """Per token class: share of tokens, mean entropy, share of the entropy mass, share with H < 0.1."""
    rows = []
    for r in range(tokens.shape[0]):
        ids = tokens[r][mask[r].bool()].tolist()
        pieces = ["" if i == eos else tokenizer.decode([i]) for i in ids]
        for cls, h in zip(token_classes(pieces, ""), entropy[r][: len(ids)].tolist()):
            rows.append((cls, h))
    total_h = sum(h for _, h in rows) or float("nan")
    out = {}
    for cls in TOKEN_CLASSES:
        hs = [h for c, h in rows if c == cls]
        if hs:
            out[cls] = {"token_share": len(hs) / len(rows), "mean": sum(hs) / len(hs),
                        "mass_share": sum(hs) / total_h, "share_below_0.1": sum(h < LOW_ENTROPY for h in hs) / len(hs)}
    return out


@dataclass(frozen=True)
class Candidate:
    """An RL setting whose clip fraction is measured."""
    lr: float
    ppo_mini_batches: int
    ppo_epochs: int

    @classmethod
    def parse(cls, text: str) -> "Candidate":
        """``"lr:mini_batches:epochs"``, e.g. ``"1e-4:4:1"``."""
        lr, mini, epochs = text.split(":")
        return cls(float(lr), int(mini), int(epochs))

    def label(self) -> str:
        return f"lr {self.lr:g}, {self.ppo_mini_batches} mini-batches, {self.ppo_epochs} epoch(s)"


DEFAULT_CANDIDATES = (Candidate(1e-4, 2, 1), Candidate(1e-4, 2, 2), Candidate(1e-4, 4, 2))


def _load(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return tokenizer, model


def measure(model_dir: str, task, seed: int, rl, candidates=DEFAULT_CANDIDATES, rl_steps: int = 8,
            sample_prompts: int = 64, log=print) -> dict:
    """The report of one seed's checkpoint (see the module docstring); ``rl`` gives the settings a candidate does
    not change (prompts per step, n, micro-batch, threads)."""
    from hapo_verl.bench_learning.fast import FastRun, fast_settings, generate, greedy_accuracy, prompt_tensor, \
        score_responses
    from hapo_verl.tinyworld.tasks import family

    torch.set_num_threads(rl.threads)
    tasks = family(task)
    tokenizer, model = _load(model_dir)
    codec = tasks.Codec(tokenizer, task)
    heldout = tasks.heldout_problems(task)
    report = {"seed": seed, "task": task.to_dict(), "model_dir": model_dir}

    greedy = generate(model, prompt_tensor(codec, heldout), task.max_new_tokens, codec.eos, codec.pad, greedy=True)
    report["heldout_greedy_accuracy"] = greedy_accuracy(model, codec, heldout)
    report["heldout_greedy_length"] = float(greedy["mask"].sum(1).mean())

    problems = tasks.ProblemSampler(task, seed + 300_000).sample(sample_prompts)
    rows = [p for p in problems for _ in range(rl.n)]
    gen = torch.Generator().manual_seed(seed)
    out = generate(model, prompt_tensor(codec, rows), task.max_new_tokens, codec.eos, codec.pad,
                   temperature=rl.temperature, generator=gen)
    scores = torch.tensor(score_responses(codec, out["tokens"], out["mask"], rows))
    report["sampled"] = {"responses": len(rows), "temperature": rl.temperature,
                         "mean_length": float(out["mask"].sum(1).mean()), "accuracy": float(scores.mean()),
                         "mixed_group_frac": float((scores.view(-1, rl.n).std(1) > 0).float().mean()),
                         "entropy": entropy_profile(out["entropy"], out["mask"]),
                         "entropy_by_class": entropy_by_class(tokenizer, out["tokens"], out["entropy"], out["mask"],
                                                              codec.eos)}
    log(f"[task-report] seed {seed}: held-out greedy acc {report['heldout_greedy_accuracy']:.3f}, sampled length "
        f"{report['sampled']['mean_length']:.1f}, sampled acc {report['sampled']['accuracy']:.3f}, "
        f"H<0.1 {report['sampled']['entropy']['share_below_0.1']:.3f}, top-20% mass "
        f"{report['sampled']['entropy']['top20_mass']:.3f}")

    report["clip"] = []
    for cand in candidates:
        cfg = replace(rl, lr=cand.lr, ppo_mini_batches=cand.ppo_mini_batches, ppo_epochs=cand.ppo_epochs,
                      steps=rl_steps)
        torch.manual_seed(seed)
        _, fresh = _load(model_dir)
        run = FastRun(fresh, codec, fast_settings("grpo"), cfg, seed)
        steps = []
        for _ in range(rl_steps):
            wall, cpu = time.time(), time.process_time()
            m = run.step()
            steps.append({"pg_clipfrac": m.get("pg_clipfrac", 0.0), "score": m.get("score"),
                          "entropy": m.get("entropy"), "response_length": m.get("response_length"),
                          "wall_s": time.time() - wall, "cpu_s": time.process_time() - cpu})
        mean = lambda key: sum(s[key] for s in steps) / len(steps)  # noqa: E731
        row = {"candidate": asdict(cand), "label": cand.label(), "steps": rl_steps,
               "pg_clipfrac": mean("pg_clipfrac"), "score": mean("score"), "entropy": mean("entropy"),
               "response_length": mean("response_length"), "wall_s_per_step": mean("wall_s"),
               "cpu_s_per_step": mean("cpu_s"), "history": steps}
        report["clip"].append(row)
        log(f"[task-report] seed {seed} {cand.label()}: clip fraction {row['pg_clipfrac']:.4f}, score "
            f"{row['score']:.3f}, {row['cpu_s_per_step']:.2f} CPU s/step ({row['wall_s_per_step']:.2f} wall)")
    return report


def markdown(reports: list[dict]) -> str:
    """The reports as Markdown tables (one row per seed; one row per seed and candidate)."""
    lines = ["| seed | held-out greedy acc | greedy length | sampled length | sampled acc | mixed groups | "
             "H < 0.1 share | top-20% entropy mass | mean H | p90 H |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        s, e = r["sampled"], r["sampled"]["entropy"]
        lines.append(f"| {r['seed']} | {r['heldout_greedy_accuracy']:.3f} | {r['heldout_greedy_length']:.1f} | "
                     f"{s['mean_length']:.1f} | {s['accuracy']:.3f} | {s['mixed_group_frac']:.2f} | "
                     f"{e['share_below_0.1']:.3f} | {e['top20_mass']:.3f} | {e['mean']:.3f} | {e['p90']:.3f} |")
    lines += ["", "| seed | token class | token share | mean H | entropy mass share | H < 0.1 share |",
              "|---|---|---|---|---|---|"]
    for r in reports:
        for cls, v in r["sampled"]["entropy_by_class"].items():
            lines.append(f"| {r['seed']} | {cls} | {v['token_share']:.3f} | {v['mean']:.3f} | {v['mass_share']:.3f} | "
                         f"{v['share_below_0.1']:.3f} |")
    lines += ["", "| seed | vanilla PPO setting | steps | clip fraction | train score | CPU s / step | wall s / step |",
              "|---|---|---|---|---|---|---|"]
    for r in reports:
        for c in r["clip"]:
            lines.append(f"| {r['seed']} | {c['label']} | {c['steps']} | {c['pg_clipfrac']:.4f} | {c['score']:.3f} | "
                         f"{c['cpu_s_per_step']:.2f} | {c['wall_s_per_step']:.2f} |")
    return "\n".join(lines)


def write(path: str, reports: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump(reports, f, indent=1)
