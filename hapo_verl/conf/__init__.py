"""Hydra configs: one ``<algorithm>.yaml`` per registered algorithm (plus ``dapo.yaml``), each composing verl's
``ppo_trainer`` and the shared group ``base/common.yaml``; ``verl/agent_loops.yaml`` registers our agent loop."""

from importlib import resources


def config_names() -> list[str]:
    """The primary configs here (``--config-name`` / ``hapo-verl tiny --config``). Imports nothing heavy: the CLI
    lists them before verl is imported (verl resolves its platform once per process, at import)."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir()
                  if p.name.endswith(".yaml") and p.is_file())
