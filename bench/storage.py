"""Adapter bytes on disk for Llama-7B- and 13B-shaped models: this package's file (save_adapter), PEFT's
VeRA with and without its saved projections, and PEFT's LoRA at r = 8 and 64. Every figure is the size of
a real safetensors file, written to a temporary folder and read back with os.path.getsize.

    python -m bench.storage [--quick]     (VERA_BENCH_QUICK=1: as --quick)

No weights: the base layers are nn.Linear modules on the meta device (PEFT adapts them and, seeing meta
weights, puts its adapter tensors there too; those are then given real CPU storage, random values: a
file's size does not depend on them). Ours needs even less: stand-ins that only declare
in_features/out_features (apply_vera wraps them; save_adapter writes the λ vectors).
Targets: PEFT's default for Llama (q_proj, v_proj) and every linear layer of the blocks (q, k, v, o, gate,
up, down). --quick (CI): the 7B model, and no LoRA r = 64 file (hundreds of MB).
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings

import torch
from torch import nn

from bench.bench_common import parser, quick

MODELS = {  # hidden, intermediate, layers (the Llama configs)
    "llama-7b": (4096, 11008, 32),
    "llama-13b": (5120, 13824, 40),
}
TARGETS = {
    "q,v": ("q_proj", "v_proj"),
    "all linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
VERA_RANK = 256  # PEFT's default


class Features(nn.Module):
    """A stand-in for a linear layer: its sizes and nothing else."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features


def llama(hidden: int, intermediate: int, layers: int, linear) -> nn.Module:
    """A Llama-shaped tree of ``linear(in, out)`` modules under PEFT's names (model.layers.N.self_attn.q_proj...)."""
    shapes = dict(q_proj=(hidden, hidden), k_proj=(hidden, hidden), v_proj=(hidden, hidden), o_proj=(hidden, hidden),
                  gate_proj=(hidden, intermediate), up_proj=(hidden, intermediate), down_proj=(intermediate, hidden))
    blocks = nn.ModuleList()
    for _ in range(layers):
        attn = nn.Module()
        mlp = nn.Module()
        for name, (i, o) in shapes.items():
            setattr(mlp if name in ("gate_proj", "up_proj", "down_proj") else attn, name, linear(i, o))
        block = nn.Module()
        block.self_attn, block.mlp = attn, mlp
        blocks.append(block)
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = blocks
    return model


def _meta_linear(i, o):
    return nn.Linear(i, o, bias=False, device="meta")


def _file_bytes(folder: str) -> int:
    files = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    return sum(os.path.getsize(os.path.join(folder, f)) for f in files)


def ours(model_name: str, targets) -> int:
    import vera_kernels

    hidden, intermediate, layers = MODELS[model_name]
    model = llama(hidden, intermediate, layers, Features)
    vera_kernels.apply_vera(model, list(targets), rank=VERA_RANK)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "adapter.safetensors")
        vera_kernels.save_adapter(model, path)
        return os.path.getsize(path)


def peft_file(model_name: str, targets, kind: str) -> int:
    import peft

    hidden, intermediate, layers = MODELS[model_name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about meta devices and unsaved projections
        if kind.startswith("lora-"):
            config = peft.LoraConfig(r=int(kind.removeprefix("lora-")), target_modules=list(targets))
        else:
            config = peft.VeraConfig(r=VERA_RANK, target_modules=list(targets), save_projection=kind == "peft-vera")
        model = peft.get_peft_model(llama(hidden, intermediate, layers, _meta_linear), config)
        lora_modules = {id(m) for name, m in model.named_modules() if ".lora_A." in name or ".lora_B." in name}
        for sub in model.modules():
            for store in (sub._parameters, sub._buffers):
                for name, t in list(store.items()):
                    adapter = not (name == "weight" and isinstance(sub, nn.Linear) and id(sub) not in lora_modules)
                    if t is not None and t.device.type == "meta" and adapter:
                        real = torch.randn(t.shape, dtype=t.dtype)
                        store[name] = nn.Parameter(real, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else real
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            return _file_bytes(folder)


COLUMNS = {
    "vera-kernels": "this package (save_adapter: seed + λ vectors)",
    "peft-vera": "PEFT VeRA, save_projection=True (its default)",
    "peft-vera-noproj": "PEFT VeRA, save_projection=False",
    "lora-8": "PEFT LoRA r=8",
    "lora-64": "PEFT LoRA r=64",
}


def measure(quick: bool = False) -> list[dict]:
    rows = []
    for model_name in MODELS if not quick else ["llama-7b"]:
        for target_name, targets in TARGETS.items():
            row = dict(model=model_name, targets=target_name)
            for kind in COLUMNS:
                if quick and kind == "lora-64":
                    row[kind] = None
                    continue
                row[kind] = ours(model_name, targets) if kind == "vera-kernels" else peft_file(model_name, targets, kind)
            rows.append(row)
    return rows


def _size(n):
    if n is None:
        return "skipped"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def table(rows: list[dict]) -> str:
    header = ["model", "targets", *COLUMNS]
    body = [[r["model"], r["targets"], *(_size(r[k]) for k in COLUMNS)] for r in rows]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    legend = [f"  {k}: {v}" for k, v in COLUMNS.items()]
    return "\n".join(lines + [f"VeRA r={VERA_RANK}; sizes of the safetensors files written (1 MB = 10^6 bytes):"] + legend)


def main(argv=None) -> int:
    cli = parser("python -m bench.storage", __doc__)
    cli.add_argument("--quick", action="store_true",
                     help="the 7B model only, no LoRA r = 64 file (CI); VERA_BENCH_QUICK=1 does the same")
    args = cli.parse_args(argv)
    print(table(measure(args.quick or quick())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
