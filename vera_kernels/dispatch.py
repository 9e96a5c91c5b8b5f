"""One dispatch for every op of the package.

Backends:
  torch   plain PyTorch on any device: the float64 oracle and the fallback;
  triton  Triton kernels on a CUDA GPU, or on CPU tensors under the interpreter (TRITON_INTERPRET=1
          set before vera_kernels' Triton kernels are first used);
  cpu     the C++ extension ``vera_kernels._C`` on CPU tensors;
  cuda    the same extension's CUDA kernels (built when torch had CUDA and nvcc was found).
``auto`` picks, for the tensors' device, the first available of: cuda -> cuda, triton, torch;
cpu -> cpu, torch.

Where each backend implements each op is written down here, by module and attribute name, and imported
on first use: the backends never import this module, so there is no import cycle, and ``import
vera_kernels`` never needs Triton or the extension. Every implementation of an op takes the same arguments
(see vera_kernels.ops).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from .buffers import new_output, poisoned_outputs  # noqa: F401  (re-exported: the backends' allocator)

NAMES = ("torch", "triton", "cpu", "cuda")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}

_TRITON = "vera_kernels.triton.function"
_EXTENSION = "vera_kernels._extension"
# (backend, op) -> "module:attribute" of its implementation.
_WHERE = {
    ("torch", "vera_linear"): "vera_kernels.reference:vera_linear",
    ("torch", "vera_delta"): "vera_kernels.reference:vera_delta",
    # Both multi ops share one signature: (x2d, weight, bias, A, B, bank_d, bank_b, ids, base_out).
    ("torch", "vera_linear_multi"): "vera_kernels.reference:vera_forward_multi",
    ("torch", "vera_delta_multi"): "vera_kernels.reference:vera_forward_multi",
    ("torch", "fill_projection_"): "vera_kernels.projections:_fill_projection_torch",
    ("torch", "philox4x32_10"): "vera_kernels.projections:philox4x32_10_torch",
    ("triton", "vera_linear"): f"{_TRITON}:vera_linear",
    ("triton", "vera_delta"): f"{_TRITON}:vera_delta",
    ("triton", "vera_linear_multi"): f"{_TRITON}:vera_forward_multi",
    ("triton", "vera_delta_multi"): f"{_TRITON}:vera_forward_multi",
    ("triton", "fill_projection_"): "vera_kernels.triton.projection:fill_projection_",
    ("triton", "philox4x32_10"): "vera_kernels.triton.projection:philox4x32_10",
    **{(backend, op): f"{_EXTENSION}:{attribute}" for backend in ("cpu", "cuda") for op, attribute in (
        ("vera_linear", "vera_linear"), ("vera_delta", "vera_delta"), ("vera_linear_multi", "vera_forward_multi"),
        ("vera_delta_multi", "vera_forward_multi"), ("fill_projection_", "fill_projection_"),
        ("philox4x32_10", "philox4x32_10"))},
}
# Implementations added at run time (register), e.g. by a test or a third-party backend.
_registered: dict[tuple[str, str], object] = {}
# (op, backend, device type) -> implementation, filled by lookup. Resolving means status checks and
# imports that torch.compile cannot trace; once cached, a compiled forward only reads this dict
# (FusedVeRALinear fills it eagerly for its device). What a backend offers is fixed for the process
# (Triton's interpreter mode, the extension, CUDA's presence), except registrations: register clears it.
_resolved: dict[tuple[str, str, str], object] = {}


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    devices: tuple[str, ...]
    reason: str  # what it runs on when available, why not when missing; one line


def register(backend: str, op: str, fn) -> None:
    """Use ``fn`` for ``op`` on ``backend`` from now on (it takes the op's arguments, see vera_kernels.ops)."""
    _registered[(backend, op)] = fn
    _resolved.clear()


def _triton_status() -> BackendStatus:
    try:
        interpreted = importlib.import_module("vera_kernels.triton").interpreted
    except Exception as exc:  # ImportError, or a broken Triton install
        return BackendStatus("triton", False, (), f"triton could not be imported: {exc!s}".splitlines()[0])
    if interpreted():
        return BackendStatus("triton", True, ("cpu",), "Triton interpreter on CPU tensors (TRITON_INTERPRET=1)")
    if torch.cuda.is_available():
        return BackendStatus("triton", True, ("cuda",), f"Triton on {torch.cuda.get_device_name()}")
    return BackendStatus(
        "triton", False, (), "no CUDA GPU is visible and the Triton interpreter is off (set TRITON_INTERPRET=1)"
    )


def _extension_status(name: str) -> BackendStatus:
    ext, error = importlib.import_module(_EXTENSION).load()
    if ext is None:
        return BackendStatus(name, False, (), error)
    if name == "cpu":
        return BackendStatus("cpu", True, ("cpu",), "C++ extension vera_kernels._C")
    if not ext.built_with_cuda():
        return BackendStatus("cuda", False, (), "vera_kernels._C was built without CUDA (CPU-only torch or no nvcc)")
    if not torch.cuda.is_available():
        return BackendStatus("cuda", False, (), "vera_kernels._C has CUDA kernels but no CUDA GPU is visible")
    return BackendStatus("cuda", True, ("cuda",), f"CUDA extension on {torch.cuda.get_device_name()}")


def status(name: str) -> BackendStatus:
    if name == "torch":
        return BackendStatus("torch", True, ("cpu", "cuda"), "plain PyTorch")
    if name == "triton":
        return _triton_status()
    if name in ("cpu", "cuda"):
        return _extension_status(name)
    raise ValueError(f"backend must be 'auto' or one of {', '.join(NAMES)}; got {name!r}")


def backends() -> dict[str, BackendStatus]:
    """Every backend with whether it is available here and, in one line, on what or why not."""
    return {name: status(name) for name in NAMES}


def _implementation(backend: str, op: str):
    """The implementation of ``op`` on ``backend``, importing its module on first use; None where the
    backend does not implement the op."""
    found = _registered.get((backend, op))
    if found is None and (backend, op) in _WHERE:
        module, attribute = _WHERE[(backend, op)].split(":")
        found = getattr(importlib.import_module(module), attribute)
    return found


def lookup(op: str, backend: str, device: torch.device):
    """The implementation of ``op`` on ``backend`` for tensors on ``device``; errors say why not."""
    key = (op, backend, device.type)
    fn = _resolved.get(key)
    if fn is None:
        fn = _resolve(op, backend, device)
        _resolved[key] = fn
    return fn


def _resolve(op: str, backend: str, device: torch.device):
    if backend == "auto":
        from .auto_table import measured_choice  # measured times, where the package has some for this GPU

        chosen = measured_choice(op, device, lambda name: _available_implementation(name, op, device))
        if chosen is not None:
            return chosen
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            found = status(candidate)
            if found.available and device.type in found.devices and _implementation(candidate, op):
                return _implementation(candidate, op)
        raise RuntimeError(f"no backend implements {op} on device {device}")
    found = status(backend)
    if not found.available:
        raise RuntimeError(f"backend {backend!r} is not available: {found.reason}")
    if device.type not in found.devices:
        raise RuntimeError(
            f"backend {backend!r} runs on {' or '.join(found.devices)} tensors, not {device.type} ({found.reason})"
        )
    fn = _implementation(backend, op)
    if fn is None:
        raise NotImplementedError(f"backend {backend!r} does not implement {op} yet")
    return fn


def _available_implementation(backend: str, op: str, device: torch.device):
    found = status(backend)
    return _implementation(backend, op) if found.available and device.type in found.devices else None
