"""What every benchmark file gets:

- the session's deadline: VERA_BENCH_DEADLINE=T (Unix time) skips each case that would start after T
  (bench/gpu_check.sh sets it from its time budget);
- its results in the records file (harness.results_path()): the layer suite writes its own rows; every
  other benchmark's median, dispersion, rounds, extra_info and the machine's load while it ran are recorded
  here, so that ``python -m bench.report`` prints and flags every suite.
"""

import os

import pytest

from bench_common import LoadProbe, deadline_passed, dispersion

_OWN_RECORDS = {"test_bench_layers.py"}  # suites that write their own rows


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
