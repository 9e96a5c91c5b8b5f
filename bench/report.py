"""The benchmarks' summary: one table per suite, each row with its median time and dispersion, flags on
the rows whose figures cannot be trusted, and a line per suite on the machine's load while it ran.

    python -m bench.report [RESULTS.json] [--plot PATH.png] [--markdown]

RESULTS.json: the records that a run of pytest bench/ --benchmark-only wrote (default: VERA_BENCH_JSON if
set, else .benchmarks/vera-layers-<device>.json, the file the suites write by default).

The layer suite (bench/test_bench_layers.py): time (the median), min (the fastest round), IQR (over the
median), TFLOP/s, the ratios to the base layer and to the floor, the saved-activation bytes, the peak
memory, and a plot of time against M per implementation (where matplotlib is installed). x base: the time
over the base nn.Linear's, same pass and M. x floor: the time over the floor of docs/DESIGN.md section 5,
the base's time scaled by the implementation's minimal FLOPs over the base's (VeRA forward at
in = out = 4096, r = 256: 1.125 x base; merged: 1.00 x).

Every other suite (multi-adapter, projections, CPU): each benchmark's median, min, IQR and rounds, and the
ratios it recorded itself (extra_info), e.g. a K's time over K = 1's.

Flags (see FLAGS): a row is flagged when its spread, or its base's, makes its ratios meaningless, when it
ran too few rounds to show a spread, or when it contradicts another row in a way only a change of load
explains (a smaller M slower than a larger one, forward+backward faster than the forward alone).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

IMPL_ORDER = ["base", "merged", "vera-cuda", "vera-triton", "vera-triton-pointers", "vera-cpu", "unfused", "peft",
              "peft-compile", "lora-8", "lora-64", "base+graph", "vera-cuda+graph", "vera-triton+graph", "peft+graph",
              "lora-8+graph"]
PASS_ORDER = ["forward", "backward", "forward+backward"]

# A row whose IQR exceeds this fraction of its median is too noisy for its ratios to mean anything at the
# precision they are printed with (the targets differ from the floor by 5-15%).
NOISE = 0.10
# Other processes keeping more than this share of the CPUs busy make CPU timings unreliable.
BUSY = 0.25
FLAGS = {
    "noisy": f"IQR above {NOISE:.0%} of the median",
    "base-noisy": f"the base row this ratio divides by has an IQR above {NOISE:.0%} of its median",
    "~base": "the ratio's interquartile interval (q1/q3 of the base .. q3/q1 of the base) contains 1: not "
             "distinguishable from the base",
    "few-rounds": "fewer than 4 rounds: no IQR (the IQR column shows the range of 2 or 3 rounds, - for 1)",
    "M-order": "slower than the same implementation at a larger M: the load changed during the run",
    "fb<fwd": "forward+backward faster than the forward alone: the load changed during the run",
}


def default_path() -> str:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return os.environ.get("VERA_BENCH_JSON") or os.path.join(".benchmarks", f"vera-layers-{device}.json")


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row with x_base and x_floor where the base ran on the same pass, M and layer, and its flags."""
    base = {(r["pass_"], r["m"], r["in_features"], r["out_features"]): r for r in rows if r["impl"] == "base"}
    out = []
    for r in rows:
        r = dict(r)
        b = base.get((r["pass_"], r["m"], r["in_features"], r["out_features"]))
        if b and b["seconds"] and r["seconds"]:
            r["x_base"] = r["seconds"] / b["seconds"]
            r["x_floor"] = r["seconds"] / (b["seconds"] * r["flops"] / b["flops"])
        r["flags"] = _flags(r, b if r["impl"] != "base" else None)
        out.append(r)
    _flag_contradictions(out)
    return sorted(out, key=_order)


def _spread(r) -> float | None:
    """IQR over the median, None where the record has no dispersion (older files, --benchmark-disable)."""
    if r.get("iqr_seconds") is None or not r.get("seconds"):
        return None
    return r["iqr_seconds"] / r["seconds"]


def _flags(r, b) -> list[str]:
    flags = []
    if r.get("rounds") is not None and 0 < r["rounds"] < 4:
        flags.append("few-rounds")
    spread = _spread(r)
    if spread is not None and spread > NOISE:
        flags.append("noisy")
    if b is not None and "x_base" in r:
        base_spread = _spread(b)
        if base_spread is not None and base_spread > NOISE:
            flags.append("base-noisy")
        if None not in (r.get("q1_seconds"), r.get("q3_seconds"), b.get("q1_seconds"), b.get("q3_seconds")) \
                and b["q1_seconds"] > 0 and b["q3_seconds"] > 0:
            low, high = r["q1_seconds"] / b["q3_seconds"], r["q3_seconds"] / b["q1_seconds"]
            if low <= 1.0 <= high:
                flags.append("~base")
    return flags


def _flag_contradictions(rows) -> None:
    """M-order and fb<fwd, between rows of the same implementation, layer and rank. Each pair is judged on
    medians with a margin of the larger spread, so that noise alone does not flag."""
    def key(r):
        return (r["impl"], r["in_features"], r["out_features"], r["rank"])

    def margin(*rs):
        return 1.0 + max([_spread(r) or 0.0 for r in rs])

    timed = [r for r in rows if r["seconds"]]
    for r in timed:
        for other in timed:
            if key(other) != key(r):
                continue
            if other["pass_"] == r["pass_"] and other["m"] > r["m"] and r["seconds"] > other["seconds"] * margin(r, other):
                if "M-order" not in r["flags"]:
                    r["flags"].append("M-order")
            if r["pass_"] == "forward+backward" and other["pass_"] == "forward" and other["m"] == r["m"] \
                    and r["seconds"] * margin(r, other) < other["seconds"] and "fb<fwd" not in r["flags"]:
                r["flags"].append("fb<fwd")


def load_note(rows: list[dict]) -> str:
    """One line on the machine's load while the suite timed its cases."""
    loads = [r["load_avg_1min"] for r in rows if r.get("load_avg_1min") is not None]
    others = sorted(r["others_busy"] for r in rows if r.get("others_busy") is not None)
    if not loads and not others:
        return "machine load: not recorded in this file"
    cpus = next((r["cpus"] for r in rows if r.get("cpus")), None)
    parts = []
    if loads:
        parts.append(f"1-min load average {min(loads):.1f} to {max(loads):.1f}" + (f" on {cpus} CPUs" if cpus else ""))
    if others:
        parts.append(f"other processes kept {others[len(others) // 2]:.0%} of the CPUs busy (median over the cases; "
                     f"up to {others[-1]:.0%})")
    busy = (others and others[len(others) // 2] > BUSY) or (loads and cpus and max(loads) > cpus)
    verdict = "BUSY: CPU timings from this run are unreliable" if busy else "quiet enough"
    return "machine load while timing: " + "; ".join(parts) + f" -> {verdict}"


def _order(r):
    return (r["in_features"], r["out_features"], r["rank"] or 0, PASS_ORDER.index(r["pass_"]), r["m"],
            IMPL_ORDER.index(r["impl"]) if r["impl"] in IMPL_ORDER else len(IMPL_ORDER))


def _seconds(s):
    if s is None:
        return "-"
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def _bytes(n):
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _iqr_percent(r) -> str:
    spread = _spread(r)
    return "-" if spread is None or (r.get("rounds") or 0) < 2 else f"{spread:.0%}"


def table(rows: list[dict], markdown: bool = False) -> str:
    header = ["pass", "in->out", "r", "M", "impl", "time", "min", "IQR", "TFLOP/s", "x base", "x floor", "saved",
              "peak", "flags"]
    body = []
    for r in rows:
        body.append([
            r["pass_"], f"{r['in_features']}->{r['out_features']}", str(r["rank"] or "-"), str(r["m"]), r["impl"],
            _seconds(r["seconds"]), _seconds(r.get("min_seconds")), _iqr_percent(r),
            "-" if r.get("tflops") is None else f"{r['tflops']:.3g}",
            f"{r['x_base']:.2f}" if "x_base" in r else "-", f"{r['x_floor']:.2f}" if "x_floor" in r else "-",
            "-" if r["pass_"] == "forward" else _bytes(r["saved_activation_bytes"]), _bytes(r["peak_bytes"]),
            ",".join(r.get("flags", [])),
        ])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in body])
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    numeric = range(5, len(header) - 1)
    lines = ["  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
             for line in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def flag_summary(rows: list[dict]) -> str:
    """How many rows carry each flag, with its meaning; empty when none does."""
    counts = {flag: sum(flag in r.get("flags", []) for r in rows) for flag in FLAGS}
    lines = [f"  {flag:<10} {n:>3} rows: {FLAGS[flag]}" for flag, n in counts.items() if n]
    if not lines:
        return f"flags: none (every row's IQR is within {NOISE:.0%} of its median)"
    flagged = sum(bool(r.get("flags")) for r in rows)
    return "\n".join([f"flags: {flagged} of {len(rows)} rows; their ratios are not meaningful as printed"] + lines)


def plot(rows: list[dict], path: str) -> bool:
    """Time against M per implementation, one panel per (layer, r, pass); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = sorted({(r["in_features"], r["out_features"], r["rank"], r["pass_"]) for r in rows if r["rank"]},
                    key=lambda p: (p[0], p[1], p[2], PASS_ORDER.index(p[3])))
    if not panels:
        return False
    cols = 3
    fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, figsize=(5 * cols, 3.6 * ((len(panels) + cols - 1) // cols)),
                             squeeze=False)
    for ax, (in_f, out_f, rank, pass_) in zip(axes.flat, panels):
        # r-independent implementations (base, merged, LoRA) appear in every panel of their layer.
        here = [r for r in rows if (r["in_features"], r["out_features"], r["pass_"]) == (in_f, out_f, pass_)
                and r["rank"] in (None, rank) and r["seconds"]]
        for impl in [i for i in IMPL_ORDER if any(r["impl"] == i for r in here)]:
            points = sorted((r["m"], r["seconds"] * 1e3) for r in here if r["impl"] == impl)
            ax.plot(*zip(*points), marker="o", label=impl, linestyle="--" if impl == "base" else "-")
        ax.set(xscale="log", yscale="log", xlabel="M (tokens)", ylabel="ms", title=f"{pass_}  {in_f}->{out_f}  r={rank}")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def suite_tables(rows: list[dict]) -> list[str]:
    """One block per suite of the records' "suites" rows: a title, its load line, the table and its flags."""
    blocks = []
    for suite in dict.fromkeys(r["suite"] for r in rows):
        here = [dict(r, flags=_flags(r, None)) for r in rows if r["suite"] == suite]  # no base: spread alone
        header = ["benchmark", "time", "min", "IQR", "rounds", "recorded ratios", "flags"]
        body = [[r["name"], _seconds(r["seconds"]), _seconds(r.get("min_seconds")), _iqr_percent(r),
                 str(r.get("rounds", "-")), _ratios(r.get("extra_info") or {}), ",".join(r["flags"])] for r in here]
        widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
        lines = ["  ".join(c.rjust(w) if i in (1, 2, 3, 4) else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
                 for line in [header] + body]
        lines.insert(1, "  ".join("-" * w for w in widths))
        blocks.append("\n".join([f"suite: {suite}", load_note(here), *lines, flag_summary(here)]))
    return blocks


def _ratios(info: dict) -> str:
    """The ratios a benchmark recorded (extra_info keys with "ratio"), compactly."""
    parts = []
    for key, value in info.items():
        if "ratio" in key and isinstance(value, (int, float)):
            parts.append(f"{key.replace('_ratio', '').replace('ratio_', '').replace('time_', '')}={value:.3g}")
    return " ".join(parts) or "-"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", default=None, metavar="RESULTS.json",
                        help=f"the records (default: {default_path()}, from VERA_BENCH_JSON if set)")
    parser.add_argument("--plot", metavar="PNG", help="where the layer suite's plot goes (default: beside the "
                                                      "records, RESULTS.png)")
    parser.add_argument("--markdown", action="store_true", help="the layer table as Markdown (for bench/RESULTS.md)")
    args = parser.parse_args(argv)
    path = args.path or default_path()
    if not os.path.exists(path):
        print(f"no records at {path}: run pytest bench/ --benchmark-only first", file=sys.stderr)
        return 1
    with open(path) as f:
        data = json.load(f)
    env = data["environment"]
    print(f"{data['date']}  " + ", ".join(f"{k} {v}" for k, v in env.items()))
    if data["results"]:
        s = data["settings"]
        print(f"\nsuite: layers; dtype {s['dtype']}, {s['rounds']} rounds after {s['warmup']} warm-up"
              + (" (quick)" if s["quick"] else "")
              + "; time: the median, min: the fastest round, IQR: the interquartile range over the median")
        rows = with_ratios(data["results"])
        print(load_note(data["results"]))
        print(table(rows, args.markdown))
        print(flag_summary(rows))
        png = args.plot or os.path.splitext(path)[0] + ".png"
        print(f"plot: {png}" if plot(rows, png) else "plot: skipped (matplotlib is not installed)")
    for block in suite_tables(data.get("suites", [])):
        print("\n" + block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
