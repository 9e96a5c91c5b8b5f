"""Export an adapter file as an exact LoRA directory, for the engines that serve LoRA only.

    python -m vera_kernels.export --lora ADAPTER_FILE --base MODEL_DIR OUT_DIR [--dtype float32]

ADAPTER_FILE is a file written by ``vera_kernels.save_adapter`` (a seed and two vectors per layer: KBs);
MODEL_DIR a Hugging Face model directory (only its config.json is read: the model is built on the meta
device, its weights neither read nor allocated). OUT_DIR receives adapter_config.json and
adapter_model.safetensors, which PEFT, vLLM, SGLang, TGI and LoRAX load as any LoRA: lora_A = d ⊙ A,
lora_B = b ⊙ B, lora_alpha = r, one rounding per factor (``lora_export``). Exit status 2, with the reason,
for a file that does not fit the model (nothing is written then).
"""

import argparse
import sys

import torch

from .lora_export import export_adapter_file

# The saved factor dtypes offered.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vera_kernels.export",
        description=(
            "Write the exact LoRA adapter directory (adapter_config.json, adapter_model.safetensors) of a "
            "vera-kernels adapter file, for engines that serve LoRA only (vLLM, SGLang, TGI, LoRAX, PEFT). "
            "lora_A = d * A (r x in), lora_B = b * B (out x r), lora_alpha = r (scaling 1): one rounding per "
            "factor. Only the base model's config is read (its weights are neither read nor allocated). The "
            "engine then holds r*(in+out) numbers per layer instead of VeRA's r+out: keep the file, export "
            "where it is served. vLLM needs --max-lora-rank >= r and serves no trained biases."
        ),
    )
    parser.add_argument("--lora", required=True, metavar="ADAPTER_FILE",
                        help="the adapter file (a safetensors file written by vera_kernels.save_adapter)")
    parser.add_argument("--base", required=True, metavar="MODEL_DIR",
                        help="the base model: a Hugging Face model directory (or hub id) whose config.json "
                             "describes the model the adapter was trained on")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the LoRA directory to write (created if missing)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype of the saved factors (default: float32)")
    parser.add_argument("--auto-class", default="AutoModelForCausalLM", metavar="CLASS",
                        help="the transformers auto class the adapter's module names are relative to "
                             "(default: AutoModelForCausalLM; e.g. AutoModel, AutoModelForSequenceClassification)")
    parser.add_argument("--base-model-name", default=None, metavar="NAME",
                        help="base_model_name_or_path written into adapter_config.json (default: MODEL_DIR)")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        out = export_adapter_file(args.lora, args.base, args.out_dir, dtype=DTYPES[args.dtype],
                                  auto_class=args.auto_class, base_model_name_or_path=args.base_model_name)
    except (ValueError, TypeError, OSError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
