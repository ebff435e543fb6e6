"""``python -m hapo_verl.main``: verl's ``run_ppo`` with hapo-verl's trainer, as verl's ``main_ppo`` (Hydra).

    python -m hapo_verl.main [--config-name NAME] key=value ...      NAME: a config of hapo_verl/conf (default hapo)

The config is composed on verl's ``ppo_trainer`` (``pkg://verl.trainer.config``) and holds every key of the
algorithm with its default. With ``--config-path`` (a recipe directory) the package configs are available as
``<name>_base`` (:func:`hapo_verl.tools.recipes.register_base_configs`).
"""

from __future__ import annotations

import os
import sys

import hydra

from hapo_verl.launcher import run
from hapo_verl.tools.recipes import register_base_configs


@hydra.main(config_path="conf", config_name="hapo", version_base=None)
def main(config) -> None:
    run(config)


def hydra_main(argv: list[str]) -> None:
    """Run :func:`main` with ``argv`` as its command line (Hydra reads ``sys.argv``)."""
    if any(a in ("--config-path", "-cp") or a.startswith("--config-path=") for a in argv):
        register_base_configs()
    sys.argv = [sys.argv[0], *argv]
    main()


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    hydra_main(sys.argv[1:])
