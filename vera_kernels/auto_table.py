"""``backend="auto"`` on measured times: which backend is fastest per (GPU, op, dtype, shape bucket).

The table ships in the package as data (``vera_kernels/data/auto_table.json``) and is written from the
GPU benchmark's records (bench/harness.py, ``bench/results/*.json``) by

    python -m vera_kernels.auto_table bench/results/<date>_<gpu>.json [more.json ...]

which keeps, for each (GPU name, compute capability, op, dtype, M bucket, in, out, r) the median forward
time of every fused backend measured and names the fastest. The GPU is named in every entry.

At dispatch (dispatch.py asks :func:`measured_choice` for ``auto``): where the table has entries for the
device's GPU and the op, the choice is made per call from the call's dtype and M bucket (the nearest
measured layer size); where it has none, ``auto`` keeps dispatch.py's fixed order, whose first choice on a
GPU is the C++/CUDA extension's plan (csrc/vera_ops.cpp: the big GEMM in cuBLAS at vendor speed), except
for the many-adapter ops, which go to Triton first (its kernels gather each row's vectors in their
prologue and epilogue; the C++ path adds the adapter term in blocks of rows).
"""

from __future__ import annotations

import functools
import json
import os
import stat
import sys
import warnings
from typing import Callable, Optional

import torch

TABLE_PATH = os.path.join(os.path.dirname(__file__), "data", "auto_table.json")
FORMAT = 1
# The benchmark's implementations that are backends, by their record names.
_BENCH_IMPLS = {"vera-cuda": "cuda", "vera-triton": "triton"}
# Without a measurement: the many-adapter ops on a GPU prefer Triton (see the module docstring).
_UNMEASURED_PREFERENCE = {("cuda", "vera_linear_multi"): "triton", ("cuda", "vera_delta_multi"): "triton"}


# The shipped table is a few KB; a file above this is not one (and is never read: see load).
MAX_TABLE_BYTES = 1 << 20
# Each entry's fields and what they hold (in/out/rank: a size, or None where the benchmark had none).
_ENTRY_FIELDS = {"gpu": str, "capability": str, "op": str, "dtype": str, "m_bucket": int, "in": (int, type(None)),
                 "out": (int, type(None)), "rank": (int, type(None)), "best": str}
# Choices remembered per _Chooser (one per (call dtype, M bucket, layer size)): a bound on the memory.
_CHOICES_KEPT = 4096


class TableError(ValueError):
    """An auto table file that is not one: too large, not a regular file, not JSON, or entries that are not
    what entries_from_records writes."""


def m_bucket(m: int) -> int:
    """The power of two at or above M (1, 2, 4, ..., 16, ..., 8192, ...): calls in one bucket share a choice."""
    return 1 << max(0, int(m) - 1).bit_length()


@functools.cache
def load(path: str = TABLE_PATH) -> tuple:
    """The table's entries (a tuple of dicts), read and checked once per path: none when the file is
    missing, and none, with a warning naming the file, when it is not a valid table (``auto`` then keeps
    dispatch.py's fixed order). Never raises: a broken table must not break every auto-dispatched call."""
    try:
        return read_table(path)
    except TableError as exc:
        warnings.warn(f"auto table {path!r} is ignored ({exc}); backend='auto' keeps its fixed order", RuntimeWarning,
                      stacklevel=2)
        return ()


def read_table(path: str) -> tuple:
    """The checked entries of the table at ``path`` (none when it is missing); TableError says what is wrong."""
    try:
        info = os.stat(path)  # follows links: a link to /dev/zero is a device
    except FileNotFoundError:
        return ()
    except OSError as exc:
        raise TableError(f"can't be read: {exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise TableError("not a regular file")
    if info.st_size > MAX_TABLE_BYTES:
        raise TableError(f"{info.st_size} bytes, more than the {MAX_TABLE_BYTES} a table may have")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TABLE_BYTES + 1)  # bounded even if the file grew since the stat
    except OSError as exc:
        raise TableError(f"can't be read: {exc}") from None
    if len(data) > MAX_TABLE_BYTES:
        raise TableError(f"more than the {MAX_TABLE_BYTES} bytes a table may have")
    try:
        table = json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise TableError(f"not JSON: {exc}") from None
    if not isinstance(table, dict) or table.get("format") != FORMAT:
        got = table.get("format") if isinstance(table, dict) else type(table).__name__
        raise TableError(f"expected a JSON object with format {FORMAT}, got {got!r}")
    entries = table.get("entries", [])
    if not isinstance(entries, list):
        raise TableError(f"'entries' must be a list, got {type(entries).__name__}")
    return tuple(_checked_entry(i, entry) for i, entry in enumerate(entries))


def _checked_entry(i: int, entry) -> dict:
    if not isinstance(entry, dict):
        raise TableError(f"entry {i} is a {type(entry).__name__}, not an object")
    for field, kind in _ENTRY_FIELDS.items():
        if field not in entry:
            raise TableError(f"entry {i} has no {field!r}")
        value = entry[field]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise TableError(f"entry {i}: {field!r} is {value!r}")
        if isinstance(value, int) and value < 1:
            raise TableError(f"entry {i}: {field!r} must be >= 1, got {value}")
    backends = sorted(set(_BENCH_IMPLS.values()))
    if entry["best"] not in backends:
        raise TableError(f"entry {i}: 'best' must name a measured backend ({', '.join(backends)}), got {entry['best']!r}")
    return entry


def _device_key(device: torch.device) -> Optional[tuple[str, str]]:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def best_backend(entries, gpu: str, capability: str, op: str, dtype: str, m: int, in_features: int,
                 out_features: int, rank: int) -> Optional[str]:
    """The fastest backend measured for this call, or None: entries of the same GPU (by name, else by
    compute capability), op and dtype; then the call's M bucket (else the nearest measured one); then the
    layer nearest in size (in, out, r)."""
    same = [e for e in entries if e["op"] == op and e["dtype"] == dtype and e["gpu"] == gpu]
    if not same:
        same = [e for e in entries if e["op"] == op and e["dtype"] == dtype and e["capability"] == capability]
    if not same:
        return None
    bucket = m_bucket(m)
    buckets = {e["m_bucket"] for e in same}
    nearest_bucket = min(buckets, key=lambda b: (abs(b.bit_length() - bucket.bit_length()), b))
    candidates = [e for e in same if e["m_bucket"] == nearest_bucket]

    def distance(e):
        return sum(abs((e[k] or 1) - v) / v for k, v in (("in", in_features), ("out", out_features), ("rank", rank)))

    return min(candidates, key=distance)["best"]


def measured_choice(op: str, device: torch.device, implementation_for: Callable[[str], object]):
    """What ``auto`` dispatches to for ``op`` on ``device`` when the table or the unmeasured preference
    says more than dispatch.py's fixed order, else None. implementation_for(name) is the backend's
    implementation of op on this device, or None where that backend can't run it here."""
    key = _device_key(device)
    if key is None:
        return None
    gpu, capability = key
    entries = [e for e in load(TABLE_PATH) if e["op"] == op and (e["gpu"] == gpu or e["capability"] == capability)]
    if not entries:
        preferred = _UNMEASURED_PREFERENCE.get((device.type, op))
        return implementation_for(preferred) if preferred else None
    implementations = {name: implementation_for(name) for name in {e["best"] for e in entries}}
    implementations = {name: fn for name, fn in implementations.items() if fn is not None}
    if not implementations:
        return None
    return _Chooser(op, gpu, capability, tuple(entries), implementations)


class _Chooser:
    """Calls the measured-fastest implementation for each call's dtype and M (x is the first argument,
    flattened to (M, in); B the fifth). A backend that can't run here falls back to the first one that can.
    The choice is searched once per (dtype, M bucket, layer size), then remembered: a call costs a dict
    lookup, whatever the table's size."""

    def __init__(self, op, gpu, capability, entries, implementations):
        self.op, self.gpu, self.capability, self.entries, self.implementations = op, gpu, capability, entries, implementations
        self._fallback = next(iter(implementations.values()))
        self._chosen: dict[tuple, object] = {}

    def __call__(self, x, *args):
        # vera_linear(x, weight, bias, A, B, ...); vera_delta(x, A, B, ...)
        A, B = (args[2], args[3]) if self.op == "vera_linear" else (args[0], args[1])
        key = (x.dtype, m_bucket(x.shape[0]), x.shape[1], B.shape[0], A.shape[0])
        fn = self._chosen.get(key)
        if fn is None:
            name = best_backend(self.entries, self.gpu, self.capability, self.op, str(x.dtype).removeprefix("torch."),
                                x.shape[0], x.shape[1], B.shape[0], A.shape[0])
            fn = self.implementations.get(name, self._fallback)
            if len(self._chosen) >= _CHOICES_KEPT:
                self._chosen.clear()
            self._chosen[key] = fn
        return fn(x, *args)


# --------------------------------------------------------------------------------------------------
# Writing the table from the benchmark's records.


def entries_from_records(records: dict) -> list[dict]:
    """One entry per (dtype, M bucket, layer) measured with at least one fused backend: the forward medians
    of the fused backends and the fastest. The records' environment names the GPU (and, from this version
    of bench/harness.py on, its compute capability)."""
    env = records.get("environment", {})
    gpu, capability = env.get("device", ""), env.get("capability", "")
    if not gpu or gpu.startswith("CPU"):
        raise ValueError(f"the records were not measured on a GPU (environment.device: {gpu!r})")
    grouped: dict[tuple, dict] = {}
    for row in records.get("results", ()):
        backend = _BENCH_IMPLS.get(row.get("impl"))
        if backend is None or row.get("pass_") != "forward" or not row.get("seconds"):
            continue
        key = (row["dtype"], m_bucket(row["m"]), row["in_features"], row["out_features"], row["rank"])
        grouped.setdefault(key, {})[backend] = row["seconds"] * 1e6
    entries = []
    for (dtype, bucket, in_f, out_f, rank), times in sorted(grouped.items()):
        # The layer benchmark times FusedVeRALinear, whose forward is vera_linear.
        entries.append(dict(gpu=gpu, capability=str(capability), op="vera_linear", dtype=dtype, m_bucket=bucket,
                            **{"in": in_f}, out=out_f, rank=rank, times_us=times, best=min(times, key=times.get)))
    return entries


def write(entries: list[dict], path: str = TABLE_PATH) -> None:
    """Replaces the entries of the GPUs given, keeps the others'."""
    gpus = {e["gpu"] for e in entries}
    kept = [e for e in load(path) if e["gpu"] not in gpus]
    with open(path, "w") as f:
        json.dump(dict(format=FORMAT, entries=kept + entries), f, indent=1)
        f.write("\n")
    load.cache_clear()


def main(argv=None):
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print(__doc__)
        return 2
    entries = []
    for path in paths:
        with open(path) as f:
            entries += entries_from_records(json.load(f))
    write(entries)
    print(f"{TABLE_PATH}: {len(entries)} entries from {', '.join(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
