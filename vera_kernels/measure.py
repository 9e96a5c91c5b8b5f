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
