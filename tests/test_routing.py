"""Routing rows to banked adapters can never serve the wrong adapter: a routing made before a removal is
stale and raises (its slot may hold another adapter by then), and the routing of an ``adapter_ids`` block
belongs to its thread alone."""

import os
import subprocess
import sys
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
    """The model with adapter ``name`` as every layer's own adapter (None: the base), whatever the routing."""
    with torch.no_grad(), vera_kernels.adapter_ids(model, None):
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


def test_a_model_compiled_in_place_refuses_per_thread_routing():
    # nn.Module.compile() compiles in place (the module stays the same object): its forward would ignore the
    # block and serve each layer's own adapter.
    model, _ = _server()
    model.compile()
    with pytest.raises(TypeError, match="the model is compiled .*set_adapter_ids"):
        with vera_kernels.adapter_ids(model, ["fr"]):
            pass
    model, _ = _server()
    model.o.compile()  # one compiled submodule is enough to serve it unrouted
    with pytest.raises(TypeError, match="its module 'o' is compiled"):
        vera_kernels.adapter_ids(model, ["fr"])
    model, _ = _server()
    model.o = torch.compile(model.o)  # an OptimizedModule inside the model
    with pytest.raises(TypeError, match="its module 'o' is compiled"):
        vera_kernels.adapter_ids(model, ["fr"])
    assert vera_kernels.routing.ROUTES.get() is None


def _edit_after_routing(backend):
    model, adapters = _server(backend)
    x = torch.randn(3, DIM, device=DEVICE)
    ids = torch.tensor([0, 1, -1], device=DEVICE)
    with torch.no_grad():
        vera_kernels.set_adapter_ids(model, ids)
        expected = torch.cat([_alone(model, adapters, name, x[i:i + 1]) for i, name in enumerate(["fr", "de", None])])
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        for value in (10**6, 5, -5, 2**40):
            ids[1] = value
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        for _, layer in vera_layers(model):
            layer.remove_adapter("de")
        ids[1] = 1  # the removed slot
        with pytest.raises(RuntimeError, match="routing was set before an adapter was removed"):
            model(x)


@pytest.mark.parametrize("backend", backend_params("torch", "cpu", "triton"))
def test_routing_owns_the_ids_it_checked(backend):
    # Editing the caller's tensor after set_adapter_ids changes nothing: no out-of-range read (10**6 crashed
    # the triton backend, 5 read garbage), no id -5 served as the base, no removed slot served as the base.
    if backend != "triton":
        _edit_after_routing(backend)
        return
    # In a subprocess: an out-of-range read may crash the process, which must fail this test, not pytest.
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(tests), tests])}
    if DEVICE == "cpu":
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-c", "import test_routing; test_routing._edit_after_routing('triton')"],
                          env=env, cwd=os.path.dirname(tests), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-3000:]}"


def test_routing_again_writes_into_the_ids_the_layers_route_by():
    # Same shape: the new ids land in the routing's own tensor (a captured CUDA graph reads that one).
    model, adapters = _server()
    x = torch.randn(2, DIM, device=DEVICE)
    with torch.no_grad():
        vera_kernels.set_adapter_ids(model, ["fr", "de"])
        owned = [layer._routing.ids for _, layer in vera_layers(model)]
        vera_kernels.set_adapter_ids(model, torch.tensor([1, -1], device=DEVICE))
        assert all(layer._routing.ids is t for (_, layer), t in zip(vera_layers(model), owned))
        expected = torch.cat([_alone(model, adapters, "de", x[:1]), _alone(model, adapters, None, x[1:])])
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        vera_kernels.set_adapter_ids(model, [0, 0, 1])  # another shape: a new tensor
        assert model(torch.randn(3, DIM, device=DEVICE)).shape == (3, DIM)


@pytest.mark.parametrize("route", ["set_adapter_ids", "adapter_ids"])
def test_ids_that_are_not_ids_are_refused(route):
    model, _ = _server()
    call = getattr(vera_kernels, route)
    bad = {
        "a dict": ({"fr": 0, "de": 1}, TypeError, "got dict"),  # iterable: its keys would route the rows
        "a set": ({0, 1}, TypeError, "got set"),
        "a str": ("fr", TypeError, "got str"),
        "an int": (3, TypeError, "got int"),
        "meta ids": (torch.tensor([0, 1], device="meta"), ValueError, "ids are on the meta device"),
        "sparse ids": (torch.tensor([0, 1]).to_sparse(), TypeError, "dense"),
    }
    for what, (ids, error, pattern) in bad.items():
        with pytest.raises(error, match=f"{route}: .*{pattern}"):
            call(model, ids)
    assert all(layer._routing is None for _, layer in vera_layers(model))  # nothing changed
    assert vera_kernels.routing.ROUTES.get() is None


def test_an_iterator_of_ids_routes_every_layer():
    # Read once, before any layer: each layer used to consume what the one before it left.
    model, adapters = _server()
    x = torch.randn(2, DIM, device=DEVICE)
    with torch.no_grad():
        vera_kernels.set_adapter_ids(model, ["fr", "de"])
        expected = model(x)
        vera_kernels.set_adapter_ids(model, (name for name in ["fr", "de"]))
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        with vera_kernels.adapter_ids(model, iter([0, 1])):
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_interleaved_generators_each_serve_their_own_block():
    # Two streams in one thread, each inside its own block, interleaved: a context is shared by every
    # generator of the thread, so the 'fr' stream used to serve 'de' once the 'de' block was entered.
    model, adapters = _server()
    xs = [torch.randn(2, DIM, device=DEVICE) for _ in range(3)]
    want = {name: [_alone(model, adapters, name, x) for x in xs] for name in ("fr", "de")}

    def stream(name):
        with vera_kernels.adapter_ids(model, [name, name]):
            for x in xs:
                yield model(x)

    with torch.no_grad():
        fr, de = stream("fr"), stream("de")
        got = {"fr": [next(fr)], "de": [next(de)]}
        got["fr"].append(next(fr))
        got["de"] += [next(de), next(de)]
        got["fr"].append(next(fr))
        for generator in (fr, de):  # each leaves its block (fr first: out of entry order)
            with pytest.raises(StopIteration):
                next(generator)
        for name in got:
            for i, y in enumerate(got[name]):
                torch.testing.assert_close(y, want[name][i], rtol=1e-5, atol=1e-6)
    assert vera_kernels.routing.ROUTES.get() is None


def test_a_block_left_out_of_order_keeps_the_other_open():
    model, adapters = _server()
    x = torch.randn(2, DIM, device=DEVICE)

    def holder(name):
        with vera_kernels.adapter_ids(model, [name, name]):
            yield

    with torch.no_grad():
        fr, de = holder("fr"), holder("de")
        next(fr), next(de)
        fr.close()  # fr's block closes first: de's must stay open (a reset to fr's entry state would drop it)
        # The caller is in no block of its own: it is routed by the block of the generator suspended in it,
        # as it would be by a context manager wrapping adapter_ids.
        torch.testing.assert_close(model(x), _alone(model, adapters, "de", x), rtol=1e-5, atol=1e-6)
        de.close()
        assert vera_kernels.routing.ROUTES.get() is None


def test_wrapped_and_nested_blocks():
    import contextlib

    model, adapters = _server()
    x = torch.randn(2, DIM, device=DEVICE)

    @contextlib.contextmanager
    def serving(name):  # a wrapper: its generator is suspended inside the block while the caller runs
        with vera_kernels.adapter_ids(model, [name, name]):
            yield

    with torch.no_grad():
        with serving("fr"):
            torch.testing.assert_close(model(x), _alone(model, adapters, "fr", x), rtol=1e-5, atol=1e-6)
            with vera_kernels.adapter_ids(model, ["de", None]):  # nested: the inner block wins
                want = torch.cat([_alone(model, adapters, "de", x[:1]), _alone(model, adapters, None, x[1:])])
                torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(model(x), _alone(model, adapters, "fr", x), rtol=1e-5, atol=1e-6)
        with vera_kernels.adapter_ids(model, ["de", "de"]):
            with serving("fr"):  # a wrapper nested in a block: entered later from the same frame, it wins
                torch.testing.assert_close(model(x), _alone(model, adapters, "fr", x), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(model(x), _alone(model, adapters, "de", x), rtol=1e-5, atol=1e-6)
        with contextlib.ExitStack() as stack:
            stack.enter_context(vera_kernels.adapter_ids(model, ["de", "de"]))
            torch.testing.assert_close(model(x), _alone(model, adapters, "de", x), rtol=1e-5, atol=1e-6)
        block = vera_kernels.adapter_ids(model, ["fr", "fr"])
        with block:
            with pytest.raises(RuntimeError, match="entered once"):
                with block:
                    pass
    assert vera_kernels.routing.ROUTES.get() is None


def test_a_task_started_inside_a_block_inherits_it():
    import asyncio

    model, adapters = _server()
    x = torch.randn(2, DIM, device=DEVICE)

    async def child():
        with torch.no_grad():
            return model(x)

    async def main():
        with vera_kernels.adapter_ids(model, ["de", "de"]):
            return await asyncio.create_task(child())

    torch.testing.assert_close(asyncio.run(main()), _alone(model, adapters, "de", x), rtol=1e-5, atol=1e-6)


def test_routing_a_compiled_model_again_needs_no_recompilation():
    # set_adapter_ids writes new ids of the same shape into the routing's own tensor, which the compiled
    # model reads (the way to change a compiled or graph-captured model's routing between steps).
    model, adapters = _server(backend="torch")
    x = torch.randn(3, DIM, device=DEVICE)
    torch._dynamo.reset()
    with torch.no_grad():
        vera_kernels.set_adapter_ids(model, [0, 1, -1])
        model(x)  # eager first: the plans
        compiled = torch.compile(model, backend="eager")
        with torch._dynamo.config.patch(error_on_recompile=True):
            for names in (["fr", "de", None], ["de", "de", "fr"], [None, "fr", "fr"]):
                vera_kernels.set_adapter_ids(model, torch.tensor([-1 if n is None else model.q.adapters[n] for n in names],
                                                                 device=DEVICE))
                want = torch.stack([_alone(model, adapters, name, x[i]) for i, name in enumerate(names)])
                torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-6)
