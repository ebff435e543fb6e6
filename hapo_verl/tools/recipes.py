"""The Hydra recipes in ``recipes/``: where they are, their names, composing and validating one.

A recipe is ``recipes/<name>.yaml`` composed on one of our configs (``hapo_verl/conf/<config>.yaml``) with the
groups ``recipes/common`` and ``recipes/model``. Hydra refuses ``hydra.searchpath`` in any config but the primary
one, and the package configs carry theirs (they are primary configs of ``python -m hapo_verl.main``), so recipes
name them ``<config>_base`` (``hapo_base``, ``dapo_base``, ...): the same files, read from the installed package
without their ``hydra`` block and registered in Hydra's ConfigStore by :func:`register_base_configs` (done by
``hapo-verl train`` and by :func:`compose_recipe`), together with the group they share (``base/common``). The recipes' own search path adds ``pkg://verl.trainer.config`` for
``ppo_trainer``. The directory is found, in order, from ``--recipes-dir``, ``$HAPO_VERL_RECIPES``,
``./recipes`` (e.g. the working directory of a Ray job) and the source checkout next to the package.
"""

from __future__ import annotations

import os
from pathlib import Path

RECIPES_ENV = "HAPO_VERL_RECIPES"
#: the group of hapo_verl/conf shared by every algorithm config
SHARED_GROUP = "base"
#: experiment files are <model>_<variant>.yaml; the groups live in these sub-directories
GROUP_DIRS = ("common", "model")


def register_base_configs() -> None:
    """Store every hapo_verl/conf/<config>.yaml, minus ``hydra``, as ``<config>_base``, and the shared groups of
    hapo_verl/conf/<group>/ under their names (idempotent)."""
    from importlib import resources

    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    store = ConfigStore.instance()
    root = resources.files("hapo_verl.conf")
    for entry in root.iterdir():
        if entry.name.endswith(".yaml") and entry.is_file():
            node = OmegaConf.create(entry.read_text())
            node.pop("hydra", None)
            store.store(name=f"{entry.name[:-5]}_base", node=node, provider="hapo_verl")
    group_dir = root.joinpath(SHARED_GROUP)
    for entry in group_dir.iterdir():
        if entry.name.endswith(".yaml"):
            # the file's "# @package _global_" header is a comment the node does not keep: say it here
            store.store(group=SHARED_GROUP, name=entry.name[:-5], node=OmegaConf.create(entry.read_text()),
                        package="_global_", provider="hapo_verl")


def recipes_dir(explicit: str | os.PathLike | None = None) -> Path:
    candidates = []
    if explicit:
        candidates.append(Path(explicit))
    if os.environ.get(RECIPES_ENV):
        candidates.append(Path(os.environ[RECIPES_ENV]))
    candidates.append(Path.cwd() / "recipes")
    candidates.append(Path(__file__).resolve().parents[2] / "recipes")
    for path in candidates:
        if path.is_dir() and any(path.glob("*.yaml")):
            return path.resolve()
    if explicit:
        raise FileNotFoundError(f"recipes directory not found: {explicit}")
    raise FileNotFoundError(
        "recipes directory not found: pass --recipes-dir, set $HAPO_VERL_RECIPES or run from the hapo-verl checkout"
    )


def list_recipes(directory: str | os.PathLike | None = None) -> list[str]:
    return sorted(p.stem for p in recipes_dir(directory).glob("*.yaml"))


def resolve_recipe(name: str, directory: str | os.PathLike | None = None) -> tuple[Path, str]:
    """``name`` (or a path to a recipe file) -> (config dir, config name)."""
    as_path = Path(name)
    if as_path.suffix == ".yaml" and as_path.is_file():
        return as_path.resolve().parent, as_path.stem
    root = recipes_dir(directory)
    if not (root / f"{name}.yaml").is_file():
        known = ", ".join(list_recipes(root))
        raise ValueError(f"unknown recipe {name!r} in {root}; known: {known}")
    return root, name


def compose_recipe(name: str, overrides: list[str] | tuple[str, ...] = (), directory=None):
    """The composed (unresolved) config of a recipe + Hydra overrides, as ``hapo-verl train`` would run it."""
    from hydra import compose, initialize_config_dir

    config_dir, config_name = resolve_recipe(name, directory)
    register_base_configs()
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose(config_name=config_name, overrides=list(overrides))
