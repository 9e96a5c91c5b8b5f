"""PEFT interoperability on small transformers models built from configs (no download): GPT-2 (Conv1D,
fan_in_fan_out) and Llama. Outputs and the gradients of every lambda equal PEFT's; checkpoints round-trip."""

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import vera_kernels  # noqa: E402
from vera_kernels import FusedVeRALinear, apply_vera, from_peft, to_peft  # noqa: E402
from vera_kernels.verify import relative_error  # noqa: E402

VOCAB = 64


def gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, n_inner=48,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config), ["c_attn", "c_proj", "c_fc"]


def llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config), ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


MODELS = {"gpt2": gpt2, "llama": llama}


def build(kind):
    torch.manual_seed(0)
    model, targets = MODELS[kind]()
    return model.eval(), targets


def randomize(model, prefix):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and prefix in name:
                p.copy_(torch.randn(p.shape, generator=g))


def canonical(name):
    """A lambda's name in PEFT's model or ours -> the adapted module's name and which vector."""
    name = name.replace("base_model.model.", "")
    for peft_name, ours in ((".vera_lambda_d.default", ".lambda_d"), (".vera_lambda_b.default", ".lambda_b")):
        name = name.replace(peft_name, ours)
    return name


def forward_backward(model, ids):
    model.zero_grad()
    logits = model(ids).logits
    logits.pow(2).mean().backward()
    grads = {canonical(n): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def assert_same(got, want, tol=1e-5):
    (y, grads), (y_want, grads_want) = got, want
    assert relative_error(y, y_want) < tol
    assert grads.keys() == grads_want.keys() and grads
    for name in grads:
        assert relative_error(grads[name], grads_want[name]) < tol, name


def peft_vera(model, targets, **config):
    config = peft.VeraConfig(r=8, target_modules=targets, projection_prng_key=3, **config)
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("kind", MODELS)
def test_from_peft_gives_peft_outputs_and_gradients(kind):
    base, targets = build(kind)
    peft_model = peft_vera(base, targets, fan_in_fan_out=kind == "gpt2")
    randomize(peft_model, "vera_lambda")
    ids = torch.randint(0, VOCAB, (2, 12))
    want = forward_backward(peft_model, ids)
    ours = from_peft(copy.deepcopy(peft_model))
    layers = vera_kernels.vera_layers(ours)
    assert len(layers) == 2 * len(targets) + (2 if kind == "gpt2" else 0)  # GPT-2: two c_proj per block
    assert all(isinstance(module, FusedVeRALinear) for _, module in layers)
    if kind == "gpt2":
        assert all(module.fan_in_fan_out for _, module in layers)
    assert_same(forward_backward(ours, ids), want)


def test_from_peft_after_peft_regenerated_unsaved_projections(tmp_path):
    base, targets = build("llama")
    peft_model = peft_vera(copy.deepcopy(base), targets, save_projection=False)
    randomize(peft_model, "vera_lambda")
    peft_model.save_pretrained(tmp_path)
    # PEFT rebuilds vera_A/vera_B from projection_prng_key with torch's CPU generator.
    with pytest.warns(UserWarning, match="PRNG"):
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True).eval()
    ids = torch.randint(0, VOCAB, (2, 10))
    want = forward_backward(peft_model, ids)
    ours = from_peft(loaded)
    assert_same(forward_backward(ours, ids), want)


@pytest.mark.parametrize("kind", MODELS)
def test_to_peft_checkpoint_round_trips(kind, tmp_path):
    base, targets = build(kind)
    ours = apply_vera(copy.deepcopy(base), targets, rank=8, seed=11)
    randomize(ours, "lambda_")
    ids = torch.randint(0, VOCAB, (2, 12))
    want = forward_backward(ours, ids)

    peft_model = to_peft(ours)
    assert_same(forward_backward(peft_model, ids), want)
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == sum(g.numel() for g in want[1].values())

    peft_model.save_pretrained(tmp_path)
    saved = peft.utils.load_peft_weights(str(tmp_path))
    assert {"base_model.vera_A", "base_model.vera_B"} <= set(saved)
    A, B = vera_kernels.get_projections(11, 8, saved["base_model.vera_A"].shape[1], saved["base_model.vera_B"].shape[0])
    assert torch.equal(saved["base_model.vera_A"], A) and torch.equal(saved["base_model.vera_B"], B)

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True).eval()
    assert_same(forward_backward(loaded, ids), want)
    back = from_peft(loaded)
    assert_same(forward_backward(back, ids), want)


class Suffixes(torch.nn.Module):
    """Names PEFT's list matching confuses: "fc" also ends "sub.fc" and "other.fc"; a classifier head."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(12, 12)
        self.sub = torch.nn.Module()
        self.sub.fc = torch.nn.Linear(12, 12)
        self.other = torch.nn.Module()
        self.other.fc = torch.nn.Linear(12, 12)
        self.head = torch.nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.other.fc(torch.tanh(self.sub.fc(torch.tanh(self.fc(x)))))))


def _trained_suffixes(bias="none", head=False):
    torch.manual_seed(0)
    base = Suffixes().eval()
    ours = apply_vera(copy.deepcopy(base), r"fc|sub\.fc", rank=4, seed=11, bias=bias)
    if head:
        ours.head.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return base, ours


@pytest.mark.parametrize("case", ["suffix_names", "bias_all", "trained_head"])
def test_to_peft_keeps_every_trained_tensor_and_only_our_layers(case, tmp_path):
    # Regressions: names PEFT also matches as suffixes ("fc" and "sub.fc" match "other.fc") raised KeyError
    # halfway through, leaving the model half converted; bias="all" was exported as "vera_only" (the other
    # biases were not saved); a trained classifier head was dropped without a word.
    base, ours = _trained_suffixes(bias="all" if case == "bias_all" else "none", head=case == "trained_head")
    x = torch.randn(5, 12)
    want = ours(x).detach()
    peft_model = to_peft(ours)
    adapted = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                     if isinstance(m, peft.tuners.vera.layer.Linear))
    assert adapted == ["fc", "sub.fc"]
    assert relative_error(peft_model(x), want) < 1e-6
    peft_model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert relative_error(loaded(x), want) < 1e-6


def test_to_peft_refuses_what_it_cannot_export_and_changes_nothing():
    # A trainable module whose name PEFT's modules_to_save would also match elsewhere: it matches names by
    # their ending, without a dot boundary ("another.fc" ends with "other.fc").
    _, ours = _trained_suffixes()
    ours.other.fc.requires_grad_(True)
    ours.another = torch.nn.Module()
    ours.another.fc = torch.nn.Linear(12, 12)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    modules = [(n, type(m)) for n, m in ours.named_modules()]
    with pytest.raises(ValueError, match="'other.fc'.*'another.fc'"):
        to_peft(ours)
    assert [(n, type(m)) for n, m in ours.named_modules()] == modules
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
