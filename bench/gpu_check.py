"""The GPU check's plan and its runner (``bash bench/gpu_check.sh`` finds CUDA and the interpreter, then runs
``python -m bench.gpu_check``): one call on a GPU machine that brings back every number in 8 minutes.

The plan (PLAN) is a list of steps in order of importance, each with a budget in seconds; it is printed
first, by the dry run too, and kept to: a step runs for min(its budget, what is left before the
summary's reserve) and is killed at that limit; a step that would get under 10 s is skipped. Time a step
leaves unused goes to the last steps (the rest), so when time runs out it is the rest that is dropped
first, then the steps before it from the bottom of the plan up; inside a step, its least important part
(each benchmark step runs its cases most important first and starts none after its deadline). The build
and the ahead-of-time Triton compile run side by side (nvcc leaves most cores idle).

Files. Every step writes into a private staging folder; a publisher copies each finished file from there
into $OUT atomically (a copy in a scratch folder beside $OUT, on the same file system, then a rename), as
soon as it changes (about every second) and at the end. $OUT therefore holds only complete files, whatever
moment the run is killed at, and at most these 8 (flat, names of [A-Za-z0-9._-]):
  summary.txt         the plan, each step's outcome as it ends, then the summary and the report's table
  run.log             every step's output (appended as it comes: a killed run leaves a shorter log)
  verify.json         verify on cuda in bf16 at the target shapes, every backend (rows per group)
  verify-rest.json    verify in fp16 and fp32
  <date>_<device>.json  the layer benchmark's records (bench/harness.py; what bench.report reads)
  <date>_<device>.png   its plot (where matplotlib is installed)
  cases.json          every benchmark case as it finishes, with the static facts of the Triton kernels it
                      launched and autotuning's choices (bench/conftest.py)
  kernels.json        the ahead-of-time compile's static check rows (registers, spills, HGMMA/HMMA, stages)
Commit the <date>_<device>.json (and .png) under bench/results/ and update bench/RESULTS.md from summary.txt.

The ahead-of-time compile. ``python -m vera_kernels.triton.static`` compiles every launch the ops make
(every constexpr combination and every config autotuning may time) for this GPU's architecture in
parallel processes, into TRITON_CACHE_DIR: Triton's cache is content-addressed (kernel source,
specialization, options, target, Triton build and the cache-relevant environment), so when the run later
launches the same kernel at the same specialization the JIT computes the same key and loads the cubin
instead of compiling (tests/test_gpu_check.py shows the key matches on CPU; on the GPU the summary counts
the cache entries each later step added). The specializations are those of the static check's problem
(in = out = 512, r = 256; M = 1, 16, 512, 2048: the alignments and constexprs of the target shapes); odd
shapes (verify's) are compiled by the JIT as before.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

BUDGET_S = 480
RESERVE_S = 20  # kept for the summary and the report
MIN_STEP_S = 10  # a step that would get less is skipped
DEADLINE_MARGIN_S = 10  # a benchmark step starts no case in its last seconds
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Step:
    name: str
    budget: int  # seconds at most (a "rest" step: at most this, or what is left when 0)
    what: str
    if_short: str  # what is cut inside the step when its time runs out
    beside: bool = False  # runs beside the step before it, within that step's budget
    rest: bool = False  # runs on the time the steps before it left unused
    argv: tuple = ()  # its command line, for a step that is not one of PLAN's (see commands())


PLAN = (
    Step("build", 130, "the C++/CUDA extension (nvcc, all cores)",
         "the build: only the cuda backend is lost, every other step still runs"),
    Step("aot-compile", 130, "every Triton kernel compiled ahead of time for this GPU into the JIT's cache, in "
         "parallel on all cores: bf16, every constexpr combination and config (beside the build)",
         "the compiles left: the JIT compiles those kernels when they are first launched", beside=True),
    Step("verify-bf16", 60, "verify on cuda in bf16: odd, decode and target shapes, every backend",
         "the shape sets left (the target shapes last); rows finished are kept"),
    Step("bench-target", 75, "layer benchmark 4096x4096 r=256 at M = 8192 then 2048: forward and "
         "forward+backward, every implementation", "the cases left (M = 2048 last)"),
    Step("bench-decode", 35, "decode M = 1 and 16, forward: eager, then replayed from a CUDA graph",
         "the cases left (M = 16 last)"),
    Step("bench-compile", 45, "one torch.compile case: PEFT's VeRA compiled, M = 8192, forward", "the case"),
    Step("bench-training", 60, "a training step of a 1.1B Llama-like model (bf16, sequence 2048): this "
         "package's VeRA r=256, PEFT's VeRA r=256, PEFT's LoRA r=32; step time and peak memory",
         "the implementations left (PEFT's LoRA last)"),
    Step("verify-rest", 40, "verify on cuda in fp16 and fp32", "the rows left (fp32 last)", rest=True),
    Step("bench-rest", 0, "every other benchmark: the backward pass, the other layer and rank, the other "
         "torch.compile cases, projections, many adapters", "the cases left (the least important last)",
         rest=True),
)
ALLOWED = ("summary.txt", "run.log", "verify.json", "verify-rest.json", "cases.json", "kernels.json")
PYTEST = ["-m", "pytest", "--benchmark-only", "-q", "-p", "no:cacheprovider", "--benchmark-columns=median,rounds",
          "--benchmark-sort=name"]


def check_plan(plan=PLAN, budget=BUDGET_S) -> int:
    """The seconds the plan's budgeted steps need (beside steps run within their predecessor's); raises
    when they and the reserve do not fit the budget."""
    needed = sum(s.budget for s in plan if not s.beside and not s.rest) + RESERVE_S
    if needed > budget:
        raise ValueError(f"the plan needs {needed} s, over the {budget} s budget")
    return needed


def format_plan(plan=PLAN, budget=BUDGET_S) -> str:
    """The plan as printed at the start of every run (the dry run's too: the same steps and budgets)."""
    needed = check_plan(plan, budget)
    lines = [f"PLAN: {budget} s in all, {RESERVE_S} s of it kept for the summary; steps in order of importance",
             f"{'#':>2}  {'step':<15}{'budget':>8}  {'starts by':>9}  what (if short: what is cut first)"]
    start = 0
    for i, step in enumerate(plan, 1):
        if step.rest:
            budget_text = f"<={step.budget} s" if step.budget else "the rest"
        else:
            budget_text = f"{step.budget} s"
        starts = "beside" if step.beside else f"{start} s"
        lines.append(f"{i:>2}  {step.name:<15}{budget_text:>8}  {starts:>9}  {step.what} "
                     f"(if short: {step.if_short})")
        if not step.beside:
            start += step.budget
    order = ", ".join(s.name for s in reversed(plan) if not s.beside)
    lines.append(f"budgeted steps {needed - RESERVE_S} s + summary {RESERVE_S} s = {needed} s <= {budget} s; "
                 f"{budget - needed} s and whatever the steps leave go to the rest")
    lines.append(f"when time runs out, dropped first: {order} (each capped at its budget, so an overrun never "
                 f"eats a more important step's time)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Files: the staging folder and the publisher.


class Publisher:
    """Copies the staging folder's finished files into ``out`` atomically, as they change."""

    def __init__(self, stage: str, out: str, allowed):
        self.stage, self.out, self.allowed = stage, out, tuple(allowed)
        self.scratch = _scratch_beside(out)
        self._seen: dict[str, tuple] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(1.0):
            self.publish()

    def publish(self):
        with self._lock:
            for name in self.allowed:
                source = os.path.join(self.stage, name)
                try:
                    stat = os.stat(source)
                except FileNotFoundError:
                    continue
                mark = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
                if self._seen.get(name) == mark:
                    continue
                self._copy(source, name)
                self._seen[name] = mark

    def _copy(self, source: str, name: str):
        target = os.path.join(self.out, name)
        if self.scratch is None:  # no folder beside $OUT on its file system: a plain copy (see close())
            shutil.copyfile(source, target)
            return
        tmp = os.path.join(self.scratch, name)
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)

    def close(self):
        """Stop publishing as things change: one last publish, and the scratch folder goes."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.publish()
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


def _scratch_beside(out: str) -> str | None:
    """A folder beside ``out`` on its file system (a rename from it into ``out`` is atomic), or None."""
    parent = os.path.dirname(os.path.abspath(out))
    try:
        scratch = tempfile.mkdtemp(prefix=".gpu-check-", dir=parent)
    except OSError:
        return None
    if os.stat(scratch).st_dev != os.stat(out).st_dev:
        os.rmdir(scratch)
        return None
    return scratch


# ---------------------------------------------------------------------------------------------------
# The steps' commands.


@dataclass
class Context:
    dry_run: bool
    python: str
    stage: str
    results: str  # the layer records' file name: <date>_<device>.json
    arch: int
    jobs: int

    def path(self, name: str) -> str:
        return os.path.join(self.stage, name)


def commands(step: Step, ctx: Context) -> list[tuple[list[str], dict]]:
    """The command lines (argv, extra environment) of ``step``, run one after the other."""
    if step.argv:
        return [(list(step.argv), {})]
    py, dry = ctx.python, ctx.dry_run
    bench = dict(VERA_BENCH_JSON=ctx.path(ctx.results), VERA_BENCH_APPEND="1", VERA_BENCH_CASES=ctx.path("cases.json"),
                 **({"VERA_BENCH_DRY_RUN": "1"} if dry else {}))
    verify = [py, "-m", "vera_kernels.verify", "--device", "cpu" if dry else "cuda", "--quick" if dry else "--full"]
    # On CPU, verify runs Triton under its interpreter (set here, it does not start itself again for it).
    verify_env = {"TRITON_INTERPRET": "1"} if dry else {}
    if step.name == "build":
        return [([py, "setup.py", "build_ext", "--inplace"],
                 dict(VERA_KERNELS_CUDA="0" if dry else "1", MAX_JOBS=os.environ.get("MAX_JOBS", str(ctx.jobs))))]
    if step.name == "aot-compile":
        # The dry run compiles one kernel (the plumbing); on the GPU every launch in bf16 at the target Ms.
        select = (["--scenario", "backward", "--kernel", "_sum_rows_kernel", "--m", "512", "--configs", "first"] if dry
                  else ["--m", "1", "--m", "16", "--m", "512", "--m", "2048"])
        return [([py, "-m", "vera_kernels.triton.static", "--arch", str(ctx.arch), "--dtype", "bf16", *select,
                  "--jobs", str(ctx.jobs), "--quiet", "--json", ctx.path("kernels.json")], {"TRITON_INTERPRET": None})]
    if step.name == "verify-bf16":
        return [([*verify, "--dtype", "bfloat16", "--json", ctx.path("verify.json")], verify_env)]
    if step.name == "verify-rest":
        # The dry run: the C++ and torch backends only (the interpreter's fp16/fp32 rows add nothing to it).
        narrow = ["--backend", "torch", "--backend", "cpu"] if dry else []
        return [([*verify, "--dtype", "float16", "--dtype", "float32", *narrow, "--json", ctx.path("verify-rest.json")],
                 verify_env)]
    if step.name in ("bench-target", "bench-decode", "bench-compile"):  # bench/harness.py's groups
        return [([py, *PYTEST, "bench/test_bench_layers.py"], dict(bench, VERA_BENCH_GROUP=step.name[6:]))]
    if step.name == "bench-training":
        return [([py, *PYTEST, "bench/test_bench_training.py"], bench)]
    if step.name == "bench-rest":
        return [([py, *PYTEST, "bench/test_bench_layers.py", "bench/test_bench_projections.py",
                  "bench/test_bench_multi_adapter.py"], dict(bench, VERA_BENCH_GROUP="rest"))]
    raise ValueError(f"no commands for step {step.name!r}")


# ---------------------------------------------------------------------------------------------------
# Running.


class Runner:
    """Runs a plan's steps in order, each under min(its budget, what is left before the reserve)."""

    def __init__(self, plan, ctx: Context, out: str, budget: int, publisher: Publisher, log, *,
                 reserve: int = RESERVE_S, min_step: int = MIN_STEP_S):
        self.plan, self.ctx, self.out, self.budget, self.publisher, self.log = plan, ctx, out, budget, publisher, log
        self.min_step = min_step
        self.start = time.monotonic()
        self.end = self.start + budget - reserve
        self.outcomes: list[dict] = []
        self.summary_lines: list[str] = []
        self._lock = threading.RLock()

    def left(self) -> float:
        return self.end - time.monotonic()

    def note(self, line: str):
        with self._lock:  # the build and the compile beside it note from two threads
            print(line, flush=True)
            self.summary_lines.append(line)
            self.write_summary()

    def write_summary(self, tail: str = ""):
        _write_atomically(self.ctx.path("summary.txt"), "\n".join(self.summary_lines) + "\n" + tail)
        self.publisher.publish()

    def run(self):
        steps = list(self.plan)
        i = 0
        while i < len(steps):
            step = steps[i]
            beside = steps[i + 1] if i + 1 < len(steps) and steps[i + 1].beside else None
            if beside is None:
                self.run_steps([step])
                i += 1
            else:
                self.run_steps([step, beside])
                i += 2

    def limit_of(self, step: Step) -> int:
        left = int(self.left())
        if step.rest:
            return min(step.budget, left) if step.budget else left
        return min(step.budget, left)

    def run_steps(self, steps: list[Step]):
        """Run ``steps`` side by side (one, or a step and the one beside it), each under its limit."""
        cache_before = _cache_entries()
        running = []
        for step in steps:
            limit = self.limit_of(steps[0]) if step.beside else self.limit_of(step)
            if limit < self.min_step:
                self.outcomes.append(dict(step=step.name, status="skipped", seconds=0, limit=limit))
                self.note(f"== {step.name}: skipped, {max(limit, 0)} s left (under {self.min_step} s)")
                continue
            self.note(f"== {step.name} (limit {limit} s): {step.what}")
            thread = threading.Thread(target=self._run_step, args=(step, limit))
            thread.start()
            running.append(thread)
        for thread in running:
            thread.join()
        added = _cache_entries() - cache_before
        if running and os.environ.get("TRITON_CACHE_DIR"):
            self.note(f"   Triton cache: {added:+d} entries during {' and '.join(s.name for s in steps)}")

    def _run_step(self, step: Step, limit: int):
        t0 = time.monotonic()
        deadline = t0 + limit
        status = "ok"
        for argv, extra in commands(step, self.ctx):
            left = deadline - time.monotonic()
            if left < 1:
                status = "cut at its limit"
                break
            env = dict(os.environ)
            for key, value in extra.items():
                if value is None:
                    env.pop(key, None)
                else:
                    env[key] = value
            env["VERA_BENCH_DEADLINE"] = str(time.time() + left - min(DEADLINE_MARGIN_S, left / 4))
            rc = _run_with_limit(argv, env, left, self.log, step.name)
            if rc != 0:
                status = "cut at its limit" if rc is None else f"exit {rc}"
                break
        seconds = round(time.monotonic() - t0)
        self.outcomes.append(dict(step=step.name, status=status, seconds=seconds, limit=limit))
        self.note(f"== {step.name}: {status} after {seconds} s (limit {limit} s)")


_running: set = set()  # the steps' processes now running (each leads its own process group)


def _run_with_limit(argv, env, seconds: float, log, name: str) -> int | None:
    """Run ``argv`` (its output appended to ``log``) in its own process group; kill the group at the
    limit. The exit status, or None when killed."""
    log.write(f"\n===== {name}: {' '.join(argv)}\n")
    log.flush()
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               preexec_fn=os.setpgrp)
    _running.add(process)
    try:
        return process.wait(timeout=max(seconds, 0.1))
    except subprocess.TimeoutExpired:
        _kill_group(process)
        log.write(f"\n===== {name}: killed at its limit ({seconds:.0f} s)\n")
        log.flush()
        return None
    finally:
        _running.discard(process)


def _kill_group(process, grace: float = 5):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _on_termination(signum, frame):
    """SIGTERM/SIGINT (e.g. an outer timeout): the steps' process groups go too, then the files are published
    as they stand (main's finally)."""
    for process in list(_running):
        _kill_group(process, grace=2)
    raise SystemExit(128 + signum)


def _cache_entries() -> int:
    folder = os.environ.get("TRITON_CACHE_DIR")
    try:
        return len(os.listdir(folder)) if folder else 0
    except FileNotFoundError:
        return 0


def _write_atomically(path: str, text: str):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# The summary.


def summary(runner: Runner, ctx: Context) -> str:
    lines = ["", f"==================== summary ({'dry run' if ctx.dry_run else 'cuda'}, "
             f"{time.monotonic() - runner.start:.0f} s) ===================="]
    for o in runner.outcomes:
        lines.append(f"{o['step']:<15} {o['status']:<22} {o['seconds']:>4} s of {o['limit']} s")
    for name in ("verify.json", "verify-rest.json"):
        try:
            with open(ctx.path(name)) as f:
                rows = json.load(f)["rows"]
            failed = [r for r in rows if not r["passed"]]
            lines.append(f"{name}: {len(rows) - len(failed)} passed, {len(failed)} failed"
                         + "".join(f"\n  FAIL {r['backend']} {r['check']}: {r['detail'][:200]}" for r in failed[:10]))
        except (OSError, ValueError, KeyError):
            lines.append(f"{name}: none")
    try:
        with open(ctx.path("cases.json")) as f:
            cases = json.load(f)["cases"]
    except (OSError, ValueError, KeyError):
        cases = []
    lines.append(f"cases.json: {len(cases)} benchmark cases, {sum(len(c.get('kernels', [])) for c in cases)} "
                 f"kernel records, {sum(len(c.get('autotune', [])) for c in cases)} autotune choices")
    training = [c["extra_info"] for c in cases if "step_seconds" in c.get("extra_info", {})]
    for t in training:
        peak = f"{t['peak_bytes'] / 2**30:.2f} GiB" if t.get("peak_bytes") else "n/a"
        lines.append(f"training step {t['impl']:<13} r={t['rank']:<4} {t['step_seconds'] * 1e3:9.2f} ms  peak {peak}")
    return "\n".join(lines)


def report(ctx: Context, log) -> str:
    results = ctx.path(ctx.results)
    if not os.path.exists(results):
        return "no layer benchmark records"
    argv = [ctx.python, "-m", "bench.report", results, "--plot", results.removesuffix(".json") + ".png"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=RESERVE_S - 5)
    log.write(done.stderr)
    return done.stdout + (f"(report: exit {done.returncode})" if done.returncode else "")


# ---------------------------------------------------------------------------------------------------


def _device(dry_run: bool) -> tuple[str, int]:
    """(a label for file names, the architecture for the static compile: 90 or 80)."""
    if dry_run:
        return "cpu-dry-run", 90
    try:
        query = ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"]
        name, cap = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.splitlines()[0].split(",")
        arch = 90 if float(cap) >= 9 else 80
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        name, arch = "gpu", 90
    label = "".join(c if c.isalnum() else "-" for c in name.strip()).strip("-")
    while "--" in label:
        label = label.replace("--", "-")
    return label or "gpu", arch


def _header(ctx: Context, budget: int, device: str) -> str:
    versions = subprocess.run([ctx.python, "-c", "import torch, triton; print('torch', torch.__version__, 'cuda', "
                               "torch.version.cuda, 'triton', triton.__version__)"], capture_output=True, text=True)
    lines = [datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
             "DRY RUN (no GPU): CPU backends and the Triton interpreter, tiny shapes; the figures mean nothing"
             if ctx.dry_run else f"GPU {device} (sm_{ctx.arch}{'a' if ctx.arch == 90 else ''})",
             (versions.stdout or versions.stderr).strip(),
             f"CUDA_HOME={os.environ.get('CUDA_HOME') or '(not found)'}", f"budget {budget} s"]
    return "\n".join(lines)


def _count_files(out: str) -> tuple[int, list[str]]:
    import re

    names = sorted(os.listdir(out))
    bad = [n for n in names if not os.path.isfile(os.path.join(out, n)) or not re.fullmatch(r"[A-Za-z0-9._-]+", n)]
    return len(names), bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bash bench/gpu_check.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="the same plan on a machine without a GPU: CPU backends, the Triton interpreter, tiny "
                        "shapes (CI)")
    parser.add_argument("--plan", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)
    budget = int(os.environ.get("BUDGET_S", BUDGET_S))
    plan_text = format_plan(PLAN, budget)
    if args.plan:
        print(plan_text)
        return 0
    out = os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu-check-out-")
    os.makedirs(out, exist_ok=True)
    run_tmp = tempfile.mkdtemp(prefix="gpu-check-")
    stage = os.path.join(run_tmp, "stage")
    os.makedirs(stage)
    # The run's own Triton and Inductor caches: nothing stale is reused, nothing is left behind. FP fusion
    # stated (Triton's default): the static compile states it, and it is part of the cache key.
    os.environ.update(TRITON_CACHE_DIR=os.path.join(run_tmp, "triton-cache"),
                      TORCHINDUCTOR_CACHE_DIR=os.path.join(run_tmp, "inductor-cache"),
                      TRITON_DEFAULT_FP_FUSION="1", PYTHONUNBUFFERED="1",
                      PYTHONPATH=ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
    device, arch = _device(args.dry_run)
    results = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}_{device}.json"
    ctx = Context(args.dry_run, os.environ.get("PYTHON") or sys.executable, stage, results, arch,
                  len(os.sched_getaffinity(0)))
    allowed = ALLOWED + (results, results.removesuffix(".json") + ".png")
    publisher = Publisher(stage, out, allowed)
    signal.signal(signal.SIGTERM, _on_termination)
    signal.signal(signal.SIGINT, _on_termination)
    with open(os.path.join(out, "run.log"), "a") as log:
        publisher.start()
        runner = Runner(PLAN, ctx, out, budget, publisher, log)
        for line in (_header(ctx, budget, device), plan_text):
            runner.note(line)
        if publisher.scratch is None:
            runner.note(f"note: no folder beside {out} on its file system: files are copied into it in place")
        try:
            runner.run()
            text = summary(runner, ctx)
            try:
                text += "\n" + report(ctx, log)
            except (OSError, subprocess.SubprocessError) as exc:
                text += f"\nreport failed: {exc}"
            runner.write_summary(text + "\n")
            count, bad = _count_files(out)  # summary.txt is there already: the count is final
            check = f"files in {out}: {count} (at most 8)" + (f"; not allowed back: {' '.join(bad)}" if bad else "")
            runner.write_summary(text + "\n" + check + "\n")
        finally:
            publisher.close()
            shutil.rmtree(run_tmp, ignore_errors=True)
    # A step cut or skipped by the budget is the plan at work (the summary says so), not a failure.
    status = int(any(o["status"].startswith("exit") for o in runner.outcomes))
    with open(os.path.join(out, "summary.txt")) as f:
        text = f.read()
    print(text[text.find("==================== summary"):], end="")
    return 1 if status or count > 8 or bad else 0


if __name__ == "__main__":
    sys.exit(main())
