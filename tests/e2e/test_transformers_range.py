"""The transformers range setup.py declares works at both ends: the lowest allowed release and the
newest one, each installed into a side folder on top of this environment (cached under
``$KLEAR_CACHE``), run ``tests/hf_range_worker.py`` (the tiny model written, converted and
exported, the export loaded by transformers, the HF engine's sampling contract) with
DeprecationWarning and FutureWarning as errors and transformers' own deprecation notices
counted. A transformers that announces the removal of something we use fails here, long before
the release that removes it.

Cost (2026-12-07, a loaded 2-core machine): the side folder for 4.56 is 133 MB and 10 s to
install, once; the installed transformers (5.25) needs none; the test takes about 3 minutes,
nearly all of it the two worker runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.pypi import CACHE, ROOT, current_pip, resolve


def declared() -> Requirement:
    """setup.py's transformers requirement (its ``TRANSFORMERS``)."""
    return Requirement(re.search(r'^TRANSFORMERS = "([^"]+)"', (ROOT / "setup.py").read_text(), re.M).group(1))


def ends(pip: list[str]) -> list[str]:
    """The lowest release the declared range allows (its lower bound) and the newest one."""
    spec = declared().specifier
    (low,) = [s.version for s in spec if s.operator == ">="]
    lowest = resolve(pip, f"transformers=={low}", empty_env=True, no_deps=True)["transformers"]["version"]
    newest = resolve(pip, f"transformers{spec}", empty_env=True, no_deps=True)["transformers"]["version"]
    assert Version(lowest) == Version(low) and lowest in spec and newest in spec, (lowest, newest, spec)
    return [lowest, newest]


def side_folder(pip: list[str], version: str):
    """A folder that, first on PYTHONPATH, gives this environment transformers ``version`` (what
    pip would add or change here for it, installed there without dependencies); None when this
    environment has that version already."""
    adds = resolve(pip, f"transformers=={version}")
    if not adds:
        return None
    folder = CACHE / "side" / f"transformers-{version}"
    pins = sorted(f"{name}=={meta['version']}" for name, meta in adds.items())
    stamp = folder / "installed.txt"
    if stamp.is_file() and stamp.read_text().split() == pins:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=folder.parent)  # filled, then renamed: a concurrent run never sees half of it
    r = subprocess.run([*pip, "install", "-q", "--no-deps", "--target", tmp, *pins], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (Path(tmp) / stamp.name).write_text("\n".join(pins))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


@pytest.mark.timeout(1200)
def test_hf_engine_and_export_at_both_ends_of_the_transformers_range(tmp_path):
    pip = current_pip()
    for version in ends(pip):
        folder = side_folder(pip, version)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (folder, ROOT) if p is not None)
        cmd = [sys.executable, "-W", "error::DeprecationWarning", "-W", "error::FutureWarning"]
        cmd += ["-m", "tests.hf_range_worker", str(tmp_path / version)]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"transformers {version}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
        result = json.loads(r.stdout.strip().splitlines()[-1])
        assert result == {"transformers": version, "checked": ["export", "engine"]}
