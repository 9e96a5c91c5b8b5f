"""Loads the compiled extension ``vera_kernels._C`` and registers its ops as the ``cpu`` and ``cuda`` backends.

The package works without it (the ``torch`` backend); :func:`load` says why it is missing.
"""

from __future__ import annotations

import functools

from . import dispatch


@functools.cache
def load():
    """(module, None) when the extension imports, else (None, a one-line reason)."""
    try:
        from . import _C
    except ImportError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, f"extension vera_kernels._C is not built or failed to load ({reason}); see README, Install"
    return _C, None


def _fill_projection_(out, seed, tag, fan_in, row_offset, col_offset):
    load()[0].fill_projection_(out, seed, tag, fan_in, row_offset, col_offset)


def _philox4x32_10(counters, keys):
    return load()[0].philox4x32_10(counters.contiguous(), keys.contiguous())


for _backend in ("cpu", "cuda"):
    dispatch.register(_backend, "fill_projection_", _fill_projection_)
    dispatch.register(_backend, "philox4x32_10", _philox4x32_10)
