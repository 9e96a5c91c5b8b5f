"""Routing rows to banked adapters can never serve the wrong adapter: a routing made before a removal is
stale and raises (its slot may hold another adapter by then), and the routing of an ``adapter_ids`` block
belongs to its thread alone."""

import threading

import pytest
import torch
from torch import nn

import vera_kernels
import vera_kernels.routing
from vera_kernels import apply_vera, vera_layers

from conftest import DEVICE, backend_params

DIM, RANK = 16, 8


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(DIM, DIM)
        self.o = nn.Linear(DIM, DIM)

    def forward(self, x):
        return self.o(torch.tanh(self.q(x)))


def _server(backend="auto", names=("fr", "de")):
    torch.manual_seed(0)
    model = apply_vera(Net(), ["q", "o"], rank=RANK, backend=backend).to(DEVICE).eval()
    adapters = {}
    for name in names:
        adapters[name] = {layer_name: (torch.randn(RANK), torch.randn(DIM)) for layer_name, _ in vera_layers(model)}
        for layer_name, layer in vera_layers(model):
            layer.add_adapter(name, *adapters[name][layer_name])
    return model, adapters


def _alone(model, adapters, name, x):
    """The model with adapter ``name`` as every layer's own adapter (None: the base)."""
    with torch.no_grad():
        saved = {}
        for layer_name, layer in vera_layers(model):
            saved[layer_name] = (layer.lambda_d.clone(), layer.lambda_b.clone())
            d, b = adapters[name][layer_name] if name else (torch.zeros(RANK), torch.zeros(DIM))
            layer.lambda_d.copy_(d), layer.lambda_b.copy_(b)
        out = model(x)
        for layer_name, layer in vera_layers(model):
            layer.lambda_d.copy_(saved[layer_name][0]), layer.lambda_b.copy_(saved[layer_name][1])
    return out


@pytest.mark.parametrize("route", ["set_adapter_ids", "adapter_ids"])
def test_a_routing_made_before_a_removal_is_stale(route):
    model, adapters = _server()
    x = torch.randn(3, DIM, device=DEVICE)
    routing = ["fr", None, "fr"]
    with torch.no_grad():
        if route == "set_adapter_ids":
            vera_kernels.set_adapter_ids(model, routing)
            model(x)
        for _, layer in vera_layers(model):
            layer.remove_adapter("fr")
            assert layer.add_adapter("other", torch.randn(RANK), torch.randn(DIM)) == 0  # fr's freed slot
        with pytest.raises(RuntimeError, match="routing was set before an adapter was removed"):
            if route == "set_adapter_ids":
                model(x)  # would serve "other" to the rows routed to "fr"
            else:
                with vera_kernels.adapter_ids(model, [0, None, 0]):
                    for _, layer in vera_layers(model):
                        layer.remove_adapter("other")  # a removal inside the block
                    model(x)
        # Routing again by name: "fr" is gone, so the names are refused when set, before any layer changes.
        with pytest.raises(KeyError, match="no adapter named 'fr'"):
            vera_kernels.set_adapter_ids(model, routing)


def test_ids_are_checked_when_set():
    model, _ = _server()
    for _, layer in vera_layers(model):
        layer.remove_adapter("fr")
    with pytest.raises(ValueError, match="removed adapter"):
        vera_kernels.set_adapter_ids(model, torch.tensor([0, -1], device=DEVICE))
    with pytest.raises(ValueError, match=r"in \[-1, 2\)"):
        vera_kernels.set_adapter_ids(model, [2, -1])
    with pytest.raises(TypeError, match="int64"):
        vera_kernels.set_adapter_ids(model, torch.tensor([1, -1], dtype=torch.int32))
    assert all(layer._routing is None for _, layer in vera_layers(model))  # nothing changed


def test_adding_an_adapter_keeps_a_routing_valid():
    model, adapters = _server()
    x = torch.randn(2, DIM, device=DEVICE)
    with torch.no_grad():
        vera_kernels.set_adapter_ids(model, ["de", "fr"])
        before = model(x)
        for _, layer in vera_layers(model):
            layer.add_adapter("es", torch.randn(RANK), torch.randn(DIM))
        assert torch.equal(model(x), before)


@pytest.mark.parametrize("backend", backend_params("torch", "cpu"))
def test_two_threads_serve_different_adapters_through_one_model(backend):
    names = ("fr", "de", "es")
    model, adapters = _server(backend, names)
    batches = [torch.randn(4, 3, DIM, device=DEVICE) for _ in range(6)]
    plans = {  # per thread: its routing, one name (or None) per sequence
        "t0": ["fr", "fr", None, "de"],
        "t1": ["es", "de", "es", None],
    }
    expected = {
        key: [torch.stack([_alone(model, adapters, name, x[i]) for i, name in enumerate(routing)]) for x in batches]
        for key, routing in plans.items()
    }
    wrong = []
    start = threading.Barrier(len(plans))

    def serve(key):
        start.wait()
        with torch.no_grad(), vera_kernels.adapter_ids(model, plans[key]):
            for _ in range(25):
                for i, x in enumerate(batches):
                    y = model(x)
                    if not torch.allclose(y, expected[key][i], rtol=1e-5, atol=1e-6):
                        wrong.append((key, i))

    threads = [threading.Thread(target=serve, args=(key,)) for key in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, f"batches served with another thread's routing: {wrong[:5]} ({len(wrong)} in all)"
    assert vera_kernels.routing.ROUTES.get() is None


def test_a_compiled_model_refuses_per_thread_routing():
    model, _ = _server()
    with pytest.raises(TypeError, match="set_adapter_ids"):
        with vera_kernels.adapter_ids(torch.compile(model), ["fr"]):
            pass
