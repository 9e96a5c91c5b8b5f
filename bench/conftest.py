"""Every benchmark file honours the session's deadline: VERA_BENCH_DEADLINE=T (Unix time) skips each case
that would start after T (bench/gpu_check.sh sets it from its time budget)."""

import pytest

from bench_common import deadline_passed


@pytest.fixture(autouse=True)
def _deadline():
    if deadline_passed():
        pytest.skip("VERA_BENCH_DEADLINE passed: the session's time budget is spent")
