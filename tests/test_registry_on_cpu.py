"""The algorithm registry and the shape it promises: discovery, option metadata, one config loader, generic glue
that names no algorithm, no import cycle, device-agnostic loss math, a generated configuration reference."""

import ast
import re
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import torch

from hapo_verl import registry

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hapo_verl"


def test_discovery_finds_every_algorithm_module():
    specs = registry.discover()
    declaring = {p.stem for p in (PACKAGE / "algorithms").glob("*.py") if "@algorithm(" in p.read_text()}
    assert len(declaring) >= 5 and set(specs) == declaring, (sorted(specs), sorted(declaring))
    for name, spec in specs.items():
        assert spec.name == name
        assert spec.module == f"hapo_verl.algorithms.{name}", (name, spec.module)
        assert spec.loss is not None or spec.advantage is not None or spec.selection is not None
        assert (ROOT / "hapo_verl" / "conf" / f"{name}.yaml").is_file(), f"conf/{name}.yaml is missing"


def test_every_option_has_help_and_a_valid_default():
    for spec in registry.specs():
        for cls, prefix in ((spec.loss_options, "policy_loss"), (spec.estimator_options, f"algorithm.{spec.name}"),
                            (spec.sampling_options, spec.name), (spec.selection_options, f"algorithm.{spec.name}")):
            if cls is None:
                continue
            for f in fields(cls):
                assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
            registry.validate_options(cls(), prefix)  # the defaults are inside their ranges


def test_load_options_coerces_rejects_and_names_the_key():
    @dataclass
    class Options:
        ratio: float = registry.option(0.5, "a ratio", low=0.0, high=1.0, high_open=True)
        flag: bool = registry.option(True, "a switch")
        mode: str = registry.option("a", "a mode", choices=("a", "b"))

    assert registry.load_options(Options, {"ratio": 0}, "x.y").ratio == 0.0  # int accepted for a float
    assert isinstance(registry.load_options(Options, {"ratio": 0}, "x.y").ratio, float)
    with pytest.raises(ValueError, match=r"x\.y\.ratio must be in \[0, 1\), got 1"):
        registry.load_options(Options, {"ratio": 1}, "x.y")
    with pytest.raises(ValueError, match=r"x\.y\.flag must be true or false"):
        registry.load_options(Options, {"flag": 1}, "x.y")
    with pytest.raises(ValueError, match=r"x\.y\.mode must be one of a, b"):
        registry.load_options(Options, {"mode": "c"}, "x.y")
    with pytest.raises(ValueError, match=r"unknown option x\.y\.ratoi; allowed keys under x\.y: flag, mode, ratio"):
        registry.load_options(Options, {"ratoi": 0.1}, "x.y")
    with pytest.raises(ValueError, match=r"x\.y\.ratio must be a number"):
        registry.load_options(Options, {"ratio": True}, "x.y")


def test_a_second_module_claiming_a_name_fails_loudly():
    spec = next(s for s in registry.specs() if s.loss is not None)
    with pytest.raises(RuntimeError, match="declared twice"):
        registry.register_algorithm(name=spec.name, title="X", paper="", summary="", loss=spec.loss,
                                    module="somebody.else")
    assert registry.get(spec.name) is spec


# ------------------------------------------------------------------------------ generic glue names no algorithm
def _code_words(path: Path) -> set[str]:
    """Identifiers and string constants of a module, docstrings and comments excluded."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                docstrings.add(id(body[0].value))
    words = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.add(node.value.lower())
        elif isinstance(node, ast.Name):
            words.add(node.id.lower())
        elif isinstance(node, ast.Attribute):
            words.add(node.attr.lower())
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            words.add(node.name.lower())
        elif isinstance(node, ast.alias):
            words.add(node.name.lower())
    return words


def _names(name: str, word: str) -> bool:
    """``word`` contains ``name`` as a whole token (letters and digits around it end the match: ``grpo_s`` is named
    by ``grpo_s_estimator`` or ``"grpo_s"``, not by ``grpo_sequence_advantage``)."""
    return re.search(rf"(?<![a-z0-9]){re.escape(name)}(?![a-z0-9])", word) is not None


def test_no_module_outside_an_algorithm_names_it_in_code():
    # HAPO is the product (package, config section, public API names), so only the other algorithms are checked
    names = [s.name for s in registry.specs() if s.name != "hapo"]
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT)
        words = _code_words(path)
        for name in names:
            if path == PACKAGE / "algorithms" / f"{name}.py":
                continue
            if any(_names(name, w) for w in words):
                offenders.append(f"{rel}: {name}")
    assert not offenders, offenders


def test_the_checker_sees_a_name_in_code_but_not_in_a_docstring(tmp_path):
    module = tmp_path / "m.py"
    name = next(s.name for s in registry.specs() if s.name != "hapo")
    module.write_text(f'"""About {name}."""\n# {name}\nX = 1\n')
    assert not any(name in w for w in _code_words(module))
    module.write_text(f'"""About it."""\nMODE = "{name}"\n')
    assert any(name in w for w in _code_words(module))
    assert _names("grpo_s", "grpo_s_estimator") and _names("grpo_s", "adv_estimator=grpo_s")
    assert not _names("grpo_s", "grpo_sequence_advantage") and not _names("gtpo", "gtpox")


def test_algorithm_modules_import_no_framework():
    banned = ("verl", "vllm", "ray", "transformers", "hydra", "omegaconf")
    for path in sorted((PACKAGE / "algorithms").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for mod in mods:
                assert mod.split(".")[0] not in banned, f"{path.name} imports {mod}"


def test_no_import_cycle_in_the_package():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_import_cycles.py")], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------ device-agnostic loss math
class _NoHostTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on any op whose output is a CPU tensor while the inputs live on the ``meta`` device: a tensor made
    without ``device=`` inside the loss. ``.item()`` on a meta tensor raises by itself (no host sync possible)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                raise AssertionError(f"{func} made a CPU tensor inside the loss")
        return out


def _refuse_host_to_device_copies(monkeypatch):
    """``torch.tensor``/``torch.as_tensor`` of host data (a Python number or list) with a non-CPU ``device=``: on
    CUDA a pageable host-to-device copy, a sync point. Invisible to a dispatch mode (the copy happens inside the
    factory), so the two factories are wrapped instead."""
    for name in ("tensor", "as_tensor"):
        real = getattr(torch, name)

        def guarded(data, *args, _real=real, _name=name, **kwargs):
            device = kwargs.get("device")
            if not isinstance(data, torch.Tensor) and device is not None and torch.device(device).type != "cpu":
                raise AssertionError(f"torch.{_name}({data!r}, device={device}) inside the loss: a host-to-device "
                                     "copy (use the Python number in the arithmetic, or torch.full on the device)")
            return _real(data, *args, **kwargs)

        monkeypatch.setattr(torch, name, guarded)


def _meta_inputs(B=6, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(L)[None, :] < torch.randint(1, L + 1, (B,), generator=g)[:, None]
    old = -torch.rand(B, L, generator=g) * 2
    new = old + torch.randn(B, L, generator=g) * 0.3
    adv = torch.randn(B, 1, generator=g).expand(B, L).contiguous() * mask
    entropy = torch.rand(B, L, generator=g) * 2
    return old, new, adv, mask, entropy


@pytest.mark.parametrize("name", sorted(registry.loss_specs()))
def test_every_registered_loss_runs_on_meta_tensors_without_host_tensors_or_syncs(name, monkeypatch):
    """How device-agnosticism is checked on CPU: the loss runs on ``meta`` tensors (no data: any ``.item()``,
    ``.tolist()`` or Python branch on a tensor value raises) under a dispatch mode that rejects any op producing a
    CPU tensor (a factory call without ``device=``), with ``torch.tensor``/``torch.as_tensor`` of host data on the
    device refused (a host-to-device copy). The batch statistics are computed on the driver beforehand, and the
    mini-batch statistics in the pass before the update, as the trainer does (then moved to the device)."""
    from loss_test_utils import actor_config

    from hapo_verl.integration.loss import run_loss
    from hapo_verl.integration.options import loss_options

    spec = registry.get(name)
    config = actor_config(loss_mode=name, use_kl_loss=True)
    options = loss_options(spec, config.policy_loss)
    old, new, adv, mask, entropy = _meta_inputs()
    stats = None
    if spec.batch_stats is not None:
        stats = spec.batch_stats(registry.OldPolicyBatch(response_mask=mask, entropy=entropy, old_log_prob=old),
                                 options)
    minibatch = None
    if registry.MINIBATCH_STATS in spec.needs_of_loss(options):
        from hapo_verl.integration.minibatch import minibatch_statistics
        from loss_test_utils import MicroBatchEngine, identity_padding, worker_data

        data = worker_data(old, adv, mask, entropy)
        with identity_padding():
            minibatch = minibatch_statistics(spec, options, MicroBatchEngine(new, [list(range(old.shape[0]))],
                                                                             entropy), data, batch_stats=stats)
        minibatch = {k: v.to("meta") for k, v in minibatch.items()}
    n_tok = int(mask.sum())
    config.global_batch_info.update(dp_size=1, batch_num_tokens=n_tok, global_batch_size=old.shape[0],
                                    loss_scale_factor=None)
    meta = [t.to("meta") for t in (old, new, adv, mask, entropy)]
    _refuse_host_to_device_copies(monkeypatch)
    with _NoHostTensors():
        loss, metrics = run_loss(spec, options, old_log_prob=meta[0], log_prob=meta[1], advantages=meta[2],
                                 response_mask=meta[3], loss_agg_mode="token-mean", config=config, entropy=meta[4],
                                 batch_stats=stats, ref_log_prob=meta[0], minibatch_stats=minibatch)
    assert loss.device.type == "meta"
    assert metrics and all(v.device.type == "meta" for v in metrics.values()), metrics


def test_the_copy_check_catches_a_host_to_device_copy(monkeypatch):
    x = torch.zeros(3, device="meta")
    _refuse_host_to_device_copies(monkeypatch)
    _ = torch.as_tensor(x, device="meta")  # a tensor already on the device: no copy
    _ = torch.full((), 0.5, device="meta") + torch.tensor(1.0)  # on the host, or filled on the device: no copy
    for factory in (torch.tensor, torch.as_tensor):
        with pytest.raises(AssertionError, match="host-to-device copy"):
            factory(0.5, device="meta")
        with pytest.raises(AssertionError, match="host-to-device copy"):
            factory([0.1, 0.2], dtype=torch.float64, device=x.device)


def test_the_device_check_catches_a_host_tensor():
    with pytest.raises(AssertionError, match="CPU tensor"):
        with _NoHostTensors():
            x = torch.zeros(3, device="meta")
            _ = x + torch.ones(3)  # a factory call without device=


# ------------------------------------------------------------------------------ generated docs
def test_configuration_reference_is_not_stale():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_config_reference.py"), "--check"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
