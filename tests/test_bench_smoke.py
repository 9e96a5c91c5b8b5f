"""The benchmark harness without timing anything: its FLOP counts (docs/DESIGN.md section 5), its case list and
the saved-activation bytes it measures. (No timed assertions: timings belong to bench/.)"""

import importlib
import json
import os
import re
import subprocess
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


# --------------------------------------------------------------------------------------------------
# The tools: VERA_BENCH_QUICK alike in every file, every suite in the records and the report, --help texts.

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
BENCH = os.path.join(ROOT, "bench")


def test_vera_bench_quick_is_read_in_one_place():
    # Each file read it its own way (three of seven at all): now bench_common.quick() is the only reader.
    readers = []
    for name in sorted(os.listdir(BENCH)):
        if name.endswith((".py", ".sh")) and name != "bench_common.py":
            with open(os.path.join(BENCH, name), encoding="utf-8") as f:
                text = f.read()
            if re.search(r"environ(\.get\(|\[)[\"']VERA_BENCH_QUICK", text):
                readers.append(name)
    assert readers == []


def test_vera_bench_quick_means_one_round_of_the_smallest_shapes_in_every_suite():
    # Imported with the variable set, as pytest bench/ imports them: every suite's settings are quick ones.
    code = (
        "import harness, bench_common, test_bench_projections as p, test_bench_multi_adapter as m, "
        "test_bench_cpu as c\n"
        "s = harness.settings('cpu')\n"
        "print(s['rounds'], len(s['layers']), len(s['ranks']), bench_common.rounds(m.ROUNDS), len(p.SHAPES), "
        "len(c.SHAPES), c.INTERLEAVED_ROUNDS)\n"
    )
    env = dict(os.environ, VERA_BENCH_QUICK="1", PYTHONPATH=os.pathsep.join([BENCH, ROOT]))
    env.pop("VERA_BENCH_DRY_RUN", None)
    pytest.importorskip("peft")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-7:] == ["1"] * 7


def test_every_suite_is_recorded_and_reported_one_table_each(tmp_path):
    # A real quick run of one small suite case: its row lands in the records under "suites" with its
    # dispersion and load, and bench.report prints a table for that suite with the row flagged few-rounds.
    records = tmp_path / "records.json"
    env = dict(os.environ, VERA_BENCH_QUICK="1", VERA_BENCH_DRY_RUN="1", VERA_BENCH_JSON=str(records))
    done = subprocess.run([sys.executable, "-m", "pytest", "bench/test_bench_projections.py", "-k", "torch-torch.float32",
                           "--benchmark-only", "-q", "-p", "no:cacheprovider"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    data = json.loads(records.read_text())
    (row,) = data["suites"]
    assert row["suite"] == "projections" and row["rounds"] == 1 and row["seconds"] > 0
    assert {"min_seconds", "iqr_seconds", "load_avg_1min", "others_busy", "extra_info"} <= set(row)
    out = subprocess.run([sys.executable, "-m", "bench.report", str(records)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300).stdout
    assert "suite: projections" in out and "few-rounds" in out and "test_generate_projections[" in out
    assert "machine load while timing" in out.split("suite: projections")[1]


def test_report_flags_a_noisy_suite_row():
    rows = [dict(suite="multi_adapter", name="test_vera_multi[1]", seconds=1.0, min_seconds=0.5, q1_seconds=0.8,
                 q3_seconds=1.3, iqr_seconds=0.5, rounds=5, extra_info=dict(k=1, ratio_to_base=1.2)),
            dict(suite="multi_adapter", name="test_vera_multi[16]", seconds=1.0, min_seconds=0.99, q1_seconds=0.99,
                 q3_seconds=1.01, iqr_seconds=0.02, rounds=5, extra_info={})]
    (block,) = report.suite_tables(rows)
    noisy, quiet = [line for line in block.splitlines() if line.startswith("test_vera_multi")]
    assert noisy.endswith("noisy") and "to_base=1.2" in noisy and not quiet.endswith("noisy")
    assert "1 of 2 rows" in block


COMMANDS = ["bench.report", "bench.plan", "bench.overhead", "bench.serving", "bench.storage", "vera_kernels.verify",
            "vera_kernels.demo"]


@pytest.mark.parametrize("module", COMMANDS)
def test_help_is_complete(module, capsys):
    sys.path.insert(0, ROOT)
    try:
        main = importlib.import_module(module).main
    finally:
        sys.path.remove(ROOT)
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m {module} ")
    assert "``" not in out and "default: None" not in out
    description, options = out.split("\noptions:\n")
    assert description.rstrip()[-1] in ".)", f"the description is cut off: ...{description.rstrip()[-80:]!r}"
    lines = options.splitlines()
    for i, line in enumerate(lines):  # every option has a help text, on its line or the next
        if line.startswith("  -"):
            has_help = re.match(r"  \S.*?\s{2,}\S", line) or (i + 1 < len(lines) and lines[i + 1].startswith(" " * 10))
            assert has_help, f"{module}: no help for {line.strip()!r}"


def test_cpu_name_counts_threads_in_words():
    from vera_kernels.verify import device_name

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert device_name("cpu").endswith(", 1 thread")
        torch.set_num_threads(2)
        assert device_name("cpu").endswith(", 2 threads")
    finally:
        torch.set_num_threads(threads)
