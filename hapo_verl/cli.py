"""The ``hapo-verl`` command. A leaf: nothing in hapo_verl imports it.

    hapo-verl [train] [--config-name NAME] key=value ...        verl's trainer with hapo-verl (Hydra overrides);
                                                             NAME: a config of hapo_verl/conf (hapo, dapo, one
                                                             per registered algorithm)
    hapo-verl tiny [--config NAME] [--steps N] [key=value ...]
                                                             a tiny run on this machine's CPU through
                                                             verl's real trainer (model, data, reward made
                                                             locally at first run)
    hapo-verl train --recipe NAME [--recipes-dir DIR] [key=value ...]
                                                             a recipe of recipes/ (docs/recipes.md)
    hapo-verl recipes                                        list the recipes
    hapo-verl prepare-data [--out DIR] [--source SET=FILE]   DAPO-Math-17k + eval sets -> verl parquet
    hapo-verl compare RUN [RUN ...] [--out DIR]              plots + Markdown table from verl's logs
    hapo-verl submit --recipe NAME [--address URL] [--dry-run] [key=value ...]
                                                             a recipe as a Ray job (docs/gpu_cluster.md)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

TINY_DEFAULTS = [
    "data.train_batch_size=8",
    "data.val_batch_size=32",
    "actor_rollout_ref.rollout.n=4",
    "actor_rollout_ref.actor.ppo_mini_batch_size=8",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=32",
    "actor_rollout_ref.actor.optim.lr=1e-4",
    "actor_rollout_ref.rollout.val_kwargs.do_sample=False",
    "trainer.logger=[console,file]",
    "trainer.val_before_train=False",
    "trainer.test_freq=-1",
    "trainer.project_name=hapo_verl_tiny",
]


def tiny_overrides(config_name: str, steps: int, out_dir: str, user: list[str]) -> list[str]:
    from omegaconf import OmegaConf

    from hapo_verl.cpu import cpu_overrides, ensure_tiny_assets
    from hapo_verl.launcher import compose

    assets = ensure_tiny_assets()
    overrides = cpu_overrides(assets) + TINY_DEFAULTS + [
        f"trainer.total_training_steps={steps}",
        f"trainer.save_freq={steps}",
        f"trainer.default_local_dir={os.path.join(out_dir, 'checkpoints')}",
        f"trainer.experiment_name={config_name}",
    ]
    # the tiny task's reward is 0/1 and has no 'acc' field: dynamic sampling filters on the score; its answers
    # are short, so is the overlong buffer
    base = compose(config_name, list(user))
    if OmegaConf.select(base, "algorithm.filter_groups.enable"):
        overrides.append("algorithm.filter_groups.metric=reward")
    if OmegaConf.select(base, "reward.reward_kwargs.overlong_buffer_cfg.enable"):
        overrides.append("reward.reward_kwargs.overlong_buffer_cfg.len=4")
    return overrides + list(user)


SUMMARY_COLUMNS = [
    ("score", "critic/score/mean"),
    ("entropy", "actor/entropy"),
    ("h_hat mean", "hapo/h_hat/mean"),
    ("T min", "hapo/rollout/temperature_min"),
    ("T max", "hapo/rollout/temperature_max"),
    ("clipfrac", "actor/pg_clipfrac"),
    ("step s", "timing_s/step"),
]


def print_summary(metrics_path: str) -> None:
    """A compact per-step table of the metrics verl logged (the full lines scroll by during the run)."""
    import json

    if not os.path.exists(metrics_path):
        print(f"[hapo-verl] no metrics at {metrics_path}")
        return
    steps: dict[int, dict] = {}
    with open(metrics_path) as f:
        for line in f:
            record = json.loads(line)
            steps.setdefault(record["step"], {}).update(record["data"])
    print("\n[hapo-verl] per-step summary")
    print("step " + "".join(f"{name:>12s}" for name, _ in SUMMARY_COLUMNS))
    for step in sorted(steps):
        cells = []
        for _, key in SUMMARY_COLUMNS:
            value = steps[step].get(key)
            cells.append(f"{value:12.4f}" if isinstance(value, (int, float)) else f"{'-':>12s}")
        print(f"{step:4d} " + "".join(cells))


def run_tiny(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hapo-verl tiny", description="tiny HAPO/DAPO run on CPU")
    from hapo_verl.launcher import config_names

    parser.add_argument("--config", default="hapo", choices=config_names(),
                        help="a config of hapo_verl/conf (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=os.path.abspath("runs/tiny"), help="logs and checkpoints go here")
    args, user = parser.parse_known_args(argv)
    from hapo_verl.cpu import cpu_env

    os.environ.update(cpu_env())  # before verl is imported: its platform is resolved once per process
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    run_dir = os.path.join(args.out, args.config)
    os.makedirs(run_dir, exist_ok=True)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    os.environ["VERL_FILE_LOGGER_PATH"] = metrics_path
    user = [f'+ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH="{metrics_path}"', *user]
    from hapo_verl.launcher import compose, run

    config = compose(args.config, tiny_overrides(args.config, args.steps, run_dir, user))

    start = time.time()
    print(f"[hapo-verl] tiny {args.config} run on CPU: {args.steps} steps, output in {run_dir}", flush=True)
    run(config)
    elapsed = time.time() - start
    print_summary(metrics_path)
    print(f"\n[hapo-verl] done in {elapsed:.0f} s")
    print(f"[hapo-verl] metrics log (JSONL): {metrics_path}")
    print(f"[hapo-verl] checkpoint: {config.trainer.default_local_dir}/global_step_{args.steps}")
    return 0


def _pop_option(argv: list[str], name: str) -> str | None:
    """Remove ``--name VALUE`` / ``--name=VALUE`` from argv; return VALUE (None when absent)."""
    for i, item in enumerate(argv):
        if item == name:
            if i + 1 >= len(argv):
                raise SystemExit(f"hapo-verl: {name} needs a value")
            value = argv[i + 1]
            del argv[i:i + 2]
            return value
        if item.startswith(name + "="):
            del argv[i]
            return item.split("=", 1)[1]
    return None


def run_recipe(recipe: str, recipes_dir: str | None, overrides: list[str]) -> int:
    """``hapo-verl train --recipe NAME``: compose recipes/NAME.yaml (+ overrides) and run it."""
    from omegaconf import OmegaConf

    from hapo_verl.tools.recipes import compose_recipe, resolve_recipe

    config_dir, name = resolve_recipe(recipe, recipes_dir)
    raw = OmegaConf.load(config_dir / f"{name}.yaml")
    on_cpu = OmegaConf.select(raw, "trainer.device") == "cpu"
    if on_cpu:
        from hapo_verl.cpu import cpu_env, ensure_tiny_assets

        os.environ.update(cpu_env())  # before verl is imported: its platform is resolved once per process
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if OmegaConf.select(raw, "recipe.assets") is not None:
            ensure_tiny_assets()
    config = compose_recipe(name, overrides, config_dir)
    from hapo_verl.launcher import run

    print(f"[hapo-verl] recipe {name} ({config_dir / (name + '.yaml')})", flush=True)
    run(config)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "tiny":
        return run_tiny(argv[1:])
    if argv and argv[0] == "bench-learning":
        from hapo_verl.bench_learning import main as bench_learning_main

        return bench_learning_main(argv[1:])
    if argv and argv[0] == "compare":
        from hapo_verl.tools.compare import main as compare_main

        return compare_main(argv[1:])
    if argv and argv[0] == "prepare-data":
        from hapo_verl.tools.data import main as data_main

        return data_main(argv[1:])
    if argv and argv[0] == "submit":
        from hapo_verl.tools.ray_submit import main as submit_main

        return submit_main(argv[1:])
    if argv and argv[0] == "recipes":
        from hapo_verl.tools.recipes import list_recipes, recipes_dir

        print(f"# {recipes_dir()}")
        print("\n".join(list_recipes()))
        return 0
    if argv and argv[0] == "train":
        argv = argv[1:]
    recipe = _pop_option(argv, "--recipe")
    recipes_dir = _pop_option(argv, "--recipes-dir")
    if recipe is not None:
        return run_recipe(recipe, recipes_dir, argv)
    from hapo_verl.main import hydra_main

    hydra_main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
