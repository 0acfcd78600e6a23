"""CPU compatibility for Megatron-Core, inert when CUDA is present.

Megatron-Core 0.16 calls CUDA unconditionally in a few places: factory calls with
``device=torch.cuda.current_device()`` (rotary cache, causal mask), ``.cuda()`` on
small tensors, and the CUDA RNG tracker. On a machine without CUDA we

* make ``torch.cuda.current_device()`` answer 0 and redirect any cuda / integer device
  passed to a tensor factory, ``.to()`` or ``.cuda()`` to the CPU (a TorchFunctionMode),
  and answer ``Tensor.type()`` (no argument) with the CUDA type name Megatron's optimizer
  checks for,
* back the CUDA RNG state functions with the CPU generator, so the RNG tracker's
  ``fork()`` keeps working (and stays deterministic per seed).

This is how every CPU test exercises the real Megatron-Core code: nothing here replaces
a Megatron module, it only answers device questions Megatron asks.
"""

from __future__ import annotations

import threading

import torch
from torch.overrides import TorchFunctionMode

_lock = threading.Lock()
_installed = False


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Maps every CUDA device argument of a torch function call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name == "cuda":  # Tensor.cuda(): stays where it is
            return args[0]
        if name == "type" and len(args) == 1 and not kwargs:
            # Tensor.type() with no argument answers a type-name question; Megatron's optimizer
            # accepts only "torch.cuda.*Tensor" names.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if name == "to" and args:
            args = tuple("cpu" if i > 0 and _is_cuda_device(a) else a for i, a in enumerate(args))
        return func(*args, **kwargs)


def _cpu_get_rng_state(*_args, **_kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(state: torch.Tensor, *_args, **_kwargs) -> None:
    torch.set_rng_state(state)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def install_cpu_compat() -> bool:
    """Install the CPU shims if CUDA is unavailable. Returns True if they are active.

    Safe to call many times; does nothing on a machine with CUDA.
    """
    global _installed
    if torch.cuda.is_available():
        return False
    with _lock:
        if _installed:
            return True
        torch.cuda.current_device = lambda: 0  # type: ignore[assignment]
        torch.cuda.get_rng_state = _cpu_get_rng_state  # type: ignore[assignment]
        torch.cuda.set_rng_state = _cpu_set_rng_state  # type: ignore[assignment]
        # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the generator directly.
        torch.cuda.manual_seed = _cpu_manual_seed  # type: ignore[assignment]
        torch.cuda.manual_seed_all = lambda seed: None  # type: ignore[assignment]
        torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
        torch.cuda.empty_cache = lambda: None  # type: ignore[assignment]

        from megatron.core.tensor_parallel import random as mrandom

        mrandom._get_cuda_rng_state = _cpu_get_rng_state
        mrandom._set_cuda_rng_state = _cpu_set_rng_state
        _CudaToCpuMode().__enter__()  # stays pushed for the life of the process
        _installed = True
    return True
