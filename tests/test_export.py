"""The exact LoRA export (vera_kernels.lora_export; its command line, vera_kernels.export): to_lora, the
adapter-file command line, the resolver's cache and names.

Round trips go through PEFT's own LoRA (save_pretrained, PeftModel.from_pretrained) on small transformers
models built from configs (no download); the factors are checked bit for bit against d ⊙ A and b ⊙ B formed
independently, the outputs against ours within fp32 rounding."""

import copy
import os
import subprocess
import sys

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import vera_kernels  # noqa: E402
from vera_kernels import apply_vera, from_peft, to_lora  # noqa: E402
from vera_kernels.lora_export import cached_export, exact_factors, export_adapter_file, round_once  # noqa: E402
from vera_kernels.verify import relative_error  # noqa: E402

from test_peft import MODELS, VOCAB, _trained_suffixes, build, peft_vera, randomize  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "base_model.model."


def adapted(kind, rank=8, seed=11, **kwargs):
    base, targets = build(kind)
    ours = apply_vera(copy.deepcopy(base), targets, rank=rank, seed=seed, **kwargs)
    randomize(ours, "lambda_")
    return base, ours


def independent_factors(layer, dtype=torch.float32):
    """d ⊙ A and b ⊙ B from the layer's own tensors: products in float64 (exact), one rounding."""
    A, B = layer._projection_slices(torch.device("cpu"), layer.weight.dtype)
    d, b = layer.lambda_d.detach().double(), layer.lambda_b.detach().double()
    return (d[:, None] * A.double()).to(dtype), (b[:, None] * B.double()).to(dtype)


def saved_factors(directory):
    weights = peft.utils.load_peft_weights(str(directory))
    names = {k.removeprefix(PREFIX).rsplit(".lora_", 1)[0] for k in weights if ".lora_" in k}
    return {n: (weights[f"{PREFIX}{n}.lora_A.weight"], weights[f"{PREFIX}{n}.lora_B.weight"]) for n in names}, weights


@pytest.mark.parametrize("kind", MODELS)
def test_to_lora_round_trips_through_peft_exact_to_rounding(kind, tmp_path):
    base, ours = adapted(kind)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        want = ours(ids).logits
    wanted = {name: independent_factors(layer) for name, layer in vera_kernels.vera_layers(ours)}

    lora = to_lora(ours)
    assert isinstance(lora, peft.PeftModel)
    config = lora.peft_config["default"]
    assert (config.peft_type.value, config.r, config.lora_alpha, config.bias) == ("LORA", 8, 8, "none")
    assert not vera_kernels.vera_layers(lora)
    with torch.no_grad():
        assert relative_error(lora(ids).logits, want) < 1e-6

    lora.save_pretrained(tmp_path)
    factors, weights = saved_factors(tmp_path)
    assert factors.keys() == wanted.keys()
    for name, (lora_A, lora_B) in factors.items():
        # Bit for bit: each element is d_i A_ij (b_o B_oi) rounded once to fp32.
        assert lora_A.dtype == torch.float32 and torch.equal(lora_A, wanted[name][0]), name
        assert torch.equal(lora_B, wanted[name][1]), name
    assert all(".lora_" in k for k in weights)  # nothing else: no bias, no module saved

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        got = loaded(ids).logits
    assert relative_error(got, want) < 1e-6
    # The adapter changes the outputs by far more than the rounding.
    with torch.no_grad():
        assert relative_error(base(ids).logits, want) > 1e-2


def test_to_lora_bf16_uses_the_projections_the_forward_uses():
    base, ours = adapted("llama")
    ours.to(torch.bfloat16)
    layers = vera_kernels.vera_layers(ours)
    wanted = {name: independent_factors(layer, torch.bfloat16) for name, layer in layers}
    lora = to_lora(ours, dtype=torch.bfloat16)
    for name, module in lora.get_base_model().named_modules():
        if name in wanted:
            assert torch.equal(module.lora_A["default"].weight, wanted[name][0])
            assert torch.equal(module.lora_B["default"].weight, wanted[name][1])
            assert module.lora_A["default"].weight.dtype == torch.bfloat16


def test_exact_factors_round_once():
    # d·A = 1 + 2^-8 + (2^-24 - 2^-32): rounded to fp32 first it becomes 1 + 2^-8, a bf16 tie, which rounds to
    # even (1.0); rounded once it is above the tie: 1 + 2^-7.
    d, A = torch.tensor([1.0 + 2.0**-16]), torch.tensor([[2.0**-8 - 2.0**-16 + 1.0]])
    b, B = torch.ones(1), torch.ones(1, 1)
    assert (d[:, None] * A).to(torch.bfloat16).item() == 1.0
    lora_A, lora_B = exact_factors(d, b, A, B, torch.bfloat16)
    assert lora_A.item() == 1.0 + 2.0**-7 and lora_B.item() == 1.0
    with pytest.raises(ValueError, match="expected d"):
        exact_factors(torch.ones(2), b, A, B, torch.float32)
    with pytest.raises(TypeError, match="dtype must be one of"):
        exact_factors(d, b, A, B, torch.int8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_once_is_round_to_nearest_even(dtype):
    # Products of fp32 numbers (exact in float64) against the nearest of the three neighbours, ties to the
    # even bit pattern. Half are moved next to a tie (midpoint of two neighbours), closer than half an fp32
    # ulp: rounding through fp32 lands on the tie there and goes to the even side, whichever side x is on.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, generator=g) * 4
    b = torch.randn(20000, generator=g) * 4
    x = a.double() * b.double()
    low = x.to(dtype)
    midpoint = (low.double() + (low.view(torch.int16) + 1).view(dtype).double()) / 2
    nudge = (torch.rand(10000, generator=g, dtype=torch.float64) - 0.5) * midpoint[::2].abs() * 2.0**-25
    x[::2] = midpoint[::2] + nudge
    got = round_once(x, dtype)
    assert (got != x.to(dtype)).sum() > 1000  # torch's own conversion rounds twice: these cases count
    bits = x.to(dtype).view(torch.int16)
    candidates = torch.stack([(bits + k).view(dtype) for k in (-1, 0, 1)])  # same sign: |x| > 0 here
    distance = (candidates.double() - x).abs()
    best = distance.min(dim=0).values
    even = (torch.stack([bits + k for k in (-1, 0, 1)]) % 2 == 0)
    choice = torch.where((distance == best) & (even | ((distance == best).sum(0) == 1)), distance, float("inf")).argmin(0)
    want = candidates.gather(0, choice[None])[0]
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_to_lora_of_a_from_peft_model_is_peft_vera_exactly(tmp_path):
    base, targets = build("gpt2")  # Conv1D: fan_in_fan_out
    vera = peft_vera(copy.deepcopy(base), targets, fan_in_fan_out=True)
    randomize(vera, "vera_lambda")
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        want = vera(ids).logits
    lora = to_lora(from_peft(vera))
    lora.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        assert relative_error(loaded(ids).logits, want) < 1e-6


@pytest.mark.parametrize("case", ["bias_vera_only", "bias_all", "trained_head"])
def test_to_lora_exports_every_trained_tensor(case, tmp_path):
    bias = {"bias_vera_only": "vera_only", "bias_all": "all"}.get(case, "none")
    base, ours = _trained_suffixes(bias=bias, head=case == "trained_head")
    x = torch.randn(5, 12)
    want = ours(x).detach()
    lora = to_lora(ours)
    config = lora.peft_config["default"]
    assert config.bias == {"bias_vera_only": "lora_only", "bias_all": "all"}.get(case, "none")
    assert sorted(config.modules_to_save or []) == (["head"] if case == "trained_head" else [])
    # "fc" would also match "other.fc" in PEFT's list matching: a full-match expression instead.
    assert isinstance(config.target_modules, str)
    adapted_names = sorted(n.removeprefix(PREFIX) for n, m in lora.named_modules()
                           if isinstance(m, peft.tuners.lora.LoraLayer))
    assert adapted_names == ["fc", "sub.fc"]
    lora.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert relative_error(loaded(x), want) < 1e-6


def test_to_lora_refuses_and_leaves_the_model_as_it_was():
    base, ours = adapted("llama")
    modules = [(n, type(m)) for n, m in ours.named_modules()]
    state = {k: v.clone() for k, v in ours.state_dict().items()}

    def unchanged():
        assert [(n, type(m)) for n, m in ours.named_modules()] == modules
        assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())

    layer = vera_kernels.vera_layers(ours)[0][1]
    layer.merge()
    with pytest.raises(ValueError, match="merged"):
        to_lora(ours)
    layer.unmerge()
    ours.load_state_dict(state)
    with pytest.raises(TypeError, match="dtype"):
        to_lora(ours, dtype=torch.int8)
    unchanged()
    with pytest.raises(ValueError, match="no VeRA layer"):
        to_lora(base)


class Scaled(torch.nn.Module):
    """A module with in/out features PEFT's LoRA can't adapt (not a Linear): apply_vera wraps it."""

    def __init__(self):
        super().__init__()
        self.in_features = self.out_features = 6
        self.scale = torch.nn.Parameter(torch.ones(6))

    def forward(self, x):
        return x * self.scale


def test_to_lora_refuses_a_module_peft_lora_cannot_adapt():
    model = torch.nn.Sequential(Scaled(), torch.nn.Linear(6, 6))
    apply_vera(model, ["0", "1"], rank=4)
    modules = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(TypeError, match="PEFT's LoRA can't adapt"):
        to_lora(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules


def _adapter_file(tmp_path, kind="llama", **kwargs):
    base, ours = adapted(kind, **kwargs)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    path = tmp_path / "adapter.safetensors"
    vera_kernels.save_adapter(ours, path)
    return base, ours, str(base_dir), str(path)


@pytest.mark.parametrize("kind", MODELS)
def test_the_command_line_writes_what_to_lora_writes(kind, tmp_path):
    base, ours, base_dir, path = _adapter_file(tmp_path, kind)
    out = tmp_path / "lora"
    run = subprocess.run([sys.executable, "-m", "vera_kernels.export", "--lora", path, "--base", base_dir, str(out)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    to_lora(copy.deepcopy(ours)).save_pretrained(tmp_path / "in_memory")
    from_file, _ = saved_factors(out)
    in_memory, _ = saved_factors(tmp_path / "in_memory")
    assert from_file.keys() == in_memory.keys()
    assert all(torch.equal(from_file[n][i], in_memory[n][i]) for n in from_file for i in (0, 1))
    assert peft.LoraConfig.from_pretrained(str(out)).base_model_name_or_path == base_dir
    ids = torch.randint(0, VOCAB, (2, 9))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    with torch.no_grad():
        assert relative_error(loaded(ids).logits, ours(ids).logits) < 1e-6


def test_the_command_line_exports_trained_biases(tmp_path):
    base, ours, base_dir, path = _adapter_file(tmp_path, "gpt2", bias="vera_only")
    out = tmp_path / "lora"
    export_adapter_file(path, base_dir, out)
    assert peft.LoraConfig.from_pretrained(str(out)).bias == "lora_only"
    ids = torch.randint(0, VOCAB, (2, 9))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    with torch.no_grad():
        assert relative_error(loaded(ids).logits, ours(ids).logits) < 1e-6


def test_the_command_line_help_and_refusals(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "vera_kernels.export", "--help"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout
    for word in ("--lora", "--base", "OUT_DIR", "--dtype", "--auto-class", "--base-model-name", "r*(in+out)"):
        assert word in help_text
    _, _, base_dir, path = _adapter_file(tmp_path)
    other = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2)  # one layer fewer
    transformers.LlamaForCausalLM(other).save_pretrained(tmp_path / "other")
    out = tmp_path / "refused"
    for base, message in ((str(tmp_path / "other"), "model.layers.1"), (str(tmp_path / "nowhere"), "no model configuration")):
        run = subprocess.run([sys.executable, "-m", "vera_kernels.export", "--lora", path, "--base", base, str(out)],
                             cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 2 and message in run.stderr, run.stderr
        assert not out.exists()  # nothing written on refusal


def test_cached_export_exports_once_per_content(tmp_path):
    _, ours, base_dir, path = _adapter_file(tmp_path)
    cache = tmp_path / "cache"
    first = cached_export(path, base_dir, cache)
    stamp = os.stat(os.path.join(first, "adapter_model.safetensors")).st_mtime_ns
    assert cached_export(path, base_dir, cache) == first
    assert os.stat(os.path.join(first, "adapter_model.safetensors")).st_mtime_ns == stamp
    with torch.no_grad():
        vera_kernels.vera_layers(ours)[0][1].lambda_b.add_(1.0)
    vera_kernels.save_adapter(ours, path)  # same name, new content: a new directory
    second = cached_export(path, base_dir, cache)
    assert second != first and sorted(os.listdir(cache)) == sorted(os.path.basename(p) for p in (first, second))


def test_the_vllm_resolver_names_and_registration(tmp_path, monkeypatch):
    # What runs without vLLM: which file a name means (nothing outside the directory), and registration
    # (nothing where the variable is unset; a clear error, before vLLM is imported, where it names no directory).
    from vera_kernels import vllm_resolver

    (tmp_path / "fr.safetensors").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    assert vllm_resolver.adapter_path(str(tmp_path), "fr") == str(tmp_path / "fr.safetensors")
    for name in ("de", "../fr", "sub/../fr", "/fr", ".fr", "", None, "fr.safetensors"):
        assert vllm_resolver.adapter_path(str(tmp_path), name) is None, name
    monkeypatch.delenv(vllm_resolver.ADAPTERS_ENV, raising=False)
    assert vllm_resolver.register() is None
    monkeypatch.setenv(vllm_resolver.ADAPTERS_ENV, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="is not a directory"):
        vllm_resolver.register()
