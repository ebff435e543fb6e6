"""The ``hapo-verl`` command: one subcommand per job (:data:`COMMANDS`). A leaf: nothing in hapo_verl imports it.

``hapo-verl`` and ``hapo-verl --help`` list the subcommands; ``hapo-verl COMMAND --help`` shows one's options.
A first argument that is a Hydra override (``key=value``, ``--config-name``) means ``train``, as before.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

#: subcommand -> (one line, an example). The order is the order of ``hapo-verl --help``.
COMMANDS: dict[str, tuple[str, str]] = {
    "tiny": ("a tiny run on this machine's CPU through verl's real trainer (model and data made locally)",
             "hapo-verl tiny --config dapo --steps 4"),
    "train": ("verl's trainer with hapo-verl: a config of hapo_verl/conf or a recipe, plus key=value overrides",
              "hapo-verl train --config-name hapo data.train_files=train.parquet ..."),
    "recipes": ("list the recipes (recipes/*.yaml)", "hapo-verl recipes"),
    "prepare-data": ("DAPO-Math-17k and the evaluation sets as verl parquet files",
                     "hapo-verl prepare-data --out data/hapo"),
    "compare": ("plots and a Markdown table from the metrics of several runs",
                "hapo-verl compare runs/tiny/hapo runs/tiny/dapo --out runs/compare"),
    "submit": ("send a recipe to a Ray cluster as a job (outputs under $HAPO_OUTPUT_DIR, on shared storage)",
               "HAPO_OUTPUT_DIR=/shared/runs hapo-verl submit --recipe qwen2.5_math_7b_hapo --dry-run"),
    "bench-learning": ("HAPO against baselines over seeds on a CPU task (learning curves, report)",
                       "hapo-verl bench-learning --quick"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: hapo-verl COMMAND [options] [key=value ...]", "",
             "HAPO and token-entropy-aware RL algorithms on verl's trainer.", "", "commands:"]
    for name, (summary, example) in COMMANDS.items():
        lines.append(f"  {name:<{width}}  {summary}")
        lines.append(f"  {'':<{width}}    e.g. {example}")
    lines += ["", "hapo-verl COMMAND --help shows a command's options. Documentation: README.md and docs/."]
    return "\n".join(lines)


def unknown_command(word: str) -> int:
    import difflib

    close = difflib.get_close_matches(word, list(COMMANDS), n=1, cutoff=0.5)
    hint = f", did you mean {close[0]!r}?" if close else f"; commands: {', '.join(COMMANDS)}"
    print(f"hapo-verl: unknown subcommand {word!r}{hint} (hapo-verl --help lists them)", file=sys.stderr)
    return 2


def is_override(arg: str) -> bool:
    """A Hydra command-line override: ``key=value``, ``+key=value``, ``++key=value``, ``~key``."""
    return not arg.startswith("-") and ("=" in arg or arg.startswith("~"))


TINY_DEFAULTS = [
    "data.train_batch_size=8",
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
        "trainer.output_dir=null",  # --out decides (HAPO_OUTPUT_DIR is for train and submit)
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


def tiny_parser() -> argparse.ArgumentParser:
    from hapo_verl.conf import config_names

    names = config_names()
    parser = argparse.ArgumentParser(
        prog="hapo-verl tiny", formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="hapo-verl tiny [--config NAME] [--steps N] [--out DIR] [--verbose] [key=value ...]",
        description="A tiny run on this machine's CPU through verl's real trainer: a small model, tokenizer and "
                    "arithmetic task are made locally on first use. A rerun continues from the run's checkpoint; "
                    "metrics are appended, never overwritten.",
        epilog="configs (hapo_verl/conf): " + ", ".join(names) + "\n\n"
               "Any verl or algorithm key can be overridden with key=value, e.g.\n"
               "  hapo-verl tiny --config hapo hapo.temperature_tau=0.1 actor_rollout_ref.actor.optim.lr=5e-5\n"
               "  hapo-verl tiny --steps 8        # continues runs/tiny/hapo from its last checkpoint to step 8\n"
               "Every key, its default and range: docs/configuration.md.")
    parser.add_argument("--config", default="hapo", choices=names, metavar="NAME",
                        help="a config of hapo_verl/conf (default: %(default)s; list below)")
    parser.add_argument("--steps", type=int, default=4, help="train up to this step (default: %(default)s)")
    parser.add_argument("--out", default=os.path.abspath("runs/tiny"),
                        help="logs and checkpoints go to OUT/NAME (default: %(default)s)")
    parser.add_argument("--verbose", action="store_true",
                        help="show every warning of verl, Ray and torch (hidden by default when a user cannot "
                             "act on them)")
    return parser


def parse_known_overrides(parser: argparse.ArgumentParser, argv: list[str]):
    """``parser``'s options plus Hydra overrides; anything else (a mistyped option) is an error with a hint."""
    import difflib

    args, rest = parser.parse_known_args(argv)
    for arg in rest:
        if not is_override(arg):
            options = [o for action in parser._actions for o in action.option_strings]
            close = difflib.get_close_matches(arg.split("=", 1)[0], options, n=1)
            parser.error(f"unknown argument {arg!r}" + (f", did you mean {close[0]}?" if close else
                                                        " (overrides are key=value)"))
    return args, rest


def run_tiny(argv: list[str]) -> int:
    parser = tiny_parser()
    args, user = parse_known_overrides(parser, argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    from hapo_verl.console import set_console
    from hapo_verl.cpu import cpu_env

    set_console(args.verbose)
    os.environ.update(cpu_env())  # before verl is imported: its platform is resolved once per process
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    run_dir = os.path.join(args.out, args.config)
    os.makedirs(run_dir, exist_ok=True)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    os.environ["VERL_FILE_LOGGER_PATH"] = metrics_path
    user = [f'+ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH="{metrics_path}"', *user]
    from hapo_verl.launcher import compose, run

    config = compose(args.config, tiny_overrides(args.config, args.steps, run_dir, user))

    from hapo_verl.launcher import resume_step

    done = resume_step(config)
    if done is not None and done >= args.steps:
        print(f"[hapo-verl] nothing to train: {run_dir} already has {done} steps (--steps {args.steps}); its "
              f"summary is below. --steps {done + args.steps} continues it, --out DIR starts a new run.")
        print_summary(metrics_path)
        return 0
    start = time.time()
    what = f"steps {done + 1}..{args.steps} (resuming from its checkpoint)" if done else f"{args.steps} steps"
    print(f"[hapo-verl] tiny {args.config} run on CPU: {what}, output in {run_dir}", flush=True)
    run(config)
    elapsed = time.time() - start
    print_summary(metrics_path)
    print(f"\n[hapo-verl] done in {elapsed:.0f} s")
    print(f"[hapo-verl] metrics log (JSONL): {metrics_path}")
    print(f"[hapo-verl] checkpoint: {config.trainer.default_local_dir}/global_step_{args.steps}")
    return 0


def _pop_flag(argv: list[str], name: str) -> bool:
    """Remove every ``name`` from argv; True when there was one."""
    found = name in argv
    argv[:] = [a for a in argv if a != name]
    return found


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


TRAIN_HELP = """usage: hapo-verl train [--config-name NAME | --recipe NAME [--recipes-dir DIR]] [key=value ...]

Composes verl's ppo_trainer config with every key of the algorithm, checks it before Ray starts, and runs verl's
run_ppo with hapo-verl's trainer. Hydra's own options (--cfg job, --info, -m) work as with verl's main_ppo.

  --config-name NAME   a config of hapo_verl/conf (default hapo):
                       {names}
  --recipe NAME        a recipe of recipes/ (hapo-verl recipes lists them)
  --recipes-dir DIR    look for the recipe there
  --verbose            show every warning of verl, Ray and torch, and verl's config dump

With trainer.output_dir (or $HAPO_OUTPUT_DIR) set, every output goes under <output_dir>/<project>/<experiment>/.
The parquet columns and the reward function your data needs: README.md, "Using it in a verl job".

examples:
  hapo-verl train data.train_files=$PWD/train.parquet data.val_files=$PWD/val.parquet \\
      actor_rollout_ref.model.path=Qwen/Qwen2.5-Math-1.5B actor_rollout_ref.rollout.name=vllm \\
      actor_rollout_ref.rollout.n=8 actor_rollout_ref.actor.ppo_mini_batch_size=32 \\
      actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \\
      actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8 trainer.n_gpus_per_node=8
  hapo-verl train --config-name dapo ...        the DAPO baseline
  hapo-verl train --recipe qwen2.5_math_7b_hapo
  hapo-verl train --cfg job ...                 print the composed config and stop

Every key, its default and range: docs/configuration.md."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command = argv[0]
    if command not in COMMANDS and not is_override(command) and not command.startswith("-"):
        return unknown_command(command)  # an option or override first means train (Hydra), as before
    if command == "tiny":
        return run_tiny(argv[1:])
    if command == "bench-learning":
        from hapo_verl.bench_learning import main as bench_learning_main

        return bench_learning_main(argv[1:])
    if command == "compare":
        from hapo_verl.tools.compare import main as compare_main

        return compare_main(argv[1:])
    if command == "prepare-data":
        from hapo_verl.tools.data import main as data_main

        return data_main(argv[1:])
    if command == "submit":
        from hapo_verl.tools.ray_submit import main as submit_main

        return submit_main(argv[1:])
    if command == "recipes":
        from hapo_verl.tools.recipes import list_recipes, recipes_dir

        if len(argv) > 1:
            print("usage: hapo-verl recipes\n\nLists the recipes of recipes/ (run one with hapo-verl train --recipe "
                  "NAME, or send it to a cluster with hapo-verl submit --recipe NAME).")
            return 0 if argv[1] in ("-h", "--help") else 2

        print(f"# {recipes_dir()}")
        print("\n".join(list_recipes()))
        return 0
    if argv and argv[0] == "train":
        argv = argv[1:]
    from hapo_verl.console import set_console

    set_console(_pop_flag(argv, "--verbose"))
    if any(a in ("-h", "--help") for a in argv):
        from hapo_verl.conf import config_names

        import textwrap

        names = textwrap.fill(", ".join(config_names()), width=92, subsequent_indent=" " * 23)
        print(TRAIN_HELP.format(names=names))
        return 0
    recipe = _pop_option(argv, "--recipe")
    recipes_dir = _pop_option(argv, "--recipes-dir")
    if recipe is not None:
        return run_recipe(recipe, recipes_dir, argv)
    from hapo_verl.main import hydra_main

    hydra_main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
