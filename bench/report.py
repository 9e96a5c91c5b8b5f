"""The layer benchmark's summary: a table with TFLOP/s, the ratios to the base layer and to the floor, the
saved-activation bytes and the peak memory; and a plot of time against M per implementation (where
matplotlib is installed).

    python -m bench.report [RESULTS.json] [--plot PATH.png] [--markdown]

RESULTS.json defaults to the file the suite just wrote (VERA_BENCH_JSON, else .benchmarks/vera-layers-<device>.json).
x base: the time over the base nn.Linear's, same pass and M. x floor: the time over the floor of DESIGN.md
section 5, the base's time scaled by the implementation's minimal FLOPs over the base's (VeRA forward at
in = out = 4096, r = 256: 1.125 x base; merged: 1.00 x).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

IMPL_ORDER = ["base", "merged", "vera-cuda", "vera-triton", "vera-cpu", "unfused", "peft", "peft-compile", "lora-8",
              "lora-64"]
PASS_ORDER = ["forward", "backward", "forward+backward"]


def default_path() -> str:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return os.environ.get("VERA_BENCH_JSON") or os.path.join(".benchmarks", f"vera-layers-{device}.json")


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row with x_base and x_floor where the base ran on the same pass, M and layer."""
    base = {(r["pass_"], r["m"], r["in_features"], r["out_features"]): r for r in rows if r["impl"] == "base"}
    out = []
    for r in rows:
        r = dict(r)
        b = base.get((r["pass_"], r["m"], r["in_features"], r["out_features"]))
        if b and b["seconds"] and r["seconds"]:
            r["x_base"] = r["seconds"] / b["seconds"]
            r["x_floor"] = r["seconds"] / (b["seconds"] * r["flops"] / b["flops"])
        out.append(r)
    return sorted(out, key=_order)


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


def table(rows: list[dict], markdown: bool = False) -> str:
    header = ["pass", "in->out", "r", "M", "impl", "time", "TFLOP/s", "x base", "x floor", "saved", "peak"]
    body = []
    for r in rows:
        body.append([
            r["pass_"], f"{r['in_features']}->{r['out_features']}", str(r["rank"] or "-"), str(r["m"]), r["impl"],
            _seconds(r["seconds"]), "-" if r.get("tflops") is None else f"{r['tflops']:.3g}",
            f"{r['x_base']:.2f}" if "x_base" in r else "-", f"{r['x_floor']:.2f}" if "x_floor" in r else "-",
            "-" if r["pass_"] == "forward" else _bytes(r["saved_activation_bytes"]), _bytes(r["peak_bytes"]),
        ])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in body])
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i >= 5 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
             for line in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default=None, help="the suite's records (default: %(default)s)")
    parser.add_argument("--plot", metavar="PNG", help="where the plot goes (default: beside the records)")
    parser.add_argument("--markdown", action="store_true", help="the table as Markdown (for bench/RESULTS.md)")
    args = parser.parse_args(argv)
    path = args.path or default_path()
    if not os.path.exists(path):
        print(f"no records at {path}: run pytest bench/ --benchmark-only first", file=sys.stderr)
        return 1
    with open(path) as f:
        data = json.load(f)
    env = data["environment"]
    print(f"{data['date']}  " + ", ".join(f"{k} {v}" for k, v in env.items()))
    s = data["settings"]
    print(f"dtype {s['dtype']}, {s['rounds']} rounds after {s['warmup']} warm-up" + (" (quick)" if s["quick"] else ""))
    rows = with_ratios(data["results"])
    print(table(rows, args.markdown))
    png = args.plot or os.path.splitext(path)[0] + ".png"
    print(f"plot: {png}" if plot(rows, png) else "plot: skipped (matplotlib is not installed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
