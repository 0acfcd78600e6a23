"""In-process HF transformers engine: CPU for tests and the demo, one GPU for small models.

Sampling is our own loop over the model's KV cache (left-padded batches), so the log-prob of
every sampled token is exactly log softmax(logits / T) at the step it was drawn (before top-k /
top-p truncation), a call's ``seed`` fixes its samples, and generation stops at the given stop
ids; weight updates are copied into the live parameters by the hub checkpoint's names (a Qwen3-MoE
model's fused experts through per-expert views, ``hf_mapping.hub_views``). The cache goes in and
out under the name the installed transformers uses (``cache_keyword``): the loop runs on the whole
declared transformers range without a deprecated argument.

Long context: ``rope_scaling`` applies YaRN over the model's config as the SGLang engine does
(``models.config.served_config``); transformers has no context limit of its own.

Thread safety (``rollout.overlap`` generates in a thread of its own): a sync waits for the
generations in flight to finish on the old weights (each completion is tagged with that version);
a generation asked for while a sync runs finds the engine stale and is refused. ``abort`` makes
the generations in flight stop at their next token with an ``EngineError`` (shutting down);
``interrupt`` makes them return what they have, finish_reason "abort" (partial rollouts).
"""

from __future__ import annotations

import inspect
import threading
from typing import Iterator, Optional, Sequence

import torch

from megatron_klear.errors import EngineError, EngineWeightError
from megatron_klear.inference.base import Bucket, Completion, InferenceEngine, SamplingParams, in_prompt_order
from megatron_klear.models.config import read_config_dict, served_config
from megatron_klear.models.hf_mapping import hub_views


def filter_logits(logp: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set log-probs outside the top-k / nucleus (top-p) set to -inf; rows are [B, V]."""
    if 0 < top_k < logp.shape[-1]:
        kth = torch.topk(logp, top_k, dim=-1).values[:, -1:]
        logp = logp.masked_fill(logp < kth, float("-inf"))
    if top_p < 1.0:
        sorted_lp, order = torch.sort(logp, dim=-1, descending=True)
        cum = sorted_lp.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_lp.softmax(-1) >= top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logp = logp.masked_fill(drop, float("-inf"))
    return logp


def cache_keyword(model: torch.nn.Module) -> str:
    """The name of the KV cache in the model's ``forward`` and in its output: ``cache`` since
    transformers 5.24 (where ``past_key_values`` is deprecated, to be removed in 5.40),
    ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class HFEngine(InferenceEngine):
    """A transformers causal LM as an inference engine."""

    def __init__(
        self,
        model_dir: str,
        device: str = "cpu",
        dtype: Optional[str] = None,
        max_batch: int = 64,
        pad_token_id: Optional[int] = None,
        rope_scaling: Optional[dict] = None,
    ):
        from pathlib import Path

        from transformers import AutoConfig, AutoModelForCausalLM

        kw = {"dtype": getattr(torch, dtype)} if dtype else {}
        config = AutoConfig.from_pretrained(model_dir)
        if rope_scaling is not None:
            served, _ = served_config(read_config_dict(model_dir), rope_scaling, source=model_dir, where="hf engine")
            config.rope_parameters = served["rope_parameters"]
            config.max_position_embeddings = served["max_position_embeddings"]
        if any(Path(model_dir).glob("*.safetensors")):
            model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, **kw)
        else:  # a Megatron checkpoint directory: config only; the first sync brings the weights
            model = AutoModelForCausalLM.from_config(config, **kw)
        self.model = model.to(device).eval()
        self.cache_kw = cache_keyword(self.model)
        self.device = device
        self.max_batch = max_batch
        cfg = self.model.config
        self.pad_id = pad_token_id if pad_token_id is not None else (cfg.pad_token_id or 0)
        self.eos_ids = {cfg.eos_token_id} if isinstance(cfg.eos_token_id, int) else set(cfg.eos_token_id or [])
        # named_parameters() lists a tied lm_head once, as model.embed_tokens.weight: the names
        # a sync must cover are exactly these (fused experts under their per-expert hub names)
        self.params = hub_views(self.model.named_parameters())
        self.version: Optional[str] = "initial"
        self.stale = False
        self._seen: set[str] = set()
        self._on_device = True
        self._busy = threading.Condition()  # guards _active, stale and the weights
        self._active = 0  # generate / score calls in flight
        self._aborted = False
        self._interrupted = False
        self.decode_steps = 0  # tokens sampled per row so far, over all calls (progress)

    def _enter(self) -> str:
        """Start a generate / score call on the current weights; returns their version."""
        with self._busy:
            self.check_fresh()
            if self._aborted:
                raise EngineError("the HF engine was aborted")
            self._active += 1
            return self.version

    def _leave(self) -> None:
        with self._busy:
            self._active -= 1
            self._busy.notify_all()

    def abort(self) -> None:
        """Make every generation in flight stop at its next token (``EngineError``)."""
        self._aborted = True

    def interrupt(self) -> None:
        """Generations in flight return at their next token with what they have ("abort")."""
        self._interrupted = True

    def end_interrupt(self) -> None:
        self._interrupted = False

    # -- generation -------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[list[int]], params: SamplingParams, budgets: Optional[Sequence[int]] = None
    ) -> list[list[Completion]]:
        return in_prompt_order(self.generate_stream(prompts, params, budgets), len(prompts))

    @torch.no_grad()
    def generate_stream(
        self, prompts: Sequence[list[int]], params: SamplingParams, budgets: Optional[Sequence[int]] = None
    ) -> Iterator[tuple[int, list[Completion]]]:
        """Each prompt's group as soon as its last sample finished (samples of a batch finish
        at different decode steps); batches of ``max_batch`` sequences, one after the other."""
        params.validate()
        version = self._enter()
        try:
            gen = torch.Generator(device="cpu")
            if params.seed is not None:
                gen.manual_seed(params.seed)
            else:
                gen.seed()
            n = params.n
            flat = [list(p) for p in prompts for _ in range(n)]
            limits = [b for b in (budgets or [params.max_new_tokens] * len(prompts)) for _ in range(n)]
            groups: dict[int, list[Optional[Completion]]] = {}
            for start in range(0, len(flat), self.max_batch):
                rows = slice(start, start + self.max_batch)
                for row, c in self._decode(flat[rows], params, gen, limits[rows]):
                    k = start + row
                    c.weight_version = version
                    group = groups.setdefault(k // n, [None] * n)
                    group[k % n] = c
                    if all(x is not None for x in group):
                        yield k // n, groups.pop(k // n)
        finally:
            self._leave()

    def _decode(
        self, prompts: list[list[int]], p: SamplingParams, gen: torch.Generator, limits: list[int]
    ) -> Iterator[tuple[int, Completion]]:
        """One left-padded batch; row i samples at most ``limits[i]`` tokens. Yields
        ``(row, completion)`` as each row finishes (the rows an interrupt cuts: at the end)."""
        b, width = len(prompts), max(len(x) for x in prompts)
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for i, x in enumerate(prompts):  # left padding: every row's next token is at the end
            ids[i, width - len(x) :] = torch.tensor(x)
            mask[i, width - len(x) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        stop = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids)
        tokens: list[list[int]] = [[] for _ in range(b)]
        logps: list[list[float]] = [[] for _ in range(b)]
        done = torch.tensor([n < 1 for n in limits])
        for i in range(b):
            if done[i]:
                yield i, Completion([], [], "length")
        cut = False
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        for _ in range(max(limits)):
            if self._aborted:
                raise EngineError("the HF engine was aborted (shutting down)")
            if self._interrupted:
                cut = True
                break
            logits = out.logits[:, -1].float().cpu()
            if p.temperature < 1e-6:
                lp = logits.log_softmax(-1)
                tok = lp.argmax(-1)
            else:
                lp = (logits / p.temperature).log_softmax(-1)
                probs = filter_logits(lp, p.top_k, p.top_p).softmax(-1)
                tok = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            tok_lp = lp.gather(-1, tok[:, None]).squeeze(-1)
            self.decode_steps += 1
            for i in range(b):
                if done[i]:
                    continue
                t = int(tok[i])
                tokens[i].append(t)
                logps[i].append(float(tok_lp[i]))
                if t in stop or len(tokens[i]) >= limits[i]:
                    done[i] = True
                    yield i, Completion(tokens[i], logps[i], "stop" if t in stop else "length")
            if bool(done.all()):
                return
            nxt = torch.where(done, torch.tensor(self.pad_id), tok).to(self.device)
            mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=self.device)], dim=1)
            pos = pos[:, -1:] + 1
            cache = {self.cache_kw: getattr(out, self.cache_kw)}
            out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True, **cache)
        for i in range(b):  # cut by an interrupt, or the loop ran out (every row has its limit)
            if not done[i]:
                yield i, Completion(tokens[i], logps[i], "abort" if cut else "length")

    @torch.no_grad()
    def score(self, sequences: Sequence[list[int]], temperature: float = 1.0) -> list[list[float]]:
        self._enter()
        try:
            result = []
            for seq in sequences:  # one at a time: no padding to get wrong
                ids = torch.tensor([seq], device=self.device)
                logits = self.model(input_ids=ids).logits[0, :-1].float()
                lp = (logits / temperature).log_softmax(-1)
                result.append(lp.gather(-1, ids[0, 1:, None]).squeeze(-1).cpu().tolist())
            return result
        finally:
            self._leave()

    # -- weights ----------------------------------------------------------------------
    def begin_update(self, version: str) -> None:
        """Wait for the generations in flight to finish on the old weights, then go stale."""
        with self._busy:
            self._busy.wait_for(lambda: self._active == 0)
            self.stale = True
        self._pending_version = version
        self._seen = set()

    @torch.no_grad()
    def update_bucket(self, bucket: Bucket) -> None:
        for name, t in bucket:
            p = self.params.get(name)
            if p is None:
                raise EngineWeightError(f"HF engine has no parameter named {name!r}")
            if tuple(p.shape) != tuple(t.shape):
                raise EngineWeightError(f"weight {name!r}: engine shape {tuple(p.shape)}, received {tuple(t.shape)}")
            p.copy_(t.to(p.device))
            self._seen.add(name)

    def finish_update(self) -> None:
        missing = sorted(set(self.params) - self._seen)
        if missing:
            raise EngineWeightError(
                f"weight sync did not cover {len(missing)} engine parameters, e.g. {missing[:3]}; engine stays stale"
            )
        self.version, self.stale = self._pending_version, False

    # -- memory / lifecycle -----------------------------------------------------------
    def release_memory(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None:
        if "weights" in tags and self.device != "cpu" and self._on_device:
            self.model.to("cpu")
            self._on_device = False
            torch.cuda.empty_cache()

    def resume_memory(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None:
        if "weights" in tags and not self._on_device:
            self.model.to(self.device)
            self._on_device = True

    def health(self) -> bool:
        return not self.stale

    def shutdown(self) -> None:
        self.abort()
        with self._busy:
            self._busy.wait_for(lambda: self._active == 0)
        self.params = {}
        self.model = None
