"""Adapter files: safetensors only (data, never code).

A file holds, as string metadata, the format and its version, the projection scheme (``vera_kernels.SCHEME``),
seed, rank, max_in, max_out, dropout and d_initial; as tensors, ``<module>.lambda_d`` and
``<module>.lambda_b`` per adapted layer and ``<parameter>.bias`` for every trained bias: nothing else. The
projections are regenerated from the seed, so a file for a 7B model's attention layers is a few hundred KB.

load_adapter checks everything (format, scheme, sizes, names, shapes, dtypes) before it changes the model.
"""

from __future__ import annotations

import math
import os
import re
import stat
import sys
import warnings

import torch
from torch import nn

from .projection_sources import SeededProjections
from .patching import _fusable, _shared_projections, apply_vera, find_targets, vera_layers
from .projections import MAX_COLS, MAX_ROWS, SCHEME

FORMAT = "vera-kernels-adapter"
FORMAT_VERSION = "1"
_INT_FIELDS = ("seed", "rank", "max_in", "max_out")
_FLOAT_FIELDS = ("dropout", "d_initial")
# What save_adapter writes (str(int), repr(float)), nothing looser: no spaces, underscores, signs or NaN.
_INT_TEXT = re.compile(r"0|[1-9][0-9]*")
_FLOAT_TEXT = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
# [low, high] of each field: what SeededProjections accepts (projections.check_seed, check_scheme_sizes).
_INT_RANGES = {"seed": (0, 2**63 - 1), "rank": (1, MAX_ROWS), "max_in": (1, MAX_COLS), "max_out": (1, MAX_ROWS)}


def _import_safetensors():
    try:
        import safetensors
        import safetensors.torch
    except ImportError as exc:
        raise ImportError(f"adapter files need the safetensors package (pip install safetensors): {exc}") from None
    return safetensors


def _path(function: str, path) -> str:
    """A file path as str: str, bytes (decoded as the OS does) or os.PathLike; anything else is refused."""
    try:
        return os.fsdecode(os.fspath(path))
    except TypeError:
        raise TypeError(f"{function}: path must be a str, bytes or os.PathLike, got {type(path).__name__} {path!r}") from None


def _is_bias(name: str) -> bool:
    return name == "bias" or name.endswith(".bias")


def _dtensor_module():
    """torch.distributed.tensor once something imported it (a tensor-parallel or FSDP2 model did), else None:
    then no parameter can be a DTensor, and importing it (seconds) is not worth it."""
    return sys.modules.get("torch.distributed.tensor")


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU: a DTensor (tensor-parallel or FSDP2 shards) is gathered (a collective:
    every rank of its mesh must be here)."""
    dtensor = _dtensor_module()
    if dtensor is not None and isinstance(tensor, dtensor.DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().contiguous()


def _place(parameter: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy ``whole`` into ``parameter``; into a DTensor, each rank copies its own shard (every rank read the
    same file: no communication)."""
    dtensor = _dtensor_module()
    if dtensor is not None and isinstance(parameter, dtensor.DTensor):
        mesh = parameter.device_mesh
        local = whole.to(parameter.to_local().device)
        replicated = dtensor.distribute_tensor(local, mesh, [dtensor.Replicate()] * mesh.ndim, src_data_rank=None)
        whole = replicated.redistribute(mesh, parameter.placements)
    parameter.copy_(whole)


def save_adapter(model: nn.Module, path) -> None:
    """Write the model's VeRA adapters (lambdas, trained biases, the seed and sizes) to a safetensors file.

    A tensor-parallel (or FSDP2) model's lambdas are DTensors: every rank calls save_adapter, the shards are
    gathered, rank 0 writes the file (the same file the unsharded model writes) and every rank returns once
    it is written."""
    safetensors = _import_safetensors()
    layers = vera_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no VeRA layer (apply_vera first)")
    projections = _shared_projections(layers)
    if not isinstance(projections, SeededProjections):
        raise ValueError(
            "save_adapter: the model uses explicit projections (e.g. PEFT's), which a seed cannot describe; "
            "export it with vera_kernels.to_peft(model).save_pretrained(directory)"
        )
    dtensor = _dtensor_module()
    sharded = dtensor is not None and any(isinstance(p, dtensor.DTensor) for p in model.parameters())
    tensors = {}
    for name, module in layers:
        tensors[f"{name}.lambda_d"] = _whole(module.lambda_d)
        tensors[f"{name}.lambda_b"] = _whole(module.lambda_b)
    adapter_names = set(tensors)
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or name in adapter_names:
            continue
        if _is_bias(name):
            tensors[name] = _whole(parameter)
        else:
            warnings.warn(f"save_adapter: trainable parameter {name!r} is neither a VeRA vector nor a bias: not saved")
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "scheme": SCHEME,
        "seed": str(projections.seed),
        "rank": str(projections.rank),
        "max_in": str(projections.max_in),
        "max_out": str(projections.max_out),
        "dropout": repr(_single(layers, "dropout")),
        "d_initial": repr(_single(layers, "d_initial")),
    }
    path = _path("save_adapter", path)
    if not sharded:
        safetensors.torch.save_file(tensors, path, metadata=metadata)
        return
    import torch.distributed as dist

    try:
        if dist.get_rank() == 0:
            safetensors.torch.save_file(tensors, path, metadata=metadata)
    finally:
        dist.barrier()  # the file is there for every rank once save_adapter returns


def _single(layers, attribute):
    values = {getattr(module, attribute) for _, module in layers}
    if len(values) != 1:
        raise ValueError(f"save_adapter: the VeRA layers have different {attribute} values {sorted(values)}")
    return values.pop()


def read_adapter(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of an adapter file, the config's fields parsed and checked; ValueError naming the
    file for anything that is not a complete adapter file of this format and scheme."""
    safetensors = _import_safetensors()
    path = _path("read_adapter", path)
    try:
        mode = os.stat(path).st_mode  # follows links: a link to /dev/zero is a device
    except FileNotFoundError:
        raise FileNotFoundError(f"adapter file {path!r} does not exist") from None
    except OSError as exc:
        raise ValueError(f"adapter file {path!r} can't be read: {exc}") from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"adapter file {path!r} is a directory; expected a safetensors file written by save_adapter")
    if not stat.S_ISREG(mode):
        # A FIFO would block the read, /dev/zero would never end: only regular files are read.
        raise ValueError(f"adapter file {path!r} is not a regular file (a device, FIFO or socket); expected a "
                         "safetensors file written by save_adapter")
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (safetensors.SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ValueError(f"adapter file {path!r} is not a valid safetensors file: {exc}") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"adapter file {path!r} is not a vera-kernels adapter (metadata format={metadata.get('format')!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"adapter file {path!r} has format version {metadata.get('format_version')!r}; this version reads {FORMAT_VERSION!r}")
    if metadata.get("scheme") != SCHEME:
        raise ValueError(
            f"adapter file {path!r} was made with projection scheme {metadata.get('scheme')!r}; this version "
            f"generates {SCHEME!r}: its projections would differ"
        )
    config = _parse_config(path, metadata)
    for key in tensors:
        if not (key.endswith(".lambda_d") or key.endswith(".lambda_b") or _is_bias(key)):
            raise ValueError(f"adapter file {path!r}: unexpected tensor {key!r} (only lambda_d, lambda_b and biases belong)")
    return config, tensors


def _parse_config(path, metadata: dict) -> dict:
    """The numeric fields of the metadata, each written as save_adapter writes it and within its range."""
    config = {}
    for field in _INT_FIELDS + _FLOAT_FIELDS:
        text = metadata.get(field)
        is_int = field in _INT_FIELDS
        pattern = _INT_TEXT if is_int else _FLOAT_TEXT
        if not isinstance(text, str) or not pattern.fullmatch(text):
            kind = "a non-negative integer in decimal digits" if is_int else "a decimal number"
            raise ValueError(f"adapter file {path!r}: metadata {field!r} missing or not {kind} (got {_short(text)})")
        if is_int and len(text) > len(str(_INT_RANGES[field][1])):
            # Out of range by its length alone (and past Python's int-conversion limit, were it 4300 digits).
            low, high = _INT_RANGES[field]
            raise ValueError(f"adapter file {path!r}: metadata {field!r} must be in [{low}, {high}], got a "
                             f"{len(text)}-digit number")
        config[field] = int(text) if is_int else float(text)
    for field, (low, high) in _INT_RANGES.items():
        if not low <= config[field] <= high:
            raise ValueError(f"adapter file {path!r}: metadata {field!r} must be in [{low}, {high}], got {config[field]}")
    if not 0.0 <= config["dropout"] < 1.0:
        raise ValueError(f"adapter file {path!r}: metadata 'dropout' must be in [0, 1), got {config['dropout']}")
    if not math.isfinite(config["d_initial"]):
        raise ValueError(f"adapter file {path!r}: metadata 'd_initial' must be finite, got {config['d_initial']}")
    return config


def _short(text) -> str:
    text = repr(text)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _layer_names(path, tensors) -> list[str]:
    names_d = {k[: -len(".lambda_d")] for k in tensors if k.endswith(".lambda_d")}
    names_b = {k[: -len(".lambda_b")] for k in tensors if k.endswith(".lambda_b")}
    if names_d != names_b:
        raise ValueError(f"adapter file {path!r}: layers without both lambda_d and lambda_b: {sorted(names_d ^ names_b)}")
    if not names_d:
        raise ValueError(f"adapter file {path!r} holds no VeRA layer")
    return sorted(names_d)


def _check_tensor(path, key, tensor, shape, dtype):
    if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
        raise ValueError(
            f"adapter file {path!r}: {key} is {tuple(tensor.shape)} {tensor.dtype}, the model expects {tuple(shape)} {dtype}"
        )


def _check_finite(path, tensors, allow_nonfinite: bool) -> None:
    if allow_nonfinite:
        return
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = tensor[~torch.isfinite(tensor)][0].item()
            raise ValueError(
                f"adapter file {path!r}: {key} holds non-finite values ({bad} among them); the model would "
                "compute NaN or inf. Pass allow_nonfinite=True to load it anyway")


def load_adapter(model: nn.Module, path, *, name: str | None = None, allow_nonfinite: bool = False) -> nn.Module:
    """Load an adapter file into ``model`` and return it.

    If the model has VeRA layers they must be exactly the file's (names, seed, rank, sizes); if it has none,
    the file's layers are added first (apply_vera with the file's seed, rank, sizes, dropout and d_initial).
    Every check runs before the model is changed, so a failed load leaves it as it was. Into a tensor-parallel
    (or FSDP2) model, whose lambdas are DTensors, each rank copies its own shard of the file's tensors.

    ``name``: instead of replacing each layer's own lambdas, add the adapter to every layer's bank under
    this name (``layer.add_adapter``), to serve it beside others with ``set_adapter_ids``. A banked adapter
    has no bias of its own: a file with trained biases is refused.

    A file whose tensors hold NaN or inf is refused unless ``allow_nonfinite``.
    """
    path = _path("load_adapter", path)
    config, tensors = read_adapter(path)
    _check_finite(path, tensors, allow_nonfinite)
    names = _layer_names(path, tensors)
    existing = dict(vera_layers(model))
    if name is not None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"load_adapter: name must be a non-empty str, got {name!r}")
        trained_biases = sorted(k for k in tensors if _is_bias(k))
        if trained_biases:
            raise ValueError(
                f"adapter file {path!r} trains biases ({trained_biases[:3]}): the adapter bank shares each layer's "
                "bias across adapters; load it without name= (into the layers' own adapter) instead"
            )
        taken = sorted(layer_name for layer_name, module in existing.items() if name in module.adapters)
        if taken:
            raise ValueError(f"load_adapter: an adapter named {name!r} is already in the bank of {taken[:3]}")
    merged = sorted(layer_name for layer_name, module in existing.items() if getattr(module, "merged", False))
    if merged and name is None:
        raise ValueError(
            f"load_adapter: layers {merged[:5]} are merged (ΔW is folded into their weights), so adapter file "
            f"{path!r} can't replace their lambdas; call unmerge() on them first"
        )
    if existing:
        missing, unknown = sorted(set(existing) - set(names)), sorted(set(names) - set(existing))
        if missing or unknown:
            raise ValueError(
                f"adapter file {path!r} does not fit the model's VeRA layers: not in the file {missing[:5]}, "
                f"not in the model {unknown[:5]}"
            )
        projections = _shared_projections(existing.items())
        ours = {f: getattr(projections, f, None) for f in _INT_FIELDS}
        theirs = {f: config[f] for f in _INT_FIELDS}
        if ours != theirs:
            raise ValueError(f"adapter file {path!r} has projections {theirs}; the model's VeRA layers use {ours}")
        shapes = {layer: (existing[layer].rank, existing[layer].out_features) for layer in names}
        dtypes = {layer: (existing[layer].lambda_d.dtype, existing[layer].lambda_b.dtype) for layer in names}
        wrapped = ()
    else:
        # Exact names: the file says which modules were adapted.
        pattern = "|".join(re.escape(layer) for layer in names)
        try:
            targets = find_targets(model, pattern)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"adapter file {path!r} does not fit the model: {exc}") from None
        found = {layer: features for layer, _, features in targets}
        if set(found) != set(names):
            raise ValueError(f"adapter file {path!r} does not fit the model: it has no module {sorted(set(names) - set(found))[:5]}")
        for layer, (in_features, out_features) in found.items():
            if in_features > config["max_in"] or out_features > config["max_out"]:
                raise ValueError(
                    f"adapter file {path!r}: module {layer!r} ({in_features} -> {out_features}) is larger than the "
                    f"file's max_in={config['max_in']}, max_out={config['max_out']}"
                )
        shapes = {layer: (config["rank"], found[layer][1]) for layer in names}
        dtypes = {layer: (torch.float32, torch.float32) for layer in names}
        wrapped = [layer for layer, module, _ in targets if not _fusable(module)]
    for layer in names:
        (rank, out_features), (dtype_d, dtype_b) = shapes[layer], dtypes[layer]
        _check_tensor(path, f"{layer}.lambda_d", tensors[f"{layer}.lambda_d"], (rank,), dtype_d)
        _check_tensor(path, f"{layer}.lambda_b", tensors[f"{layer}.lambda_b"], (out_features,), dtype_b)
    biases = {}
    for key in (k for k in tensors if _is_bias(k)):
        parameter = _parameter_after_patching(model, key, wrapped)
        if parameter is None:
            raise ValueError(f"adapter file {path!r}: the model has no parameter {key!r}")
        _check_tensor(path, key, tensors[key], parameter.shape, parameter.dtype)
        biases[key] = parameter

    if not existing:
        # Only the slices the model's layers use are generated: the file's max_in and max_out set the values
        # (the scale), not how much memory the load takes.
        projections = SeededProjections(
            config["seed"], config["rank"], config["max_in"], config["max_out"],
            in_features=max(features[0] for features in found.values()),
            out_features=max(features[1] for features in found.values()),
        )
        try:
            apply_vera(model, pattern, rank=config["rank"], d_initial=config["d_initial"],
                       dropout=config["dropout"], projections=projections)
        except Exception as exc:  # e.g. out of memory generating the projections; apply_vera changed nothing
            fields = ", ".join(f"{f}={config[f]}" for f in _INT_FIELDS)
            error = ValueError if isinstance(exc, (ValueError, TypeError)) else RuntimeError
            raise error(f"adapter file {path!r}: building its layers from metadata {fields} failed: {exc}") from exc
    layers = dict(vera_layers(model))
    if name is not None:
        for layer_name in names:
            layers[layer_name].add_adapter(name, tensors[f"{layer_name}.lambda_d"], tensors[f"{layer_name}.lambda_b"],
                                           allow_nonfinite=allow_nonfinite)
        return model
    with torch.no_grad():
        for layer in names:
            _place(layers[layer].lambda_d, tensors[f"{layer}.lambda_d"])
            _place(layers[layer].lambda_b, tensors[f"{layer}.lambda_b"])
        for key, parameter in biases.items():
            _place(parameter, tensors[key])
            parameter.requires_grad_(True)
    return model


def _parameter_after_patching(model, key, wrapped):
    """The parameter ``key`` names once the modules in ``wrapped`` sit inside a VeRAWrapper (as base_layer)."""
    for name in wrapped:
        prefix = f"{name}.base_layer."
        if key.startswith(prefix):
            key = f"{name}.{key[len(prefix):]}"
    try:
        return model.get_parameter(key)
    except AttributeError:
        return None
