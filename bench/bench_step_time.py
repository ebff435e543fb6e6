"""Median step time on the tiny CPU run, side by side in one invocation, rounds interleaved.

    .venv/bin/python bench/bench_step_time.py [--steps 6] [--rounds 2] [--runs grpo_verl grpo hapo dapo]

Runs (same data, seed, batch and number of samples per step, except DAPO which regenerates batches):
- ``grpo_verl``: GRPO through verl's own ``PPOTrainerSync`` (verl's TaskRunner; no hapo-verl trainer);
- ``grpo``: the same GRPO configuration through hapo-verl's trainer (an algorithm that needs nothing from the old
  policy: the generic trainer should cost nothing measurable);
- ``hapo``: HAPO (all four components) through hapo-verl's trainer;
- ``dapo``: the DAPO configuration (dynamic sampling regenerates batches; for reference only).

Compares the median of verl's ``timing_s/step`` over steps 2..N of every round (step 1 carries start-up work).
Targets: grpo / grpo_verl ~ 1.00, hapo / grpo <= 1.05.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

#: run name -> (config of hapo_verl/conf, overrides, trainer: "hapo_verl" or "verl")
GRPO = ["algorithm.filter_groups.enable=false", "reward.reward_kwargs.overlong_buffer_cfg.enable=false",
        "actor_rollout_ref.actor.clip_ratio_high=0.2"]
RUNS = {
    "grpo_verl": ("dapo", GRPO, "verl"),
    "grpo": ("dapo", GRPO, "hapo_verl"),
    "hapo": ("hapo", [], "hapo_verl"),
    "dapo": ("dapo", [], "hapo_verl"),
}
KEYS = ("timing_s/step", "timing_s/gen", "timing_s/old_log_prob", "timing_s/adv", "timing_s/update_actor")


def child(run: str, steps: int, out: str) -> None:
    """In a fresh process: compose the tiny run and train it with the chosen trainer."""
    from hapo_verl.cpu import cpu_env

    os.environ.update(cpu_env())  # before verl is imported
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from hapo_verl.cli import tiny_overrides
    from hapo_verl.launcher import compose, run as run_hapo_verl, validate

    config_name, extra, trainer = RUNS[run]
    metrics_path = os.path.join(out, run, "metrics.jsonl")
    os.makedirs(os.path.dirname(metrics_path), exist_ok=True)
    os.environ["VERL_FILE_LOGGER_PATH"] = metrics_path
    user = [f'+ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH="{metrics_path}"',
            "trainer.save_freq=-1", *extra]
    config = compose(config_name, tiny_overrides(config_name, steps, os.path.join(out, run), user))
    if trainer == "verl":
        from verl.trainer.main_ppo import TaskRunnerV1, run_ppo

        validate(config)
        run_ppo(config, task_runner_class=TaskRunnerV1)  # verl's own TaskRunner and PPOTrainerSync
    else:
        run_hapo_verl(config)


def run(name: str, steps: int, out: str) -> dict[int, dict]:
    cmd = [sys.executable, __file__, "--child", name, "--steps", str(steps), "--out", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, start_new_session=True,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    if proc.returncode != 0:
        raise SystemExit(f"{name} run failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    metrics: dict[int, dict] = {}
    with open(os.path.join(out, name, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            metrics.setdefault(rec["step"], {}).update(rec["data"])
    return metrics


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", nargs="+", default=["grpo_verl", "grpo", "hapo"], choices=list(RUNS))
    parser.add_argument("--child", choices=list(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.out)
        return
    samples = {name: {} for name in args.runs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in args.runs:
                metrics = run(name, args.steps, os.path.join(tmp, f"round{r}"))
                for step, m in metrics.items():
                    if step == 1:
                        continue
                    for key in KEYS:
                        if key in m:
                            samples[name].setdefault(key, []).append(m[key])
    print(f"tiny CPU run, {args.rounds} rounds x {args.steps} steps, steps 2..{args.steps} of each round; "
          "median seconds")
    print(f"{'timing':24s}" + "".join(f"{name:>11s}" for name in args.runs))
    for key in KEYS:
        cells = [statistics.median(samples[n][key]) if samples[n].get(key) else float("nan") for n in args.runs]
        print(f"{key:24s}" + "".join(f"{c:11.3f}" for c in cells))
    step = {n: statistics.median(samples[n]["timing_s/step"]) for n in args.runs}
    for a, b, target in (("grpo", "grpo_verl", "~1.00"), ("hapo", "grpo", "<= 1.05"), ("dapo", "grpo", "-")):
        if a in step and b in step:
            print(f"median step time ratio {a} / {b} = {step[a] / step[b]:.3f}   (target {target})")


if __name__ == "__main__":
    main()
