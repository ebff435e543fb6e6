"""The one trainer (``hapo_trainer``: verl's v1 ``PPOTrainerSync`` plus what the registered algorithms ask for) and
the agent loop that carries sampling statistics to the rollout (``agent_loop``). May import verl, the registry,
``integration`` and ``sampling``; never vLLM, the launcher or the CLI."""
