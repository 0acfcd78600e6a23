"""Test doubles of an SGLang server and of ``sglang_router``, for CONTRACT TESTS only.

SGLang cannot run on CPU, so these local HTTP servers stand in for it to check what our
``SGLangEngine`` sends and how it reacts to SGLang's answers; they say nothing about SGLang's
own behaviour (they generate no text: a completion is the next two token ids). Every request
body is checked against the fields and JSON types of SGLang 0.5.x's request structs
(``srt/managers/io_struct.py``); a body that does not match is answered 400, as SGLang does.

The server double does take part in a real weight-update group: on
``/init_weights_update_group`` it joins ours with ``init_custom_group`` (gloo), and on
``/update_weights_from_distributed`` it receives the announced tensors by broadcast, so a test
can read back exactly what arrived with ``/get_weights_by_name``.

In-process: ``ServerDouble(weights)`` (it also answers the router's ``/workers``, so one double
can be router and server at once). As processes, for the supervision tests: with
``process_env(log_dir)`` in the environment, ``python -m sglang.launch_server`` and ``python -m
sglang_router.launch_router`` resolve to the packages under ``tests/sglang_double_pkgs``, which
run ``main`` below; every request is appended to ``$SGLANG_DOUBLE_LOG_DIR/<role>_<port>.jsonl``
with the process id. ``SGLANG_DOUBLE_VOCAB`` keeps generated ids below a vocabulary size;
``SGLANG_DOUBLE_FAIL_FROM_VERSION`` makes a server answer every sampling request with 503 once
it holds that weight version (an engine that broke for good).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Optional

import torch

SCHEMA = {
    "/generate": {"input_ids": list, "sampling_params": dict, "return_logprob": bool, "logprob_start_len": int},
    "/workers": {"url": str},
    "/update_weights_from_tensor": {
        "serialized_named_tensors": list,
        "load_format": (str, type(None)),
        "flush_cache": bool,
        "weight_version": str,
    },
    "/update_weights_from_distributed": {
        "names": list,
        "dtypes": list,
        "shapes": list,
        "group_name": str,
        "flush_cache": bool,
        "weight_version": str,
    },
    "/init_weights_update_group": {
        "master_address": str,
        "master_port": int,
        "rank_offset": int,
        "world_size": int,
        "group_name": str,
        "backend": str,
    },
    "/destroy_weights_update_group": {"group_name": str},
    "/release_memory_occupation": {"tags": list},
    "/resume_memory_occupation": {"tags": list},
    "/abort_request": {"abort_all": bool},
    "/get_weights_by_name": {"name": str, "truncate_size": int},
}
SAMPLING = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "max_new_tokens": int,
    "n": int,
    "stop_token_ids": list,
    "skip_special_tokens": bool,
    "no_stop_trim": bool,
    "sampling_seed": int,
}


def contract_violation(path: str, body: dict) -> Optional[str]:
    """Why ``body`` is not a valid SGLang 0.5.x request for ``path``; None when it is."""
    fields = SCHEMA.get(path)
    if fields is None:
        return None if not body else f"{path} takes no body"
    extra = set(body) - set(fields)
    if extra:
        return f"{path}: fields SGLang does not know: {sorted(extra)}"
    for k, v in body.items():
        if not isinstance(v, fields[k]) or (fields[k] is int and isinstance(v, bool)):
            return f"{path}: {k}={v!r} is not {fields[k]}"
    if path == "/generate":
        if not all(isinstance(t, int) for row in body["input_ids"] for t in row):
            return "/generate: input_ids must be lists of ints"
        for k, v in body["sampling_params"].items():
            if k not in SAMPLING or not isinstance(v, SAMPLING[k]):
                return f"/generate: sampling_params.{k}={v!r}"
    return None


def check_contract(path: str, body: dict) -> None:
    """Assert that ``body`` is a valid SGLang request for ``path``."""
    why = contract_violation(path, body)
    assert why is None, why


def serve_json(answer: Callable[[str, str, dict], tuple[int, object]], host: str, port: int) -> ThreadingHTTPServer:
    """A threaded HTTP server that hands every JSON request to ``answer(method, path, body)``."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _handle(self, method):
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n)) if n else {}
            code, obj = answer(method, self.path, body)
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._handle("GET")

        def do_POST(self):
            self._handle("POST")

        def do_DELETE(self):
            self._handle("DELETE")

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class _Double:
    """Request log shared by both doubles: in memory, and as JSON lines when ``log`` is set."""

    def __init__(self, host: str, port: int, log: Optional[Path]):
        self.requests: list[tuple[str, str, dict]] = []
        self.log = log
        self._log_lock = threading.Lock()
        self.server = serve_json(self._answer, host, port)
        self.url = f"http://{host}:{self.server.server_address[1]}"

    def _answer(self, method: str, path: str, body: dict) -> tuple[int, object]:
        self.requests.append((method, path, body))
        if self.log is not None:
            small = {k: v for k, v in body.items() if k != "serialized_named_tensors"}
            with self._log_lock, open(self.log, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "method": method, "path": path, "body": small}) + "\n")
        why = contract_violation(path.split("?")[0], body) if method != "DELETE" else None
        if why is not None:
            return 400, {"error": why}
        return self.answer(method, path, body)

    def answer(self, method: str, path: str, body: dict) -> tuple[int, object]:
        raise NotImplementedError

    def close(self) -> None:
        self.server.shutdown()


class ServerDouble(_Double):
    """Answers like ``sglang.launch_server`` (and like the router's ``/workers``)."""

    def __init__(self, weights: Optional[dict] = None, host: str = "127.0.0.1", port: int = 0, log=None):
        self.weights: dict[str, object] = dict(weights or {})  # name -> tensor or list
        self.version = "initial"
        self.fail_generate = 0  # answer the next N generations with 503
        self.stall_generate = 0.0  # hold the next generation this many seconds (a hung server)
        self.vocab = int(os.environ.get("SGLANG_DOUBLE_VOCAB", 1 << 30))
        self.broken_from = os.environ.get("SGLANG_DOUBLE_FAIL_FROM_VERSION")
        self.groups: dict[str, object] = {}
        super().__init__(host, port, log)

    def answer(self, method: str, path: str, body: dict) -> tuple[int, object]:
        if path in ("/health", "/health_generate", "/workers", "/abort_request"):
            return 200, {}
        if path in ("/release_memory_occupation", "/resume_memory_occupation"):
            return 200, {}
        if path == "/get_weights_by_name":
            w = self.weights.get(body["name"])
            if isinstance(w, torch.Tensor):
                w = w[: body["truncate_size"]].float().tolist()
            return 200, w
        if path == "/init_weights_update_group":
            return self._join(body)
        if path == "/update_weights_from_distributed":
            return self._receive(body)
        if path == "/destroy_weights_update_group":
            import torch.distributed as dist

            pg = self.groups.pop(body["group_name"], None)
            if pg is None:
                return 400, {"success": False, "message": f"no group {body['group_name']}"}
            dist.destroy_process_group(pg)
            return 200, {"success": True, "message": ""}
        if path == "/generate":
            return self._generate(body)
        return 404, {"error": path}

    def _join(self, body: dict) -> tuple[int, object]:
        from megatron_klear.inference.sglang import init_custom_group

        url = f"tcp://{body['master_address']}:{body['master_port']}"
        pg = init_custom_group(url, body["world_size"], body["rank_offset"], body["group_name"], body["backend"], 120)
        self.groups[body["group_name"]] = pg
        return 200, {"success": True, "message": ""}

    def _receive(self, body: dict) -> tuple[int, object]:
        import torch.distributed as dist

        pg = self.groups.get(body["group_name"])
        if pg is None:
            return 400, {"success": False, "message": f"no group {body['group_name']}"}
        for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"]):
            t = torch.empty(shape, dtype=getattr(torch, dtype))
            dist.broadcast(t, src=0, group=pg)
            self.weights[name] = t
        self.version = body["weight_version"]
        return 200, {"success": True, "message": ""}

    def _generate(self, body: dict) -> tuple[int, object]:
        if self.stall_generate:
            stall, self.stall_generate = self.stall_generate, 0.0
            time.sleep(stall)
        sampling = body["sampling_params"]["max_new_tokens"] > 0
        if self.fail_generate or (sampling and self.version == self.broken_from):
            self.fail_generate = max(0, self.fail_generate - 1)
            return 503, {"error": "worker unavailable"}
        out = []
        for ids in body["input_ids"]:
            if not sampling:  # scoring
                lps = [[None, ids[0], None]] + [[-0.5, t, None] for t in ids[1:]]
                meta = {"input_token_logprobs": lps, "finish_reason": {"type": "length"}}
                out.append({"output_ids": [], "meta_info": meta})
            else:
                toks = [(ids[-1] + 1) % self.vocab, (ids[-1] + 2) % self.vocab]
                meta = {
                    "finish_reason": {"type": "stop", "matched": toks[-1]},
                    "completion_tokens": 2,
                    "weight_version": self.version,
                    "output_token_logprobs": [[-1.25, t, None] for t in toks],
                }
                out.append({"output_ids": toks, "meta_info": meta})
        return 200, out


class RouterDouble(_Double):
    """Answers like ``sglang_router``: ``/workers`` add / list / delete, ``/generate`` forwarded
    round robin to the registered workers (502 when the chosen one does not answer). Workers
    are deleted by URL, or only by the id the listing gives them (``delete_by="id"``, as
    routers that key workers by id do)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, log=None, delete_by: str = "url"):
        self.workers: list[str] = []
        self.ids: dict[str, str] = {}  # url -> id
        self.delete_by = delete_by
        self._next = 0
        self._lock = threading.Lock()
        super().__init__(host, port, log)

    def answer(self, method: str, path: str, body: dict) -> tuple[int, object]:
        from megatron_klear.inference import sglang_api as api

        if path == "/health":
            return 200, {}
        if path == "/workers" and method == "POST":
            with self._lock:
                if body["url"] not in self.workers:
                    self.workers.append(body["url"])
                    self.ids[body["url"]] = f"worker-{len(self.ids)}"
            return 200, {"status": "accepted"}
        if path == "/workers" and method == "GET":
            with self._lock:
                listed = [{"id": self.ids[w], "url": w} for w in self.workers]
            return 200, {"workers": listed, "total": len(listed)}
        if path.startswith("/workers/") and method == "DELETE":
            key = urllib.parse.unquote(path[len("/workers/") :])
            with self._lock:
                gone = [w for w in self.workers if key == (self.ids[w] if self.delete_by == "id" else w)]
                self.workers = [w for w in self.workers if w not in gone]
            return (200, {}) if gone else (404, {"error": f"no worker {key}"})
        if path == "/generate":
            with self._lock:
                if not self.workers:
                    return 503, {"error": "no workers"}
                worker = self.workers[self._next % len(self.workers)]
                self._next += 1
            try:
                return 200, api.call(worker + "/generate", body, timeout=60)
            except api.HTTPError as e:
                return 502, {"error": str(e)}
        return 404, {"error": path}


def free_port_block(n: int) -> int:
    """The first of ``n`` consecutive ports that are free on 127.0.0.1 right now."""
    from megatron_klear.distributed import free_port

    for base in random.Random().sample(range(20000, 60000, 7), 50):
        if all(free_port(p) == p for p in range(base, base + n)):
            return base
    raise RuntimeError("no block of free ports")


def process_env(log_dir: Path) -> dict[str, str]:
    """Environment under which ``python -m sglang.launch_server`` / ``sglang_router.launch_router``
    start the doubles (prepend to PYTHONPATH; the repository root makes ``tests`` importable)."""
    here = Path(__file__).resolve().parent
    return {"PYTHONPATH": os.pathsep.join([str(here / "sglang_double_pkgs"), str(here.parent)]),
            "SGLANG_DOUBLE_LOG_DIR": str(log_dir)}  # fmt: skip


def main(role: str) -> None:
    """Run a double as ``python -m sglang.launch_server`` / ``sglang_router.launch_router`` would."""
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args, _ = p.parse_known_args()  # the rest (--model-path, --tp-size, ...) means nothing here
    log_dir = Path(os.environ["SGLANG_DOUBLE_LOG_DIR"])
    log = log_dir / f"{role}_{args.port}.jsonl"
    from megatron_klear.inference.sglang import server_env

    leaked = sorted(set(os.environ) - set(server_env()))  # distributed-launcher variables we inherited
    with open(log, "a") as f:
        f.write(
            json.dumps({"pid": os.getpid(), "method": "START", "path": "", "body": {"launcher_env": leaked}}) + "\n"
        )
    cls = ServerDouble if role == "server" else RouterDouble
    cls(host=args.host, port=args.port, log=log)
    threading.Event().wait()  # until killed
