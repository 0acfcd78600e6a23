#!/usr/bin/env python
"""RL step time with rollouts overlapping training (``rollout.overlap=1``) against the serial
loop (``rollout.overlap=0``), with a real SGLang server as the engine.

    python tools/bench_overlap.py [--steps 8] [--warmup 2] [--repeats 2] [--trainer-cpus 0]
        [--engine-cpus 1] [--layers 4] [--hidden 256] [--json docs/bench_overlap_cpu.json] [key=value ...]

Needs the SGLang venv that ``bash tools/test.sh`` installs (.venv-sglang, or
KLEAR_SGLANG_PYTHON). A random Qwen3 of the given shape (our tiny tokenizer) is the model; one
real SGLang CPU server (float32) and its router run pinned to ``--engine-cpus`` (taskset) and the
trainer (one process, its reward workers with it) to ``--trainer-cpus``: on a CPU machine that
stands in for engines on GPUs of their own (``rollout.sglang.mode=distributed``, gloo broadcast).
Both arms run examples/tiny/rl_math.yaml with the same prompts, seeds and steps (dynamic sampling
off, so every step trains every group: the work per step does not depend on the rewards), in
alternating order, each on a fresh server; ``key=value`` overrides go to both.

Reported per arm (medians over the steps after ``--warmup``): step time, generation (generate +
reward wait), train (old log-probs + update), sync, the time the trainer waited for rollouts,
generated tokens/s and the policy lag. The speed-up is the serial arm's step time over the
overlapped one's; its physical limit is (generate + train) / max(generate, train) of the serial
arm; also reported: the speed-up as a share of that limit (over the means of the arms, and
for each repeat, whose two arms ran back to back), and the machine's load (load average,
and how busy each pinned core was, from /proc/stat) while each arm ran. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from megatron_klear.inference import http  # noqa: E402
from megatron_klear.inference.sglang_servers import (  # noqa: E402
    router_command,
    server_command,
    server_environment,
    spawn_logged,
    stop_process,
)
from megatron_klear.models.tiny import TinyModelArgs, make_tiny_model  # noqa: E402
from tests.jobs import run_job  # noqa: E402
from tests.sglang_real import cpu_engine_config  # noqa: E402

CONFIG = ROOT / "examples" / "tiny" / "rl_math.yaml"
# the metrics of each step kept in the JSON
STEP_KEYS = ("step", "time/step_s", "time/generate_s", "time/reward_wait_s", "time/old_logprobs_s", "time/train_s",
             "time/sync_s", "time/rollout_wait_s", "rollout/policy_lag", "rollout/samples", "response/length_mean",
             "loss/pg")  # fmt: skip


def core_busy() -> dict[int, tuple[int, int]]:
    """Per core: (busy jiffies, total jiffies) from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            name, *vals = line.split()
            v = list(map(int, vals))
            idle = v[3] + v[4]
            out[int(name[3:])] = (sum(v) - idle, sum(v))
    return out


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def start_engine(model: Path, work: Path, cpus: str):
    """One CPU SGLang server and its router, pinned to ``cpus``; returns (config, processes)."""
    cfg = cpu_engine_config(model, work / "sglang_logs", replicas=1,
                            extra_args=["--skip-server-warmup", "--max-total-tokens", "32768"])  # fmt: skip
    (work / "sglang_logs").mkdir(parents=True, exist_ok=True)
    pin = ["taskset", "-c", cpus]
    procs = [spawn_logged(pin + router_command(cfg), work / "sglang_logs" / "router.log", cfg.env)]
    server_log = work / "sglang_logs" / "server_0.log"
    procs.append(spawn_logged(pin + server_command(cfg, 0), server_log, server_environment(cfg)))
    url = f"http://{cfg.host}:{cfg.port}"
    try:
        http.wait_healthy(f"http://{cfg.host}:{cfg.router_port}", cfg.startup_timeout_s, path="/health")
        http.wait_healthy(url, cfg.startup_timeout_s, alive=lambda: procs[1].poll() is None)
    except Exception:
        for p in procs:
            stop_process(p)
        raise
    return cfg, procs


def engine_overrides(cfg) -> list[str]:
    return [
        "rollout.engine=sglang",
        "rollout.sglang.mode=distributed",
        "rollout.sglang.weight_sync_backend=gloo",
        "rollout.sglang.device=cpu",
        "rollout.sglang.launch=false",
        f"rollout.sglang.server_urls=[http://{cfg.host}:{cfg.port}]",
        f"rollout.sglang.router_url=http://{cfg.host}:{cfg.router_port}",
        f"rollout.sglang.nccl_master_address={cfg.nccl_master_address}",
        f"rollout.sglang.nccl_master_port={cfg.nccl_master_port}",
    ]


def run_arm(a, overlap: int, model: Path, work: Path) -> dict:
    """One arm on a fresh server: its steps' metrics and the load while it ran."""
    cfg, procs = start_engine(model, work, a.engine_cpus)
    out = work / f"overlap{overlap}"
    data = ROOT / "examples" / "data"
    overrides = [
        f"output_dir={out}", f"model.hf={model}", "bootstrap=null", "data.generate=null",
        f"data.train=[{data / 'math_train.parquet'}]", "data.eval=[]", f"train_steps={a.steps}",
        "eval.at_start=false", "eval.at_end=false", "checkpoint.export_hf=false", f"checkpoint.save_interval={10**6}",
        "log.tensorboard=false", "algo.filter_zero_adv=false", "data.max_gen_batches=1",
        f"rollout.overlap={overlap}", "rollout.max_logprob_diff=1e-3",
    ] + engine_overrides(cfg) + list(a.overrides)  # fmt: skip
    cmd = ["taskset", "-c", a.trainer_cpus, sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", "1", "-m", "megatron_klear.rl", "--config", str(CONFIG), *overrides]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    load0, busy0, t0 = loadavg(), core_busy(), time.time()
    try:
        r = run_job(cmd, env, timeout=a.timeout)
    finally:
        for p in procs:
            stop_process(p)
    load1, busy1 = loadavg(), core_busy()
    if r.returncode != 0:
        raise SystemExit(f"overlap={overlap} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: round(r[k], 4) if isinstance(r[k], float) else r[k] for k in STEP_KEYS if k in r} for r in logged]
    cores = {int(c) for c in (a.trainer_cpus + "," + a.engine_cpus).split(",")}
    busy = {c: (busy1[c][0] - busy0[c][0]) / max(busy1[c][1] - busy0[c][1], 1) for c in sorted(cores)}
    return {"overlap": overlap, "steps": rows, "wall_s": time.time() - t0, "loadavg_before": load0,
            "loadavg_after": load1, "core_busy": busy}  # fmt: skip


def summarise(arm: dict, warmup: int) -> dict:
    """Medians over the steps after the warm-up."""
    rows = [r for r in arm["steps"] if r["step"] > warmup]

    def med(fn) -> float:
        return statistics.median(fn(r) for r in rows)

    return {
        "overlap": arm["overlap"],
        "step_s": med(lambda r: r["time/step_s"]),
        "generate_s": med(lambda r: r["time/generate_s"] + r["time/reward_wait_s"]),
        "train_s": med(lambda r: r["time/old_logprobs_s"] + r["time/train_s"]),
        "sync_s": med(lambda r: r["time/sync_s"]),
        "rollout_wait_s": med(lambda r: r["time/rollout_wait_s"]),
        "tokens_per_s": med(lambda r: r["response/length_mean"] * r["rollout/samples"] / r["time/step_s"]),
        "policy_lag": max(r["rollout/policy_lag"] for r in rows),
        "loss_pg": [r["loss/pg"] for r in arm["steps"]],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    p.add_argument("--repeats", type=int, default=2, help="runs per arm, in alternating order")
    p.add_argument("--trainer-cpus", default="0")
    p.add_argument("--engine-cpus", default="1")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--arms", default="0,1", help="rollout.overlap values to run (the report needs 0 and 1)")
    p.add_argument("--json", default="bench_overlap_cpu.json")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the RL config (both arms)")
    a = p.parse_args(argv)
    os.environ.setdefault("KLEAR_SGLANG_PYTHON", str(ROOT / ".venv-sglang" / "bin" / "python"))
    shape = TinyModelArgs(layers=a.layers, hidden=a.hidden, heads=8, kv_heads=4, head_dim=a.hidden // 8,
                          ffn=3 * a.hidden, vocab=512)  # fmt: skip
    arms: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "model", shape)
        for rep in range(a.repeats):
            order = [int(k) for k in a.arms.split(",")]
            for overlap in order if rep % 2 == 0 else order[::-1]:
                arm = run_arm(a, overlap, model, Path(tmp) / f"rep{rep}")
                arm.update(repeat=rep, summary=summarise(arm, a.warmup))
                arms.append(arm)
                s, load = arm["summary"], arm["loadavg_before"][0]
                print(f"repeat {rep} overlap={overlap}: step {s['step_s']:.3f} s, loadavg {load:.1f}", flush=True)
    if {arm["overlap"] for arm in arms} != {0, 1}:
        Path(a.json).write_text(to_json({"arms": arms}))
        return 0
    result = report(a, shape, arms)
    Path(a.json).write_text(to_json(result))
    return 0


def report(a, shape: TinyModelArgs, arms: list[dict]) -> dict:
    """The table (per arm, then the speed-up) and the JSON record."""
    by = {k: [arm["summary"] for arm in arms if arm["overlap"] == k] for k in (0, 1)}
    mean = {k: {f: statistics.mean(s[f] for s in v) for f in v[0] if f not in ("overlap", "loss_pg", "policy_lag")}
            for k, v in by.items()}  # fmt: skip
    speedup, limit = speedup_and_limit(mean[0], mean[1])
    # per repeat: the serial and overlapped arm of one repeat ran back to back, under similar load
    pairs = [speedup_and_limit(s0, s1) for s0, s1 in zip(by[0], by[1])]
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo"], capture_output=True, text=True).stdout
    cols = ("step_s", "generate_s", "train_s", "sync_s", "rollout_wait_s", "tokens_per_s")
    print(f"{'overlap':>8}{'repeat':>8}" + "".join(f"{c:>16}" for c in cols) + f"{'policy lag':>12}{'loadavg':>12}")
    for arm in arms:
        s = arm["summary"]
        print(f"{s['overlap']:>8}{arm['repeat']:>8}" + "".join(f"{s[c]:>16.3f}" for c in cols)
              + f"{s['policy_lag']:>12}{arm['loadavg_before'][0]:>12.1f}")  # fmt: skip
    for rep, (sp, lim) in enumerate(pairs):
        print(f"repeat {rep}: speed-up {sp:.2f}x, limit {lim:.2f}x, share of the limit {sp / lim:.2f}")
    print(f"means: speed-up {speedup:.2f}x; physical limit (generate + train) / max = {limit:.2f}x; "
          f"share of the limit {speedup / limit:.2f}")  # fmt: skip
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{os.cpu_count()} cores, {cpu.split(':')[-1].strip()}",
        "python": platform.python_version(),
        "trainer_cpus": a.trainer_cpus,
        "engine_cpus": a.engine_cpus,
        "model": vars(shape),
        "steps": a.steps,
        "warmup": a.warmup,
        "overrides": a.overrides,
        "arms": arms,
        "mean": mean,
        "speedup": speedup,
        "limit": limit,
        "share_of_limit": speedup / limit,
        "per_repeat": [{"speedup": sp, "limit": lim, "share_of_limit": sp / lim} for sp, lim in pairs],
    }


def to_json(obj) -> str:
    """Indented JSON with every flat object (a step's metrics, say) on one line."""
    text = json.dumps(obj, indent=1)
    return re.sub(
        r"\{\n\s+([^{}\[\]]*?)\n\s*\}", lambda m: "{" + " ".join(s.strip() for s in m.group(1).split("\n")) + "}", text
    )


def speedup_and_limit(serial: dict, overlapped: dict) -> tuple[float, float]:
    """The serial arm's step time over the overlapped one's, and its physical limit
    (generate + train) / max(generate, train), from the serial arm's phases."""
    gen, train = serial["generate_s"], serial["train_s"]
    return serial["step_s"] / overlapped["step_s"], (gen + train) / max(gen, train)


if __name__ == "__main__":
    raise SystemExit(main())
