"""The broadcast weight transport of SGLang servers on their own GPUs (``rollout.sglang.mode=
distributed``): NCCL, or gloo on CPU.

At the first sync the trainer (rank 0 of a new group) and every engine rank join
``/init_weights_update_group``; each bucket is announced with
``/update_weights_from_distributed`` and broadcast as one flattened tensor
(``inference.sglang_api.flatten_bucket``). While a broadcast is in flight the announcements are
watched: a server that answers early (it failed) or dies aborts the group at once instead of
leaving us broadcasting to no receiver. A server left inside a receive by a sync that broke off
cannot be reached by any request (``blocked``): the engine restarts it, and a restarted server
is not in the group, so the next sync builds a new group under a new name on the next port.

Layer: the engine (``inference.sglang``) calls this module, so it sits beside the engines
(tests/unit/test_style.py: ``MODULE_LAYERS``) and imports nothing above them. The process group
outside the default one needs torch internals: ``init_custom_group`` is the one function that
touches them.
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Optional
from urllib.parse import urlparse

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _new_process_group_helper, _world  # init_custom_group only

from megatron_klear.errors import ConfigError, EngineError, EngineWeightError
from megatron_klear.inference import sglang_api as api
from megatron_klear.inference.base import Bucket
from megatron_klear.inference.sglang_servers import Server, ServerPool, SGLangConfig

GROUP_PREFIX = "megatron_klear_sync"  # generation n of the weight-update group is named f"{GROUP_PREFIX}_{n}"


def init_custom_group(
    init_method: str, world_size: int, rank: int, name: str, backend: str = "nccl", timeout_s: float = 1800.0
) -> dist.ProcessGroup:
    """A process group outside the default one, agreeing with the side SGLang's
    ``init_custom_process_group`` builds: a TCP store hosted by rank 0 at ``init_method``
    (``tcp://host:port``) and the group created under its name as the store prefix.

    torch has no public API for a group outside the default one (``new_group`` needs the
    default group and takes a subset of it), and SGLang builds its side with
    ``torch.distributed.distributed_c10d._new_process_group_helper``; so does this function,
    the one place that touches torch internals (``_new_process_group_helper``, ``_world``).
    Tested with torch 2.13.0 on both sides (the trainer and SGLang 0.5.23's environment).
    The store is built here rather than by ``rendezvous``: under torchrun, ``rendezvous``
    connects every rank to the elastic agent's store instead (TORCHELASTIC_USE_AGENT_STORE),
    so nobody would host the group's store and both sides would wait for ever."""
    url = urlparse(init_method)
    if url.scheme != "tcp" or url.hostname is None or url.port is None:
        raise ConfigError(f"the weight-update group's address must be tcp://host:port, got {init_method!r}")
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(url.hostname, url.port, world_size, is_master=rank == 0, timeout=timeout, multi_tenant=True)
    pg, _ = _new_process_group_helper(
        world_size, rank, [], backend, dist.PrefixStore(name, store), group_name=name, timeout=timeout
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


class BroadcastTransport:
    """Our side of the weight-update group, generation by generation (module docstring)."""

    def __init__(self, pool: ServerPool, cfg: SGLangConfig):
        self.pool, self.cfg = pool, cfg
        self.group: Optional[dist.ProcessGroup] = None
        self.group_name = ""
        self.generation = 0

    def open(self) -> None:
        """Before a sync: a group every server is in (a new one when a server left it)."""
        if self.group is not None and not all(s.in_group for s in self.pool.servers):
            self.leave()
        if self.group is None:
            self.join()

    def send(self, bucket: Bucket, version: str) -> None:
        """Announce ``bucket`` to every server and broadcast it, watching the announcements."""
        ordered = api.bucket_order(bucket)
        body = api.update_from_distributed_request(ordered, self.group_name, version)
        device = "cuda" if self.cfg.weight_sync_backend == "nccl" else "cpu"
        flat, _ = api.flatten_bucket([(n, t.to(device)) for n, t in ordered])

        def receive(s: Server) -> None:
            s.receiving = True
            self.pool.post(s, "/update_weights_from_distributed", body)
            s.receiving = False  # left True when the call fails: the server may still be receiving

        pool = ThreadPoolExecutor(len(self.pool.servers), thread_name_prefix="sglang-recv")
        try:
            futures = [pool.submit(receive, s) for s in self.pool.servers]
            self.broadcast_watched(flat, futures)
            for f in futures:
                f.result()
        finally:  # never wait here for a server stuck in a receive: the next sync restarts it
            pool.shutdown(wait=False)

    def broadcast_watched(self, flat: torch.Tensor, futures: list[Future]) -> None:
        """Broadcast ``flat`` to the group while watching the servers' announcements: one that
        returns before the broadcast completes has failed (or its server died), so nobody may
        be receiving; abort the group then rather than wait for ever."""
        work = dist.broadcast(flat, src=0, group=self.group, async_op=True)
        while not work.is_completed():
            failed = [
                (s, f)
                for s, f in zip(self.pool.servers, futures)
                if (f.done() and f.exception() is not None) or not s.alive()
            ]
            if failed:
                s, f = failed[0]
                why = f.exception() if f.done() and f.exception() is not None else "the server died"
                self.abort()
                raise EngineWeightError(f"weight broadcast aborted: {s.url} failed during it ({why})")
            time.sleep(0.005)
        try:
            work.wait()
        except RuntimeError as e:  # the transport saw a peer go first (gloo: "connection closed")
            self.abort()
            raise EngineWeightError(f"weight broadcast aborted: {e}") from e

    def blocked(self) -> set[int]:
        """The live servers a broken-off sync left inside a receive, where no request reaches
        them: the engine restarts these."""
        return {i for i, s in enumerate(self.pool.servers) if s.receiving and s.alive()}

    def abort(self) -> None:
        """Give up the current group on our side. Its members leave it with the next sync:
        those blocked in the receive are restarted, the others join a new group by name."""
        for s in self.pool.servers:
            s.in_group = False
        group, self.group = self.group, None
        if group is None:
            return
        if self.cfg.weight_sync_backend == "gloo":
            # gloo cannot cancel: aborting or destroying the group waits for the pending
            # broadcast until the group's timeout, so it is dropped unused and times out alone
            print(f"[sglang] weight-update group {self.group_name} dropped (its pending broadcast times out)")
            return
        group.abort()  # NCCL: cancels the pending broadcast; then the group can be destroyed
        dist.destroy_process_group(group)

    def join(self) -> None:
        """Build the next generation of the weight-update group: us as rank 0, then every
        engine rank at its server's offset. A fresh name and port, so no part of an old group
        (or its rendezvous store) can be mistaken for this one."""
        cfg, servers = self.cfg, self.pool.servers
        self.generation += 1
        name = f"{GROUP_PREFIX}_{self.generation}"
        port = cfg.nccl_master_port + self.generation - 1
        addr = cfg.nccl_master_address or socket.gethostname()
        world = 1 + len(servers) * cfg.tp_size
        bodies = [
            api.init_group_request(addr, port, 1 + i * cfg.tp_size, world, name, cfg.weight_sync_backend)
            for i in range(len(servers))
        ]
        print(f"[sglang] weight-update group {name}: world {world} at {addr}:{port}", flush=True)
        timeout = cfg.weight_group_timeout_s
        with ThreadPoolExecutor(len(servers)) as pool:  # both sides must join at the same time
            futures = [
                pool.submit(self.pool.post, s, "/init_weights_update_group", b, timeout)
                for s, b in zip(servers, bodies)
            ]
            self.group = init_custom_group(
                f"tcp://{addr}:{port}", world, 0, name, cfg.weight_sync_backend, timeout_s=timeout
            )
            self.group_name = name
            for s, f in zip(servers, futures):
                f.result()
                s.in_group = True

    def leave(self) -> None:
        """Tear the weight-update group down on every live member and on our side."""
        for s in self.pool.servers:
            if s.in_group and s.alive():
                try:
                    self.pool.post(s, "/destroy_weights_update_group", api.destroy_group_request(self.group_name), 60)
                except EngineError as e:  # the next group has a new name, so a leftover cannot clash
                    print(f"[sglang] {s.url} could not leave {self.group_name}: {e}", flush=True)
            s.in_group = False
        print(f"[sglang] weight-update group {self.group_name} torn down", flush=True)
        self.close()

    def after_restart(self) -> None:
        """After servers were restarted (they are no longer members): leave the group."""
        if self.group is not None and not all(s.in_group for s in self.pool.servers):
            self.leave()

    def close(self) -> None:
        """Destroy our side of the group (at shutdown, or after leaving it)."""
        group, self.group = self.group, None
        if group is not None:
            dist.destroy_process_group(group)
