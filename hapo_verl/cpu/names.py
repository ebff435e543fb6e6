"""Names of the CPU backend that several of its modules use (a leaf: imports nothing)."""

#: the rollout backend's name (``actor_rollout_ref.rollout.name``, verl's replica and rollout registries)
ROLLOUT_NAME = "hfcpu"
