"""hapo-verl: HAPO (arXiv 2509.16591) and related entropy-aware RL algorithms as a verl plugin.

The package import is light; names resolve lazily so that ``import hapo_verl`` does not import verl.
"""

__version__ = "0.1.0"

_LAZY = {
    "compute_policy_loss": "hapo_verl.integration.loss",
    "compute_hapo_policy_loss": "hapo_verl.integration.loss",
    "HAPOPolicyLossConfig": "hapo_verl.config",
    "HAPOAdvantageConfig": "hapo_verl.algorithms.hapo",
    "EntropyStats": "hapo_verl.algorithms.entropy",
    "register": "hapo_verl.registration",
    "ensure_registered": "hapo_verl.registration",
}

__all__ = ["__version__", "compute_hapo_advantage", *_LAZY]


def __getattr__(name):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "compute_hapo_advantage":  # verl's estimator signature, as registered for adv_estimator=hapo
        registration = importlib.import_module("hapo_verl.registration")
        return registration.verl_function(registration.ADV_ESTIMATOR, "hapo")
    raise AttributeError(f"module 'hapo_verl' has no attribute {name!r}")
