"""``hapo-verl compare RUN [RUN ...] --out DIR``: plots and a Markdown table from the metrics verl logged.

A RUN is ``[LABEL=]PATH`` where PATH is

- a JSONL file of verl's file logger (``trainer.logger=[...,file]``; one ``{"step": int, "data": {metric: value}}``
  per line, several lines of one step are merged),
- a TensorBoard event file (``trainer.logger=[...,tensorboard]``, ``events.out.tfevents.*``),
- or a directory: every ``*.jsonl`` and event file below it is read and merged (later files win per step).

Written to ``--out``: one PNG per metric group (training reward, validation accuracy per benchmark and their
mean, entropy, response length, clip fractions, effective sampling temperature) and ``summary.md``: for each
metric and run the final value, the best value (max for reward and accuracy metrics) and their difference to
the first run.

Temperature: a rollout that reports per-token temperatures (the CPU rollout) logs
``hapo/rollout/temperature_{min,mean,max}``; the trainer logs the estimate ``hapo/rollout/temperature_est_{min,mean,
max}`` for any rollout, and on vLLM it is the only one (docs/vllm_logits_processor.md). Each run is plotted with
the reported series when it has them, else with the estimated ones (legend entries ``temperature_est_*``); the
table lists both means.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

Series = dict[int, float]  # step -> value

#: (group, title, y label, candidate metric keys; the first present one per run is used, None = all present)
TRAIN_REWARD = ("critic/score/mean", "critic/rewards/mean")
ENTROPY = ("actor/entropy",)
RESPONSE_LENGTH = ("response_length/mean",)
CLIP_FRACTIONS = ("actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/hapo/clipfrac_high_entropy",
                  "actor/hapo/clipfrac_low_entropy")
#: per-token sampling temperature: reported by the rollout (CPU rollout), else estimated by the trainer (vLLM)
TEMPERATURE_STATS = ("mean", "min", "max")
TEMPERATURE_REPORTED = tuple(f"hapo/rollout/temperature_{s}" for s in TEMPERATURE_STATS)
TEMPERATURE_ESTIMATED = tuple(f"hapo/rollout/temperature_est_{s}" for s in TEMPERATURE_STATS)
#: table rows: the mean of either kind
TEMPERATURE = (TEMPERATURE_REPORTED[0], TEMPERATURE_ESTIMATED[0])
VAL_MEAN = "val/mean_over_benchmarks"

#: verl's validation metrics: val-core/<data_source>/<variable>/<stat>@<n>[/...] (also val-aux/...)
_VAL_KEY = re.compile(r"^val-(?:core|aux)/(?P<source>[^/]+)/(?P<var>[^/]+)/(?P<stat>mean|maj|best|worst)@(?P<n>\d+)$")
_VAR_PREFERENCE = ("acc", "score", "reward")


@dataclass
class Run:
    label: str
    path: str
    metrics: dict[str, Series] = field(default_factory=dict)

    def add(self, step: int, data: dict) -> None:
        for key, value in data.items():
            number = _as_float(value)
            if number is not None:
                self.metrics.setdefault(key, {})[int(step)] = number

    def series(self, key: str) -> Series:
        return self.metrics.get(key, {})


def _as_float(value) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, list) and len(value) == 1:
        return _as_float(value[0])
    return None


# ----------------------------------------------------------------------------------------------------- reading
def read_jsonl(path: str | os.PathLike, run: Run) -> None:
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                # a run still writing its last line: skip it, not the whole log
                continue
            if not isinstance(record, dict) or "step" not in record or not isinstance(record.get("data"), dict):
                raise ValueError(f"{path}:{number}: not a verl file-logger record {{'step': ..., 'data': {{...}}}}")
            run.add(record["step"], record["data"])


def read_tensorboard(path: str | os.PathLike, run: Run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    for tag in tags.get("scalars", []):
        for event in accumulator.Scalars(tag):
            run.add(event.step, {tag: event.value})
    for tag in tags.get("tensors", []):  # TF2-style summaries store scalars as 0-d tensors
        for event in accumulator.Tensors(tag):
            try:
                from tensorboard.util import tensor_util

                value = tensor_util.make_ndarray(event.tensor_proto)
            except Exception:  # noqa: BLE001 - non-scalar plugin data
                continue
            if value.size == 1:
                run.add(event.step, {tag: float(value.reshape(()))})


def _is_event_file(path: Path) -> bool:
    return path.is_file() and "tfevents" in path.name


def load_run(spec: str) -> Run:
    label, sep, path = spec.partition("=")
    if not sep or not label or os.path.exists(spec):
        label, path = "", spec
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"run not found: {path}")
    if not label:
        label = source.stem if source.is_file() and source.suffix == ".jsonl" else source.name
        if _is_event_file(source):
            label = source.parent.name
    run = Run(label=label, path=str(source))
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix == ".jsonl" or _is_event_file(p))
        if not files:
            raise FileNotFoundError(f"no *.jsonl or TensorBoard event file under {source}")
    else:
        files = [source]
    for file in files:
        if _is_event_file(file):
            read_tensorboard(file, run)
        else:
            read_jsonl(file, run)
    if not run.metrics:
        raise ValueError(f"no metrics in {path}")
    return run


# ------------------------------------------------------------------------------------------------ selection
def validation_metrics(run: Run) -> dict[str, str]:
    """data_source -> the metric key plotted for it: accuracy (else score/reward), mean@n with the largest n."""
    best: dict[str, tuple[tuple, str]] = {}
    for key in run.metrics:
        match = _VAL_KEY.match(key)
        if not match or match["stat"] != "mean":
            continue
        var = match["var"]
        rank = (_VAR_PREFERENCE.index(var) if var in _VAR_PREFERENCE else len(_VAR_PREFERENCE),
                key.startswith("val-aux"), -int(match["n"]))
        source = match["source"]
        if source not in best or rank < best[source][0]:
            best[source] = (rank, key)
    return {source: key for source, (_, key) in sorted(best.items())}


def mean_over_benchmarks(run: Run, keys: list[str]) -> Series:
    if len(keys) < 2:
        return {}
    steps = set.intersection(*(set(run.series(k)) for k in keys))
    return {s: sum(run.series(k)[s] for k in keys) / len(keys) for s in sorted(steps)}


def first_present(run: Run, candidates) -> str | None:
    return next((k for k in candidates if run.series(k)), None)


def temperature_keys(run: Run) -> tuple[str, ...]:
    """The temperature series plotted for ``run``: the rollout-reported ones when present, else the estimates."""
    for keys in (TEMPERATURE_REPORTED, TEMPERATURE_ESTIMATED):
        if any(run.series(k) for k in keys):
            return keys
    return ()


@dataclass
class Row:
    group: str
    metric: str
    higher_is_better: bool | None  # None: descriptive, no "best"


def table_rows(runs: list[Run]) -> list[Row]:
    rows: list[Row] = []
    reward = next((k for k in TRAIN_REWARD if any(r.series(k) for r in runs)), None)
    if reward:
        rows.append(Row("training reward", reward, True))
    sources: dict[str, str] = {}
    for run in runs:
        for source, key in validation_metrics(run).items():
            sources.setdefault(source, key)
    for source, key in sorted(sources.items()):
        rows.append(Row("validation", key, True))
    if len(sources) >= 2:
        rows.append(Row("validation", VAL_MEAN, True))
    for group, keys in (("entropy", ENTROPY), ("response length", RESPONSE_LENGTH), ("clip fraction", CLIP_FRACTIONS),
                        ("temperature", TEMPERATURE)):
        rows += [Row(group, k, None) for k in keys if any(r.series(k) for r in runs)]
    return rows


def _with_val_mean(run: Run) -> None:
    keys = list(validation_metrics(run).values())
    mean = mean_over_benchmarks(run, keys)
    if mean:
        run.metrics[VAL_MEAN] = mean


# ------------------------------------------------------------------------------------------------- summary
def final_and_best(series: Series, higher_is_better: bool | None) -> tuple[float | None, float | None]:
    if not series:
        return None, None
    final = series[max(series)]
    if higher_is_better is None:
        return final, None
    return final, (max(series.values()) if higher_is_better else min(series.values()))


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    text = f"{value:+.4g}" if signed else f"{value:.4g}"
    return text


def markdown_table(runs: list[Run]) -> str:
    base = runs[0]
    lines = [
        f"| metric | run | last step | final | best | Δ final vs {base.label} | Δ best vs {base.label} |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table_rows(runs):
        base_final, base_best = final_and_best(base.series(row.metric), row.higher_is_better)
        for run in runs:
            series = run.series(row.metric)
            final, best = final_and_best(series, row.higher_is_better)
            d_final = None if final is None or base_final is None or run is base else final - base_final
            d_best = None if best is None or base_best is None or run is base else best - base_best
            last = str(max(series)) if series else "—"
            lines.append(f"| `{row.metric}` | {run.label} | {last} | {_fmt(final)} | {_fmt(best)} | "
                         f"{_fmt(d_final, True)} | {_fmt(d_best, True)} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- plots
def _plot(runs: list[Run], panels: list[tuple[str, list]], title: str, path: Path, ylabel: str) -> bool:
    """One figure; each panel (subtitle, metric keys) shows every run (and every key: a line style each). A key
    may be a callable ``run -> keys`` that picks the keys per run (the temperature panel)."""

    def keys_of(run, keys):
        return [k for key in keys for k in (key(run) if callable(key) else (key,))]

    panels = [(sub, keys) for sub, keys in panels if any(r.series(k) for r in runs for k in keys_of(r, keys))]
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    styles = ["-", "--", ":", "-."]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (subtitle, keys) in enumerate(panels):
        ax = axes[index // cols][index % cols]
        for r_index, run in enumerate(runs):
            run_keys = keys_of(run, keys)
            for k_index, key in enumerate(run_keys):
                series = run.series(key)
                if not series:
                    continue
                steps = sorted(series)
                label = run.label if len(run_keys) == 1 else f"{run.label}: {key.split('/')[-1]}"
                ax.plot(steps, [series[s] for s in steps], styles[k_index % len(styles)],
                        color=colors[r_index % len(colors)], marker="o" if len(steps) < 20 else None,
                        markersize=3, label=label)
        ax.set_title(subtitle, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for index in range(len(panels), rows * cols):
        axes[index // cols][index % cols].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(runs: list[Run], out: Path) -> list[Path]:
    written = []

    def plot(name, title, ylabel, panels):
        path = out / f"{name}.png"
        if _plot(runs, panels, title, path, ylabel):
            written.append(path)

    reward = [k for k in TRAIN_REWARD if any(r.series(k) for r in runs)][:1]
    plot("training_reward", "training reward", "reward", [(k, [k]) for k in reward])
    sources: dict[str, str] = {}
    for run in runs:
        for source, key in validation_metrics(run).items():
            sources.setdefault(source, key)
    val_panels = [(f"{source} ({key.split('/', 2)[2]})", [key]) for source, key in sorted(sources.items())]
    if len(sources) >= 2:
        val_panels.append(("mean over benchmarks", [VAL_MEAN]))
    plot("validation_accuracy", "validation accuracy per benchmark", "accuracy", val_panels)
    plot("entropy", "policy entropy", "entropy", [(k, [k]) for k in ENTROPY])
    plot("response_length", "response length", "tokens", [(k, [k]) for k in RESPONSE_LENGTH])
    plot("clip_fraction", "clip fractions", "fraction", [(k, [k]) for k in CLIP_FRACTIONS])
    plot("temperature", "effective sampling temperature T·f", "temperature",
         [("rollout-reported (temperature_*), else estimated (temperature_est_*)", [temperature_keys])])
    for name, keys in algorithm_metric_keys(runs).items():
        plot(f"algorithm_{name}", f"{name}: the algorithm's own metrics", "value",
             [(key, [key]) for key in keys[:MAX_ALGORITHM_PANELS]])
    return written


#: at most this many panels in one algorithm's figure (its first metrics in name order)
MAX_ALGORITHM_PANELS = 12


def algorithm_metric_keys(runs: list[Run]) -> dict[str, list[str]]:
    """Every registered algorithm's own metrics that some run logged: ``actor/<name>/*`` from its loss and
    ``<name>/*`` from its estimator or batch statistics (HAPO's ``hapo/rollout/temperature_*`` have their own
    figure). A newly registered algorithm is plotted without edits here."""
    from hapo_verl import registry

    names = sorted(spec.name for spec in registry.specs())
    logged = sorted({key for run in runs for key in run.metrics if run.metrics[key]})
    families: dict[str, list[str]] = {}
    for name in names:
        keys = [k for k in logged if (k.startswith(f"actor/{name}/") or k.startswith(f"{name}/"))
                and not k.startswith("hapo/rollout/temperature")]
        if keys:
            families[name] = keys
    return families


def compare(specs: list[str], out: str | os.PathLike) -> dict:
    runs = [load_run(spec) for spec in specs]
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):  # e.g. two runs both named "hapo": make them distinct
        for index, run in enumerate(runs):
            run.label = f"{run.label}#{index + 1}"
    for run in runs:
        _with_val_mean(run)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(runs, out)
    table = markdown_table(runs)
    header = ["# Run comparison", "", "| run | source | steps |", "|---|---|---|"]
    for run in runs:
        steps = sorted({s for series in run.metrics.values() for s in series})
        header.append(f"| {run.label} | `{run.path}` | {steps[0]}–{steps[-1]} ({len(steps)}) |")
    body = "\n".join(header) + "\n\n" + table + "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    summary = out / "summary.md"
    summary.write_text(body)
    return {"runs": runs, "plots": plots, "summary": summary, "table": table}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hapo-verl compare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="[LABEL=]PATH: verl file-logger JSONL, TensorBoard event file, or a directory of them; "
                             "differences are to the first run")
    parser.add_argument("--out", default="compare_out", help="directory for the PNGs and summary.md")
    args = parser.parse_args(argv)
    result = compare(args.runs, args.out)
    print(result["table"])
    for path in result["plots"]:
        print(f"[hapo-verl] plot: {path}")
    print(f"[hapo-verl] summary: {result['summary']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
