"""One adapted linear layer, every implementation, forward / backward / forward+backward, against the base
layer alone (see harness.py for what is compared and how it is timed).

    pytest bench/ --benchmark-only                     then: python -m bench.report  (table, ratios, plot)
    VERA_BENCH_QUICK=1 pytest bench/ --benchmark-only  the smallest shapes, one round each (CI)

Records (time, FLOPs, saved-activation bytes, peak memory) go to harness.results_path() with the hardware,
torch and Triton versions, after every case. No timing is asserted.
"""

import os
import sys

import pytest

import harness

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
from bench import plan  # noqa: E402

pytest.importorskip("peft")
SETTINGS = harness.settings()


def _estimate(case, dtype):
    try:
        impl = case.impl.removesuffix("+graph")  # replayed from a CUDA graph: the same launches
        return plan.estimate_seconds(impl, case.pass_, case.m, case.in_features, case.out_features, case.rank, dtype)
    except Exception as exc:  # an estimate must never cost a GPU session its measurements: record why not
        return f"not estimated: {type(exc).__name__}: {exc}"


@pytest.mark.parametrize("case", harness.selected_cases(), ids=lambda c: c.id)
def test_layer(benchmark, case):
    runner = harness.Runner(case, SETTINGS["dtype"])
    runner.warm_up(SETTINGS["warmup"])  # autotuning, compilation, first-call allocations
    saved, peak = runner.saved_activation_bytes(), runner.peak_bytes()
    load = harness.LoadProbe()
    benchmark.pedantic(runner.target, setup=runner.setup, rounds=SETTINGS["rounds"], iterations=1)

    timing = harness.timing(benchmark, runner)  # seconds (the median), min, quartiles, IQR, rounds, timer
    seconds = timing["seconds"]
    work = harness.flops(case.impl, case.pass_, case.m, case.in_features, case.out_features, case.rank)
    row_dtype = str(SETTINGS["dtype"]).removeprefix("torch.")
    row = dict(impl=case.impl, pass_=case.pass_, m=case.m, in_features=case.in_features,
               out_features=case.out_features, rank=case.rank, dtype=row_dtype,
               **timing, flops=work, tflops=work / seconds / 1e12 if seconds else None,
               saved_activation_bytes=saved, peak_bytes=peak, **load.result(),
               # bench/plan.py's roofline of this implementation's launches (traced from the code) on an
               # H200: the measured time of each plan side by side with what its launches allow.
               h200_estimate_seconds=_estimate(case, row_dtype))
    benchmark.extra_info.update(row)
    harness.session_records().add(row)
