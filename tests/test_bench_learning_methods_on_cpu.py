"""The learning benchmark's methods come from the registry and the packaged configs, and each reads its settings from
the composed config through the trainer's own StepPlan (no GPU, no Ray, no model)."""

import argparse

import pytest
from omegaconf import OmegaConf

from hapo_verl import registry
from hapo_verl.bench_learning import MAIN_METHODS, SEEDS, SEEDS_MAIN, _parser, _settings, quick_methods
from hapo_verl.bench_learning.methods import VARIANTS, fast_settings, label, methods, spec_variants
from hapo_verl.conf import config_names
from hapo_verl.launcher import compose


def test_every_registered_algorithm_and_config_is_a_method():
    names = methods()
    assert set(config_names()) <= set(names)
    assert {spec.name for spec in registry.specs()} <= set(names)
    assert list(names)[:4] == ["grpo", "dapo", "hapo", "hapo_ds"]
    assert {"hapo_ref", "hapo_no_ats", "hapo_no_tlga", "hapo_no_dar", "hapo_no_aac", "clip_cov", "kl_cov"} <= set(names)


def _flat(config) -> dict:
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = node

    walk(OmegaConf.to_container(config, resolve=False), "")
    return out


@pytest.mark.parametrize("variant", sorted({**VARIANTS, **spec_variants()}))
def test_variants_differ_from_their_config_only_in_their_keys(variant):
    config_name, overrides = methods()[variant]
    base = _flat(compose(config_name, []))
    changed = _flat(compose(config_name, overrides))
    differing = {k for k in set(base) | set(changed) if base.get(k) != changed.get(k)}
    allowed = {o.lstrip("+").split("=", 1)[0] for o in overrides}
    assert differing and all(any(k == a or k.startswith(a + ".") for a in allowed) for k in differing), differing


def test_fast_settings_follow_the_config():
    hapo = fast_settings("hapo")
    assert hapo.plan.adaptive_temperature and hapo.plan.sampling.temperature_tau == 0.05
    assert hapo.estimator == "hapo" and hapo.loss_mode == "hapo" and not hapo.dynamic_sampling
    no_ats = fast_settings("hapo_no_ats")
    assert not no_ats.plan.adaptive_temperature and no_ats.loss_mode == "hapo"
    hapo_ds = fast_settings("hapo_ds")
    assert hapo_ds.dynamic_sampling and hapo_ds.overlong_shaping and hapo_ds.plan.adaptive_temperature
    grpo, dapo = fast_settings("grpo"), fast_settings("dapo")
    assert (grpo.actor.clip_ratio_high, grpo.actor.loss_agg_mode, grpo.dynamic_sampling, grpo.overlong_shaping) == \
        (0.2, "seq-mean-token-mean", False, False)
    assert (dapo.actor.clip_ratio_high, dapo.dynamic_sampling, dapo.overlong_shaping) == (0.28, True, True)
    d3s = fast_settings("d3s")
    assert [spec.name for spec, _ in d3s.plan.selections] == ["d3s"] and d3s.loss_mode == "vanilla"
    kl_cov_global = fast_settings("kl_cov_global")
    assert kl_cov_global.actor.policy_loss.kl_cov_ratio == 0.002  # the config's value, not the option default
    clip_cov = fast_settings("clip_cov")
    assert clip_cov.loss_mode == "clip_cov" and clip_cov.actor.clip_ratio_low == 1.0
    # what the fast engine cannot do is said, not dropped
    assert fast_settings("archer").not_applied and fast_settings("haepo").not_applied


def test_the_grid_has_more_seeds_for_the_papers_comparison():
    args = _parser().parse_args(["--task", "countdown"])
    args.out = "unused"
    _, _, _, cells, seeds, method_names, *_ = _settings(args)
    assert not set(spec_variants()) & set(method_names)  # the algorithms' variants run on request only
    per_method = {m: sorted(s for mm, s in cells if mm == m) for m in method_names}
    assert all(per_method[m] == list(range(SEEDS_MAIN)) for m in MAIN_METHODS)
    assert all(per_method[m] == list(range(SEEDS)) for m in method_names if m not in MAIN_METHODS)
    assert len(cells) == SEEDS_MAIN * len(MAIN_METHODS) + SEEDS * (len(method_names) - len(MAIN_METHODS))
    assert isinstance(args, argparse.Namespace) and seeds == list(range(SEEDS_MAIN))


def test_an_algorithms_declared_variant_is_a_method_run_on_request():
    variants = spec_variants()
    assert variants  # at least one algorithm declares a reading to compare
    for name, (spec, variant) in variants.items():
        assert name == f"{spec.name}_{variant.name}" and methods()[name] == (spec.name, list(variant.overrides))
        assert label(name) == f"{spec.title} ({variant.title})"


def test_quick_covers_the_fast_engines_code_paths():
    quick = quick_methods()
    assert quick[:3] == ["grpo", "dapo", "hapo"]
    assert any(registry.get(m) is not None and registry.get(m).minibatch_stats is not None for m in quick)
    assert any(registry.get(m) is not None and registry.get(m).selection is not None for m in quick)
