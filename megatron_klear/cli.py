"""The command line shared by the config-driven entry points (SFT, RL)."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Callable, Optional

from megatron_klear.config import load_config
from megatron_klear.distributed import destroy_distributed
from megatron_klear.errors import ConfigError, KlearError


def _exit_on_signal(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def run_config_entry(
    cls: type,
    train: Callable,
    doc: str,
    argv: Optional[list[str]] = None,
) -> int:
    """``--config FILE [key=value ...]`` -> ``train(load_config(cls, ...))``.

    User errors (``KlearError``: bad config, data, checkpoints, engines) print one line and exit
    2 instead of a traceback; the process groups are torn down however the run ends.
    """
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-5")
    a = p.parse_args(argv)
    # SIGTERM (torchrun stopping its workers, scancel) unwinds like an exception, so the
    # ``finally`` blocks run: inference engine servers are stopped rather than orphaned on their GPUs.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        train(load_config(cls, a.config, a.overrides))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except KlearError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
    return 0
