"""merge_and_unload: plain nn.Linear / Conv1D modules with W0 + ΔW, loadable into the original architecture."""

import copy

import pytest
import torch
from torch import nn

import vera_kernels
from vera_kernels import apply_vera, merge_and_unload
from vera_kernels.verify import relative_error


class Tiny(nn.Module):
    def __init__(self, dim=24, hidden=40, dtype=torch.float32):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim, dtype=dtype)
        self.up = nn.Linear(dim, hidden, bias=False, dtype=dtype)
        self.down = nn.Linear(hidden, dim, dtype=dtype)

    def forward(self, x):
        return self.down(torch.relu(self.up(torch.tanh(self.q_proj(x)))))


def trained(model, seed=0):
    """The adapter after some training: nonzero lambdas (a fresh one is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in vera_kernels.vera_layers(model):
            layer.lambda_d.copy_(torch.randn(layer.lambda_d.shape, generator=g))
            layer.lambda_b.copy_(torch.randn(layer.lambda_b.shape, generator=g))
    return model


def expected_weights(model):
    """W0 + (b ⊙ B)(d ⊙ A) per adapted layer, in float64, from the projections the layer uses."""
    out = {}
    for name, layer in vera_kernels.vera_layers(model):
        A, B = layer.projections.pair(layer.weight.device, layer.weight.dtype)
        A, B = A[:, : layer.in_features].double(), B[: layer.out_features].double()
        delta = (layer.lambda_b.double()[:, None] * B) @ (layer.lambda_d.double()[:, None] * A)
        out[name] = layer._weight_out_in().double() + delta
    return out


def test_plain_linears_with_merged_weights_and_same_outputs():
    torch.manual_seed(0)
    original = Tiny()
    model = trained(apply_vera(copy.deepcopy(original), ["q_proj", "up", "down"], rank=8))
    x = torch.randn(5, 24)
    with torch.no_grad():
        adapted_out = model(x)
    expected = expected_weights(model)
    biases = {name: layer.bias for name, layer in vera_kernels.vera_layers(model)}

    result = merge_and_unload(model)
    assert result is model and not vera_kernels.vera_layers(model)
    for name in ("q_proj", "up", "down"):
        module = model.get_submodule(name)
        assert type(module) is nn.Linear
        assert relative_error(module.weight, expected[name]) < 1e-6  # one fp32 rounding of W0 + ΔW
        assert module.bias is biases[name]  # the same Parameter, not a copy
    with torch.no_grad():
        assert relative_error(model(x), adapted_out) < 1e-5
    # Loads into the original architecture, key for key.
    fresh = Tiny()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_bf16_merge_is_one_rounding_not_bit_exact():
    torch.manual_seed(0)
    model = trained(apply_vera(Tiny(dtype=torch.bfloat16), ["q_proj", "up", "down"], rank=8))
    x = torch.randn(64, 24, dtype=torch.bfloat16)
    expected = expected_weights(model)
    with torch.no_grad():
        adapted_out = model(x)
    merge_and_unload(model)
    for name, weight in expected.items():
        # Each element the nearest bf16 to W0 + ΔW: within half an ulp (2^-8 relative).
        merged = model.get_submodule(name).weight.double()
        assert ((merged - weight).abs() <= weight.abs() * 2.0**-8 + 1e-30).all()
    with torch.no_grad():
        assert relative_error(model(x), adapted_out) < 2e-2  # bf16 rounding of the weights and the GEMMs


def test_gpt2_conv1d_comes_back_as_conv1d():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    original = transformers.GPT2LMHeadModel(config).eval()
    model = trained(apply_vera(copy.deepcopy(original), ["c_attn", "c_fc"], rank=4)).eval()
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        adapted = model(ids).logits
    merge_and_unload(model)
    assert type(model.transformer.h[0].attn.c_attn) is Conv1D and type(model.transformer.h[0].mlp.c_fc) is Conv1D
    with torch.no_grad():
        assert relative_error(model(ids).logits, adapted) < 1e-5
    fresh = transformers.GPT2LMHeadModel(config)
    fresh.load_state_dict(model.state_dict())


def test_already_merged_layers_are_unloaded_as_they_are():
    torch.manual_seed(0)
    model = trained(apply_vera(Tiny(), ["q_proj", "up"], rank=8))
    model.get_submodule("q_proj").merge()
    weight_after_merge = model.get_submodule("q_proj").weight.detach().clone()
    merge_and_unload(model)
    assert type(model.q_proj) is nn.Linear and torch.equal(model.q_proj.weight, weight_after_merge)


def test_refusals_change_nothing():
    with pytest.raises(ValueError, match="no VeRA layer"):
        merge_and_unload(Tiny())

    class Custom(nn.Module):  # not a dense linear layer: wrapped, cannot be merged
        in_features, out_features = 24, 24

        def forward(self, x):
            return x * 2

    model = Tiny()
    model.custom = Custom()
    apply_vera(model, ["q_proj", "custom"], rank=4)
    before = {name: type(module) for name, module in model.named_modules()}
    weight = model.q_proj.weight.detach().clone()
    with pytest.raises(TypeError, match="custom"):
        merge_and_unload(model)
    assert {name: type(module) for name, module in model.named_modules()} == before
    assert torch.equal(model.q_proj.weight, weight) and not model.q_proj.merged


def test_a_weight_tied_to_another_module_is_not_merged():
    # Regression: merging an adapted lm_head of GPT-2 (its weight is the token embedding's, tied) changed
    # the embedding too. Refused, naming the tie and how to untie; after untying, the merge works.
    transformers = pytest.importorskip("transformers")

    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    trained(apply_vera(model, ["lm_head", "c_fc"], rank=4))
    embedding = model.transformer.wte.weight.detach().clone()
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        adapted = model(ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="'lm_head' is tied to 'transformer.wte.weight'.*Untie it first.*nn.Parameter"):
        merge_and_unload(model)
    with pytest.raises(RuntimeError, match="tied to 'transformer.wte.weight'.*Untie"):
        model.lm_head.merge()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.lm_head.merged and isinstance(model.lm_head, vera_kernels.FusedVeRALinear)
    # Untied as the message says: the merge then leaves the embedding alone.
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    model.lm_head.merge()
    model.lm_head.unmerge()
    merge_and_unload(model)
    assert torch.equal(model.transformer.wte.weight, embedding)
    with torch.no_grad():
        assert relative_error(model(ids).logits, adapted) < 1e-5


def test_a_tie_made_after_apply_vera_is_found_by_merge_and_unload():
    torch.manual_seed(0)
    model = trained(apply_vera(Tiny(), ["q_proj", "up"], rank=8))
    model.extra = nn.Linear(24, 24)
    model.extra.weight = model.q_proj.weight
    with pytest.raises(ValueError, match="'q_proj' is tied to 'extra.weight'"):
        merge_and_unload(model)
    assert isinstance(model.q_proj, vera_kernels.FusedVeRALinear) and not model.q_proj.merged
