"""What every benchmark file gets:

- the session's deadline: VERA_BENCH_DEADLINE=T (Unix time) skips each case that would start after T
  (bench/gpu_check.sh sets it from its time budget);
- its results in the records file (harness.results_path()): the layer suite writes its own rows; every
  other benchmark's median, dispersion, rounds, extra_info and the machine's load while it ran are recorded
  here, so that ``python -m bench.report`` prints and flags every suite;
- each case's record as soon as it finishes: with VERA_BENCH_CASES=PATH, every case that ran a benchmark
  adds a row to PATH (JSON, replaced atomically after each case, rows of earlier sessions kept): its
  timing, its extra_info, the static facts of every Triton kernel it launched (registers, spills, shared
  memory, stages, tensor-core and TMA instructions) and the choices autotuning made while it ran. A run
  stopped by a time limit keeps every case it finished.
"""

import contextlib
import datetime
import json
import os

import pytest

from bench_common import LoadProbe, deadline_passed, dispersion, write_json_atomically

_OWN_RECORDS = {"test_bench_layers.py"}  # suites that write their own rows
_rows: list | None = None


@pytest.fixture(autouse=True)
def _deadline_and_records(request):
    if deadline_passed():
        pytest.skip("VERA_BENCH_DEADLINE passed: the session's time budget is spent")
    suite = os.path.basename(str(request.node.fspath))
    if "benchmark" not in request.fixturenames or suite in _OWN_RECORDS:
        yield
        return
    benchmark = request.getfixturevalue("benchmark")
    probe = LoadProbe()
    yield
    if benchmark.stats is None:  # --benchmark-disable, or the test skipped before timing
        return
    import harness

    times = list(benchmark.stats.stats.data)
    stats = dispersion(times)
    harness.session_records().add_suite_row(dict(
        suite=suite.removeprefix("test_bench_").removesuffix(".py"), name=request.node.name,
        seconds=stats.pop("median"), **{f"{k}_seconds": v for k, v in stats.items()}, rounds=len(times),
        extra_info=dict(benchmark.extra_info), **probe.result()))


def _triton_autotune():
    try:
        from vera_kernels.triton import autotune
    except Exception:  # noqa: BLE001  no (working) Triton: no kernels to describe
        return None
    return autotune


@pytest.fixture(autouse=True)
def _case_record(request, _deadline_and_records):
    path = os.environ.get("VERA_BENCH_CASES")
    if not path or "benchmark" not in request.fixturenames:
        yield
        return
    autotune = _triton_autotune()
    chosen = {json.dumps(c, default=str) for c in autotune.choices()} if autotune else set()
    with autotune.recording() if autotune else contextlib.nullcontext({}) as kernels:
        yield
    benchmark = request.node.funcargs.get("benchmark")
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is None:  # skipped or failed before timing
        return
    new_choices = [c for c in autotune.choices() if json.dumps(c, default=str) not in chosen] if autotune else []
    add_row(path, dict(test=request.node.nodeid, median_seconds=stats.median, min_seconds=stats.min,
                       rounds=stats.rounds, extra_info=dict(benchmark.extra_info), kernels=list(kernels.values()),
                       autotune=new_choices,
                       finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")))


def add_row(path: str, row: dict) -> None:
    """Append ``row`` to the JSON list at ``path`` (its earlier rows kept), replacing the file atomically."""
    global _rows
    if _rows is None:
        _rows = []
        if os.path.exists(path):
            with open(path) as f:
                _rows = json.load(f)["cases"]
    _rows.append(row)
    write_json_atomically(path, dict(cases=_rows))
