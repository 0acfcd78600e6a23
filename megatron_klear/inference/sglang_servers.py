"""SGLang servers and their router as processes: launch, health, registration, restart.

One ``sglang.launch_server`` per data-parallel replica (TP inside it), started with
``rollout.sglang.python`` (SGLang may live in its own environment), and one
``sglang_router.launch_router`` without health checks and circuit breaker (a health probe that
generates while the engine's memory is released crashes or 503s it), with a request timeout
that fits the longest generation. ``ServerPool`` supervises them: it registers a server with
the router once it is healthy and in sync, and restarts what died. A restarted server holds the
initial weights, so it is stale and kept out of the router until the next full sync reaches it.
Checked against SGLang 0.5.23 and sglang-router 0.3.2 (tests/e2e/test_sglang_real.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from megatron_klear.distributed import free_port
from megatron_klear.errors import ConfigError, EngineError
from megatron_klear.inference import http
from megatron_klear.inference import sglang_api as api
from megatron_klear.models.config import Qwen3Config, read_config_dict, served_config


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
    # The router's Prometheus port. sglang-router 0.3.2 defaults to 29000 and dies when a second
    # router on the node holds it; unset: a free port at each start.
    router_metrics_port: Optional[int] = None
    # --enable-deterministic-inference: SGLang 0.5.23 honours the per-sample seeds we send
    # (sampling_seed) only with it, and runs slower (batch-invariant kernels). Without it a rerun
    # samples differently. Needs the attention backends SGLang names for it (fa3, flashinfer,
    # triton...); its CPU engine's torch_native backend refuses it.
    deterministic: bool = False
    # Long context: YaRN for the served model, merged into its config's RoPE dict key by key, e.g.
    # {rope_type: yarn, factor: 2.5, original_max_position_embeddings: 32768} (the paper's 64K
    # evaluation). In RL it must be the model's own (the trainer applies the model's config.json).
    rope_scaling: Optional[dict] = None
    context_length: Optional[int] = None  # tokens a server accepts; default: what the model reaches

    def check_apart_from_trainer(self, where: str = "rollout.sglang") -> None:
        """Distributed engines of a training run must not start on the trainer's GPUs (an
        evaluation has no trainer, so only RL's config calls this)."""
        on_trainer_node = self.launch and self.nodes == 0 and self.device == "cuda"
        if self.mode == "distributed" and on_trainer_node and not self.base_gpu_id:
            # the trainer always holds GPU 0 (rollout_env.placement_problem checks the whole range at start-up)
            raise ConfigError(
                f"{where}.mode=distributed with {where}.nodes=0 and {where}.base_gpu_id=0 starts engines on the "
                f"trainer's GPU 0: set {where}.base_gpu_id to the trainer's GPUs per node, give the engines nodes of "
                f"their own ({where}.nodes), or use mode=colocated"
            )

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
        if self.python and self.launch and not Path(self.python).is_file():
            raise ConfigError(f"{where}.python={self.python!r} does not exist")
        if self.deterministic and self.device == "cpu":
            raise ConfigError(
                f"{where}.deterministic=true needs a GPU attention backend: SGLang's CPU engine (torch_native) "
                "refuses --enable-deterministic-inference"
            )
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ConfigError(f"{where}.rope_scaling must be a dict (HF rope_parameters), got {self.rope_scaling!r}")
        if self.context_length is not None and (not isinstance(self.context_length, int) or self.context_length < 1):
            raise ConfigError(f"{where}.context_length must be a positive integer, got {self.context_length!r}")

    def check_launchable(self, where: str = "rollout.sglang") -> None:
        """What only the final config (model path filled in by the run) must satisfy."""
        if self.launch and not self.model_path:
            raise ConfigError(f"{where}.model_path is required when launch is true")
        if self.launch and (self.rope_scaling is not None or self.context_length is not None):
            long_context_args(self, where)

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
    if cfg.deterministic:
        cmd.append("--enable-deterministic-inference")
    return cmd + long_context_args(cfg) + list(cfg.extra_args)


def served_model(cfg: SGLangConfig, where: str = "rollout.sglang") -> tuple[Optional[dict], Optional[int]]:
    """``(HF config dict, context length)`` the servers run ``cfg.model_path`` with
    (``models.config.served_config``); ``(None, None)`` when the model directory has no
    config.json here (servers started elsewhere) and nothing is asked of the positions."""
    path = Path(cfg.model_path) / "config.json"
    if not path.is_file():
        if cfg.rope_scaling is not None or cfg.context_length is not None:
            raise ConfigError(f"{where}.rope_scaling / context_length: {path} is not there to apply them to")
        return None, None
    return served_config(read_config_dict(cfg.model_path), cfg.rope_scaling, cfg.context_length, str(path), where)


def check_training_positions(
    cfg: SGLangConfig, model: Qwen3Config, longest: int, where: str = "rollout.sglang"
) -> None:
    """RL: the servers rotate positions as the trainer does (the trainer applies the model's own
    config.json, so ``rope_scaling`` may only restate it) and accept the longest sequence."""
    if cfg.rope_scaling is None and cfg.context_length is None:
        return
    served, context = served_config(model.raw, cfg.rope_scaling, cfg.context_length, "the model's config.json", where)
    scaling = Qwen3Config.from_dict(served, where).rope_scaling
    if scaling != model.rope_scaling:
        raise ConfigError(
            f"{where}.rope_scaling gives the engine {scaling} but the trainer applies the model's config.json "
            f"({model.rope_scaling}): the RL ratios would compare different models; put the scaling in the "
            f"model's config.json instead"
        )
    if context < longest:
        raise ConfigError(f"{where}.context_length={context} is shorter than the longest rollout sequence ({longest})")


def long_context_args(cfg: SGLangConfig, where: str = "rollout.sglang") -> list[str]:
    """The ``launch_server`` flags for the model's positions: for YaRN (the model's own or
    ``rope_scaling``) the complete RoPE dict and ``max_position_embeddings`` in
    ``--json-model-override-args`` (SGLang merges it into the model's config; with a key missing
    its YaRN defaults differ from transformers'), and ``--context-length``; nothing for plain
    RoPE at the model's own context."""
    served, context = served_model(cfg, where)
    if served is None:
        return []
    args = []
    if Qwen3Config.from_dict(served, where).rope_scaling is not None:
        override = {k: served[k] for k in ("rope_parameters", "max_position_embeddings")}
        args += ["--json-model-override-args", json.dumps(override, sort_keys=True)]
    if args or cfg.context_length is not None:
        args += ["--context-length", str(context)]
    return args


def server_environment(cfg: SGLangConfig) -> dict[str, str]:
    """What a server's environment adds to ``cfg.env``: on SGLang 0.5.23 ``GET /health``
    generates a token unless SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0, and a paused server
    (memory released, or a weight sync under way) holds that request, so the router, whose
    add-worker calls /health, could not register it. Readiness is ``/health_generate``."""
    return {"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "0", **{str(k): str(v) for k, v in cfg.env.items()}}


def router_command(cfg: SGLangConfig) -> list[str]:
    """``sglang_router.launch_router`` (flags of sglang-router 0.3.2's router_args.py) without
    health checks and circuit breaker: we restart and re-register servers ourselves, and a
    health probe must never generate on a server whose memory is released for training. Without
    retries too: the engine retries a failed request itself (``max_retries``) after restarting
    what died, and the router's own 5 would multiply them. Its metrics go to
    ``router_metrics_port`` (or a free port)."""
    metrics = cfg.router_metrics_port or free_port()
    return [
        cfg.interpreter, "-m", "sglang_router.launch_router",
        "--host", cfg.host, "--port", str(cfg.router_port), "--policy", "cache_aware",
        "--disable-health-check", "--disable-circuit-breaker", "--disable-retries",
        "--request-timeout-secs", str(int(cfg.request_timeout_s)),
        "--prometheus-port", str(metrics),
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
class Server:
    """One SGLang server (a data-parallel replica) and what this process knows of its state."""

    url: str
    gpus: list[int]
    proc: Optional[subprocess.Popen] = None
    log: Optional[Path] = None
    stale: bool = False  # holds weights older than the engine's version
    registered: bool = False
    in_group: bool = False  # a member of the current weight-update group (distributed mode)
    released: set = field(default_factory=set)  # memory tags this engine released on it
    # why generation is paused on it ("memory": released for training; "sync": a weight sync
    # runs): /pause_generation was sent when the first reason came, /continue_generation goes
    # when the last one is gone
    pauses: set = field(default_factory=set)
    in_update: bool = False  # /begin_weight_update sent, /end_weight_update not yet
    receiving: bool = False  # an /update_weights_from_distributed call has not returned

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None


class ServerPool:
    """The servers and the router of one engine: their processes (``launch=true``) or their
    URLs (started elsewhere), registration with the router, and the restarts of what died."""

    def __init__(self, cfg: SGLangConfig):
        self.cfg = cfg
        self.lock = threading.Lock()
        self.router_proc: Optional[subprocess.Popen] = None
        self.shut_down = False  # set by stop: from then on nothing is (re)started
        log_dir = Path(cfg.log_dir or "sglang_logs")
        self.router_log = log_dir / "router.log"
        if cfg.launch:
            log_dir.mkdir(parents=True, exist_ok=True)
            self.router_url = f"http://{cfg.host}:{cfg.router_port}"
            self.servers = [
                Server(
                    f"http://{cfg.host}:{cfg.port + i}",
                    [cfg.base_gpu_id + i * cfg.tp_size + j for j in range(cfg.tp_size)],
                    log=log_dir / f"server_{i}.log",
                )
                for i in range(cfg.replicas)
            ]
            self.router_proc = spawn_logged(router_command(cfg), self.router_log, cfg.env)
            for i, s in enumerate(self.servers):
                s.proc = spawn_logged(server_command(cfg, i), s.log, server_environment(cfg))
        else:
            self.router_url = cfg.router_url.rstrip("/")
            self.servers = [
                Server(u.rstrip("/"), [cfg.base_gpu_id + j for j in range(cfg.tp_size)]) for u in cfg.server_urls
            ]

    def start(self) -> None:
        """Wait for the router and every server, and register the servers."""
        http.wait_healthy(self.router_url, self.cfg.startup_timeout_s, alive=self.router_alive, path="/health")
        for s in self.servers:
            self.wait(s)
            self.register(s)

    def wait(self, s: Server) -> None:
        try:
            http.wait_healthy(s.url, self.cfg.startup_timeout_s, alive=s.alive)
        except EngineError as e:
            raise EngineError(f"{e}; server log: {s.log}") from None

    def router_alive(self) -> bool:
        return self.router_proc is None or self.router_proc.poll() is None

    def post(self, s: Server, path: str, body: dict, timeout: Optional[float] = None) -> Any:
        """A weight or group request to one server (``http.post_checked``)."""
        return http.post_checked(s.url + path, body, timeout or self.cfg.request_timeout_s)

    def pause(self, s: Server, reason: str) -> None:
        """Hold new requests on ``s`` (those in flight come back aborted) for ``reason``."""
        if not s.pauses:
            http.call(s.url + "/pause_generation", api.pause_request(), timeout=600)
        s.pauses.add(reason)

    def unpause(self, s: Server, reason: str) -> None:
        """Drop ``reason``; generation continues on ``s`` once no reason is left."""
        if reason in s.pauses and len(s.pauses) == 1:
            http.call(s.url + "/continue_generation", api.continue_request(), timeout=600)
        s.pauses.discard(reason)

    def each(self, fn: Callable[[Server], None]) -> None:
        """``fn`` on every server at once; the first error is raised."""
        with ThreadPoolExecutor(len(self.servers)) as pool:
            for f in [pool.submit(fn, s) for s in self.servers]:
                f.result()

    # -- the router's list of workers ------------------------------------------------------
    def listed_workers(self) -> list[dict]:
        listed = http.call(self.router_url + "/workers", method="GET", timeout=30)
        workers = listed.get("workers", []) if isinstance(listed, dict) else listed
        return [w if isinstance(w, dict) else {"url": w} for w in workers or []]

    def router_worker_id(self, url: str) -> Optional[str]:
        """The router's id of the worker at ``url``; None when it does not list it."""
        for w in self.listed_workers():
            if str(w.get("url", "")).rstrip("/") == url.rstrip("/"):
                return str(w.get("id") or w["url"])
        return None

    def await_listing(self, s: Server, listed: bool) -> None:
        """Wait (bounded) until the router lists ``s`` (or no longer does): sglang-router adds
        and removes workers in the background after answering 202."""
        deadline = time.time() + self.cfg.register_timeout_s
        while (self.router_worker_id(s.url) is not None) != listed:
            if time.time() > deadline:
                what = "list" if listed else "drop"
                raise EngineError(f"the router did not {what} {s.url} within {self.cfg.register_timeout_s:.0f} s")
            time.sleep(0.2)

    def register(self, s: Server) -> None:
        if self.router_worker_id(s.url) is None:
            http.call(self.router_url + "/workers", api.register_worker_request(s.url), timeout=60)
            self.await_listing(s, True)
        s.registered = True

    def unregister(self, s: Server) -> None:
        """Take ``s`` out of the router by the id it lists for it (0.3.2 rejects a URL there).
        Should a restarted server still be routed to, the engine rejects its samples by their
        weight version."""
        try:
            wid = self.router_worker_id(s.url)
            if wid is not None:
                http.call(f"{self.router_url}/workers/{urllib.parse.quote(wid, safe='')}", method="DELETE", timeout=30)
                self.await_listing(s, False)
        except EngineError as e:
            print(f"[sglang] could not take {s.url} out of the router: {e}", flush=True)
        s.registered = False

    # -- recovery --------------------------------------------------------------------------
    def restart(self, why: dict[int, str]) -> None:
        """Stop the servers ``why`` names (if alive) and start them again, all at once, then
        wait for them; each holds the initial weights, so it is stale and out of the router
        until the next sync reaches it."""
        if self.shut_down:
            raise EngineError("the SGLang engine was shut down")
        for i, reason in why.items():
            s = self.servers[i]
            if s.proc is None:
                raise EngineError(f"{s.url} {reason}, and it was started elsewhere (launch=false): restart it there")
            print(f"[sglang] server {s.url} {reason}; restarting, log {s.log}", flush=True)
            self.unregister(s)
            stop_process(s.proc, grace_s=10)
            s.proc = spawn_logged(server_command(self.cfg, i), s.log, server_environment(self.cfg))
            s.stale, s.registered, s.released = True, False, set()
            s.in_group = s.in_update = s.receiving = False
            s.pauses = set()
        for i in why:
            self.wait(self.servers[i])

    def recover(self) -> bool:
        """Restart a dead router (re-registering the in-sync servers) and dead servers; a
        restarted server rejoins the router only after the next full sync. Returns whether an
        in-sync server is left to generate."""
        with self.lock:
            if self.shut_down:  # a request still in flight must not bring servers back
                raise EngineError("the SGLang engine was shut down")
            router = self.router_proc
            if router is not None and router.poll() is not None:
                log = self.router_log
                print(f"[sglang] router died (exit {router.returncode}); restarting, log {log}", flush=True)
                self.router_proc = spawn_logged(router_command(self.cfg), log, self.cfg.env)
                http.wait_healthy(self.router_url, self.cfg.startup_timeout_s, alive=self.router_alive, path="/health")
                for s in self.servers:
                    s.registered = False
                    if s.alive() and not s.stale:
                        self.register(s)
            self.restart({i: f"died (exit {s.proc.returncode})" for i, s in enumerate(self.servers) if not s.alive()})
            return not all(s.stale or not s.registered for s in self.servers)

    def all_alive(self) -> bool:
        return self.router_alive() and all(s.alive() for s in self.servers)

    def stop(self) -> None:
        """Stop every process this pool started; nothing is restarted after this."""
        with self.lock:
            self.shut_down = True
        for p in [s.proc for s in self.servers] + [self.router_proc]:
            stop_process(p)
