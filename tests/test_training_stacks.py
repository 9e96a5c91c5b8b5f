"""The training stacks people use, with apply_vera: transformers.Trainer (train, save, reload, same outputs)
and accelerate (its training loop equals the plain one; bf16 mixed precision trains). Each is skipped when
its package is not installed."""

import copy
import os

import pytest
import torch

import vera_kernels
from vera_kernels import apply_vera, load_adapter, save_adapter

transformers = pytest.importorskip("transformers")

TARGETS = ["c_attn", "c_proj", "c_fc"]
VOCAB, LENGTH = 64, 16


def tiny_gpt2(seed=0):
    """A 2-layer GPT-2 from a config (no download), random weights fixed by the seed."""
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config)


def token_batches(n, batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    # A learnable pattern (each token followed by the next one), so a few steps visibly lower the loss.
    starts = torch.randint(0, VOCAB, (n, batch, 1), generator=g)
    return (starts + torch.arange(LENGTH)) % VOCAB


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state (Trainer uses it too): each test starts and ends with none."""
    try:
        from accelerate.state import AcceleratorState, PartialState
    except ImportError:
        yield
        return
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def lambdas(model):
    return {name: (layer.lambda_d.detach().clone(), layer.lambda_b.detach().clone())
            for name, layer in vera_kernels.vera_layers(model)}


def frozen(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}


def test_trainer_trains_saves_and_reloads(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = apply_vera(tiny_gpt2(), TARGETS, rank=16, seed=3)
    base_before = frozen(model)
    samples = [{"input_ids": ids, "labels": ids} for ids in token_batches(1, batch=24)[0]]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=8,
                             learning_rate=5e-2, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=samples)
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert result.global_step == 4 and len(losses) == 4 and losses[-1] < losses[0]
    # Only the adapter trained: the base is bit for bit what it was, every lambda_b left its zero start.
    after = frozen(model)
    assert after.keys() == base_before.keys() and all(torch.equal(after[k], base_before[k]) for k in after)
    assert all(b.abs().sum() > 0 for _, b in lambdas(model).values())

    model.eval()
    ids = token_batches(1, batch=3, seed=7)[0]
    with torch.no_grad():
        expected = model(ids).logits

    # 1. The adapter file onto a fresh copy of the base.
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    reloaded = load_adapter(tiny_gpt2(), path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)

    # 2. Trainer's own checkpoint (the whole state_dict, safetensors) into the same architecture.
    trainer.save_model(str(tmp_path / "checkpoint"))
    from safetensors.torch import load_file

    state = load_file(os.path.join(tmp_path, "checkpoint", "model.safetensors"))
    assert any(key.endswith("lambda_b") for key in state)
    rebuilt = apply_vera(tiny_gpt2(seed=99), TARGETS, rank=16, seed=3).eval()  # other base weights: overwritten
    missing, unexpected = rebuilt.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in key for key in missing)  # lm_head is tied to wte
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, expected)


def _train_loop(model, optimizer, batches, backward):
    for ids in batches:
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        backward(loss)
        optimizer.step()


def test_accelerate_loop_equals_the_plain_loop():
    accelerate = pytest.importorskip("accelerate")
    batches = list(token_batches(3))
    plain = apply_vera(tiny_gpt2(), TARGETS, rank=16, seed=3)
    accelerated = copy.deepcopy(plain)

    optimizer = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-2)
    _train_loop(plain, optimizer, batches, lambda loss: loss.backward())

    accelerator = accelerate.Accelerator(cpu=True)
    optimizer = torch.optim.AdamW([p for p in accelerated.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(accelerated, optimizer)
    _train_loop(model, optimizer, batches, accelerator.backward)

    unwrapped = accelerator.unwrap_model(model)
    assert vera_kernels.vera_layers(unwrapped)
    ours, theirs = lambdas(plain), lambdas(unwrapped)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name][0], theirs[name][0]) and torch.equal(ours[name][1], theirs[name][1]), name
        assert ours[name][1].abs().sum() > 0


def test_accelerate_bf16_mixed_precision_trains_the_fp32_lambdas():
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    model = apply_vera(tiny_gpt2(), TARGETS, rank=16, seed=3)
    base_before = frozen(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    batches = list(token_batches(6))
    losses = []
    for ids in batches:
        with accelerator.autocast():
            loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        accelerator.backward(loss)
        for _, layer in vera_kernels.vera_layers(accelerator.unwrap_model(model)):
            assert layer.lambda_d.grad.dtype == torch.float32 and torch.isfinite(layer.lambda_d.grad).all()
            assert torch.isfinite(layer.lambda_b.grad).all()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = frozen(accelerator.unwrap_model(model))
    assert all(torch.equal(after[k], base_before[k]) for k in after)
