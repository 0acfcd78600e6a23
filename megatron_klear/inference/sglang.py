"""SGLang servers behind an ``sglang_router``, driven over HTTP (checked against SGLang 0.5.23
and sglang-router 0.3.2, which the tests run for real on CPU).

One ``sglang.launch_server`` per data-parallel replica (TP inside it), started with
``rollout.sglang.python`` (SGLang may live in its own environment), and registered with the
router once healthy and in sync. The router runs without health checks and circuit breaker (a
health probe that generates while the engine's memory is released crashes or 503s it) and with
a request timeout that fits the longest generation; we supervise the servers ourselves.

Generation goes through the router, one request per prompt group (so groups spread over
replicas and share their prompt's KV), every sample with its own seed. ``generate_stream``
submits every prompt at once and yields each group as soon as it is complete. Samples that come
back with finish_reason "abort" (a paused or shutting-down server) are submitted again and
counted. A failed request is retried after dead servers are restarted; a restarted server holds
the initial weights, so it is kept out of the router until the next full sync reaches it.

Weight sync runs inside ``/begin_weight_update`` ... ``/end_weight_update`` on every server
(required since SGLang 0.5.21), bucket by bucket:
* ``colocated``: CUDA IPC (CPU shared memory on CPU). Each bucket goes as one byte-flattened
  tensor per engine TP rank (``update_weights_from_tensor``, load format
  ``flattened_bucket``). The trainer's multi-rank path (``sync.colocated``) has every training
  rank serialize its own GPU's copy and gathers the payloads to the engine's first rank;
  ``update_bucket`` here is the single-process path.
* ``distributed``: NCCL (or gloo on CPU). At the first sync the trainer (rank 0 of a new group)
  and every engine rank join ``init_weights_update_group``; each bucket is announced with
  ``update_weights_from_distributed`` and broadcast as one flattened tensor. While a broadcast
  is in flight the announcements are watched: a server that answers early (it failed) or dies
  aborts the group at once instead of leaving us broadcasting to no receiver. A server left
  inside a receive by a sync that broke off cannot be reached by any request, so it is
  restarted; a restarted server is not in the group, so the next sync builds a new group under
  a new name on the next port.
SGLang 0.5.x cannot read Qwen3 weights back (``/get_weights_by_name`` answers 400), so a sync is
checked by the trainer: the engine's log-probs of a probe at the rollout temperature against its
own (``sync.weights.probe_logprob_diff``), a hard limit.

Memory (colocated): ``release_memory`` pauses generation first, ``resume_memory`` resumes only
the tags this engine released on that server (resuming a tag never released makes SGLang raise
and kill the server) and continues generation once nothing is released any more.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from megatron_klear.errors import ConfigError, EngineError, EngineWeightError, StaleEngineError
from megatron_klear.inference import sglang_api as api
from megatron_klear.inference.base import Bucket, Completion, InferenceEngine, SamplingParams

_GROUP = "megatron_klear_sync"  # generation n of the weight-update group is named f"{_GROUP}_{n}"
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")


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
    # The Python that runs sglang.launch_server and sglang_router (SGLang pins its own torch
    # and transformers, so it often lives in its own venv); empty: this interpreter.
    python: str = ""
    device: str = "cuda"  # "cuda", or "cpu" (SGLang's CPU engine: tests and benchmarks)
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # extra environment of servers and router
    # launch=False: servers and router were started elsewhere (the Slurm launcher)
    launch: bool = True
    server_urls: list[str] = field(default_factory=list)
    router_url: Optional[str] = None
    startup_timeout_s: float = 900.0
    # one generation request (also the router's --request-timeout-secs): fits 32K-token samples
    request_timeout_s: float = 7200.0
    register_timeout_s: float = 120.0  # the router lists a worker within this after POST /workers
    max_retries: int = 3
    concurrency: int = 512  # generation requests in flight (one per prompt group)
    log_dir: str = ""  # default: <output_dir>/sglang_logs
    nccl_master_address: Optional[str] = None  # distributed mode; default this host's name
    nccl_master_port: int = 29650  # group generation n uses nccl_master_port + n - 1
    # distributed mode: "nccl", or "gloo" (CPU tensors; slow, for debugging and the CPU tests)
    weight_sync_backend: str = "nccl"
    weight_group_timeout_s: float = 600.0  # every engine rank must join the group within this
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
        if self.device not in ("cuda", "cpu"):
            raise ConfigError(f"{where}.device must be 'cuda' or 'cpu', got {self.device!r}")
        if self.replicas < 1 or self.tp_size < 1:
            raise ConfigError(f"{where}.replicas and {where}.tp_size must be >= 1")
        if self.nodes < 0:
            raise ConfigError(f"{where}.nodes must be >= 0, got {self.nodes}")
        on_trainer_node = self.launch and self.nodes == 0 and self.device == "cuda"
        if self.mode == "distributed" and on_trainer_node and not self.base_gpu_id:
            # the trainer always holds GPU 0 (rollout_env.placement_problem checks the whole range at start-up)
            raise ConfigError(
                f"{where}.mode=distributed with {where}.nodes=0 and {where}.base_gpu_id=0 starts engines on the "
                f"trainer's GPU 0: set {where}.base_gpu_id to the trainer's GPUs per node, give the engines nodes of "
                f"their own ({where}.nodes), or use mode=colocated"
            )
        if self.python and self.launch and not Path(self.python).is_file():
            raise ConfigError(f"{where}.python={self.python!r} does not exist")

    def check_launchable(self, where: str = "rollout.sglang") -> None:
        """What only the final config (model path filled in by the run) must satisfy."""
        if self.launch and not self.model_path:
            raise ConfigError(f"{where}.model_path is required when launch is true")

    @property
    def interpreter(self) -> str:
        return self.python or sys.executable


def server_command(cfg: SGLangConfig, i: int) -> list[str]:
    """The ``sglang.launch_server`` command line of replica ``i``."""
    cmd = [
        cfg.interpreter, "-m", "sglang.launch_server",
        "--model-path", cfg.model_path,
        "--tp-size", str(cfg.tp_size),
        "--host", cfg.host,
        "--port", str(cfg.port + i),
        "--dtype", cfg.dtype,
    ]  # fmt: skip
    if cfg.device == "cpu":
        # torch_native: the only attention backend without CUDA kernels; sleep-on-idle: an idle
        # scheduler otherwise keeps a core busy (SGLang 0.5.23 on CPU, docs/sglang.md)
        cmd += ["--device", "cpu", "--attention-backend", "torch_native", "--sleep-on-idle"]
    else:
        cmd += [
            "--base-gpu-id",
            str(cfg.base_gpu_id + i * cfg.tp_size),
            "--mem-fraction-static",
            str(cfg.mem_fraction_static),
        ]
        if cfg.mode == "colocated":  # torch_memory_saver: CUDA only
            cmd.append("--enable-memory-saver")
    return cmd + list(cfg.extra_args)


def router_command(cfg: SGLangConfig) -> list[str]:
    """``sglang_router.launch_router`` without health checks and circuit breaker (flags of
    sglang-router 0.3.2's router_args.py): we restart and re-register servers ourselves, and a
    health probe must never generate on a server whose memory is released for training."""
    return [
        cfg.interpreter, "-m", "sglang_router.launch_router",
        "--host", cfg.host, "--port", str(cfg.router_port), "--policy", "cache_aware",
        "--disable-health-check", "--disable-circuit-breaker",
        "--request-timeout-secs", str(int(cfg.request_timeout_s)),
    ]  # fmt: skip


# What torchrun tells its workers. A server started from a trainer rank must not see them:
# with TORCHELASTIC_USE_AGENT_STORE its weight-update rendezvous would go to torchrun's store.
_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # fmt: skip


def server_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """This process's environment without the distributed launcher's variables, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCHER_VARS and not k.startswith(("TORCHELASTIC_", "TORCH_ELASTIC"))
    }
    return {**env, **{str(k): str(v) for k, v in (extra or {}).items()}}  # YAML may give numbers


def spawn_logged(cmd: list[str], log: Path, env: Optional[dict[str, str]] = None) -> subprocess.Popen:
    """Start a server/router process in its own session, appending its output to ``log``
    (the child keeps its own handle; ours is closed at once)."""
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=server_env(env))


def stop_process(p: Optional[subprocess.Popen], grace_s: float = 30.0) -> None:
    """SIGTERM the process group of ``p``, SIGKILL it after ``grace_s``; waits for the exit."""
    if p is None:
        return
    if p.poll() is None:
        try:
            os.killpg(p.pid, 15)
        except ProcessLookupError:
            pass
    try:
        p.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, 9)
        except ProcessLookupError:
            pass
        p.wait(timeout=grace_s)


@dataclass
class _Server:
    url: str
    gpus: list[int]
    proc: Optional[subprocess.Popen] = None
    log: Optional[Path] = None
    stale: bool = False  # holds weights older than the engine's version
    registered: bool = False
    in_group: bool = False  # a member of the current weight-update group (distributed mode)
    released: set = field(default_factory=set)  # memory tags this engine released on it
    paused: bool = False  # /pause_generation sent, /continue_generation not yet
    in_update: bool = False  # /begin_weight_update sent, /end_weight_update not yet
    receiving: bool = False  # an /update_weights_from_distributed call has not returned

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None


@dataclass
class ColocatedTarget:
    """Where the payloads of one colocated server go: its URL and the GPUs of its TP ranks,
    in TP order (payload i is read by TP rank i, on ``gpus[i]``)."""

    url: str
    gpus: list[int]


class SGLangEngine(InferenceEngine):
    """SGLang inference engine; see the module docstring."""

    def __init__(self, cfg: SGLangConfig):
        cfg.validate()
        cfg.check_launchable()
        self.cfg = cfg
        self.version = "initial"
        self.stale = False
        self.aborted_samples = 0  # samples that came back "abort" and were submitted again
        self._lock = threading.Lock()
        self._router_proc: Optional[subprocess.Popen] = None
        self._group = None  # our side of the weight-update group (distributed mode)
        self._group_name = ""
        self._group_generation = 0
        self._sync_open = False  # a sync began and has not finished
        self._pending_version = ""
        self._shut_down = False  # set by shutdown: from then on nothing is (re)started
        log_dir = Path(cfg.log_dir or "sglang_logs")
        self._router_log = log_dir / "router.log"
        if cfg.device == "cpu":
            api.share_cpu_tensors()
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
            self._router_proc = spawn_logged(router_command(cfg), self._router_log, cfg.env)
            for i, s in enumerate(self.servers):
                s.proc = spawn_logged(server_command(cfg, i), s.log, cfg.env)
        else:
            self.router_url = cfg.router_url.rstrip("/")
            self.servers = [
                _Server(u.rstrip("/"), [cfg.base_gpu_id + j for j in range(cfg.tp_size)]) for u in cfg.server_urls
            ]
        try:
            api.wait_healthy(self.router_url, cfg.startup_timeout_s, alive=self._router_alive, path="/health")
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

    def _listed_workers(self) -> list[dict]:
        listed = api.call(self.router_url + "/workers", method="GET", timeout=30)
        workers = listed.get("workers", []) if isinstance(listed, dict) else listed
        return [w if isinstance(w, dict) else {"url": w} for w in workers or []]

    def _router_worker_id(self, url: str) -> Optional[str]:
        """The router's id of the worker at ``url``; None when it does not list it."""
        for w in self._listed_workers():
            if str(w.get("url", "")).rstrip("/") == url.rstrip("/"):
                return str(w.get("id") or w["url"])
        return None

    def _await_listing(self, s: _Server, listed: bool) -> None:
        """Wait (bounded) until the router lists ``s`` (or no longer does): sglang-router adds
        and removes workers in the background after answering 202."""
        deadline = time.time() + self.cfg.register_timeout_s
        while (self._router_worker_id(s.url) is not None) != listed:
            if time.time() > deadline:
                what = "list" if listed else "drop"
                raise EngineError(f"the router did not {what} {s.url} within {self.cfg.register_timeout_s:.0f} s")
            time.sleep(0.2)

    def _register(self, s: _Server) -> None:
        if self._router_worker_id(s.url) is None:
            api.call(self.router_url + "/workers", api.register_worker_request(s.url), timeout=60)
            self._await_listing(s, True)
        s.registered = True

    def _unregister(self, s: _Server) -> None:
        """Take ``s`` out of the router by the id it lists for it (0.3.2 rejects a URL there).
        Should a restarted server still be routed to, ``generate`` rejects its samples by
        their weight version."""
        try:
            wid = self._router_worker_id(s.url)
            if wid is not None:
                api.call(f"{self.router_url}/workers/{urllib.parse.quote(wid, safe='')}", method="DELETE", timeout=30)
                self._await_listing(s, False)
        except EngineError as e:
            print(f"[sglang] could not take {s.url} out of the router: {e}", flush=True)
        s.registered = False

    def _restart(self, why: dict[int, str]) -> None:
        """Stop the servers ``why`` names (if alive) and start them again, all at once, then
        wait for them; each holds the initial weights, so it is stale and out of the router
        until the next sync reaches it."""
        if self._shut_down:
            raise EngineError("the SGLang engine was shut down")
        for i, reason in why.items():
            s = self.servers[i]
            if s.proc is None:
                raise EngineError(f"{s.url} {reason}, and it was started elsewhere (launch=false): restart it there")
            print(f"[sglang] server {s.url} {reason}; restarting, log {s.log}", flush=True)
            self._unregister(s)
            stop_process(s.proc, grace_s=10)
            s.proc = spawn_logged(server_command(self.cfg, i), s.log, self.cfg.env)
            s.stale, s.registered, s.released = True, False, set()
            s.in_group = s.in_update = s.receiving = s.paused = False
        for i in why:
            self._wait(self.servers[i])

    def _recover(self) -> None:
        """Restart a dead router (re-registering the in-sync servers) and dead servers; a
        restarted server rejoins the router only after the next full sync."""
        with self._lock:
            if self._shut_down:  # a request still in flight must not bring servers back
                raise EngineError("the SGLang engine was shut down")
            router = self._router_proc
            if router is not None and router.poll() is not None:
                log = self._router_log
                print(f"[sglang] router died (exit {router.returncode}); restarting, log {log}", flush=True)
                self._router_proc = spawn_logged(router_command(self.cfg), log, self.cfg.env)
                api.wait_healthy(self.router_url, self.cfg.startup_timeout_s, alive=self._router_alive, path="/health")
                for s in self.servers:
                    s.registered = False
                    if s.alive() and not s.stale:
                        self._register(s)
            self._restart({i: f"died (exit {s.proc.returncode})" for i, s in enumerate(self.servers) if not s.alive()})
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

    def _sample(self, prompt: list[int], params: SamplingParams, seed: Optional[int]) -> Completion:
        """One sample; if it comes back aborted (a paused or stopping server) it is submitted
        again with the same seed, and counted."""
        version = None if self.version == "initial" else self.version  # SGLang names its own first
        body = api.generate_request(prompt, params, seed)
        for _ in range(self.cfg.max_retries + 1):
            [c] = self._request("/generate", body, lambda r: api.parse_generate_response(r, 1, version))
            if c.finish_reason != "abort":
                return c
            with self._lock:
                self.aborted_samples += 1
        raise EngineError(f"a sample was still aborted after {self.cfg.max_retries + 1} submissions")

    def generate_stream(
        self, prompts: Sequence[list[int]], params: SamplingParams
    ) -> Iterator[tuple[int, list[Completion]]]:
        """Submit every sample of every prompt at once; yield ``(prompt index, its n
        completions)`` as each group completes. Sample j of prompt i has seed
        ``params.seed + i * n + j``."""
        self.check_fresh()
        params.validate()
        self._supervise()
        n = params.n
        workers = max(1, min(self.cfg.concurrency, len(prompts) * n))
        with ThreadPoolExecutor(workers, thread_name_prefix="sglang-gen") as pool:
            futures: dict[Future, tuple[int, int]] = {}
            for i, p in enumerate(prompts):
                for j, seed in enumerate(api.sample_seeds(params, i * n, n)):
                    futures[pool.submit(self._sample, list(p), params, seed)] = (i, j)
            groups: dict[int, list[Optional[Completion]]] = {}
            try:
                for f in as_completed(futures):
                    i, j = futures[f]
                    group = groups.setdefault(i, [None] * n)
                    group[j] = f.result()
                    if all(c is not None for c in group):
                        yield i, groups.pop(i)
            finally:
                for f in futures:
                    f.cancel()
        self._supervise()  # the router may have retried around a server that died meanwhile

    def _supervise(self) -> None:
        """Restart what died (``_recover``) even when no request failed."""
        if not self._router_alive() or not all(s.alive() for s in self.servers):
            self._recover()

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[list[Completion]]:
        out: list[list[Completion]] = [[] for _ in prompts]
        for i, group in self.generate_stream(prompts, params):
            out[i] = group
        return out

    def score(self, sequences: Sequence[list[int]], temperature: float = 1.0) -> list[list[float]]:
        """Input log-probs at temperature 1 only: SGLang ignores the temperature for them
        (compare at another temperature with sampled tokens, as ``probe_logprob_diff`` does)."""
        if temperature != 1.0:
            raise EngineError(f"SGLang scores input tokens at temperature 1 only, asked for {temperature}")
        self.check_fresh()
        body = api.score_request(sequences)
        return self._request("/generate", body, lambda r: api.parse_score_response(r, sequences))

    def abort(self) -> None:
        for s in self.servers:
            api.call(s.url + "/abort_request", api.abort_request(), timeout=60)

    # -- weights ----------------------------------------------------------------------
    def _post(self, s: _Server, path: str, body: dict, timeout: Optional[float] = None):
        return api.post_checked(s.url + path, body, timeout or self.cfg.request_timeout_s)

    def begin_update(self, version: str) -> None:
        self._recover_quietly()
        if self._sync_open:
            self._clean_up_broken_sync()
        self.stale, self._sync_open = True, True
        self._pending_version = version
        if self.cfg.mode == "distributed":
            if self._group is not None and not all(s.in_group for s in self.servers):
                self._leave_group()
            if self._group is None:
                self._init_group()
        for s in self.servers:
            self._post(s, "/begin_weight_update", api.begin_update_request(), timeout=300)
            s.in_update = True

    def _recover_quietly(self) -> None:
        try:
            self._recover()
        except StaleEngineError:
            pass  # expected: this sync is what restores them

    def _clean_up_broken_sync(self) -> None:
        """After a sync that never finished: a server of the weight group may be blocked in a
        receive that no request can reach, so those are restarted (and the group rebuilt);
        other servers only close their open update session."""
        print(f"[sglang] the previous weight sync ({self._pending_version}) broke off", flush=True)
        blocked = {i for i, s in enumerate(self.servers) if s.receiving and s.alive()}
        self._restart({i: "may be blocked in a weight receive of a sync that broke off" for i in blocked})
        for i, s in enumerate(self.servers):
            if i not in blocked and s.in_update:
                try:
                    self._post(s, "/end_weight_update", api.end_update_request(), timeout=300)
                except EngineError as e:
                    print(f"[sglang] {s.url} did not close its update session: {e}", flush=True)
                s.in_update = False
        if self._group is not None and not all(s.in_group for s in self.servers):
            self._leave_group()

    def update_bucket(self, bucket: Bucket) -> None:
        if self.cfg.mode == "colocated":
            self._update_colocated(bucket)
        else:
            self._update_distributed(bucket)

    def colocated_targets(self) -> Optional[list[ColocatedTarget]]:
        """Colocated mode: every server's URL and GPUs (for ``sync.colocated``); else None."""
        if self.cfg.mode != "colocated":
            return None
        return [ColocatedTarget(s.url, list(s.gpus)) for s in self.servers]

    def _update_colocated(self, bucket: Bucket) -> None:
        """Single-process colocated update: this process holds the bucket and serializes one
        copy per engine TP rank (on that rank's GPU; one shared copy on CPU); servers in
        parallel. The trainer's multi-rank path is ``sync.colocated``."""
        flat, meta = api.flatten_bucket(api.bucket_order(bucket))

        def one(s: _Server) -> None:
            copies = [flat] * len(s.gpus) if self.cfg.device == "cpu" else [flat.to(f"cuda:{g}") for g in s.gpus]
            payloads = [api.serialize_payload(c, meta) for c in copies]
            self._post(
                s, "/update_weights_from_tensor", api.update_from_tensor_request(payloads, self._pending_version)
            )
            del copies  # alive until the server has answered

        with ThreadPoolExecutor(len(self.servers)) as pool:
            for f in [pool.submit(one, s) for s in self.servers]:
                f.result()
        if self.cfg.device == "cuda":
            torch.cuda.ipc_collect()

    def _update_distributed(self, bucket: Bucket) -> None:
        ordered = api.bucket_order(bucket)
        body = api.update_from_distributed_request(ordered, self._group_name, self._pending_version)
        device = "cuda" if self.cfg.weight_sync_backend == "nccl" else "cpu"
        flat, _ = api.flatten_bucket([(n, t.to(device)) for n, t in ordered])

        def receive(s: _Server) -> None:
            s.receiving = True
            self._post(s, "/update_weights_from_distributed", body)
            s.receiving = False  # left True when the call fails: the server may still be receiving

        pool = ThreadPoolExecutor(len(self.servers), thread_name_prefix="sglang-recv")
        try:
            futures = [pool.submit(receive, s) for s in self.servers]
            self._broadcast_watched(flat, futures)
            for f in futures:
                f.result()
        finally:  # never wait here for a server stuck in a receive: the next sync restarts it
            pool.shutdown(wait=False)

    def _broadcast_watched(self, flat: torch.Tensor, futures: list[Future]) -> None:
        """Broadcast ``flat`` to the group while watching the servers' announcements: one that
        returns before the broadcast completes has failed (or its server died), so nobody may
        be receiving; abort the group then rather than wait for ever."""
        import torch.distributed as dist

        work = dist.broadcast(flat, src=0, group=self._group, async_op=True)
        while not work.is_completed():
            failed = [
                (s, f)
                for s, f in zip(self.servers, futures)
                if (f.done() and f.exception() is not None) or not s.alive()
            ]
            if failed:
                s, f = failed[0]
                why = f.exception() if f.done() and f.exception() is not None else "the server died"
                self._abort_group()
                raise EngineWeightError(f"weight broadcast aborted: {s.url} failed during it ({why})")
            time.sleep(0.005)
        try:
            work.wait()
        except RuntimeError as e:  # the transport saw a peer go first (gloo: "connection closed")
            self._abort_group()
            raise EngineWeightError(f"weight broadcast aborted: {e}") from e

    def _abort_group(self) -> None:
        """Give up the current group on our side. Its members leave it with the next sync:
        those blocked in the receive are restarted, the others join a new group by name."""
        for s in self.servers:
            s.in_group = False
        group, self._group = self._group, None
        if group is None:
            return
        if self.cfg.weight_sync_backend == "gloo":
            # gloo cannot cancel: aborting or destroying the group waits for the pending
            # broadcast until the group's timeout, so it is dropped unused and times out alone
            print(f"[sglang] weight-update group {self._group_name} dropped (its pending broadcast times out)")
            return
        group.abort()  # NCCL: cancels the pending broadcast; then the group can be destroyed
        self._close(group)

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
                pool.submit(self._post, s, "/init_weights_update_group", b, timeout)
                for s, b in zip(self.servers, bodies)
            ]
            self._group = init_custom_group(
                f"tcp://{addr}:{port}", world, 0, name, cfg.weight_sync_backend, timeout_s=timeout
            )
            self._group_name = name
            for s, f in zip(self.servers, futures):
                f.result()
                s.in_group = True

    def _leave_group(self) -> None:
        """Tear the weight-update group down on every live member and on our side."""
        for s in self.servers:
            if s.in_group and s.alive():
                try:
                    self._post(s, "/destroy_weights_update_group", api.destroy_group_request(self._group_name), 60)
                except EngineError as e:  # the next group has a new name, so a leftover cannot clash
                    print(f"[sglang] {s.url} could not leave {self._group_name}: {e}", flush=True)
            s.in_group = False
        print(f"[sglang] weight-update group {self._group_name} torn down", flush=True)
        group, self._group = self._group, None
        self._close(group)

    @staticmethod
    def _close(group) -> None:
        if group is not None:
            import torch.distributed as dist

            dist.destroy_process_group(group)

    def finish_update(self) -> None:
        for s in self.servers:
            self._post(s, "/end_weight_update", api.end_update_request(), timeout=300)
            s.in_update = False
        for s in self.servers:
            s.stale = False
            if not s.registered:
                self._register(s)
        self.version, self.stale, self._sync_open = self._pending_version, False, False

    # -- memory / lifecycle -----------------------------------------------------------
    def release_memory(self, tags: Sequence[str] = MEMORY_TAGS) -> None:
        """Pause generation (in-flight samples come back "abort" and are resubmitted later),
        then release ``tags`` on every server (only those not released already)."""
        api.memory_request(tags)
        self._each_server(lambda s: self._release(s, tags))

    def _release(self, s: _Server, tags: Sequence[str]) -> None:
        if not s.paused:
            api.call(s.url + "/pause_generation", api.pause_request(), timeout=600)
            s.paused = True
        todo = [t for t in tags if t not in s.released]
        if todo:
            api.call(s.url + "/release_memory_occupation", api.memory_request(todo), timeout=600)
            s.released.update(todo)

    def resume_memory(self, tags: Sequence[str] = MEMORY_TAGS) -> None:
        """Resume those of ``tags`` that this engine released on each server; continue
        generation on a server once nothing is released there any more."""
        api.memory_request(tags)
        self._each_server(lambda s: self._resume(s, tags))

    def _resume(self, s: _Server, tags: Sequence[str]) -> None:
        todo = [t for t in tags if t in s.released]
        if todo:
            api.call(s.url + "/resume_memory_occupation", api.memory_request(todo), timeout=600)
            s.released.difference_update(todo)
        if s.paused and not s.released:
            api.call(s.url + "/continue_generation", api.continue_request(), timeout=600)
            s.paused = False

    def _each_server(self, fn: Callable[[_Server], None]) -> None:
        with ThreadPoolExecutor(len(self.servers)) as pool:
            for f in [pool.submit(fn, s) for s in self.servers]:
                f.result()

    def health(self) -> bool:
        try:
            for s in self.servers:
                api.call(s.url + "/health", timeout=10)
            return not self.stale
        except EngineError:
            return False

    def shutdown(self) -> None:
        with self._lock:
            self._shut_down = True
        group, self._group = self._group, None
        self._close(group)
        for p in [s.proc for s in self.servers] + [self._router_proc]:
            stop_process(p)


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
