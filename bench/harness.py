"""The layer benchmark's parts: what is compared, on which shapes, how it is timed and what is recorded.

Implementations of one adapted linear layer (x: M x in, W0: out x in frozen, bias frozen):
  base          nn.Linear alone: the floor's reference (docs/DESIGN.md section 5)
  merged        FusedVeRALinear after merge(): the base GEMM on W0 + ΔW (inference only)
  vera-<b>      FusedVeRALinear on each fused backend b that runs here (cpu; triton and cuda on a GPU; the
                Triton interpreter's timings say nothing, so never on CPU)
  vera-triton-pointers  on a GPU, at the first layer's training Ms: vera-triton with the fused GEMM on pointer
                (cp.async) loads instead of TMA descriptors (one K loop for dx against one per source)
  unfused       the card's formula in plain torch, autograd's backward: y = x W0ᵀ + bias + ((x Aᵀ) d) Bᵀ b
  peft          PEFT's own VeRA layer, eager (its defaults: λ vectors in fp32)
  peft-compile  the same under torch.compile (only a few shapes: each compiles for tens of seconds)
  lora-8/64     PEFT's LoRA layer at r = 8 and 64 (its defaults: adapter weights upcast to fp32)
  <impl>+graph  decode only, on a GPU: the same layer's forward captured once in a CUDA graph and replayed
                (what a serving loop does): the kernels' time without the host's per-call overhead
Passes: forward (inference, no_grad), backward (y.backward(g) after an untimed forward) and
forward+backward (one training step). x requires grad (an upstream layer would want dx); the trained
parameters are the adapter's. Inputs are random normal, never zeros.

Timing. GPU: each round flushes L2 (a 256 MB write) before an untimed CUDA-event pair brackets the
op; the figure is the events' median (the pytest-benchmark table beside it is wall time with a sync).
CPU: pytest-benchmark's median of perf_counter rounds. Warm-up rounds first (Triton autotunes there).
Recorded per case: the median seconds, FLOPs (the operation's minimal count: section 5's for VeRA,
LoRA's own, the base GEMM for base and merged), the saved-activation bytes (storages autograd saves,
parameters, buffers and x excluded) and on a GPU the peak memory a step adds (torch.cuda.max_memory_allocated;
on CPU: not measured). Ratios to the base and to the floor are computed by bench/report.py.

Settings come from the environment (the suite runs under plain ``pytest bench/ --benchmark-only``):
  VERA_BENCH_QUICK=1      the smallest shapes, one round each (CI), as in every benchmark file (bench_common)
  VERA_BENCH_JSON=PATH    where the records go (default .benchmarks/vera-layers-<device>.json): this suite's
                          rows, and every other suite's (bench/conftest.py) under "suites"
  VERA_BENCH_DEADLINE=T   skip the cases left after Unix time T (a GPU session's budget; bench/conftest.py)
  VERA_BENCH_DRY_RUN=1    tiny shapes, one round (bench/gpu_check.sh --dry-run: the plumbing, no figures)
  VERA_BENCH_GROUP=G      only the cases of group G (see group(): target, decode, compile, rest)
  VERA_BENCH_APPEND=1     keep the records already in VERA_BENCH_JSON (one file over several sessions)
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import statistics
from dataclasses import dataclass

import torch
from torch import nn

import bench_common
from bench_common import LoadProbe, dispersion  # noqa: F401  (LoadProbe: used from here by the suite)
from bench_common import write_json_atomically
from vera_kernels.measure import saved_activation_bytes  # noqa: F401  (bench/test_bench_cpu.py uses it from here)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PASSES = ("forward", "backward", "forward+backward")

# GPU: Llama-7B's layer sizes, bf16. CPU: a quarter of each size, fp32 (2 cores would take hours). Each
# list is in order of importance (a GPU session may run out of time): the first layer and rank, the
# training Ms, then decode.
GPU = dict(dtype=torch.bfloat16, layers=[(4096, 4096), (4096, 11008)], ranks=[256, 1024],
           ms=[8192, 2048, 1, 16, 512], rounds=15, warmup=3)
CPU = dict(dtype=torch.float32, layers=[(1024, 1024), (1024, 2752)], ranks=[64, 256], ms=[512, 128, 1, 16],
           rounds=5, warmup=1)
DRY_RUN = dict(dtype=torch.float32, layers=[(64, 96)], ranks=[16], ms=[32, 1], rounds=1, warmup=1)
DECODE_M = 16  # M at or under this: decode, forward only (nobody trains on one token)
LORA_RANKS = (8, 64)
GRAPHED = ("base", "peft", "lora-8")  # besides the fused backends: replayed from a CUDA graph at decode M
# The Triton backend with its fused GEMM on pointer (cp.async) loads where it would take TMA descriptors:
# dx then runs one K loop over [in | r] (no drain), the TMA variant a loop per source with one drain per
# tile (docs/DESIGN.md section 4, "a TMA loop per source"). Timed beside vera-triton at the primary shape's
# training Ms so that the GPU says which pipeline the default should be.
POINTER_LOADS = "vera-triton-pointers"
GROUPS = ("target", "decode", "compile", "rest")


@dataclass(frozen=True)
class Case:
    impl: str
    pass_: str
    m: int
    in_features: int
    out_features: int
    rank: int | None  # VeRA's r; None for base, LoRA (their own r) and merged's cost, which r does not change

    @property
    def id(self) -> str:
        r = f"-r{self.rank}" if self.rank else ""
        return f"{self.pass_}-{self.impl}-{self.in_features}x{self.out_features}{r}-M{self.m}"


def settings(device: str = DEVICE, quick: bool | None = None, dry_run: bool | None = None) -> dict:
    quick = bench_common.quick() if quick is None else quick
    dry_run = os.environ.get("VERA_BENCH_DRY_RUN") == "1" if dry_run is None else dry_run
    s = dict(DRY_RUN if dry_run else GPU if device == "cuda" else CPU, quick=quick, dry_run=dry_run)
    if quick:  # the first layer and rank, the smallest training M and the smallest decode M, one round
        ms = s["ms"]
        s.update(layers=s["layers"][:1], ranks=s["ranks"][:1], rounds=1, warmup=1,
                 ms=[min(m for m in ms if m > DECODE_M), min(ms)])
    return s


def fused_backends(device: str = DEVICE) -> list[str]:
    import vera_kernels

    names = []
    for name in ("triton", "cuda", "cpu"):
        status = vera_kernels.backends()[name]
        if status.available and device in status.devices and not (name == "triton" and device == "cpu"):
            names.append(name)
    return names


def cases(device: str = DEVICE, quick: bool | None = None, dry_run: bool | None = None) -> list[Case]:
    """Every case, most important first (a GPU session may run out of time): the first layer and rank at
    every M (in the settings' order: the training Ms, then decode), then the other layer, then the other
    rank; the torch.compile cases (tens of seconds of compiling each) last. Within an M the base first."""
    s = settings(device, quick, dry_run)
    vera = [f"vera-{b}" for b in fused_backends(device)] + ["unfused", "peft"]
    out, compiled = [], []
    decode_ms = [m for m in s["ms"] if m <= DECODE_M]
    for rank in s["ranks"]:
        for in_f, out_f in s["layers"]:
            first_rank = rank == s["ranks"][0]
            primary = first_rank and (in_f, out_f) == s["layers"][0]
            for m in s["ms"]:
                passes = PASSES[:1] if m <= DECODE_M else PASSES
                for pass_ in passes:
                    start = len(out)
                    if first_rank:
                        out.append(Case("base", pass_, m, in_f, out_f, None))
                        if pass_ == "forward":
                            out.append(Case("merged", pass_, m, in_f, out_f, None))
                    out += [Case(impl, pass_, m, in_f, out_f, rank) for impl in vera]
                    if primary and device == "cuda" and "vera-triton" in vera and m > DECODE_M and pass_ != "backward":
                        out.append(Case(POINTER_LOADS, pass_, m, in_f, out_f, rank))
                    # torch.compile: the largest decode M and the largest M of the primary shapes only (the
                    # dry run: the first of those, the plumbing of bench/gpu_check.sh's compile step).
                    if (primary and m in (max(decode_ms, default=None), max(s["ms"])) and pass_ != "backward"
                            and not (s["dry_run"] and compiled)):
                        compiled.append(Case("peft-compile", pass_, m, in_f, out_f, rank))
                    if first_rank:
                        out += [Case(f"lora-{r}", pass_, m, in_f, out_f, None) for r in LORA_RANKS]
                    if m <= DECODE_M and device == "cuda" and primary:  # the same, replayed from a CUDA graph
                        out += [Case(c.impl + "+graph", pass_, m, in_f, out_f, c.rank) for c in out[start:]
                                if c.impl in GRAPHED or c.impl.startswith("vera-")]
    return out + compiled


def group(case: Case, device: str = DEVICE, quick: bool | None = None, dry_run: bool | None = None) -> str:
    """A case's place in bench/gpu_check.sh's plan: "target" (the first layer and rank at the training Ms,
    forward and forward+backward), "decode" (the first layer and rank at decode M, eager and graphed),
    "compile" (the first torch.compile case), "rest" (everything else)."""
    s = settings(device, quick, dry_run)
    primary = (case.in_features, case.out_features) == s["layers"][0] and case.rank in (s["ranks"][0], None)
    if case.impl == "peft-compile":
        first = next(c for c in cases(device, quick, dry_run) if c.impl == "peft-compile")
        return "compile" if case == first else "rest"
    if primary and case.m <= DECODE_M:
        return "decode"
    if primary and case.pass_ in ("forward", "forward+backward"):
        return "target"
    return "rest"


def selected_cases(device: str = DEVICE) -> list[Case]:
    """The cases this session runs: all of them, or VERA_BENCH_GROUP's."""
    wanted = os.environ.get("VERA_BENCH_GROUP")
    if wanted and wanted not in GROUPS:
        raise ValueError(f"VERA_BENCH_GROUP must be one of {', '.join(GROUPS)}; got {wanted!r}")
    return [c for c in cases(device) if not wanted or group(c, device) == wanted]


# --------------------------------------------------------------------------------------------------
# The layers.


@dataclass
class Layer:
    module: object  # x -> y
    trainable: list  # parameters that get gradients (besides x)
    owned: set  # storage pointers of parameters and buffers: not activations


class _Holder(nn.Module):
    """What get_peft_model adapts: a model holding the layer as ``proj``."""

    def __init__(self, linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


class Unfused(nn.Module):
    """The card's formula, x W0ᵀ + bias + ((x Aᵀ) ⊙ d) Bᵀ ⊙ b, in plain torch; autograd keeps what it needs."""

    def __init__(self, linear, A, B, lambda_d, lambda_b):
        super().__init__()
        self.linear, self.A, self.B = linear, A, B
        self.lambda_d, self.lambda_b = nn.Parameter(lambda_d), nn.Parameter(lambda_b)

    def forward(self, x):
        d, b = self.lambda_d.to(x.dtype), self.lambda_b.to(x.dtype)
        return self.linear(x) + ((x @ self.A.t()) * d) @ self.B.t() * b


@contextlib.contextmanager
def _pointer_loads():
    from vera_kernels.triton import linear

    with linear.forced_tma(False):
        yield


def _randomize(parameters) -> None:
    # PEFT starts lambda_b and lora_B at 0: train from a nonzero point, as after a few steps (same cost).
    with torch.no_grad():
        for p in parameters:
            p.normal_(0, 0.1)


@functools.lru_cache(maxsize=8)
def build(impl: str, in_features: int, out_features: int, rank: int | None, dtype, device: str) -> Layer:
    """One layer per (impl, shape), kept for the passes and Ms that follow (a compiled one compiles once
    per pass and M regime, not per case)."""
    import vera_kernels

    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, device=device, dtype=dtype).requires_grad_(False)
    base_storages = {p.untyped_storage().data_ptr() for p in linear.parameters()}
    if impl == "base":
        return Layer(linear, [], base_storages)
    if impl in ("merged",) or impl.startswith("vera-"):
        backend = "auto" if impl == "merged" else "triton" if impl == POINTER_LOADS else impl.removeprefix("vera-")
        layer = vera_kernels.FusedVeRALinear.from_linear(linear, rank or settings(device)["ranks"][0], backend=backend)
        _randomize([layer.lambda_d, layer.lambda_b])
        if impl == "merged":
            layer.merge()
            layer.eval()
        owned = base_storages | {p.untyped_storage().data_ptr() for p in layer.parameters()}
        A, B = layer.projections.pair(torch.device(device), dtype)
        return Layer(layer, [layer.lambda_d, layer.lambda_b], owned | {A.untyped_storage().data_ptr(), B.untyped_storage().data_ptr()})
    if impl == "unfused":
        A, B = vera_kernels.generate_projections(0, rank, in_features, out_features, dtype=dtype, device=device)
        module = Unfused(linear, A, B, torch.empty(rank, device=device), torch.empty(out_features, device=device))
        _randomize([module.lambda_d, module.lambda_b])
        return Layer(module, [module.lambda_d, module.lambda_b], _storages(module))
    import peft

    if impl.startswith("lora-"):
        config = peft.LoraConfig(r=int(impl.removeprefix("lora-")), lora_alpha=16, target_modules=["proj"])
    else:
        config = peft.VeraConfig(r=rank, target_modules=["proj"])
    model = peft.get_peft_model(_Holder(linear), config).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    _randomize(trainable)
    # The dry run checks the plumbing of the compile step: Dynamo's trace, not Inductor's minute of C++.
    compile_backend = "eager" if settings(device)["dry_run"] else "inductor"
    module = torch.compile(model, backend=compile_backend) if impl == "peft-compile" else model
    return Layer(module, trainable, _storages(model))


def _storages(module: nn.Module) -> set:
    return {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}


# --------------------------------------------------------------------------------------------------
# Running one case.


class Runner:
    """The timed op of a case and its untimed setup, in pytest-benchmark's ``pedantic`` form."""

    def __init__(self, case: Case, dtype, device: str = DEVICE):
        self.case, self.device = case, device
        self.graphed = case.impl.endswith("+graph")
        self.layer = build(case.impl.removesuffix("+graph"), case.in_features, case.out_features, case.rank, dtype,
                           device)
        self.graph = None
        # Every call of the layer (forward and backward) under the case's load variant.
        self.loads = _pointer_loads if case.impl == POINTER_LOADS else contextlib.nullcontext
        torch.manual_seed(1)
        self.x = torch.randn(case.m, case.in_features, device=device, dtype=dtype, requires_grad=True)
        self.grad = torch.randn(case.m, case.out_features, device=device, dtype=dtype)
        self.y = None
        self.event_times: list[float] = []
        # do_bench's way to start every round from a cold L2: overwrite a buffer larger than it.
        self._flush = torch.empty(256 << 20, dtype=torch.int8, device=device) if device == "cuda" else None

    def _clear_grads(self):
        self.x.grad = None
        for p in self.layer.trainable:
            p.grad = None

    def setup(self):
        self._clear_grads()
        if self.case.pass_ == "backward":
            with self.loads():
                self.y = self.layer.module(self.x)
        if self._flush is not None:
            self._flush.zero_()

    def op(self):
        with self.loads():
            if self.graph is not None:
                self.graph.replay()
            elif self.case.pass_ == "forward":
                with torch.no_grad():
                    self.layer.module(self.x)
            elif self.case.pass_ == "backward":
                self.y.backward(self.grad)
                self.y = None
            else:
                self.layer.module(self.x).backward(self.grad)

    def target(self):
        """The timed call: on a GPU the op between two CUDA events, then a sync (for the wall clock)."""
        if self.device != "cuda":
            self.op()
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self.op()
        end.record()
        torch.cuda.synchronize()
        self.event_times.append(start.elapsed_time(end) / 1e3)

    def warm_up(self, rounds: int):
        for _ in range(rounds):
            self.setup()
            self.target()
        self.event_times.clear()
        if self.graphed:
            self._capture()

    def _capture(self):
        """Capture the forward in a CUDA graph (after the eager warm-up: plans, projections and autotuning
        are done, so the capture tunes nothing); op() replays it."""
        side = torch.cuda.Stream()  # a warm-up on a side stream first, as torch.cuda.graph's docs ask
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            self.layer.module(self.x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            self.layer.module(self.x)
        self.graph = graph

    def saved_activation_bytes(self) -> int | None:
        """Bytes of the distinct storages autograd saves for backward in one forward (None for inference)."""
        if self.case.pass_ == "forward":
            return None
        with self.loads():
            return saved_activation_bytes(self.layer.module, self.x, self.layer.owned)

    def peak_bytes(self) -> int | None:
        """What one op adds to the allocated memory at its peak (GPU only: torch's CPU allocator keeps no count)."""
        if self.device != "cuda":
            return None
        self.setup()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        self.op()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before


# --------------------------------------------------------------------------------------------------
# FLOPs (docs/DESIGN.md section 5).


def flops(impl: str, pass_: str, m: int, in_features: int, out_features: int, rank: int | None) -> int:
    """The operation's minimal FLOPs: the base GEMM (x W0ᵀ forward, g W0 backward) plus, for VeRA,
    2 r (in + out) per token forward and 2 r (in + 2 out) backward (dx, dd, db), for LoRA 2 r (in + out)
    forward and 4 r (in + out) backward (dx and both weight gradients). Merged: the base's."""
    base = 2 * m * in_features * out_features
    impl = impl.removesuffix("+graph")  # the same layer replayed from a CUDA graph: the same work
    if impl.startswith("lora-"):
        r = int(impl.removeprefix("lora-"))
        fwd, bwd = base + 2 * m * r * (in_features + out_features), base + 4 * m * r * (in_features + out_features)
    elif impl in ("base", "merged"):
        fwd, bwd = base, base
    else:
        fwd = base + 2 * m * rank * (in_features + out_features)
        bwd = base + 2 * m * rank * (in_features + 2 * out_features)
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[pass_]


# --------------------------------------------------------------------------------------------------
# The records file.


def results_path(device: str = DEVICE) -> str:
    return os.environ.get("VERA_BENCH_JSON") or os.path.join(".benchmarks", f"vera-layers-{device}.json")


def environment(device: str = DEVICE) -> dict:
    from vera_kernels.verify import environment as verify_environment

    env = verify_environment(device)
    if device == "cuda":  # vera_kernels.auto_table keys its choices on the GPU's name and capability
        env["capability"] = "{}.{}".format(*torch.cuda.get_device_capability())
    if device == "cpu":
        env["threads"] = torch.get_num_threads()
    return env


class Records:
    """The records of this session, rewritten to the file after every case, so a run stopped by a time
    limit keeps what it measured: the layer suite's rows under "results", every other suite's (one row per
    benchmark, from bench/conftest.py) under "suites"."""

    def __init__(self, device: str = DEVICE):
        self.device, self.path, self.rows, self.suite_rows = device, results_path(device), [], []
        self.header = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           environment=environment(device), settings=_jsonable(settings(device)))
        if os.environ.get("VERA_BENCH_APPEND") == "1" and os.path.exists(self.path):
            with open(self.path) as f:
                earlier = json.load(f)
            self.header, self.rows = {k: v for k, v in earlier.items() if k != "results"}, earlier["results"]

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self._write()

    def add_suite_row(self, row: dict) -> None:
        self.suite_rows.append(row)
        self._write()

    def _write(self) -> None:
        write_json_atomically(self.path, dict(self.header, results=self.rows, suites=self.suite_rows))


_session = None


def session_records() -> Records:
    """One records file per pytest session, created by the first case that runs (collecting writes nothing)."""
    global _session
    if _session is None:
        _session = Records()
    return _session


def _jsonable(s: dict) -> dict:
    return {k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v for k, v in s.items()}


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# --------------------------------------------------------------------------------------------------
# Timing records (dispersion and the load probe: bench_common).


def timing(benchmark, runner: "Runner") -> dict:
    """One case's timing record: ``seconds`` (the median), its dispersion, the rounds and the timer. GPU:
    the CUDA-event times; CPU: pytest-benchmark's perf_counter rounds. All None under --benchmark-disable."""
    if benchmark.stats is None:  # --benchmark-disable: the op ran once, untimed
        times, timer = [], None
    elif runner.event_times:
        times, timer = runner.event_times, "CUDA events, L2 flushed"
    else:
        times, timer = list(benchmark.stats.stats.data), "perf_counter"
    stats = dispersion(times)
    return dict(seconds=stats.pop("median"), **{f"{k}_seconds": v for k, v in stats.items()}, rounds=len(times),
                timer=timer)
