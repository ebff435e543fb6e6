"""Tables (Markdown) and PNG curves from the benchmark's run records."""

from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path

import numpy as np

#: the methods of the committed report first; any other method of the records follows, by name
ORDER = ["grpo", "dapo", "hapo", "hapo_ref"]
LABELS = {"grpo": "GRPO", "dapo": "DAPO", "hapo": "HAPO (default)", "hapo_ref": "HAPO (reference_compat)"}


def label(method: str) -> str:
    """A method's label: the known ones above, else the registered algorithm's title."""
    if method in LABELS:
        return LABELS[method]
    from hapo_verl import registry

    fork = method.endswith("_ref")
    spec = registry.get(method[: -len("_ref")] if fork else method)
    if spec is None:
        return method
    return f"{spec.title} (reference_compat)" if fork else spec.title


def ordered(methods) -> list[str]:
    return [m for m in ORDER if m in methods] + sorted(m for m in methods if m not in ORDER)


def load_runs(directory: str) -> list[dict]:
    runs = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        try:
            with open(path) as f:
                runs.append(json.load(f))
        except (OSError, ValueError):
            continue
    return runs


def end_accuracy(evals: list[dict], last: int = 3) -> float:
    """Mean of the last ``last`` evaluations after step 0 (the start if there is none)."""
    after = [e["acc"] for e in evals if e["step"] > 0]
    if not after:
        return evals[0]["acc"] if evals else float("nan")
    return float(np.mean(after[-last:]))


def auc(evals: list[dict]) -> float:
    """Area under the accuracy curve, normalized by the number of steps (= time-averaged accuracy)."""
    if len(evals) < 2:
        return evals[0]["acc"] if evals else float("nan")
    steps = np.array([e["step"] for e in evals], float)
    accs = np.array([e["acc"] for e in evals], float)
    return float(np.sum((accs[1:] + accs[:-1]) / 2 * np.diff(steps)) / (steps[-1] - steps[0]))


def budget_accuracy(run: dict) -> tuple[float, int]:
    """Held-out accuracy at the last evaluation whose cumulative generated samples fit the budget of a run
    without dynamic sampling (steps x prompts x n), and that evaluation's step."""
    rl = run["rl"]
    budget = rl["steps"] * rl["prompts_per_step"] * rl["n"]
    cum, total = {0: 0}, 0
    for h in run["history"]:
        total += h.get("samples_generated", rl["prompts_per_step"] * rl["n"])
        cum[h["step"]] = total
    ok = [e for e in run["evals"] if cum.get(e["step"], math.inf) <= budget]
    last = ok[-1] if ok else run["evals"][0]
    return last["acc"], last["step"]


def _mean_std(values) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def _hist_mean(history, key, lo: float, hi: float):
    """Mean of history[key] over the fraction [lo, hi) of the run."""
    vals = [h.get(key) for h in history if h.get(key) is not None]
    if not vals:
        return None
    n = len(vals)
    part = vals[int(lo * n):max(int(lo * n) + 1, int(hi * n))]
    return float(np.mean(part))


def _group(runs):
    by = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)
    return {m: sorted(by[m], key=lambda r: r["seed"]) for m in ordered(by)}


def fast_table(runs: list[dict], last: int) -> str:
    lines = ["| method | seeds | steps | start acc | end acc (mean ± sd) | Δ acc | AUC (mean acc over training) | "
             "acc at equal sample budget (step) | end acc per seed | entropy first→last 10% | resp. length first→last 10% | samples generated / step | "
             "wall s / run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, rs in _group(runs).items():
        starts = [r["evals"][0]["acc"] for r in rs]
        ends = [end_accuracy(r["evals"], last) for r in rs]
        deltas = [e - s for e, s in zip(ends, starts)]
        aucs = [auc(r["evals"]) for r in rs]
        steps = sorted({r["evals"][-1]["step"] for r in rs})
        ent0 = np.mean([_hist_mean(r["history"], "entropy", 0, 0.1) or np.nan for r in rs])
        ent1 = np.mean([_hist_mean(r["history"], "entropy", 0.9, 1.0) or np.nan for r in rs])
        len0 = np.mean([_hist_mean(r["history"], "response_length", 0, 0.1) or np.nan for r in rs])
        len1 = np.mean([_hist_mean(r["history"], "response_length", 0.9, 1.0) or np.nan for r in rs])
        samples = np.mean([np.mean([h.get("samples_generated", 0) for h in r["history"]]) for r in rs])
        secs = np.mean([r.get("seconds", np.nan) for r in rs])
        budget = [budget_accuracy(r) for r in rs]
        budget_steps = "/".join(sorted({str(b[1]) for b in budget}))
        per_seed = ", ".join(f"s{r['seed']}: {e:.3f}" for r, e in zip(rs, ends))
        lines.append(f"| {label(method)} | {len(rs)} | {'/'.join(map(str, steps))} | "
                     f"{_mean_std(starts)} | {_mean_std(ends)} | {_mean_std(deltas)} | {_mean_std(aucs)} | "
                     f"{_mean_std([b[0] for b in budget])} ({budget_steps}) | {per_seed} | {ent0:.3f} → {ent1:.3f} | {len0:.2f} → {len1:.2f} | {samples:.0f} | {secs:.0f} |")
    return "\n".join(lines)


def _first_last(history, key) -> str:
    """Mean of ``key`` over the first and over the last quarter of the steps."""
    vals = [h.get(key) for h in history if h.get(key) is not None]
    if not vals:
        return "-"
    q = max(1, len(vals) // 4)
    return f"{np.mean(vals[:q]):.3f} → {np.mean(vals[-q:]):.3f}"


PAIRS = [("hapo", "dapo"), ("hapo", "grpo"), ("dapo", "grpo"), ("hapo_ref", "hapo")]


def pairs(methods) -> list[tuple[str, str]]:
    """The committed pairs, then every other method against DAPO."""
    return PAIRS + [(m, "dapo") for m in ordered(methods) if m not in ORDER]


def paired_table(runs: list[dict], last: int) -> str:
    """Per-seed differences (same seed = same checkpoint and prompts): A − B."""
    by = {(r["method"], r["seed"]): r for r in runs}
    lines = ["| A − B | seeds | end acc: per seed | mean | AUC: mean | acc at equal sample budget: mean |",
             "|---|---|---|---|---|---|"]
    for a, b in pairs({m for m, _ in by}):
        seeds = sorted(s for (m, s) in by if m == a and (b, s) in by)
        if not seeds:
            continue
        d_end = [end_accuracy(by[a, s]["evals"], last) - end_accuracy(by[b, s]["evals"], last) for s in seeds]
        d_auc = [auc(by[a, s]["evals"]) - auc(by[b, s]["evals"]) for s in seeds]
        d_bud = [budget_accuracy(by[a, s])[0] - budget_accuracy(by[b, s])[0] for s in seeds]
        per = ", ".join(f"s{s}: {d:+.3f}" for s, d in zip(seeds, d_end))
        lines.append(f"| {label(a)} − {label(b)} | {len(seeds)} | {per} | {_mean_std(d_end)} | {_mean_std(d_auc)} "
                     f"| {_mean_std(d_bud)} |")
    return "\n".join(lines)


def verl_table(verl_runs: list[dict], fast_runs: list[dict]) -> str:
    fast = {(r["method"], r["seed"]): r for r in fast_runs}
    lines = ["| method | seed | steps | rc | verl val acc: start → end | fast-mode acc: start → first eval ≥ verl's last step | "
             "verl train score, first → last quarter | fast train score, same steps | verl entropy, first → last quarter | "
             "verl wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(verl_runs, key=lambda r: (ordered({x["method"] for x in verl_runs}).index(r["method"]), r["seed"])):
        ev = r.get("evals", [])
        va = f"{ev[0]['acc']:.3f} → {ev[-1]['acc']:.3f}" if ev else "-"
        f = fast.get((r["method"], r["seed"]))
        fa, fs = "-", "-"
        if f and ev:
            last_step = ev[-1]["step"]
            fe = [e for e in f["evals"] if e["step"] >= last_step] or f["evals"][-1:]
            fa = f"{f['evals'][0]['acc']:.3f} → {fe[0]['acc']:.3f} (step {fe[0]['step']})"
            fh = [h for h in f["history"] if h["step"] <= r["steps"]]
            if fh:
                fs = _first_last(fh, "score")
        h = r.get("history", [])
        vs = _first_last(h, "score")
        ve = _first_last(h, "entropy")
        lines.append(f"| {label(r['method'])} | {r['seed']} | {r['steps']} | {r.get('returncode')} "
                     f"| {va} | {fa} | {vs} | {fs} | {ve} | {r.get('seconds', 0):.0f} |")
    return "\n".join(lines)


def _smooth(x, k):
    x = np.asarray(x, float)
    if len(x) < k or k <= 1:
        return x
    return np.convolve(x, np.ones(k) / k, mode="valid")


def plots(runs: list[dict], plot_dir: str, verl_runs: list[dict] | None = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(plot_dir, exist_ok=True)
    groups = _group(runs)
    written = []
    colors = {"grpo": "tab:gray", "dapo": "tab:blue", "hapo": "tab:red", "hapo_ref": "tab:orange"}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, rs in groups.items():
        steps = [e["step"] for e in rs[0]["evals"]]
        n = min(len(r["evals"]) for r in rs)
        accs = np.array([[e["acc"] for e in r["evals"][:n]] for r in rs])
        ax.plot(steps[:n], accs.mean(0), label=f"{label(method)} (n={len(rs)})", color=colors.get(method))
        ax.fill_between(steps[:n], accs.min(0), accs.max(0), alpha=0.15, color=colors.get(method))
    ax.set_xlabel("RL step"); ax.set_ylabel("greedy held-out accuracy"); ax.grid(alpha=0.3)
    ax.set_title("Held-out accuracy (mean over seeds, band = min..max)"); ax.legend()
    path = os.path.join(plot_dir, "accuracy.png"); fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, rs in groups.items():
        for i, r in enumerate(rs):
            cum, total = {0: 0}, 0
            for h in r["history"]:
                total += h.get("samples_generated", 0)
                cum[h["step"]] = total
            pts = [(cum[e["step"]] / 1000, e["acc"]) for e in r["evals"] if e["step"] in cum]
            ax.plot(*zip(*pts), color=colors.get(method), alpha=0.7, lw=1,
                    label=label(method) if i == 0 else None)
    ax.set_xlabel("generated samples (thousands)"); ax.set_ylabel("greedy held-out accuracy"); ax.grid(alpha=0.3)
    ax.set_title("Held-out accuracy vs sampling cost (one line per seed)"); ax.legend()
    path = os.path.join(plot_dir, "accuracy_vs_samples.png"); fig.tight_layout(); fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    for key, ylabel, name in [("entropy", "mean token entropy of samples (nats, T=1)", "entropy.png"),
                              ("response_length", "mean response length (tokens, incl. eos)", "response_length.png"),
                              ("score", "mean task reward of the training batch", "train_score.png")]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method, rs in groups.items():
            n = min(len(r["history"]) for r in rs)
            if n == 0:
                continue
            vals = np.array([[h.get(key, np.nan) for h in r["history"][:n]] for r in rs]).mean(0)
            k = max(1, n // 30)
            sm = _smooth(vals, k)
            ax.plot(np.arange(len(sm)) + k, sm, label=label(method), color=colors.get(method))
        ax.set_xlabel("RL step"); ax.set_ylabel(ylabel); ax.grid(alpha=0.3); ax.legend()
        ax.set_title(f"{ylabel.split('(')[0].strip()} (mean over seeds, moving average)")
        path = os.path.join(plot_dir, name); fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)
        written.append(path)

    if verl_runs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        fast = {(r["method"], r["seed"]): r for r in runs}
        for r in verl_runs:
            c = colors.get(r["method"])
            if r.get("evals"):
                ax.plot([e["step"] for e in r["evals"]], [e["acc"] for e in r["evals"]], "o-", color=c,
                        label=f"verl {label(r['method'])} s{r['seed']}")
            f = fast.get((r["method"], r["seed"]))
            if f:
                first_after = [e["step"] for e in f["evals"] if e["step"] >= r["steps"]]
                limit = first_after[0] if first_after else math.inf
                fe = [e for e in f["evals"] if e["step"] <= limit]
                ax.plot([e["step"] for e in fe], [e["acc"] for e in fe], "x--", color=c,
                        label=f"fast {label(r['method'])} s{r['seed']}")
        ax.set_xlabel("RL step"); ax.set_ylabel("greedy held-out accuracy"); ax.grid(alpha=0.3); ax.legend(fontsize=7)
        ax.set_title("verl trainer vs fast mode (same checkpoint, same prompts)")
        path = os.path.join(plot_dir, "verl_vs_fast.png"); fig.tight_layout(); fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(path: str, fast_runs: list[dict], verl_runs: list[dict], plot_paths: list[str], header: str,
                 last: int = 3, warmups: list[dict] | None = None) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    rel = [os.path.relpath(p, os.path.dirname(os.path.abspath(path))) for p in plot_paths]
    parts = [header, "", "## Fast mode (plugin code paths, one process)", "",
             f"End accuracy = mean of the last {last} evaluations of each seed; ± is the sample standard deviation "
             "over seeds. AUC = time-averaged held-out accuracy over the run (trapezoid over the evaluations, step 0 "
             "included). Accuracy at equal sample budget: the last evaluation reached before the method had generated "
             "as many samples as a run without dynamic sampling (steps × prompts × n), since DAPO's dynamic sampling "
             "generates more per step. Entropy and response length are those of the training samples (means over the first "
             "and last 10% of steps).", "", fast_table(fast_runs, last) if fast_runs else "(no fast-mode run)", "",
             "### Paired differences (same seed = same checkpoint, same prompt stream)", "",
             paired_table(fast_runs, last) if fast_runs else "", ""]
    if warmups:
        parts += ["### Warm-up checkpoints", "", "| seed | SFT steps | seconds | check acc (greedy, 300 prompts) | "
                  "reached target |", "|---|---|---|---|---|"]
        for w in warmups:
            parts.append(f"| {w['seed']} | {w['steps']} | {w['seconds']:.0f} | {w['check_accuracy']:.3f} | "
                         f"{w['reached_target']} |")
        parts.append("")
    if verl_runs:
        parts += ["## verl trainer (`--engine verl`)", "",
                  "Same warmed-up checkpoint, same training prompts in the same order, validation = the held-out set "
                  "(greedy). verl's `critic/score/mean` includes DAPO's overlong penalty.", "",
                  verl_table(verl_runs, fast_runs), ""]
    if rel:
        parts += ["## Curves", ""] + [f"![{os.path.basename(p)}]({p})" for p in rel] + [""]
    text = "\n".join(parts)
    with open(path, "w") as f:
        f.write(text)
    return text
