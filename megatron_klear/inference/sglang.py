"""The SGLang inference engine: servers behind an ``sglang_router``, driven over HTTP (checked
against SGLang 0.5.23 and sglang-router 0.3.2, which the tests run for real on CPU).

The engine is assembled from one module per job:

* ``inference.sglang_servers``: the processes (servers, router), their registration with the
  router and the restart of what died (``ServerPool``);
* ``inference.http``: the JSON client; ``inference.sglang_api``: every request body and answer;
* the weight transport ``update_bucket`` hands each bucket to: ``sync.ipc.IPCTransport``
  (colocated: CUDA IPC payloads) or ``sync.broadcast.BroadcastTransport`` (distributed: NCCL or
  gloo broadcast);
* and here: generation, the weight-update transaction and its recovery, memory release.

Generation goes through the router, one request per sample (so a group's samples share their
prompt's KV on one replica), every sample with its own seed (which SGLang honours only with
``rollout.sglang.deterministic``). ``generate_stream`` submits every prompt at once and yields
each group as soon as it is complete. Samples that come back with finish_reason "abort" (a
paused or shutting-down server) are submitted again and counted; while the engine is
interrupted (partial rollouts) they are returned as they are instead. A failed request is
retried after dead servers are restarted (the router itself does not retry: the two would
multiply).

Weight sync runs inside ``/begin_weight_update`` ... ``/end_weight_update`` on every server
(required since SGLang 0.5.21), with generation paused around it: ``/pause_generation`` (abort
mode) returns the requests in flight at once as "abort" and holds new ones, so no request ever
runs on half-updated weights (between two buckets). The aborted samples are submitted again and
wait for ``/continue_generation``, so they are generated entirely on the new weights; every
completion carries the weight version SGLang reports for it (``Completion.weight_version``).
After the last bucket the KV cache of the old weights is flushed once (``/flush_cache``), then
generation continues. Recovery: a sync that broke off leaves its servers' update
sessions open, and with the broadcast transport some may be blocked inside a receive that no
request reaches; the next ``begin_update`` restarts those (``transport.blocked``), closes the
other sessions and lets the transport rebuild what the restart broke. SGLang 0.5.x cannot read
Qwen3 weights back (``/get_weights_by_name`` answers 400), so a sync is checked by the trainer:
the engine's log-probs of a probe at the rollout temperature against its own
(``sync.weights.probe_logprob_diff``: a limit, with one re-probe before a sync is failed).

Long context (``rope_scaling``, ``context_length``; ``sglang_servers.long_context_args``): the
servers get the model's RoPE written out complete, with every YaRN default spelled out, in
``--json-model-override-args`` (SGLang's defaults differ from transformers' where a key is
missing), and ``--context-length``.

Memory (colocated): ``release_memory`` pauses generation first, ``resume_memory`` resumes only
the tags this engine released on that server (resuming a tag never released makes SGLang raise
and kill the server) and continues generation once nothing is released any more (nor a sync
under way: ``ServerPool.pause`` keeps the reasons).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import Optional, Protocol, Sequence

from megatron_klear.errors import EngineError, StaleEngineError
from megatron_klear.inference import http
from megatron_klear.inference import sglang_api as api
from megatron_klear.inference.base import Bucket, Completion, InferenceEngine, SamplingParams, in_prompt_order
from megatron_klear.inference.sglang_servers import Server, ServerPool, SGLangConfig
from megatron_klear.sync.broadcast import BroadcastTransport
from megatron_klear.sync.ipc import ColocatedTarget, IPCTransport

MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")


class WeightTransport(Protocol):
    """How a bucket of weights reaches the servers (``sync.ipc``, ``sync.broadcast``)."""

    def open(self) -> None:
        """Before a sync's first bucket: whatever the transport needs (a process group)."""

    def send(self, bucket: Bucket, version: str) -> None:
        """Deliver ``bucket`` to every server; ``EngineWeightError`` / ``EngineError`` on failure."""

    def blocked(self) -> set[int]:
        """Servers a broken-off sync left where no request reaches them (to be restarted)."""

    def after_restart(self) -> None:
        """Servers were restarted: rebuild what they were part of."""

    def close(self) -> None:
        """Release what the transport holds (at shutdown)."""


class SGLangEngine(InferenceEngine):
    """SGLang inference engine; see the module docstring."""

    def __init__(self, cfg: SGLangConfig):
        cfg.validate()
        cfg.check_launchable()
        self.cfg = cfg
        self.version = "initial"
        self.stale = False
        self.aborted_samples = 0  # samples that came back "abort" and were submitted again
        self._interrupted = False  # partial rollouts: samples in flight come back as they are
        self._interrupter: Optional[threading.Thread] = None
        self._sync_open = False  # a sync began and has not finished
        self._pending_version = ""
        self._count_lock = threading.Lock()
        self.pool = ServerPool(cfg)
        self.transport: WeightTransport = (
            IPCTransport(self.pool, cfg.device) if cfg.mode == "colocated" else BroadcastTransport(self.pool, cfg)
        )
        try:
            self.pool.start()
        except Exception:
            self.shutdown()
            raise

    @property
    def servers(self) -> list[Server]:
        return self.pool.servers

    @property
    def router_url(self) -> str:
        return self.pool.router_url

    # -- generation -------------------------------------------------------------------
    def _recover(self) -> None:
        """Restart what died (``ServerPool.recover``); with no in-sync server left the engine
        is stale until the next full sync."""
        if not self.pool.recover():
            self.stale = True
            raise StaleEngineError("no in-sync SGLang server left; the next weight sync restores them")

    def _request(self, path: str, body: dict, parse):
        last: Optional[Exception] = None
        for attempt in range(self.cfg.max_retries + 1):
            try:
                return parse(http.call(self.router_url + path, body, timeout=self.cfg.request_timeout_s))
            except EngineError as e:
                last = e
                if isinstance(e, StaleEngineError):
                    raise
                self._recover()
                time.sleep(min(2.0**attempt, 30.0))
        raise EngineError(f"{path} failed {self.cfg.max_retries + 1} times; last error: {last}")

    def _versions(self) -> Optional[list[str]]:
        """The weight versions a sample may report: the engine's, and mid-sync the one it syncs
        (a sample resubmitted during the sync runs after it); None before the first sync (SGLang
        names its initial weights itself)."""
        if self.version == "initial":
            return None
        return [self.version] + ([self._pending_version] if self._sync_open else [])

    def _sample(
        self, prompt: list[int], params: SamplingParams, seed: Optional[int], budget: Optional[int] = None
    ) -> Completion:
        """One sample of at most ``budget`` tokens (default ``params.max_new_tokens``); if it
        comes back aborted (a paused or stopping server) it is submitted again with the same
        seed, and counted, unless the engine is interrupted: then it is returned as it is."""
        body = api.generate_request(prompt, params, seed, budget)
        for _ in range(self.cfg.max_retries + 1):
            if self._interrupted:
                return Completion([], [], "abort", weight_version=self.version)
            [c] = self._request("/generate", body, lambda r: api.parse_generate_response(r, 1, self._versions()))
            if c.finish_reason != "abort" or self._interrupted:
                return c
            with self._count_lock:
                self.aborted_samples += 1
        raise EngineError(f"a sample was still aborted after {self.cfg.max_retries + 1} submissions")

    def generate_stream(
        self, prompts: Sequence[list[int]], params: SamplingParams, budgets: Optional[Sequence[int]] = None
    ) -> Iterator[tuple[int, list[Completion]]]:
        """Submit every sample of every prompt at once; yield ``(prompt index, its n
        completions)`` as each group completes. Sample j of prompt i has seed
        ``params.seed + i * n + j`` and at most ``budgets[i]`` tokens."""
        self.check_fresh()
        params.validate()
        self._supervise()
        n = params.n
        workers = max(1, min(self.cfg.concurrency, len(prompts) * n))
        with ThreadPoolExecutor(workers, thread_name_prefix="sglang-gen") as pool:
            futures: dict[Future, tuple[int, int]] = {}
            for i, p in enumerate(prompts):
                budget = None if budgets is None else budgets[i]
                for j, seed in enumerate(api.sample_seeds(params, i * n, n)):
                    futures[pool.submit(self._sample, list(p), params, seed, budget)] = (i, j)
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
        if not self.pool.all_alive():
            self._recover()

    def generate(
        self, prompts: Sequence[list[int]], params: SamplingParams, budgets: Optional[Sequence[int]] = None
    ) -> list[list[Completion]]:
        return in_prompt_order(self.generate_stream(prompts, params, budgets), len(prompts))

    def score(self, sequences: Sequence[list[int]], temperature: float = 1.0) -> list[list[float]]:
        """Input log-probs at temperature 1 only: SGLang ignores the temperature for them
        (compare at another temperature with sampled tokens, as ``probe_logprob_diff`` does)."""
        if temperature != 1.0:
            raise EngineError(f"SGLang scores input tokens at temperature 1 only, asked for {temperature}")
        self.check_fresh()
        body = api.score_request(sequences)
        return self._request("/generate", body, lambda r: api.parse_score_response(r, sequences))

    def abort(self) -> None:
        """Abort every request on every server (they come back "abort")."""
        for s in self.servers:
            http.call(s.url + "/abort_request", api.abort_request(), timeout=60)

    def interrupt(self) -> None:
        """Partial rollouts: the samples in flight come back now with the tokens they have, and
        so does every sample until ``end_interrupt``. Requests are aborted again every half
        second meanwhile: one submitted just as the first abort went out is not left to run to
        its end."""
        self._interrupted = True
        self._interrupter = threading.Thread(target=self._abort_while_interrupted, daemon=True)
        self._interrupter.start()

    def _abort_while_interrupted(self) -> None:
        while self._interrupted:
            try:
                self.abort()
            except EngineError as e:  # a dead server: its requests fail and are retried elsewhere
                print(f"[sglang] abort while interrupted: {e}", flush=True)
            time.sleep(0.5)

    def end_interrupt(self) -> None:
        self._interrupted = False
        if self._interrupter is not None:
            self._interrupter.join()
            self._interrupter = None

    # -- weights ----------------------------------------------------------------------
    def begin_update(self, version: str) -> None:
        self._recover_quietly()
        if self._sync_open:
            self._clean_up_broken_sync()
        self._pending_version = version
        self.pool.each(lambda s: self.pool.pause(s, "sync"))  # nothing runs on half-updated weights
        self.stale, self._sync_open = True, True
        self.transport.open()
        for s in self.servers:
            self.pool.post(s, "/begin_weight_update", api.begin_update_request(), timeout=300)
            s.in_update = True

    def _recover_quietly(self) -> None:
        try:
            self._recover()
        except StaleEngineError:
            pass  # expected: this sync is what restores them

    def _clean_up_broken_sync(self) -> None:
        """After a sync that never finished: servers the transport left where no request
        reaches them are restarted; the others only close their open update session."""
        print(f"[sglang] the previous weight sync ({self._pending_version}) broke off", flush=True)
        blocked = self.transport.blocked()
        self.pool.restart({i: "may be blocked in a weight receive of a sync that broke off" for i in blocked})
        for i, s in enumerate(self.servers):
            if i not in blocked and s.in_update:
                try:
                    self.pool.post(s, "/end_weight_update", api.end_update_request(), timeout=300)
                except EngineError as e:
                    print(f"[sglang] {s.url} did not close its update session: {e}", flush=True)
                s.in_update = False
        self.transport.after_restart()

    def update_bucket(self, bucket: Bucket) -> None:
        """Hand ``bucket`` to the weight transport of ``rollout.sglang.mode``."""
        self.transport.send(bucket, self._pending_version)

    def colocated_targets(self) -> Optional[list[ColocatedTarget]]:
        """Colocated mode: every server's URL and GPUs (for ``sync.colocated``); else None."""
        return self.transport.targets() if isinstance(self.transport, IPCTransport) else None

    def finish_update(self) -> None:
        """Close every server's update session, flush the KV cache of the old weights once,
        register servers the sync brought up to date, then continue generation."""
        for s in self.servers:
            self.pool.post(s, "/end_weight_update", api.end_update_request(), timeout=300)
            s.in_update = False
        for s in self.servers:
            http.call(s.url + "/flush_cache", api.flush_cache_request(), timeout=300)
            s.stale = False
            if not s.registered:
                self.pool.register(s)
        self.version, self.stale, self._sync_open = self._pending_version, False, False
        self.pool.each(lambda s: self.pool.unpause(s, "sync"))

    # -- memory / lifecycle -----------------------------------------------------------
    def release_memory(self, tags: Sequence[str] = MEMORY_TAGS) -> None:
        """Pause generation (in-flight samples come back "abort" and are resubmitted later),
        then release ``tags`` on every server (only those not released already)."""
        api.memory_request(tags)
        self.pool.each(lambda s: self._release(s, tags))

    def _release(self, s: Server, tags: Sequence[str]) -> None:
        self.pool.pause(s, "memory")
        todo = [t for t in tags if t not in s.released]
        if todo:
            http.call(s.url + "/release_memory_occupation", api.memory_request(todo), timeout=600)
            s.released.update(todo)

    def resume_memory(self, tags: Sequence[str] = MEMORY_TAGS) -> None:
        """Resume those of ``tags`` that this engine released on each server; continue
        generation on a server once nothing is released there any more."""
        api.memory_request(tags)
        self.pool.each(lambda s: self._resume(s, tags))

    def _resume(self, s: Server, tags: Sequence[str]) -> None:
        todo = [t for t in tags if t in s.released]
        if todo:
            http.call(s.url + "/resume_memory_occupation", api.memory_request(todo), timeout=600)
            s.released.difference_update(todo)
        if not s.released:
            self.pool.unpause(s, "memory")

    def health(self) -> bool:
        try:
            for s in self.servers:
                http.call(s.url + "/health", timeout=10)
            return not self.stale
        except EngineError:
            return False

    def shutdown(self) -> None:
        """Drop the transport's group and stop every process the engine started; from the
        first line on, nothing is restarted."""
        with self.pool.lock:
            self.pool.shut_down = True
        self._interrupted = False
        self.transport.close()
        self.pool.stop()
