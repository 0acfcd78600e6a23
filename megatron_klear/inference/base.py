"""The inference-engine interface the RL loop programs against.

An engine generates completions for token-id prompts (all at once, or streamed group by group
as they complete), scores fixed sequences and takes weight updates as ``(hf_name, tensor)``
buckets. An update is a transaction: ``begin_update`` marks the engine stale, every bucket
goes in with ``update_bucket``, and only a successful ``finish_update`` makes it usable again.
A stale engine refuses to generate, so a half-applied sync can never produce rollouts. That
the weights took effect is checked by the trainer on a probe (``sync.weights``).

A sync may begin while another thread generates (``rollout.overlap``); no completion ever mixes
two weight versions, and each names the version that produced all of its tokens
(``Completion.weight_version``). The HF engine lets the generations in flight finish on the old
weights before the update starts; SGLang pauses its servers for the sync (requests in flight come
back aborted and are generated again, entirely on the new weights: ``inference.sglang``).

Partial rollouts (``rollout.partial``): ``interrupt`` makes the generations in flight return at
once with the tokens they have, finish_reason "abort" (the only time a completion is "abort"),
until ``end_interrupt``; the RL loop continues them later from their prefix (``budgets``: each
prompt's own token budget).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

import torch

from megatron_klear.errors import ConfigError, EngineError, StaleEngineError

FINISH_REASONS = ("stop", "length", "abort")


@dataclass
class SamplingParams:
    """Sampling settings; ``temperature`` 0 means greedy. Log-probs are those of the sampled
    token under softmax(logits / temperature), before top-p / top-k truncation (SGLang's
    convention, and what the trainer recomputes)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: whole vocabulary
    max_new_tokens: int = 1024
    n: int = 1
    stop_token_ids: list[int] = field(default_factory=list)
    seed: Optional[int] = None  # sample k of a call gets seed + k (engines that take seeds)
    ignore_eos: bool = False  # run to max_new_tokens past the model's end-of-sequence tokens

    def validate(self) -> None:
        if not self.temperature >= 0:
            raise ConfigError(f"sampling temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ConfigError(f"sampling top_k must be -1 or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1 or self.n < 1:
            raise ConfigError("sampling max_new_tokens and n must be >= 1")


@dataclass
class Completion:
    """One sampled response: its token ids, their log-probs, and why it ended."""

    output_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # one of FINISH_REASONS
    weight_version: Optional[str] = None  # the engine's weights that produced every token (None: not reported)

    def __post_init__(self) -> None:
        if len(self.output_ids) != len(self.logprobs):
            raise EngineError(f"{len(self.output_ids)} output tokens but {len(self.logprobs)} log-probs")
        if self.finish_reason not in FINISH_REASONS:
            raise EngineError(f"unknown finish reason {self.finish_reason!r}")


Bucket = list[tuple[str, torch.Tensor]]


def in_prompt_order(stream: Iterable[tuple[int, list[Completion]]], n_prompts: int) -> list[list[Completion]]:
    """The groups of a ``generate_stream`` in prompt order: ``generate`` for an engine that streams."""
    out: list[list[Completion]] = [[] for _ in range(n_prompts)]
    for i, group in stream:
        out[i] = group
    return out


class InferenceEngine(ABC):
    """What the RL loop needs from an inference engine."""

    version: Optional[str] = None  # weight version of the last complete sync
    stale: bool = False
    aborted_samples: int = 0  # samples the engine got back aborted and generated again

    @abstractmethod
    def generate(
        self, prompts: Sequence[list[int]], params: SamplingParams, budgets: Optional[Sequence[int]] = None
    ) -> list[list[Completion]]:
        """``params.n`` completions for each prompt, in prompt order, of at most
        ``budgets[i]`` tokens for prompt i (default ``params.max_new_tokens``); none is "abort"
        unless the engine was interrupted."""

    def generate_stream(
        self, prompts: Sequence[list[int]], params: SamplingParams, budgets: Optional[Sequence[int]] = None
    ) -> Iterator[tuple[int, list[Completion]]]:
        """``(prompt index, its n completions)`` as each group completes, every prompt
        submitted at once. Default: ``generate``, in prompt order."""
        yield from enumerate(self.generate(prompts, params, budgets))

    def interrupt(self) -> None:
        """Partial rollouts: the generations in flight return now with what they have (finish
        reason "abort"), and so does every generation until ``end_interrupt``."""
        raise EngineError(f"{type(self).__name__} cannot interrupt its generations (rollout.partial)")

    def end_interrupt(self) -> None:
        """Generations run to their end again."""

    @abstractmethod
    def score(self, sequences: Sequence[list[int]], temperature: float = 1.0) -> list[list[float]]:
        """log p(token_t | tokens_<t) for t >= 1 of each sequence (length len - 1). An engine
        may support temperature 1 only (SGLang: its input log-probs ignore the temperature)."""

    @abstractmethod
    def begin_update(self, version: str) -> None:
        """Start a weight sync: the engine is stale until ``finish_update`` succeeds."""

    @abstractmethod
    def update_bucket(self, bucket: Bucket) -> None:
        """Apply full HF-named tensors; raise ``EngineWeightError`` on any rejection."""

    @abstractmethod
    def finish_update(self) -> None:
        """Close the sync (checking what the engine can check) and clear ``stale``."""

    def update_weights(self, buckets: Iterable[Bucket], version: str) -> None:
        """Whole sync from an iterator of buckets (single-process callers)."""
        self.begin_update(version)
        for bucket in buckets:
            self.update_bucket(bucket)
        self.finish_update()

    def release_memory(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None:
        """Free accelerator memory for training (colocated mode). Default: nothing to free."""

    def resume_memory(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None:
        """Take the memory back after training."""

    @abstractmethod
    def health(self) -> bool:
        """True when the engine can serve requests now."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop every process the engine started."""

    def check_fresh(self) -> None:
        if self.stale:
            raise StaleEngineError(
                f"engine weights are stale (last complete sync: {self.version}); a full sync must succeed first"
            )
