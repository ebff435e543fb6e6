"""Hydra configs: one ``<algorithm>.yaml`` per registered algorithm (plus ``dapo.yaml``), each composing verl's
``ppo_trainer`` and the shared group ``base/common.yaml``; ``verl/agent_loops.yaml`` registers our agent loop."""
