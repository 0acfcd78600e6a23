"""megatron-klear: Klear-Reasoner long-CoT SFT and GPPO RL on Megatron-Core.

Two environments on a GPU cluster (``tools/setup_cluster_envs.sh`` builds both; README "Install
on a GPU cluster"):

* the trainer's: the cluster's CUDA torch, then ``pip install -e ".[trainer]"`` (CUDA 13 torch)
  or ``".[trainer-cu12]"`` (CUDA 12 torch), then Transformer Engine's torch extension built
  against that torch (``transformer-engine-torch`` is published only as source);
* the rollout's: ``pip install ".[rollout]"`` in a venv of its own (SGLang pins its own torch and
  transformers), which the trainer reaches through ``rollout.sglang.python``.

``tests/e2e/test_install.py`` runs pip's resolver on these extras and checks what it would install.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (ROOT / "megatron_klear/__init__.py").read_text(), re.M).group(1)

# The range megatron-core 0.16.1 declares for Transformer Engine (its "dev" extra), with the core
# wheel flavour named: transformer-engine[pytorch] would pull transformer-engine-torch, an sdist
# whose build needs the CUDA torch it compiles against (tools/setup_cluster_envs.sh builds it with
# --no-build-isolation, after this).
TE_RANGE = ">=2.9.0a0,<2.12.0"
# The versions the real_sglang tests run; sglang 0.5.23 pins torch==2.14.1 and transformers==5.19.0.
ROLLOUT = ["sglang==0.5.23", "sglang-router==0.3.2"]
# The transformers range tested at both ends (tests/e2e/test_transformers_range.py: the HF engine
# and the export load, deprecation warnings as errors). 4.56 is the first with from_pretrained's
# dtype=; 5.25 the newest release tested.
TRANSFORMERS = "transformers>=4.56,<5.26"

setup(
    name="megatron-klear",
    version=VERSION,
    description="Long-CoT SFT and GPPO reinforcement learning for Qwen3 on Megatron-Core",
    license="Apache-2.0",
    packages=find_packages(include=["megatron_klear", "megatron_klear.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is installed first by tools/test.sh (CPU build from local disk) or by the
        # cluster image (CUDA build); a range here never pulls a second copy.
        "torch>=2.6",
        # Pinned: the version our tests exercise. Moving is a deliberate, tested change.
        "megatron-core==0.16.*",
        TRANSFORMERS,
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
        # wandb: the test of the W&B run id across restarts (offline)
        "test": ["pytest>=8", "pytest-timeout", "triton>=3.2", "ruff", "wandb"],
        # Never the PyPI package named "apex" (an unrelated web toolkit): NVIDIA apex is
        # built from source on clusters and is optional.
        "trainer": [f"transformer-engine[core_cu13]{TE_RANGE}"],  # CUDA 13 torch (megatron-core's flavour)
        "trainer-cu12": [f"transformer-engine[core_cu12]{TE_RANGE}"],  # CUDA 12 torch
        # Its own venv, never the trainer's: these replace torch and transformers.
        "rollout": ROLLOUT,
        # Weights & Biases for log.wandb_project (offline unless WANDB_MODE / a login says otherwise)
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["megatron-klear = megatron_klear.launch.command:main"]},
)
