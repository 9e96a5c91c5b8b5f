"""The benchmark harness without timing anything: its FLOP counts (docs/DESIGN.md section 5), its case list and
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


def _row(impl, seconds, spread=0.02, pass_="forward", m=16, rank=None, rounds=9, **extra):
    half = seconds * spread / 2
    return dict(impl=impl, pass_=pass_, m=m, in_features=64, out_features=64, rank=rank, seconds=seconds,
                flops=100 if impl == "base" else 125, tflops=None, saved_activation_bytes=None, peak_bytes=None,
                min_seconds=seconds - 2 * half, q1_seconds=seconds - half, q3_seconds=seconds + half,
                iqr_seconds=2 * half, rounds=rounds, **extra)


def test_dispersion_of_round_times():
    stats = harness.dispersion([5.0, 1.0, 2.0, 4.0, 3.0])
    assert stats == dict(min=1.0, median=3.0, q1=2.0, q3=4.0, iqr=2.0)
    assert harness.dispersion([2.0, 1.0]) == dict(min=1.0, median=1.5, q1=1.0, q3=2.0, iqr=1.0)  # a range
    assert harness.dispersion([])["median"] is None


def test_report_flags_rows_whose_spread_or_order_makes_ratios_meaningless():
    rows = report.with_ratios([
        _row("base", 1.0), _row("vera-cpu", 1.5, rank=8),                      # clean: a real 1.5x
        _row("peft", 1.02, spread=0.3, rank=8),                                 # noisy and ~1x the base
        _row("base", 1.0, m=128), _row("vera-cpu", 2.0, m=128, rank=8, rounds=1),
        _row("base", 0.5, m=512),                                               # M=128 slower than M=512
        _row("base", 0.9, m=512, pass_="forward+backward"),                     # slower than its forward: fine
    ])
    flags = {(r["impl"], r["pass_"], r["m"]): r["flags"] for r in rows}
    assert flags[("vera-cpu", "forward", 16)] == []
    assert {"noisy", "~base"} <= set(flags[("peft", "forward", 16)])
    assert "few-rounds" in flags[("vera-cpu", "forward", 128)]
    assert "M-order" in flags[("base", "forward", 128)] and "M-order" in flags[("base", "forward", 16)]
    assert "fb<fwd" not in flags[("base", "forward+backward", 512)]  # 0.9 s against a 0.5 s forward: plausible
    rows = report.with_ratios([_row("base", 1.0, m=512), _row("base", 0.6, m=512, pass_="forward+backward")])
    assert "fb<fwd" in rows[1]["flags"]
    table = report.table(rows)
    assert "fb<fwd" in table and "IQR" in table.splitlines()[0]
    assert "fb<fwd" in report.flag_summary(rows) and report.flag_summary(report.with_ratios([_row("base", 1.0)])).startswith("flags: none")


def test_load_note():
    quiet = [dict(load_avg_1min=0.3, cpus=2, others_busy=0.05)]
    busy = [dict(load_avg_1min=6.5, cpus=2, others_busy=0.7)]
    assert "quiet enough" in report.load_note(quiet)
    assert "BUSY" in report.load_note(busy) and "70%" in report.load_note(busy)
    assert "not recorded" in report.load_note([{}])
