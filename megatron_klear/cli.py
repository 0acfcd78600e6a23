"""The command line shared by the config-driven entry points (SFT, RL).

    python -m megatron_klear.sft --config FILE [key=value ...]   train (under torchrun or srun)
                                 --list-keys                      every key: type, default, meaning
                                 --config FILE --print-config     the resolved config as YAML
                                 --config FILE --dry-run [--world-size N]   check everything, start nothing

A dry run checks for the world size it is given (``--world-size 64`` for a 64-GPU job), else
``WORLD_SIZE`` or Slurm's ``SLURM_NTASKS`` if set, else 1; it runs every check even after one
failed and lists every problem, one per line, before exiting 2. Console lines carry the time and
the rank; children forked by a rank die with it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from typing import Any, Callable, Optional

from megatron_klear import console
from megatron_klear.config import list_keys, load_config, to_yaml
from megatron_klear.distributed import DistEnv, children_die_with_me, collective_failure, destroy_distributed
from megatron_klear.errors import ConfigError, KlearError


def _exit_on_signal(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``PROG: error: ...``) and exit code 2, like every
    other user error of our commands, instead of the usage block; ``--help`` still prints it."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser(doc: str, prog: Optional[str]) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description=doc)
    p.add_argument("--config", help="YAML run config (relative paths in it resolve against its folder)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-5 (see --list-keys)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--list-keys", action="store_true", help="print every config key, its type, default, meaning")
    what.add_argument("--print-config", action="store_true", help="print the resolved config (defaults included)")
    what.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config, data files, model, output dir, optional packages (and for RL the sandbox) "
        "for the job's world size; start nothing",
    )
    p.add_argument("--world-size", type=int, help="--dry-run: the job's processes (default: WORLD_SIZE, else 1)")
    return p


class DryRun:
    """What a ``--dry-run`` found: every check runs (``check``), even after another one failed,
    and every problem is kept; ``world_size`` is the job's, as the flag or environment says."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.problems: list[str] = []

    def check(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args)``; a user error (``KlearError``) is recorded and None returned."""
        try:
            return fn(*args)
        except KlearError as e:
            self.problems.append(str(e))
            return None


def job_world_size(flag: Optional[int]) -> int:
    """The world size a dry run checks: the flag, else ``WORLD_SIZE``, else ``SLURM_NTASKS``, else 1."""
    if flag is not None:
        if flag < 1:
            raise ConfigError(f"--world-size must be >= 1, got {flag}")
        return flag
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def run_config_entry(
    cls: type,
    train: Callable,
    doc: str,
    argv: Optional[list[str]] = None,
    dry_run: Optional[Callable] = None,
    prog: Optional[str] = None,
) -> int:
    """``--config FILE [key=value ...]`` -> ``train(load_config(cls, ...))`` (or a listing, the
    resolved config, or ``dry_run(cfg)``). ``prog``: the command usage lines name
    (``python -m megatron_klear.sft``).

    User errors (``KlearError``: bad config, data, checkpoints, engines, output dir) print one
    line and exit 2 instead of a traceback. A collective that timed out or lost a peer (a node
    died) prints its traceback, then one ``error:`` line that says so, and exits 1. The process
    groups are torn down however the run ends.
    """
    parser = _parser(doc, prog)
    a = parser.parse_args(argv)
    if a.list_keys:
        print(list_keys(cls))
        return 0
    if not a.config:
        parser.error("--config is required (or use --list-keys)")
    if a.world_size is not None and not a.dry_run:
        parser.error("--world-size goes with --dry-run (a run takes its world size from torchrun or srun)")
    if not a.print_config:  # the printed YAML stays plain
        console.install(DistEnv.from_environ().rank)
    # SIGTERM (torchrun stopping its workers, scancel) unwinds like an exception, so the
    # ``finally`` blocks run: inference engine servers are stopped rather than orphaned on their GPUs.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    children_die_with_me()
    cfg = None
    try:
        cfg = load_config(cls, a.config, a.overrides)
        if a.print_config:
            sys.stdout.write(to_yaml(cfg))
        elif a.dry_run:
            report = DryRun(job_world_size(a.world_size))
            if dry_run is not None:
                dry_run(cfg, report)
            if report.problems:
                for problem in report.problems:
                    print(f"problem: {problem}", file=sys.stderr)
                print(f"dry run: {len(report.problems)} problem(s); nothing was started", file=sys.stderr)
                return 2
            print(f"dry run: everything checked is in order for world size {report.world_size}; nothing was started")
        else:
            train(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except KlearError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        why = collective_failure(e, getattr(getattr(cfg, "parallel", None), "timeout_minutes", None))
        if why is None:
            raise
        traceback.print_exc()
        print(f"error: {why}", file=sys.stderr, flush=True)
        return 1
    finally:
        destroy_distributed()
    return 0
