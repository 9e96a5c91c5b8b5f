"""vera-kernels: fused kernels and a drop-in layer for VeRA adapters."""

from .dispatch import backends
from .ops import vera_delta, vera_linear
from .projections import SCHEME, clear_projection_cache, generate_projections, get_projections

__all__ = [
    "SCHEME",
    "backends",
    "clear_projection_cache",
    "generate_projections",
    "get_projections",
    "vera_delta",
    "vera_linear",
]
__version__ = "0.1.0"
