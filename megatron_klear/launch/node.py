"""The per-node agent of a Slurm training step: one ``srun`` task per trainer node runs

    python -m megatron_klear.launch.node --master HOST [--procs-per-node N] [--socket-ifname NAMES]
                                          [--exit-dir DIR] -- CMD ...

It picks this node's interface for gloo and NCCL sockets (``launch.network``), prints one line
saying where it runs (host, address, node rank, the global ranks it holds, interface and why),
runs ``CMD`` (torchrun) with ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` set, and exits with
its status. It waits for the command through SIGTERM / SIGINT (scancel, requeue, time limit):
Slurm signals every process of the step and a terminal the whole process group, so the command
gets the signal itself, and the agent outlives it to report its status. With ``--exit-dir`` it
also writes that status to ``DIR/node<SLURM_NODEID>.exit``: the launcher on the batch node reads
these to learn that a node's trainers failed while ``srun`` still waits for a node that no
longer answers (see ``launch.slurm.wait_for_step``).

Standard library only: it starts before torch is imported anywhere on the node.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

from megatron_klear.errors import LaunchError
from megatron_klear.launch.network import choose_socket_ifname


def exit_file(exit_dir: Path, node: int) -> Path:
    """Where node ``node`` of a step writes its exit status."""
    return Path(exit_dir) / f"node{node}.exit"


def write_exit(path: Path, rc: int) -> None:
    """Write ``rc`` to ``path`` atomically (the launcher polls it)."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(f"{rc}\n")
    os.replace(tmp, path)


def _outlive(_signum, _frame) -> None:
    """Stay up: the command received the same signal and its exit status is still to report."""


def run_node(
    master: str, cmd: list[str], socket_ifname: str = "", exit_dir: Optional[str] = None, procs_per_node: int = 0
) -> int:
    """Set this node's socket interface, run ``cmd`` through stop signals, return its status."""
    node = int(os.environ.get("SLURM_NODEID", "0"))
    nodes = os.environ.get("SLURM_STEP_NUM_NODES") or os.environ.get("SLURM_NNODES") or "?"
    choice = choose_socket_ifname(master, socket_ifname, os.environ)
    host = socket.gethostname()
    try:
        address = socket.gethostbyname(host)
    except OSError:
        address = "unresolved"
    ranks = ""
    if procs_per_node:
        first = node * procs_per_node
        ranks = f" ranks {first}-{first + procs_per_node - 1}" if procs_per_node > 1 else f" rank {first}"
        ranks += f" of {procs_per_node * int(nodes)};" if nodes.isdigit() else ";"
    print(f"[node {node}/{nodes}] {host} ({address}):{ranks} gloo/NCCL sockets on {choice.reason}", flush=True)
    for sig in (signal.SIGTERM, signal.SIGINT):  # a Python handler: the command starts with the default
        signal.signal(sig, _outlive)
    proc = subprocess.Popen(cmd, env={**os.environ, **choice.env})
    rc = proc.wait()
    if rc < 0:  # killed by a signal: report it the way a shell does
        rc = 128 - rc
    print(f"[node {node}/{nodes}] {host}: the node's processes exited with {rc}", flush=True)
    if exit_dir:
        write_exit(exit_file(Path(exit_dir), node), rc)
    return rc


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--master", required=True, help="the rendezvous host (MASTER_ADDR)")
    p.add_argument("--socket-ifname", default="", help="parallel.socket_ifname (empty: see launch.network)")
    p.add_argument("--exit-dir", default=None, help="write the exit status to DIR/node<SLURM_NODEID>.exit")
    p.add_argument("--procs-per-node", type=int, default=0, help="processes per node (to name this node's ranks)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command to run (torchrun ...)")
    a = p.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        p.error("no command after --")
    try:
        return run_node(a.master, cmd, a.socket_ifname, a.exit_dir, a.procs_per_node)
    except LaunchError as e:
        print(f"launch error on {socket.gethostname()}: {e}", file=sys.stderr, flush=True)
        if a.exit_dir:
            write_exit(exit_file(Path(a.exit_dir), int(os.environ.get("SLURM_NODEID", "0"))), 2)
        return 2


if __name__ == "__main__":
    sys.exit(main())
