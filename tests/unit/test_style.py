"""The tree is ruff-clean, and the package keeps its layering and its error types.

Layers (lowest first): a module imports only from its own layer or lower ones, never in a
circle (also within a folder), and imports our own modules at the top. An import inside a
function is allowed only for heavy or optional dependencies, or for our modules that import one
at their top (the Triton kernel module imports triton); the layer and circle checks see those
imports too. No module raises a bare ``RuntimeError`` / ``ValueError``: user errors derive from
``errors.KlearError``, broken invariants raise ``AssertionError``. No function is longer than
80 lines.
"""

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "megatron_klear"

HEAVY = ("megatron", "transformers", "sglang", "sglang_router", "triton", "wandb", "matplotlib", "transformer_engine")

# The layer of each top-level room; see docs/architecture.md.
LAYERS = {
    "errors": 0,
    "config": 0,
    "compat": 0,
    "distributed": 0,
    "cli": 0,
    "console": 0,
    "known_warnings": 0,
    "debug": 0,
    "data": 1,
    "ops": 1,
    "rewards": 1,
    "models": 2,
    "evals": 2,
    "checkpoint": 3,
    "inference": 4,
    "sync": 5,
    "training": 6,
    "sft": 7,
    "rl": 7,
    "launch": 8,
    "pipeline": 8,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text()) for p in sorted(PKG.rglob("*.py"))}


def _own_imports(node: ast.AST) -> list[tuple[str, int]]:
    """(module, line) of every import of megatron_klear under ``node``."""
    found = []
    for sub in ast.walk(node):
        if isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("megatron_klear"):
            for alias in sub.names:  # ``from megatron_klear.models import hf_mapping`` imports a module
                cand = f"{sub.module}.{alias.name}"
                found.append(
                    (cand if (PKG.parent / (cand.replace(".", "/") + ".py")).exists() else sub.module, sub.lineno)
                )
        elif isinstance(sub, ast.Import):
            found += [(a.name, sub.lineno) for a in sub.names if a.name.startswith("megatron_klear")]
    return found


def _top_imports(tree: ast.Module) -> list[tuple[str, int]]:
    return [imp for stmt in tree.body if isinstance(stmt, (ast.Import, ast.ImportFrom)) for imp in _own_imports(stmt)]


def _imports_heavy_at_top(tree: ast.Module) -> bool:
    for stmt in tree.body:
        names = []
        if isinstance(stmt, ast.Import):
            names = [a.name for a in stmt.names]
        elif isinstance(stmt, ast.ImportFrom):
            names = [stmt.module or ""]
        if any(n.split(".")[0] in HEAVY for n in names):
            return True
    return False


# Modules whose layer is not their room's: the engine's weight transports live in sync/ but the
# SGLang engine (inference/, layer 4) hands its buckets to them, so they sit beside the engines.
MODULE_LAYERS = {"megatron_klear.sync.ipc": 4, "megatron_klear.sync.broadcast": 4}


def _room(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else module


def _layer(module: str) -> int:
    """A module's layer: its own (``MODULE_LAYERS``) or its room's; an entry point
    (``__main__``) sits above every layer."""
    if module.endswith(".__main__"):
        return max(LAYERS.values()) + 1
    return MODULE_LAYERS.get(module, LAYERS[_room(module)])


def test_ruff_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it comes with the test extra)")
    r = subprocess.run([ruff, "check", "megatron_klear", "tools", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_own_modules_are_imported_at_the_top():
    mods = _modules()
    heavy = {m for m, t in mods.items() if _imports_heavy_at_top(t)}
    bad = []
    files = {m: t for m, t in mods.items()}
    files.update({f"tools.{p.stem}": ast.parse(p.read_text()) for p in sorted((ROOT / "tools").glob("*.py"))})
    for name, tree in files.items():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                bad += [f"{name}:{line} imports {m}" for m, line in _own_imports(fn) if m not in heavy]
    assert not bad, "import our own modules at the top of the module:\n" + "\n".join(sorted(set(bad)))


def test_layers_and_no_import_circles():
    mods = _modules()
    # every import of our modules, at the top or inside a function (a lazy import is still an arrow)
    graph = {m: {i for i, _ in _own_imports(t) if i in mods and i != m} for m, t in mods.items()}
    unknown = sorted({_room(m) for m in mods} - set(LAYERS) - {"megatron_klear"})
    assert not unknown, f"rooms without a layer in tests/unit/test_style.py: {unknown}"
    upward = [
        f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
        for m, deps in graph.items()
        if _room(m) in LAYERS
        for d in deps
        if _room(d) in LAYERS and _layer(d) > _layer(m)
    ]
    assert not upward, "a layer imports from a higher one:\n" + "\n".join(sorted(upward))
    # Depth-first search for a cycle among top-level imports.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d) :] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


BARE = ("RuntimeError", "ValueError", "Exception")


def test_no_bare_runtime_or_value_errors():
    """A user's mistake (config, data, files, engines) raises a ``KlearError`` the command line
    prints as one line; a bug keeps its traceback as an ``AssertionError`` or ``TypeError``. A
    bare ``RuntimeError`` / ``ValueError`` is neither."""
    bad = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id in BARE:
                bad.append(f"{name}:{node.lineno} raises {exc.id}")
    assert not bad, "raise an error from megatron_klear/errors.py (or AssertionError for a bug):\n" + "\n".join(bad)


MAX_FUNCTION_LINES = 80


def test_no_function_is_longer_than_80_lines():
    long = []
    for name, tree in _modules().items():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([fn.lineno] + [d.lineno for d in fn.decorator_list])
                lines = fn.end_lineno - first + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{fn.name} (line {fn.lineno}): {lines} lines")
    assert not long, f"split these into named pieces (at most {MAX_FUNCTION_LINES} lines each):\n" + "\n".join(long)
