"""Compile every Triton kernel of the package for real GPU targets, without a GPU.

    python -m tests.triton_compile [--arch 90 80]    # never with TRITON_INTERPRET set

Finds each module of ``megatron_klear`` that defines ``@triton.jit`` kernels, requires every
kernel to appear in the module's ``compile_cases()`` (see ``megatron_klear.ops.triton_launch``),
and compiles each case with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)``. Prints one
JSON line (compiled cases, failures); exits 1 on any failure or uncovered kernel.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_klear"


def kernel_modules() -> list[str]:
    """Dotted names of the package's modules whose source declares a Triton kernel."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "@triton.jit" in path.read_text() or "@triton.autotune" in path.read_text():
            rel = path.relative_to(PACKAGE.parent).with_suffix("")
            names.append(".".join(rel.parts))
    return names


def module_kernels(module) -> dict[str, object]:
    """The ``@triton.jit`` functions defined (not imported) in ``module``."""
    from triton.runtime.jit import JITFunction

    return {
        name: obj
        for name, obj in vars(module).items()
        if isinstance(obj, JITFunction) and obj.fn.__module__ == module.__name__
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET"):
        print("TRITON_INTERPRET is set: the interpreter checks nothing this script is for", file=sys.stderr)
        return 2
    compiled, failures = [], []
    modules = kernel_modules()
    for modname in modules:
        module = importlib.import_module(modname)
        kernels = module_kernels(module)
        cases = module.compile_cases() if hasattr(module, "compile_cases") else []
        covered = {c.kernel.fn.__name__ for c in cases}
        for name in sorted(set(kernels) - covered):
            failures.append(f"{modname}.{name}: no launch in {modname}.compile_cases()")
        seen = set()
        for case in cases:
            key = (case.name, tuple(case.signature().items()), tuple(case.constexprs.items()), case.num_warps)
            if key in seen:  # e.g. two vocabulary sizes that launch the same specialisation
                continue
            seen.add(key)
            for arch in a.arch:
                what = f"{modname}.{case.name} [{case.label}] sm_{arch}"
                try:
                    case.compile(arch)
                    compiled.append(what)
                except Exception:
                    failures.append(f"{what}: {traceback.format_exc(limit=1)}")
    print(json.dumps(dict(modules=modules, compiled=compiled, failures=failures)))
    return 1 if failures or not compiled else 0


if __name__ == "__main__":
    sys.exit(main())
