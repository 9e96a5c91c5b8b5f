import os
import time

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# VERA_BENCH_DRY_RUN=1: tiny shapes, one round, in every benchmark file (bench/gpu_check.sh --dry-run tests
# the GPU check's plumbing on a machine without a GPU; the figures mean nothing).
DRY_RUN = os.environ.get("VERA_BENCH_DRY_RUN") == "1"


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def deadline_passed() -> bool:
    """Whether VERA_BENCH_DEADLINE (Unix time) has passed: the cases left are skipped (bench/conftest.py)."""
    deadline = os.environ.get("VERA_BENCH_DEADLINE")
    return deadline is not None and time.time() > float(deadline)
