"""Rollouts on global rank 0: prompts -> engine samples -> rewards -> kept groups.

Dynamic sampling: groups without signal (``algo.filter_metric``: every reward equal, or every
response equally correct) are dropped; generation batches continue (up to ``max_gen_batches``)
until ``prompts_per_step`` groups are kept, and the step then trains on what there is. Kept
groups beyond the batch are discarded (``data.surplus=discard``, the public code's choice) or,
with ``keep``, wait in a checkpointed buffer for the next step. Every sample carries the weight
version that sampled it (the number of steps the engine's weights had trained): a buffered
group's is older than the policy it is trained at, so the loss takes its ratio against the
engine's log-probs of the policy that sampled it (``rl.loss``).
Every prompt of a generation batch is submitted at once (``generate_stream``) and each group is
scored as soon as its samples are in, so no group waits for the slowest sample of another.
Samples the engine got back aborted were generated again (``rollout/samples_aborted`` counts
them); none reaches training.
"""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from megatron_klear.data.chat import decode_response, render_prompt, stop_token_ids
from megatron_klear.data.rl import RLPrompt
from megatron_klear.errors import CheckpointError, ConfigError
from megatron_klear.inference.base import Completion, InferenceEngine, SamplingParams
from megatron_klear.rewards.batch import RewardItem, SandboxFailureBudget, score_batch
from megatron_klear.rewards.types import RewardResult
from megatron_klear.rl.config import RewardConfig, RLConfig


@dataclass
class Sample:
    """One response of a group, with everything the trainer needs."""

    uid: str
    prompt_ids: list[int]
    response_ids: list[int]
    engine_logprobs: list[float]
    finish_reason: str
    reward: float
    correct: bool
    reason: str
    advantage: float = 0.0
    # the weights that sampled it: the engine's after this many trained steps (a kept surplus
    # group's is older than the policy it is trained at: rl.loss.ratio_baseline)
    weight_version: int = 0


Group = list[Sample]

# The checkpointed buffer's rows (``RunState.buffer``): 1 = sample dicts with ``stale`` (every
# buffered group was stale), 2 = sample dicts with ``weight_version`` instead.
BUFFER_SCHEMA = 2
_SAMPLE_FIELDS = tuple(Sample.__dataclass_fields__)
_SCHEMA_FIELDS = {1: tuple(f for f in _SAMPLE_FIELDS if f != "weight_version") + ("stale",), 2: _SAMPLE_FIELDS}


def group_advantages(rewards: Sequence[float], eps: float = 1e-6, std: str = "population") -> list[float]:
    """(r - mean) / (std + eps) within one group; ``std`` is the ``population`` std (paper
    Eq. 4) or the ``sample`` std (n - 1 degrees of freedom, the public code's torch.std)."""
    r = np.asarray(rewards, dtype=np.float64)
    return ((r - r.mean()) / (r.std(ddof=1 if std == "sample" else 0) + eps)).tolist()


def has_signal(group: Group, metric: str = "score") -> bool:
    """Whether dynamic sampling keeps ``group``: its rewards differ (``score``) or its
    responses are not all equally correct (``acc``)."""
    values = {s.reward for s in group} if metric == "score" else {s.correct for s in group}
    return len(values) > 1


def score_groups(
    tokenizer,
    prompts: Sequence[RLPrompt],
    completions: Sequence[list[Completion]],
    rewards: RewardConfig,
    workers: int = 4,
) -> list[list[RewardResult]]:
    """Rewards of every completion, grouped like ``completions`` (math or code by the prompt's
    ability; ``workers`` score in parallel)."""
    items = [
        RewardItem(
            p.ability, decode_response(tokenizer, c.output_ids), p.ground_truth, c.finish_reason != "stop", p.fn_name
        )
        for p, group in zip(prompts, completions)
        for c in group
    ]
    flat = score_batch(items, workers, math_config=rewards.math, code_config=rewards.code)
    out, i = [], 0
    for group in completions:
        out.append(flat[i : i + len(group)])
        i += len(group)
    return out


class PromptStream:
    """Prompts in a seeded shuffled order, epoch after epoch; the position is resumable."""

    def __init__(self, prompts: list[RLPrompt], tokenizer, seed: int, max_prompt_len: int):
        self.prompts, self.tok, self.seed, self.max_len = prompts, tokenizer, seed, max_prompt_len
        self._ids: dict[int, list[int]] = {}

    def order(self, epoch: int) -> list[int]:
        idx = list(range(len(self.prompts)))
        random.Random(self.seed * 100_003 + epoch).shuffle(idx)
        return idx

    def take(
        self, n: int, pos: tuple[int, int], stats: dict
    ) -> tuple[list[tuple[RLPrompt, list[int]]], tuple[int, int]]:
        """``n`` prompts (rendered) from ``pos``; too-long prompts are skipped and counted."""
        epoch, k = pos
        out: list[tuple[RLPrompt, list[int]]] = []
        scanned = 0
        while len(out) < n:
            order = self.order(epoch)
            if k >= len(order):
                epoch, k = epoch + 1, 0
                continue
            i = order[k]
            k += 1
            scanned += 1
            if scanned > 2 * len(self.prompts) + n and not out:
                raise ConfigError(f"every prompt is longer than rollout.max_prompt_len={self.max_len}")
            if i not in self._ids:
                self._ids[i] = render_prompt(self.tok, self.prompts[i].messages)
            if len(self._ids[i]) > self.max_len:
                stats["prompts_skipped_long"] += 1
                continue
            out.append((self.prompts[i], self._ids[i]))
        return out, (epoch, k)


def sampling_seed(seed: int, step: int, batch: int) -> int:
    """Base seed of one generation batch; its sample k gets this + k (``SamplingParams.seed``),
    so no two samples of a run share a seed within a batch."""
    return (seed * 1_000_003 + step * 7919 + batch * 131) % (2**31 - 1)


class Collector:
    """Generates, scores and filters groups for one RL step (global rank 0 only)."""

    def __init__(self, engine: InferenceEngine, tokenizer, stream: PromptStream, cfg: RLConfig):
        self.engine, self.tok, self.stream, self.cfg = engine, tokenizer, stream, cfg
        self.sandbox_budget = SandboxFailureBudget(cfg.reward.code.max_sandbox_failures)  # over the whole run
        self.stop_ids = stop_token_ids(tokenizer, cfg.model.tokenizer_dir)

    def params(self, step: int, batch: int) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_new_tokens=r.max_response_len,
            n=r.n_samples,
            stop_token_ids=list(self.stop_ids),
            seed=sampling_seed(self.cfg.seed, step, batch),
        )

    def _score(self, prompts: Sequence[RLPrompt], comps: Sequence[list[Completion]]) -> list[list[RewardResult]]:
        return score_groups(self.tok, prompts, comps, self.cfg.reward, self.cfg.rollout.reward_workers)

    def collect(self, step: int, pos: tuple[int, int], buffer: list[Group], dump: Optional[Path] = None):
        """-> (groups for this step, metrics, next prompt position, new buffer); with ``dump``,
        every generated group is also written there (JSONL, one group per line). The buffer is
        used only with ``data.surplus=keep``."""
        d, a = self.cfg.data, self.cfg.algo
        keep_surplus = d.surplus == "keep"
        buffer = list(buffer) if keep_surplus else []
        stats = dict(prompts_skipped_long=0, groups_generated=0, groups_filtered=0, gen_batches=0, samples_aborted=0)
        kept: list[Group] = list(buffer)
        generated: list[tuple[int, bool, Group]] = []  # (generation batch, kept, group)
        t_gen = t_wait = 0.0
        sandbox_failures = 0
        with ThreadPoolExecutor(max(1, self.cfg.rollout.reward_workers), thread_name_prefix="score") as scorer:
            while len(kept) < d.prompts_per_step and stats["gen_batches"] < d.max_gen_batches:
                batch, pos = self.stream.take(d.gen_batch_prompts or d.prompts_per_step, pos, stats)
                params = self.params(step, stats["gen_batches"])
                stats["gen_batches"] += 1
                aborted = self.engine.aborted_samples
                t0 = time.time()
                pending = []  # (prompt index, completions, rewards future), in completion order
                for i, comps in self.engine.generate_stream([ids for _, ids in batch], params):
                    pending.append((i, comps, scorer.submit(self._score, [batch[i][0]], [comps])))
                t_gen += time.time() - t0
                stats["samples_aborted"] += self.engine.aborted_samples - aborted
                t0 = time.time()
                for i, comps, fut in sorted(pending, key=lambda x: x[0]):  # prompt order: reproducible
                    (prompt, ids), results = batch[i], fut.result()[0]
                    failed = self.sandbox_budget.add(results)  # raises past the budget
                    if failed:  # rewards the sandbox could not compute: never trained on
                        sandbox_failures += failed
                        continue
                    g = [
                        Sample(prompt.uid, ids, c.output_ids, c.logprobs, c.finish_reason, r.score, r.correct, r.reason,
                               weight_version=step - 1)  # the engine holds the weights of step - 1
                        for c, r in zip(comps, results)
                    ]  # fmt: skip
                    for s, adv in zip(g, group_advantages([s.reward for s in g], a.adv_eps, a.adv_std)):
                        s.advantage = adv
                    stats["groups_generated"] += 1
                    keep = not a.filter_zero_adv or has_signal(g, a.filter_metric)
                    generated.append((stats["gen_batches"], keep, g))
                    if not keep:
                        stats["groups_filtered"] += 1
                        continue
                    kept.append(g)
                t_wait += time.time() - t0
        groups, surplus = kept[: d.prompts_per_step], kept[d.prompts_per_step :]
        rest = surplus if keep_surplus else []
        if dump is not None:
            dump.parent.mkdir(parents=True, exist_ok=True)
            used = {id(g) for g in groups}
            rows = [{"source": "buffer", "used": id(g) in used, "samples": [asdict(s) for s in g]} for g in buffer]
            rows += [
                {"source": "generated", "gen_batch": n, "kept": keep, "samples": [asdict(s) for s in g]}
                for n, keep, g in generated
            ]
            dump.write_text("".join(json.dumps(r) + "\n" for r in rows))
        metrics = rollout_metrics([s for _, _, g in generated for s in g])
        metrics.update({f"rollout/{k}": v for k, v in stats.items()})
        metrics["rollout/groups_kept"] = len(groups)
        metrics["rollout/groups_buffered"] = len(rest)
        metrics["rollout/groups_discarded"] = len(surplus) - len(rest)
        metrics["rollout/groups_stale"] = sum(g[0].weight_version < step - 1 for g in groups)
        metrics["reward/sandbox_failures"] = sandbox_failures
        metrics["time/generate_s"] = t_gen
        metrics["time/reward_wait_s"] = t_wait
        return groups, metrics, pos, rest


def rollout_metrics(samples: Sequence[Sample]) -> dict:
    if not samples:
        return {}
    rewards = np.array([s.reward for s in samples])
    lens = np.array([len(s.response_ids) for s in samples])
    failures = sum(s.reason.startswith(("deadline", "error", "timeout")) for s in samples)
    return {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()),
        "reward/accuracy": float(np.mean([s.correct for s in samples])),
        "reward/failures": failures,
        "response/length_mean": float(lens.mean()),
        "response/length_max": int(lens.max()),
        "response/clipped_frac": float(np.mean([s.finish_reason == "length" for s in samples])),
        "rollout/samples": len(samples),
    }


def groups_to_rows(groups: list[Group]) -> list[list[dict]]:
    """The buffer's rows (schema ``BUFFER_SCHEMA``) of ``groups``, for the run state."""
    return [[asdict(s) for s in g] for g in groups]


def groups_from_rows(rows: list, schema: int, step: int) -> list[Group]:
    """The groups of buffer ``rows`` written in ``schema`` by a checkpoint of ``step``, migrated
    to this version's samples; rows whose fields are not exactly the schema's, or a schema this
    code does not know, are a ``CheckpointError`` naming it."""
    if not rows:
        return []
    if schema not in _SCHEMA_FIELDS:
        raise CheckpointError(
            f"RL buffer schema {schema!r} is not one this megatron_klear reads (1 to {BUFFER_SCHEMA})"
        )
    want = set(_SCHEMA_FIELDS[schema])
    groups = []
    for g in rows:
        group = []
        for row in g:
            if set(row) != want:
                raise CheckpointError(
                    f"RL buffer schema {schema}: a sample has fields {sorted(set(row) - want)} it should not have "
                    f"and lacks {sorted(want - set(row))}"
                )
            if schema == 1:  # every buffered sample was stale: sampled for step `step`, by its weights
                row = {k: v for k, v in row.items() if k != "stale"} | {"weight_version": step - 1}
            group.append(Sample(**row))
        groups.append(group)
    return groups
