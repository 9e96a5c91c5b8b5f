"""vera-kernels: fused kernels and a drop-in layer for VeRA adapters."""

from .adapters import load_adapter, read_adapter, save_adapter
from .dispatch import backends
from .lora_export import to_lora
from .layer import FusedVeRALinear, VeRAWrapper
from .projection_sources import ExplicitProjections, SeededProjectionShard, SeededProjections
from .ops import vera_delta, vera_delta_multi, vera_linear, vera_linear_multi
from .patching import adapter_ids, apply_vera, from_peft, merge_and_unload, set_adapter_ids, to_peft, vera_layers
from .projections import SCHEME, clear_projection_cache, generate_projections, get_projections

__all__ = [
    "SCHEME",
    "ExplicitProjections",
    "FusedVeRALinear",
    "SeededProjectionShard",
    "SeededProjections",
    "VeRAColwiseParallel",
    "VeRARowwiseParallel",
    "VeRAWrapper",
    "adapter_ids",
    "apply_vera",
    "backends",
    "clear_projection_cache",
    "from_peft",
    "generate_projections",
    "get_projections",
    "load_adapter",
    "merge_and_unload",
    "read_adapter",
    "save_adapter",
    "set_adapter_ids",
    "to_lora",
    "to_peft",
    "vera_delta",
    "vera_delta_multi",
    "vera_layers",
    "vera_linear",
    "vera_linear_multi",
]
__version__ = "0.1.0"

_LAZY = {"VeRAColwiseParallel": "tensor_parallel", "VeRARowwiseParallel": "tensor_parallel"}


def __getattr__(name):
    # The tensor-parallel styles import torch.distributed.tensor (seconds): only when asked for.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
