"""``python -m vera_kernels.demo``: fine-tune a tiny GPT-2 with VeRA on CPU, in well under two minutes.

``python -m vera_kernels.demo --compare``: the same fine-tuning task with this package's layers, with PEFT's
VeRA and with PEFT's LoRA, side by side (see the function compare). ``--compare --base nf4``: the same over a
base whose adapted layers are bitsandbytes 4-bit (QVeRA, QLoRA).

The default demo:
1. Pre-train a 2-layer GPT-2 (built from a config, byte-level vocabulary) on text in one style that this
   module writes itself: the "base model".
2. Freeze it, apply_vera to its attention and MLP layers, and fine-tune only lambda_d and lambda_b on text
   in another style. The loss on that text falls.
3. Save the adapter, compare its size with a LoRA of the same layers, reload it onto a fresh copy of the
   base and merge it (merge_and_unload: a plain GPT-2 again), and check both give the fine-tuned loss.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import tempfile
import time
import warnings

import torch

from . import apply_vera, load_adapter, merge_and_unload, save_adapter, vera_layers
from .measure import model_bytes, saved_activation_bytes

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


# --------------------------------------------------------------------------------------------------
# --compare: this package's VeRA, PEFT's VeRA and PEFT's LoRA on one task.

COMPARE_METHODS = ("vera-kernels", "peft-vera", "peft-lora")
COMPARE_TARGETS = ["c_attn", "c_proj", "c_fc"]


def _gpt2(width: int, layers: int, length: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    # Byte-level vocabulary; no dropout and plain GELU: the point is the adapter, not the model.
    config = GPT2Config(vocab_size=256, n_positions=length, n_embd=width, n_inner=4 * width, n_layer=layers,
                        n_head=4, activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=10, eos_token_id=10)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # what transformers picks anyway, named so that it does not warn about it
    return model


COMPARE_BASES = ("fp32", "nf4")


def _quantize_nf4(model):
    """GPT-2's adapted Conv1D layers (weight in x out) as bitsandbytes Linear4bit (nf4, fp32 compute): the
    4-bit base QLoRA and QVeRA train on. The embeddings and the head stay fp32."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D) and name.rsplit(".", 1)[-1] in COMPARE_TARGETS:
            in_features, out_features = module.weight.shape
            layer = bnb.nn.Linear4bit(in_features, out_features, compute_dtype=torch.float32, quant_type="nf4",
                                      device=module.weight.device)
            layer.weight = bnb.nn.Params4bit(module.weight.detach().t().contiguous().cpu(), requires_grad=False,
                                             quant_type="nf4")
            layer.bias = torch.nn.Parameter(module.bias.detach().clone(), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.to(module.weight.device))
    return model


def _adapted(method: str, base, rank: int, lora_rank: int):
    """A copy of the base with the method's adapter on COMPARE_TARGETS (GPT-2's Conv1D layers, or their
    4-bit Linear4bit replacements)."""
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    if method == "vera-kernels":
        return apply_vera(model, COMPARE_TARGETS, rank=rank, seed=0)
    import peft
    from transformers.pytorch_utils import Conv1D

    conv1d = any(isinstance(module, Conv1D) for module in model.modules())
    if method == "peft-vera":
        config = peft.VeraConfig(r=rank, target_modules=COMPARE_TARGETS, fan_in_fan_out=conv1d, projection_prng_key=0)
    else:
        config = peft.LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=COMPARE_TARGETS,
                                 fan_in_fan_out=conv1d)
    return peft.get_peft_model(model, config)


def _adapter_file_bytes(method: str, model) -> int:
    """Bytes of the adapter's weights file as each library writes it (PEFT: adapter_model.safetensors,
    with VeRA's default save_projection=True; its small adapter_config.json is not counted)."""
    with tempfile.TemporaryDirectory() as directory:
        if method == "vera-kernels":
            path = os.path.join(directory, "adapter.safetensors")
            save_adapter(model, path)
        else:
            model.save_pretrained(directory)
            path = os.path.join(directory, "adapter_model.safetensors")
        return os.path.getsize(path)


def _memory(model, ids, device) -> int:
    """GPU: the peak memory one training step adds; CPU: the bytes autograd saves in one forward."""
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    if device.type != "cuda":
        return saved_activation_bytes(lambda x: lm_loss(model, x), ids, owned)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    lm_loss(model, ids).backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    model.zero_grad(set_to_none=True)
    return peak


def compare(steps: int = 40, width: int = 256, layers: int = 2, rank: int = 64, lora_rank: int = 8,
            vera_lr: float = 2e-2, lora_lr: float = 2e-3, batch: int = 8, length: int = 64, device=None,
            base: str = "fp32") -> list[dict]:
    """Fine-tune one GPT-2 built from a config (random init, no download; frozen) on the Q&A text with each
    of COMPARE_METHODS: the same batches in the same order from the same seed, the same AdamW. The methods
    take their steps in turn (step 1 of each, then step 2, ...), so a change in the machine's load falls on
    all three alike. One row per method: trainable parameters, adapter file bytes, held-out loss before and
    after, the median and interquartile range of the step times (the first two steps, warm-up, excluded),
    the bytes of the whole model (``measure.model_bytes``) and the saved-activation bytes of one forward
    (CPU) or the peak memory of one step (GPU). ``base="nf4"``: the adapted layers are bitsandbytes 4-bit."""
    if base not in COMPARE_BASES:
        raise ValueError(f"base must be one of {', '.join(COMPARE_BASES)}; got {base!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    base_model = _gpt2(width, layers, length).to(device)
    if base == "nf4":
        base_model = _quantize_nf4(base_model)
    task_text, held_out = corpus(target_style, 2000, seed=2), corpus(target_style, 300, seed=3)
    eval_ids = next(batches(held_out, 16, length, seed=12345)).to(device)
    runs = []
    for method in COMPARE_METHODS:
        model = _adapted(method, base_model, rank, lora_rank).to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        lr = lora_lr if method == "peft-lora" else vera_lr
        runs.append(dict(method=method, model=model, lr=lr, times=[],
                         optimizer=torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
                         stream=batches(task_text, batch, length, seed=7),  # the same batches for every method
                         row=dict(method=method, trainable=sum(p.numel() for p in params), lr=lr, base=base,
                                  loss_before=_eval(model, eval_ids))))
    for _ in range(steps):
        for run in runs:
            model, optimizer, ids = run["model"], run["optimizer"], next(run["stream"]).to(device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            loss = lm_loss(model, ids)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            run["times"].append(time.perf_counter() - start)
    rows = []
    for run in runs:
        row, times = run["row"], run["times"][2:] or run["times"]
        quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        row.update(loss_after=_eval(run["model"], eval_ids), step_median=statistics.median(times),
                   step_iqr=quartiles[2] - quartiles[0], steps=steps,
                   memory=_memory(run["model"], eval_ids, device), memory_kind="peak" if device.type == "cuda" else "saved",
                   model_bytes=model_bytes(run["model"]),
                   file_bytes=_adapter_file_bytes(run["method"], run["model"]))
        rows.append(row)
    return rows


@torch.no_grad()
def _eval(model, ids) -> float:
    # In training mode: this GPT-2 has no dropout, so it evaluates the same, and bitsandbytes' 4-bit layers,
    # put in eval mode on a CPU with AVX512-BF16, repack their weights into a layout that can't train again.
    return lm_loss(model, ids).item()


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def compare_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (readable as plain text too)."""
    memory = "peak GPU memory of a step" if rows[0]["memory_kind"] == "peak" else "saved activations (one forward)"
    header = ["method", "base", "trainable params", "adapter file", f"loss after {rows[0]['steps']} steps (start)",
              "step time, median (IQR)", "whole model", memory, "lr"]
    body = [[r["method"], r["base"], f"{r['trainable']:,}", _size(r["file_bytes"]),
             f"{r['loss_after']:.3f} ({r['loss_before']:.3f})", f"{r['step_median'] * 1e3:.1f} ms ({r['step_iqr'] * 1e3:.1f})",
             _size(r["model_bytes"]), _size(r["memory"]), f"{r['lr']:g}"]
            for r in rows]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    fmt = lambda line: "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(line) for line in body])


def run_compare(args) -> int:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        print(f"--compare needs peft and transformers (pip install peft transformers): {exc}")
        return 1
    from .verify import device_name

    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    if args.base == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            print(f"--base nf4 needs bitsandbytes (pip install bitsandbytes): {exc}")
            return 1
    base = "bitsandbytes nf4 (4-bit) adapted layers" if args.base == "nf4" else "fp32"
    print(f"GPT-2 from a config (width {args.width}, {args.layers} layers, random init, frozen, {base}), adapters "
          f"on {', '.join(COMPARE_TARGETS)}; VeRA r={args.rank}, LoRA r={args.lora_rank}; {args.steps} AdamW steps "
          f"of batch 8 x 64 bytes of Q&A text, the same for each; on {device_name(device)}", flush=True)
    with warnings.catch_warnings():
        # transformers' and PEFT's deprecation notices about their own internals: nothing for the reader to do.
        warnings.filterwarnings("ignore", category=FutureWarning)
        rows = compare(steps=args.steps, width=args.width, layers=args.layers, rank=args.rank,
                       lora_rank=args.lora_rank, device=device, base=args.base)
    print(compare_table(rows))
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vera_kernels.demo", description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", action="store_true",
                        help="this package's VeRA, PEFT's VeRA and PEFT's LoRA side by side on one task")
    parser.add_argument("--base", choices=COMPARE_BASES, default="fp32",
                        help="--compare: the base's adapted layers in fp32 or bitsandbytes nf4 (4-bit)")
    parser.add_argument("--width", type=int, default=None, help="GPT-2 hidden size (default 96; --compare: 256)")
    parser.add_argument("--layers", type=int, default=2,
                        help="GPT-2 blocks (default: %(default)s)")
    parser.add_argument("--pretrain-steps", type=int, default=300,
                        help="pre-training steps of the default demo's base model (default: %(default)s; "
                        "--compare starts from a random init)")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default 200; --compare: 40)")
    parser.add_argument("--rank", type=int, default=None,
                        help="VeRA's r (default 256; --compare: 64, a quarter of the width as 256 is of 1024)")
    parser.add_argument("--lora-rank", type=int, default=8, help="the LoRA rank to compare with")
    args = parser.parse_args(argv)
    if args.compare:
        args.width, args.steps, args.rank = args.width or 256, args.steps or 40, args.rank or 64
        torch.set_flush_denormal(True)  # as below
        torch.set_num_threads(1)
        return run_compare(args)
    args.width, args.steps, args.rank = args.width or 96, args.steps or 200, args.rank or 256
    try:
        import transformers  # noqa: F401
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
    model = _gpt2(args.width, args.layers, length)
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
    merged = merge_and_unload(reloaded).eval()
    print(f"   merged into the base weights, plain GPT-2 again (merge_and_unload): loss "
          f"{eval_loss(merged, held_out, length):.3f}")
    prompt = torch.tensor([list(b"Q: who paints the moon? A:")])
    with torch.no_grad():
        out = merged.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=10)
    print(f"   greedy sample: {bytes(out[0].tolist()).decode(errors='replace')!r}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
