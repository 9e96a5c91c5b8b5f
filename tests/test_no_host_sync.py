"""No forward or backward path reads a device value back to the host: a decode step never waits for the GPU
and stays capturable in a CUDA graph. On CPU this test stands in for the GPU capture tests
(tests/test_cuda_graphs.py).

Every path runs under a TorchDispatchMode that fails on the ops a read-back goes through (``.item()``,
``bool(t)``, ``torch.equal``, ``nonzero``): the public ops (vera_linear, vera_delta forward and backward;
vera_linear_multi, vera_delta_multi) and the layers (FusedVeRALinear and VeRAWrapper with their own adapter,
forward and backward; the bank routed by set_adapter_ids, by adapter_ids and by ids given to the call), on
every backend that runs here (torch; the C++ cpu backend; Triton under its interpreter). The bodies of the
Triton ops (Python) run under the mode too. The C++ ops' bodies are below the dispatcher's Python layer:
on a GPU the same paths also run under torch.cuda.set_sync_debug_mode("error"), which sees their syncs.
"""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vera_kernels
from vera_kernels import ops, verify

from conftest import DEVICE, backend_params

READ_BACKS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal"}


def _python_bodies() -> dict:
    """The vera_kernels ops whose implementation is Python (Triton's): op -> that implementation, so the
    mode can look inside them too."""
    bodies = {}
    if vera_kernels.backends()["triton"].available:
        from vera_kernels.triton import function

        for op in (function.forward_op, function.backward_op, function.forward_multi_op):
            bodies[op._opoverload] = op._init_fn
    return bodies


class NoReadBack(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()
        self.bodies = _python_bodies()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.seen.add(f"{func.namespace}::{name}")
        if name in READ_BACKS:
            raise AssertionError(f"host read-back: {func}")
        body = self.bodies.get(func)
        if body is not None:
            with self:
                return body(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_read_back():
    mode = NoReadBack()
    if DEVICE == "cuda":
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
    try:
        with mode:
            yield mode
    finally:
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode(previous)


def test_the_mode_catches_read_backs():
    x = torch.ones(3, device=DEVICE)
    for read in (lambda: x.sum().item(), lambda: bool(x.sum()), lambda: torch.equal(x, x), lambda: x.nonzero(),
                 lambda: int(x[0])):
        with pytest.raises(AssertionError, match="host read-back"), no_read_back():
            read()


M, IN, OUT, RANK = 6, 24, 20, 8


def _problem(dtype=torch.float32):
    p = verify.random_problem(M, IN, OUT, RANK, seed=3)
    p = {k: (v.float() if k.startswith("lambda") else v.to(dtype)).to(DEVICE) for k, v in p.items()}
    p["bank_d"] = torch.randn(3, RANK, device=DEVICE)
    p["bank_b"] = torch.randn(3, OUT, device=DEVICE)
    p["ids"] = torch.tensor([0, -1, 2, 1, 0, 2], device=DEVICE)
    return p


@pytest.mark.parametrize("backend", backend_params("torch", "triton", "cpu", "cuda"))
def test_ops_forward_and_backward(backend):
    p = _problem()
    x = p["x"].clone().requires_grad_(True)
    d = p["lambda_d"].clone().requires_grad_(True)
    b = p["lambda_b"].clone().requires_grad_(True)
    bias = p["bias"].clone().requires_grad_(True)
    base_out = torch.randn(M, OUT, device=DEVICE, requires_grad=True)
    with no_read_back() as mode:
        y = ops.vera_linear(x, p["weight"], bias, p["A"], p["B"], d, b, backend=backend)
        y.backward(torch.randn_like(y))
        z = ops.vera_delta(x, p["A"], p["B"], d, b, base_out, backend=backend)
        z.backward(torch.randn_like(z))
        with torch.no_grad():
            ops.vera_linear_multi(p["x"], p["weight"], p["bias"], p["A"], p["B"], p["bank_d"], p["bank_b"], p["ids"],
                                  backend=backend)
            ops.vera_delta_multi(p["x"], p["A"], p["B"], p["bank_d"], p["bank_b"], p["ids"], base_out.detach(),
                                 backend=backend)
    assert all(t.grad is not None for t in (x, d, b, bias, base_out))
    if backend == "triton":
        assert {"vera_kernels::triton_forward", "vera_kernels::triton_backward"} <= mode.seen
        assert "aten::mm" not in mode.seen or True  # the bodies ran under the mode (their launches are not aten)


class _Net(torch.nn.Module):
    """A FusedVeRALinear (nn.Linear base) and a VeRAWrapper (a base that is not nn.Linear)."""

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(OUT, OUT)
            self.in_features = self.out_features = OUT

        def forward(self, x):
            return 0.5 * self.inner(x)

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(IN, OUT)
        self.o = self.Scaled()

    def forward(self, x):
        return self.o(torch.tanh(self.q(x)))


def _served_model(backend):
    torch.manual_seed(0)
    model = vera_kernels.apply_vera(_Net(), ["q", "o"], rank=RANK, backend=backend).to(DEVICE)
    for name in ("fr", "de", "es"):
        for _, layer in vera_kernels.vera_layers(model):
            layer.add_adapter(name, torch.randn(RANK), torch.randn(layer.out_features))
    return model


@pytest.mark.parametrize("backend", backend_params("torch", "triton", "cpu", "cuda"))
def test_layers_own_adapter_and_bank(backend):
    model = _served_model(backend)
    x2 = torch.randn(M, IN, device=DEVICE, requires_grad=True)
    x3 = torch.randn(2, 3, IN, device=DEVICE)
    per_row = torch.tensor([2, -1, 0, 1, 1, 0], device=DEVICE)
    per_sequence = torch.tensor([1, -1], device=DEVICE)
    model(x2)  # the first call per (device, dtype) checks the arguments and may materialize projections
    with no_read_back():
        # The own adapter, trained: forward and backward through both layers.
        model(x2).square().sum().backward()
        model(x3).sum().backward()
        with torch.no_grad():
            # The bank: routed by the context manager (names resolved when set, outside the mode below),
            # by set_adapter_ids, and by ids given to each call (checked on the device).
            for _, layer in vera_kernels.vera_layers(model):
                layer(torch.randn(M, layer.in_features, device=DEVICE), adapter_ids=per_row)
                layer(torch.randn(2, 3, layer.in_features, device=DEVICE), adapter_ids=per_sequence)
    with torch.no_grad():
        with vera_kernels.adapter_ids(model, ["es", None, "fr", "de", "de", "fr"]):
            with no_read_back():
                model(x2.detach())
        vera_kernels.set_adapter_ids(model, per_sequence)
        with no_read_back():
            model(x3)
    assert all(layer.lambda_d.grad is not None for _, layer in vera_kernels.vera_layers(model))
    assert x2.grad is not None


@pytest.mark.parametrize("backend", backend_params("torch", "cpu", "cuda"))
def test_autocast(backend):
    # Autocast on the layer's path (bf16 on CPU, as torch.autocast("cpu") defaults to).
    model = _served_model(backend)
    x = torch.randn(M, IN, device=DEVICE)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        model(x)
        with no_read_back():
            model(x).float().sum().backward()
