"""The ``triton`` backend: Triton kernels on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.

Beyond the ops registered with the dispatch, it offers the on-the-fly projection mode
(:func:`vera_linear_on_the_fly`, :func:`vera_delta_on_the_fly`) and :func:`pin_config`."""

from . import function, projection
from .autotune import pin_config
from .function import vera_delta_on_the_fly, vera_linear_on_the_fly

__all__ = ["interpreted", "pin_config", "vera_delta_on_the_fly", "vera_linear_on_the_fly"]


def interpreted() -> bool:
    """Whether this module's kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return projection.interpreted()
