"""Which network interface a node's processes use for gloo and NCCL sockets.

``GLOO_SOCKET_IFNAME`` and ``NCCL_SOCKET_IFNAME`` name it. The Slurm launcher sets both on every
node before ``torchrun`` starts (and before an engine node starts its SGLang servers), chosen in
this order:

1. ``parallel.socket_ifname`` from the config, when set: the same name(s) on every node
   (comma-separated; Gloo needs exact names, NCCL also takes its prefix and ``^exclude`` forms);
2. otherwise the variables already in the environment (``slurm/env.sh``, ``KLEAR_ENV_FILE``):
   a site's own choice is kept as it is, each variable on its own;
3. otherwise the interface that holds this node's address on the way to the rendezvous host
   (``MASTER_ADDR``): the host name is resolved on this node, the kernel is asked which local
   address it would send from to reach it (a UDP ``connect``, which sends nothing), and the
   interface holding that address is the one. On the rendezvous host itself that is the
   interface holding its own address. Every rank then talks over the network that reaches the
   master, which is the one torchrun's rendezvous already had to use.

What NCCL does with the choice: its bootstrap and its socket transport use that interface;
InfiniBand / RoCE traffic goes to the HCAs (``NCCL_IB_HCA``) whatever the socket interface is.

Standard library only (the per-node agent imports this before torch is loaded).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import socket
from dataclasses import dataclass
from typing import Mapping, Optional

from megatron_klear.errors import LaunchError

SOCKET_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


@dataclass
class SocketChoice:
    """The variables to set on this node and why (a line for the node's log)."""

    env: dict[str, str]
    reason: str


class _Sockaddr(ctypes.Structure):
    _fields_ = [("sa_family", ctypes.c_ushort), ("sa_data", ctypes.c_ubyte * 14)]


class _Ifaddrs(ctypes.Structure):
    pass


_Ifaddrs._fields_ = [
    ("ifa_next", ctypes.POINTER(_Ifaddrs)),
    ("ifa_name", ctypes.c_char_p),
    ("ifa_flags", ctypes.c_uint),
    ("ifa_addr", ctypes.POINTER(_Sockaddr)),
    ("ifa_netmask", ctypes.POINTER(_Sockaddr)),
    ("ifa_ifu", ctypes.POINTER(_Sockaddr)),
    ("ifa_data", ctypes.c_void_p),
]


def _address_text(sa: _Sockaddr) -> Optional[str]:
    """The address of a Linux ``sockaddr_in`` / ``sockaddr_in6`` as text; None for other families."""
    raw = ctypes.string_at(ctypes.addressof(sa), 28)
    if sa.sa_family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8])
    if sa.sa_family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24])
    return None


def local_addresses() -> list[tuple[str, str]]:
    """``(interface, address)`` for every IPv4 and IPv6 address of this host (``getifaddrs``)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    head = ctypes.POINTER(_Ifaddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        raise LaunchError(f"getifaddrs failed (errno {ctypes.get_errno()}): cannot list this node's interfaces")
    found = []
    try:
        node = head
        while node:
            entry = node.contents
            if entry.ifa_addr:
                addr = _address_text(entry.ifa_addr.contents)
                if addr is not None:
                    found.append((entry.ifa_name.decode(), addr.split("%")[0]))
            node = entry.ifa_next
    finally:
        libc.freeifaddrs(head)
    return found


def resolve(host: str) -> tuple[int, str]:
    """``(family, address)`` of ``host`` on this node, IPv4 preferred; LaunchError if it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as e:
        raise LaunchError(f"the rendezvous host {host!r} does not resolve on {socket.gethostname()}: {e}") from None
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr[0]


def source_address(family: int, address: str) -> str:
    """The local address the kernel would send from to reach ``address`` (nothing is sent)."""
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((address, 9))
        except OSError as e:
            raise LaunchError(f"no route from {socket.gethostname()} to the rendezvous host {address}: {e}") from None
        return s.getsockname()[0]


def interface_towards(host: str) -> tuple[str, str]:
    """``(interface, local address)`` this node uses to reach ``host``."""
    family, address = resolve(host)
    src = source_address(family, address)
    for name, addr in local_addresses():
        if addr == src:
            return name, src
    raise LaunchError(f"no interface of {socket.gethostname()} holds {src}, its address towards {host}")


def choose_socket_ifname(master: str, configured: str = "", env: Optional[Mapping[str, str]] = None) -> SocketChoice:
    """The ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` values for this node (see the module
    docstring for the order); ``env``: the environment the processes would inherit."""
    env = {} if env is None else env
    if configured:
        return SocketChoice({v: configured for v in SOCKET_VARS}, f"{configured} (parallel.socket_ifname)")
    kept = {v: env[v] for v in SOCKET_VARS if env.get(v)}
    if len(kept) == len(SOCKET_VARS):
        return SocketChoice({}, ", ".join(f"{v}={kept[v]}" for v in SOCKET_VARS) + " (from the environment)")
    name, address = interface_towards(master)
    chosen = {v: name for v in SOCKET_VARS if v not in kept}
    reason = f"{name} (holds {address}, this node's address towards {master})"
    if kept:
        reason += "; kept " + ", ".join(f"{v}={value}" for v, value in kept.items()) + " from the environment"
    return SocketChoice(chosen, reason)
