import json
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


def write_json_atomically(path: str, data) -> None:
    """``data`` as JSON at ``path``, replaced in one step (a reader, or a run killed meanwhile, sees the old
    file or the new one, never half of one; the temporary file is a dotfile beside it)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)
