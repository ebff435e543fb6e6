"""Replace the resolved-config dump of verl's TaskRunner by one line unless the run is verbose.

Reason: ``verl.trainer.main_ppo.TaskRunnerV1.run`` (the v1 trainer's TaskRunner) calls ``pprint(OmegaConf.to_container(config, resolve=True))``
at the start of every run: about 600 console lines in which a user's per-step metrics drown, and the same config
``hapo-verl train --cfg job ...`` prints without running. ``TaskRunnerV1.run`` looks ``pprint`` up in its module, so
the wrapper replaces that module attribute. With ``HAPO_VERL_VERBOSE=1`` (``--verbose``) it calls the original.

Applied in the TaskRunner process (:class:`hapo_verl.launcher.HAPOTaskRunner`), and with the other shims by
:func:`hapo_verl.patches.apply_all`.

Targets: verl 0.9.1.
Expiry: ``tests/test_patches_on_cpu.py::test_quiet_config_dump_still_needed`` fails once verl's TaskRunner no
longer pprints the whole config.
"""

from __future__ import annotations

NAME = "quiet_config_dump"
REASON = "verl 0.9.1's TaskRunner pprints the ~600-line resolved config at every start"
TARGETS = {"verl": "0.9.1"}

#: the unpatched function (set on first apply)
ORIGINAL = None


def is_applied() -> bool:
    from verl.trainer import main_ppo

    return getattr(main_ppo.pprint, "_hapo_verl_quiet", False)


def apply() -> None:
    global ORIGINAL
    from verl.trainer import main_ppo

    if is_applied():
        return
    original = main_ppo.pprint

    def pprint(obj, *args, **kwargs):
        from hapo_verl.console import verbose

        if verbose() or not isinstance(obj, dict):
            return original(obj, *args, **kwargs)
        print(f"[hapo-verl] resolved config: {len(obj)} sections, not printed (--verbose prints it; "
              "hapo-verl train --cfg job ... shows it without running)", flush=True)

    pprint._hapo_verl_quiet = True
    ORIGINAL = original
    main_ppo.pprint = pprint
