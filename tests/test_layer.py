"""FusedVeRALinear and VeRAWrapper against a float64 computation on the same projections."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vera_kernels
from conftest import DEVICE, backend_params
from vera_kernels import FusedVeRALinear, VeRAWrapper, ops
from vera_kernels.verify import relative_error

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def randomize_lambdas(layer, generator_seed=0):
    g = torch.Generator().manual_seed(generator_seed)
    with torch.no_grad():  # drawn on the CPU: the same values whatever the layer's device
        layer.lambda_d.copy_(torch.randn(layer.lambda_d.shape, generator=g))
        layer.lambda_b.copy_(torch.randn(layer.lambda_b.shape, generator=g))
    return layer


def float64_vera(x, weight, bias, seed, rank, max_in, max_out, lambda_d, lambda_b):
    """The layer's math written out in float64 on the scheme's fp32 projections (exact in float64)."""
    A, B = vera_kernels.get_projections(seed, rank, max_in, max_out)
    A, B = A[:, : weight.shape[1]].double(), B[: weight.shape[0]].double()
    y = x.double() @ weight.double().t() + lambda_b.double() * ((lambda_d.double() * (x.double() @ A.t())) @ B.t())
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("backend", ["auto", *backend_params()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_float64(dtype, bias, backend):
    torch.manual_seed(1)
    linear = nn.Linear(40, 24, bias=bias).to(device=DEVICE, dtype=dtype)
    layer = FusedVeRALinear.from_linear(linear, rank=9, seed=3, max_in=50, max_out=30, backend=backend)
    randomize_lambdas(layer)
    assert layer.lambda_d.dtype == layer.lambda_b.dtype == torch.float32  # whatever the base dtype
    x = torch.randn(2, 7, 40, device=DEVICE).to(dtype).requires_grad_(True)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 7, 24)
    grad = torch.randn_like(y)
    y.backward(grad)

    x64 = x.detach().double().requires_grad_(True)
    d64 = layer.lambda_d.detach().double().requires_grad_(True)
    b64 = layer.lambda_b.detach().double().requires_grad_(True)
    # The layer runs its GEMMs on the projections in the base dtype (the scheme's values, rounded once).
    A, B = (t.double() for t in vera_kernels.get_projections(3, 9, 50, 30, dtype=dtype, device=DEVICE))
    want = x64 @ linear.weight.double().t() + b64 * ((d64 * (x64 @ A[:, :40].t())) @ B[:24].t())
    if bias:
        want = want + linear.bias.double()
    want.backward(grad.double())
    tol = TOLERANCE[dtype]
    assert relative_error(y, want) < tol
    assert relative_error(x.grad, x64.grad) < tol
    assert relative_error(layer.lambda_d.grad, d64.grad) < tol
    assert relative_error(layer.lambda_b.grad, b64.grad) < tol
    assert linear.weight.grad is None and (not bias or linear.bias.grad is None)


def test_from_linear_shares_the_weight_and_starts_as_the_base():
    linear = nn.Linear(20, 12)
    layer = FusedVeRALinear.from_linear(linear, rank=4)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert torch.equal(layer.lambda_d, torch.full((4,), 0.1)) and torch.equal(layer.lambda_b, torch.zeros(12))
    x = torch.randn(5, 20)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-6, atol=1e-6)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lambda_d", "lambda_b"]
    # Nothing random in the state_dict: the projections are regenerated from the seed.
    assert sorted(layer.state_dict()) == ["bias", "lambda_b", "lambda_d", "weight"]


def test_constructor_defaults_and_train_bias():
    layer = FusedVeRALinear(16, 8, dtype=torch.bfloat16)
    assert layer.rank == 256 and layer.weight.dtype == torch.bfloat16 and layer.lambda_d.dtype == torch.float32
    assert layer.projections.seed == 0 and (layer.projections.max_in, layer.projections.max_out) == (16, 8)
    assert layer.bias.requires_grad is False
    trained = FusedVeRALinear(16, 8, rank=4, train_bias=True)
    y = trained(torch.randn(3, 16))
    y.sum().backward()
    torch.testing.assert_close(trained.bias.grad, torch.full((8,), 3.0))


def test_projections_follow_device_and_dtype():
    layer = randomize_lambdas(FusedVeRALinear(16, 8, rank=4, seed=11))
    half = layer.to(torch.float16)  # nn.Module semantics: every floating parameter, lambdas included
    A, B = half._projection_slices(torch.device("cpu"), torch.float16)
    A_want, B_want = vera_kernels.get_projections(11, 4, 16, 8, dtype=torch.float16)
    assert torch.equal(A, A_want) and torch.equal(B, B_want)
    assert half(torch.randn(2, 16, dtype=torch.float16)).dtype == torch.float16


def test_float64_layer_on_the_torch_backend_is_the_oracle():
    torch.manual_seed(2)
    layer = randomize_lambdas(FusedVeRALinear(30, 20, rank=5, seed=9, backend="torch", dtype=torch.float64))
    x = torch.randn(4, 30, dtype=torch.float64)
    want = float64_vera(x, layer.weight, layer.bias, 9, 5, 30, 20, layer.lambda_d, layer.lambda_b)
    assert relative_error(layer(x), want) < 1e-13


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_folds_delta_and_unmerge_restores(dtype, monkeypatch):
    torch.manual_seed(3)
    layer = randomize_lambdas(FusedVeRALinear(24, 16, rank=6, seed=1, dtype=dtype)).eval()
    w0 = layer.weight.detach().clone()
    x = torch.randn(5, 24, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
    A, B = (t.double() for t in vera_kernels.get_projections(1, 6, 24, 16, dtype=dtype))
    delta = (layer.lambda_b.double()[:, None] * B) @ (layer.lambda_d.double()[:, None] * A)
    assert relative_error(layer.delta_weight(), delta) < 1e-6

    layer.merge()
    assert relative_error(layer.weight, w0.double() + delta) < TOLERANCE[dtype]
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    # Merged, the forward is the base alone: no VeRA op runs.
    monkeypatch.setattr(ops, "vera_linear", lambda *a, **k: pytest.fail("merged forward ran the adapter"))
    with torch.no_grad():
        assert relative_error(layer(x), y) < TOLERANCE[dtype]
    layer.train()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(x)
    monkeypatch.undo()

    layer.unmerge()
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    if dtype == torch.float32:
        torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)
    else:  # two roundings to bf16: within one ulp of the larger of W0 and W0 + ΔW
        assert relative_error(layer.weight, w0) < 1e-2


def test_merge_of_conv1d_layout_writes_through_the_transposed_view():
    torch.manual_seed(4)
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(12, 20)  # nf=out, nx=in: weight is in x out
    layer = randomize_lambdas(FusedVeRALinear.from_linear(conv, rank=3)).eval()
    x = torch.randn(4, 20)
    A, B = vera_kernels.get_projections(0, 3, 20, 12)
    with torch.no_grad():
        y = layer(x)
        want = conv(x) + layer.lambda_b * ((layer.lambda_d * (x @ A.t())) @ B.t())
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        layer.merge()
        torch.testing.assert_close(conv(x), y, rtol=1e-5, atol=1e-5)  # the shared weight holds W0 + ΔW


def test_autocast_runs_the_gemms_in_the_autocast_dtype():
    torch.manual_seed(5)
    layer = randomize_lambdas(FusedVeRALinear(32, 16, rank=8))
    x = torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().pow(2).sum().backward()
    grads = layer.lambda_d.grad.clone(), layer.lambda_b.grad.clone()
    layer.zero_grad()
    y32 = layer(x)
    y32.pow(2).sum().backward()
    assert relative_error(y, y32) < 2e-2
    assert layer.lambda_d.grad.dtype == torch.float32
    assert relative_error(grads[0], layer.lambda_d.grad) < 5e-2 and relative_error(grads[1], layer.lambda_b.grad) < 5e-2


def test_dropout_applies_to_the_adapter_input_only_in_training():
    torch.manual_seed(6)
    layer = randomize_lambdas(FusedVeRALinear(20, 10, rank=4, dropout=0.5))
    x = torch.randn(8, 20)
    A, B = layer._projection_slices(x.device, x.dtype)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    x_drop = F.dropout(x, 0.5, training=True)
    want = F.linear(x, layer.weight, layer.bias) + layer.lambda_b * ((layer.lambda_d * (x_drop @ A.t())) @ B.t())
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    layer.eval()
    want_eval = F.linear(x, layer.weight, layer.bias) + layer.lambda_b * ((layer.lambda_d * (x @ A.t())) @ B.t())
    torch.testing.assert_close(layer(x), want_eval, rtol=1e-5, atol=1e-5)


def test_bad_arguments_give_clear_errors():
    layer = FusedVeRALinear(16, 8, rank=4)
    with pytest.raises(ValueError, match="last dimension is 15, expected in_features=16"):
        layer(torch.randn(3, 15))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        FusedVeRALinear(16, 8, rank=0)
    with pytest.raises(TypeError, match="float64 can't run on backend 'cpu'"):  # "auto": the torch backend
        FusedVeRALinear(16, 8, rank=4, dtype=torch.float64, backend="cpu")
    with pytest.raises(TypeError, match="can't run"):
        FusedVeRALinear.from_linear(nn.Linear(4, 4).to(torch.float64), rank=2, backend="cpu")
    with pytest.raises(ValueError, match="backend must be"):
        FusedVeRALinear(16, 8, rank=4, backend="fast")
    with pytest.raises(ValueError, match="dropout"):
        FusedVeRALinear(16, 8, rank=4, dropout=1.0)
    with pytest.raises(ValueError, match="too small"):
        FusedVeRALinear(16, 8, rank=4, max_in=10)
    with pytest.raises(TypeError, match="expected nn.Linear"):
        FusedVeRALinear.from_linear(nn.Conv2d(3, 3, 1), rank=2)
    with pytest.raises(TypeError, match="x's dtype"):  # a bf16 input into an fp32 layer, outside autocast
        layer(torch.randn(3, 16, dtype=torch.bfloat16))


def test_extra_repr_says_what_the_layer_is():
    text = repr(FusedVeRALinear(16, 8, rank=4, seed=5, dropout=0.1, dtype=torch.bfloat16))
    for part in ("in_features=16", "out_features=8", "rank=4", "seed=5", "dropout=0.1", "bfloat16"):
        assert part in text


class ScaledInt8Linear(nn.Module):
    """A stand-in for a quantized layer: int8 weights and a per-row scale, its own forward."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8))
        self.register_buffer("scale", torch.rand(out_features) / 100)

    def forward(self, x):
        return (x @ self.qweight.to(x.dtype).t()) * self.scale.to(x.dtype)


def test_wrapper_adds_the_adapter_to_any_base():
    torch.manual_seed(8)
    base = ScaledInt8Linear(24, 12)
    layer = randomize_lambdas(VeRAWrapper(base, rank=5, seed=2, max_in=30))
    x = torch.randn(3, 24, requires_grad=True)
    y = layer(x)
    y.backward(torch.ones_like(y))
    x64 = x.detach().double().requires_grad_(True)
    d64 = layer.lambda_d.detach().double().requires_grad_(True)
    b64 = layer.lambda_b.detach().double().requires_grad_(True)
    A, B = (t.double() for t in vera_kernels.get_projections(2, 5, 30, 12))
    want = base(x64) + b64 * ((d64 * (x64 @ A[:, :24].t())) @ B.t())
    want.backward(torch.ones_like(want))
    assert relative_error(y, want) < 1e-5
    for got, ref in ((x.grad, x64.grad), (layer.lambda_d.grad, d64.grad), (layer.lambda_b.grad, b64.grad)):
        assert relative_error(got, ref) < 1e-5
    with pytest.raises(TypeError, match="ScaledInt8Linear"):
        layer.merge()
    with pytest.raises(TypeError, match="in_features/out_features"):
        VeRAWrapper(nn.ReLU(), rank=2)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(9)
    model = nn.Sequential(
        FusedVeRALinear(16, 32, rank=8, seed=1, max_in=32, max_out=32),
        nn.GELU(),
        FusedVeRALinear(32, 32, rank=8, seed=1),
        nn.GELU(),
        FusedVeRALinear(32, 8, rank=8, seed=1, max_out=32),
    )
    for layer in model[::2]:
        randomize_lambdas(layer)
    x = torch.randn(2, 5, 16)
    eager = model(x)
    eager.pow(2).sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break raises
    out = compiled(x)
    out.pow(2).sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for got, want in zip((p.grad for p in model.parameters() if p.requires_grad), eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_0d_input_is_refused_by_name():
    # Regression: a 0-d input gave IndexError from inside the layer.
    from vera_kernels import VeRAWrapper

    for layer in (FusedVeRALinear(4, 3, rank=2), VeRAWrapper(nn.Linear(4, 3), rank=2)):
        with pytest.raises(ValueError, match=r"input must be a tensor of shape \(\.\.\., 4\), got a 0-d tensor"):
            layer(torch.tensor(1.0))
    with pytest.raises(ValueError, match="x: expected a tensor of shape"):
        vera_kernels.vera_linear(torch.tensor(1.0), torch.zeros(3, 1), None, torch.zeros(2, 1), torch.zeros(3, 2),
                                 torch.zeros(2), torch.zeros(3))


def test_double_after_adapting_runs_the_float64_oracle():
    # Regression: model.double() (float64 is the oracle's dtype; PEFT runs it) broke the forward: "auto"
    # picked the cpu backend, which has no float64. In float64 "auto" is the torch backend.
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(30, 20), nn.GELU(), nn.Linear(20, 20))
    vera_kernels.apply_vera(model, ["0", "2"], rank=5, seed=9)
    for _, layer in vera_kernels.vera_layers(model):
        randomize_lambdas(layer)
    model.double()
    layer = model[0]
    assert layer.weight.dtype == layer.lambda_d.dtype == torch.float64  # widening loses nothing
    x = torch.randn(4, 30, dtype=torch.float64, requires_grad=True)
    want = float64_vera(x, layer.weight, layer.bias, 9, 5, 30, 20, layer.lambda_d, layer.lambda_b)
    assert relative_error(layer(x), want) < 1e-13
    model(x).sum().backward()
    assert x.grad.dtype == torch.float64 and layer.lambda_d.grad.dtype == torch.float64
    assert FusedVeRALinear(8, 4, rank=2, dtype=torch.float64)(torch.randn(3, 8, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("cast", ["to_bf16", "half"])
def test_casting_the_model_keeps_the_lambdas_fp32(cast):
    # Regression: model.to(torch.bfloat16) cast the lambdas too (the README says they stay fp32); then
    # lambda_d = 0.1 does not move under AdamW at lr 1e-4 (0.1 + 1e-4 rounds back to 0.1 in bf16).
    model = nn.Sequential(nn.Linear(16, 8))
    vera_kernels.apply_vera(model, ["0"], rank=4)
    layer = model[0]
    layer.add_adapter("other", torch.full((4,), 0.3), torch.full((8,), 0.7))
    d, b = layer.lambda_d, layer.lambda_b
    model = model.to(torch.bfloat16) if cast == "to_bf16" else model.half()
    dtype = torch.bfloat16 if cast == "to_bf16" else torch.float16
    assert layer.weight.dtype == dtype
    assert layer.lambda_d is d and layer.lambda_b is b  # the same Parameters an optimizer may hold
    assert layer.lambda_d.dtype == layer.lambda_b.dtype == layer._bank_d.dtype == layer._bank_b.dtype == torch.float32
    assert torch.equal(layer.lambda_d, torch.full((4,), 0.1)) and torch.equal(layer._bank_d[0], torch.full((4,), 0.3))
    optimizer = torch.optim.AdamW([layer.lambda_d, layer.lambda_b], lr=1e-4)
    model(torch.randn(5, 16, dtype=dtype)).float().pow(2).sum().backward()
    assert layer.lambda_d.grad.dtype == torch.float32
    optimizer.step()
    assert not torch.equal(layer.lambda_d, torch.full((4,), 0.1))
    model.double()  # widening follows the module
    assert layer.lambda_d.dtype == torch.float64


@pytest.mark.parametrize("change", ["deepcopy", "double"])
def test_torch_compile_fullgraph_right_after_deepcopy_or_double(change):
    # Regression: a deep copy (or .double()) left the projections or the backend unresolved for the new
    # copy/dtype, so a compiled forward hit Dynamo's "function marked as skipped" unless the model had been
    # called eagerly first.
    import copy

    torch._dynamo.reset()
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))
    vera_kernels.apply_vera(model, ["0", "2"], rank=4, seed=2)
    for _, layer in vera_kernels.vera_layers(model):
        randomize_lambdas(layer)
    model = copy.deepcopy(model) if change == "deepcopy" else model.double()
    dtype = torch.float64 if change == "double" else torch.float32
    x = torch.randn(3, 16, dtype=dtype)
    compiled = torch.compile(model, fullgraph=True)  # no eager call before: any graph break raises
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, model(x))


@pytest.mark.parametrize("cast", ["half", "bfloat16"])
def test_a_narrowing_cast_after_a_backward_completes(cast):
    # Regression: with .grad on the lambdas, model.half() raised "assign a gradient with dtype Half to ...
    # Float" halfway, leaving lambda_b (and its grad) fp16 and lambda_d fp32.
    model = nn.Sequential(nn.Linear(16, 8))
    vera_kernels.apply_vera(model, ["0"], rank=4)
    layer = model[0]
    randomize_lambdas(layer)
    model(torch.randn(5, 16)).square().sum().backward()
    grad_d, grad_b = layer.lambda_d.grad.clone(), layer.lambda_b.grad.clone()
    getattr(model, cast)()
    dtype = torch.float16 if cast == "half" else torch.bfloat16
    assert layer.weight.dtype == dtype
    assert layer.lambda_d.dtype == layer.lambda_b.dtype == torch.float32
    assert torch.equal(layer.lambda_d.grad, grad_d) and torch.equal(layer.lambda_b.grad, grad_b)
    model(torch.randn(5, 16, dtype=dtype)).float().square().sum().backward()  # trains on
    assert layer.lambda_b.grad.dtype == torch.float32


def test_a_cast_that_fails_leaves_the_lambdas_as_they_were():
    layer = FusedVeRALinear(8, 6, rank=4)
    randomize_lambdas(layer)
    layer(torch.randn(3, 8)).square().sum().backward()
    d, b, grad_d = layer.lambda_d, layer.lambda_b, layer.lambda_d.grad.clone()

    def fails_on_the_weight(t):
        if t is layer.weight:
            raise RuntimeError("no room")
        return t.double()

    with pytest.raises(RuntimeError, match="no room"):
        layer._apply(fails_on_the_weight)
    assert layer.lambda_d is d and layer.lambda_b is b
    assert d.dtype == b.dtype == d.grad.dtype == torch.float32 and torch.equal(d.grad, grad_d)


@pytest.mark.parametrize("value, error, words", [
    (float("nan"), ValueError, "d_initial must be a finite number, got nan"),
    (float("-inf"), ValueError, "d_initial must be a finite number, got -inf"),
    ("abc", TypeError, "d_initial must be a finite number .*got str 'abc'"),
    (None, TypeError, "d_initial must be a finite number .*got NoneType"),
])
def test_d_initial_is_a_finite_number_and_errors_name_it(value, error, words):
    # Regression: d_initial=nan was accepted (every output NaN once b moves); 'abc' gave float()'s error
    # without the argument's name.
    with pytest.raises(error, match=words):
        FusedVeRALinear(8, 6, rank=4, d_initial=value)
    with pytest.raises(error, match=words):
        VeRAWrapper(nn.Linear(8, 6), rank=4, d_initial=value)
    with pytest.raises(TypeError, match="dropout must be a finite number"):
        FusedVeRALinear(8, 6, rank=4, dropout="0.1")
    assert FusedVeRALinear(8, 6, rank=4, d_initial=1).d_initial == 1.0


def test_max_in_and_max_out_are_limited_where_the_scheme_is():
    # Regression: max_in=2**40 was accepted by the layer, and save_adapter then wrote a file load_adapter refused.
    with pytest.raises(ValueError, match="max_in must be <= 17179869184"):
        FusedVeRALinear(8, 6, rank=4, max_in=2**34 + 1)
    with pytest.raises(ValueError, match="max_out must be <= 4294967296"):
        FusedVeRALinear(8, 6, rank=4, max_out=2**40)
    assert FusedVeRALinear(8, 6, rank=4, max_in=2**34, max_out=2**32).projections.max_in == 2**34


@pytest.mark.parametrize("change", ["cpu", "torch"])
def test_setting_the_backend_takes_effect_at_the_next_call(change):
    # Regression: layer.backend = "torch" after the first call was ignored (the cached plan kept the old one).
    if not vera_kernels.backends()["cpu"].available:
        pytest.skip(vera_kernels.backends()["cpu"].reason)
    from vera_kernels import dispatch

    layer = FusedVeRALinear(8, 6, rank=4, backend="torch" if change == "cpu" else "cpu")
    randomize_lambdas(layer)
    x = torch.randn(3, 8)
    layer(x)
    layer.backend = change
    y = layer(x)
    assert layer.backend == change
    assert layer._plans[("linear", x.device, x.dtype)].impl is dispatch.lookup("vera_linear", change, x.device)
    A, B = layer._projection_slices(x.device, x.dtype)
    assert torch.equal(y, ops.vera_linear(x, layer.weight, layer.bias, A, B, layer.lambda_d, layer.lambda_b,
                                          backend=change))
    for bad in ("bogus", None, 3):
        with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
            layer.backend = bad
    assert layer.backend == change


def test_unmerge_takes_out_the_merged_delta_even_after_the_lambdas_changed():
    # Regression: editing the lambdas while merged, then unmerge(), subtracted the new ΔW: W0 was corrupted.
    torch.manual_seed(0)
    layer = FusedVeRALinear(16, 12, rank=4)
    randomize_lambdas(layer)
    w0 = layer.weight.detach().clone()
    layer.merge()
    with torch.no_grad():
        layer.lambda_d.mul_(3.0)
        layer.lambda_b.add_(1.0)
    layer.unmerge()
    assert relative_error(layer.weight, w0) < 1e-6
    x = torch.randn(5, 16)
    want = F.linear(x, w0, layer.bias) + ops.vera_delta(x, *layer._projection_slices(x.device, x.dtype), layer.lambda_d,
                                                         layer.lambda_b, torch.zeros(5, 12), backend="torch")
    assert relative_error(layer(x), want) < 1e-5  # the edited lambdas serve from now on
