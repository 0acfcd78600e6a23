"""One description of each Triton kernel launch, shared by the launch and the compile check.

A kernel module builds a ``KernelLaunch`` (kernel, arguments by name, constexprs, warps) and
calls ``launch(grid)``. The same module lists every launch it can make, for every dtype and
constexpr it is really launched with, in a function ``compile_cases()`` that builds the same
``KernelLaunch`` objects from meta tensors. ``tests/triton_compile.py`` finds every
``@triton.jit`` kernel in the package, requires it to appear in its module's
``compile_cases()``, and compiles each case with ``triton.compile`` for real GPU targets
without a GPU: that catches what the interpreter (``TRITON_INTERPRET=1``, our CPU test path)
never checks, such as a kernel reading a non-constexpr global.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

_POINTER_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.uint8: "u8",
    torch.bool: "i1",
}


def triton_type(value: Any) -> str:
    """The Triton signature type of a runtime argument, as the launcher would specialise it
    (tensors become pointers to their dtype; ints are i32 when they fit, else i64)."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in _POINTER_TYPES:
            raise TypeError(f"no Triton pointer type for {value.dtype}")
        return "*" + _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


@dataclass
class KernelLaunch:
    """One launch of a ``@triton.jit`` kernel: runtime arguments and constexprs by name."""

    kernel: Any  # triton.runtime.jit.JITFunction
    args: dict[str, Any]
    constexprs: dict[str, Any]
    num_warps: int = 4
    label: str = field(default="")  # what this case stands for, in test output

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def launch(self, grid: tuple[int, ...]) -> None:
        """Run the kernel on ``grid`` (real tensors)."""
        self.kernel[grid](**self.args, **self.constexprs, num_warps=self.num_warps)

    def signature(self) -> dict[str, str]:
        """``ASTSource`` signature in the kernel's parameter order; every parameter must be given."""
        sig = {}
        for name in self.kernel.arg_names:
            if name in self.constexprs:
                sig[name] = "constexpr"
            elif name in self.args:
                sig[name] = triton_type(self.args[name])
            else:
                raise TypeError(f"{self.name}: parameter {name} has no value in this launch")
        extra = set(self.args) | set(self.constexprs)
        extra -= set(self.kernel.arg_names)
        if extra:
            raise TypeError(f"{self.name}: {sorted(extra)} are not parameters of the kernel")
        return sig

    def compile(self, arch: int, backend: str = "cuda", warp_size: int = 32):
        """Compile for ``GPUTarget(backend, arch, warp_size)`` with the real compiler (no GPU needed)."""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        src = ASTSource(fn=self.kernel, signature=self.signature(), constexprs=dict(self.constexprs))
        return triton.compile(src, target=GPUTarget(backend, arch, warp_size), options={"num_warps": self.num_warps})
