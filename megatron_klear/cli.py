"""The command line shared by the config-driven entry points (SFT, RL).

    python -m megatron_klear.sft --config FILE [key=value ...]   train (under torchrun or srun)
                                 --list-keys                      every key: type, default, meaning
                                 --config FILE --print-config     the resolved config as YAML
                                 --config FILE --dry-run          check everything, start nothing

Console lines carry the time and the rank; children forked by a rank die with it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from typing import Callable, Optional

from megatron_klear import console
from megatron_klear.config import list_keys, load_config, to_yaml
from megatron_klear.distributed import DistEnv, children_die_with_me, collective_failure, destroy_distributed
from megatron_klear.errors import ConfigError, KlearError


def _exit_on_signal(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def _parser(doc: str, prog: Optional[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (relative paths in it resolve against its folder)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-5 (see --list-keys)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--list-keys", action="store_true", help="print every config key, its type, default, meaning")
    what.add_argument("--print-config", action="store_true", help="print the resolved config (defaults included)")
    what.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config, data files, model, output dir, optional packages (and for RL the sandbox); "
        "start nothing",
    )
    return p


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
            if dry_run is not None:
                dry_run(cfg)
            print("dry run: everything checked is in order; nothing was started", flush=True)
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
