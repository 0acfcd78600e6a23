#!/usr/bin/env python
"""Every GPU check in one call, sized for our GPU test machine (one H100 80GB or H200, Python 3.12,
torch + CUDA and triton preinstalled, no Transformer Engine, no SGLang, no internet):

    bash tools/gpu_check.sh OUTDIR            # OUTDIR: "$OUT" on that machine (nothing else comes back)
    bash tools/gpu_check.sh OUTDIR --plan     # print the plan (steps, limits, memory) and run nothing
    bash tools/gpu_check.sh OUTDIR --free-gib 78    # plan for this much GPU memory (default: free now)
    GPU_CHECK_SMOKE=1 bash tools/gpu_check.sh OUTDIR    # the same steps at tiny sizes, on a CPU (or --smoke)

Steps, in order, each with its own time limit; the limits add up to the whole budget
(``BUDGET_S`` = 480 s), so the check ends within 8 minutes plus start-up:

1. ``install_wheels``: the wheels carried in ``.whl/`` (megatron-core, math-verify and its
   parsers: ``bash tools/fetch_gpu_wheels.sh``) into /tmp/site, first on PYTHONPATH;
2. ``environment``: versions, the GPU, its free memory;
3. ``gpu_tests``: the tests marked gpu (tests/gpu; JUnit XML into OUTDIR);
4. benchmarks, each with a memory estimate (``megatron_klear.training.memory``) printed before
   it runs: the Triton log-prob kernel; SFT MFU of shapes that fit the GPU without Transformer
   Engine (``torch-native attention``: 0.6B at 2K and 4K; 1.7B with full recompute at 4K and 8K);
   the weight gather; the eager and torch.compile kernel baselines (rows that cannot fit are
   recorded as "does not fit", an out-of-memory as its own row).

A step whose estimate exceeds the GPU's free memory is skipped as "does not fit", which is not a
failure. A step that outlives its limit gets SIGTERM, then SIGKILL 10 s later, and so does every
process it started, in whatever process group or session (torchrun puts its workers in sessions
of their own): each step's processes carry ``GPU_CHECK_STEP=<id>`` in their environment, and the
runner kills every process that has it after the step ends, so nothing holds GPU memory into the
next step. OUTDIR receives gpu_check.log (everything), gpu_tests.xml and summary.json (each step's
command, status, seconds and estimate, and every benchmark's JSON). Exit 1 if a step failed or
timed out.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from megatron_klear.models.config import Qwen3Config  # noqa: E402
from megatron_klear.models.hf_mapping import num_params  # noqa: E402
from megatron_klear.models.shapes import qwen3_config_dict  # noqa: E402
from megatron_klear.training.memory import GIB, MemoryEstimate, logprob_kernel_memory, sft_memory  # noqa: E402

BUDGET_S = 480  # the sum of every step's limit: 8 minutes
SMOKE_SLOWDOWN = 3  # a smoke run's limits: a shared 2-core CPU is slower than the GPU machine
STEP_MARK = "GPU_CHECK_STEP"
KILL_GRACE_S = 10
H100_PEAK_TFLOPS = 989  # bf16 dense, per GPU: MFU's denominator

# (shape, sequence length, recompute): what fits 78 GiB with Megatron's torch-native attention
SFT_RUNS = [("0.6b", 2048, None), ("0.6b", 4096, None), ("1.7b", 4096, "full"), ("1.7b", 8192, "full")]
KERNEL_TOKENS, KERNEL_VOCABS = [4096, 16384, 32768], [151936, 37984]
# --te (a machine with Transformer Engine): (shape, sequence length, recompute, FP8 recipe)
TE_SFT_RUNS = [("1.7b", 4096, None, None), ("1.7b", 4096, None, "tensorwise"), ("1.7b", 4096, None, "delayed"),
               ("1.7b", 16384, "full", None)]  # fmt: skip


@dataclass
class Step:
    """One command of the check: its limit, and for a benchmark its memory estimate."""

    name: str
    limit_s: int
    cmd: list[str]
    estimate_gib: Optional[float] = None
    label: str = ""
    note: str = ""  # what the estimate is made of
    skip: Optional[str] = None  # why it does not run ("does not fit: ...")
    result: dict = field(default_factory=dict)


def _sft_step(shape: str, seq_len: int, recompute: Optional[str], steps: int, work: Path, limit: int,
              te: bool = False, fp8_recipe: Optional[str] = None, tp: int = 1) -> Step:  # fmt: skip
    """A run of tools/bench_throughput.py --mode sft (``tp`` > 1: under torchrun, with sequence
    parallel), with its memory estimate."""
    hf = Qwen3Config.from_dict(qwen3_config_dict(shape))
    est = sft_memory(hf, seq_len, recompute=recompute, use_te=te, tp=tp)
    name = f"sft_{shape}_{seq_len}" + (f"_{recompute}_recompute" if recompute else "")
    name += (f"_tp{tp}_sp" if tp > 1 else "") + (f"_fp8_{fp8_recipe}" if fp8_recipe else "")
    launcher = [sys.executable] if tp == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 f"--nproc-per-node={tp}"]  # fmt: skip
    cmd = [*launcher, "tools/bench_throughput.py", "--mode", "sft", "--shape", shape, "--seq-len", str(seq_len),
           "--steps", str(steps), "--micro-batches", "2", "--peak-tflops", str(H100_PEAK_TFLOPS),
           "--json", str(work / f"bench_{name}.json")]  # fmt: skip
    if recompute:
        cmd += ["--recompute", recompute]
    if tp > 1:
        cmd += ["--tp", str(tp), "--sequence-parallel"]
    if fp8_recipe:
        cmd += ["--fp8", "hybrid", "--fp8-recipe", fp8_recipe]
    label = "Transformer Engine" if te else "torch-native attention"
    label += (f", {recompute} recompute" if recompute else "") + (f", FP8 {fp8_recipe}" if fp8_recipe else "")
    return Step(name, limit, cmd, est.gib, label, est.describe())


def _kernel_step(name: str, impls: list[str], sizes: dict, limit: int, work: Path, free_gib) -> Step:
    """A run of tools/bench_gppo_kernel.py; it records the rows that cannot fit as such itself."""
    rows = [logprob_kernel_memory(t, v, i).gib for t in sizes["tokens"] for v in sizes["vocab"] for i in impls]
    fitting = [g for g in rows if free_gib is None or g <= free_gib]
    cmd = [sys.executable, "tools/bench_gppo_kernel.py", "--impls", *impls, "--json", str(work / f"bench_{name}.json")]
    for flag, values in sizes.items():
        cmd += [f"--{flag}", *map(str, values if isinstance(values, list) else [values])]
    if free_gib is not None:
        cmd += ["--free-gib", f"{free_gib:.1f}"]
    note = f"largest row that fits ~{max(fitting, default=0):.1f} GiB, {len(rows) - len(fitting)} of {len(rows)} do not"
    return Step(name, limit, cmd, max(fitting, default=0.0), "rows that do not fit are recorded as such", note)


def _gather_step(shape: str, work: Path) -> Step:
    hf = Qwen3Config.from_dict(qwen3_config_dict(shape))
    est = MemoryEstimate(2.0 * num_params(hf), 2 * 512 * 2**20, 0.0)  # bf16 weights, a bucket and its copy
    cmd = [sys.executable, "tools/bench_weight_sync.py", "--shape", shape, "--bucket-mb", "512",
           "--json", str(work / "bench_gather.json")]  # fmt: skip
    return Step("gather", 25, cmd, est.gib, "", est.describe())


def plan(smoke: bool, free_gib: Optional[float], work: Path, wheels: list[Path], te: bool = False,
         gpus: int = 1) -> list[Step]:  # fmt: skip
    """The steps of the check (``smoke``: tiny sizes for a CPU; ``wheels``: those carried in
    .whl/; ``te``: the Transformer Engine check, ``gpus`` > 1 adding a TP=2 run), each marked to
    skip when its estimate exceeds ``free_gib`` (None: not checked). The limits add up to at most
    BUDGET_S."""
    py = sys.executable
    steps: list[Step] = []
    if not smoke and wheels:
        steps.append(Step("install_wheels", 20, [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                                 "--no-compile", "--no-cache-dir", "--upgrade", "--target",
                                                 "/tmp/site", *map(str, wheels)]))  # fmt: skip
    steps.append(Step("environment", 15, [py, "tools/gpu_check.py", "--environment"]))
    steps.append(Step("gpu_tests", 180 if te else 150, [py, "-m", "pytest", "tests/gpu", "-m", "gpu", "-q", "-p",
                                                        "no:cacheprovider", "-rs",
                                                        "--junitxml={out}/gpu_tests.xml"]))  # fmt: skip
    if te:
        steps += [_sft_step(shape, seq, rc, 5, work, 45, True, fp8) for shape, seq, rc, fp8 in TE_SFT_RUNS]
        if gpus >= 2:
            steps.append(_sft_step("1.7b", 8192, None, 5, work, 60, True, "tensorwise", tp=2))
    else:
        if smoke:
            sizes = {"device": "cpu", "tokens": [64], "vocab": [512], "iters": 2}
            triton, baselines, sft, gather = ["eager"], ["eager"], [("tiny", 64, None, 2, 155)], "tiny"
        else:
            sizes = {"tokens": KERNEL_TOKENS, "vocab": KERNEL_VOCABS, "iters": 20}
            triton, baselines, gather = ["triton"], ["eager", "compile"], "0.6b"
            sft = [(*run, 5, limit) for run, limit in zip(SFT_RUNS, (35, 35, 40, 45))]
        steps.append(_kernel_step("kernel_triton", triton, sizes, 30, work, free_gib))
        steps += [_sft_step(shape, seq, recompute, n, work, limit) for shape, seq, recompute, n, limit in sft]
        steps.append(_gather_step(gather, work))
        steps.append(_kernel_step("kernel_baselines", baselines, sizes, 85, work, free_gib))
    for s in steps:
        if free_gib is not None and s.estimate_gib is not None and s.estimate_gib > free_gib:
            s.skip = f"does not fit: needs ~{s.estimate_gib:.1f} GiB, {free_gib:.1f} GiB free"
    total = sum(s.limit_s for s in steps)
    if total > BUDGET_S:
        raise AssertionError(f"the step limits add up to {total} s, over the {BUDGET_S} s budget")
    for s in steps if smoke else []:
        s.limit_s *= SMOKE_SLOWDOWN
    return steps


def environment() -> dict:
    """What the ``environment`` step prints: the GPU, its free memory, the versions that matter."""
    import importlib

    import torch

    def version(name: str) -> str:
        try:
            return importlib.import_module(name).__version__
        except Exception as e:  # a missing or broken package is a fact to report, not a failure here
            return f"missing ({type(e).__name__})"

    gpu = torch.cuda.is_available()
    free, total = torch.cuda.mem_get_info() if gpu else (0, 0)
    packages = ("triton", "transformers", "megatron.core", "transformer_engine")
    return dict(gpu=torch.cuda.get_device_name() if gpu else None, free_gib=free / GIB, total_gib=total / GIB,
                torch=torch.__version__, cuda=torch.version.cuda, **{n: version(n) for n in packages})  # fmt: skip


def gpu_inventory() -> tuple[Optional[float], int]:
    """(free memory of GPU 0 in GiB, or None without a GPU; the number of GPUs), asked in a child
    process so this one never initialises CUDA."""
    code = (
        "import torch; print(torch.cuda.mem_get_info()[0] / 2**30, torch.cuda.device_count())"
        " if torch.cuda.is_available() else print(-1, 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if r.returncode != 0 or not r.stdout.strip():
        return None, 0
    free, count = r.stdout.split()
    return (None if float(free) < 0 else float(free)), int(count)


def marked(mark: str) -> list[int]:
    """PIDs of the live processes whose environment carries ``STEP_MARK=mark``."""
    found, needle = [], f"{STEP_MARK}={mark}".encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                continue
    return found


def kill_marked(mark: str, sig: int = signal.SIGKILL) -> list[int]:
    """Signal every process that carries the step's mark, and its process group (never ours)."""
    pids, ours = marked(mark), os.getpgid(0)
    for pid in pids:
        try:
            group = os.getpgid(pid)
            if group != ours:
                os.killpg(group, sig)
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    return pids


def run_step(step: Step, env: dict, log) -> dict:
    """Run ``step`` in a session of its own under its limit; afterwards no process of it is left."""
    mark = uuid.uuid4().hex
    t0 = time.time()
    proc = subprocess.Popen(step.cmd, cwd=ROOT, env={**env, STEP_MARK: mark}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    timed_out = False
    try:
        rc = proc.wait(timeout=step.limit_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_marked(mark, signal.SIGTERM)
        try:
            rc = proc.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            kill_marked(mark)
            rc = proc.wait()
    left = kill_marked(mark)  # helpers that outlived the step (torchrun workers in their own sessions)
    deadline = time.time() + KILL_GRACE_S
    while marked(mark) and time.time() < deadline:
        time.sleep(0.2)
    return dict(rc=rc, seconds=round(time.time() - t0, 2), timed_out=timed_out, killed_after=len(left))


def say(log, text: str) -> None:
    print(text, flush=True)
    log.write((text + "\n").encode())
    log.flush()


def print_plan(steps: list[Step], free_gib: Optional[float], smoke: bool, log) -> None:
    gpu = "no GPU: memory not checked" if free_gib is None else f"{free_gib:.1f} GiB free on the GPU"
    limits = sum(s.limit_s for s in steps) // (SMOKE_SLOWDOWN if smoke else 1)
    slow = f" (smoke run: x{SMOKE_SLOWDOWN} each on a CPU)" if smoke else ""
    say(log, f"plan: {len(steps)} steps, limits {limits} s of the {BUDGET_S} s budget{slow}; {gpu}")
    for s in steps:
        est = "" if s.estimate_gib is None else f" ~{s.estimate_gib:.1f} GiB"
        what = s.skip or "runs"
        say(log, f"  {s.name:<32} {s.limit_s:>4} s{est:>12}  {what}{'; ' + s.label if s.label else ''}")


def summarize(steps: list[Step], work: Path, out: Path, smoke: bool, log) -> bool:
    for s in steps:
        s.result.setdefault("status", "skipped" if s.skip else "not run")
    ok = all(s.result["status"] in ("ok", "skipped") for s in steps)
    bench = {p.stem.removeprefix("bench_"): json.loads(p.read_text()) for p in sorted(work.glob("bench_*.json"))}
    rows = [dict(asdict(s), command=shlex.join(s.cmd)) for s in steps]
    for r in rows:
        r.pop("cmd")
    (out / "summary.json").write_text(json.dumps(dict(ok=ok, smoke=smoke, budget_s=BUDGET_S, steps=rows,
                                                      benchmarks=bench), indent=1))  # fmt: skip
    say(log, f"{'step':<32} {'status':<10} {'exit':>5} {'seconds':>8} {'limit':>6}  memory")
    for s in steps:
        r = s.result
        est = "" if s.estimate_gib is None else f"~{s.estimate_gib:.1f} GiB"
        say(log, f"{s.name:<32} {r['status']:<10} {str(r.get('rc', '')):>5} {r.get('seconds', 0):>8.1f} "
                 f"{s.limit_s:>6}  {est} {s.skip or ''}".rstrip())  # fmt: skip
    say(log, f"summary: {out / 'summary.json'} ({'all passed' if ok else 'FAILURES'})")
    return ok


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="tools/gpu_check.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("outdir", nargs="?", help="gpu_check.log, gpu_tests.xml, summary.json go here (GPU machine: $OUT)")
    p.add_argument("--environment", action="store_true", help="print the GPU and the versions as JSON (a step)")
    p.add_argument("--plan", action="store_true", help="print the plan and run nothing")
    p.add_argument("--smoke", action="store_true", default=os.environ.get("GPU_CHECK_SMOKE") == "1",
                   help="tiny sizes, for a CPU (also GPU_CHECK_SMOKE=1)")  # fmt: skip
    p.add_argument("--te", action="store_true", help="the Transformer Engine check (tools/gpu_check_te.sh)")
    p.add_argument("--free-gib", type=float, default=None,
                   help="GPU memory to plan for (default: what GPU 0 has free now; none without a GPU)")  # fmt: skip
    a = p.parse_args(argv)
    if a.environment:
        print(json.dumps(environment()))
        return 0
    if a.outdir is None:
        p.error('the output folder is required (on our GPU test machine: "$OUT")')
    out = Path(a.outdir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    free, gpus = gpu_inventory()
    free = a.free_gib if a.free_gib is not None else free
    steps = plan(a.smoke, free, work, sorted(ROOT.glob(".whl/*.whl")), a.te, gpus)
    for s in steps:
        s.cmd = [c.replace("{out}", str(out)) for c in s.cmd]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the GPU machine's own environment
    site = [] if a.smoke or not any(s.name == "install_wheels" for s in steps) else ["/tmp/site"]
    env["PYTHONPATH"] = os.pathsep.join(site + [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    with open(out / "gpu_check.log", "wb") as log:
        print_plan(steps, free, a.smoke, log)
        if a.plan:
            return 0
        for s in steps:
            if s.skip:
                say(log, f"=== {s.name}: skipped, {s.skip}")
                s.result = {"status": "skipped"}
                continue
            est = "" if s.estimate_gib is None else f"; memory {s.note}"
            say(log, f"=== {s.name} (limit {s.limit_s} s{est}): {shlex.join(s.cmd)}")
            s.result = run_step(s, env, log)
            s.result["status"] = "timed out" if s.result["timed_out"] else "ok" if s.result["rc"] == 0 else "failed"
            say(log, f"=== {s.name}: {s.result['status']} (exit {s.result['rc']}) after {s.result['seconds']:.1f} s")
        ok = summarize(steps, work, out, a.smoke, log)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
