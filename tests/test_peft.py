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
