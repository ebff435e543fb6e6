"""``hapo-verl bench-learning``: does HAPO beat DAPO at small scale? A CPU learning benchmark over seeds.

    hapo-verl bench-learning [--quick] [--task TASK] [--methods METHOD ...] [--seeds N ...]
                             [--engine fast|verl|both] [--out DIR] [--update-docs] [options]
    hapo-verl bench-learning --list-methods

Task, warm-up and modes: docs/learning_benchmark.md. Results: docs/results.md.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import sys
import time
from dataclasses import asdict
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hapo-verl bench-learning", description="Does HAPO beat DAPO at small scale? A CPU learning benchmark "
        "over seeds, every registered method (docs/learning_benchmark.md; results: docs/results.md).",
        usage="%(prog)s [--quick] [--task TASK] [--methods METHOD ...] [--seeds N ...]\n"
              "                                [--engine fast|verl|both] [--out DIR] [--update-docs] [options]")
    p.add_argument("--quick", action="store_true",
                   help="smoke check: seed 0, 4 steps of 8 prompts, 50 held-out prompts, a 30-step warm-up")
    p.add_argument("--engine", choices=["fast", "verl", "both"], default="fast")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="N")
    from hapo_verl.bench_learning.fast import METHOD_NAMES
    from hapo_verl.bench_learning.verl_mode import VERL_METHODS

    p.add_argument("--methods", nargs="+", default=None, choices=METHOD_NAMES, metavar="METHOD",
                   help="fast-mode methods (--list-methods; default: all but the algorithms' variants)")
    p.add_argument("--list-methods", action="store_true", help="print every method: config, overrides, label")
    p.add_argument("--verl-methods", nargs="+", default=None, choices=list(VERL_METHODS), metavar="METHOD")
    p.add_argument("--verl-seeds", type=int, nargs="+", default=None, metavar="N")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="fast-mode RL steps (default: the task's, addition 800, countdown 30; quick 4)")
    p.add_argument("--verl-steps", type=int, default=None, metavar="N", help="verl-mode RL steps (default 40, quick 2)")
    p.add_argument("--eval-every", type=int, default=None, metavar="N")
    from hapo_verl.tinyworld.tasks import TASK_NAMES

    p.add_argument("--task", choices=TASK_NAMES, default="addvar",
                   help="addvar/add: reversed addition (kinds); countdown: Countdown puzzles, multi-line responses")
    p.add_argument("--digits", type=int, default=None, metavar="N",
                   help="reversed addition's operand digits (default 3)")
    p.add_argument("--heldout", type=int, default=None, metavar="N", help="held-out prompts (default 500, quick 50)")
    p.add_argument("--target-acc", type=float, default=None, metavar="ACC",
                   help="warm-up stops at this check accuracy (default: the task's, addition 0.15, countdown 0.3)")
    p.add_argument("--lr", type=float, default=None,
                   help="RL learning rate (default: the task's, addition 1e-4, countdown 5e-5)")
    p.add_argument("--prompts", type=int, default=None, metavar="N",
                   help="prompts per RL step, n=8 samples each (default: the task's, 16)")
    p.add_argument("--mini-batches", type=int, default=None, metavar="N",
                   help="PPO mini-batches per step (default: the task's, addition 2, countdown 4)")
    p.add_argument("--epochs", type=int, default=None, metavar="N",
                   help="PPO epochs per step (default: the task's, addition 1, countdown 2)")
    p.add_argument("--task-report", action="store_true",
                   help="only measure the task on each seed's warm-up checkpoint (length, accuracy, entropy, vanilla "
                        "PPO clip fraction per --calibrate setting): OUT/task_report_<task>.{json,md}")
    p.add_argument("--calibrate", nargs="+", default=None, metavar="LR:MINI:EPOCHS",
                   help="--task-report: vanilla PPO settings to measure (default 1e-4:2:1 1e-4:2:2 1e-4:4:2)")
    p.add_argument("--calibrate-steps", type=int, default=8, metavar="N", help="--task-report: RL steps per setting")
    p.add_argument("--jobs", type=int, default=2, metavar="N",
                   help="fast-mode runs in parallel (processes, 1 thread each)")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="torch threads per run")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="run records (default runs/bench_learning, or runs/bench_learning_<task>)")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/hapo_verl/bench_learning"), metavar="DIR",
                   help="warm-up checkpoints (one per task and seed)")
    p.add_argument("--report", default=None, metavar="FILE",
                   help="the Markdown report (default: OUT/results.md; docs/results.md only with --update-docs)")
    p.add_argument("--update-docs", action="store_true",
                   help="regenerate the committed report docs/results.md and its plots docs/results/")
    p.add_argument("--plots", default=None, metavar="DIR", help="PNG directory (default: <report dir>/results)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from existing records")
    p.add_argument("--reproduce", action="store_true",
                   help="rerun each recorded cell's first evaluation interval and compare: OUT/reproduce.json")
    p.add_argument("--force", action="store_true",
                   help="re-run runs whose record exists (earlier records and logs are kept, suffixed with the time)")
    return p


#: the benchmark's settings on reversed addition; ``TASK_DEFAULTS`` holds where another task differs
BASE_DEFAULTS = {"target_acc": 0.15, "lr": 1e-4, "prompts": 16, "mini_batches": 2, "epochs": 1, "steps": 800,
                 "eval_every": 40, "warmup_max_steps": 3000}
#: Countdown, chosen with ``--task-report --calibrate`` and 30-step GRPO runs (docs/learning_benchmark.md): 4
#: mini-batches x 2 epochs so that the later updates of a step are off-policy and clipping acts (vanilla PPO clips
#: about 0.9% of the tokens early, 4% of the top-20%-entropy ones), at lr 5e-5, the setting that still learns
#: (more updates per step or a higher lr made held-out accuracy collapse)
TASK_DEFAULTS = {"countdown": {"target_acc": 0.3, "lr": 5e-5, "prompts": 16, "mini_batches": 4, "epochs": 2,
                               "steps": 30, "eval_every": 5, "warmup_max_steps": 1500}}




def quick_methods() -> list[str]:
    """``--quick``'s methods: the baselines, HAPO, and the first registered algorithm with a mini-batch pass and the
    first with a selection step (the fast engine's other code paths)."""
    from hapo_verl import registry

    first = lambda has: next((s.name for s in registry.specs() if has(s)), None)  # noqa: E731
    extra = [first(lambda s: s.minibatch_stats is not None), first(lambda s: s.selection is not None)]
    return ["grpo", "dapo", "hapo", *[m for m in extra if m]]

#: ``--quick``'s settings, whatever the task: a smoke check of every code path, not a measurement
QUICK = {"prompts": 8, "mini_batches": 2, "epochs": 1, "steps": 4, "eval_every": 2}
#: the grid's seeds: SEEDS_MAIN for the methods of the paper's comparison, SEEDS for every other
MAIN_METHODS = ("grpo", "dapo", "hapo", "hapo_ds")
SEEDS_MAIN, SEEDS = 5, 3


def task_defaults(task_name: str) -> dict:
    return {**BASE_DEFAULTS, **TASK_DEFAULTS.get(task_name, {})}


def _settings(args):
    from hapo_verl.bench_learning.fast import RLConfig
    from hapo_verl.bench_learning.warmup import WarmupSettings
    from hapo_verl.tinyworld.tasks import make_task

    q = args.quick
    d = {**task_defaults(args.task), **(QUICK if q else {})}
    options = {"num_heldout": args.heldout or (50 if q else 500)}
    if args.task in ("add", "addvar"):
        options["digits"] = 3 if args.digits is None else args.digits
    task = make_task(args.task, **options)
    steps = args.steps or d["steps"]
    pick = lambda value, key: d[key] if value is None else value  # noqa: E731
    rl = RLConfig(steps=steps, lr=pick(args.lr, "lr"), prompts_per_step=pick(args.prompts, "prompts"),
                  ppo_mini_batches=pick(args.mini_batches, "mini_batches"), ppo_epochs=pick(args.epochs, "epochs"),
                  eval_every=args.eval_every or d["eval_every"], threads=args.threads)
    warm = WarmupSettings(target_accuracy=pick(args.target_acc, "target_acc"),
                          max_steps=30 if q else d["warmup_max_steps"])
    from hapo_verl.bench_learning.fast import GRID_METHODS

    methods = args.methods or (quick_methods() if q else list(GRID_METHODS))
    if args.seeds is not None:
        cells = [(m, s) for s in args.seeds for m in methods]
    elif q:
        cells = [(m, 0) for m in methods]
    else:  # the grid: more seeds for the comparisons the paper makes
        cells = [(m, s) for s in range(max(SEEDS_MAIN, SEEDS)) for m in methods
                 if s < (SEEDS_MAIN if m in MAIN_METHODS else SEEDS)]
    seeds = sorted({s for _, s in cells})
    verl_methods = args.verl_methods or (["hapo"] if q else ["dapo", "hapo"])
    verl_seeds = args.verl_seeds if args.verl_seeds is not None else seeds[:1]
    verl_steps = args.verl_steps or (2 if q else 40)
    return task, rl, warm, cells, seeds, methods, verl_methods, verl_seeds, verl_steps


def _warm_job(cache, task, seed, warm, threads):
    from hapo_verl.bench_learning.warmup import ensure_warm_checkpoint

    return ensure_warm_checkpoint(cache, task, seed, warm, threads=threads)


def _reproduce_job(model_dir, task, method, seed, rl, record):
    from hapo_verl.bench_learning.fast import run_fast

    first = next(e for e in record["evals"] if e["step"] > 0)
    rec = run_fast(model_dir, task, method, seed, rl, stop_after=first["step"], log=lambda *a: None)
    return {"method": method, "seed": seed, "step": first["step"], "recorded": first["acc"],
            "rerun": rec["evals"][-1]["acc"]}


def _reproduce(args, task, rl, cells, warmups, fast_dir) -> int:
    """``--reproduce``: the first evaluation interval of each recorded cell, rerun and compared."""
    jobs = []
    for method, seed in cells:
        path = os.path.join(fast_dir, f"{method}_s{seed}.json")
        record = _load_json(path)
        if record is None or record["rl"] != asdict(rl):
            print(f"[bench] reproduce {method} s{seed}: no record with these settings, skipped", flush=True)
            continue
        jobs.append((warmups[seed][0], task, method, seed, rl, record))
    with _pool(args.jobs) as pool:
        rows = [f.result() for f in [pool.submit(_reproduce_job, *job) for job in jobs]]
    out = os.path.join(args.out, "reproduce.json")
    earlier = {(r["method"], r["seed"]): r for r in (_load_json(out) or [])}
    earlier.update({(r["method"], r["seed"]): r for r in rows})
    with open(out, "w") as f:
        json.dump(list(earlier.values()), f, indent=1)
    for r in rows:
        print(f"[bench] reproduce {r['method']} s{r['seed']} step {r['step']}: recorded {r['recorded']:.4f}, "
              f"rerun {r['rerun']:.4f} {'equal' if r['recorded'] == r['rerun'] else 'DIFFERENT'}", flush=True)
    return 0 if all(r["recorded"] == r["rerun"] for r in rows) else 1


def _fast_job(model_dir, task, method, seed, rl, path):
    from hapo_verl.bench_learning.fast import run_fast

    rec = run_fast(model_dir, task, method, seed, rl, out_path=path)
    return method, seed, rec["seconds"], rec["evals"][-1]["acc"]


def _write_parquet(path: str, rows: list[dict]) -> str:
    import pandas as pd

    os.makedirs(os.path.dirname(path), exist_ok=True)
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def _load_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _keep_aside(path: str) -> str:
    """Move an earlier record out of the way (never delete it): ``<name>.json.<time>``."""
    aside = f"{path}.{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(path, aside)
    return aside


def _pool(jobs):
    return ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"))


#: the checkout's docs, where ``--update-docs`` (and only it) writes the committed reports
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs")
#: the committed report of each task that has one (its plots, summary and records: the same name without .md)
DOCS_REPORTS = {"countdown": "results.md", "addvar": "results_addition.md"}


def docs_report(task_name: str, parser) -> str:
    if task_name not in DOCS_REPORTS:
        parser.error(f"--update-docs: --task {task_name} has no committed report (those that do: "
                     f"{', '.join(DOCS_REPORTS)})")
    return os.path.join(DOCS, DOCS_REPORTS[task_name])


def default_out(task_name: str) -> str:
    """Records of reversed addition (the default task) in runs/bench_learning, of another task beside it."""
    return os.path.abspath("runs/bench_learning" + ("" if task_name == "addvar" else f"_{task_name}"))


def report_path(args, parser) -> str:
    """Where the report goes: OUT/results.md by default; the task's committed report in docs/ only when asked for."""
    if args.update_docs:
        committed = docs_report(args.task, parser)
        if args.report is not None and os.path.abspath(args.report) != committed:
            parser.error(f"--update-docs writes {committed}: drop --report")
        if not os.path.isfile(os.path.join(DOCS, "learning_benchmark.md")):
            parser.error(f"--update-docs regenerates a checkout's committed report; there is no checkout at {DOCS}")
        return committed
    report = os.path.abspath(args.report or os.path.join(args.out or default_out(args.task), "results.md"))
    if os.path.basename(os.path.dirname(report)) == "docs" and os.path.basename(report) in DOCS_REPORTS.values():
        parser.error(f"--report {args.report} would overwrite a committed report: add --update-docs to regenerate "
                     "it, or write elsewhere (default OUT/results.md)")
    return report


def _task_report(args, task, rl, warmups: dict) -> int:
    """``--task-report``: measure each seed's checkpoint one after the other (see :mod:`.task_report`)."""
    from hapo_verl.bench_learning import task_report

    candidates = ([task_report.Candidate.parse(c) for c in args.calibrate] if args.calibrate
                  else task_report.DEFAULT_CANDIDATES)
    reports = []
    for seed, (model_dir, outcome) in sorted(warmups.items()):
        rep = task_report.measure(model_dir, task, seed, rl, candidates, rl_steps=args.calibrate_steps)
        rep["warmup"] = {k: outcome[k] for k in ("steps", "seconds", "check_accuracy", "reached_target")}
        reports.append(rep)
    base = os.path.join(args.out, f"task_report_{args.task}")
    os.makedirs(args.out, exist_ok=True)
    task_report.write(base + ".json", reports)
    text = task_report.markdown(reports)
    with open(base + ".md", "w") as f:
        f.write(text + "\n")
    print(text, flush=True)
    print(f"[bench] task report {base}.json / .md", flush=True)
    return 0


def _list_methods() -> int:
    from hapo_verl.bench_learning.fast import GRID_METHODS
    from hapo_verl.bench_learning.methods import label, methods

    for name, (config_name, overrides) in methods().items():
        where = "" if name in GRID_METHODS else "  [on request]"
        print(f"{name:<16} {label(name)}{where}\n{'':<16} --config {config_name} {' '.join(overrides)}".rstrip())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list_methods:
        return _list_methods()
    args.out = os.path.abspath(args.out or default_out(args.task))  # the verl runs work in their own directory
    if args.digits is not None and args.task not in ("add", "addvar"):
        parser.error(f"--digits is a reversed-addition option; --task {args.task} has none")
    args.report = report_path(args, parser)
    task, rl, warm, cells, seeds, methods, verl_methods, verl_seeds, verl_steps = _settings(args)
    fast_dir, verl_dir = os.path.join(args.out, "fast"), os.path.join(args.out, "verl")
    os.makedirs(fast_dir, exist_ok=True)
    plots_dir = args.plots or os.path.splitext(os.path.abspath(args.report))[0]
    t0 = time.time()
    warmups = {}
    if not args.report_only:
        need_seeds = sorted(set(seeds) | (set(verl_seeds) if args.engine != "fast" else set()))
        print(f"[bench] task {task.to_dict()}; seeds {need_seeds}; warm-up target {warm.target_accuracy}", flush=True)
        if args.jobs > 1 and len(need_seeds) > 1:
            with _pool(args.jobs) as pool:
                futs = {s: pool.submit(_warm_job, args.cache, task, s, warm, args.threads) for s in need_seeds}
                warmups = {s: f.result() for s, f in futs.items()}
        else:
            warmups = {s: _warm_job(args.cache, task, s, warm, args.threads) for s in need_seeds}
        if args.task_report:
            return _task_report(args, task, rl, {s: warmups[s] for s in seeds})
        if args.reproduce:
            return _reproduce(args, task, rl, cells, warmups, fast_dir)

        if args.engine in ("fast", "both"):
            todo = []
            for method, seed in cells:
                path = os.path.join(fast_dir, f"{method}_s{seed}.json")
                if os.path.exists(path):
                    with open(path) as f:
                        done = json.load(f)
                    if done["rl"] == asdict(rl) and done.get("task") == task.to_dict() and not args.force:
                        print(f"[bench] {method} s{seed}: record exists, skipped", flush=True)
                        continue
                    print(f"[bench] {method} s{seed}: the earlier record is kept as {_keep_aside(path)}; the cell "
                          "runs again", flush=True)
                todo.append((warmups[seed][0], task, method, seed, rl, path))
            if args.jobs > 1 and len(todo) > 1:
                with _pool(args.jobs) as pool:
                    for job, fut in [(job, pool.submit(_fast_job, *job)) for job in todo]:
                        try:
                            m, s, secs, acc = fut.result()
                        except Exception as exc:  # one failed cell must not lose the others; it stays missing
                            print(f"[bench] FAILED {job[2]} s{job[3]}: {exc!r}", flush=True)
                            continue
                        print(f"[bench] done {m} s{s}: {secs:.0f} s, last acc {acc:.3f}", flush=True)
            else:
                for job in todo:
                    m, s, secs, acc = _fast_job(*job)
                    print(f"[bench] done {m} s{s}: {secs:.0f} s, last acc {acc:.3f}", flush=True)

        if args.engine in ("verl", "both"):
            from hapo_verl.bench_learning.verl_mode import run_verl
            from hapo_verl.tinyworld.tasks import family

            tasks = family(task)

            os.makedirs(verl_dir, exist_ok=True)
            for seed in verl_seeds:
                n_train = (verl_steps + 2) * rl.prompts_per_step * rl.max_gen_batches
                data_dir = os.path.join(args.out, "data", f"seed{seed}")
                train = _write_parquet(os.path.join(data_dir, "train.parquet"),
                                       tasks.rl_rows(task, tasks.ProblemSampler(task, seed).sample(n_train), "train"))
                val = _write_parquet(os.path.join(data_dir, "heldout.parquet"),
                                     tasks.rl_rows(task, tasks.heldout_problems(task), "heldout"))
                for method in verl_methods:
                    record_path = os.path.join(verl_dir, f"{method}_s{seed}.json")
                    if os.path.exists(record_path) and not args.force:
                        with open(record_path) as f:
                            done = json.load(f)
                        if done.get("returncode") == 0 and done.get("steps") == verl_steps:
                            print(f"[bench] verl {method} s{seed}: record exists, skipped", flush=True)
                            continue
                    run_verl(method, seed, task, warmups[seed][0], train, val, verl_steps, verl_dir, rl,
                             test_freq=max(1, verl_steps // 4) if verl_steps >= 8 else verl_steps)

    from hapo_verl.bench_learning import report

    fast_runs = report.load_runs(fast_dir)
    verl_runs = report.load_runs(verl_dir) if os.path.isdir(verl_dir) else []
    expected = set(cells)
    have = {(r["method"], r["seed"]) for r in fast_runs if r["rl"] == asdict(rl)}
    missing = sorted(expected - have)
    status = ("complete" if not missing else
              f"**PARTIAL**: missing fast runs {', '.join(f'{m} s{s}' for m, s in missing)}")
    from hapo_verl.bench_learning.warmup import checkpoint_dir

    warm_list = []
    for seed in sorted(set(seeds) | set(verl_seeds)):
        path = checkpoint_dir(args.cache, task, warm, seed) / "warmup.json"
        if path.is_file():
            warm_list.append(json.loads(path.read_text()))
    cmd = "hapo-verl bench-learning " + " ".join(argv if argv is not None else sys.argv[1:])
    header = "\n".join([
        f"# Learning benchmark results (CPU, {task.kind}): every method of the registry",
        "",
        f"Generated by `{cmd.strip()}` on {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} "
        "(method and set-up: [learning_benchmark.md](learning_benchmark.md)).",
        "",
        f"- Grid status: {status}.",
        f"- Task: {task.describe()}.",
        f"- RL: {rl.steps} steps × {rl.prompts_per_step} prompts × n={rl.n}, lr {rl.lr}, {rl.ppo_mini_batches} "
        f"mini-batches per step{'' if rl.ppo_epochs == 1 else f' × {rl.ppo_epochs} epochs'}, micro-batch "
        f"{rl.micro_batch_size}, eval every {rl.eval_every} steps; seeds {seeds} ({SEEDS_MAIN} for "
        f"{', '.join(MAIN_METHODS)} and {SEEDS} for every other method in the grid).",
        f"- Cells: {len(have & expected)} of {len(expected)} ({len(methods)} methods); each cell is one process "
        "thread, `--jobs` cells at a time; the exact command of each cell is in `results/summary.json`.",
        f"- Warm-up: SFT until greedy check accuracy ≥ {warm.target_accuracy} (cap {warm.max_steps} steps), one "
        "checkpoint per seed shared by every method and by the verl runs.",
    ])
    pngs = report.plots(fast_runs, plots_dir, verl_runs) if fast_runs else []
    task_reports = _load_json(os.path.join(args.out, f"task_report_{args.task}.json"))
    findings = os.path.join(plots_dir, "findings.md")  # written by hand from the records, kept across regenerations
    report.write_report(args.report, fast_runs, verl_runs, pngs, header, warmups=warm_list,
                        task_reports=task_reports, reproduced=_load_json(os.path.join(args.out, "reproduce.json")),
                        findings=open(findings).read() if os.path.isfile(findings) else None)
    if fast_runs:
        os.makedirs(plots_dir, exist_ok=True)
        with open(os.path.join(plots_dir, "summary.json"), "w") as f:
            json.dump(report.summary(fast_runs), f, indent=1)
        with gzip.open(os.path.join(plots_dir, f"records_{args.task}.json.gz"), "wt") as f:
            json.dump({"fast": fast_runs, "verl": verl_runs}, f)
        print(f"[bench] summary {plots_dir}/summary.json, records {plots_dir}/records_{args.task}.json.gz", flush=True)
    print(f"[bench] report {args.report}, plots {plots_dir} ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
