"""The benchmark harness without timing anything: its FLOP counts (DESIGN.md section 5), its case list and
the saved-activation bytes it measures. (No timed assertions: timings belong to bench/.)"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "bench"))
import harness  # noqa: E402
import report  # noqa: E402


def test_floor_ratios_of_design_section_5():
    args = (8192, 4096, 4096, 256)
    fwd = harness.flops("vera-cuda", "forward", *args) / harness.flops("base", "forward", *args)
    fb = harness.flops("vera-cuda", "forward+backward", *args) / harness.flops("base", "forward+backward", *args)
    assert fwd == 1.125 and fb == pytest.approx(1.156, abs=1e-3)
    assert harness.flops("merged", "forward", *args) == harness.flops("base", "forward", *args)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("quick", [False, True])
def test_cases(device, quick):
    cases = harness.cases(device, quick)
    assert len({c.id for c in cases}) == len(cases)
    seen_base = set()
    for c in cases:
        key = (c.pass_, c.m, c.in_features, c.out_features)
        if c.impl == "base":
            seen_base.add(key)
        assert key in seen_base, f"{c.id} comes before its base"  # the report's ratios need the base
        assert c.pass_ == "forward" or (c.m > harness.DECODE_M and c.impl != "merged")
    impls = {c.impl for c in cases}
    assert {"base", "merged", "unfused", "peft", "peft-compile", "lora-8", "lora-64"} <= impls
    assert "vera-triton" not in impls or device == "cuda"  # interpreted timings are never benchmarked


def test_saved_activations_ours_vs_peft():
    pytest.importorskip("peft")
    from vera_kernels import backends

    sizes = {}
    for impl in ("vera-cpu", "peft", "unfused"):
        if impl == "vera-cpu" and not backends()["cpu"].available:
            continue
        runner = harness.Runner(harness.Case(impl, "forward+backward", 8, 32, 48, 4), torch.float32, "cpu")
        sizes[impl] = runner.saved_activation_bytes()
        runner.setup()
        runner.target()
        assert runner.x.grad is not None and all(p.grad is not None for p in runner.layer.trainable)
    if "vera-cpu" in sizes:
        assert sizes["vera-cpu"] == 8 * 4 * 4  # s = x Aᵀ, M x r fp32, and nothing else
    assert sizes["peft"] > 8 * 48 * 4  # PEFT keeps an M x out tensor


def test_report_ratios_and_table():
    rows = [dict(impl=i, pass_="forward", m=16, in_features=64, out_features=64, rank=r, seconds=s, flops=f,
                 tflops=None, saved_activation_bytes=None, peak_bytes=None)
            for i, r, s, f in (("base", None, 1.0, 100), ("vera-cpu", 8, 1.5, 125))]
    base, vera = report.with_ratios(rows)
    assert vera["x_base"] == 1.5 and vera["x_floor"] == pytest.approx(1.2)
    assert "vera-cpu" in report.table([base, vera]) and report.table([vera], markdown=True).startswith("| pass")
