"""``python -m vera_kernels.demo``: fine-tune a tiny GPT-2 with VeRA on CPU, in well under two minutes.

1. Pre-train a 2-layer GPT-2 (built from a config, byte-level vocabulary) on text in one style that this
   module writes itself: the "base model".
2. Freeze it, apply_vera to its attention and MLP layers, and fine-tune only lambda_d and lambda_b on text
   in another style. The loss on that text falls.
3. Save the adapter, compare its size with a LoRA of the same layers, reload it onto a fresh copy of the
   base and merge it, and check both give the fine-tuned loss.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import tempfile
import time

import torch

from . import apply_vera, load_adapter, save_adapter, vera_layers

SUBJECTS = ["the fox", "a cat", "the old dog", "my sister", "the robot", "a small bird", "the teacher", "our neighbour"]
VERBS = ["sees", "likes", "follows", "paints", "finds", "helps", "watches", "calls"]
OBJECTS = ["the river", "a red ball", "the garden", "an apple", "the moon", "a green door", "the city", "a letter"]
PLACES = ["in the morning", "after lunch", "at night", "near the sea", "on monday", "in the rain"]


def base_style(rng: random.Random) -> str:
    """Plain statements: the text the base model is pre-trained on."""
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}.\n"


def target_style(rng: random.Random) -> str:
    """The fine-tuning task: the same words in a question-and-answer pattern the base never saw."""
    subject, verb, obj = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)
    return f"Q: who {verb} {obj}? A: {subject.upper()} {verb} {obj}!\n"


def corpus(style, n_lines: int, seed: int) -> bytes:
    rng = random.Random(seed)
    return "".join(style(rng) for _ in range(n_lines)).encode()


def batches(data: bytes, batch: int, length: int, seed: int):
    """Random windows of the byte stream, forever: byte values are the token ids (vocabulary 256)."""
    tokens = torch.tensor(list(data), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(tokens) - length - 1, (batch,), generator=g)
        yield torch.stack([tokens[s : s + length] for s in starts])


def lm_loss(model, ids) -> torch.Tensor:
    return model(ids, labels=ids).loss


@torch.no_grad()
def eval_loss(model, data: bytes, length: int) -> float:
    model.eval()
    ids = next(batches(data, 32, length, seed=12345))
    loss = lm_loss(model, ids).item()
    model.train()
    return loss


def train(model, data, steps, lr, batch, length, log_every, label):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    stream = batches(data, batch, length, seed=len(label))
    model.train()
    for step in range(1, steps + 1):
        loss = lm_loss(model, next(stream))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 1 or step % log_every == 0:
            print(f"  {label} step {step:4d}  loss {loss.item():.3f}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=96, help="GPT-2 hidden size")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=200, help="VeRA fine-tuning steps")
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--lora-rank", type=int, default=8, help="the LoRA rank to compare the file size with")
    args = parser.parse_args(argv)
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        print("the demo builds a GPT-2 with transformers: pip install transformers")
        return 1

    # Tiny activations and gradients of a small fresh model underflow to denormals, which x86 CPUs
    # process many times slower: flushing them to zero halves the demo's time. And a model this small
    # gains nothing from intra-op threads, whose synchronization costs 10x on a busy machine.
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    start = time.perf_counter()
    length, batch = 64, 16
    # Small and cheap (no dropout, plain GELU): the point is the adapter, not the model.
    config = GPT2Config(vocab_size=256, n_positions=length, n_embd=args.width, n_inner=4 * args.width, n_layer=2,
                        n_head=4, activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=10, eos_token_id=10)
    model = GPT2LMHeadModel(config)
    base_text, task_text = corpus(base_style, 4000, seed=1), corpus(target_style, 4000, seed=2)
    held_out = corpus(target_style, 500, seed=3)

    print(f"1. pre-training the base GPT-2 ({sum(p.numel() for p in model.parameters()):,} parameters) on plain statements")
    train(model, base_text, args.pretrain_steps, 3e-3, batch, length, 100, "pre-train")
    base = copy.deepcopy(model)
    print(f"   base model's loss on the Q&A text: {eval_loss(model, held_out, length):.3f} "
          f"({time.perf_counter() - start:.0f} s so far)")

    targets = ["c_attn", "c_proj", "c_fc"]
    apply_vera(model, targets, rank=args.rank, seed=0)
    layers = vera_layers(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"2. VeRA r={args.rank} on {len(layers)} layers ({', '.join(targets)}): {trainable:,} trainable parameters "
          f"(= sum of r + out per layer), everything else frozen")
    train(model, task_text, args.steps, 2e-2, batch, length, 20, "VeRA")
    tuned = eval_loss(model, held_out, length)
    print(f"   fine-tuned loss on held-out Q&A text: {tuned:.3f}")

    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "adapter.safetensors")
        save_adapter(model, path)
        vera_bytes = os.path.getsize(path)
        lora_params = sum(args.lora_rank * (layer.in_features + layer.out_features) for _, layer in layers)
        print(f"3. adapter file: {vera_bytes:,} bytes (safetensors: seed, sizes, lambda_d and lambda_b)")
        print(f"   a LoRA r={args.lora_rank} of the same layers: {lora_params:,} parameters = {lora_params * 4:,} bytes "
              f"in fp32 ({lora_params * 4 / vera_bytes:.1f}x larger)")
        reloaded = load_adapter(copy.deepcopy(base), path)
    print(f"   reloaded onto a fresh copy of the base: loss {eval_loss(reloaded, held_out, length):.3f}")
    for _, layer in vera_layers(reloaded):
        layer.merge()
    reloaded.eval()
    print(f"   merged into the base weights (no adapter at run time): loss {eval_loss(reloaded, held_out, length):.3f}")
    prompt = torch.tensor([list(b"Q: who paints the moon? A:")])
    with torch.no_grad():
        out = reloaded.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=10)
    print(f"   greedy sample: {bytes(out[0].tolist()).decode(errors='replace')!r}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
