"""Tables (Markdown) and PNG curves from the benchmark's run records."""

from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path

import numpy as np

from hapo_verl.bench_learning.methods import label, methods as _methods, paired_with

#: t quantiles (0.975) for 95% confidence intervals over n - 1 degrees of freedom
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def ordered(methods) -> list[str]:
    """The methods in the benchmark's order (:func:`~hapo_verl.bench_learning.methods.methods`), unknown ones last."""
    order = list(_methods())
    return [m for m in order if m in methods] + sorted(m for m in methods if m not in order)


def confidence_interval(values) -> tuple[float, float, float]:
    """(mean, low, high): the 95% t interval of the mean over seeds (nan bounds with fewer than 2 values)."""
    values = [float(v) for v in values]
    mean = float(np.mean(values)) if values else float("nan")
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = T975.get(len(values) - 1, 1.96) * float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return mean, mean - half, mean + half


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


#: the comparisons the claims rest on (A, B): HAPO against the baselines, and each HAPO component
CLAIM_PAIRS = [("hapo", "dapo"), ("hapo_ds", "dapo"), ("hapo", "grpo"), ("dapo", "grpo"), ("hapo_ds", "hapo"),
               ("hapo", "hapo_no_ats"), ("hapo", "hapo_no_tlga"), ("hapo", "hapo_no_dar"), ("hapo", "hapo_no_aac"),
               ("hapo_ref", "hapo")]


def pairs(methods) -> list[tuple[str, str]]:
    """The claims' pairs, each algorithm's variant against the algorithm, then every other method against GRPO and
    against DAPO."""
    claim_pairs = CLAIM_PAIRS + [(m, paired_with(m)) for m in ordered(methods) if paired_with(m)]
    found = [(a, b) for a, b in claim_pairs if a in methods and b in methods]
    claimed = {m for pair in claim_pairs for m in pair}
    for m in ordered(methods):
        if m not in claimed:
            found += [(m, base) for base in ("grpo", "dapo") if base in methods]
    return found


def paired_differences(runs: list[dict], a: str, b: str, last: int = 3) -> dict | None:
    """A − B over the seeds both ran (same seed = same checkpoint and prompt stream): per-seed differences of the
    end accuracy, the AUC and the accuracy at equal sample budget, each with its 95% interval."""
    by = {(r["method"], r["seed"]): r for r in runs}
    seeds = sorted(s for (m, s) in by if m == a and (b, s) in by)
    if not seeds:
        return None
    out = {"a": a, "b": b, "seeds": seeds}
    for key, fn in (("end_acc", lambda r: end_accuracy(r["evals"], last)), ("auc", lambda r: auc(r["evals"])),
                    ("budget_acc", lambda r: budget_accuracy(r)[0])):
        diffs = [fn(by[a, s]) - fn(by[b, s]) for s in seeds]
        mean, low, high = confidence_interval(diffs)
        out[key] = {"per_seed": diffs, "mean": mean, "ci95": [low, high]}
    return out


def _ci(d: dict) -> str:
    low, high = d["ci95"]
    if math.isnan(low):
        return f"{d['mean']:+.3f}"
    return f"{d['mean']:+.3f} [{low:+.3f}, {high:+.3f}]"


def paired_table(runs: list[dict], last: int) -> str:
    """Per-seed differences A − B with 95% t intervals over seeds."""
    methods = {r["method"] for r in runs}
    lines = ["| A − B | seeds | end acc: per seed | end acc: mean [95% CI] | AUC: mean [95% CI] | "
             "acc at equal sample budget: mean [95% CI] |", "|---|---|---|---|---|---|"]
    for a, b in pairs(methods):
        d = paired_differences(runs, a, b, last)
        if d is None:
            continue
        per = ", ".join(f"s{s}: {v:+.3f}" for s, v in zip(d["seeds"], d["end_acc"]["per_seed"]))
        lines.append(f"| {label(a)} − {label(b)} | {len(d['seeds'])} | {per} | {_ci(d['end_acc'])} | "
                     f"{_ci(d['auc'])} | {_ci(d['budget_acc'])} |")
    return "\n".join(lines)


def _verdict(d: dict | None, what: str) -> str:
    if d is None:
        return f"{what}: no data (a method of the pair did not run)."
    parts = []
    for key, name in (("end_acc", "end accuracy"), ("auc", "AUC"), ("budget_acc", "accuracy at equal samples")):
        low, high = d[key]["ci95"]
        sign = ("higher" if low > 0 else "lower" if high < 0 else "not different (the interval contains 0)") \
            if not math.isnan(low) else "one seed only"
        parts.append(f"{name} {_ci(d[key])}: {sign}")
    supported = [d[k]["ci95"][0] > 0 for k in ("end_acc", "auc")]
    contradicted = [d[k]["ci95"][1] < 0 for k in ("end_acc", "auc")]
    verdict = ("**supported**" if all(supported) else "**partly supported**" if any(supported) else
               "**contradicted**" if any(contradicted) else "**not shown** by these data")
    return f"{what}: {verdict} ({len(d['seeds'])} seeds; " + "; ".join(parts) + ")."


CLAIMS = [("hapo", "dapo", "HAPO > DAPO (HAPO without dynamic sampling, DAPO with it)"),
          ("hapo_ds", "dapo", "HAPO > DAPO on DAPO's recipe (both with dynamic sampling and overlong shaping: the "
                              "paper's comparison)"),
          ("hapo", "grpo", "HAPO > GRPO"),
          ("hapo", "hapo_no_ats", "adaptive temperature sampling (ATS) helps"),
          ("hapo", "hapo_no_tlga", "the token-level group average advantage (TLGA) helps"),
          ("hapo", "hapo_no_dar", "differential advantage redistribution (DAR) helps"),
          ("hapo", "hapo_no_aac", "asymmetric adaptive clipping (AAC) helps")]


def verdicts(runs: list[dict], last: int = 3) -> str:
    """One line per claim, from the paired 95% intervals: supported when both the end accuracy's and the AUC's
    intervals lie above 0, partly when one does, contradicted when one lies below 0, else not shown."""
    return "\n".join(f"- {_verdict(paired_differences(runs, a, b, last), what)}" for a, b, what in CLAIMS)


def _mean_key(history, key):
    vals = [h[key] for h in history if isinstance(h.get(key), (int, float))]
    return float(np.mean(vals)) if vals else None


#: the activity columns every method has
ACTIVITY = [("pg_clipfrac", "loss clip fraction"), ("clipfrac_high_entropy", "clip frac., top-20% H tokens"),
            ("clipfrac_low_entropy", "clip frac., other tokens"), ("temperature_mean", "temperature mean"),
            ("temperature_std", "temperature sd"), ("gen_batches", "generation batches / step")]


def own_metric(key: str) -> str | None:
    """The name shown for a metric an algorithm's loss or selection step logs under its own section
    (``actor/<algorithm>/<name>`` or ``<algorithm>/<name>``), else None (verl's own, the engine's)."""
    parts = key.split("/")
    if parts[0] == "actor":
        parts = parts[1:]
    return "/".join(parts) if len(parts) == 2 else None


def activity_table(runs: list[dict]) -> str:
    """Each method's component activity, averaged over its steps and seeds."""
    lines = ["| method | " + " | ".join(name for _, name in ACTIVITY) + " | the method's own (mean over steps) |",
             "|---|" + "---|" * (len(ACTIVITY) + 1)]
    for method, rs in _group(runs).items():
        cells = []
        for key, _ in ACTIVITY:
            vals = [v for v in (_mean_key(r["history"], key) for r in rs) if v is not None]
            cells.append(f"{np.mean(vals):.4f}" if vals else "-")
        own = {}
        for r in rs:
            for h in r["history"]:
                for k, v in h.items():
                    if isinstance(v, (int, float)) and own_metric(k):
                        own.setdefault(own_metric(k), []).append(v)
        own_text = ", ".join(f"{k} {np.mean(v):.3f}" for k, v in sorted(own.items())) or "-"
        lines.append(f"| {label(method)} | " + " | ".join(cells) + f" | {own_text} |")
    return "\n".join(lines)


def cell_command(run: dict) -> str:
    """The command that reproduces one cell (its record's settings)."""
    rl, task = run["rl"], run["task"]
    return (f"hapo-verl bench-learning --task {task['kind']} --methods {run['method']} --seeds {run['seed']} "
            f"--steps {rl['steps']} --lr {rl['lr']} --prompts {rl['prompts_per_step']} "
            f"--mini-batches {rl['ppo_mini_batches']} --epochs {rl['ppo_epochs']} --eval-every {rl['eval_every']} "
            f"--threads {rl['threads']} --jobs 1")


def summary(runs: list[dict], last: int = 3) -> dict:
    """The machine-readable summary: per task, method and seed."""
    tasks: dict = {}
    order = ordered({r["method"] for r in runs})
    for r in sorted(runs, key=lambda r: (r["task"]["kind"], order.index(r["method"]), r["seed"])):
        h = r["history"]
        tasks.setdefault(r["task"]["kind"], {"task": r["task"], "rl": r["rl"], "cells": []})["cells"].append({
            "method": r["method"], "seed": r["seed"], "start_acc": r["evals"][0]["acc"],
            "end_acc": end_accuracy(r["evals"], last), "auc": auc(r["evals"]),
            "mean_response_length": _mean_key(h, "response_length"), "mean_clip_fraction": _mean_key(h, "pg_clipfrac"),
            "samples_per_step": _mean_key(h, "samples_generated"), "seconds": r.get("seconds"),
            "method_config": r.get("method_config"), "command": cell_command(r)})
    return {"end_acc": f"mean of the last {last} evaluations", "auc": "time-averaged held-out accuracy (trapezoid)",
            "tasks": tasks}


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


#: the figures' method groups, by file-name suffix: the paper's comparison; HAPO and its variants; every other
#: method, with GRPO and DAPO as references
BASELINES = ("grpo", "dapo")


def figure_groups(methods) -> dict[str, list[str]]:
    main = [m for m in ("grpo", "dapo", "hapo", "hapo_ds") if m in methods]
    variants = [m for m in ordered(methods) if m.startswith("hapo")]
    others = [m for m in ordered(methods) if m not in main and m not in variants]
    groups = {"": main or ordered(methods)}
    if len(variants) > 1 and set(variants) - set(main):
        groups["_hapo_variants"] = variants
    if others:
        groups["_others"] = [m for m in BASELINES if m in methods] + others
    return groups


def _colors(methods) -> dict:
    import matplotlib

    fixed = {"grpo": "tab:gray", "dapo": "tab:blue", "hapo": "tab:red", "hapo_ds": "tab:purple",
             "hapo_ref": "tab:orange"}
    cycle = [c for c in matplotlib.colormaps["tab20"].colors]
    rest = [m for m in ordered(methods) if m not in fixed]
    return {**fixed, **{m: cycle[i % len(cycle)] for i, m in enumerate(rest)}}


def _group_plots(plt, groups, plot_dir, suffix, colors) -> list[str]:
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, rs in groups.items():
        steps = [e["step"] for e in rs[0]["evals"]]
        n = min(len(r["evals"]) for r in rs)
        accs = np.array([[e["acc"] for e in r["evals"][:n]] for r in rs])
        ax.plot(steps[:n], accs.mean(0), label=f"{label(method)} (n={len(rs)})", color=colors.get(method))
        ax.fill_between(steps[:n], accs.min(0), accs.max(0), alpha=0.15, color=colors.get(method))
    ax.set_xlabel("RL step"); ax.set_ylabel("greedy held-out accuracy"); ax.grid(alpha=0.3)
    ax.set_title("Held-out accuracy (mean over seeds, band = min..max)"); ax.legend(fontsize=7)
    path = os.path.join(plot_dir, f"accuracy{suffix}.png"); fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)
    written.append(path)

    if suffix:
        written += _series_plots(plt, groups, plot_dir, suffix, colors)
        return written
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

    written += _series_plots(plt, groups, plot_dir, suffix, colors)
    return written


def _series_plots(plt, groups, plot_dir, suffix, colors) -> list[str]:
    written = []
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
        path = os.path.join(plot_dir, name.replace(".png", f"{suffix}.png")); fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)
        written.append(path)
    return written


def plots(runs: list[dict], plot_dir: str, verl_runs: list[dict] | None = None) -> list[str]:
    """The curves, one set per method group (:func:`figure_groups`): accuracy{suffix}.png, entropy{suffix}.png,
    response_length{suffix}.png, train_score{suffix}.png; accuracy_vs_samples.png for the first group; and
    verl_vs_fast.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(plot_dir, exist_ok=True)
    all_groups = _group(runs)
    written = []
    colors = _colors(all_groups)
    for suffix, members in figure_groups(all_groups).items():
        groups = {m: all_groups[m] for m in members}
        written += _group_plots(plt, groups, plot_dir, suffix, colors)
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


def markdown_table(header: list[str], rows: list[list]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                     ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def task_table(reports: list[dict]) -> str:
    """The task as the warmed-up policies see it (``--task-report``): per seed."""
    rows = []
    for rep in reports:
        sampled = rep.get("sampled", {})
        prof = sampled.get("entropy", {})
        clips = "; ".join(f"{c['pg_clipfrac']:.4f} ({c['label']}, {c['steps']})" for c in rep.get("clip", []))
        rows.append([rep["seed"], f"{rep.get('heldout_greedy_accuracy', float('nan')):.3f}",
                     f"{sampled.get('mean_length', float('nan')):.1f}", f"{sampled.get('accuracy', float('nan')):.3f}",
                     f"{prof.get('share_below_0.1', float('nan')):.3f}", f"{prof.get('top20_mass', float('nan')):.3f}",
                     clips or "-"])
    return markdown_table(["seed", "greedy held-out acc", "sampled (T=1) length", "sampled acc",
                           "share of tokens with H < 0.1", "entropy mass of the top 20%",
                           "vanilla PPO clip fraction (setting, steps)"], rows)


def settings_table(runs: list[dict]) -> str:
    """What each method ran: its config and overrides, as read from its composed config."""
    rows = []
    for method, rs in _group(runs).items():
        c = rs[0].get("method_config") or {}
        if "config" not in c:
            continue
        yes = lambda flag: "yes" if flag else "no"  # noqa: E731
        rows.append([label(method), f"`{c['config']}` " + " ".join(f"`{o}`" for o in c["overrides"]), c["estimator"],
                     c["loss_mode"], f"{c['clip_low']} / {c['clip_high']}", c["loss_agg_mode"],
                     yes(c["dynamic_sampling"]), yes(c["overlong_shaping"]),
                     f"yes ({c['temperature_tau']})" if c["adaptive_temperature"] else "no",
                     ", ".join(c["selections"]) or "-", "; ".join(c["not_applied"]) or "-"])
    return markdown_table(["method", "config + overrides", "estimator", "loss", "clip low / high", "aggregation",
                           "dynamic sampling", "overlong shaping", "adaptive temperature (τ)", "selection",
                           "not applied by the fast engine"], rows)


def reproduce_table(rows: list[dict]) -> str:
    lines = ["| cell | step | recorded acc | rerun acc | equal |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {label(r['method'])} s{r['seed']} | {r['step']} | {r['recorded']:.4f} | {r['rerun']:.4f} | "
                     f"{'yes' if r['recorded'] == r['rerun'] else '**no**'} |")
    return "\n".join(lines)


def write_report(path: str, fast_runs: list[dict], verl_runs: list[dict], plot_paths: list[str], header: str,
                 last: int = 3, warmups: list[dict] | None = None, task_reports: list[dict] | None = None,
                 reproduced: list[dict] | None = None, findings: str | None = None) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    rel = [os.path.relpath(p, os.path.dirname(os.path.abspath(path))) for p in plot_paths]
    parts = [header, ""]
    if findings:
        parts += ["## Findings (written by hand from the records below: `findings.md` beside the plots)", "",
                  findings.strip(), ""]
    parts += ["## Fast mode (plugin code paths, one process)", "",
             f"End accuracy = mean of the last {last} evaluations of each seed; ± is the sample standard deviation "
             "over seeds. AUC = time-averaged held-out accuracy over the run (trapezoid over the evaluations, step 0 "
             "included). Accuracy at equal sample budget: the last evaluation reached before the method had generated "
             "as many samples as a run without dynamic sampling (steps × prompts × n), since DAPO's dynamic sampling "
             "generates more per step. Entropy and response length are those of the training samples (means over the first "
             "and last 10% of steps).", "", fast_table(fast_runs, last) if fast_runs else "(no fast-mode run)", "",
             "### Paired differences (same seed = same checkpoint, same prompt stream)", "",
             "A − B per seed, then the mean with its 95% t interval over seeds. With 3-5 seeds an interval is wide: "
             "a difference whose interval contains 0 is not shown by these data, whatever its mean.", "",
             paired_table(fast_runs, last) if fast_runs else "", "",
             "### Verdicts (generated from the intervals above)", "", verdicts(fast_runs, last) if fast_runs else "",
             "", "### Component activity (means over steps and seeds)", "",
             "Clip fractions: the loss's own (`pg_clipfrac`), and the share of tokens outside the method's nominal "
             "range [1 − clip_low, 1 + clip_high] in the direction PPO clips, split by old-policy entropy (top 20% of "
             "each step's tokens vs the rest; for verl's vanilla loss, exactly the tokens it clips). Temperatures: of "
             "the sampled tokens. Generation batches: more than 1 with dynamic sampling, which refills the groups whose "
             "rewards are all equal. The method's own metrics are those its loss or selection step logs.", "",
             activity_table(fast_runs) if fast_runs else "", "",
             "### What each method ran", "",
             "Read from each method's composed config (`hapo_verl/bench_learning/methods.py`). Terms that need a "
             "reference model or an entropy bonus, which the fast engine does not have, are listed per method, not "
             "silently dropped. Overlong shaping uses the task's buffer (4 tokens on Countdown), whatever the "
             "config's length.", "", settings_table(fast_runs) if fast_runs else "", ""]
    if task_reports:
        parts += ["### The task at the start of RL (`--task-report`, each seed's warm-up checkpoint)", "",
                  task_table(task_reports), ""]
    if reproduced:
        parts += ["### Reproducibility (`--reproduce`: each cell's first evaluation interval rerun)", "",
                  reproduce_table(reproduced), ""]
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
