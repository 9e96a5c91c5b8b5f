"""Static check of every Triton kernel the package can launch, without a GPU: each kernel compiled ahead
of time for sm_90a and sm_80 in every dtype, every constexpr combination an op can reach and every
configuration autotuning can pick for it; each cubin read with cuobjdump (registers, shared memory, local
memory and stack, the SASS instruction mix: HGMMA/HMMA are the tensor cores).

    python -m vera_kernels.verify --static [--json PATH]        the table; exit 1 on a failure, a spill or
                                                                a pipeline finding no allowance names
    python -m vera_kernels.triton.static [--kernel NAME] [--dtype bf16] [--scenario NAME] [--configs first]

How. Each line of SCENARIOS is a host call of the package (an op in one mode) made on CPU tensors of a
small problem while launches are captured, not run (``autotune.launch`` records them): the launch
arguments are exactly the ones the op passes, and their types and specializations (an int equal to 1 is a
constant, ints and pointers divisible by 16 are marked so) are derived the way Triton's launcher derives
them. Every scenario runs in fp32, bf16 and fp16 at a decode M (1: the narrow-M configs) and a training M
(512: the wide ones), with in = out = 512 and r = 256 (Llama's 4096 and r = 256 have the same
alignments). Each captured launch is compiled under every config ``autotune.candidates`` gives it (what
the autotuner would time), or under the config its caller fixed; identical compilations are done once,
in parallel processes (``--jobs``, default one per CPU), slowest first. Triton's cache is one private to
the run, or the one TRITON_CACHE_DIR names (content-addressed: a compilation found there is the one the
run would make; CI keeps one between runs, so that only kernels that changed are compiled again).

Adding a kernel: launch it through ``autotune.launch`` (``linear._launch`` in linear.py), then add ONE
line to SCENARIOS calling the host function that launches it, e.g.

    Scenario("my op", lambda p: linear.my_op(p.x, p.weight, p.lambda_d)),

``p`` is a :class:`Problem` (its tensors in the scenario's dtype). tests/test_static.py fails while a
@triton.jit kernel of the package (one no other jit function calls) is launched by no scenario.

Compiling needs the real jit functions, so this never runs under TRITON_INTERPRET: :func:`report` runs
this module in a subprocess with the interpreter off.
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
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import sass
from .autotune import parameters

_TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ARCHS = (90, 80)
# The Ms whose launches differ: 1 (decode; M a constant), 32 (the narrow-M configs, 32-row rank blocks),
# 512 (the wide configs) and 2048 (128-row rank blocks).
MS = (1, 32, 512, 2048)
SIZES = dict(in_features=512, out_features=512, rank=256, adapters=4)
SEED = 2**40 + 5


@dataclass
class Problem:
    """The tensors a scenario passes to the host code, in one dtype (the trained vectors in fp32)."""

    dtype: torch.dtype
    m: int
    sizes: dict = field(default_factory=lambda: dict(SIZES))
    x: torch.Tensor = field(init=False)

    def __post_init__(self):
        from ..projections import generate_projections

        m, k, n, r, adapters = self.m, *self.sizes.values()
        low = lambda *shape: torch.randn(*shape).to(self.dtype)  # noqa: E731
        self.in_features, self.out_features, self.rank = k, n, r
        self.x, self.weight, self.bias, self.base_out = low(m, k), low(n, k), low(n), low(m, n)
        self.A, self.B = generate_projections(0, r, k, n, dtype=self.dtype)
        self.lambda_d, self.lambda_b = torch.randn(r), torch.randn(n)
        self.s, self.grad = low(m, r), low(m, n)
        self.bank_d, self.bank_b = torch.randn(adapters, r), torch.randn(adapters, n)
        self.ids = torch.arange(m) % adapters
        self.projection = torch.empty(r, k, dtype=self.dtype)


@dataclass(frozen=True)
class Scenario:
    name: str
    call: Callable[[Problem], object]
    archs: tuple = ARCHS  # TMA (tensor descriptors) exists from sm_90 on
    tma: bool = False  # the fused GEMM with tensor descriptors (linear.FORCE_TMA), else with pointers


def _backward(p: Problem, *, weight=True, with_bias=True, need_dx=True, on_the_fly=False):
    from . import linear

    A, B = (None, None) if on_the_fly else (p.A, p.B)
    return linear.backward(p.grad, p.s, p.weight if weight else None, A, B, p.lambda_d, p.lambda_b,
                           in_features=p.in_features, with_bias=with_bias, need_dx=need_dx, seed=SEED,
                           max_in=p.in_features)


def _forward(p: Problem, *, weight=True, bias=True, on_the_fly=False):
    from . import linear

    A, B = (None, None) if on_the_fly else (p.A, p.B)
    if not weight:  # vera_delta: base_out instead of the base GEMM
        return linear.forward(p.x, None, None, A, B, p.lambda_d, p.lambda_b, p.base_out, SEED, p.in_features)
    return linear.forward(p.x, p.weight, p.bias if bias else None, A, B, p.lambda_d, p.lambda_b, None, SEED,
                          p.in_features)


def _multi(p: Problem, *, weight=True, bias=True):
    from . import linear

    if not weight:
        return linear.forward_multi(p.x, None, None, p.A, p.B, p.bank_d, p.bank_b, p.ids, p.base_out)
    return linear.forward_multi(p.x, p.weight, p.bias if bias else None, p.A, p.B, p.bank_d, p.bank_b, p.ids, None)


def _projection(p: Problem):
    from . import projection

    projection.fill_projection_(p.projection, SEED, 0, p.in_features, 0, 0)


def _philox(p: Problem):
    from . import projection

    projection.philox4x32_10(torch.zeros(p.m, 4, dtype=torch.int64), torch.zeros(p.m, 2, dtype=torch.int64))


# Every launch the package can make. One line per op and mode; see the module's docstring.
SCENARIOS = (
    Scenario("vera_linear", lambda p: _forward(p)),
    Scenario("vera_linear without bias", lambda p: _forward(p, bias=False)),
    Scenario("vera_delta", lambda p: _forward(p, weight=False)),
    Scenario("on-the-fly vera_linear", lambda p: _forward(p, on_the_fly=True)),
    Scenario("on-the-fly vera_linear without bias", lambda p: _forward(p, bias=False, on_the_fly=True)),
    Scenario("on-the-fly vera_delta", lambda p: _forward(p, weight=False, on_the_fly=True)),
    Scenario("backward", lambda p: _backward(p)),
    Scenario("backward without dbias", lambda p: _backward(p, with_bias=False)),
    Scenario("backward without dx", lambda p: _backward(p, need_dx=False)),
    Scenario("backward of vera_delta", lambda p: _backward(p, weight=False, with_bias=False)),
    Scenario("on-the-fly backward", lambda p: _backward(p, on_the_fly=True)),
    Scenario("on-the-fly backward without dbias", lambda p: _backward(p, with_bias=False, on_the_fly=True)),
    Scenario("on-the-fly backward of vera_delta", lambda p: _backward(p, weight=False, with_bias=False, on_the_fly=True)),
    Scenario("vera_linear (TMA)", lambda p: _forward(p), archs=(90,), tma=True),
    Scenario("vera_linear without bias (TMA)", lambda p: _forward(p, bias=False), archs=(90,), tma=True),
    Scenario("vera_delta (TMA)", lambda p: _forward(p, weight=False), archs=(90,), tma=True),
    Scenario("backward (TMA)", lambda p: _backward(p), archs=(90,), tma=True),
    Scenario("backward of vera_delta (TMA)", lambda p: _backward(p, weight=False, with_bias=False), archs=(90,), tma=True),
    Scenario("many adapters (HAS_IDS)", lambda p: _multi(p)),
    Scenario("many adapters without bias", lambda p: _multi(p, bias=False)),
    Scenario("many adapters vera_delta", lambda p: _multi(p, weight=False)),
    Scenario("projections", _projection),
    Scenario("philox4x32-10", _philox),
)


# ---------------------------------------------------------------------------------------------------
# Capturing launches and turning them into compilations.


@contextlib.contextmanager
def captured():
    """Within this block the package's launches are recorded (``autotune.Launch``) instead of run."""
    from . import autotune

    autotune._capture = []
    try:
        yield autotune._capture
    finally:
        autotune._capture = None


def capture(scenarios=SCENARIOS, dtypes=DTYPES, ms=MS) -> list[tuple[str, torch.dtype, int, object]]:
    """(scenario name, dtype, M, autotune.Launch) of every launch of every scenario (the scenario's archs
    in ``launch_archs``)."""
    from . import linear

    out = []
    for scenario in scenarios:
        for dtype in dtypes:
            for m in ms:
                torch.manual_seed(0)
                problem = Problem(dtype, m)
                with captured() as launches, linear.forced_tma(scenario.tma):
                    scenario.call(problem)
                out += [(scenario.name, dtype, m, launch) for launch in launches]
                _LAUNCH_ARCHS[scenario.name] = scenario.archs
    return out


_LAUNCH_ARCHS: dict[str, tuple] = {}


def kernel_name(fn) -> str:
    """The jit function's own name (``fn.fn`` is the Python function under both JITFunction and the
    interpreter's InterpretedFunction)."""
    return fn.fn.__name__


def _specialize(value) -> tuple[str, object]:
    """(signature type, specialization key) of a launch argument, Triton's own launcher's: an int equal to
    1 or None is a constant; ints and pointers divisible by 16 have the key "D", other ints and pointers
    "", floats and descriptors None; a host-side TMA descriptor is typed by its dtype and the tile shape
    the config gave it."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime import jit

    from .linear import TensorDescriptor

    try:
        return jit.native_specialize_impl(CUDABackend, value, False, True, True)
    except (TypeError, ValueError):  # a Triton whose launcher types descriptors in Python
        if TensorDescriptor is not None and isinstance(value, TensorDescriptor):
            return f"tensordesc<{_TYPE_NAMES[value.base.dtype]}[{', '.join(map(str, value.block_shape))}]>", None
        raise


def compile_spec(fn, args: dict, config) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of ``fn`` launched with ``args`` under ``config``."""
    from . import autotune

    values = {**args, **config.kwargs}
    if "x_desc" in values:  # the descriptors take the config's tile shapes (the launcher's pre-hook)
        autotune.set_block_shapes(values)
    signature, constexprs, specialization = {}, {}, []
    for name, is_constexpr in parameters(fn):
        value = values[name]
        kind, key = ("constexpr", value) if is_constexpr else _specialize(value)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = value
            key = value
        specialization.append((kind, key))
    return signature, constexprs, _attributes(fn, specialization, values)


def _attributes(fn, specialization, values) -> dict:
    """The compile attributes (divisibility) of a launch, derived by Triton's own JIT code from the
    launcher's specialization: they are part of Triton's cache key, and Triton versions build them
    differently (3.9 has an empty entry for every constexpr, 3.6 none), so this compilation is the one the
    JIT later finds in its cache (bench/gpu_check.sh's ahead-of-time compile; tests/test_gpu_check.py)."""
    from types import SimpleNamespace

    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction

    holder = SimpleNamespace(params=[SimpleNamespace(name=name) for name, _ in parameters(fn)])
    bound = {name: values[name] for name, _ in parameters(fn)}
    global _BACKEND
    if _BACKEND is None:  # parse_attr is the same for every CUDA target
        _BACKEND = make_backend(GPUTarget("cuda", 90, 32))
    return JITFunction._pack_args(holder, _BACKEND, {}, bound, specialization, None)[3]


_BACKEND = None


@dataclass
class Job:
    """One compilation: a kernel, its specialization, a config and an arch; the scenarios that reach it.
    Plain values only, so that it travels to a worker process."""

    module: str
    kernel: str
    signature: dict
    constexprs: dict
    attrs: dict
    num_warps: int
    num_stages: int
    arch: int
    flags: str
    config: str
    cost: int  # a guess of its compile time, to start the slowest first
    scenarios: list = field(default_factory=list)
    dtypes: list = field(default_factory=list)
    ms: list = field(default_factory=list)


def jobs(captures, archs=ARCHS, first_config_only=False) -> list[Job]:
    """Each captured launch under each config it can run with, per arch; identical compilations once."""
    from . import autotune

    found: dict[tuple, Job] = {}
    for scenario, dtype, m, launch in captures:
        for arch in (a for a in archs if a in _LAUNCH_ARCHS.get(scenario, ARCHS)):
            configs = [launch.config] if launch.config is not None else autotune.candidates(launch.kernel, arch, launch.args)
            for config in configs[:1] if first_config_only else configs:
                signature, constexprs, attrs = compile_spec(launch.fn, launch.args, config)
                module, kernel = launch.fn.fn.__module__, kernel_name(launch.fn)
                key = (module, kernel, arch, tuple(signature.items()), tuple(sorted(constexprs.items())),
                       tuple(sorted(attrs)), config.num_warps, config.num_stages)
                if key not in found:
                    kw = config.kwargs
                    tile = kw.get("BLOCK_M", 1) * kw.get("BLOCK_N", kw.get("BLOCK_R", 1))
                    found[key] = Job(module, kernel, signature, constexprs, attrs, config.num_warps, config.num_stages,
                                     arch, _flags(launch.fn, launch.args), describe_config(config, launch.args),
                                     cost=tile * (4 if dtype == torch.float32 else 1))
                job = found[key]
                for seen, value in ((job.scenarios, scenario), (job.dtypes, _TYPE_NAMES[dtype]), (job.ms, m)):
                    if value not in seen:
                        seen.append(value)
    return list(found.values())


# ---------------------------------------------------------------------------------------------------
# Compiling and reading the cubin.


def compile_launch(fn, args: dict, config, arch: int):
    """The compiled kernel of ``fn`` for sm_``arch`` (sm_90a for 90) with ``args`` and the config."""
    signature, constexprs, attrs = compile_spec(fn, args, config)
    return _compile(fn, signature, constexprs, attrs, config.num_warps, config.num_stages, arch)


def _compile(fn, signature, constexprs, attrs, num_warps, num_stages, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def _cuobjdump() -> str:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    found = bundled if os.path.exists(bundled) else shutil.which("cuobjdump")
    if not found:
        raise RuntimeError("cuobjdump not found (neither in triton/backends/nvidia/bin nor on PATH)")
    return found


_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def analyse(cubin: bytes, tmpdir: str) -> dict:
    """Registers, local memory, stack, the opcode counts and the software pipeline (sass.py) of a cubin."""
    path = os.path.join(tmpdir, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    tool = _cuobjdump()
    usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    text = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|SHARED|LOCAL|STACK):(\d+)", usage))
    opcodes = collections.Counter(m.group(1).split(".")[0] for m in _OPCODE.finditer(text))
    return dict(registers=int(fields["REG"]), local=int(fields["LOCAL"]), stack=int(fields["STACK"]),
                opcodes=dict(opcodes), pipeline=sass.pipeline(text).as_dict())


def describe_config(config, args: dict | None = None) -> str:
    """The block sizes (the host's, e.g. a rank GEMM's BLOCK_M and BLOCK_R, then the config's), warps and
    stages: "64x128x64 w4 s3"."""
    blocks = {**{k: v for k, v in (args or {}).items() if k.startswith("BLOCK")}, **config.kwargs}
    blocks = "x".join(str(v) for k, v in blocks.items() if k.startswith("BLOCK"))
    return f"{blocks + ' ' if blocks else ''}w{config.num_warps} s{config.num_stages}"


def _flags(fn, args: dict) -> str:
    """The launch's constexpr switches that are on (block sizes aside), and its sizes specialized to 1."""
    out = []
    for name, is_constexpr in parameters(fn):
        value = args.get(name)
        if is_constexpr and not name.startswith("BLOCK") and name != "GROUP_M":
            if value is True or (not isinstance(value, bool) and value not in (None, False, 0)):
                out.append(name if value is True else f"{name}={value}")
        elif type(value) is int and value == 1 and not is_constexpr and not name.startswith("stride"):
            out.append(f"{name}=1")  # a size specialized to the constant 1 (decode M = 1)
    return " ".join(out)


def run_job(job: Job) -> dict:
    """Compile one job and read its cubin: a row of the report (a compile failure is a row, not an end)."""
    import importlib

    row = dict(kernel=job.kernel, module=job.module, arch=job.arch,
               sm=f"sm_{job.arch}{'a' if job.arch == 90 else ''}", dtypes=job.dtypes, ms=job.ms, flags=job.flags,
               config=job.config, scenarios=job.scenarios, error=None)
    start = time.perf_counter()
    tmpdir = tempfile.mkdtemp(prefix="vera-static-")
    try:
        fn = getattr(importlib.import_module(job.module), job.kernel)
        compiled = _compile(fn, job.signature, job.constexprs, job.attrs, job.num_warps, job.num_stages, job.arch)
        row.update(analyse(compiled.asm["cubin"], tmpdir), shared=compiled.metadata.shared)
        limits = sass.SM90 if job.arch == 90 else sass.SM80
        row["blocks_per_sm"] = sass.occupancy(row["registers"], row["shared"], job.num_warps, limits)
    except Exception as exc:
        row.update(error=f"{type(exc).__name__}: {exc}".strip()[-2000:], registers=None, local=0, stack=0,
                   opcodes={}, shared=None, pipeline=None, blocks_per_sm=None)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    row["seconds"] = round(time.perf_counter() - start, 2)
    ops = row["opcodes"]
    row["spill_instructions"] = ops.get("STL", 0) + ops.get("LDL", 0)
    row["spills"] = bool(row["local"] or row["stack"] or row["spill_instructions"])
    row["hgmma"], row["hmma"] = ops.get("HGMMA", 0), ops.get("HMMA", 0)
    row["pipeline_violations"], row["pipeline_allowed"] = (
        judge_pipeline(job.kernel, job.flags, row["pipeline"]) if row["pipeline"] else ([], []))
    return row


# The pipeline rule (sass.py): no wgmma K loop waits to depth 0, no drain between two K loops. It holds for
# every kernel; a variant keeps a finding only where an allowance below names it, how many, and why
# (docs/DESIGN.md section 4 has the compiled evidence for each). A full run (every scenario, dtype, M, arch
# and config: CI's) also fails on an allowance that no compiled wgmma kernel needs any more, so that a fixed
# pipeline cannot regress behind a stale allowance.
@dataclass(frozen=True)
class Allowance:
    kernel: str
    need: tuple  # constexpr flags all on
    refuse: tuple  # constexpr flags all off
    drains: int  # drains between K loops the variant may keep
    waits_to_zero: int  # wgmma K loops that may wait to depth 0
    why: str  # what the report prints beside the finding

    def matches(self, kernel: str, flags: str) -> bool:
        on = set(flags.split())
        return kernel == self.kernel and set(self.need) <= on and not set(self.refuse) & on


PIPELINE_ALLOWANCES = (
    # The forward: b scales the r loop's finished sum before the in loop adds to it (the formula's order,
    # kept for its infinities and fp16 range); a second accumulator for the r part would double the tile's.
    Allowance("_fused_gemm_kernel", ("HAS_BASE_GEMM", "SCALE_R"), (), 1, 0, "b scales the finished rank sum"),
    # dx with TMA: one loop over [in | r] choosing its descriptors per step is not pipelined by Triton (3.6,
    # 3.9: wgmma waits to depth 0 every step) and Hopper warp specialization does not take this loop.
    Allowance("_fused_gemm_kernel", ("HAS_BASE_GEMM", "USE_TMA"), ("SCALE_R",), 1, 0, "a TMA loop per source"),
    # On the fly the projection's tile is made in registers and stored to shared memory every step: wgmma
    # waits for it before the next one overwrites it (Philox, not the wait, bounds these loops); dx's
    # generated r loop cannot share the in loop's two-source step.
    Allowance("_fused_gemm_kernel", ("HAS_BASE_GEMM", "ON_THE_FLY"), ("SCALE_R",), 1, 0, "a generated source's own loop"),
    Allowance("_fused_gemm_kernel", ("ON_THE_FLY",), (), 0, 1, "tile generated in registers"),
    Allowance("_rank_gemm_kernel", ("GENERATE_P",), (), 0, 1, "tile generated in registers"),
)


def allowances(kernel: str, flags: str) -> list[Allowance]:
    return [a for a in PIPELINE_ALLOWANCES if a.matches(kernel, flags)]


def judge_pipeline(kernel: str, flags: str, pipeline: dict) -> tuple[list[str], list[str]]:
    """(violations: the rule's findings no allowance covers, allowed: the findings allowances cover, each
    with its reason) of one compiled kernel."""
    loops = [sass.KLoop(**loop) for loop in pipeline["loops"]]
    waits = [loop for loop in loops if loop.wgmma and loop.wait_depth == 0]
    drains = pipeline["drains"]
    allowed = []
    for allowance in allowances(kernel, flags):
        take_waits, take_drains = min(len(waits), allowance.waits_to_zero), min(drains, allowance.drains)
        if take_waits:
            allowed.append(f"{take_waits} wait(s) to depth 0 [{allowance.why}]")
        if take_drains:
            allowed.append(f"{take_drains} drain(s) [{allowance.why}]")
        waits, drains = waits[take_waits:], drains - take_drains
    violations = [f"wgmma K loop at {loop.start:#x} waits to depth 0" for loop in waits]
    if drains:
        violations.append(f"{drains} drain(s) between K loops")
    return violations, allowed


def stale_allowances(rows: list[dict]) -> list[str]:
    """The allowances that some compiled wgmma kernel matches and none uses (only meaningful for a full run)."""
    out = []
    for a in PIPELINE_ALLOWANCES:
        matched = [r for r in rows if r["pipeline"] and r["hgmma"] and a.matches(r["kernel"], r["flags"])]
        if matched and not any(f"[{a.why}]" in text for r in matched for text in r["pipeline_allowed"]):
            out.append(f"{a.kernel} {' '.join(a.need)}{' without ' + ' '.join(a.refuse) if a.refuse else ''}: {a.why}")
    return out


def _indexed_job(item):
    i, job = item
    return i, run_job(job)


def compile_all(jobs_: list[Job], processes: int | None = None, progress=None) -> list[dict]:
    """Every job, in ``processes`` worker processes (default: the CPUs this process may use; spawned, not
    forked: a fork of a process running torch's threads can deadlock), slowest first; rows in the jobs'
    order."""
    import multiprocessing

    from . import projection

    if projection.interpreted():
        raise RuntimeError("the static check compiles real kernels: run it without TRITON_INTERPRET")
    _cuobjdump()  # fail early, before any compile, when it is missing
    items = sorted(enumerate(jobs_), key=lambda item: -item[1].cost)
    processes = max(1, min(processes or len(os.sched_getaffinity(0)), len(jobs_)))
    rows: dict[int, dict] = {}
    with contextlib.ExitStack() as stack:
        if processes > 1:
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(processes))
            results = pool.imap_unordered(_indexed_job, items)
        else:
            results = map(_indexed_job, items)
        for i, row in results:
            rows[i] = row
            if progress:
                progress(len(rows), len(jobs_), row)
    return [rows[i] for i in range(len(jobs_))]


# ---------------------------------------------------------------------------------------------------
# The report.


def totals(rows: list[dict], stale: list[str] = ()) -> dict:
    """The counts the verdict rests on; ``stale``: the allowances a full run found unused."""
    return dict(kernels=len({(r["module"], r["kernel"]) for r in rows}), compiles=len(rows),
                failed=sum(r["error"] is not None for r in rows), spills=sum(r["spills"] for r in rows),
                pipeline=sum(bool(r["pipeline_violations"]) for r in rows),
                allowed=sum(bool(r["pipeline_allowed"]) for r in rows), stale_allowances=list(stale),
                compile_seconds=round(sum(r["seconds"] for r in rows), 1))


def format_rows(rows: list[dict]) -> str:
    header = ("kernel", "sm", "dtypes", "flags", "config", "regs", "smem KB", "blocks/SM", "local+stack", "STL/LDL",
              "HGMMA", "HMMA", "instr", "pipeline (K loops; drains; store)", "s", "result")
    body = []
    for r in rows:
        ok = r["error"] is None
        body.append((r["kernel"], r["sm"], "/".join(r["dtypes"]), r["flags"], r["config"],
                     str(r["registers"]) if ok else "", f"{r['shared'] / 1024:.0f}" if ok else "",
                     str(r["blocks_per_sm"]) if ok else "",
                     str(r["local"] + r["stack"]), str(r["spill_instructions"]), str(r["hgmma"]), str(r["hmma"]),
                     str(sum(r["opcodes"].values())), r["pipeline"]["summary"] if ok else "", f"{r['seconds']:.1f}",
                     _verdict(r)))
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _verdict(r: dict) -> str:
    if r["error"] is not None:
        return "FAILED: " + r["error"].splitlines()[-1][:200]
    if r["spills"]:
        return "SPILLS"
    if r["pipeline_violations"]:
        return "PIPELINE: " + ", ".join(r["pipeline_violations"])
    if r["pipeline_allowed"]:
        return "ok (allowed: " + ", ".join(r["pipeline_allowed"]) + ")"
    return "ok"


def environment() -> dict:
    import platform

    import triton

    return dict(triton=triton.__version__, torch=torch.__version__, python=platform.python_version())


def run(args) -> dict:
    """Capture, compile and analyse what ``args`` (the CLI's) select: {"environment", "totals", "rows"}."""
    scenarios = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]
    dtypes = [d for d in DTYPES if not args.dtype or _TYPE_NAMES[d] in args.dtype]
    captures = capture(scenarios, dtypes, tuple(args.m or MS))
    if args.kernel:
        captures = [c for c in captures if kernel_name(c[3].fn) in args.kernel]
    selected = jobs(captures, tuple(args.arch or ARCHS), first_config_only=args.configs == "first")
    start = time.perf_counter()

    def progress(done, total, row):
        if not args.quiet:
            verdict = _verdict(row)
            print(f"[{done}/{total} {time.perf_counter() - start:5.0f} s] {row['kernel']} {row['sm']} "
                  f"{'/'.join(row['dtypes'])} {row['flags']} {row['config']}: {verdict} ({row['seconds']:.1f} s)",
                  file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="vera-triton-cache-") as private:
        # Triton's cache is keyed by everything that shapes a compilation (the kernel's source and its
        # callees', the specialization, the options, the Triton build): a cache given in TRITON_CACHE_DIR
        # (CI keeps one between runs) only skips compilations already done; else one private to the run.
        os.environ.setdefault("TRITON_CACHE_DIR", private)
        # Triton 3.9 warns unless told; 1 is its default (and Triton 3.6's behaviour): FMA contraction on.
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        rows = compile_all(selected, args.jobs, progress)
    full = not (args.scenario or args.dtype or args.kernel or args.m or args.arch) and args.configs == "all"
    result = dict(environment=environment(), seconds=round(time.perf_counter() - start, 1),
                  totals=totals(rows, stale_allowances(rows) if full else []), rows=rows)
    return result


def plan_rows(m: int, in_features: int, out_features: int, rank: int, dtype: torch.dtype, arch: int = 90) -> dict:
    """bench.plan's view of the launches at one shape: per pass ("forward": vera_linear; "backward": its
    backward with dx and dbias), each launch in order with the config verify runs (the first candidate,
    or the caller's), its compiled facts for sm_``arch`` (registers, shared memory, blocks per SM, the
    pipeline) and its grid at this shape: programs, and waves = work units / (SMs x blocks per SM), a
    work unit being a program, or a tile for the persistent fused GEMM. The bias is frozen (no dbias), as
    bench.plan's layer has it."""
    from . import autotune, linear

    sizes = dict(in_features=in_features, out_features=out_features, rank=rank, adapters=1)
    torch.manual_seed(0)
    problem = Problem(dtype, m, sizes)
    tma = arch >= 90 and dtype != torch.float32
    passes = {"forward": lambda p: _forward(p), "backward": lambda p: _backward(p, with_bias=False)}
    out, done = {}, {}
    for name, call in passes.items():
        with captured() as launches, linear.forced_tma(tma):
            call(problem)
        rows = []
        for launch in launches:
            config = launch.config or autotune.candidates(launch.kernel, arch, launch.args)[0]
            signature, constexprs, attrs = compile_spec(launch.fn, launch.args, config)
            module, kernel = launch.fn.fn.__module__, kernel_name(launch.fn)
            job = Job(module, kernel, signature, constexprs, attrs, config.num_warps, config.num_stages, arch,
                      _flags(launch.fn, launch.args), describe_config(config, launch.args), cost=0)
            key = (module, kernel, tuple(signature.items()), tuple(sorted(constexprs.items())), tuple(sorted(attrs)),
                   config.num_warps, config.num_stages)
            if key not in done:
                done[key] = run_job(job)
            row = dict(done[key])
            meta = {**launch.args, **config.kwargs}
            grid = launch.grid(meta) if callable(launch.grid) else launch.grid
            programs = 1
            for extent in grid:
                programs *= extent
            units = programs
            if kernel == "_fused_gemm_kernel":
                units = -(-meta["M"] // meta["BLOCK_M"]) * -(-meta["N"] // meta["BLOCK_N"])
            row.update(programs=programs, units=units,
                       waves=sass.waves(units, row["blocks_per_sm"] or 1, linear.STATIC_SMS))
            rows.append(row)
        out[name] = rows
    return out


def passed(result: dict) -> bool:
    t = result["totals"]
    return (bool(result["rows"]) and not t["failed"] and not t["spills"] and not t["pipeline"]
            and not t["stale_allowances"])


def summary(result: dict) -> str:
    t = result["totals"]
    return (f"{t['kernels']} kernels, {t['compiles']} compilations (sm_90a, sm_80) in {result['seconds']:.0f} s "
            f"on Triton {result['environment']['triton']}: {t['failed']} failed, {t['spills']} spill, "
            f"{t['pipeline']} break the pipeline rule ({t['allowed']} keep an allowed finding)"
            + "".join(f"\nstale allowance (no compiled kernel needs it; remove it): {a}" for a in t["stale_allowances"]))


def report(argv=()) -> dict:
    """This module run in a fresh interpreter with TRITON_INTERPRET off (this process may have it on),
    with the command-line arguments ``argv``: its JSON result."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "static.json")
        command = [sys.executable, "-m", "vera_kernels.triton.static", "--quiet", "--json", path, *argv]
        done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if not os.path.exists(path):
            raise RuntimeError(f"static check failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        with open(path) as f:
            return json.load(f)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vera_kernels.triton.static", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, action="append", choices=ARCHS, help="sm_ARCH (default: 90 and 80)")
    p.add_argument("--kernel", action="append", help="only this jit function (repeatable)")
    p.add_argument("--dtype", action="append", choices=("fp32", "bf16", "fp16"), help="only this dtype (repeatable)")
    p.add_argument("--scenario", action="append", choices=[s.name for s in SCENARIOS], metavar="NAME",
                   help="only this scenario (repeatable)")
    p.add_argument("--m", type=int, action="append",
                   help="this M (repeatable; default: 1, 32, 512 and 2048, whose launches differ)")
    p.add_argument("--configs", choices=("all", "first"), default="all",
                   help="every config a launch can reach (default), or the first (the one verify runs)")
    p.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: the CPUs)")
    p.add_argument("--json", metavar="PATH", help="write the environment, the totals and every row as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--plan", metavar="M,IN,OUT,R", help="bench.plan's view instead: the forward's and backward's "
                   "launches at this shape (--dtype, one; --arch, one), as JSON in --json")
    return p


def main(argv=None) -> int:
    """Print the table and the totals; exit 1 unless ``passed`` (no compile failure, spill, pipeline finding
    beyond its allowances, nor, in a full run, a stale allowance)."""
    args = parser().parse_args(argv)
    if args.plan:
        m, k, n, r = map(int, args.plan.split(","))
        dtype = next(d for d in DTYPES if _TYPE_NAMES[d] == (args.dtype or ["bf16"])[0])
        with tempfile.TemporaryDirectory(prefix="vera-triton-cache-") as private:
            os.environ.setdefault("TRITON_CACHE_DIR", private)
            os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
            result = plan_rows(m, k, n, r, dtype, (args.arch or [90])[0])
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        return 0
    result = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if not args.quiet:
        print(format_rows(result["rows"]))
        print(summary(result))
    return 0 if passed(result) else 1


if __name__ == "__main__":
    sys.exit(main())
