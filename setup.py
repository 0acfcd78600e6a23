"""megatron-klear: Klear-Reasoner long-CoT SFT and GPPO RL on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron-klear",
    version="0.1.0",
    description="Long-CoT SFT and GPPO reinforcement learning for Qwen3 on Megatron-Core",
    packages=find_packages(include=["megatron_klear", "megatron_klear.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is installed first by tools/test.sh (CPU build from local disk) or by the
        # cluster image (CUDA build); a range here never pulls a second copy.
        "torch>=2.6",
        # Pinned: the version our tests exercise. Moving is a deliberate, tested change.
        "megatron-core==0.16.*",
        "transformers>=4.51",
        "safetensors>=0.4",
        "tokenizers>=0.21",
        "numpy",
        "pyyaml",
        "tqdm",
        "psutil",  # Megatron's checkpoint writer needs it (its workers die silently without)
        "pyarrow",
        "math-verify>=0.7",
        "tensorboard",
        "matplotlib",  # the demo's and the ablations' plots
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "triton>=3.2", "ruff"],
        # Never the PyPI package named "apex" (an unrelated web toolkit): NVIDIA apex is
        # built from source on clusters and is optional.
        # sglang/sglang-router: the versions the real_sglang tests run. sglang 0.5.23 pins
        # torch==2.14.1 and transformers==5.19.0; where that clashes with the trainer's stack,
        # install them in their own venv and set rollout.sglang.python (README, "SGLang").
        # transformer-engine: the range megatron-core 0.16.1 declares (its "dev" extra).
        "gpu": ["transformer-engine[pytorch]>=2.9,<2.12", "sglang==0.5.23", "sglang-router==0.3.2"],
        # Weights & Biases for log.wandb_project (offline unless WANDB_MODE / a login says otherwise)
        "wandb": ["wandb"],
    },
)
