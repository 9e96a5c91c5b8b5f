"""The ``triton`` backend: Triton kernels on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""

from .. import dispatch
from . import projection


def interpreted() -> bool:
    """Whether this module's kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return projection.interpreted()


dispatch.register("triton", "fill_projection_", projection.fill_projection_)
dispatch.register("triton", "philox4x32_10", projection.philox4x32_10)
