"""What every benchmark file shares: the device, the settings read from the environment, dispersion, the
machine-load probe and the command-line parser of the ``python -m bench.*`` tools.

Settings (environment variables), the same in every file:
  VERA_BENCH_QUICK=1      quick: the smallest shapes, one timed round each (CI; the figures are indicative)
  VERA_BENCH_DRY_RUN=1    tiny shapes, one round (bench/gpu_check.sh --dry-run: the plumbing, no figures)
  VERA_BENCH_DEADLINE=T   skip the cases left after Unix time T (bench/conftest.py)
"""

import argparse
import json
import os
import statistics
import time

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def quick() -> bool:
    """VERA_BENCH_QUICK=1: the smallest shapes, one timed round each, in every benchmark file and tool."""
    return os.environ.get("VERA_BENCH_QUICK") == "1"


# VERA_BENCH_DRY_RUN=1: tiny shapes, one round, in every benchmark file (bench/gpu_check.sh --dry-run tests
# the GPU check's plumbing on a machine without a GPU; the figures mean nothing).
DRY_RUN = os.environ.get("VERA_BENCH_DRY_RUN") == "1"
QUICK = quick()


def rounds(full: int) -> int:
    """Timed rounds of a case: ``full``, or one when quick or dry-running."""
    return 1 if QUICK or DRY_RUN else full


def run(benchmark, fn):
    """Time ``fn`` with pytest-benchmark: its own calibration normally, one round (after one warm-up call)
    when quick or dry-running."""
    if QUICK or DRY_RUN:
        return benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=1)
    return benchmark(fn)


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def deadline_passed() -> bool:
    """Whether VERA_BENCH_DEADLINE (Unix time) has passed: the cases left are skipped (bench/conftest.py)."""
    deadline = os.environ.get("VERA_BENCH_DEADLINE")
    return deadline is not None and time.time() > float(deadline)


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The parser of a ``python -m bench.<tool>``: its whole docstring as the help's description (without
    reST's double back-quotes)."""
    return argparse.ArgumentParser(prog=prog, description=doc.replace("``", ""),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


# --------------------------------------------------------------------------------------------------
# Dispersion and machine load: what tells a reader whether a row's figures can be compared at all.


def dispersion(times: list[float]) -> dict:
    """min, median, first and third quartiles and IQR of one case's round times (seconds). With fewer
    than 4 rounds the quartiles are the extremes (a range, not an IQR: the report flags the row)."""
    if not times:
        return dict(min=None, median=None, q1=None, q3=None, iqr=None)
    ordered = sorted(times)
    if len(ordered) >= 4:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1, q3 = ordered[0], ordered[-1]
    return dict(min=ordered[0], median=statistics.median(ordered), q1=q1, q3=q3, iqr=q3 - q1)


def _busy_cpu_seconds() -> float | None:
    """CPU seconds every process of the machine has spent since boot (Linux /proc/stat), None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class LoadProbe:
    """The machine's load around one case: the 1-minute load average at its end and the share of all CPUs
    that other processes kept busy while it ran (this process's own CPU time subtracted)."""

    def __init__(self):
        self.wall, self.busy, self.own = time.perf_counter(), _busy_cpu_seconds(), time.process_time()

    def result(self) -> dict:
        wall = time.perf_counter() - self.wall
        busy, own = _busy_cpu_seconds(), time.process_time() - self.own
        cpus = os.cpu_count() or 1
        others = None
        if busy is not None and self.busy is not None and wall > 0:
            others = min(1.0, max(0.0, (busy - self.busy - own) / (wall * cpus)))
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        return dict(load_avg_1min=load, cpus=cpus, others_busy=others)


def write_json_atomically(path: str, data) -> None:
    """``data`` as JSON at ``path``, replaced in one step (a reader, or a run killed meanwhile, sees the old
    file or the new one, never half of one; the temporary file is a dotfile beside it)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)
