"""bench/gpu_check.sh's plumbing that can be checked without running it (CI runs it whole: --dry-run): the
benchmark's order of importance, the dry run's sizes, the deadline every benchmark file honours, and where
CUDA_HOME comes from when nvcc is a wrapper script."""

import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "bench")
sys.path.insert(0, BENCH)
import bench_common  # noqa: E402
import harness  # noqa: E402


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
