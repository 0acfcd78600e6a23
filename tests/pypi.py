"""pip's resolver against the package index, for the tests of what installs resolve to
(tests/e2e/test_install.py, tests/e2e/test_transformers_range.py).

A current pip runs from its wheel on this Python (``current_pip``): pip 23, which venvs of
Python 3.11 start with, loses an extra inside an extra (``transformer-engine[core_cu13]`` in
ours). Downloads are cached under ``$KLEAR_CACHE`` (default ~/.cache/megatron-klear); without a
package index (or when pip reports that it cannot reach one) the tests skip and say so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("KLEAR_CACHE", Path.home() / ".cache" / "megatron-klear"))
# pip's words when the index cannot be reached (a local index may still have answered for pip
# itself): a skip that says so, not a resolver failure
OFFLINE = ("Failed to establish a new connection", "Temporary failure in name resolution",
           "Network is unreachable", "Max retries exceeded", "Could not fetch URL")  # fmt: skip


def current_pip() -> list[str]:
    """``[python, <pip wheel>/pip]``: the newest pip (downloaded once into the cache), run from
    its wheel on this Python; skips the calling test when no package index answers."""
    folder = CACHE / "pip"
    wheels = sorted(folder.glob("pip-*.whl"))
    if not wheels:
        r = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "pip", "-d", str(folder)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        wheels = sorted(folder.glob("pip-*.whl"))
        if r.returncode != 0 or not wheels:
            pytest.skip(f"no package index answers here (pip download pip: {r.stderr.strip()[-300:]})")
    return [sys.executable, f"{wheels[-1]}/pip"]


def resolve(pip: list[str], *specs: str, empty_env: bool = False, no_deps: bool = False) -> dict[str, dict]:
    """What ``pip install specs`` would install into this environment (``empty_env``: into an
    empty one, as a venv of its own): canonical name -> the metadata pip reports."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [*pip, "install", "--dry-run", "--report", str(report)]  # not --quiet: it hides the network errors
        cmd += ["--ignore-installed"] * empty_env + ["--no-deps"] * no_deps + list(specs)
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        if r.returncode != 0 and any(words in r.stderr for words in OFFLINE):
            pytest.skip(f"the package index cannot be reached here: {r.stderr.strip()[-300:]}")
        assert r.returncode == 0, f"pip's resolver failed on {' '.join(specs)}:\n{r.stderr[-3000:]}"
        installs = json.loads(report.read_text())["install"]
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"] for i in installs}
