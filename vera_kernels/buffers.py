"""Fresh output buffers for the kernels, the test switch that poisons them, and whether a CUDA graph is
being captured (what the Triton workspaces and autotuning must know).

A leaf module (it imports only torch): every backend allocates with :func:`new_output`, and the C++ ops,
which allocate their outputs in C++, follow the same switch (``vera_kernels._C.set_poison_outputs``).
"""

from __future__ import annotations

import contextlib
import sys

import torch

_poison_outputs = False


def poisoning() -> bool:
    """Whether fresh outputs are filled with NaN now (inside :func:`poisoned_outputs`)."""
    return _poison_outputs


def _set(on: bool) -> bool:
    global _poison_outputs
    previous, _poison_outputs = _poison_outputs, on
    # The C++ ops allocate their own outputs: tell the extension too when it is loaded (when it loads
    # later, vera_kernels._extension copies the setting at import).
    extension = sys.modules.get("vera_kernels._C")
    if extension is not None:
        extension.set_poison_outputs(on)
    return previous


@contextlib.contextmanager
def poisoned_outputs():
    """Within this block, fresh output buffers of every backend are filled with NaN, so an element a kernel
    fails to write shows up in the result instead of passing by luck. For tests and verify."""
    previous = _set(True)
    try:
        yield
    finally:
        _set(previous)


def new_output(*shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every Python backend allocates the buffers its kernels write with this (torch.empty, or NaN when poisoned)."""
    if _poison_outputs:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def graph_capturing(device: torch.device | None = None) -> bool:
    """Whether the current stream of ``device`` (a CUDA device; else the current device) is capturing a CUDA
    graph: then allocations come from the graph's private pool and nothing may synchronize. False while
    CUDA was never initialized (nothing can capture then, and asking would initialize it)."""
    if not torch.cuda.is_initialized():
        return False
    if device is not None and device.type == "cuda" and device.index is not None:
        with torch.cuda.device(device.index):
            return torch.cuda.is_current_stream_capturing()
    return torch.cuda.is_current_stream_capturing()
