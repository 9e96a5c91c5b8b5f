"""bench/gpu_check.sh's plumbing that can be checked without a GPU (CI runs it whole: --dry-run): the plan
(printed, in order of importance, within the budget, kept to), the files it leaves whenever it is killed,
the ahead-of-time compile the JIT finds, the benchmark's order of importance and groups, the per-case
records, the dry run's sizes, the deadline every benchmark file honours, and where CUDA_HOME comes from."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "bench")
sys.path.insert(0, BENCH)
import bench_common  # noqa: E402
import gpu_check  # noqa: E402
import harness  # noqa: E402

ROOT = os.path.dirname(BENCH)
SCRIPT = os.path.join(BENCH, "gpu_check.sh")


def test_gpu_benchmark_order_of_importance():
    cases = harness.cases("cuda", quick=False, dry_run=False)
    first = [c for c in cases if c.impl != "peft-compile"]
    # The bf16 4096 x 4096, r = 256 rows at M = 8192, then 2048, then decode (M = 1, 16), first.
    primary = [c for c in first if (c.in_features, c.out_features) == (4096, 4096) and c.rank in (256, None)]
    assert first[: len(primary)] == primary
    ms = list(dict.fromkeys(c.m for c in primary))
    assert ms[:4] == [8192, 2048, 1, 16]
    assert first[0] == harness.Case("base", "forward", 8192, 4096, 4096, None)
    assert harness.settings("cuda", quick=False, dry_run=False)["dtype"] is harness.GPU["dtype"]
    # Every torch.compile case (tens of seconds of compiling each) comes last.
    compiled = [i for i, c in enumerate(cases) if c.impl == "peft-compile"]
    assert compiled and compiled == list(range(len(cases) - len(compiled), len(cases)))


def test_dry_run_is_tiny():
    s = harness.settings("cpu", quick=False, dry_run=True)
    assert s["rounds"] == 1 and all(i * o <= 10**4 for i, o in s["layers"]) and max(s["ms"]) <= 32
    cases = harness.cases("cpu", quick=False, dry_run=True)
    assert {c.impl for c in cases} >= {"base", "peft", "peft-compile", "lora-8"}


def test_deadline(monkeypatch):
    monkeypatch.delenv("VERA_BENCH_DEADLINE", raising=False)
    assert not bench_common.deadline_passed()
    monkeypatch.setenv("VERA_BENCH_DEADLINE", "0")
    assert bench_common.deadline_passed()
    monkeypatch.setenv("VERA_BENCH_DEADLINE", "9999999999")
    assert not bench_common.deadline_passed()


def test_every_benchmark_file_honours_the_deadline(tmp_path):
    # bench/conftest.py's autouse fixture: a passed deadline skips every case of every file, before it runs.
    env = dict(os.environ, VERA_BENCH_DEADLINE="0", VERA_BENCH_DRY_RUN="1", VERA_BENCH_JSON=str(tmp_path / "r.json"))
    files = sorted(f for f in os.listdir(BENCH) if f.startswith("test_bench_") and f.endswith(".py"))
    done = subprocess.run([sys.executable, "-m", "pytest", *files, "--benchmark-only", "-q", "-p", "no:cacheprovider",
                           "-rs"], cwd=BENCH, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" not in done.stdout.splitlines()[-1] and "skipped" in done.stdout.splitlines()[-1]
    assert "VERA_BENCH_DEADLINE passed" in done.stdout


def _cuda_home(tmp_path, path_dirs, cuda_home_env=None):
    script = open(os.path.join(BENCH, "gpu_check.sh")).read()
    function = script[script.index("cuda_home() {"):]
    function = function[: function.index("\n}\n") + 3]
    env = dict(os.environ, PATH=os.pathsep.join(path_dirs + ["/usr/bin", "/bin"]))
    env.pop("CUDA_HOME", None)
    if cuda_home_env:
        env["CUDA_HOME"] = cuda_home_env
    done = subprocess.run(["bash", "-c", function + "cuda_home"], env=env, capture_output=True, text=True)
    return done.stdout.strip()


def test_cuda_home(tmp_path):
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (toolkit / "bin" / "nvcc").chmod(0o755)
    assert _cuda_home(tmp_path, [str(toolkit / "bin")]) == str(toolkit)  # the real nvcc: its toolkit
    assert _cuda_home(tmp_path, [str(toolkit / "bin")], "/opt/given") == "/opt/given"  # a given CUDA_HOME wins
    wrapper = tmp_path / "local-bin"
    wrapper.mkdir()
    (wrapper / "nvcc").write_text(f"#!/bin/sh\nexec {toolkit}/bin/nvcc \"$@\"\n")
    (wrapper / "nvcc").chmod(0o755)
    # A wrapper script (the GPU machine's /usr/local/bin/nvcc): its folder is no toolkit, so /usr/local/cuda.
    expected = "/usr/local/cuda" if os.access("/usr/local/cuda/bin/nvcc", os.X_OK) else ""
    assert _cuda_home(tmp_path, [str(wrapper)]) == expected


@pytest.mark.parametrize("arg", ["--help", "--bogus"])
def test_gpu_check_refuses_unknown_arguments(arg):
    done = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), arg], capture_output=True, text=True)
    assert done.returncode == 2 and "usage" in done.stderr


# ---------------------------------------------------------------------------------------------------
# The plan.


def test_the_plan_is_in_order_of_importance_and_fits_8_minutes():
    assert [s.name for s in gpu_check.PLAN] == [
        "build", "aot-compile", "verify-bf16", "bench-target", "bench-decode", "bench-compile", "bench-training",
        "verify-rest", "bench-rest"]
    assert gpu_check.BUDGET_S == 480 and gpu_check.check_plan() <= 480
    assert gpu_check.PLAN[1].beside and all(s.rest for s in gpu_check.PLAN[-2:])
    text = gpu_check.format_plan()
    for step in gpu_check.PLAN:
        assert re.search(rf"^ *\d+  {re.escape(step.name)} .*\(if short: {re.escape(step.if_short)}\)$", text, re.M)
    assert "dropped first: bench-rest, verify-rest, bench-training, bench-compile" in text
    with pytest.raises(ValueError, match="over the 300 s budget"):
        gpu_check.check_plan(budget=300)


@pytest.mark.parametrize("args", [["--plan"], ["--plan", "--dry-run"]])
def test_the_script_prints_the_same_plan_in_both_modes(args):
    done = subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == gpu_check.format_plan()


def _context(tmp_path, dry_run):
    return gpu_check.Context(dry_run, sys.executable, str(tmp_path), "2026-01-01_gpu.json", 90, 16)


@pytest.mark.parametrize("dry_run", [False, True])
def test_every_step_has_its_commands(tmp_path, dry_run):
    ctx = _context(tmp_path, dry_run)
    argv = {s.name: [(" ".join(a), env) for a, env in gpu_check.commands(s, ctx)] for s in gpu_check.PLAN}
    assert all(argv.values())
    verify, _ = argv["verify-bf16"][0]
    assert "--dtype bfloat16" in verify and ("--device cpu --quick" if dry_run else "--device cuda --full") in verify
    assert "--dtype float16 --dtype float32" in argv["verify-rest"][0][0]
    aot, env = argv["aot-compile"][0]
    assert "vera_kernels.triton.static --arch 90 --dtype bf16" in aot and env == {"TRITON_INTERPRET": None}
    for name, group in (("bench-target", "target"), ("bench-decode", "decode"), ("bench-compile", "compile")):
        command, env = argv[name][0]
        assert "bench/test_bench_layers.py" in command and env["VERA_BENCH_GROUP"] == group
        assert env["VERA_BENCH_CASES"].endswith("cases.json") and env["VERA_BENCH_APPEND"] == "1"
        assert (env.get("VERA_BENCH_DRY_RUN") == "1") == dry_run
    assert "bench/test_bench_training.py" in argv["bench-training"][0][0]


def _runner(tmp_path, plan, budget):
    out, stage = tmp_path / "out", tmp_path / "stage"
    out.mkdir()
    stage.mkdir()
    publisher = gpu_check.Publisher(str(stage), str(out), gpu_check.ALLOWED)
    log = open(out / "run.log", "a")
    ctx = gpu_check.Context(True, sys.executable, str(stage), "r.json", 90, 1)
    return gpu_check.Runner(plan, ctx, str(out), budget, publisher, log, reserve=1, min_step=2), publisher, log


def test_each_step_keeps_to_its_limit_and_the_rest_gets_what_is_left(tmp_path):
    py = sys.executable
    plan = (gpu_check.Step("slow", 3, "sleeps past its budget", "the sleep",
                           argv=(py, "-c", "import time; time.sleep(60)")),
            gpu_check.Step("next", 3, "runs all the same", "-", argv=(py, "-c", "print('next ran')")),
            gpu_check.Step("rest", 0, "the time left", "-", rest=True, argv=(py, "-c", "print('rest ran')")),
            gpu_check.Step("late", 0, "nothing left for it", "-", rest=True,
                           argv=(py, "-c", "import time; time.sleep(60)")))
    runner, publisher, log = _runner(tmp_path, plan, budget=12)
    start = time.monotonic()
    with log:
        runner.run()
    publisher.close()
    elapsed = time.monotonic() - start
    outcome = {o["step"]: o for o in runner.outcomes}
    assert outcome["slow"]["status"] == "cut at its limit" and outcome["slow"]["limit"] == 3
    assert outcome["next"]["status"] == "ok" and outcome["rest"]["status"] == "ok"
    assert 5 <= outcome["rest"]["limit"] <= 8  # 11 s before the reserve, minus the slow step's 3 and a little
    assert outcome["late"]["status"] == "cut at its limit"  # the rest of the budget, then killed
    assert elapsed < 12 + 3
    text = (tmp_path / "out" / "run.log").read_text()
    assert "next ran" in text and "rest ran" in text and "slow: killed at its limit" in text
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "== slow: cut at its limit" in summary and "== next: ok" in summary


# ---------------------------------------------------------------------------------------------------
# The files: whenever the run is killed, $OUT holds at most 8 plain, complete files.


def _session_processes(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # after pid (comm): state ppid pgrp session
                pids.append(int(entry))
    return pids


def _kill_session(process):
    """SIGKILL every process of the session ``process`` leads (it and all it started, whatever their group)."""
    for pid in _session_processes(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)


def _check_out(out):
    names = os.listdir(out)
    assert len(names) <= 8, names
    for name in names:
        path = os.path.join(out, name)
        assert os.path.isfile(path) and re.fullmatch(r"[A-Za-z0-9._-]+", name) and not name.endswith(".tmp"), name
        if name.endswith(".json"):
            with open(path) as f:
                json.load(f)  # complete
    return names


_WRITER = """
import json, os, sys, time
sys.path.insert(0, {bench!r})
import gpu_check
from bench_common import write_json_atomically
stage, out = sys.argv[1], sys.argv[2]
publisher = gpu_check.Publisher(stage, out, gpu_check.ALLOWED + ("r.json",)).start()
print("publishing", flush=True)
i = 0
while True:  # every file rewritten as fast as possible, large enough that a copy takes a while
    i += 1
    write_json_atomically(os.path.join(stage, "cases.json"), dict(cases=[dict(i=i, pad="x" * 1000)] * 2000))
    write_json_atomically(os.path.join(stage, "r.json"), dict(results=list(range(i % 1000))))
    gpu_check._write_atomically(os.path.join(stage, "summary.txt"), f"line {{i}}\\n" * 1000)
    with open(os.path.join(out, "run.log"), "a") as log:
        log.write(f"step {{i}}\\n")
    publisher.publish()
"""


def test_a_kill_at_any_moment_leaves_at_most_8_complete_files(tmp_path):
    rng = random.Random()
    for attempt in range(8):
        stage, out = tmp_path / f"stage{attempt}", tmp_path / f"out{attempt}"
        stage.mkdir()
        out.mkdir()
        process = subprocess.Popen([sys.executable, "-c", _WRITER.format(bench=BENCH), str(stage), str(out)],
                                   stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert process.stdout.readline().strip() == "publishing"
        time.sleep(rng.uniform(0.05, 1.5))
        _kill_session(process)
        names = _check_out(out)
        assert "run.log" in names


def test_the_dry_run_prints_its_plan_first_and_a_kill_leaves_at_most_8_complete_files(tmp_path):
    # The real script, killed at a random moment after its build (a kill during the build could leave a
    # half-copied extension in the source tree).
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out))
    env.pop("TRITON_INTERPRET", None)
    process = subprocess.Popen(["bash", SCRIPT, "--dry-run"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("== build: "):
                break
        time.sleep(random.uniform(0, 8))
    finally:
        _kill_session(process)
    text = "".join(lines)
    assert gpu_check.format_plan() in text
    assert text.index("PLAN:") < text.index("== build (limit")
    names = _check_out(out)
    assert "summary.txt" in names and "run.log" in names


# ---------------------------------------------------------------------------------------------------
# The ahead-of-time compile: the JIT finds its kernels in the cache.

_JIT = """
import sys
import torch
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.runtime import driver
from vera_kernels.triton import autotune, static


class Driver:  # what the CUDA driver reports on an H100 / H200 (compute capability 9.0, 32-thread warps)
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0


def compiles_again(*args, **kwargs):
    raise AssertionError("the JIT compiles: its cache key is not the ahead-of-time compile's")


driver.set_active(Driver())
CUDABackend.add_stages = compiles_again  # reached only on a cache miss
found = []
for *_, launch in static.capture([s for s in static.SCENARIOS if s.name in sys.argv[1:]], [torch.bfloat16], [512]):
    if static.kernel_name(launch.fn) != "_fused_gemm_kernel":
        continue
    config = launch.config or autotune.candidates(launch.kernel, 90, launch.args)[0]
    # What autotune.launch passes to the jit function (warmup: compile, or find in the cache, but launch nothing).
    meta = {**launch.args, **config.kwargs}
    if launch.kernel == "gemm":
        autotune.set_block_shapes(meta)
    kernel = launch.fn.warmup(grid=(1,), **meta, num_warps=config.num_warps, num_stages=config.num_stages)
    # How Triton's autotuner launches its choice: the config's all_kwargs (num_ctas and the rest too).
    tuned = launch.fn.warmup(grid=(1,), **{**meta, **config.all_kwargs()})
    assert tuned.hash == kernel.hash
    found.append((kernel.metadata.name, launch.args.get("USE_TMA")))
print(sorted(set(found)))
"""


def test_the_jit_finds_the_ahead_of_time_compiles_in_its_cache(tmp_path):
    """gpu_check's aot-compile step runs the static check into TRITON_CACHE_DIR; then a launch of the same
    kernel at the same specialization must find it there instead of compiling. Shown on CPU: the launches
    the ops make (captured), handed to Triton's own JIT entry (warmup: everything a launch does up to the
    kernel's lookup, in its cache then on disk) with a stand-in driver reporting an sm_90 GPU, and Triton's
    compiler made to fail if reached. What this cannot show without a GPU: that the real driver reports
    that target (it does for compute capability 9.0) and that device tensors specialize as these CPU ones
    (alignment to 16 bytes either way); on the GPU, summary.txt counts the cache entries each step adds."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    scenarios = ["vera_linear", "vera_linear (TMA)"]
    aot = [sys.executable, "-m", "vera_kernels.triton.static", "--arch", "90", "--dtype", "bf16", "--m", "512",
           "--kernel", "_fused_gemm_kernel", "--configs", "first", "--quiet",
           "--json", str(tmp_path / "kernels.json")]
    for name in scenarios:
        aot += ["--scenario", name]
    done = subprocess.run(aot, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"_fused_gemm_kernel"} and all(r["registers"] for r in rows)
    entries = sorted(os.listdir(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", _JIT, *scenarios], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str([("_fused_gemm_kernel", False), ("_fused_gemm_kernel", True)])
    assert sorted(os.listdir(tmp_path / "cache")) == entries  # nothing compiled, nothing added


# ---------------------------------------------------------------------------------------------------
# The benchmark's groups and per-case records.


def test_benchmark_groups():
    cases = harness.cases("cuda", quick=False, dry_run=False)
    group = {c: harness.group(c, "cuda", quick=False, dry_run=False) for c in cases}
    assert set(group.values()) == set(harness.GROUPS)
    compiled = [c for c in cases if group[c] == "compile"]
    assert compiled == [harness.Case("peft-compile", "forward", 8192, 4096, 4096, 256)]
    target = [c for c in cases if group[c] == "target"]
    assert target[0] == harness.Case("base", "forward", 8192, 4096, 4096, None)
    assert {(c.m, c.pass_, c.in_features, c.out_features) for c in target} == {
        (m, p, 4096, 4096) for m in (8192, 2048, 512) for p in ("forward", "forward+backward")}
    assert [c.m for c in target] == sorted((c.m for c in target), key=[8192, 2048, 512].index)
    decode = [c for c in cases if group[c] == "decode"]
    assert {c.m for c in decode} == {1, 16} and {c.pass_ for c in decode} == {"forward"}
    graphed = {c.impl for c in decode if c.impl.endswith("+graph")}
    assert {"base+graph", "peft+graph", "lora-8+graph"} <= graphed
    # Each graphed case comes right after the eager ones of its M; none on CPU (no CUDA graphs).
    assert not any(c.impl.endswith("+graph") for c in harness.cases("cpu", quick=False, dry_run=True))
    assert harness.flops("lora-8+graph", "forward", 1, 64, 96, None) == harness.flops("lora-8", "forward", 1, 64, 96,
                                                                                      None)


def test_the_dry_run_has_one_compile_case():
    cases = harness.cases("cpu", quick=False, dry_run=True)
    compiled = [c for c in cases if c.impl == "peft-compile"]
    assert len(compiled) == 1 and harness.group(compiled[0], "cpu", quick=False, dry_run=True) == "compile"


def test_each_case_is_recorded_as_it_finishes(tmp_path):
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(dict(cases=[dict(test="an earlier session's case")])))
    env = dict(os.environ, VERA_BENCH_DRY_RUN="1", VERA_BENCH_CASES=str(path),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "pytest", "test_bench_projections.py", "--benchmark-only", "-q",
                           "-p", "no:cacheprovider", "-k", "torch"], cwd=BENCH, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    rows = json.loads(path.read_text())["cases"]
    ran = int(re.search(r"(\d+) passed", done.stdout).group(1))
    assert ran >= 1 and len(rows) == 1 + ran and rows[0]["test"] == "an earlier session's case"
    for row in rows[1:]:
        assert "test_generate_projections" in row["test"] and row["median_seconds"] > 0 and row["rounds"] >= 1
        assert row["extra_info"]["elements"] > 0 and row["kernels"] == [] and row["autotune"] == []
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_the_pointer_loads_variant_is_timed_beside_vera_triton(monkeypatch):
    # On a GPU with the Triton backend: vera-triton-pointers after vera-triton's case of the same pass and M,
    # at the primary shape's training Ms, forward and forward+backward (the target group: it decides a default).
    monkeypatch.setattr(harness, "fused_backends", lambda device=harness.DEVICE: ["triton", "cuda"])
    cases = harness.cases("cuda", quick=False, dry_run=False)
    pointers = [c for c in cases if c.impl == harness.POINTER_LOADS]
    assert {(c.m, c.pass_) for c in pointers} == {(m, p) for m in (8192, 2048, 512) for p in ("forward", "forward+backward")}
    assert all((c.in_features, c.out_features, c.rank) == (4096, 4096, 256) for c in pointers)
    assert {harness.group(c, "cuda", quick=False, dry_run=False) for c in pointers} == {"target"}
    for c in pointers:
        assert cases.index(harness.Case("vera-triton", c.pass_, c.m, 4096, 4096, 256)) < cases.index(c)
    monkeypatch.setattr(harness, "fused_backends", lambda device=harness.DEVICE: ["cuda"])
    assert not any(c.impl == harness.POINTER_LOADS for c in harness.cases("cuda", quick=False, dry_run=False))


@pytest.mark.parametrize("impl, expected", [(harness.POINTER_LOADS, False), ("vera-triton", None)])
def test_every_call_of_the_pointer_loads_variant_refuses_descriptors(monkeypatch, impl, expected):
    """Its forward and its backward both run with linear.FORCE_TMA False (pointer loads), and the setting is
    put back after each call; vera-triton keeps the default (None: descriptors where they can address)."""
    pytest.importorskip("triton")
    from vera_kernels.triton import linear

    seen = []
    real = linear._fused_gemm

    def spy(*args, **kwargs):
        seen.append(linear.FORCE_TMA)
        return real(*args, **kwargs)

    monkeypatch.setattr(linear, "_fused_gemm", spy)
    harness.build.cache_clear()
    runner = harness.Runner(harness.Case(impl, "forward+backward", 40, 64, 96, 16), torch.float32, device="cpu")
    runner.setup()
    runner.op()
    harness.build.cache_clear()
    assert len(seen) == 2 and seen == [expected, expected]  # the forward's GEMM, then dx's
    assert linear.FORCE_TMA is None
