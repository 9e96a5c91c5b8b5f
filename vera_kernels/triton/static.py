"""Static check of the fused kernels without a GPU: compile every kernel with each of its autotune
configs for sm_90 and sm_80 (bf16, the shapes' alignments of the benchmark problem) and read the cubin
with cuobjdump: registers, shared memory, local memory (spills) and the SASS instruction mix.

    python -m vera_kernels.triton.static [--arch 90 --arch 80] [--json]

Compiling needs the real jit functions, so this never runs under TRITON_INTERPRET: :func:`report` runs
the module in a subprocess with the interpreter off; ``python -m vera_kernels.verify --static`` prints it.

A launch is captured, not run (``autotune._capture``), from the host code on CPU tensors: the argument
types and specializations (int == 1 is a constant, ints and pointers divisible by 16 are marked so)
are derived the way Triton's launcher derives them, so the cubin is the one a GPU would run.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys

import torch

_TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64"}  # i64: adapter ids
# One GEMM's worth of shapes of the benchmark problem (in = out = 4096, r = 256 has the same alignments).
PROBLEM = dict(m=512, in_features=512, out_features=512, rank=256)


def _specialize(value):
    """(signature type, divisible by 16) of a launch argument, as Triton's launcher decides it."""
    if value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
        return "constexpr", False
    if _is_descriptor(value):  # a host-side TMA descriptor, its tile shape set from the config
        return f"tensordesc<{_TYPE_NAMES[value.base.dtype]}[{','.join(map(str, value.block_shape))}]>", False
    if isinstance(value, torch.Tensor):
        return "*" + _TYPE_NAMES[value.dtype], value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"cannot specialize {type(value).__name__}")


def _is_descriptor(value) -> bool:
    from .linear import TensorDescriptor

    return TensorDescriptor is not None and isinstance(value, TensorDescriptor)


@contextlib.contextmanager
def _captured():
    from . import autotune

    autotune._capture = []
    try:
        yield autotune._capture
    finally:
        autotune._capture = None


def representative_launches(dtype=torch.bfloat16, on_the_fly=False, tma=False, m=None) -> list[tuple[str, object, dict]]:
    """(kernel name, jit function, arguments) of every launch of one forward and one backward; ``tma``: the
    fused GEMM with tensor descriptors (sm_90), else with pointers; ``m``: the row count (decode: 1)."""
    from ..projections import generate_projections
    from . import linear

    p = dict(PROBLEM, m=m or PROBLEM["m"])
    x = torch.randn(p["m"], p["in_features"]).to(dtype)
    weight = torch.randn(p["out_features"], p["in_features"]).to(dtype)
    bias = torch.randn(p["out_features"]).to(dtype)
    A, B = generate_projections(0, p["rank"], p["in_features"], p["out_features"], dtype=dtype)
    if on_the_fly:
        A = B = None
    d, b = torch.randn(p["rank"]), torch.randn(p["out_features"])
    s = torch.randn(p["m"], p["rank"]).to(dtype)
    with _captured() as launches, _forced_tma(tma):
        linear.forward(x, weight, bias, A, B, d, b, None, 2**40 + 5, p["in_features"])
        linear.backward(x.new_empty(p["m"], p["out_features"]), s, weight, A, B, d, b, in_features=p["in_features"],
                        with_bias=True, need_dx=True, seed=2**40 + 5, max_in=p["in_features"])
    return list(launches)


@contextlib.contextmanager
def _forced_tma(tma: bool):
    from . import linear

    previous, linear.FORCE_TMA = linear.FORCE_TMA, tma
    try:
        yield
    finally:
        linear.FORCE_TMA = previous


def compile_launch(fn, args: dict, config, arch: int):
    """The compiled kernel of ``fn`` for sm_``arch`` with ``args`` and the config's meta-parameters."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import autotune

    values = {**args, **config.kwargs}
    if "x_desc" in values:
        autotune.set_block_shapes(values)
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = values[param.name]
        kind, divisible = ("constexpr", False) if param.is_constexpr else _specialize(value)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = value
        elif divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=config.num_warps, num_stages=config.num_stages))


def _cuobjdump() -> str:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    found = bundled if os.path.exists(bundled) else shutil.which("cuobjdump")
    if not found:
        raise RuntimeError("cuobjdump not found (neither in triton/backends/nvidia/bin nor on PATH)")
    return found


_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def analyse(cubin: bytes, tmpdir: str) -> dict:
    """Registers, static shared memory, local memory and the opcode counts of a cubin."""
    path = os.path.join(tmpdir, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    tool = _cuobjdump()
    usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|SHARED|LOCAL|STACK):(\d+)", usage))
    opcodes = collections.Counter(m.group(1).split(".")[0] for m in _OPCODE.finditer(sass))
    return dict(registers=int(fields["REG"]), local=int(fields["LOCAL"]), stack=int(fields["STACK"]),
                opcodes=dict(opcodes))


def _launch_sets():
    """(label, arch filter, launches): pointer variants for sm_90 and sm_80, the TMA variant for sm_90, the
    decode (M = 1) launches (split-K shrink, b scaled in the GEMM's loop), and generated projections."""
    return [
        ("", (90, 80), representative_launches()),
        ("tma", (90,), [l for l in representative_launches(tma=True) if l[0] == "gemm"]),
        ("128-row", (90, 80), [l for l in representative_launches(m=2048) if l[0] == "rank" and l[2]["MODE"] != 2]),
        ("decode", (90, 80), [l for l in representative_launches(m=1) if l[0] in ("rank", "finish", "gemm")]),
        ("on-the-fly", (90, 80), representative_launches(on_the_fly=True)),
    ]


def compile_all(archs=(90, 80), dtype=torch.bfloat16) -> list[dict]:
    """One row per (kernel, variant, arch, config): every config autotuning would time for each launch of
    a forward and a backward with the materialized pair (pointer and TMA variants, decode and wide M);
    the first of them for each on-the-fly variant."""
    import tempfile

    from . import autotune, projection

    if projection.interpreted():
        raise RuntimeError("the static check compiles real kernels: run it without TRITON_INTERPRET")
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        for label, set_archs, launches in _launch_sets():
            seen = set()  # e.g. the three second-stage sums differ only in their output dtype
            for kernel, fn, args in launches:
                variant = " ".join(filter(None, (_variant(kernel, args), label)))
                if (kernel, variant) in seen or (label == "on-the-fly" and kernel in ("sum", "fold", "finish")):
                    continue
                seen.add((kernel, variant))
                for arch in (a for a in archs if a in set_archs):
                    configs = autotune.configs(kernel, arch)
                    if kernel in autotune._TUNED:  # what autotuning would time for this launch
                        configs = autotune._pruner(kernel)(configs, {}, **args)
                    if label == "on-the-fly":  # compile time: the first of them
                        configs = configs[:1]
                    for config in configs:
                        compiled = compile_launch(fn, args, config, arch)
                        row = analyse(compiled.asm["cubin"], tmpdir)
                        row.update(kernel=kernel, variant=variant, arch=arch, config=_describe(config, args),
                                   shared=compiled.metadata.shared)
                        rows.append(row)
    return rows


def _variant(kernel: str, args: dict) -> str:
    if kernel == "gemm":
        name = "forward" if args["P_IS_NK"] else "dx"
        return name + (" b-in-loop" if args["SCALE_IN_LOOP"] else "")
    if kernel in ("rank", "finish"):
        return ("shrink", "dt", "G")[args["MODE"]] + (" ones" if args.get("HAS_BIAS") else "")
    return ""


def _describe(config, args) -> str:
    blocks = {**{k: v for k, v in args.items() if k.startswith("BLOCK")}, **config.kwargs}
    blocks = "x".join(str(v) for k, v in blocks.items() if k.startswith("BLOCK"))
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


def format_rows(rows: list[dict]) -> str:
    header = ("kernel", "variant", "sm", "config", "regs", "smem KB", "stack", "STL/LDL", "HGMMA", "HMMA", "instr", "top opcodes")
    body = []
    for r in rows:
        ops = r["opcodes"]
        top = ", ".join(f"{k} {v}" for k, v in collections.Counter(ops).most_common(5))
        body.append((r["kernel"], r["variant"], str(r["arch"]), r["config"], str(r["registers"]),
                     f"{r['shared'] / 1024:.0f}", str(r["stack"] + r["local"]),
                     str(ops.get("STL", 0) + ops.get("LDL", 0)), str(ops.get("HGMMA", 0)), str(ops.get("HMMA", 0)),
                     str(sum(ops.values())), top))
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(archs=(90, 80)) -> list[dict]:
    """compile_all in a fresh interpreter with TRITON_INTERPRET off (this process may have it on)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, "-m", "vera_kernels.triton.static", "--json"] + [f"--arch={a}" for a in archs]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"static check failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vera_kernels.triton.static", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=(80, 90), help="sm_ARCH (default: 90 and 80)")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON line")
    args = parser.parse_args(argv)
    rows = compile_all(tuple(args.arch or (90, 80)))
    print(json.dumps(rows) if args.json else format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
