"""The ``cpu`` and ``cuda`` backends: the compiled extension ``vera_kernels._C``.

The package works without it (the ``torch`` backend); :func:`load` says why it is missing.

The extension registers its ops with the dispatcher in C++ (python_bindings/bindings.cpp): the kernels on
the CPU and CUDA keys, the autograd (the hand-written C++ backward, saving s (M x r) and the parameters
only) and autocast. An eager call is one trip through the dispatcher. This module adds what Python must:
the fake kernels, so that torch.compile(fullgraph=True) and torch.export trace the ops, and the entry points
vera_kernels.dispatch hands out.
"""

from __future__ import annotations

import functools

import torch

from . import buffers, fakes


@functools.cache
def load():
    """(module, None) when the extension imports, else (None, a one-line reason)."""
    try:
        from . import _C
    except ImportError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, f"extension vera_kernels._C is not built or failed to load ({reason}); see README, Install"
    _C.set_poison_outputs(buffers.poisoning())
    _register_fakes()
    global FORWARD, BACKWARD, FORWARD_MULTI
    namespace = torch.ops.vera_kernels
    FORWARD, BACKWARD, FORWARD_MULTI = namespace.forward.default, namespace.backward.default, namespace.forward_multi.default
    return _C, None


# The extension's OpOverloads, set when it loads (vera_kernels.dispatch loads it before handing out the
# entry points below). Plain globals: torch.compile reads them without tracing the loading.
FORWARD = BACKWARD = FORWARD_MULTI = None


def _module():
    """The extension module; a RuntimeError with the reason where it did not load."""
    ext, error = load()
    if ext is None:
        raise RuntimeError(error)
    return ext


def _register_fakes():
    for op in ("forward", "backward", "forward_multi"):
        torch.library.register_fake(f"vera_kernels::{op}")(getattr(fakes, op))


def ops():
    """(forward, backward, forward_multi): the extension's OpOverloads."""
    _module()
    return FORWARD, BACKWARD, FORWARD_MULTI


def fill_projection_(out, seed, tag, fan_in, row_offset, col_offset):
    _module().fill_projection_(out, seed, tag, fan_in, row_offset, col_offset)


def philox4x32_10(counters, keys):
    return _module().philox4x32_10(counters.contiguous(), keys.contiguous())


# The dispatch's entry points: x already 2-D and checked by vera_kernels.ops.


def vera_linear(x, weight, bias, A, B, lambda_d, lambda_b):
    return FORWARD(x, weight, bias, A, B, lambda_d, lambda_b, None, 0, 0)[0]


def vera_delta(x, A, B, lambda_d, lambda_b, base_out):
    return FORWARD(x, None, None, A, B, lambda_d, lambda_b, base_out, 0, 0)[0]


def vera_forward_multi(x, weight, bias, A, B, lambda_d_bank, lambda_b_bank, adapter_ids, base_out):
    return FORWARD_MULTI(x, weight, bias, A, B, lambda_d_bank, lambda_b_bank, adapter_ids, base_out)
