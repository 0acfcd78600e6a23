"""CPU compatibility for Megatron-Core, inert when CUDA is present.

Megatron-Core 0.16 calls CUDA unconditionally in a few places: factory calls with
``device=torch.cuda.current_device()`` (rotary cache, causal mask), ``.cuda()`` on
small tensors, and the CUDA RNG tracker. On a machine without CUDA we

* make ``torch.cuda.current_device()`` answer 0 and redirect any cuda / integer device
  passed to a tensor factory, ``.to()`` or ``.cuda()`` to the CPU (a TorchFunctionMode),
  and answer ``Tensor.type()`` (no argument) with the CUDA type name Megatron's optimizer
  checks for,
* back the CUDA RNG state functions with the CPU generator, so the RNG tracker's
  ``fork()`` keeps working (and stays deterministic per seed),
* answer CUDA stream and event questions (``torch.cuda.Stream``, ``current_stream``,
  ``torch.cuda.stream(...)``, ``record_event``, ``wait_stream``) with objects that do nothing:
  Megatron's all-to-all MoE token dispatcher overlaps its device-to-host copies on a side
  stream, and on the CPU every operation has completed when it returns,
* hand that dispatcher its all-to-all split sizes as host arrays: it moves them to the host
  with ``moe_utils.maybe_move_tensor_to_cpu(..., as_numpy=True)``, which converts only CUDA
  tensors, so on the CPU they would stay tensors, which ``all_to_all_single`` rejects.

Autograd runs a backward outside every function mode (``Tensor.backward`` is itself a torch
function, and a mode is off while its handler runs), so there ``torch.cuda.current_device()``
answers ``"cpu"`` instead of 0: a ``device=`` argument in a backward (Megatron's gathers)
needs no redirection then.

``install_megatron_compat`` is for every machine, GPU or not: Megatron-Core 0.16.1 without
Transformer Engine refers to ``moe_utils.te_general_gemm`` (the MoE router's GEMM) without
defining it, so any MoE forward fails with a NameError; we define it as None, which is the
value its own check expects when TE is absent.

This is how every CPU test exercises the real Megatron-Core code: nothing here replaces
a Megatron module, it only answers device questions Megatron asks.
"""

from __future__ import annotations

import contextlib
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


def _current_device():
    """0 where the redirection mode is active (it maps 0 to the CPU), ``"cpu"`` elsewhere."""
    stack = torch.overrides._get_current_function_mode_stack()
    return 0 if any(isinstance(m, _CudaToCpuMode) for m in stack) else "cpu"


class _CpuEvent:
    """A CUDA event on the CPU: everything recorded has already happened."""

    def __init__(self, *_args, **_kwargs) -> None:
        pass

    def record(self, *_args, **_kwargs) -> None:
        pass

    def wait(self, *_args, **_kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _CpuStream(_CpuEvent):
    """A CUDA stream on the CPU: work runs in order, so there is nothing to wait for."""

    def wait_stream(self, *_args, **_kwargs) -> None:
        pass

    def wait_event(self, *_args, **_kwargs) -> None:
        pass

    def record_event(self, *_args, **_kwargs) -> _CpuEvent:
        return _CpuEvent()


_CPU_STREAM = _CpuStream()


def _host_copy(tensor, as_numpy: bool = False, record_stream: bool = False):
    """``moe_utils.maybe_move_tensor_to_cpu`` for tensors that already live on the CPU."""
    if as_numpy and torch.is_tensor(tensor):
        return tensor.detach().numpy()
    return tensor


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
    install_megatron_compat()
    with _lock:
        if _installed:
            return True
        torch.cuda.current_device = _current_device  # type: ignore[assignment]
        torch.cuda.get_rng_state = _cpu_get_rng_state  # type: ignore[assignment]
        torch.cuda.set_rng_state = _cpu_set_rng_state  # type: ignore[assignment]
        # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the generator directly.
        torch.cuda.manual_seed = _cpu_manual_seed  # type: ignore[assignment]
        torch.cuda.manual_seed_all = lambda seed: None  # type: ignore[assignment]
        torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
        torch.cuda.empty_cache = lambda: None  # type: ignore[assignment]
        torch.cuda.Stream = _CpuStream  # type: ignore[assignment,misc]
        torch.cuda.Event = _CpuEvent  # type: ignore[assignment,misc]
        torch.cuda.current_stream = lambda *a, **k: _CPU_STREAM  # type: ignore[assignment]
        torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]

        from megatron.core.tensor_parallel import random as mrandom

        mrandom._get_cuda_rng_state = _cpu_get_rng_state
        mrandom._set_cuda_rng_state = _cpu_set_rng_state
        from megatron.core.transformer.moe import moe_utils, token_dispatcher

        moe_utils.maybe_move_tensor_to_cpu = _host_copy
        token_dispatcher.maybe_move_tensor_to_cpu = _host_copy
        _CudaToCpuMode().__enter__()  # stays pushed for the life of the process
        _installed = True
    return True


def install_megatron_compat() -> None:
    """Define ``moe_utils.te_general_gemm`` as None where Transformer Engine is absent (see the
    module docstring); any machine, idempotent."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
