"""The exact LoRA export against PEFT's SVD conversion (``peft.save_as_lora``, i.e. ``convert_to_lora``) on
one adapter: how far each LoRA's outputs lie from the VeRA model's, and what each costs the engine.

    python -m bench.lora_export [--quick]

The model is a Llama built from a config (no download; fp32): hidden 512, intermediate 1024, 4 layers,
vocabulary 1024; a VeRA adapter of rank 256 (PEFT's default) on q, k, v, o, gate, up and down with random
lambdas (d ~ N(0, 1), b ~ N(0, 0.1): the spectrum of each ΔW is then spread over its r directions, as a
trained adapter's may or may not be; a sharper spectrum favours the SVD). Each LoRA is saved and loaded back
through PEFT (PeftModel.from_pretrained), as a server would load it. Errors, against the VeRA model
evaluated in float64 on the same 8 x 64 random tokens: the largest |log-probability difference| over every
position and token, and the relative Frobenius error of the log-probabilities. The VeRA model in fp32 is
the floor (its own rounding). Numbers per layer: what an engine holds per adapted layer (LoRA: r_LoRA·(in + out); VeRA:
r + out, plus the shared pair). --quick (CI): 2 layers, SVD ranks 8 and 256 only.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import warnings

import torch

RANK = 256
SVD_RANKS = (8, 32, 64, 128, 256)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(layers: int):
    import transformers

    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                      max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def log_probs(model, ids, dtype=torch.float32):
    with torch.no_grad():
        return torch.log_softmax(model(ids).logits.to(dtype), dim=-1)


def errors(got, want):
    got = got.double()
    return (got - want).abs().max().item(), ((got - want).norm() / want.norm()).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lora_export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, SVD ranks 8 and 256 (CI)")
    args = parser.parse_args(argv)
    import peft

    import vera_kernels

    warnings.filterwarnings("ignore")
    layers = 2 if args.quick else 4
    svd_ranks = (8, 256) if args.quick else SVD_RANKS
    base = build(layers)
    ours = vera_kernels.apply_vera(copy.deepcopy(base), TARGETS, rank=RANK, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in vera_kernels.vera_layers(ours):
            layer.lambda_d.copy_(torch.randn(layer.lambda_d.shape, generator=g))
            layer.lambda_b.copy_(torch.randn(layer.lambda_b.shape, generator=g) * 0.1)
    ids = torch.randint(0, 1024, (8, 64), generator=g)
    reference = log_probs(copy.deepcopy(ours).double(), ids, torch.float64)
    shapes = [(m.in_features, m.out_features) for _, m in vera_kernels.vera_layers(ours)]

    def per_layer(rank):
        return sum(rank * (i + o) for i, o in shapes) / len(shapes)

    rows = [("VeRA (this package), fp32", "-", sum(RANK + o for _, o in shapes) / len(shapes),
             *errors(log_probs(ours, ids), reference))]
    rows.append(("base model (no adapter)", "-", 0, *errors(log_probs(base, ids), reference)))
    with tempfile.TemporaryDirectory() as tmp:
        vk_to_lora = vera_kernels.to_lora(copy.deepcopy(ours))
        vk_to_lora.save_pretrained(f"{tmp}/exact")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), f"{tmp}/exact").eval()
        rows.append(("exact export (to_lora), fp32", RANK, per_layer(RANK), *errors(log_probs(loaded, ids), reference)))
        vera_peft = vera_kernels.to_peft(copy.deepcopy(ours))
        for rank in svd_ranks:
            peft.save_as_lora(f"{tmp}/svd{rank}", vera_peft, rank=rank)
            loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), f"{tmp}/svd{rank}").eval()
            rows.append((f"PEFT save_as_lora (SVD), fp32", rank, per_layer(rank), *errors(log_probs(loaded, ids), reference)))

    print(f"Llama {layers} layers, hidden 512, intermediate 1024; VeRA r = {RANK} on {', '.join(TARGETS)}; "
          f"errors against the VeRA model in float64, {ids.numel()} positions x 1024 tokens; torch "
          f"{torch.__version__}, peft {peft.__version__} (CPU)\n")
    print("| adapter | LoRA rank | numbers per layer | max abs log-prob error | relative log-prob error |")
    print("|---|---:|---:|---:|---:|")
    for name, rank, numbers, worst, relative in rows:
        print(f"| {name} | {rank} | {numbers:,.0f} | {worst:.2e} | {relative:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
