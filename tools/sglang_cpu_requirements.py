"""Print the requirements of the installed sglang wheel that a CPU-only SGLang server needs.

Used by tools/setup_env.sh (``setup_sglang_env``) after ``pip install --no-deps sglang``: it reads
sglang's own ``Requires-Dist`` (so its exact pins such as transformers==5.19.0 are kept) and
drops the CUDA-only kernels and the torch family. torch is installed separately as the CPU
build, and torchvision / sgl_kernel are replaced by the stand-ins in tests/sglang_standins/.
Run it with the SGLang venv's Python.
"""

from __future__ import annotations

from importlib.metadata import requires

from packaging.requirements import Requirement

# CUDA kernels and GPU runtimes (no CPU build, or nothing on the CPU path imports them), the
# torch family (the CPU build of torch is installed first; PyPI's torchvision does not load
# beside it), and tools a server never imports (py-spy) or that pull torchvision (timm).
EXCLUDED = {
    "torch", "torchvision", "torchaudio", "torchcodec", "torch-memory-saver",
    "sglang-kernel", "flashinfer-python", "flash-attn-4", "humming-kernels", "nvidia-cutlass-dsl",
    "nvidia-mathdx", "nvshmem4py-cu13", "quack-kernels", "sgl-deep-ep", "sgl-deep-gemm",
    "sgl-flash-mla", "tilelang", "cuda-python", "apache-tvm-ffi", "kernels", "deepseek-recipe",
    "tml-renderers", "timm", "py-spy",
}  # fmt: skip


def cpu_requirements() -> list[str]:
    """sglang's unconditional requirements for this platform, minus ``EXCLUDED``."""
    out = []
    for line in requires("sglang") or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if req.name.lower().replace("_", "-") in EXCLUDED:
            continue
        req.marker = None
        out.append(str(req))
    return out


if __name__ == "__main__":
    print("\n".join(cpu_requirements()))
