"""Every runtime shim in patches/ (``hapo_verl.patches``): the upstream problem still exists without it
(``*_still_needed``: these fail once verl / torch fix it upstream -> delete the shim) and is fixed with it.

Targets: verl 0.9.1, torch 2.13.0 (see each module's TARGETS).
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import torch.distributed as dist

import hapo_verl.patches as patches
from hapo_verl.patches import (file_logger_append, fsdp2_cpu_offload_no_pin, gloo_backend_dedup, minibatch_prepass,
                               quiet_config_dump, rollout_registry)


@pytest.fixture
def single_process_group():
    """A world-1 gloo default process group (created with the *original* torch function), destroyed after."""
    assert not dist.is_initialized()
    init = gloo_backend_dedup.ORIGINAL or dist.init_process_group
    init(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_every_shim_module_is_documented():
    for name in patches.SHIM_MODULES:
        module = patches.shim_module(name)
        doc = module.__doc__ or ""
        assert module.NAME == name
        assert module.REASON
        assert module.TARGETS and set(module.TARGETS) <= {"verl", "torch"}
        assert "Targets:" in doc and "Expiry:" in doc and "Reason:" in doc, f"{name}: docstring incomplete"
        assert f"test_{name}_still_needed" in globals(), f"{name}: no expiry test"


def test_apply_all_is_idempotent_and_records_names():
    first = patches.apply_all()
    wrapped = dist.init_process_group
    second = patches.apply_all()
    assert first == second == list(patches.SHIM_MODULES) == patches.APPLIED
    assert dist.init_process_group is wrapped  # not wrapped twice
    assert all(patches.shim_module(n).is_applied() for n in patches.SHIM_MODULES)


# --------------------------------------------------------------------------------------------- gloo dedup
def test_gloo_backend_dedup_still_needed(monkeypatch):
    from verl.plugin.platform import platform_manager
    from verl.utils import distributed as verl_distributed

    from hapo_verl.cpu.platform import CPUPlatform

    # verl side: on the CPU platform verl asks torch for "cpu:gloo,cpu:gloo"
    seen = {}
    monkeypatch.setattr(platform_manager, "_current_platform", CPUPlatform())
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: seen.update(k))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    verl_distributed.initialize_global_process_group_ray()
    assert seen["backend"] == "cpu:gloo,cpu:gloo", "verl no longer builds a duplicate backend: drop the shim"
    monkeypatch.undo()

    # torch side: the unpatched init_process_group rejects it
    original = gloo_backend_dedup.ORIGINAL or dist.init_process_group
    with pytest.raises(ValueError, match="Duplicate device type"):
        original(backend="cpu:gloo,cpu:gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert not dist.is_initialized()


def test_gloo_backend_dedup_fixes_it():
    gloo_backend_dedup.apply()
    assert gloo_backend_dedup.dedup_backend("cpu:gloo,cpu:gloo") == "cpu:gloo"
    assert gloo_backend_dedup.dedup_backend("cpu:gloo,cuda:nccl") == "cpu:gloo,cuda:nccl"
    assert gloo_backend_dedup.dedup_backend("nccl") == "nccl"
    dist.init_process_group(backend="cpu:gloo,cpu:gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        t = torch.ones(3)
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.destroy_process_group()
    # positional backend goes through the same path
    dist.init_process_group("cpu:gloo,cpu:gloo", store=dist.HashStore(), rank=0, world_size=1)
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------- FSDP2 offload, no pin
def _shard_and_run(policy_cls, **kwargs):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    module = torch.nn.Linear(4, 4)
    fully_shard(module, mesh=init_device_mesh("cpu", (1,)), offload_policy=policy_cls(**kwargs))
    return module(torch.randn(2, 4))


def test_fsdp2_cpu_offload_no_pin_still_needed(single_process_group):
    from verl.workers.engine.fsdp import transformer_impl

    # verl side: forward-only FSDP2 engines (ref model) force pinned CPU offload
    source = inspect.getsource(transformer_impl)
    assert "CPUOffloadPolicy(pin_memory=True)" in source, "verl no longer forces pin_memory=True: drop the shim"
    # torch side: pinning needs an accelerator
    with pytest.raises(RuntimeError, match="accelerator"):
        _shard_and_run(fsdp2_cpu_offload_no_pin.ORIGINAL, pin_memory=True)


def test_fsdp2_cpu_offload_no_pin_fixes_it(single_process_group):
    fsdp2_cpu_offload_no_pin.apply()
    import torch.distributed.fsdp as fsdp
    from verl.utils import fsdp_utils
    from verl.workers.engine.fsdp import transformer_impl

    assert fsdp.CPUOffloadPolicy is fsdp2_cpu_offload_no_pin.CPUOffloadPolicyNoPin
    # verl modules imported before apply() are rebound too
    fsdp2_cpu_offload_no_pin.apply()
    assert fsdp_utils.CPUOffloadPolicy is fsdp.CPUOffloadPolicy
    assert transformer_impl.CPUOffloadPolicy is fsdp.CPUOffloadPolicy
    policy = fsdp.CPUOffloadPolicy(pin_memory=True)
    assert policy.pin_memory is False and isinstance(policy, fsdp2_cpu_offload_no_pin.ORIGINAL)
    out = _shard_and_run(fsdp.CPUOffloadPolicy, pin_memory=True)
    assert out.shape == (2, 4) and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------- rollout registry
def test_rollout_registry_still_needed(monkeypatch):
    from verl.workers.rollout import base

    public_registrars = [n for n in dir(base) if "regist" in n.lower() and not n.startswith("_")]
    assert public_registrars == [], f"verl now has {public_registrars}: register through it and drop the shim"
    for key in rollout_registry.ENTRIES:
        monkeypatch.delitem(base._ROLLOUT_REGISTRY, key, raising=False)
    with pytest.raises(AssertionError, match="hfcpu"):
        base.get_rollout_class("hfcpu", "async")


def test_rollout_registry_fixes_it():
    from verl.workers.rollout import base

    rollout_registry.apply()
    cls = base.get_rollout_class("hfcpu", "async")
    from hapo_verl.cpu.rollout import HFCPURollout

    assert cls is HFCPURollout and issubclass(cls, base.BaseRollout)
    with pytest.raises(RuntimeError, match="already registered"):
        original = dict(rollout_registry.ENTRIES)
        try:
            rollout_registry.ENTRIES[("hfcpu", "async")] = "somewhere.Else"
            rollout_registry.apply()
        finally:
            rollout_registry.ENTRIES.clear()
            rollout_registry.ENTRIES.update(original)


# ------------------------------------------------------------------------------------ file logger append
def _log_twice(logger_class, path, monkeypatch):
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(path))
    for attempt, steps in enumerate(((1, 2), (3,))):
        logger = logger_class("project", "experiment")
        for step in steps:
            logger.log({"attempt": attempt}, step=step)
        logger.finish()
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_file_logger_append_still_needed(tmp_path, monkeypatch):
    from verl.utils import tracking

    original = file_logger_append.ORIGINAL or tracking.FileLogger
    # verl's own logger: the second attempt (a rerun or resume) empties the first attempt's records
    assert _log_twice(original, tmp_path / "metrics.jsonl", monkeypatch) == [3]


def test_file_logger_append_fixes_it(tmp_path, monkeypatch):
    from verl.utils import tracking

    file_logger_append.apply()
    file_logger_append.apply()
    assert file_logger_append.is_applied() and issubclass(tracking.FileLogger, file_logger_append.ORIGINAL)
    assert tracking.FileLogger.__bases__ == (file_logger_append.ORIGINAL,)  # not wrapped twice
    assert _log_twice(tracking.FileLogger, tmp_path / "metrics.jsonl", monkeypatch) == [1, 2, 3]
    # without VERL_FILE_LOGGER_PATH: verl's <root>/<project>/<experiment>.jsonl
    monkeypatch.delenv("VERL_FILE_LOGGER_PATH")
    monkeypatch.setenv("VERL_FILE_LOGGER_ROOT", str(tmp_path / "root"))
    logger = tracking.FileLogger("p", "e")
    logger.log({"x": 1.0}, step=1)
    logger.finish()
    assert (tmp_path / "root" / "p" / "e.jsonl").read_text().count("\n") == 1


# ------------------------------------------------------------------------------------- quiet config dump
def test_quiet_config_dump_still_needed():
    from verl.trainer import main_ppo

    source = inspect.getsource(main_ppo.TaskRunnerV1.__ray_actor_class__.run)
    assert "pprint(OmegaConf.to_container(config, resolve=True))" in source


def test_quiet_config_dump_fixes_it(monkeypatch, capsys):
    from verl.trainer import main_ppo

    quiet_config_dump.apply()
    quiet_config_dump.apply()
    assert quiet_config_dump.is_applied() and quiet_config_dump.ORIGINAL is not main_ppo.pprint
    config = {f"section{i}": {"key": i} for i in range(3)}
    monkeypatch.setenv("HAPO_VERL_VERBOSE", "0")
    main_ppo.pprint(config)
    quiet = capsys.readouterr().out
    assert quiet.count("\n") == 1 and "3 sections, not printed (--verbose prints it" in quiet
    monkeypatch.setenv("HAPO_VERL_VERBOSE", "1")
    main_ppo.pprint(config)
    assert "'section2': {'key': 2}" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- mini-batch pass hook
def _unpatched_train_batch():
    from verl.workers.engine.base import BaseEngine

    return minibatch_prepass.ORIGINAL or BaseEngine.train_batch


def test_minibatch_prepass_still_needed():
    # verl's train_batch only hands the loss to forward_backward_batch: no hook runs before the first micro-batch
    source = inspect.getsource(_unpatched_train_batch())
    assert "loss_function." not in source and "hook" not in source, source
    assert "forward_backward_batch(data, loss_function, forward_only=False)" in source


class _Engine:
    """The parts of an engine ``BaseEngine.train_batch`` calls, recording the order of events."""

    def __init__(self, events):
        self.events = events

    def optimizer_zero_grad(self):
        self.events.append("zero_grad")

    def forward_backward_batch(self, data, loss_function, forward_only=False):
        self.events.append(("forward_backward", forward_only))
        loss_function(None, data)
        return {"metrics": {}}

    def optimizer_step(self):
        self.events.append("step")
        return torch.tensor(0.0)

    def is_mp_src_rank_with_outputs(self):
        return False


def test_minibatch_prepass_fixes_it():
    from verl.workers.engine.base import BaseEngine

    minibatch_prepass.apply()
    minibatch_prepass.apply()
    assert minibatch_prepass.is_applied() and minibatch_prepass.ORIGINAL is not BaseEngine.train_batch
    events = []

    class Loss:
        def __call__(self, model_output, data):
            events.append(("loss", data))

        def before_mini_batch(self, engine, data):
            events.append(("before", data))

        def after_mini_batch(self):
            events.append("after")

    class Engine(_Engine, BaseEngine):
        pass

    from tensordict import TensorDict

    data = TensorDict({"x": torch.zeros(2)}, batch_size=[2])
    BaseEngine.train_batch(Engine(events), data, Loss())
    assert events == [("before", data), "zero_grad", ("forward_backward", False), ("loss", data), "step", "after"]
    events.clear()  # a plain loss function runs verl's method unchanged
    BaseEngine.train_batch(Engine(events), data, lambda model_output, data: events.append("plain"))
    assert events == ["zero_grad", ("forward_backward", False), "plain", "step"]


def test_registered_loss_installs_the_hook_where_it_is_unpickled():
    import pickle

    from loss_test_utils import actor_config

    from hapo_verl.integration.loss import RegisteredLoss

    loss = RegisteredLoss(actor_config(loss_mode="bapo"))
    assert loss.needs_minibatch_pass
    copy = pickle.loads(pickle.dumps(loss))
    assert minibatch_prepass.is_applied() and copy.minibatch_stats is None
    assert not RegisteredLoss(actor_config(loss_mode="bapo", bounds_per="micro_batch")).needs_minibatch_pass
