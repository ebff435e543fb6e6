"""hapo-verl: HAPO and entropy-aware RL algorithms as a plugin for verl 0.9.1."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="hapo-verl",
    version="0.1.0",
    description="HAPO (arXiv 2509.16591) and entropy-aware RL algorithms as a verl plugin",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["hapo_verl", "hapo_verl.*"]) + ["hapo_verl.patches"],
    # runtime shims live in the top-level patches/ folder but install under our namespace
    package_dir={"hapo_verl.patches": "patches"},
    # cpu_kernel.c is compiled on first use on the machine that runs it (hapo_verl/sampling/cpu_kernel.py)
    package_data={"hapo_verl.conf": ["*.yaml", "*/*.yaml"], "hapo_verl.sampling": ["*.c"]},
    install_requires=[
        # torch is installed first as the 2.13.0 CPU build on our machines (scripts/bootstrap.sh);
        # a range here would make pip download a multi-GB CUDA build when torch is absent.
        "torch>=2.6",
        "verl[verl-core]==0.9.1",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "matplotlib>=3.7",  # hapo-verl compare
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3"],
        # the vLLM that verl 0.9.1 pins (GPU machines)
        "vllm": ["vllm==0.24.0"],
    },
    entry_points={
        "verl.plugins": ["hapo = hapo_verl.plugin"],
        "console_scripts": ["hapo-verl = hapo_verl.cli:main"],
    },
)
