"""apply_vera: PEFT's name matching, one shared pair, freezing, Conv1D, any base module, clear errors."""

import copy

import pytest
import torch
from torch import nn

import vera_kernels
from vera_kernels import FusedVeRALinear, VeRAWrapper, apply_vera
from vera_kernels.verify import relative_error


class Block(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = x + self.out_proj(torch.tanh(self.q_proj(self.norm(x))))
        return x + self.down(torch.relu(self.up(x)))


class Tiny(nn.Module):
    def __init__(self, dim=16, hidden=40, layers=2):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, hidden) for _ in range(layers))
        self.head = nn.Linear(dim, 7)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def adapted_names(model):
    return sorted(name for name, _ in vera_kernels.vera_layers(model))


def test_list_matches_exact_names_and_dotted_suffixes():
    model = apply_vera(Tiny(), ["q_proj", "blocks.1.up", "proj"], rank=4)
    # "proj" is neither a qualified name nor a dotted suffix: it must not match q_proj or out_proj.
    assert adapted_names(model) == ["blocks.0.q_proj", "blocks.1.q_proj", "blocks.1.up"]


def test_string_is_a_full_match_regex():
    model = apply_vera(Tiny(), r"blocks\.\d+\.(up|down)", rank=4)
    assert adapted_names(model) == ["blocks.0.down", "blocks.0.up", "blocks.1.down", "blocks.1.up"]
    with pytest.raises(ValueError, match="matched no module"):
        apply_vera(Tiny(), "up", rank=4)  # a partial match is not a match


def test_one_shared_pair_sized_to_the_largest_layer_and_only_lambdas_train():
    torch.manual_seed(0)
    base = Tiny()
    model = apply_vera(copy.deepcopy(base), ["q_proj", "up", "down", "head"], rank=6, seed=4)
    layers = [module for _, module in vera_kernels.vera_layers(model)]
    assert len({id(layer.projections) for layer in layers}) == 1
    projections = layers[0].projections
    assert (projections.seed, projections.rank, projections.max_in, projections.max_out) == (4, 6, 40, 40)
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    assert all(name.endswith(("lambda_d", "lambda_b")) for name in trainable)
    assert sum(trainable.values()) == sum(6 + layer.out_features for layer in layers)
    # A fresh adapter (b = 0) is the identity.
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(model(x), base(x), rtol=1e-5, atol=1e-6)


def test_patched_model_equals_float64_math_on_the_shared_pair():
    torch.manual_seed(1)
    base = Tiny().double()
    model = apply_vera(copy.deepcopy(base).float(), ["up", "down"], rank=5, seed=2)
    with torch.no_grad():
        for _, layer in vera_kernels.vera_layers(model):
            layer.lambda_d.normal_()
            layer.lambda_b.normal_()
    A, B = (t.double() for t in vera_kernels.get_projections(2, 5, 40, 40))
    # The same model in float64 with the adapter written out on plain Linear layers.
    for i, block in enumerate(base.blocks):
        for name in ("up", "down"):
            linear, layer = getattr(block, name), getattr(model.blocks[i], name)
            d, b = layer.lambda_d.detach().double(), layer.lambda_b.detach().double()
            a_slice, b_slice = A[:, : linear.in_features], B[: linear.out_features]
            linear.forward = lambda x, linear=linear, d=d, b=b, a=a_slice, bb=b_slice: (
                nn.functional.linear(x, linear.weight, linear.bias) + b * ((d * (x @ a.t())) @ bb.t())
            )
    x = torch.randn(4, 16, dtype=torch.float64)
    assert relative_error(model(x.float()), base(x)) < 1e-5


def test_gpt2_conv1d_is_fused_without_copying_the_weight():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=24, n_layer=2, n_head=2, n_inner=40)
    base = transformers.GPT2LMHeadModel(config).eval()
    model = copy.deepcopy(base)
    weight = model.transformer.h[0].mlp.c_fc.weight
    apply_vera(model, ["c_attn", "c_proj", "c_fc"], rank=8)
    c_fc = model.transformer.h[0].mlp.c_fc
    assert isinstance(c_fc, FusedVeRALinear) and c_fc.fan_in_fan_out
    assert c_fc.weight is weight and (c_fc.in_features, c_fc.out_features) == (24, 40)
    assert c_fc.projections.max_in == 40 and c_fc.projections.max_out == 72  # c_proj in 40, c_attn out 72
    ids = torch.randint(0, 50, (2, 9))
    torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * ((8 + 72) + 2 * (8 + 24) + (8 + 40))


class Custom(nn.Module):
    """Not a Linear, but declares in/out features: apply_vera wraps it."""

    def __init__(self):
        super().__init__()
        self.in_features, self.out_features = 16, 16
        self.weight = nn.Parameter(torch.randn(16, 16) / 4)

    def forward(self, x):
        return torch.tanh(x @ self.weight)


def test_unfusable_modules_are_wrapped():
    torch.manual_seed(3)
    model = Tiny()
    model.blocks[0].q_proj = Custom()
    base = copy.deepcopy(model)
    apply_vera(model, ["q_proj"], rank=4)
    assert isinstance(model.blocks[0].q_proj, VeRAWrapper) and isinstance(model.blocks[1].q_proj, FusedVeRALinear)
    assert not model.blocks[0].q_proj.base_layer.weight.requires_grad
    x = torch.randn(2, 16)
    torch.testing.assert_close(model(x), base(x), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        model.blocks[0].q_proj.lambda_b.fill_(1.0)
    assert relative_error(model(x), base(x)) > 1e-3  # the wrapped adapter is live


def test_bias_options():
    model = apply_vera(Tiny(), ["q_proj", "out_proj"], rank=4, bias="vera_only")
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad and name.endswith("bias"))
    assert trainable == ["blocks.0.q_proj.bias", "blocks.1.q_proj.bias"]  # out_proj has no bias
    model = apply_vera(Tiny(), ["q_proj"], rank=4, bias="all")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad and not name.endswith(("lambda_d", "lambda_b"))]
    assert trainable and all(name.endswith("bias") for name in trainable) and "head.bias" in trainable
    with pytest.raises(ValueError, match="bias must be one of"):
        apply_vera(Tiny(), ["q_proj"], rank=4, bias="some")


def test_bad_targets_and_arguments_give_clear_errors():
    with pytest.raises(ValueError, match=r"target_modules \['qkv'\] matched no module"):
        apply_vera(Tiny(), ["qkv"])
    with pytest.raises(ValueError, match="rank must be >= 1"):
        apply_vera(Tiny(), ["q_proj"], rank=0)
    with pytest.raises(TypeError, match="matched 'blocks.0', a Block without"):
        apply_vera(Tiny(), r"blocks\.0")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        apply_vera(Tiny(), "blocks(")
    with pytest.raises(TypeError, match="target_modules"):
        apply_vera(Tiny(), [])
    model = apply_vera(Tiny(), ["q_proj"], rank=2)
    with pytest.raises(ValueError, match="already has a VeRA adapter"):
        apply_vera(model, ["q_proj"], rank=2)
    untouched = Tiny()
    before = {k: v.clone() for k, v in untouched.state_dict().items()}
    with pytest.raises(TypeError, match="can't run"):
        apply_vera(untouched.double(), ["q_proj", "up"], rank=2, backend="cpu")  # float64 on the cpu backend
    assert not vera_kernels.vera_layers(untouched)
    assert all(torch.equal(v.float(), before[k]) for k, v in untouched.state_dict().items())
    assert all(p.requires_grad for p in untouched.parameters())
