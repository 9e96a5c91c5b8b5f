"""No backend keeps state between calls that a change of the adapter could leave stale.

The C++ backends used to cache the folded projection b ⊙ B ⊙ d across calls, keyed on the tensors' version
counters; these scenarios change the vectors without the counter seeing it (or across dtypes it did not
track), and the cached fold kept the old adapter. Each compares a layer on every backend that runs here
with the same state on the `torch` backend (which holds nothing), right after the change. The last test
checks that a model of many layers holds no per-layer fold.
"""

import multiprocessing

import pytest
import torch
from torch import nn

import vera_kernels
from vera_kernels import verify

IN, OUT, RANK, ROWS = 24, 20, 8, 5


def _backend_params():
    """(backend, device) for each backend other than `torch` that can run here, on its device."""
    params = []
    for name in ("cpu", "cuda", "triton"):
        status = vera_kernels.backends()[name]
        devices = [d for d in ("cpu", "cuda") if d in status.devices and (d == "cpu" or torch.cuda.is_available())]
        if name == "triton" and "cuda" in devices:
            devices = ["cuda"]  # (on CPU only under the interpreter)
        runnable = status.available and devices
        params.append(pytest.param(name, devices[0] if runnable else "cpu", id=name,
                                   marks=() if runnable else pytest.mark.skip(reason=status.reason or "no device")))
    return params


BACKENDS = _backend_params()


def _layer(backend, device, cls=vera_kernels.FusedVeRALinear):
    torch.manual_seed(0)
    layer = cls(IN, OUT, rank=RANK, backend=backend, device=device)
    with torch.no_grad():  # a trained-looking adapter: the fresh layer's b = 0 would hide every fold
        layer.lambda_d.uniform_(0.5, 1.5)
        layer.lambda_b.normal_()
    return layer


def _input(device):
    return torch.randn(ROWS, IN, generator=torch.Generator().manual_seed(1)).to(device)


def _agrees_with_torch(layer, x, *, tolerance=1e-5):
    """layer(x) (no_grad, fp32) against a `torch`-backend layer given layer's state as it is now."""
    ref = vera_kernels.FusedVeRALinear(IN, OUT, rank=RANK, backend="torch", device=x.device)
    ref.load_state_dict(layer.state_dict())
    with torch.no_grad():
        got, want = layer(x), ref(x)
    error = verify.relative_error(got, want)
    assert error < tolerance, f"{layer.backend}: relative error {error} against the torch backend"


def _forward(layer, x):
    with torch.no_grad():
        return layer(x)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fused_adamw_steps_then_fp32_forward(backend, device, autocast):
    # An fp32 inference forward first (the old cache kept its fold), then training steps with a fused
    # optimizer, which does not bump the version counters; under autocast the steps' forwards ran in bf16,
    # so an fp32 fold was never dropped.
    layer, x = _layer(backend, device), _input(device)
    _forward(layer, x)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.2, fused=True)
    for _ in range(2):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            loss = layer(x).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    _agrees_with_torch(layer, x)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_no_grad_forward_between_backward_and_fused_step(backend, device):
    # An evaluation forward between backward() and step() (a metric, a logging hook) used to fold the old
    # vectors again after the backward dropped them; the fused step then changed them unseen.
    layer, x = _layer(backend, device), _input(device)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.2, fused=True)
    layer(x).square().mean().backward()
    _forward(layer, x)
    optimizer.step()
    _agrees_with_torch(layer, x)


@pytest.mark.parametrize("cls", [vera_kernels.FusedVeRALinear, None], ids=["fused", "wrapper"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_data_edit(backend, device, cls):
    # An EMA-style update through .data: the alias has a version counter of its own.
    if cls is None:  # the vera_delta path (VeRAWrapper around a base module)
        layer = vera_kernels.VeRAWrapper(nn.Linear(IN, OUT, device=device), rank=RANK, backend=backend)
        with torch.no_grad():
            layer.lambda_d.uniform_(0.5, 1.5)
            layer.lambda_b.normal_()
        ref = vera_kernels.VeRAWrapper(nn.Linear(IN, OUT, device=device), rank=RANK, backend="torch")
    else:
        layer, ref = _layer(backend, device), None
    x = _input(device)
    _forward(layer, x)
    layer.lambda_b.data.mul_(0.5).add_(1)
    layer.lambda_d.data.mul_(0.5).add_(1)
    if ref is None:
        _agrees_with_torch(layer, x)
    else:
        ref.load_state_dict(layer.state_dict())
        assert verify.relative_error(_forward(layer, x), _forward(ref, x)) < 1e-5


def _edit_shared(lambda_d, lambda_b):
    # In the child: its own tensor objects over the parent's shared memory.
    with torch.no_grad():
        lambda_d.mul_(-2.0)
        lambda_b.add_(3.0)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[1] == "cpu"])
def test_shared_memory_update_from_another_process(backend, device):
    # Lambdas in shared memory (as Hogwild-style training or a parameter server keeps them), changed by
    # another process: nothing in this process sees a write, the next forward must still use the new values.
    layer, x = _layer(backend, device), _input(device)
    layer.share_memory()
    before = _forward(layer, x)
    child = multiprocessing.get_context("fork").Process(target=_edit_shared, args=(layer.lambda_d, layer.lambda_b))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert not torch.equal(_forward(layer, x), before)  # the child's edit is visible here
    _agrees_with_torch(layer, x)


@pytest.mark.parametrize("assign", [False, True], ids=["copy", "assign"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_load_state_dict(backend, device, assign):
    layer, x = _layer(backend, device), _input(device)
    _forward(layer, x)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["lambda_b"].normal_()
    state["lambda_d"].uniform_(-1, 1)
    layer.load_state_dict(state, assign=assign)
    _agrees_with_torch(layer, x)


@pytest.mark.parametrize("how", ["new_parameter", "swap_tensors", "set_data", "between_layers", "rewrap_data"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_parameter_swap(backend, device, how):
    layer, x = _layer(backend, device), _input(device)
    other = _layer(backend, device)
    with torch.no_grad():
        other.lambda_b.normal_()
        other.lambda_d.uniform_(-1, 1)
    _forward(layer, x)
    _forward(other, x)
    if how == "new_parameter":
        layer.lambda_b = nn.Parameter(other.lambda_b.detach().clone())
    elif how == "swap_tensors":
        torch.utils.swap_tensors(layer.lambda_b, nn.Parameter(other.lambda_b.detach().clone()))
    elif how == "set_data":
        layer.lambda_d.data = other.lambda_d.detach().clone()
    elif how == "rewrap_data":
        # A new Parameter over the old one's memory, edited through .data first: same storage, same data
        # pointer, and a version count equal to the old Parameter's.
        data = layer.lambda_b.data
        data.mul_(-0.5)
        layer.lambda_b = nn.Parameter(data)
    else:  # the two layers exchange their vectors
        layer.lambda_d, other.lambda_d = other.lambda_d, layer.lambda_d
        layer.lambda_b, other.lambda_b = other.lambda_b, layer.lambda_b
        _agrees_with_torch(other, x)
    _agrees_with_torch(layer, x)


def _retained_cpu_bytes(fn) -> int:
    """Bytes that torch's CPU allocator handed out while fn ran, less those it took back: what fn left held.
    Every allocation and free of tensor memory is recorded by the profiler, each under the event it
    happened in (an op's own, or a bare "[memory]" event outside any op)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.self_cpu_memory_usage for e in prof.events())


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] == "cpu"])
def test_many_layers_hold_no_fold(backend, device):
    # A model of 300 adapted layers: after an inference forward through all of them, and after a training
    # step, none of the memory their calls allocated is still held, so what the model holds does not grow
    # with the layer count (the old cache kept one out x r fold per layer for as long as the layer lived).
    width, rank = 64, 32
    x = torch.randn(3, width)

    def train(stack):
        stack(x).square().mean().backward()
        for p in stack.parameters():
            p.grad = None

    held = {}
    for layers in (30, 300):
        torch.manual_seed(0)
        stack = nn.Sequential(*[vera_kernels.FusedVeRALinear(width, width, rank=rank, backend=backend)
                                for _ in range(layers)])
        for layer in stack:
            with torch.no_grad():
                layer.lambda_b.normal_(std=0.1)
        train(stack)  # what a layer's first call sets up for good (its checked plan), outside the measure
        held[layers] = (_retained_cpu_bytes(lambda: _forward(stack, x)), _retained_cpu_bytes(lambda: train(stack)))
    fold_bytes = width * rank * 4
    assert held[300] == held[30] and all(abs(n) < fold_bytes for n in held[300]), held
