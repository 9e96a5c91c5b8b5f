"""Each plan's launches for one shape, derived from the code, with a roofline estimate.

    python -m bench.plan                          the target: bf16, in = out = 4096, r = 256, M = 8192
    python -m bench.plan --m 16 --dtype float16   any other shape

The launch lists are not written down by hand: each plan runs once on CPU at a small proxy shape whose
sizes are distinct (M, in, out, r each a different number), under torch.profiler. Every GEMM ATen runs
(aten::mm/addmm/addmm_), every own kernel of the C++ extension (the RECORD_FUNCTION("vera::...") scopes
in csrc/vera_ops.cpp) and every other ATen kernel that touches memory is one launch; views, allocations
and conjugation checks are none. Each tensor dimension of the proxy is mapped back to its symbol and
rescaled to the requested shape, so the FLOPs and bytes below are those of the requested shape.

Passes: the inference forward (no_grad, after a first call), a training step's forward and its backward
(the C++ plan folds the vectors into B in each forward and again in each backward: nothing is kept between
calls).

Plans:
  cpp      the C++/CUDA extension (backend "cpu" is the CPU twin of "cuda": same ATen calls, same kernels
           at M > 16; at M <= 16 CUDA runs its split-K decode kernels instead, not traceable here;
           traced in fp32, whose structure is the CUDA plan's in any dtype (on CUDA, G = gᵀ s is one cuBLAS
           GEMM with fp32 output; the CPU twin widens blocks of 16-bit rows instead). Bytes use the
           requested dtype for activations, weights and projections, fp32 for the vectors and G.
  unfused  the card's formula in plain torch, autograd's backward: traced in the requested dtype
  peft     PEFT's own VeRA layer (where peft is installed), traced in the requested dtype: its vectors
           are fp32 and it casts x to them, so its adapter GEMMs run in fp32
  base     nn.Linear alone (forward; backward dx only): the floor's reference
  wrapped  a base VeRAWrapper wraps (a quantized layer): the base's own forward, here nn.Linear's GEMM standing
           in for the quantized kernel (whose own cost replaces it), then vera_delta on the C++ plan onto its
           output: the cpp plan's adapter launches, with y = base_out + s Bdbᵀ in one addmm that reads base_out
           once and writes y once, in place of the linear form's base GEMM (traced in fp32 as cpp). Its only M x out allocation is y, beside base_out (tests/test_plan.py):
           no temporary, but not in place either: y could take base_out's memory only where nothing else
           holds base_out (its backward saves it, a CUDA graph's static output, a view of a cache), which the
           wrapper cannot see from the tensor; so the peak is two M x out tensors for the layer's moment.
           Its backward: the adapter's launches, the base's dx, and autograd's add of the two dx (x feeds
           both): one M x in temporary and launch more than the fused plan, whose dx += g W0 is in place
  triton   the Triton backend, traced under Triton's interpreter (CPU tensors; where the interpreter is on):
           each kernel launch with its tensor arguments, those it wrote found by comparing them before and
           after; FLOPs inferred from the operand shapes (see describe_triton)

  cuda decode  (M <= 16) the CUDA backend's split-K decode kernels (csrc/vera_cuda.cu), which cannot run
           here: its launches are read from the launcher's source (decode_adapter_cuda, in order) and the
           glue's (the base GEMM vera_forward_ adds after them), the split count from decode_splits_cuda's
           formula and constants (H200: 132 SMs), the bytes from what each kernel reads and writes
           (cuda_decode_plan). Forward only (decode is inference).

Roofline per launch: max(FLOPs / peak, bytes / bandwidth), summed over the launches (no launch latency,
no overlap between launches): what a plan's launches allow with every kernel at the hardware's rate (cuBLAS
comes close). Triton launches are compiled for sm_90a at the requested shape (vera_kernels/triton/static.py,
plan_rows; skip with --no-sass): their registers, occupancy, grid and software pipeline as the SASS has it
are printed beside them, and their FLOPs run at the efficiency that pipeline allows (kernel_efficiency, an
estimate stated in docs/DESIGN.md section 4). Requested M <= 16 traces the plans at a decode proxy. H200: 790 TFLOP/s for GEMMs on bf16/fp16 operands (cuBLAS's rate, measured
on one), 67 TFLOP/s on fp32 operands (TF32 is off by default), 4.3 TB/s (a measured copy).
The arithmetic floor (docs/DESIGN.md section 5): forward 1 + r (in + out) / (in out) times the base forward,
forward+backward (dx, dd, db) (2 in out + r (2 in + 3 out)) / (2 in out) times base forward + dx.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field

import torch

PEAK_FLOPS = 790e12
# GEMMs on fp32 operands: PyTorch leaves TF32 off for matmuls by default, so they run on the CUDA cores
# (H200 SXM: 67 TFLOP/s fp32, the datasheet's figure, not measured here).
PEAK_FLOPS_FP32 = 67e12
BANDWIDTH = 4.3e12
TARGET = dict(m=8192, in_features=4096, out_features=4096, rank=256, dtype="bfloat16")
# Proxy sizes: pairwise distinct, and none a product or a small multiple of another, so that every traced
# dimension maps back to one symbol. M is above the CUDA decode threshold (the large-M plan).
PROXY = dict(m=41, in_features=29, out_features=23, rank=7)
# The decode plan's proxy (requested M <= DECODE_M): M decode-sized, in long enough for the Triton shrink to
# split K under the interpreter (more than two of its 32-wide K blocks). Both proxies are past the cpu
# backend's small-problem bound (kSmallWork, 2^15 multiply-adds: csrc/vera_math.h), so that the cpp plan is
# traced as the requested sizes run it, through the GEMMs (the one-pass loops below that bound are CPU-only).
DECODE_M = 16
DECODE_PROXY = dict(m=3, in_features=67, out_features=149, rank=7)


def proxy_for(shape: dict) -> dict:
    return DECODE_PROXY if shape["m"] <= DECODE_M else PROXY

GEMMS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}
# One launch each, whatever they call inside (a reduction's output fill is part of its kernel on a GPU).
REDUCTIONS = {"aten::sum", "aten::mean"}
# Events that launch nothing: views, allocations, conjugation/negation checks, dtype no-ops.
NO_LAUNCH = {
    "aten::t", "aten::transpose", "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::expand",
    "aten::as_strided", "aten::narrow", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze",
    "aten::permute", "aten::_unsafe_view", "aten::alias", "aten::detach", "aten::detach_", "aten::lift_fresh",
    "aten::resolve_conj", "aten::resolve_neg", "aten::empty", "aten::empty_strided", "aten::empty_like",
    "aten::result_type", "aten::is_same_size", "aten::numpy_T", "aten::matrix_H", "aten::_has_same_storage_numel",
    "aten::new_empty", "aten::new_empty_strided", "aten::set_", "detach", "aten::unbind",
}
_DTYPE_SIZES = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "long int": 8, "int": 4, "bool": 1}


@dataclass
class Launch:
    name: str
    shapes: list  # symbolic shapes of the tensor arguments, e.g. [("M", "in"), ("r", "in")]
    flops: float
    bytes_read: float
    bytes_written: float
    peak: float = PEAK_FLOPS
    efficiency: float = 1.0  # the fraction of peak its compiled code is estimated to reach (kernel_efficiency)
    facts: str = ""  # what the compiled code shows (a Triton launch with --sass): config, registers, pipeline

    def seconds(self) -> float:
        return max(self.flops / (self.peak * self.efficiency), (self.bytes_read + self.bytes_written) / BANDWIDTH)


@dataclass
class Plan:
    name: str
    passes: dict = field(default_factory=dict)  # pass name -> [Launch]

    def seconds(self, pass_: str) -> float:
        return sum(launch.seconds() for launch in self.passes[pass_])


# --------------------------------------------------------------------------------------------------
# Tracing.


def _top_launches(events):
    """The launches under the root scope: GEMMs and vera:: kernels as they are; other ATen events are a
    launch when nothing under them is one (a composite op is counted by what it calls)."""
    launches = []

    def visit(e):
        name = e.name
        if name in GEMMS or name in REDUCTIONS or name.startswith("vera::"):
            launches.append(e)
            return
        if name in NO_LAUNCH:
            return
        before = len(launches)
        for child in e.cpu_children:
            visit(child)
        if len(launches) == before and name.startswith("aten::") and not _is_trivial(e):
            launches.append(e)

    roots = [e for e in events if e.name == "bench.plan"]
    for child in roots[0].cpu_children:
        visit(child)
    return launches


def _is_trivial(e) -> bool:
    # A copy or conversion between identical layouts that ATen skips, or an op on no tensor at all.
    return not any(len(shape) for shape in e.input_shapes)


@contextlib.contextmanager
def _without_profiler_log():
    """Drops the profiler's own log lines ("USDT:... profiler_start", written by its C++ side straight to
    file descriptor 2) and passes every other line written to stderr meanwhile through."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not line.startswith("USDT:")]
            sys.stderr.write("".join(kept))


def trace(fn):
    """The launches fn() makes, as profiler events (CPU)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with _without_profiler_log(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with record_function("bench.plan"):
            fn()
    return _top_launches(prof.events())


@dataclass
class TritonLaunch:
    name: str
    tensors: list  # (shape, dtype, written) of each tensor argument
    sizes: dict  # the kernel's integer and constexpr arguments by name (M, N, K, HAS_BIAS, ...)


def trace_triton(fn) -> list[TritonLaunch]:
    """The Triton kernels fn() launches, run by Triton's interpreter (CPU tensors, TRITON_INTERPRET=1):
    each kernel's tensor arguments, and which of them it wrote (compared bit for bit before and after the
    launch, the outputs poisoned with NaN first so that every write shows)."""
    from triton.runtime.interpreter import InterpretedFunction

    from vera_kernels.dispatch import poisoned_outputs

    launches = []
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        before = [t.clone() for t in tensors]
        result = original(self, *args, grid=grid, warmup=warmup, **kwargs)
        names = inspect.signature(self.fn).parameters
        bound = {**dict(zip(names, args)), **{k: v for k, v in kwargs.items() if k in names}}
        launches.append(TritonLaunch(self.fn.__name__, [
            (tuple(t.shape), t.dtype, not torch.equal(_bits(t), _bits(b))) for t, b in zip(tensors, before)],
            {k: v for k, v in bound.items() if isinstance(v, (bool, int))}))
        return result

    InterpretedFunction.run = run
    try:
        with poisoned_outputs():
            fn()
    finally:
        InterpretedFunction.run = original
    return launches


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.dtype.is_floating_point else t


class Symbols:
    """Maps the proxy's sizes back to symbols and the symbols to the requested sizes."""

    def __init__(self, proxy: dict, shape: dict):
        self.names = {proxy["m"]: "M", proxy["in_features"]: "in", proxy["out_features"]: "out", proxy["rank"]: "r"}
        self.sizes = {"M": shape["m"], "in": shape["in_features"], "out": shape["out_features"], "r": shape["rank"]}

    def symbolic(self, shape) -> tuple:
        return tuple(self.names.get(n, str(n)) for n in shape)

    def numel(self, symbolic) -> int:
        n = 1
        for s in symbolic:
            n *= self.sizes[s] if s in self.sizes else int(s)
        return n


def _elem_size(dtype_name: str, symbolic, target_size: int, traced_in_fp32: bool, fp32_roles=()) -> int:
    if not traced_in_fp32:
        # (a profiler without input dtypes, older torch: the requested dtype)
        return _DTYPE_SIZES.get(dtype_name) or target_size
    if len(symbolic) <= 1 or symbolic in fp32_roles:  # the vectors and the fp32 sums stay fp32
        return 4
    return target_size


def describe(events, symbols: Symbols, target_size: int, traced_in_fp32: bool) -> list[Launch]:
    launches = []
    for e in events:
        dtypes = getattr(e, "input_dtypes", None) or [""] * len(e.input_shapes)
        tensors = [(symbols.symbolic(s), dt) for s, dt in zip(e.input_shapes, dtypes) if dt != "Scalar" and len(s)]
        shapes = [sym for sym, _ in tensors]
        numels = [symbols.numel(sym) for sym in shapes]
        fp32_roles = ()
        if e.name in GEMMS:
            a, b = shapes[1:3] if e.name.startswith("aten::addmm") else shapes[0:2]
            m, k, n = a[0], a[1], b[1]
            flops = 2 * symbols.numel((m, k, n))
            # A GEMM summing over the tokens (G = gᵀ s) accumulates and writes fp32 (csrc: grad_outer).
            fp32_out = traced_in_fp32 and k == "M"
            if fp32_out:
                fp32_roles = ((m, n),)
            size = [_elem_size(dt, sym, target_size, traced_in_fp32, fp32_roles) for sym, dt in tensors]
            out_bytes = symbols.numel((m, n)) * (4 if fp32_out else target_size if traced_in_fp32 else size[0])
            if e.name == "aten::addmm_":  # C += A B: C read and written
                read = numels[0] * size[0] + numels[1] * size[1] + numels[2] * size[2]
            elif e.name == "aten::addmm":  # out = self + A B (self: a bias vector or base_out)
                read = sum(n * s for n, s in zip(numels[:3], size[:3]))
            else:
                read = numels[0] * size[0] + numels[1] * size[1]
            fp32_operands = (target_size == 4) if traced_in_fp32 else 4 in size[1:3] if e.name.startswith("aten::addmm") else 4 in size[0:2]
            launches.append(Launch(e.name.removeprefix("aten::"), shapes, flops, read, out_bytes,
                                   PEAK_FLOPS_FP32 if fp32_operands else PEAK_FLOPS))
            continue
        if e.name == "vera::lambda_grads":
            fp32_roles = (shapes[1],)  # G
        size = [_elem_size(dt, sym, target_size, traced_in_fp32, fp32_roles) for sym, dt in tensors]
        read = sum(n * s for n, s in zip(numels, size))
        largest = max(numels) if numels else 0
        if e.name == "vera::fold_projection":
            written = numels[0] * size[0]
        elif e.name == "vera::lambda_grads":
            written = 4 * (symbols.sizes["r"] + symbols.sizes["out"])
        elif e.name in ("vera::column_sums", "aten::sum", "aten::mean"):
            written = 4 * min(n for n in numels if n > 1) if numels else 0
            written = 4 * symbols.numel(shapes[0][1:]) if shapes and len(shapes[0]) > 1 else written
        elif e.name in ("aten::copy_", "aten::fill_", "aten::zero_"):
            read = numels[1] * size[1] if e.name == "aten::copy_" else 0
            written = numels[0] * size[0]
        else:  # element-wise: the output is as large as the largest input
            written = largest * max(size) if size else 0
        launches.append(Launch(e.name.removeprefix("aten::"), shapes, largest, read, written))
    return launches


def triton_flops(launch: TritonLaunch, symbols: Symbols) -> int:
    """The multiply-adds a launch does, from the sizes it was given (mapped back to symbols, so they
    rescale): the fused GEMM does M x N x (K_BASE + K_ADAPTER), a rank GEMM M x R x K; the other kernels
    are element-wise or reductions, counted by their bytes."""
    def size(name):
        value = launch.sizes[name]
        return symbols.numel((symbols.names.get(value, str(value)),))

    a = launch.sizes
    if launch.name == "_fused_gemm_kernel":
        return 2 * size("M") * size("N") * (size("K_BASE") * bool(a["HAS_BASE_GEMM"]) + size("K_ADAPTER"))
    if launch.name == "_rank_gemm_kernel":
        return 2 * size("M") * size("R") * size("K")
    return 0


def describe_triton(launches: list[TritonLaunch], symbols: Symbols) -> list[Launch]:
    """Bytes from the tensor arguments (each read or written once; the ones a kernel changed are counted
    as written), FLOPs from the GEMM sizes each launch was given (triton_flops). Scratch buffers with a
    program-count dimension keep their traced size (they are not rescaled)."""
    out = []
    for launch in launches:
        tensors = [(symbols.symbolic(shape), torch.empty(0, dtype=dt).element_size(), written)
                   for shape, dt, written in launch.tensors]
        read = sum(symbols.numel(sym) * size for sym, size, written in tensors if not written)
        write = sum(symbols.numel(sym) * size for sym, size, written in tensors if written)
        out.append(Launch("triton::" + launch.name, [sym for sym, _, _ in tensors], triton_flops(launch, symbols),
                          read, write))
    return out


# --------------------------------------------------------------------------------------------------
# What the compiled Triton kernels show (vera_kernels/triton/static.py, sass.py), and the estimate's model.

# The model (docs/DESIGN.md section 4; an estimate, the GPU benchmark is the judge). A Triton launch's
# FLOPs run at peak times the product of:
WGMMA_PIPELINED = 0.9  # wgmma K loops that keep >= 1 group in flight (Triton's persistent TMA matmul
#                        tutorial reaches about 0.9-1.05x cuBLAS)
WGMMA_WAIT_ZERO = 0.35  # a wgmma K loop that waits to depth 0 every step: loads and tensor cores serialize
MMA_SYNC = 0.6  # mma.sync (HMMA) on sm_90: the pre-Hopper instruction, about 60% of wgmma's rate
PER_DRAIN = 0.92  # each drain between K loops: the pipeline empties and refills once per tile
STG_EPILOGUE = 0.97  # a wgmma kernel's epilogue by synchronous STG (not overlapped as a TMA store is)
# and waves / ceil(waves) (the last wave's idle SMs). Memory-bound launches are unchanged (bytes / bandwidth).


def kernel_efficiency(row: dict) -> float:
    """The fraction of peak a compiled launch (a static.plan_rows row) is estimated to reach."""
    pipeline = row.get("pipeline")
    if not pipeline or not pipeline["loops"]:
        return 1.0
    loops = pipeline["loops"]
    if not any(loop["wgmma"] for loop in loops):
        efficiency = MMA_SYNC
    elif any(loop["wgmma"] and loop["wait_depth"] == 0 for loop in loops):
        efficiency = WGMMA_WAIT_ZERO
    else:
        efficiency = WGMMA_PIPELINED
    efficiency *= PER_DRAIN ** pipeline["drains"]
    if any(loop["wgmma"] for loop in loops) and pipeline["store"] != "TMA":
        efficiency *= STG_EPILOGUE
    waves = row.get("waves") or 0
    if waves > 0:
        efficiency *= waves / -(-waves // 1)
    return efficiency


def describe_compiled(row: dict) -> str:
    if row.get("error"):
        return f"{row['sm']} {row['config']}: FAILED to compile"
    units = "tiles" if row["units"] != row["programs"] else "programs"
    return (f"{row['sm']} {row['config']}: {row['registers']} regs, {row['shared'] / 1024:.0f} KB smem, "
            f"{row['blocks_per_sm']} block(s)/SM, {row['programs']} programs, {row['waves']:.2f} waves of {units}; "
            f"{row['pipeline']['summary']}{_judged(row)}; est. {kernel_efficiency(row):.0%} of peak")


def _judged(row: dict) -> str:
    """The static check's verdict on the pipeline: the findings it lets pass (and why), those it fails."""
    out = "".join(f" (allowed: {text})" for text in row.get("pipeline_allowed", ()))
    return out + "".join(f" (BREAKS THE RULE: {text})" for text in row.get("pipeline_violations", ()))


def compiled_facts(shape: dict) -> dict:
    """static.plan_rows at ``shape`` for sm_90a (compiled in a process without the interpreter): per pass,
    each Triton launch's compiled facts. Raises RuntimeError when it cannot compile (no cuobjdump)."""
    from vera_kernels.triton import static

    dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[shape["dtype"]]
    sizes = ",".join(str(shape[k]) for k in ("m", "in_features", "out_features", "rank"))
    return static.report(["--plan", sizes, "--dtype", dtype, "--arch", "90"])


def attach_facts(plan_: Plan, facts: dict) -> None:
    """Each Triton launch of each pass takes its compiled facts (matched by kernel, in launch order: the
    proxy trace and the capture at the shape run the same host code) and its estimated efficiency."""
    for pass_, launches in plan_.passes.items():
        rows = list(facts["backward" if pass_ == "backward" else "forward"])
        for launch in launches:
            kernel = launch.name.removeprefix("triton::")
            row = next((r for r in rows if r["kernel"] == kernel), None)
            if row is None:
                continue
            rows.remove(row)
            launch.efficiency, launch.facts = kernel_efficiency(row), describe_compiled(row)


# --------------------------------------------------------------------------------------------------
# The plans, run at the proxy shape.


def _problem(p: dict, dtype, requires_grad=True):
    import vera_kernels

    torch.manual_seed(0)
    m, i, o, r = p["m"], p["in_features"], p["out_features"], p["rank"]
    A, B = vera_kernels.generate_projections(0, r, i, o, dtype=dtype)
    return dict(
        x=torch.randn(m, i, dtype=dtype, requires_grad=requires_grad),
        weight=torch.randn(o, i, dtype=dtype), bias=torch.randn(o, dtype=dtype), A=A, B=B,
        lambda_d=torch.randn(r, requires_grad=requires_grad), lambda_b=torch.randn(o, requires_grad=requires_grad),
        grad=torch.randn(m, o, dtype=dtype),
    )


def _passes(forward, grad, leaves):
    """pass name -> (untraced preparation or None, traced call), run in this order (leaves: the tensors
    that get gradients):
      forward           inference (no_grad) in the steady state: after one untraced call
      training forward  with autograd, in the steady state of training: after an untraced step
      backward          of the training forward
    """
    state = {}

    def inference():
        with torch.no_grad():
            forward()

    def training_forward():
        for t in leaves:  # a fresh step: gradients are written, not accumulated
            t.grad = None
        state["y"] = forward()

    def backward():
        state.pop("y").backward(grad)

    def step():
        training_forward()
        backward()

    return {"forward": (inference, inference), "training forward": (step, training_forward), "backward": (None, backward)}


def _leaves(q):
    return [t for t in q.values() if t.requires_grad]


def cpp_passes(p):
    import vera_kernels

    q = _problem(p, torch.float32)
    fields = {k: q[k] for k in ("x", "weight", "bias", "A", "B", "lambda_d", "lambda_b")}
    return _passes(lambda: vera_kernels.vera_linear(**fields, backend="cpu"), q["grad"], _leaves(q))


def triton_passes(p, dtype):
    import vera_kernels

    q = _problem(p, dtype)
    fields = {k: q[k] for k in ("x", "weight", "bias", "A", "B", "lambda_d", "lambda_b")}
    return _passes(lambda: vera_kernels.vera_linear(**fields, backend="triton"), q["grad"], _leaves(q))


def triton_on_cpu() -> bool:
    import vera_kernels

    status = vera_kernels.backends()["triton"]
    return status.available and "cpu" in status.devices


def unfused_passes(p, dtype):
    q = _problem(p, dtype)

    def forward():
        d, b = q["lambda_d"].to(dtype), q["lambda_b"].to(dtype)
        return torch.nn.functional.linear(q["x"], q["weight"], q["bias"]) + ((q["x"] @ q["A"].t()) * d) @ q["B"].t() * b

    return _passes(forward, q["grad"], _leaves(q))


def peft_passes(p, dtype):
    import peft

    q = _problem(p, dtype)
    linear = torch.nn.Linear(p["in_features"], p["out_features"], dtype=dtype).requires_grad_(False)

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = linear

        def forward(self, x):
            return self.proj(x)

    model = peft.get_peft_model(Holder(), peft.VeraConfig(r=p["rank"], target_modules=["proj"]))
    with torch.no_grad():
        for t in model.parameters():
            if t.requires_grad:
                t.normal_()
    return _passes(lambda: model(q["x"]), q["grad"], _leaves(q) + [t for t in model.parameters() if t.requires_grad])


def wrapped_passes(p):
    import vera_kernels

    q = _problem(p, torch.float32)

    def forward():
        base_out = torch.nn.functional.linear(q["x"], q["weight"], q["bias"])  # the wrapped base's own forward
        return vera_kernels.vera_delta(q["x"], q["A"], q["B"], q["lambda_d"], q["lambda_b"], base_out, backend="cpu")

    return _passes(forward, q["grad"], _leaves(q))


def base_passes(p, dtype):
    q = _problem(p, dtype)
    return _passes(lambda: torch.nn.functional.linear(q["x"], q["weight"], q["bias"]), q["grad"], _leaves(q))


@functools.lru_cache(maxsize=None)
def traced(dtype_name: str, decode: bool = False) -> tuple:
    """((plan name, how it was traced, {pass: events}), ...) at the proxy shape (DECODE_PROXY with
    ``decode``): traced once per dtype, rescaled to any shape by describe() and describe_triton()."""
    dtype = getattr(torch, dtype_name)
    proxy = DECODE_PROXY if decode else PROXY
    candidates = []
    if vera_kernels_cpu_available():
        candidates.append(("cpp", cpp_passes(proxy), "fp32"))
    if triton_on_cpu():
        candidates.append(("triton", triton_passes(proxy, dtype), "triton"))
    candidates.append(("unfused", unfused_passes(proxy, dtype), "dtype"))
    try:
        candidates.append(("peft", peft_passes(proxy, dtype), "dtype"))
    except ImportError:
        pass
    if vera_kernels_cpu_available():
        candidates.append(("wrapped", wrapped_passes(proxy), "fp32"))
    candidates.append(("base", base_passes(proxy, dtype), "dtype"))
    out = []
    for name, passes, how in candidates:
        events = {}
        for pass_, (prepare, fn) in passes.items():
            if prepare is not None:
                prepare()
            events[pass_] = trace_triton(fn) if how == "triton" else trace(fn)
        out.append((name, how, events))
    return tuple(out)


def vera_kernels_cpu_available() -> bool:
    import vera_kernels

    return vera_kernels.backends()["cpu"].available


def build_plans(shape: dict, facts: dict | None = None) -> list[Plan]:
    """Every traced plan at ``shape``; with ``facts`` (compiled_facts), the Triton plan's launches carry
    what their compiled code shows and run at its estimated efficiency, else at peak."""
    dtype = getattr(torch, shape["dtype"])
    target_size = torch.empty(0, dtype=dtype).element_size()
    symbols = Symbols(proxy_for(shape), shape)
    plans = []
    for name, how, events in traced(shape["dtype"], proxy_for(shape) is DECODE_PROXY):
        plan = Plan(name)
        for pass_, pass_events in events.items():
            plan.passes[pass_] = (describe_triton(pass_events, symbols) if how == "triton"
                                  else describe(pass_events, symbols, target_size, how == "fp32"))
        if how == "triton" and facts is not None:
            attach_facts(plan, facts)
        plans.append(plan)
    return plans


# --------------------------------------------------------------------------------------------------
# The CUDA decode plan (M <= 16), from the CUDA source: it cannot be traced without a GPU.

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "csrc")
H200_SMS = 132
DECODE_MAX_ROWS = 16


def _cuda_source() -> str:
    with open(os.path.join(CSRC, "vera_cuda.cu"), encoding="utf-8") as f:
        return f.read()


def _constant(source: str, name: str) -> int:
    found = re.search(rf"constexpr\s+(?:int|int64_t)\s+{name}\s*=\s*(\d+)\s*;", source)
    if found is None:
        raise ValueError(f"csrc/vera_cuda.cu: no constant {name}")
    return int(found.group(1))


def cuda_decode_launches(source: str | None = None) -> list[str]:
    """The kernels decode_adapter_cuda launches, in order (each once: a kernel launched on either side of
    an if, its vector or its element-by-element instance, is one launch)."""
    source = _cuda_source() if source is None else source
    start = source.index("const char* decode_adapter_cuda(")
    body = source[start:source.index("\n}\n", start)]
    return list(dict.fromkeys(re.findall(r"(\w+_kernel)<[^;]*?><<<", body)))


def cuda_decode_splits(in_features: int, rank: int, sms: int = H200_SMS, source: str | None = None) -> int:
    """decode_splits_cuda's count of K splits (about two blocks per SM, at least kDecodeMinSplit columns each)."""
    source = _cuda_source() if source is None else source
    warps, min_split = _constant(source, "kDecodeWarps"), _constant(source, "kDecodeMinSplit")
    row_blocks = -(-rank // warps)
    wanted = -(-2 * sms // row_blocks)
    return max(1, min(wanted, max(1, in_features // min_split)))


def cuda_decode_plan(shape: dict, source: str | None = None) -> Plan:
    """vera_linear on the cuda backend at M <= 16, one adapter: the decode kernels write y = bias + the adapter
    term, then the base GEMM accumulates x W0ᵀ into y (vera_ops.cpp, vera_forward_). Each kernel's DRAM bytes:
    A, B and W read once (x, t and the partials are re-read from L2 by the blocks, counted once); x, A, B in
    the requested dtype, the vectors and the scratch fp32. A and B are read in 16-byte vectors per lane when
    their rows are 16-byte aligned (every row of the shared projections at these sizes)."""
    m, i, o, r = shape["m"], shape["in_features"], shape["out_features"], shape["rank"]
    if not 1 <= m <= DECODE_MAX_ROWS:
        raise ValueError(f"the CUDA decode plan is for 1 <= M <= {DECODE_MAX_ROWS}, got M = {m}")
    size = torch.empty(0, dtype=getattr(torch, shape["dtype"])).element_size()
    source = _cuda_source() if source is None else source
    splits = cuda_decode_splits(i, r, source=source)
    model = {  # name -> (shapes, FLOPs, bytes read, bytes written)
        "decode_shrink_kernel": ([("r", "in"), ("M", "in")], 2 * m * r * i, (r * i + m * i) * size,
                                 4 * splits * m * r),
        "decode_shrink_total_kernel": ([(str(splits), "M", "r"), ("r",)], splits * m * r, 4 * (splits * m * r + r),
                                       m * r * (size + 4)),
        "decode_expand_kernel": ([("out", "r"), ("M", "r"), ("out",), ("out",)], 2 * m * r * o,
                                 o * r * size + 4 * (m * r + o) + o * size, m * o * size),
    }
    launches = []
    for name in cuda_decode_launches(source):
        if name not in model:
            raise ValueError(f"csrc/vera_cuda.cu launches {name} in decode_adapter_cuda: bench/plan.py has no "
                             "model of its bytes (cuda_decode_plan)")
        shapes, flops, read, written = model[name]
        launches.append(Launch("cuda::" + name, shapes, flops, read, written))
    # y += x W0ᵀ (cuBLAS): W, x and y read, y written.
    launches.append(Launch("addmm_", [("M", "out"), ("M", "in"), ("in", "out")], 2 * m * i * o,
                           (o * i + m * i + m * o) * size, m * o * size))
    return Plan("cuda decode", {"forward": launches})


# The layer benchmark's implementations (bench/harness.py) and passes, by plan.
_BENCH_PLANS = {"base": "base", "vera-cuda": "cpp", "vera-cpu": "cpp", "vera-triton": "triton", "unfused": "unfused",
                "peft": "peft"}


def estimate_seconds(impl: str, pass_: str, m: int, in_features: int, out_features: int, rank, dtype: str):
    """The H200 roofline estimate of a layer benchmark case (bench/harness.py's impl and pass names), or
    None for implementations without a traced plan here (Triton, compiled PEFT, LoRA, merged)."""
    name = _BENCH_PLANS.get(impl)
    if name is None:
        return None
    shape = dict(m=m, in_features=in_features, out_features=out_features, rank=rank or PROXY["rank"], dtype=dtype)
    if impl == "vera-cuda" and pass_ == "forward" and m <= DECODE_MAX_ROWS:
        return cuda_decode_plan(shape).seconds("forward")
    plan = next((p for p in build_plans(shape) if p.name == name), None)
    if plan is None:
        return None
    if pass_ == "forward+backward":
        return plan.seconds("training forward") + plan.seconds("backward")
    return plan.seconds(pass_)


def floors(shape: dict) -> dict:
    i, o, r = shape["in_features"], shape["out_features"], shape["rank"]
    return {"forward": 1 + r * (i + o) / (i * o), "forward+backward": (2 * i * o + r * (2 * i + 3 * o)) / (2 * i * o)}


def ratios(plans: list[Plan]) -> dict:
    """Estimated time over the base's, per plan: the inference forward, and a training step (forward and
    backward) over the base's forward + dx."""
    base = next(p for p in plans if p.name == "base")

    def step(p):
        return p.seconds("training forward") + p.seconds("backward")

    return {p.name: {"forward": p.seconds("forward") / base.seconds("forward"),
                     "forward+backward": step(p) / step(base)} for p in plans}


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e6:8.1f} MB"


def report(shape: dict, plans: list[Plan]) -> str:
    lines = [f"Plans for M = {shape['m']}, in = {shape['in_features']}, out = {shape['out_features']}, "
             f"r = {shape['rank']}, {shape['dtype']}; roofline: H200, {PEAK_FLOPS / 1e12:.0f} TFLOP/s, "
             f"{BANDWIDTH / 1e12:.1f} TB/s (an estimate, not a measurement)", ""]
    decode = [cuda_decode_plan(shape)] if shape["m"] <= DECODE_MAX_ROWS else []
    for plan in plans + decode:
        for pass_, launches in plan.passes.items():
            if pass_ == "training forward" and [l.name for l in launches] == [l.name for l in plan.passes["forward"]]:
                lines.append(f"{plan.name} {pass_}: as its forward")
                continue
            lines.append(f"{plan.name} {pass_}: {len(launches)} launches, {plan.seconds(pass_) * 1e6:.1f} us")
            for launch in launches:
                shapes = " ".join("(" + ",".join(s) + ")" for s in launch.shapes)
                lines.append(f"  {launch.name:32s} {launch.flops / 1e9:9.2f} GFLOP  read {_fmt_bytes(launch.bytes_read)}"
                             f"  write {_fmt_bytes(launch.bytes_written)}  {launch.seconds() * 1e6:8.1f} us  {shapes}")
                if launch.facts:
                    lines.append(f"  {'':22s} {launch.facts}")
        lines.append("")
    if decode:
        lines.append(f"note: at M <= {DECODE_MAX_ROWS} the cuda backend runs the cuda decode plan ({H200_SMS} SMs: "
                     f"{cuda_decode_splits(shape['in_features'], shape['rank'])} K splits; 16-byte loads of A, B "
                     "and x per lane where their rows are 16-byte aligned), not the GEMM plan traced above; the "
                     "cpp rows are the CPU twin's plan")
        lines.append(f"cuda decode forward / base fwd: {decode[0].seconds('forward') / next(p for p in plans if p.name == 'base').seconds('forward'):.3f}")
    floor = floors(shape)
    lines.append(f"Estimated time over the base layer's (arithmetic floor: forward {floor['forward']:.3f}, "
                 f"forward+backward {floor['forward+backward']:.3f}):")
    lines.append(f"{'plan':8s} {'forward / base fwd':>18s} {'fwd+bwd / base fwd+dx':>22s}")
    for name, r in ratios(plans).items():
        lines.append(f"{name:8s} {r['forward']:18.3f} {r['forward+backward']:22.3f}")
    return "\n".join(lines)


def main(argv=None):
    if not torch.cuda.is_available():  # Triton's kernels run on CPU only under its interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    parser = argparse.ArgumentParser(prog="python -m bench.plan", description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=TARGET["m"], help="tokens, the rows of x (default: %(default)s)")
    parser.add_argument("--in-features", type=int, default=TARGET["in_features"],
                        help="the layer's input size (default: %(default)s)")
    parser.add_argument("--out-features", type=int, default=TARGET["out_features"],
                        help="the layer's output size (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=TARGET["rank"], help="VeRA's r (default: %(default)s)")
    parser.add_argument("--dtype", default=TARGET["dtype"], choices=["float32", "bfloat16", "float16"],
                        help="the dtype of x, the weights and the projections (default: %(default)s)")
    parser.add_argument("--no-sass", dest="sass", action="store_false",
                        help="skip compiling the Triton launches for sm_90a (their facts and efficiency; "
                             "then the Triton plan is estimated at peak)")
    shape = vars(parser.parse_args(argv))
    facts = None
    if shape.pop("sass") and triton_on_cpu():
        try:
            facts = compiled_facts(shape)
        except RuntimeError as exc:
            print(f"note: Triton launches not compiled ({str(exc).splitlines()[0]}): estimated at peak")
    print(report(shape, build_plans(shape, facts)))


if __name__ == "__main__":
    main()
