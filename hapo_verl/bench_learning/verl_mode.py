"""``--engine verl``: the benchmark's configurations through verl's real trainer on CPU (Ray, FSDP2, hfcpu).

Each run is a subprocess ``python -m hapo_verl.bench_learning.verl_mode ...`` (verl resolves its platform
once per process and starts its own Ray cluster), which composes the method's config of ``hapo_verl/conf`` with
:func:`hapo_verl.launcher.compose` and runs :func:`hapo_verl.launcher.run`, like ``hapo-verl tiny``, but on the
benchmark's warmed-up checkpoint (the same start as the fast mode), its parquet files (training prompts in the
fast mode's order, ``data.shuffle=False``; the held-out prompts as validation set) and its task's reward function
(``compute_score`` of the task family, e.g. :func:`hapo_verl.tinyworld.countdown.compute_score`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from hapo_verl.tinyworld.tasks import family

from hapo_verl.bench_learning.methods import DAPO_REWARD, methods

#: per method: the packaged config and the overrides that turn it into the benchmark's configuration (the fast
#: engine's methods, :mod:`hapo_verl.bench_learning.methods`)
VERL_METHODS = methods()


def verl_overrides(method: str, task, model_dir: str, train_file: str, val_file: str, steps: int,
                   run_dir: str, rl, test_freq: int) -> tuple[str, list[str]]:
    from hapo_verl.cpu import cpu_overrides

    config_name, extra = VERL_METHODS[method]
    prompts = rl.prompts_per_step
    overrides = cpu_overrides(None) + [
        f"actor_rollout_ref.model.path={model_dir}",
        f"data.train_files={train_file}",
        f"data.val_files={val_file}",
        f"data.max_prompt_length={task.prompt_len + 8}",
        f"data.max_response_length={task.max_new_tokens}",
        "data.shuffle=False",
        f"reward.custom_reward_function.path=pkg://{family(task).__name__}",
        "reward.custom_reward_function.name=compute_score",
        f"data.train_batch_size={prompts}",
        "data.val_batch_size=500",
        f"actor_rollout_ref.rollout.n={rl.n}",
        f"actor_rollout_ref.rollout.temperature={rl.temperature}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={max(1, prompts // rl.ppo_mini_batches)}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={rl.micro_batch_size}",
        f"actor_rollout_ref.actor.ppo_epochs={rl.ppo_epochs}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={prompts * rl.n}",
        f"actor_rollout_ref.actor.optim.lr={rl.lr}",
        f"actor_rollout_ref.actor.optim.weight_decay={rl.weight_decay}",
        f"actor_rollout_ref.actor.grad_clip={rl.grad_clip}",
        "actor_rollout_ref.rollout.val_kwargs.do_sample=False",
        "trainer.logger=[console,file]",
        "trainer.val_before_train=True",
        f"trainer.test_freq={test_freq}",
        f"trainer.total_training_steps={steps}",
        "trainer.save_freq=-1",
        f"trainer.default_local_dir={os.path.join(run_dir, 'checkpoints')}",
        "trainer.project_name=hapo_bench_learning",
        f"trainer.experiment_name={method}",
    ]
    if config_name == "dapo" or DAPO_REWARD[0] in extra:  # DAPO's overlong shaping, at the task's length
        return config_name, overrides + extra + [f"reward.reward_kwargs.overlong_buffer_cfg.len={task.overlong_buffer}"]
    return config_name, overrides + extra


def _child(argv: list[str]) -> int:
    """Inside the subprocess: compose and run (the environment is already set by the parent)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--metrics", required=True)
    args, overrides = parser.parse_known_args(argv)
    from hapo_verl.launcher import compose, run

    overrides = [f'+ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH="{args.metrics}"', *overrides]
    run(compose(args.config, overrides))
    return 0


def run_verl(method: str, seed: int, task, model_dir: str, train_file: str, val_file: str,
             steps: int, out_dir: str, rl, test_freq: int | None = None, log=print, timeout: float = 3600) -> dict:
    """Run one method through verl's trainer; returns the record (also written to ``out_dir/{method}_s{seed}.json``)."""
    from hapo_verl.cpu import cpu_env

    run_dir = os.path.join(out_dir, f"{method}_s{seed}")
    os.makedirs(run_dir, exist_ok=True)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in ("metrics.jsonl", "trainer.log"):  # a re-run keeps the earlier attempt's files beside it
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            os.replace(path, os.path.join(run_dir, f"{name}.{stamp}"))
    test_freq = test_freq or max(1, steps // 2)
    config_name, overrides = verl_overrides(method, task, model_dir, train_file, val_file, steps, run_dir, rl,
                                            test_freq)
    env = {**os.environ, **cpu_env(), "RAY_USAGE_STATS_ENABLED": "0", "VERL_FILE_LOGGER_PATH": metrics_path,
           "OMP_NUM_THREADS": str(rl.threads)}
    cmd = [sys.executable, "-m", "hapo_verl.bench_learning.verl_mode", "--config", config_name,
           "--metrics", metrics_path, *overrides]
    log(f"[bench] verl {method} s{seed}: {steps} steps through verl's trainer (log {run_dir}/trainer.log)")
    start = time.time()
    with open(os.path.join(run_dir, "trainer.log"), "w") as out:
        proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, cwd=run_dir)
    seconds = time.time() - start
    record = parse_metrics(metrics_path)
    record.update({"mode": "verl", "method": method, "seed": seed, "steps": steps, "returncode": proc.returncode,
                   "seconds": round(seconds, 1), "config_name": config_name, "overrides": overrides,
                   "model_dir": model_dir, "run_dir": run_dir})
    with open(os.path.join(out_dir, f"{method}_s{seed}.json"), "w") as f:
        json.dump(record, f, indent=1)
    status = "ok" if proc.returncode == 0 else f"FAILED rc={proc.returncode}"
    log(f"[bench] verl {method} s{seed}: {status} in {seconds:.0f} s; val acc {record['evals']}")
    return record


def _val_key(row: dict) -> str | None:
    for key in row:
        if key.startswith("val-core/") and ("/acc/" in key or "/reward/" in key) and "mean@" in key:
            return key
    return None


def parse_metrics(path: str) -> dict:
    """verl's file logger JSONL -> {evals: [{step, acc}], history: [{step, score, entropy, response_length}]}."""
    evals, history = [], []
    if not os.path.exists(path):
        return {"evals": evals, "history": history}
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            step = int(row.get("step", 0))
            data = row.get("data", row)
            key = _val_key(data)
            if key is not None:
                evals.append({"step": step, "acc": float(data[key]), "key": key})
            if "critic/score/mean" in data:
                history.append({"step": step, "score": data.get("critic/score/mean"),
                                "entropy": data.get("actor/entropy"),
                                "response_length": data.get("response_length/mean"),
                                "step_time": data.get("timing_s/step")})
    # validation after the last step is logged with the step's metrics; before training with step 0
    evals.sort(key=lambda e: e["step"])
    return {"evals": evals, "history": history}


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
