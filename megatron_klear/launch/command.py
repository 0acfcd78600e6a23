"""``megatron-klear``: the installed command (``console_scripts`` in setup.py).

    megatron-klear sft|rl [LAUNCHER FLAGS] --config FILE [key=value ...]
    megatron-klear sft|rl --config FILE --dry-run [--world-size N] | --print-config | --list-keys
    megatron-klear convert to-megatron|to-hf ARGS...    (tools/convert_*_to_*.py; --help there)
    megatron-klear eval ARGS...                         (tools/eval.py; --help there)
    megatron-klear --version

``sft`` and ``rl`` check the config in this process first (every key, the data files, the
starting model, the parallel layout against the world size the launcher flags give, for RL with
SGLang the rollout Python and the engines' GPUs), and only then replace themselves with
``torchrun LAUNCHER FLAGS -m megatron_klear.sft|rl --config FILE key=value ...``. A bad value is
one line naming the key and exit code 2, before any process starts, instead of a line per rank
under torchrun's crash banner. Launcher flags are torchrun's: ``--nproc-per-node``, ``--nnodes``,
``--node-rank``, ``--master-addr``, ``--master-port``, ``--standalone``, ``--rdzv-backend``,
``--rdzv-endpoint``, ``--rdzv-id``, ``--max-restarts``. On Slurm use ``slurm/*.sbatch``, which does
the same checks and launches on every node.

``convert`` and ``eval`` run the scripts of the source checkout the package is installed from
(``pip install -e``); their errors are one line and exit 2 as well.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from megatron_klear import __version__
from megatron_klear.cli import OneLineParser
from megatron_klear.errors import KlearError
from megatron_klear.launch.slurm import ENTRIES, check_world, load_entry_config
from megatron_klear.pipeline import rl_main
from megatron_klear.rl.trainer import RLRun, check_sglang_launch
from megatron_klear.sft.trainer import SFTRun
from megatron_klear.sft.trainer import main as sft_main
from megatron_klear.training.run import preflight

ROOT = Path(__file__).resolve().parents[2]
TOOLS = {
    ("convert", "to-megatron"): "tools/convert_hf_to_megatron.py",
    ("convert", "to-hf"): "tools/convert_megatron_to_hf.py",
    ("eval",): "tools/eval.py",
}
# torchrun's flags this command passes on: (flag, argparse type, help)
LAUNCHER_FLAGS = [
    ("--nproc-per-node", str, "processes (GPUs) per node"),
    ("--nnodes", str, "nodes (or MIN:MAX)"),
    ("--node-rank", int, "this node's rank"),
    ("--master-addr", str, "the rendezvous host"),
    ("--master-port", int, "the rendezvous port"),
    ("--rdzv-backend", str, "rendezvous backend (c10d)"),
    ("--rdzv-endpoint", str, "rendezvous HOST:PORT"),
    ("--rdzv-id", str, "rendezvous id of the job"),
    ("--max-restarts", int, "worker group restarts"),
]
USAGE = "megatron-klear {sft,rl,convert,eval} ... (megatron-klear --help)"


def _train_parser(entry: str) -> OneLineParser:
    p = OneLineParser(prog=f"megatron-klear {entry}", description=__doc__)
    launcher = p.add_argument_group("launcher (torchrun) flags")
    for flag, kind, meaning in LAUNCHER_FLAGS:
        spellings = sorted({flag, "--" + flag[2:].replace("-", "_")})  # torchrun takes --nproc_per_node too
        launcher.add_argument(*spellings, dest=flag[2:].replace("-", "_"), type=kind, help=meaning)
    launcher.add_argument("--standalone", action="store_true", help="one node, a local rendezvous")
    p.add_argument("--config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides (see --list-keys)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--list-keys", action="store_true", help="every config key: type, default, meaning")
    what.add_argument("--print-config", action="store_true", help="the resolved config as YAML")
    what.add_argument("--dry-run", action="store_true", help="check everything for the job, start nothing")
    p.add_argument("--world-size", type=int, help="--dry-run: the job's processes (default: from the flags)")
    return p


def launcher_args(a: argparse.Namespace) -> list[str]:
    """The torchrun flags given, in torchrun's spelling."""
    out = []
    for flag, _kind, _meaning in LAUNCHER_FLAGS:
        value = getattr(a, flag[2:].replace("-", "_"))
        if value is not None:
            out.append(f"{flag}={value}")
    return out + ["--standalone"] * a.standalone


def check_launcher_flags(a: argparse.Namespace, p: OneLineParser) -> None:
    """The values torchrun would reject, rejected here in one line."""
    nproc, nnodes = a.nproc_per_node, a.nnodes
    if nproc is not None and not (nproc in ("gpu", "cpu", "auto") or (nproc.isdigit() and int(nproc) > 0)):
        p.error(f"--nproc-per-node must be a positive number, gpu, cpu or auto, got {nproc!r}")
    if nnodes is not None and not all(n.isdigit() and int(n) > 0 for n in nnodes.split(":", 1)):
        p.error(f"--nnodes must be N or MIN:MAX (positive numbers), got {nnodes!r}")


def flags_world_size(a: argparse.Namespace) -> Optional[int]:
    """Processes the launcher flags start (nodes x processes per node), None when they do not say
    (an elastic MIN:MAX node count, ``--nproc-per-node gpu``)."""
    nnodes, nproc = a.nnodes or "1", a.nproc_per_node or "1"
    if nnodes.isdigit() and nproc.isdigit():
        return int(nnodes) * int(nproc)
    return None


def check_before_launch(entry: str, a: argparse.Namespace) -> None:
    """What the trainer would check first, here, before any process starts."""
    cfg = load_entry_config(entry, a.config, a.overrides)
    run = SFTRun(cfg) if entry == "sft" else RLRun(cfg)
    inputs = run.inputs()
    preflight(cfg, inputs.files, inputs.generate, model_will_exist=inputs.model_will_exist)
    world = flags_world_size(a)
    if world is not None:
        check_world(cfg, world, f"--nnodes {a.nnodes or 1} x --nproc-per-node {a.nproc_per_node or 1}")
    if entry == "rl" and cfg.rollout.engine == "sglang":
        nproc = a.nproc_per_node if (a.nproc_per_node or "").isdigit() else "1"
        check_sglang_launch(cfg, int(nproc))


def train(entry: str, argv: list[str]) -> int:
    """``megatron-klear sft|rl``: the entry's own command line for listings and dry runs, else the
    checks here and then torchrun in this process's place."""
    p = _train_parser(entry)
    a = p.parse_args(argv)
    check_launcher_flags(a, p)
    module = ENTRIES[entry][0]
    if a.list_keys or a.print_config or a.dry_run:
        own = ["--config", a.config] if a.config else []
        own += ["--list-keys"] * a.list_keys + ["--print-config"] * a.print_config + ["--dry-run"] * a.dry_run
        world = a.world_size if a.world_size is not None else flags_world_size(a)
        own += ["--world-size", str(world)] if a.dry_run and world is not None else []
        main = sft_main if entry == "sft" else rl_main
        return main(own + list(a.overrides))
    if not a.config:
        p.error("--config is required (or --list-keys)")
    try:
        check_before_launch(entry, a)
    except KlearError as e:
        print(f"megatron-klear {entry}: {e}", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher_args(a), "-m", module, "--config", a.config]
    cmd += list(a.overrides)
    print(f"megatron-klear {entry}: config checked; starting {' '.join(cmd[1:])}", flush=True)
    sys.stdout.flush()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its banner
    os.execv(sys.executable, cmd)
    return 0  # not reached


def tool(words: tuple[str, ...], argv: list[str]) -> int:
    """``convert`` / ``eval``: run the checkout's script in this process's place."""
    script = ROOT / TOOLS[words]
    if not script.is_file():
        print(f"megatron-klear {' '.join(words)}: {script} is missing: this needs the source checkout the "
              "package was installed from (pip install -e)", file=sys.stderr)  # fmt: skip
        return 2
    os.execv(sys.executable, [sys.executable, str(script), *argv])
    return 0  # not reached


def main(argv: Optional[list[str]] = None) -> int:
    """The ``megatron-klear`` command (module doc)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ if argv else f"usage: {USAGE}", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"megatron-klear {__version__}")
        return 0
    if argv[0] in ENTRIES:
        return train(argv[0], argv[1:])
    if argv[0] == "convert":
        kind = argv[1] if len(argv) > 1 else ""
        if ("convert", kind) not in TOOLS:
            print("megatron-klear convert: say to-megatron (HF -> Megatron) or to-hf (Megatron -> HF)", file=sys.stderr)
            return 2
        return tool(("convert", kind), argv[2:])
    if argv[0] == "eval":
        return tool(("eval",), argv[1:])
    print(f"megatron-klear: unknown command {argv[0]!r}; usage: {USAGE}", file=sys.stderr)
    return 2
