"""The install resolves: pip's resolver (``pip install --dry-run --report``, against the package
index) on every extra of setup.py, and what it would install.

* ``trainer`` / ``trainer-cu12`` in this environment (which has its torch, like a cluster's
  trainer venv): Transformer Engine of megatron-core 0.16.1's range with the named core wheel
  (cu13 / cu12), and no torch replaced. Transformer Engine's torch extension is not resolved
  here: it is an sdist whose metadata step reads ``torch.version.cuda`` (None on a CPU build),
  which is why it is not in the extra and tools/setup_cluster_envs.sh builds it after.
* ``rollout`` in an empty environment (``--ignore-installed``: its own venv): the SGLang pins,
  the torch and transformers they force, and a transformers our declared range accepts.

Run with a current pip (``tests.pypi.current_pip``: pip 23 loses the ``core_cu13`` extra inside
ours); skips, saying why, when no package index answers.
"""

from __future__ import annotations

import re

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from tests.pypi import ROOT, current_pip, resolve

TE_RANGE = SpecifierSet(">=2.9.0a0,<2.12.0")  # megatron-core 0.16.1's "dev" extra


@pytest.fixture(scope="module")
def pip() -> list[str]:
    return current_pip()


def extra(ours: dict, name: str) -> list[Requirement]:
    """The requirements of our extra ``name``, from the metadata pip built of setup.py."""
    reqs = [Requirement(line) for line in ours["requires_dist"]]
    return [r for r in reqs if r.marker is not None and r.marker.evaluate({"extra": name})]


def test_trainer_extras_keep_this_torch(pip):
    import torch

    for name, core in (("trainer", "transformer-engine-cu13"), ("trainer-cu12", "transformer-engine-cu12")):
        plan = resolve(pip, f".[{name},wandb,test]")
        assert "torch" not in plan, f"[{name}] would replace torch {torch.__version__} with {plan['torch']['version']}"
        assert not {"sglang", "sglang-router", "flashinfer-python"} & set(plan), f"[{name}] pulls the rollout stack"
        te, te_core = plan["transformer-engine"]["version"], plan[core]["version"]
        assert te == te_core and te in TE_RANGE, (name, te, te_core)
        other = {"transformer-engine-cu12", "transformer-engine-cu13"} - {core}
        assert not other & set(plan), f"[{name}] installs both core wheels"
        assert "megatron-core" not in plan or plan["megatron-core"]["version"].startswith("0.16.")
        (req,) = extra(plan["megatron-klear"], name)
        assert req.specifier == TE_RANGE, f"[{name}] is not megatron-core 0.16.1's Transformer Engine range: {req}"


def test_rollout_extra_resolves_in_its_own_venv(pip):
    plan = resolve(pip, ".[rollout]", empty_env=True)
    ours = plan["megatron-klear"]
    pins = {canonicalize_name(r.name): str(r.specifier) for r in extra(ours, "rollout")}
    assert pins == {"sglang": "==0.5.23", "sglang-router": "==0.3.2"}
    assert plan["sglang"]["version"] == "0.5.23" and plan["sglang-router"]["version"] == "0.3.2"
    # what SGLang forces, and why it has a venv of its own (README, "Install on a GPU cluster")
    assert plan["torch"]["version"] == "2.14.1", plan["torch"]["version"]
    declared = next(Requirement(r) for r in ours["requires_dist"] if Requirement(r).name == "transformers")
    assert plan["transformers"]["version"] in declared.specifier, (plan["transformers"]["version"], declared)
    assert plan["megatron-core"]["version"].startswith("0.16.")
    # the CPU test venv (.venv-sglang, tools/setup_env.sh) installs the same pins
    text = (ROOT / "tools" / "setup_env.sh").read_text()
    assert re.search(r"SGLANG_PINS=\((.*)\)", text).group(1).split() == [f"{k}{v}" for k, v in pins.items()]


def test_cluster_env_script_builds_rollout_first_and_gives_the_trainer_its_torch(tmp_path):
    """tools/setup_cluster_envs.sh --print (nothing installed): the rollout venv resolves first and
    decides torch; the trainer gets that torch before our extra (so the extra never picks one),
    then Transformer Engine's torch extension against it; RL is told the rollout Python."""
    import subprocess

    trainer, rollout = tmp_path / "t", tmp_path / "r"
    cmd = ["bash", "tools/setup_cluster_envs.sh", "--print", "--trainer", str(trainer), "--rollout", str(rollout)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    steps = [line[2:] for line in r.stderr.splitlines() if line.startswith("+ ")]
    order = [
        f"{rollout}/bin/python -m pip install {ROOT}[rollout]",
        f"{trainer}/bin/python -m pip install torch==<the rollout venv's torch>",
        f"{trainer}/bin/python -m pip install -e {ROOT}[trainer,wandb]",
        f"{trainer}/bin/python -m pip install --no-build-isolation transformer-engine-torch==",
    ]
    at = [next(i for i, s in enumerate(steps) if s.startswith(o)) for o in order]
    assert at == sorted(at), steps
    assert f"rollout.sglang.python={rollout}/bin/python" in r.stderr
    assert not trainer.exists() and not rollout.exists()
    keep = subprocess.run([*cmd, "--torch", "keep"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert keep.returncode == 0 and "pip install torch" not in keep.stderr, keep.stderr
    bad = subprocess.run([*cmd, "--bogus"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown argument --bogus" in bad.stderr
