"""Quantized bases with the real libraries on CPU (each case skipped where its library is not installed):
bitsandbytes 4-bit (nf4, fp4) and 8-bit, torchao int8, int4 and float8 weight-only, HQQ, and optimum-quanto int4
(a forward-only format: no merge, as GPTQ/AWQ). A quantized base goes through VeRAWrapper (its own forward
plus vera_delta); its outputs and gradients equal the float64 reference of the dequantized weight plus the
adapter; merge re-quantizes with the format's own quantizer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vera_kernels as vk
from vera_kernels import quantized
from vera_kernels.layer import FusedVeRALinear, VeRAWrapper

IN, HIDDEN = 64, 128  # bitsandbytes 4-bit on CPU (eval) wants out a multiple of 32 and in of its block size (64)
MERGEABLE = ["nf4", "fp4", "bnb8", "torchao_int8", "torchao_int4", "torchao_fp8", "hqq"]
FORMATS = MERGEABLE + ["quanto_int4"]


def _quantize(linear: nn.Linear, fmt: str):
    """(the quantized module holding ``linear``'s weight and bias, the torchao config or None)."""
    weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
    if fmt in ("nf4", "fp4"):
        bnb = pytest.importorskip("bitsandbytes")
        module = bnb.nn.Linear4bit(linear.in_features, linear.out_features, compute_dtype=torch.float32, quant_type=fmt)
        module.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=fmt)
        module.bias = nn.Parameter(bias, requires_grad=False)
        return module.to("cpu"), None
    if fmt == "bnb8":
        bnb = pytest.importorskip("bitsandbytes")
        module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_fp16_weights=False)
        module.load_state_dict({"weight": weight, "bias": bias})
        return module.to("cpu"), None
    if fmt.startswith("torchao"):
        pytest.importorskip("torchao")
        import torchao.quantization as tq

        module = copy.deepcopy(linear)
        # Int4WeightOnlyConfig has no CPU kernel in torchao 0.18: int4 weight-only on CPU is IntxWeightOnlyConfig.
        config = {"torchao_int8": tq.Int8WeightOnlyConfig(), "torchao_fp8": tq.Float8WeightOnlyConfig(),
                  "torchao_int4": tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerGroup(32))}[fmt]
        tq.quantize_(module, config)
        return module, config
    if fmt == "hqq":
        hqq = pytest.importorskip("hqq.core.quantize")
        config = hqq.BaseQuantizeConfig(nbits=4, group_size=32)
        return hqq.HQQLinear(copy.deepcopy(linear), config, compute_dtype=torch.float32, device="cpu"), None
    if fmt == "quanto_int4":
        quanto = pytest.importorskip("optimum.quanto")
        holder = nn.Sequential(copy.deepcopy(linear))
        quanto.quantize(holder, weights=quanto.qint4)
        quanto.freeze(holder)
        return holder[0], None
    raise AssertionError(fmt)


def _dequantized(module):
    if type(module).__module__.startswith("optimum.quanto"):
        return module.weight.dequantize()  # quanto's own: this package merges nothing into it
    return quantized.dequantized_weight(module)


class Model(nn.Module):
    """Two quantized layers around a plain nn.Linear head (fused), as a quantized model's blocks are."""

    def __init__(self, fmt, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.up, self.config = _quantize(nn.Linear(IN, HIDDEN), fmt)
        self.down, _ = _quantize(nn.Linear(HIDDEN, IN), fmt)
        self.head = nn.Linear(IN, 32)

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(x))))


def _adapted(fmt, seed=0, lambdas=True):
    model = Model(fmt, seed)
    vk.apply_vera(model, ["up", "down", "head"], rank=8, quantization_config=model.config)
    if lambdas:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for _, layer in vk.vera_layers(model):
                layer.lambda_d.copy_(torch.rand(layer.rank, generator=generator) + 0.5)
                layer.lambda_b.copy_(torch.randn(layer.out_features, generator=generator) * 0.5)
    return model


def _reference(model, x, lambdas=None):
    """float64: each layer as x (W + ΔW)ᵀ + bias, W the dequantized base weight, ΔW = (b ⊙ B)(d ⊙ A) from
    ``lambdas`` (name -> float64 (d, b); default: the layers' own)."""

    def layer(name, h):
        module = getattr(model, name)
        if isinstance(module, VeRAWrapper):
            weight, bias = _dequantized(module.base_layer), module.base_layer.bias
        else:
            weight, bias = module.weight, module.bias
        d, b = lambdas[name] if lambdas else (module.lambda_d.double(), module.lambda_b.double())
        A, B = (p.double() for p in module._projection_slices(torch.device("cpu"), torch.float32))
        return h @ weight.double().t() + b * ((d * (h @ A.t())) @ B.t()) + bias.double()

    return layer("head", layer("down", torch.relu(layer("up", x.double()))))


def _base_state(model):
    """Every base tensor, as plain tensors (a torchao weight by the tensors it is made of)."""

    def plain(t):
        if hasattr(t, "__tensor_flatten__") and not quantized.is_plain_tensor(t):
            names, _ = t.__tensor_flatten__()
            return tuple(plain(getattr(t, name)) for name in names)
        return t.detach().clone()

    return {k: plain(v) for k, v in model.state_dict().items() if "lambda" not in k}


def _equal(a, b):
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_bases_are_wrapped_and_plain_linears_fused(fmt):
    model = _adapted(fmt)
    assert isinstance(model.up, VeRAWrapper) and isinstance(model.down, VeRAWrapper)
    assert type(model.up.base_layer) is type(Model(fmt).up)
    assert isinstance(model.head, FusedVeRALinear)
    # torchao's quantized layer is an nn.Linear whose weight is a tensor subclass: the weight decides.
    if fmt.startswith("torchao"):
        assert type(model.up.base_layer) is nn.Linear
    model(torch.randn(3, IN))  # torchao int8 used to crash here (the fused op over an Int8Tensor)


@pytest.mark.parametrize("fmt", FORMATS)
def test_forward_and_gradients_match_the_dequantized_reference(fmt):
    model = _adapted(fmt)
    x = torch.randn(2, 5, IN, requires_grad=True)
    y = model(x)
    # The reference's leaves: x and every layer's lambdas in float64.
    x64 = x.detach().double().requires_grad_(True)
    lambdas = {name: tuple(getattr(model, name).get_parameter(v).detach().double().requires_grad_(True)
                           for v in ("lambda_d", "lambda_b")) for name in ("up", "down", "head")}
    ref = _reference(model, x64, lambdas)
    tol = 1e-5  # fp32 rounding: the base's kernels compute with the dequantized weight
    assert torch.isfinite(y).all() and (y.double() - ref).abs().max().item() <= tol * ref.abs().max().item()
    grad = torch.randn_like(y)
    y.backward(grad)
    ref.backward(grad.double())
    assert (x.grad.double() - x64.grad).abs().max().item() <= tol * x64.grad.abs().max().item()
    for name, (d64, b64) in lambdas.items():
        layer = getattr(model, name)
        for ours, theirs in ((layer.lambda_d.grad, d64.grad), (layer.lambda_b.grad, b64.grad)):
            assert torch.isfinite(ours).all()
            assert (ours.double() - theirs).abs().max().item() <= tol * theirs.abs().max().item(), name
    for name, parameter in model.named_parameters():
        if "lambda" not in name:
            assert parameter.grad is None and not parameter.requires_grad, name


@pytest.mark.parametrize("fmt", FORMATS)
def test_serving_matches_the_dequantized_reference(fmt):
    model = _adapted(fmt).eval()
    x = torch.randn(7, IN)
    with torch.no_grad():
        y = model(x)
        # Served on a CPU with AVX512-BF16, bitsandbytes 4-bit repacks its weight and computes in bf16;
        # bitsandbytes 8-bit serves with int8 activations (LLM.int8): the format's own rounding, as PEFT's.
        state = getattr(getattr(model.up.base_layer, "weight", None), "quant_state", None)
        repacked = getattr(state, "packing_format_for_cpu", False)
        ref = _reference(model, x)
    tol = 2e-2 if repacked or fmt == "bnb8" else 1e-5
    assert torch.isfinite(y).all() and (y.double() - ref).abs().max().item() <= tol * ref.abs().max().item()


@pytest.mark.parametrize("fmt", FORMATS)
def test_training_lowers_the_loss_and_never_touches_the_base(fmt):
    model = _adapted(fmt, lambdas=False)
    before = _base_state(model)
    torch.manual_seed(3)
    x, target = torch.randn(16, IN), torch.randn(16, 32)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(
        f"{layer}.{v}" for layer in ("up", "down", "head") for v in ("lambda_d", "lambda_b"))
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.98, losses
    after = _base_state(model)
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert _equal(after[key], value), key
    assert all(p.grad is None for n, p in model.named_parameters() if "lambda" not in n)


@pytest.mark.parametrize("fmt", FORMATS)
def test_adapter_files_round_trip(fmt, tmp_path):
    model = _adapted(fmt, seed=4)
    path = tmp_path / "adapter.safetensors"
    vk.save_adapter(model, path)
    x = torch.randn(3, IN)
    fresh = Model(fmt, seed=4)  # the same base weights, quantized again
    vk.load_adapter(fresh, path)
    assert isinstance(fresh.up, VeRAWrapper) and isinstance(fresh.head, FusedVeRALinear)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # Into a model that already has the layers: the lambdas are replaced.
    other = _adapted(fmt, seed=4, lambdas=False)
    vk.load_adapter(other, path)
    with torch.no_grad():
        assert torch.equal(other(x), model(x))


def _step(module):
    """The largest gap between neighbouring values of the base's dequantized weight, per row: what one
    re-quantization can move a weight by (at most a step: rounding to the nearest level)."""
    weight = quantized.dequantized_weight(module)
    levels = weight.sort(dim=1).values
    return (levels[:, 1:] - levels[:, :-1]).max(dim=1).values[:, None]


@pytest.mark.parametrize("fmt", MERGEABLE)
def test_merge_unmerge_and_merge_and_unload(fmt):
    model = _adapted(fmt).eval()
    layer = model.up
    base_type = type(layer.base_layer)
    w0 = quantized.dequantized_weight(layer.base_layer).double()
    delta = layer.delta_weight().double()
    assert delta.abs().max() > 2 * _step(layer.base_layer).max()  # a merge that did nothing would be seen
    x = torch.randn(4, IN)
    with torch.no_grad():
        unmerged = model(x)
        layer.merge()
        assert layer.merged and type(layer.base_layer) is base_type
        merged_weight = quantized.dequantized_weight(layer.base_layer).double()
        merged_step = _step(layer.base_layer).double()
        # One rounding of W0 + ΔW to the format's grid: within a step of it, per weight.
        assert ((merged_weight - (w0 + delta)).abs() <= merged_step).all()
        # The merged layer is its base alone: x Wᵀ + bias with the merged weight and the bias kept (training
        # mode: bitsandbytes serves with int8 activations or a bf16 repacking in eval mode).
        layer.train()
        want = x.double() @ merged_weight.t() + layer.base_layer.bias.double()
        assert (layer(x).double() - want).abs().max() <= 1e-5 * want.abs().max()
        layer.eval()
        merged = model(x)
        assert torch.isfinite(merged).all()
        assert (merged - unmerged).abs().max() < 0.5 * (unmerged.abs().max())
        with pytest.raises(RuntimeError, match="merged"):
            layer.merge()
        # Its base holds ΔW: loading base tensors or lambdas into it would leave the old ΔW in place.
        state = {k: v for k, v in model.state_dict().items() if k.startswith("up.")}
        with pytest.raises(RuntimeError, match="is merged"):
            model.load_state_dict(state, strict=False)
        layer.train()
        with torch.enable_grad(), pytest.raises(RuntimeError, match="unmerge"):
            model(x)
        layer.eval()
        layer.lambda_b.mul_(3.0)  # edited while merged: unmerge() takes out the ΔW that merge() put in
        layer.unmerge()
        assert not layer.merged
        restored = quantized.dequantized_weight(layer.base_layer).double()
        # Two roundings (merge, unmerge), each within a step of its grid: W0 within that, not bit for bit.
        assert ((restored - w0).abs() <= merged_step + _step(layer.base_layer).double()).all()
        vk.merge_and_unload(model)
    assert type(model.up) is base_type and type(model.down) is base_type and type(model.head) is nn.Linear
    assert not vk.vera_layers(model)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def _has(module):
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def test_merge_refusals_change_nothing():
    pytest.importorskip("torchao")
    model = Model("torchao_int8")
    vk.apply_vera(model, ["up", "down"], rank=8)  # no config: torchao can't re-quantize without it
    weight = model.up.base_layer.weight
    with pytest.raises(TypeError, match="quantization_config"):
        model.up.merge()
    with pytest.raises(TypeError, match="'up'.*quantization_config"):
        vk.merge_and_unload(model)
    assert model.up.base_layer.weight is weight and not model.up.merged and isinstance(model.down, VeRAWrapper)

    if _has("optimum.quanto"):
        model = _adapted("quanto_int4")
        with pytest.raises(TypeError, match="QLinear.*keep the adapter unmerged"):
            vk.merge_and_unload(model)
        assert isinstance(model.up, VeRAWrapper) and not model.up.merged and not model.head.merged

    class Packed(nn.Module):  # an unknown layer: its own forward, weights no library here can re-quantize
        in_features, out_features = IN, 16

        def __init__(self):
            super().__init__()
            self.register_buffer("qweight", torch.randint(0, 255, (16, IN // 2), dtype=torch.uint8))

        def forward(self, x):
            return x[..., :16] * 2

    model = nn.Sequential(Packed())
    vk.apply_vera(model, ["0"], rank=4)
    x = torch.randn(3, IN)
    with torch.no_grad():
        model[0].lambda_b.fill_(0.5)
        y = model(x)
    with pytest.raises(TypeError, match="Packed.*keep the adapter unmerged"):
        model[0].merge()
    with pytest.raises(TypeError, match="Packed"):
        vk.merge_and_unload(model)
    assert isinstance(model[0], VeRAWrapper) and not model[0].merged
    with torch.no_grad():
        assert torch.equal(model(x), y)


def test_the_weight_decides_not_the_class():
    class Scaled(nn.Linear):  # a subclass with its own forward: fusing would skip it
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.ModuleList([nn.Linear(IN, 16), Scaled(IN, 16)])
    vk.apply_vera(model, ["0", "1"], rank=4)
    assert isinstance(model[0], FusedVeRALinear) and isinstance(model[1], VeRAWrapper)
    x = torch.randn(3, IN)
    with torch.no_grad():
        assert torch.allclose(model[1](x), 2 * nn.functional.linear(x, model[1].base_layer.weight,
                                                                    model[1].base_layer.bias))
    assert quantized.fusable(nn.Linear(4, 4))
    assert not quantized.fusable(Scaled(4, 4))
    # An nn.Linear whose weight is a tensor subclass (what torchao makes) is not fused.
    linear = nn.Linear(4, 4)
    linear.weight = nn.Parameter(torch.randn(4, 4).as_subclass(_Marked))
    assert not quantized.fusable(linear)


class _Marked(torch.Tensor):
    pass


@pytest.mark.parametrize("fmt", ["nf4", "bnb8", "hqq"])
def test_from_peft_over_a_quantized_base(fmt):
    peft = pytest.importorskip("peft")
    model = Model(fmt, seed=5)
    config = peft.VeraConfig(r=8, target_modules=["up", "down", "head"], init_weights=False)
    peft_model = peft.get_peft_model(model, config)
    x = torch.randn(3, IN)
    with torch.no_grad():
        theirs = peft_model(x)
    ours = vk.from_peft(peft_model)
    assert isinstance(ours.up, VeRAWrapper) and isinstance(ours.head, FusedVeRALinear)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs, rtol=1e-5, atol=1e-6)
        # And back: PEFT's VeRA over the same quantized modules, the same outputs.
        back = vk.to_peft(ours)
        assert type(back.base_model.model.up.base_layer) is type(Model(fmt).up)
        assert torch.allclose(back(x), theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["torchao_int8", "nf4", "hqq"])
def test_torch_compile_over_quantized_bases(fmt):
    model = _adapted(fmt)
    x = torch.randn(3, IN)
    eager = model(x)
    compiled = torch.compile(model)
    y = compiled(x)
    assert torch.allclose(y, eager, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert all(torch.isfinite(layer.lambda_d.grad).all() for _, layer in vk.vera_layers(model))
