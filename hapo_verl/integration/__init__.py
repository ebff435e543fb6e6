"""Generic verl glue, written once for every registered algorithm: the loss entry points and the worker-side loss
(``loss``), the estimator adapter (``estimator``), the selection steps around the actor update (``selection``), the
responses' reasoning steps for step-level estimators (``steps``).
They read :mod:`hapo_verl.registry`; none names an algorithm.
May import verl, torch and hapo_verl's registry, algorithms and config; never vLLM, the CLI or the trainer."""
