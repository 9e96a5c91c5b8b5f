"""Serving under CUDA graphs: a decode step with the adapter bank and per-row ids captured by
torch.compile(mode="reduce-overhead") and by a manual torch.cuda.graph capture, replayed with new inputs and
new ids (set_adapter_ids writes them into the routing's own ids tensor, which the capture reads), equal to
the eager step. GPU only; on CPU,
tests/test_no_host_sync.py stands in (no path reads a device value back, which is what breaks a capture).
"""

import pytest
import torch
from torch import nn

import vera_kernels as vk

from conftest import backend_params

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

DIM, HIDDEN, RANK, BATCH, ADAPTERS = 64, 96, 16, 8, 5


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.o = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.up, self.down = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)

    def forward(self, x):
        x = x + self.o(torch.tanh(self.q(x)))
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def _server(backend):
    torch.manual_seed(0)
    model = vk.apply_vera(Block(), ["q", "o", "up", "down"], rank=RANK, backend=backend).cuda().eval()
    for i in range(ADAPTERS):
        for _, layer in vk.vera_layers(model):
            layer.add_adapter(f"a{i}", torch.randn(RANK), torch.randn(layer.out_features))
    return model


def _steps():
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(BATCH, DIM, generator=g).cuda()
        ids = torch.randint(-1, ADAPTERS, (BATCH,), generator=g).cuda()
        yield x, ids


@pytest.mark.parametrize("backend", backend_params("cuda", "triton"))
def test_manual_capture_of_a_decode_step(backend):
    model = _server(backend)
    static_x = torch.zeros(BATCH, DIM, device="cuda")
    # Checked now; the routing keeps its own copy of the ids, which the capture reads.
    vk.set_adapter_ids(model, torch.zeros(BATCH, dtype=torch.int64, device="cuda"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):  # warm-up outside the capture: plans, projections, Triton autotuning
            model(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_y = model(static_x)
    for x, ids in _steps():
        static_x.copy_(x)
        vk.set_adapter_ids(model, ids)  # as many ids: written into the tensor the capture reads
        graph.replay()
        torch.cuda.synchronize()
        with torch.no_grad():
            expected = model(x)  # the eager step, routed to the same ids
        torch.testing.assert_close(static_y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params("cuda", "triton"))
def test_reduce_overhead_compile_serves_the_bank(backend):
    torch._dynamo.reset()
    model = _server(backend)
    vk.set_adapter_ids(model, torch.zeros(BATCH, dtype=torch.int64, device="cuda"))
    with torch.no_grad():
        model(torch.zeros(BATCH, DIM, device="cuda"))  # eager first: plans and projections for the device
    compiled = torch.compile(model, mode="reduce-overhead")
    for x, ids in _steps():
        vk.set_adapter_ids(model, ids)  # written into the routing's own ids tensor: no recompilation
        with torch.no_grad():
            got = compiled(x).clone()
            expected = model(x)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _layer(backend):
    torch.manual_seed(0)
    return vk.FusedVeRALinear.from_linear(nn.Linear(DIM, HIDDEN).cuda(), RANK, backend=backend).eval()


@pytest.mark.parametrize("backend", backend_params("cuda", "triton"))
def test_larger_eager_calls_after_a_capture_leave_the_graphs_buffers_alone(backend):
    # Eager calls at a larger M grow (and free) the cached workspaces; the graph captured at a small M must
    # keep its own (tests/test_capture_safety.py checks the rule on CPU).
    layer = _layer(backend)
    static_x = torch.randn(4, DIM, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            layer(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_y = layer(static_x)
    with torch.no_grad():
        for m in (300, 2000):
            layer(torch.randn(m, DIM, device="cuda"))
        for _ in range(3):
            x = torch.randn(4, DIM, device="cuda")
            static_x.copy_(x)
            graph.replay()
            torch.cuda.synchronize()
            torch.testing.assert_close(static_y, layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params("triton"))
def test_a_capture_never_autotunes(backend):
    # A shape never run eagerly: the capture takes the first candidate config (compiled beforehand here, as
    # a capture should not compile either) with one warning naming the shape, and replays correctly.
    from vera_kernels.triton import autotune

    layer = _layer(backend)
    with torch.no_grad():
        layer(torch.randn(7, DIM, device="cuda"))  # the projections and the plan, at another M
        x = torch.randn(48, DIM, device="cuda")
        with autotune.untuned():
            expected = layer(x)  # compiles the first candidates, tunes nothing
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with pytest.warns(RuntimeWarning, match="untuned shape during a CUDA graph capture"):
            with torch.cuda.graph(graph):
                static_y = layer(x)
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(static_y, expected, rtol=0, atol=0)
