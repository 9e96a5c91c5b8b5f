"""Measurements shared by the demo and the benchmarks."""

from __future__ import annotations

import torch


def saved_activation_bytes(fn, x: torch.Tensor, excluded_storages: set[int]) -> int:
    """Bytes of the distinct storages autograd saves for backward in one call fn(x), x and the storages
    whose data pointers are in excluded_storages (the parameters and buffers) not counted. A storage saved
    by several ops counts once, as it occupies memory once."""
    excluded = excluded_storages | {x.untyped_storage().data_ptr()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(storages.values())


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages a model holds: its parameters and buffers, the quantization state
    bitsandbytes keeps beside a 4-bit weight (block scales, code books) and the projections this package's
    VeRA layers have materialized (PEFT's are buffers). Each storage counts once."""
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        while state is not None:
            tensors += [t for t in vars(state).values() if isinstance(t, torch.Tensor)]
            state = getattr(state, "state2", None)
        pairs = getattr(getattr(module, "projections", None), "_pairs", {})
        tensors += [t for pair in pairs.values() for t in pair]
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
