"""SGLang servers behind an ``sglang_router``, driven over HTTP.

One ``sglang.launch_server`` per data-parallel replica (TP inside it), registered with the
router once healthy and in sync. Generation goes through the router, one request per prompt
group (so groups spread over replicas and share their prompt's KV); a failed request is
retried after dead servers are restarted. A restarted server holds the initial weights, so it
is kept out of the router until the next full sync reaches it.

Weight sync, per bucket and per replica, goes straight to the server:
* ``colocated``: CUDA IPC. The bucket is flattened per dtype, copied onto each engine TP
  rank's GPU and serialized once per rank (``update_weights_from_tensor``). The servers must
  run on the node of the trainer's global rank 0, which holds the gathered buckets.
* ``distributed``: NCCL. At the first sync the trainer (rank 0 of a new group) and every engine
  rank join ``init_weights_update_group``; each bucket is announced with
  ``update_weights_from_distributed`` and broadcast tensor by tensor in that order. A restarted
  server is not in that group and a sync that broke off leaves it in an unknown state, so then
  the next sync first tears the group down (``destroy_weights_update_group`` on the survivors)
  and builds a new one under a new name on the next port.
After the last bucket a few replicated tensors are read back with ``get_weights_by_name`` and
compared with what we sent: SGLang skips unknown names with only a warning.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron_klear.errors import ConfigError, EngineError, EngineWeightError, StaleEngineError
from megatron_klear.inference import sglang_api as api
from megatron_klear.inference.base import Bucket, Completion, InferenceEngine, SamplingParams

_GROUP = "megatron_klear_sync"  # generation n of the weight-update group is named f"{_GROUP}_{n}"
# Replicated (never TP-sharded, never fused) tensors whose first rows we read back after a sync.
_VERIFY_SUFFIXES = ("model.norm.weight", "input_layernorm.weight", "post_attention_layernorm.weight")


@dataclass
class SGLangConfig:
    model_path: str = ""
    mode: str = "colocated"  # "colocated" (CUDA IPC) or "distributed" (NCCL broadcast)
    replicas: int = 1  # one server per data-parallel replica
    tp_size: int = 1
    base_gpu_id: int = 0  # replica i uses GPUs base_gpu_id + i * tp_size ...
    host: str = "127.0.0.1"
    port: int = 30000  # replica i listens on port + i
    router_port: int = 30080
    mem_fraction_static: float = 0.5
    dtype: str = "bfloat16"
    extra_args: list[str] = field(default_factory=list)
    # launch=False: servers and router were started elsewhere (the Slurm launcher)
    launch: bool = True
    server_urls: list[str] = field(default_factory=list)
    router_url: Optional[str] = None
    startup_timeout_s: float = 900.0
    request_timeout_s: float = 3600.0
    max_retries: int = 3
    concurrency: int = 64
    log_dir: str = ""  # default: <output_dir>/sglang_logs
    nccl_master_address: Optional[str] = None  # distributed mode; default this host's name
    nccl_master_port: int = 29650  # group generation n uses nccl_master_port + n - 1
    # distributed mode: "nccl", or "gloo" (CPU tensors; slow, for debugging and the CPU tests)
    weight_sync_backend: str = "nccl"
    weight_group_timeout_s: float = 600.0  # every engine rank must join the group within this
    verify_rows: int = 8
    # Slurm: nodes at the end of the allocation that run only engines (distributed mode);
    # 0: the engines share the trainer's first node.
    nodes: int = 0

    def validate(self, where: str = "rollout.sglang") -> None:
        if self.mode not in ("colocated", "distributed"):
            raise ConfigError(f"{where}.mode must be 'colocated' or 'distributed', got {self.mode!r}")
        if not self.launch and (not self.server_urls or not self.router_url):
            raise ConfigError(f"{where}.server_urls and {where}.router_url are required when launch is false")
        if self.weight_sync_backend not in ("nccl", "gloo"):
            raise ConfigError(f"{where}.weight_sync_backend must be 'nccl' or 'gloo', got {self.weight_sync_backend!r}")
        if self.replicas < 1 or self.tp_size < 1:
            raise ConfigError(f"{where}.replicas and {where}.tp_size must be >= 1")
        if self.nodes < 0:
            raise ConfigError(f"{where}.nodes must be >= 0, got {self.nodes}")

    def check_launchable(self, where: str = "rollout.sglang") -> None:
        """What only the final config (model path filled in by the run) must satisfy."""
        if self.launch and not self.model_path:
            raise ConfigError(f"{where}.model_path is required when launch is true")


def server_command(cfg: SGLangConfig, i: int) -> list[str]:
    """The ``sglang.launch_server`` command line of replica ``i``."""
    cmd = [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", cfg.model_path,
        "--tp-size", str(cfg.tp_size),
        "--host", cfg.host,
        "--port", str(cfg.port + i),
        "--base-gpu-id", str(cfg.base_gpu_id + i * cfg.tp_size),
        "--mem-fraction-static", str(cfg.mem_fraction_static),
        "--dtype", cfg.dtype,
    ]  # fmt: skip
    if cfg.mode == "colocated":
        cmd.append("--enable-memory-saver")
    return cmd + list(cfg.extra_args)


def router_command(cfg: SGLangConfig) -> list[str]:
    return [
        sys.executable, "-m", "sglang_router.launch_router",
        "--host", cfg.host, "--port", str(cfg.router_port), "--policy", "cache_aware",
    ]  # fmt: skip


# What torchrun tells its workers. A server started from a trainer rank must not see them:
# with TORCHELASTIC_USE_AGENT_STORE its weight-update rendezvous would go to torchrun's store.
_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # fmt: skip


def server_env() -> dict[str, str]:
    """This process's environment without the distributed launcher's variables."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCHER_VARS and not k.startswith(("TORCHELASTIC_", "TORCH_ELASTIC"))
    }


def spawn_logged(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start a server/router process in its own session, appending its output to ``log``
    (the child keeps its own handle; ours is closed at once)."""
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=server_env())


@dataclass
class _Server:
    url: str
    gpus: list[int]
    proc: Optional[subprocess.Popen] = None
    log: Optional[Path] = None
    stale: bool = False  # holds weights older than the engine's version
    registered: bool = False
    in_group: bool = False  # a member of the current weight-update group (distributed mode)

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None


class SGLangEngine(InferenceEngine):
    """SGLang inference engine; see the module docstring."""

    def __init__(self, cfg: SGLangConfig):
        cfg.validate()
        cfg.check_launchable()
        self.cfg = cfg
        self.version = "initial"
        self.stale = False
        self._lock = threading.Lock()
        self._router_proc: Optional[subprocess.Popen] = None
        self._group = None  # our side of the weight-update group (distributed mode)
        self._group_name = ""
        self._group_generation = 0
        self._sync_open = False  # a sync began and has not finished
        log_dir = Path(cfg.log_dir or "sglang_logs")
        self._router_log = log_dir / "router.log"
        if cfg.launch:
            log_dir.mkdir(parents=True, exist_ok=True)
            self.router_url = f"http://{cfg.host}:{cfg.router_port}"
            self.servers = [
                _Server(
                    f"http://{cfg.host}:{cfg.port + i}",
                    [cfg.base_gpu_id + i * cfg.tp_size + j for j in range(cfg.tp_size)],
                    log=log_dir / f"server_{i}.log",
                )
                for i in range(cfg.replicas)
            ]
            self._router_proc = spawn_logged(router_command(cfg), self._router_log)
            for i, s in enumerate(self.servers):
                s.proc = spawn_logged(server_command(cfg, i), s.log)
        else:
            self.router_url = cfg.router_url.rstrip("/")
            self.servers = [
                _Server(u.rstrip("/"), [cfg.base_gpu_id + j for j in range(cfg.tp_size)]) for u in cfg.server_urls
            ]
        try:
            api.wait_healthy(self.router_url, cfg.startup_timeout_s, path="/health")
            for s in self.servers:
                self._wait(s)
                self._register(s)
        except Exception:
            self.shutdown()
            raise

    # -- processes --------------------------------------------------------------------
    def _wait(self, s: _Server) -> None:
        try:
            api.wait_healthy(s.url, self.cfg.startup_timeout_s, alive=s.alive)
        except EngineError as e:
            raise EngineError(f"{e}; server log: {s.log}") from None

    def _router_alive(self) -> bool:
        return self._router_proc is None or self._router_proc.poll() is None

    def _register(self, s: _Server) -> None:
        api.call(self.router_url + "/workers", api.register_worker_request(s.url), timeout=60)
        s.registered = True

    def _unregister(self, s: _Server) -> None:
        """Take ``s`` out of the router, by URL, or by the worker id the router lists for it
        (routers that key workers by id). A restarted server must not be routed to before its
        resync; should it still be, ``generate`` rejects the samples by their weight version."""
        for key in (s.url, self._router_worker_id(s.url)):
            if key is None:
                continue
            try:
                api.call(f"{self.router_url}/workers/{urllib.parse.quote(key, safe='')}", method="DELETE", timeout=30)
            except EngineError:
                pass  # the router also drops dead workers on its own
            if self._router_worker_id(s.url) is None:
                break
        else:
            print(f"[sglang] the router still lists {s.url} after DELETE /workers", flush=True)
        s.registered = False

    def _router_worker_id(self, url: str) -> Optional[str]:
        """The router's id of the worker at ``url`` (its URL when it gives none); None when
        it does not list it, or cannot be asked."""
        try:
            listed = api.call(self.router_url + "/workers", method="GET", timeout=30)
        except EngineError:
            return None
        workers = listed.get("workers", []) if isinstance(listed, dict) else listed if isinstance(listed, list) else []
        for w in workers:
            w_url = w.get("url") if isinstance(w, dict) else w
            if isinstance(w_url, str) and w_url.rstrip("/") == url.rstrip("/"):
                return str(w.get("id") or w_url) if isinstance(w, dict) else w_url
        return None

    def _recover(self) -> None:
        """Restart a dead router (re-registering the in-sync servers) and dead servers; a
        restarted server rejoins the router only after the next full sync."""
        with self._lock:
            router = self._router_proc
            if router is not None and router.poll() is not None:
                log = self._router_log
                print(f"[sglang] router died (exit {router.returncode}); restarting, log {log}", flush=True)
                self._router_proc = spawn_logged(router_command(self.cfg), log)
                api.wait_healthy(self.router_url, self.cfg.startup_timeout_s, alive=self._router_alive, path="/health")
                for s in self.servers:
                    s.registered = False
                    if s.alive() and not s.stale:
                        self._register(s)
            for i, s in enumerate(self.servers):
                if s.alive():
                    continue
                print(f"[sglang] server {s.url} died (exit {s.proc.returncode}); restarting, log {s.log}", flush=True)
                self._unregister(s)
                s.proc = spawn_logged(server_command(self.cfg, i), s.log)
                s.stale, s.in_group = True, False
                self._wait(s)
            if all(s.stale or not s.registered for s in self.servers):
                self.stale = True
                raise StaleEngineError("no in-sync SGLang server left; the next weight sync restores them")

    # -- generation -------------------------------------------------------------------
    def _request(self, path: str, body: dict, parse):
        last: Optional[Exception] = None
        for attempt in range(self.cfg.max_retries + 1):
            try:
                return parse(api.call(self.router_url + path, body, timeout=self.cfg.request_timeout_s))
            except EngineError as e:
                last = e
                if isinstance(e, StaleEngineError):
                    raise
                self._recover()
                time.sleep(min(2.0**attempt, 30.0))
        raise EngineError(f"{path} failed {self.cfg.max_retries + 1} times; last error: {last}")

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[list[Completion]]:
        self.check_fresh()
        params.validate()

        # Before the first sync the servers hold the checkpoint they loaded, under SGLang's own name.
        version = None if self.version == "initial" else self.version

        def one(prompt: list[int]) -> list[Completion]:
            body = api.generate_request([prompt], params)
            return self._request("/generate", body, lambda r: api.parse_generate_response(r, params.n, version))

        with ThreadPoolExecutor(max(1, min(self.cfg.concurrency, len(prompts)))) as pool:
            return list(pool.map(one, prompts))

    def score(self, sequences: Sequence[list[int]], temperature: float = 1.0) -> list[list[float]]:
        self.check_fresh()
        body = api.score_request(sequences, temperature)
        return self._request("/generate", body, lambda r: api.parse_score_response(r, sequences))

    def abort(self) -> None:
        for s in self.servers:
            api.call(s.url + "/abort_request", api.abort_request(), timeout=60)

    # -- weights ----------------------------------------------------------------------
    def begin_update(self, version: str) -> None:
        self._recover_quietly()
        broke_off = self._sync_open
        self.stale, self._sync_open = True, True
        self._pending_version = version
        self._verify: list[tuple[str, torch.Tensor]] = []
        if self.cfg.mode == "distributed":
            if self._group is not None and (broke_off or not all(s.in_group for s in self.servers)):
                self._leave_group()
            if self._group is None:
                self._init_group()

    def _recover_quietly(self) -> None:
        try:
            self._recover()
        except StaleEngineError:
            pass  # expected: this sync is what restores them

    def update_bucket(self, bucket: Bucket) -> None:
        for name, t in bucket:
            if name.endswith(_VERIFY_SUFFIXES) and len(self._verify) < 4:
                self._verify.append((name, t[: self.cfg.verify_rows].detach().float().cpu().clone()))
        if self.cfg.mode == "colocated":
            self._update_colocated(bucket)
        else:
            self._update_distributed(bucket)

    def _check(self, s: _Server, resp) -> None:
        if isinstance(resp, dict) and resp.get("success") is False:
            raise EngineWeightError(f"{s.url} rejected a weight update: {resp.get('message')}")

    def _update_colocated(self, bucket: Bucket) -> None:
        meta_cls = api.sglang_metadata_cls()
        for sub in api.split_by_dtype(bucket):
            for s in self.servers:
                # keep every flattened copy alive until the server has read it over IPC
                flats = [api.flatten_bucket([(n, t.to(f"cuda:{g}")) for n, t in sub], meta_cls) for g in s.gpus]
                payloads = [api.serialize_payload(f) for f in flats]
                body = api.update_from_tensor_request(payloads, self._pending_version)
                resp = api.call(s.url + "/update_weights_from_tensor", body, timeout=self.cfg.request_timeout_s)
                self._check(s, resp)
                del flats
                torch.cuda.ipc_collect()

    def _update_distributed(self, bucket: Bucket) -> None:
        import torch.distributed as dist

        body = api.update_from_distributed_request(bucket, self._group_name, self._pending_version)
        device = "cuda" if self.cfg.weight_sync_backend == "nccl" else "cpu"
        timeout = self.cfg.request_timeout_s
        with ThreadPoolExecutor(len(self.servers)) as pool:
            futures = [
                pool.submit(api.call, s.url + "/update_weights_from_distributed", body, timeout=timeout)
                for s in self.servers
            ]
            for _, t in bucket:  # the servers receive in the order of ``names``
                dist.broadcast(t.detach().contiguous().to(device), src=0, group=self._group)
            for s, f in zip(self.servers, futures):
                self._check(s, f.result())

    def _init_group(self) -> None:
        """Build the next generation of the weight-update group: us as rank 0, then every
        engine rank at its server's offset. A fresh name and port, so no part of an old group
        (or its rendezvous store) can be mistaken for this one."""
        import socket

        cfg = self.cfg
        self._group_generation += 1
        name = f"{_GROUP}_{self._group_generation}"
        port = cfg.nccl_master_port + self._group_generation - 1
        addr = cfg.nccl_master_address or socket.gethostname()
        world = 1 + len(self.servers) * cfg.tp_size
        bodies = [
            api.init_group_request(addr, port, 1 + i * cfg.tp_size, world, name, cfg.weight_sync_backend)
            for i in range(len(self.servers))
        ]
        print(f"[sglang] weight-update group {name}: world {world} at {addr}:{port}", flush=True)
        timeout = cfg.weight_group_timeout_s
        with ThreadPoolExecutor(len(self.servers)) as pool:  # both sides must join at the same time
            futures = [
                pool.submit(api.call, s.url + "/init_weights_update_group", b, timeout=timeout)
                for s, b in zip(self.servers, bodies)
            ]
            self._group = init_custom_group(
                f"tcp://{addr}:{port}", world, 0, name, cfg.weight_sync_backend, timeout_s=timeout
            )
            self._group_name = name
            for s, f in zip(self.servers, futures):
                self._check(s, f.result())
                s.in_group = True

    def _leave_group(self) -> None:
        """Tear the weight-update group down on every live member and on our side."""
        for s in self.servers:
            if s.in_group and s.alive():
                try:
                    api.call(s.url + "/destroy_weights_update_group", api.destroy_group_request(self._group_name))
                except EngineError as e:  # the next group has a new name, so a leftover cannot clash
                    print(f"[sglang] {s.url} could not leave {self._group_name}: {e}", flush=True)
            s.in_group = False
        print(f"[sglang] weight-update group {self._group_name} torn down", flush=True)
        self._close_group()

    def _close_group(self) -> None:
        """Destroy our side of the weight-update group, if there is one."""
        if self._group is not None:
            import torch.distributed as dist

            dist.destroy_process_group(self._group)
            self._group = None

    def finish_update(self) -> None:
        for s in self.servers:
            for name, ours in self._verify:
                got = api.call(
                    s.url + "/get_weights_by_name",
                    api.weights_by_name_request(name, self.cfg.verify_rows),
                    method="GET",
                )
                if isinstance(got, dict):
                    got = got.get("parameter")
                if got is None:
                    raise EngineWeightError(f"{s.url} does not know the parameter {name!r}; engine stays stale")
                theirs = torch.tensor(got, dtype=torch.float32).reshape(-1)[: ours.numel()]
                if theirs.numel() != ours.numel() or not torch.allclose(theirs, ours.reshape(-1), rtol=1e-2, atol=1e-3):
                    raise EngineWeightError(f"{s.url}: {name} does not match what was sent; engine stays stale")
        for s in self.servers:
            s.stale = False
            if not s.registered:
                self._register(s)
        self.version, self.stale, self._sync_open = self._pending_version, False, False

    # -- memory / lifecycle -----------------------------------------------------------
    def release_memory(self, tags: Sequence[str] = ("weights", "kv_cache", "cuda_graph")) -> None:
        for s in self.servers:
            api.call(s.url + "/release_memory_occupation", api.memory_request(tags), timeout=600)

    def resume_memory(self, tags: Sequence[str] = ("weights", "kv_cache", "cuda_graph")) -> None:
        for s in self.servers:
            api.call(s.url + "/resume_memory_occupation", api.memory_request(tags), timeout=600)

    def health(self) -> bool:
        try:
            for s in self.servers:
                api.call(s.url + "/health", timeout=10)
            return not self.stale
        except EngineError:
            return False

    def shutdown(self) -> None:
        self._close_group()
        procs = [s.proc for s in self.servers if s.proc is not None] + [self._router_proc]
        for p in procs:
            if p is not None and p.poll() is None:
                try:
                    os.killpg(p.pid, 15)
                except ProcessLookupError:
                    pass
        for p in procs:
            if p is not None:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, 9)


def init_custom_group(
    init_method: str, world_size: int, rank: int, name: str, backend: str = "nccl", timeout_s: float = 1800.0
):
    """A process group outside the default one, agreeing with the side SGLang's
    ``init_custom_process_group`` builds: a TCP store hosted by rank 0 at ``init_method``
    (``tcp://host:port``) and ``_new_process_group_helper`` under the group's name as prefix.
    The store is built here rather than by ``rendezvous``: under torchrun, ``rendezvous``
    connects every rank to the elastic agent's store instead (TORCHELASTIC_USE_AGENT_STORE),
    so nobody would host the group's store and both sides would wait for ever."""
    from datetime import timedelta
    from urllib.parse import urlparse

    from torch.distributed import TCPStore
    from torch.distributed.distributed_c10d import PrefixStore, _new_process_group_helper, _world

    url = urlparse(init_method)
    if url.scheme != "tcp" or url.hostname is None or url.port is None:
        raise ValueError(f"init_method must be tcp://host:port, got {init_method!r}")
    timeout = timedelta(seconds=timeout_s)
    store = TCPStore(url.hostname, url.port, world_size, is_master=rank == 0, timeout=timeout, multi_tenant=True)
    pg, _ = _new_process_group_helper(
        world_size, rank, [], backend, PrefixStore(name, store), group_name=name, timeout=timeout
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg
