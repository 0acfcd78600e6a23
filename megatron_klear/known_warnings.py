"""The third-party warnings we know and accept, silenced by message in this one place.

Nothing of ours sets ``PYTHONWARNINGS=ignore``: our own warnings, and any new one a dependency
starts to raise, must show. What is listed here is noise we have read and judged (each entry
says why), matched by category and the start of its message only, wherever it is raised.
``install()`` runs when the package is imported (``megatron_klear/__init__.py``), so every
entry point, tool, spawned child and test has it. These filters go in front of those given on
the command line (``-W``, ``PYTHONWARNINGS``), so ``-W error`` turns every other warning into an
error.

Two of them are raised by torch inside Megatron-Core's calls but name ``compat.py``: on a CPU
the call passes through our CUDA-to-CPU ``TorchFunctionMode``, whose frame is the innermost
Python one when torch's C++ code warns.
"""

from __future__ import annotations

import warnings

# (category, regex matched at the start of the message, why it is accepted)
KNOWN: tuple[tuple[type[Warning], str, str], ...] = (
    (
        UserWarning,
        r"Transformer Engine and Apex are not installed",
        "Megatron-Core without TE and apex (CPU machines, our GPU test machine): its torch fallbacks are "
        "the intended path there",
    ),
    (UserWarning, r"Apex is not installed\. Falling back to Torch Norm", "the same, for Megatron's norms"),
    (
        UserWarning,
        r"full scope is deprecated\. Use empty cuda_graph_scope",
        "Megatron-Core 0.16's own TransformerConfig default (cuda_graph_scope), whatever we pass",
    ),
    (
        FutureWarning,
        r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        "Megatron-Core 0.16's DDP and distributed optimizer under torch >= 2.13",
    ),
    (
        FutureWarning,
        r"`load_state_dict` is deprecated and will be removed in future versions",
        "Megatron-Core 0.16's torch_dist checkpoint loader (torch.distributed.checkpoint)",
    ),
    (
        FutureWarning,
        r"Please use DTensor instead and we are deprecating ShardedTensor",
        "Megatron-Core 0.16's distributed checkpoints are ShardedTensors",
    ),
    (
        DeprecationWarning,
        r"The following imports from `dynamic_context\.py` will be removed",
        "Megatron-Core 0.16's own package import (megatron.core.inference.contexts)",
    ),
    (
        DeprecationWarning,
        r"The 'megatron\.core\.transformer\.custom_layers\.transformer_engine'",
        "Megatron-Core 0.16 imports its own deprecated module",
    ),
    (
        DeprecationWarning,
        r"MLP requires ffn_hidden_size, but it was not provided",
        "Megatron-Core 0.16's own GPT layer specs build its MLP without it (config.ffn_hidden_size is used)",
    ),
    (
        DeprecationWarning,
        r"`torch\.jit\.script_method` is deprecated",
        "torch's own torch.utils.mkldnn, imported when Megatron-Core's jit_fuser calls torch.compile",
    ),
    (
        UserWarning,
        r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
        "Megatron-Core's distributed optimizer reads .grad of its shard views in zero_grad",
    ),
)


def pytest_filters() -> list[str]:
    """``KNOWN`` as pytest ``filterwarnings`` lines (tests/conftest.py): pytest restores the
    filters after collecting, so the ones ``install`` set at import would not reach the tests."""
    return [f"ignore:{message}:{category.__name__}" for category, message, _why in KNOWN]


def install() -> None:
    """Ignore the warnings in ``KNOWN`` (once per process; filters given with ``-W`` stay behind)."""
    for category, message, _why in KNOWN:
        warnings.filterwarnings("ignore", message=message, category=category)
