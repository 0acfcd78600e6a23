"""Rollouts on global rank 0: prompts -> engine samples -> rewards -> kept groups.

Dynamic sampling: groups without signal (``algo.filter_metric``: every reward equal, or every
response equally correct) are dropped; generation batches continue (up to ``max_gen_batches``)
until ``prompts_per_step`` groups are kept, and the step then trains on what there is. Kept
groups beyond the batch are discarded (``data.surplus=discard``, the public code's choice) or,
with ``keep``, wait in a checkpointed buffer for the next step. Every sample carries the weight
version that sampled it (the number of steps the engine's weights had trained): a buffered
group's, or that of a batch generated ahead of training (``rollout.overlap``, ``rl.ahead``), is
older than the policy it is trained at, so the loss takes its ratio against the engine's
log-probs of the policy that sampled it (``rl.loss``).
Every prompt of a generation batch is submitted at once (``generate_stream``) and each group is
scored as soon as its samples are in, so no group waits for the slowest sample of another.
Samples the engine got back aborted were generated again (``rollout/samples_aborted`` counts
them); none reaches training.
"""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
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
    # rollout.partial: the weight version of each response token, when they differ (a sample
    # interrupted at a step boundary and continued on newer weights); None: all weight_version
    token_versions: Optional[list[int]] = None

    def versions(self) -> list[int]:
        """The weight version of every response token."""
        if self.token_versions is None:
            return [self.weight_version] * len(self.response_ids)
        return list(self.token_versions)

    @property
    def unfinished(self) -> bool:
        """Interrupted at a step boundary (rollout.partial): to be continued, not yet scored."""
        return self.finish_reason == "abort"


Group = list[Sample]

# The checkpointed buffer's rows (``RunState.buffer``): 1 = sample dicts with ``stale`` (every
# buffered group was stale), 2 = sample dicts with ``weight_version`` instead, 3 = with
# ``token_versions`` too (rollout.partial; unfinished samples have finish_reason "abort").
BUFFER_SCHEMA = 3
_SAMPLE_FIELDS = tuple(Sample.__dataclass_fields__)
_V2_FIELDS = tuple(f for f in _SAMPLE_FIELDS if f != "token_versions")
_SCHEMA_FIELDS = {
    1: tuple(f for f in _V2_FIELDS if f != "weight_version") + ("stale",),
    2: _V2_FIELDS,
    3: _SAMPLE_FIELDS,
}


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


@dataclass
class _Collection:
    """What one ``Collector.collect`` call gathers."""

    step: int
    weight_version: int
    stats: dict
    kept: list = field(default_factory=list)  # groups with signal, in order (carried ones first)
    generated: list = field(default_factory=list)  # (source, generation batch, kept, group)
    unfinished: list = field(default_factory=list)  # groups interrupted by a cut (rollout.partial)
    t_gen: float = 0.0
    t_wait: float = 0.0
    sandbox_failures: int = 0


CONTINUE_BATCH = 1000  # sampling_seed's batch index of the continuations of interrupted samples


class Collector:
    """Generates, scores and filters groups for one RL step (global rank 0 only).

    Partial rollouts (``rollout.partial``): ``cut`` (set by the RL loop at a step boundary, with
    the engine interrupted) ends the collection; groups whose samples were interrupted go back
    unscored with the rest, and the next collection first continues each interrupted sample
    from its prefix on the weights it then has (its tokens keep the version that produced
    them), then scores those groups like any other."""

    def __init__(self, engine: InferenceEngine, tokenizer, stream: PromptStream, cfg: RLConfig):
        self.engine, self.tok, self.stream, self.cfg = engine, tokenizer, stream, cfg
        self.sandbox_budget = SandboxFailureBudget(cfg.reward.code.max_sandbox_failures)  # over the whole run
        self.stop_ids = stop_token_ids(tokenizer, cfg.model.tokenizer_dir)
        self.cut = threading.Event()
        self.completed_groups = 0  # groups of the current collection whose every sample finished
        self._prompts = {p.uid: p for p in reversed(stream.prompts)}  # interrupted samples' prompts

    def params(self, step: int, batch: int, n: Optional[int] = None) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_new_tokens=r.max_response_len,
            n=n or r.n_samples,
            stop_token_ids=list(self.stop_ids),
            seed=sampling_seed(self.cfg.seed, step, batch),
        )

    def _score(self, prompts: Sequence[RLPrompt], comps: Sequence[list[Completion]]) -> list[list[RewardResult]]:
        return score_groups(self.tok, prompts, comps, self.cfg.reward, self.cfg.rollout.reward_workers)

    def collect(
        self,
        step: int,
        pos: tuple[int, int],
        buffer: list[Group],
        dump: Optional[Path] = None,
        weight_version: Optional[int] = None,
    ):
        """-> (groups for this step, metrics, next prompt position, new buffer); with ``dump``,
        every generated group is also written there (JSONL, one group per line). Kept groups
        of the buffer are used only with ``data.surplus=keep``; interrupted ones (rollout.partial)
        always. ``weight_version``: the steps trained into the engine's weights (default
        ``step - 1``: the policy that trains on the batch; fewer when rollouts run ahead of
        training, ``rollout.overlap``)."""
        d = self.cfg.data
        run = _Collection(step, step - 1 if weight_version is None else weight_version, dict(
            prompts_skipped_long=0, groups_generated=0, groups_filtered=0, gen_batches=0, samples_aborted=0,
            groups_continued=0))  # fmt: skip
        self.completed_groups = 0
        interrupted = [g for g in buffer if any(s.unfinished for s in g)]
        carried = [g for g in buffer if d.surplus == "keep" and not any(s.unfinished for s in g)]
        run.kept = list(carried)
        with ThreadPoolExecutor(max(1, self.cfg.rollout.reward_workers), thread_name_prefix="score") as scorer:
            if interrupted:
                self._continue(run, interrupted, scorer)
            while len(run.kept) < d.prompts_per_step and run.stats["gen_batches"] < d.max_gen_batches:
                if self.cut.is_set():
                    break
                batch, pos = self.stream.take(d.gen_batch_prompts or d.prompts_per_step, pos, run.stats)
                params = self.params(step, run.stats["gen_batches"])
                run.stats["gen_batches"] += 1
                self._generate(run, [(p, ids, None) for p, ids in batch], params, None, scorer, "generated")
        groups, surplus = run.kept[: d.prompts_per_step], run.kept[d.prompts_per_step :]
        rest = (surplus if d.surplus == "keep" else []) + run.unfinished
        if dump is not None:
            write_dump(dump, carried, groups, run.generated)
        return groups, self._metrics(run, groups, surplus, rest), pos, rest

    def _continue(self, run: _Collection, interrupted: list[Group], scorer: ThreadPoolExecutor) -> None:
        """Continue every interrupted sample of ``interrupted`` from its prefix, then score the
        groups that are complete."""
        r = self.cfg.rollout
        todo = [(gi, si) for gi, g in enumerate(interrupted) for si, s in enumerate(g) if s.unfinished]
        prompts = [interrupted[gi][si].prompt_ids + interrupted[gi][si].response_ids for gi, si in todo]
        budgets = [r.max_response_len - len(interrupted[gi][si].response_ids) for gi, si in todo]
        params = self.params(run.step, CONTINUE_BATCH, n=1)
        aborted, t0 = self.engine.aborted_samples, time.time()
        groups = [[replace(s) for s in g] for g in interrupted]  # the stored buffer stays as it was
        for k, [c] in self.engine.generate_stream(prompts, params, budgets):
            gi, si = todo[k]
            s = groups[gi][si]
            s.token_versions = s.versions() + [run.weight_version] * len(c.output_ids)
            s.response_ids, s.engine_logprobs = s.response_ids + c.output_ids, s.engine_logprobs + c.logprobs
            s.finish_reason, s.weight_version = c.finish_reason, min(s.token_versions, default=run.weight_version)
        run.t_gen += time.time() - t0
        run.stats["samples_aborted"] += self.engine.aborted_samples - aborted
        items, pending = [], []
        for g in groups:
            if any(s.unfinished for s in g):
                run.unfinished.append(g)  # cut again: continued at the next step
                continue
            self.completed_groups += 1
            prompt, comps = (
                self._prompts[g[0].uid],
                [Completion(s.response_ids, s.engine_logprobs, s.finish_reason) for s in g],
            )
            pending.append((len(items), comps, scorer.submit(self._score, [prompt], [comps])))
            items.append((prompt, g[0].prompt_ids, g))
            run.stats["groups_continued"] += 1
        self._keep(run, items, pending, "continued")

    def _generate(self, run, batch, params, budgets, scorer, source: str) -> None:
        """Generate ``batch`` ((prompt, ids, None) each), score each group as it completes and
        keep those with signal; groups a cut interrupted are set aside unscored."""
        aborted, t0 = self.engine.aborted_samples, time.time()
        pending = []  # (index, completions, rewards future), in completion order
        for i, comps in self.engine.generate_stream([ids for _, ids, _ in batch], params, budgets):
            if any(c.finish_reason == "abort" for c in comps):  # interrupted (rollout.partial)
                prompt, ids, _ = batch[i]
                run.unfinished.append(self._samples(run, prompt.uid, ids, comps, None))
                continue
            self.completed_groups += 1
            pending.append((i, comps, scorer.submit(self._score, [batch[i][0]], [comps])))
        run.t_gen += time.time() - t0
        run.stats["samples_aborted"] += self.engine.aborted_samples - aborted
        self._keep(run, batch, pending, source)

    def _keep(self, run: _Collection, batch, pending, source: str) -> None:
        """Wait for the rewards (in prompt order: reproducible), compute group advantages and
        keep the groups with signal (dynamic sampling)."""
        a, t0 = self.cfg.algo, time.time()
        for i, comps, fut in sorted(pending, key=lambda x: x[0]):
            (prompt, ids, samples), results = batch[i], fut.result()[0]
            failed = self.sandbox_budget.add(results)  # raises past the budget
            if failed:  # rewards the sandbox could not compute: never trained on
                run.sandbox_failures += failed
                continue
            g = self._samples(run, prompt.uid, ids, comps, results, samples)
            for s, adv in zip(g, group_advantages([s.reward for s in g], a.adv_eps, a.adv_std)):
                s.advantage = adv
            run.stats["groups_generated"] += source == "generated"
            keep = not a.filter_zero_adv or has_signal(g, a.filter_metric)
            run.generated.append((source, run.stats["gen_batches"], keep, g))
            if not keep:
                run.stats["groups_filtered"] += 1
                continue
            run.kept.append(g)
        run.t_wait += time.time() - t0

    @staticmethod
    def _samples(run, uid, ids, comps, results, samples: Optional[Group] = None) -> Group:
        """The group's samples: ``samples`` (continued ones) with their rewards, or new ones from
        ``comps`` (unscored, reward 0, when ``results`` is None: interrupted)."""
        if samples is not None:
            for s, r in zip(samples, results):
                s.reward, s.correct, s.reason = r.score, r.correct, r.reason
            return samples
        if results is None:
            return [Sample(uid, ids, c.output_ids, c.logprobs, c.finish_reason, 0.0, False, "unfinished",
                           weight_version=run.weight_version) for c in comps]  # fmt: skip
        return [
            Sample(uid, ids, c.output_ids, c.logprobs, c.finish_reason, r.score, r.correct, r.reason,
                   weight_version=run.weight_version)
            for c, r in zip(comps, results)
        ]  # fmt: skip

    @staticmethod
    def _metrics(run: _Collection, groups: list[Group], surplus: list[Group], rest: list[Group]) -> dict:
        step = run.step
        metrics = rollout_metrics([s for _, _, _, g in run.generated for s in g])
        metrics.update({f"rollout/{k}": v for k, v in run.stats.items()})
        metrics["rollout/groups_kept"] = len(groups)
        metrics["rollout/groups_buffered"] = len(rest) - len(run.unfinished)
        metrics["rollout/groups_discarded"] = len(surplus) - metrics["rollout/groups_buffered"]
        metrics["rollout/groups_stale"] = sum(g[0].weight_version < step - 1 for g in groups)
        # updates between the weights that generated the batch and the policy trained on it
        metrics["rollout/policy_lag"] = step - 1 - run.weight_version
        if run.stats["groups_continued"] or run.unfinished:  # rollout.partial
            oldest = min((v for g in groups for s in g for v in s.versions()), default=run.weight_version)
            metrics["rollout/token_lag_max"] = step - 1 - oldest
            metrics["rollout/groups_unfinished"] = len(run.unfinished)
        metrics["reward/sandbox_failures"] = run.sandbox_failures
        metrics["time/generate_s"] = run.t_gen
        metrics["time/reward_wait_s"] = run.t_wait
        return metrics


def write_dump(dump: Path, buffer: list[Group], used: list[Group], generated: list) -> None:
    """``rollout.dump``: one JSON line per group of the step, the buffered ones (``used`` or not)
    and the generated ones (``source`` "generated", or "continued" for interrupted groups
    completed this step; their generation batch, and whether dynamic sampling kept them)."""
    dump.parent.mkdir(parents=True, exist_ok=True)
    ids = {id(g) for g in used}
    rows = [{"source": "buffer", "used": id(g) in ids, "samples": [asdict(s) for s in g]} for g in buffer]
    rows += [
        {"source": source, "gen_batch": n, "kept": keep, "samples": [asdict(s) for s in g]}
        for source, n, keep, g in generated
    ]
    dump.write_text("".join(json.dumps(r) + "\n" for r in rows))


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
            group.append(Sample(**row))  # schema 1 and 2: one version for every token
        groups.append(group)
    return groups
