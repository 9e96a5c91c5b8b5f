"""The demo's --compare mode, tiny: this package's VeRA, PEFT's VeRA and PEFT's LoRA on one task."""

import math

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from vera_kernels import demo, vera_layers  # noqa: E402

TINY = dict(steps=3, width=32, layers=1, rank=8, lora_rank=2, batch=2, length=16)


def test_compare_rows_agree_with_the_adapters_definitions():
    rows = {row["method"]: row for row in demo.compare(**TINY, device="cpu")}
    assert list(rows) == list(demo.COMPARE_METHODS)
    width, r, lora_r = TINY["width"], TINY["rank"], TINY["lora_rank"]
    # GPT-2 block: c_attn w -> 3w, attn c_proj w -> w, c_fc w -> 4w, mlp c_proj 4w -> w.
    layers = [(width, 3 * width), (width, width), (width, 4 * width), (4 * width, width)]
    assert rows["vera-kernels"]["trainable"] == rows["peft-vera"]["trainable"] == sum(r + o for _, o in layers)
    assert rows["peft-lora"]["trainable"] == sum(lora_r * (i + o) for i, o in layers)
    # PEFT's VeRA file carries its projections; ours a seed. Ours saves s (M x r) where PEFT keeps more.
    assert rows["vera-kernels"]["file_bytes"] < rows["peft-vera"]["file_bytes"]
    assert rows["vera-kernels"]["memory"] < rows["peft-vera"]["memory"]
    for row in rows.values():
        assert math.isfinite(row["loss_after"]) and row["loss_after"] != row["loss_before"]
        assert row["step_median"] > 0 and row["step_iqr"] >= 0 and row["memory_kind"] == "saved"
    # Same base, same held-out batch: every method starts from the base model's loss (adapters start at identity).
    assert len({round(row["loss_before"], 5) for row in rows.values()}) == 1


def test_compare_command_prints_the_table(capsys):
    threads = torch.get_num_threads()
    try:
        assert demo.main(["--compare", "--steps", "3", "--width", "32", "--layers", "1", "--rank", "8"]) == 0
    finally:  # main sets both for the process
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
    out = capsys.readouterr().out
    assert "| method" in out and all(f"| {method}" in out for method in demo.COMPARE_METHODS)


def test_compare_over_a_4bit_base():
    bnb = pytest.importorskip("bitsandbytes")
    # Width 64: bitsandbytes' CPU 4-bit kernel wants in_features a multiple of its block size (64).
    tiny = dict(TINY, width=64)
    rows = {row["method"]: row for row in demo.compare(**tiny, device="cpu", base="nf4")}
    fp32 = {row["method"]: row for row in demo.compare(**tiny, device="cpu")}
    assert list(rows) == list(demo.COMPARE_METHODS) and {row["base"] for row in rows.values()} == {"nf4"}
    assert rows["vera-kernels"]["trainable"] == rows["peft-vera"]["trainable"] == fp32["vera-kernels"]["trainable"]
    for method, row in rows.items():
        # The adapted layers hold 4 bits a weight (plus block scales) where the fp32 base holds 32.
        assert row["model_bytes"] < fp32[method]["model_bytes"], method
        assert math.isfinite(row["loss_after"]) and row["loss_after"] != row["loss_before"]
    model = demo._adapted("vera-kernels", demo._quantize_nf4(demo._gpt2(64, 1, 16)), 8, 2)
    assert all(type(layer.base_layer) is bnb.nn.Linear4bit for _, layer in vera_layers(model))
    with pytest.raises(ValueError, match="base must be one of"):
        demo.compare(**tiny, device="cpu", base="int3")
