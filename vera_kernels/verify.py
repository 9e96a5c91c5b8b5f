"""``python -m vera_kernels.verify``: correctness checks of every backend available on this machine.

The checks: every backend that runs here in bfloat16, float16 and float32 (in that order: the dtype that
matters most first) on three shape sets (odd sizes, decode M = 1 and language-model shapes scaled to the
device), the outputs y, dx, dd, db, dbias of vera_linear and vera_delta's result, each against float64 on
the same rounded inputs and judged by the pass criterion (docs/DESIGN.md#the-pass-criterion: the dtype's
tolerance, or the output's conditioning-aware bound); the projection scheme against known
answers and bit for bit across backends; the float64 reference against autograd. A progress line and the
rows of each group as it finishes: backend, check, error (differing elements for the projection scheme,
relative error against float64 for the math), the limit and pass/fail. Exit status 1 on any failure.

How much: the default is a representative subset (every backend, the odd shapes and one decode and one
language-model shape per dtype, the scheme's known answers on a sample of elements; under 2 minutes on 2
CPU cores, and what CI runs); ``--full`` is the whole matrix (all shapes, every known answer, the full-size
pairs); ``--quick`` the odd shapes and the known answers only (a smoke test: ``bench/gpu_check.sh
--dry-run``). ``--json PATH`` keeps every row, rewritten after every group, so that a run cut short keeps
what it finished. A failing check is a failed row (its exception in the detail), never the end of the run.

On a GPU: the inputs of a shape are made on the device once and shared by every backend, the float64
reference is computed once, and the Triton kernels run one configuration each (``autotune.untuned``:
the first one autotuning would time; autotuning belongs to the benchmarks), so a run costs a few
compilations per kernel, not one per config.

``--static`` compiles every Triton kernel for sm_90a and sm_80 instead (no GPU needed; see
vera_kernels/triton/static.py).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib import resources

import torch

GOLDEN_FILE = "philox_projections.json"
_DTYPE_BITS = {
    torch.float32: (torch.int32, 0xFFFFFFFF),
    torch.bfloat16: (torch.int16, 0xFFFF),
    torch.float16: (torch.int16, 0xFFFF),
}


@dataclass
class Row:
    backend: str
    check: str
    error: float  # a count of differing elements, or a relative error
    unit: str  # "elements" or "rel"
    passed: bool
    detail: str = ""
    output: str = ""  # ops: the output (y, dx, ...) nearest its limit, whose error this row shows
    limit: float | None = None  # ops: the largest error that passes for that output
    seconds: float = 0.0  # ops: the backend's time for this check
    errors: dict | None = None  # ops: every output's relative error ...
    torch_errors: dict | None = None  # ... and PyTorch's own in the same dtype


def load_golden() -> dict:
    """Known answers from an independent implementation of the scheme (shipped with the package)."""
    return json.loads(resources.files("vera_kernels").joinpath("data", GOLDEN_FILE).read_text())


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor as non-negative int64."""
    int_dtype, mask = _DTYPE_BITS[t.dtype]
    return t.contiguous().view(int_dtype).to(torch.int64) & mask


def ieee_cast_bits(fp32_bits: list[int], dtype: torch.dtype) -> torch.Tensor:
    """fp32 bit patterns rounded to ``dtype`` by torch's own cast (IEEE nearest-even), as bits.

    The golden file has no fp16 column: torch's cast is an independent check of our integer rounding."""
    values = torch.tensor(fp32_bits, dtype=torch.int64).to(torch.int32).view(torch.float32)
    return bits_of(values.to(dtype))


# --------------------------------------------------------------------------------------------------
# Projection scheme checks. Each returns the number of elements that differ from the known answer.


def philox_kat_mismatches(backend: str, device, golden: dict) -> int:
    from .dispatch import lookup

    philox = lookup("philox4x32_10", backend, torch.device(device))
    vectors = golden["kat_philox4x32_10"]
    counters = torch.tensor([v["counter"] for v in vectors], dtype=torch.int64, device=device)
    keys = torch.tensor([v["key"] for v in vectors], dtype=torch.int64, device=device)
    expected = torch.tensor([v["out"] for v in vectors], dtype=torch.int64)
    return int((philox(counters, keys).cpu() != expected).sum())


def golden_word_mismatches(backend: str, device, golden: dict) -> int:
    """The raw Philox word of every sampled element: checks the counter and key layout."""
    from .dispatch import lookup

    philox = lookup("philox4x32_10", backend, torch.device(device))
    counters, keys, lanes, expected = [], [], [], []
    for case in golden["cases"]:
        for row, col, word in zip(case["row"], case["col"], case["word_u32"]):
            counters.append([col >> 2, row, case["tag"], 0])
            keys.append([case["seed"] & 0xFFFFFFFF, case["seed"] >> 32])
            lanes.append(col & 3)
            expected.append(word)
    words = philox(torch.tensor(counters, device=device), torch.tensor(keys, device=device)).cpu()
    got = words[torch.arange(len(lanes)), torch.tensor(lanes)]
    return int((got != torch.tensor(expected)).sum())


def golden_element_mismatches(backend: str, device, golden: dict, dtype: torch.dtype, every: int = 1) -> int:
    """Every sampled element (or every ``every``-th of each case), generated alone as a 1 x 1 block at its
    (row, col)."""
    from .projections import projection_block

    mismatches = 0
    for case in golden["cases"]:
        picked = range(0, len(case["row"]), every)
        got = torch.stack(
            [
                bits_of(
                    projection_block(
                        case["seed"], case["tag"], 1, 1, case["fan_in"], row_offset=case["row"][i],
                        col_offset=case["col"][i], dtype=dtype, device=device, backend=backend,
                    ).cpu()
                )[0, 0]
                for i in picked
            ]
        )
        mismatches += int((got != _expected_bits(case, dtype)[list(picked)]).sum())
    return mismatches


def golden_block_mismatches(backend: str, device, golden: dict, dtype: torch.dtype) -> int:
    """The full small blocks, element for element."""
    from .projections import projection_block

    mismatches = 0
    for block in golden["blocks_row_major"]:
        got = projection_block(
            block["seed"], block["tag"], block["rows"], block["cols"], block["fan_in"],
            dtype=dtype, device=device, backend=backend,
        )
        mismatches += int((bits_of(got.cpu()).flatten() != _expected_bits(block, dtype)).sum())
    return mismatches


def _expected_bits(entry: dict, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float32:
        return torch.tensor(entry["fp32_bits"], dtype=torch.int64)
    if dtype == torch.bfloat16:
        return torch.tensor(entry["bf16_bits"], dtype=torch.int64)
    return ieee_cast_bits(entry["fp32_bits"], dtype)


def cross_backend_mismatches(backend: str, device, dtype: torch.dtype, rank=256, dim=4096, seed=0, max_out=None) -> int:
    """The full pair A (rank x dim) and B (max_out x rank; max_out = dim by default) against the torch
    backend on CPU."""
    from .projections import generate_projections

    max_out = dim if max_out is None else max_out
    got = generate_projections(seed, rank, dim, max_out, dtype=dtype, device=device, backend=backend)
    want = _torch_pair(seed, rank, dim, max_out, dtype)
    return sum(int((bits_of(g.cpu()) != bits_of(w)).sum()) for g, w in zip(got, want))


@functools.lru_cache(maxsize=4)
def _torch_pair(seed, rank, max_in, max_out, dtype):
    """The torch backend's pair on CPU, made once for every backend compared with it."""
    from .projections import generate_projections

    return generate_projections(seed, rank, max_in, max_out, dtype=dtype, device="cpu", backend="torch")


def slice_mismatches(backend: str, device, dtype: torch.dtype, seed=2**63 - 1) -> int:
    """Slices of the max pair equal blocks generated alone: a layer's A_max[:, :in] and B_max[:out, :], and
    an interior block. The scale follows fan_in (max_in for A, rank for B), not the slice's width."""
    from .projections import TAG_A, generate_projections, projection_block

    common = dict(dtype=dtype, device=device, backend=backend)
    A_max, B_max = generate_projections(seed, 17, 1000, 700, **common)
    _, B = generate_projections(seed, 17, 333, 130, **common)
    pairs = [
        (A_max[:, :333], projection_block(seed, TAG_A, 17, 333, 1000, **common)),
        (B_max[:130], B),
        (A_max[5:12, 101:998], projection_block(seed, TAG_A, 7, 897, 1000, row_offset=5, col_offset=101, **common)),
    ]
    return sum(int((bits_of(a) != bits_of(b)).sum()) for a, b in pairs)


LEVELS = ("quick", "default", "full")
# How much of the scheme each level checks: every n-th sampled element of the known answers, and the
# pairs (rank, max_in, max_out) compared bit for bit with the torch backend.
GOLDEN_EVERY = {"quick": 24, "default": 8, "full": 1}
CROSS_PAIRS = {"quick": ((17, 333, 130),), "default": ((64, 1000, 700),), "full": ((256, 4096, 4096),)}
LLAMA_PAIR = (1024, 4096, 11008)  # the full run on a GPU also compares a Llama-7B-sized pair


def projection_rows(backend: str, device, golden: dict, level: str = "default") -> list[Row]:
    """The scheme's known answers (every sampled element in the full run, a sample of them otherwise) and
    the pair bit for bit against the torch backend on CPU. A check that raises is a failed row."""
    def row(check, count):
        try:
            mismatches = count()
        except Exception as exc:  # noqa: BLE001 (recorded: a failed row, never the end of the run)
            return Row(backend, check, float("inf"), "elements", False, _raised(exc))
        return Row(backend, check, mismatches, "elements", mismatches == 0)

    pairs = CROSS_PAIRS[level]
    if torch.device(device).type == "cuda" and level == "full":
        pairs += (LLAMA_PAIR,)
    every = GOLDEN_EVERY[level]
    sample = "" if every == 1 else f" (every {every}th)"
    rows = [
        row("philox4x32-10 known answers", lambda: philox_kat_mismatches(backend, device, golden)),
        row("golden words (counter/key layout)", lambda: golden_word_mismatches(backend, device, golden)),
    ]
    for dtype in DTYPE_ORDER:
        name = _dtype_name(dtype)
        rows.append(row(f"golden elements{sample} {name}",
                        lambda: golden_element_mismatches(backend, device, golden, dtype, every)))
        rows.append(row(f"golden blocks {name}", lambda: golden_block_mismatches(backend, device, golden, dtype)))
        if backend != "torch" or torch.device(device).type != "cpu":
            for rank, max_in, max_out in pairs:
                rows.append(row(f"A {rank}x{max_in}, B {max_out}x{rank} == torch on CPU {name}",
                                lambda: cross_backend_mismatches(backend, device, dtype, rank, max_in, max_out=max_out)))
        rows.append(row(f"slices of the max pair {name}", lambda: slice_mismatches(backend, device, dtype)))
    return rows


def _raised(exc: Exception) -> str:
    return f"raised {type(exc).__name__}: " + (str(exc).strip().splitlines() or [""])[0][:300]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------------
# Reference math checks (float64).


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64; NaN or inf anywhere gives inf, so it never passes."""
    got, want = got.detach().double(), want.detach().double()
    if not torch.isfinite(got).all():
        return float("inf")
    return float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want).clamp_min(1e-300))


def random_problem(m, in_features, out_features, rank, *, device="cpu", dtype=torch.float64, seed=0, batch=None):
    """Fresh random inputs with PEFT's slicing of a larger shared pair (max dims = dims + 7)."""
    from .projections import generate_projections

    A_max, B_max = generate_projections(seed, rank, in_features + 7, out_features + 5, device=device)
    shape = (batch, m, in_features) if batch else (m, in_features)
    return dict(
        x=torch.randn(*shape, device=device, dtype=dtype),
        weight=torch.randn(out_features, in_features, device=device, dtype=dtype) / in_features**0.5,
        bias=torch.randn(out_features, device=device, dtype=dtype),
        A=A_max[:, :in_features].to(dtype),
        B=B_max[:out_features, :].to(dtype),
        lambda_d=torch.randn(rank, device=device, dtype=dtype),
        lambda_b=torch.randn(out_features, device=device, dtype=dtype),
    )


TRAINABLE = ("x", "bias", "lambda_d", "lambda_b")


def analytic_vs_autograd_errors(problem: dict) -> dict[str, float]:
    """Relative errors of the analytic forward/backward against autograd on the naive formula."""
    from .reference import vera_linear, vera_linear_naive

    results = {}
    for fn in (vera_linear, vera_linear_naive):
        inputs = {k: v.detach().clone().requires_grad_(k in TRAINABLE) for k, v in problem.items()}
        y = fn(**inputs)
        y.backward(torch.ones_like(y).normal_(generator=torch.Generator(y.device).manual_seed(1)))
        results[fn.__name__] = [y] + [inputs[k].grad for k in TRAINABLE]
    names = ("y", "dx", "dbias", "dd", "db")
    return {n: relative_error(a, b) for n, a, b in zip(names, results["vera_linear"], results["vera_linear_naive"])}


def reference_rows(device) -> list[Row]:
    from .reference import vera_linear

    rows = []
    for shape in ((17, 40, 130, 17), (1, 130, 40, 1)):
        problem = random_problem(*shape, device=device, batch=3 if shape[0] > 1 else None)
        for name, err in analytic_vs_autograd_errors(problem).items():
            rows.append(Row("torch", f"reference {name} vs autograd, M,in,out,r={shape}", err, "rel", err < 1e-12))

    small = random_problem(5, 7, 6, 3, device=device)
    inputs = tuple(v.requires_grad_(k in TRAINABLE) for k, v in small.items())
    ok = torch.autograd.gradcheck(vera_linear, inputs, eps=1e-6, atol=1e-8, rtol=1e-6, raise_exception=False)
    rows.append(Row("torch", "reference gradcheck (float64)", 0.0 if ok else 1.0, "rel", ok))

    # A fresh adapter (d = d_initial, b = 0) is the identity: the base layer's output, bit for bit.
    fresh = random_problem(9, 40, 30, 8, device=device)
    fresh["lambda_d"] = torch.full_like(fresh["lambda_d"], 0.1)
    fresh["lambda_b"] = torch.zeros_like(fresh["lambda_b"])
    base = fresh["x"] @ fresh["weight"].t() + fresh["bias"]
    err = relative_error(vera_linear(**fresh), base)
    rows.append(Row("torch", "fresh adapter (d=0.1, b=0) is the base layer", err, "rel", err == 0.0))
    return rows


# --------------------------------------------------------------------------------------------------
# The ops on each backend against the float64 oracle: y, dx, dd, db, dbias of vera_linear, and vera_delta.

# (M, in, out, r, batch): decode M = 1, odd sizes, r = 1 and r not a multiple of 16, a 3-D input.
OP_SHAPES = ((1, 40, 130, 1, None), (17, 130, 40, 17, None), (300, 40, 130, 64, None), (9, 40, 40, 17, 2))
OP_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DTYPE_ORDER = (torch.bfloat16, torch.float16, torch.float32)  # the order of the groups: bf16 matters most
OUTPUTS = ("y", "dx", "dbias", "dd", "db", "delta")


def shape_sets(device, level: str = "default") -> dict[str, tuple]:
    """The op shapes for ``device`` at ``level``, by set: "odd" (OP_SHAPES), "decode" (M = 1 at a language
    model's layer sizes) and "llm" (its training shapes). On a GPU: Llama-7B's in = out = 4096 and
    4096 -> 11008 at r = 256 and 1024, M = 512 and 8192. On CPU the same layers at a quarter (1024 -> 1024,
    r = 256) and an eighth (512 -> 1376, r = 64) of their sizes, M = 128: the Triton interpreter takes
    ~10 s per M = 1 check at 1024 -> 2752 on 2 cores. The full level has them all, the default the odd set
    and one shape of each other set, quick the odd set alone."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}; got {level!r}")
    if torch.device(device).type == "cuda":
        decode = ((1, 4096, 11008, 256, None), (1, 4096, 4096, 1024, None))
        llm = ((512, 4096, 4096, 1024, None), (512, 4096, 11008, 256, None),
               (8192, 4096, 4096, 256, None), (8192, 4096, 11008, 1024, None))
        subset = dict(decode=decode[:1], llm=llm[1:2])
    else:
        decode = ((1, 1024, 1024, 256, None), (1, 512, 1376, 64, None))
        llm = ((128, 1024, 1024, 256, None), (128, 512, 1376, 64, None))
        subset = dict(decode=decode[1:], llm=llm[1:])
    return dict(odd=OP_SHAPES, **{"quick": {}, "default": subset, "full": dict(decode=decode, llm=llm)}[level])


def op_inputs(device, dtype: torch.dtype, shape, seed: int) -> tuple[dict, torch.Tensor]:
    """The inputs of one check, rounded to ``dtype`` (the lambdas fp32, as in a layer of any dtype), and the
    output gradient: made once per (shape, dtype, seed) and shared by every backend. On CPU from
    random_problem under the global seed (the seeds the tests name reproduce); on a GPU made on the device
    (float64 inputs made on the CPU and copied would cost more than the check at language-model shapes),
    the projections by the torch backend."""
    m, in_features, out_features, rank, batch = shape
    if torch.device(device).type == "cpu":
        torch.manual_seed(seed)
        problem = random_problem(m, in_features, out_features, rank, batch=batch, seed=seed)
        problem["lambda_d"] = problem["lambda_d"].float()
        problem["lambda_b"] = problem["lambda_b"].float()
        low = {k: (v if k.startswith("lambda") else v.to(dtype)).to(device) for k, v in problem.items()}
        grad = torch.randn(*low["x"].shape[:-1], out_features, dtype=torch.float64).to(dtype).to(device)
        return low, grad
    from .projections import generate_projections

    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, scale=1.0, to=dtype):
        return (torch.randn(*size, generator=generator, device=device) * scale).to(to)

    A_max, B_max = generate_projections(seed, rank, in_features + 7, out_features + 5, dtype=dtype, device=device,
                                        backend="torch")
    rows = (batch, m) if batch else (m,)
    low = dict(x=randn(*rows, in_features), weight=randn(out_features, in_features, scale=in_features**-0.5),
               bias=randn(out_features), A=A_max[:, :in_features], B=B_max[:out_features, :],
               lambda_d=randn(rank, to=torch.float32), lambda_b=randn(out_features, to=torch.float32))
    return low, randn(*rows, out_features)


def _exact(low: dict) -> dict:
    """The same rounded inputs in float64: what the reference computes on."""
    return {k: v.double() for k, v in low.items()}


def op_outputs(inputs: dict, grad: torch.Tensor, backend: str) -> dict[str, torch.Tensor]:
    """vera_linear's y and its gradients dx, dbias, dd, db (every input that can train requires grad), and
    vera_delta's result, on ``backend``; outputs poisoned with NaN before the kernels write them."""
    from .dispatch import poisoned_outputs
    from .ops import vera_delta, vera_linear

    leaves = {k: v.detach().clone().requires_grad_(k in TRAINABLE) for k, v in inputs.items()}
    with poisoned_outputs():
        y = vera_linear(**leaves, backend=backend)
        y.backward(grad.to(y.dtype))
        base = leaves["x"].detach() @ leaves["weight"].t()
        delta = vera_delta(leaves["x"].detach(), leaves["A"], leaves["B"], leaves["lambda_d"].detach(),
                           leaves["lambda_b"].detach(), base, backend=backend)
    grads = {f"d{k.removeprefix('lambda_')}": leaves[k].grad for k in TRAINABLE}
    return dict(y=y.detach(), **grads, delta=delta)


def output_errors(outputs: dict, oracle: dict) -> dict[str, float]:
    return {k: relative_error(outputs[k], oracle[k]) for k in oracle}


def op_errors(backend: str, device, dtype: torch.dtype, shape, seed: int) -> dict[str, float]:
    """Relative errors of vera_linear's y, dx, dd, db, dbias and of vera_delta on ``backend`` in ``dtype``
    against the float64 torch path on the same (rounded) inputs; outputs are poisoned with NaN first.
    ``seed`` seeds the random inputs and the projections."""
    low, grad = op_inputs(device, dtype, shape, seed)
    return output_errors(op_outputs(low, grad, backend), op_outputs(_exact(low), grad, "torch"))


# The conditioning-aware bound of every output (see conditioning_bounds).
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
REDUCTIONS = ("dd", "db", "dbias")
# Roundings to the layer dtype on the path of one term of each output, in any backend: s = x Aᵀ, t = d ⊙ s
# (or b ⊙ B), u = t Bᵀ for y and vera_delta; dt = (g ⊙ b) B (with b ⊙ B or g ⊙ b rounded), d ⊙ dt and the
# result for dx; s, dt and b ⊙ B or g ⊙ b for dd = Σ dt ⊙ s; s, t, u for db = Σ g ⊙ u; the result for dbias.
ROUNDINGS = {"y": 3, "delta": 3, "dx": 4, "dd": 3, "db": 3, "dbias": 1}
# The safety factor c. At M = r = 1 over 2,000 seeds (torch and cpu backends) the largest error of a
# correct kernel reaches about half of the bound with c = 4.
SAFETY = 4.0


def conditioning_bounds(low: dict, grad: torch.Tensor, dtype: torch.dtype) -> dict[str, float]:
    """The conditioning-aware limit of each output, as a relative error: c · n · u · ‖terms‖ / ‖result‖.

    Every output element is a sum of products of the inputs: dd_k = Σ_m,i,j g_mj b_j B_jk x_mi A_ki, db_j =
    Σ_m,k,i g_mj B_jk d_k A_ki x_mi, dbias_j = Σ_m g_mj, y_mj = Σ_i x_mi W_ji + bias_j + Σ_k,i b_j B_jk d_k
    A_ki x_mi (vera_delta: base_out_mj in place of the base GEMM), dx_mi = Σ_j g_mj W_ji + Σ_k,j d_k g_mj
    b_j B_jk A_ki. ‖terms‖ is the root-sum-square of those terms, computed in float64 on the rounded inputs:
    the rounding errors of a correct kernel are a random walk over the terms, so they scale with it, while a
    bug's errors add coherently (Σ|terms| ≈ √N ‖terms‖ for N random terms) and stand out. u is the dtype's
    unit roundoff; n the roundings to the dtype on a term's path (ROUNDINGS) plus the fp32 accumulation,
    whose chain of L additions counts as √L roundings of fp32 (L = M + in + out for dd, M + in + r for db, M
    for dbias, in + r for y, out + r for dx); c = SAFETY.

    Only cancellation loosens it: what is returned is the bound minus the same bound for Σ|terms| (a result
    in which no term cancelled), c · n · u · ‖terms‖ · (1/‖result‖ − 1/‖Σ|terms|‖): zero for a sum of terms
    of one sign, so a well-conditioned output is held to the dtype's tolerance, while a tiny sum of large
    terms (dd at M = r = 1) gets the error any correct kernel can have. It depends on the inputs alone, not
    on how lucky one PyTorch run was. ``low`` holds x, A, B, lambda_d, lambda_b and, when present, weight,
    bias and base_out; ``grad`` is the output's gradient."""
    def get(name):
        t = low.get(name)
        return None if t is None else t.detach().double()

    x, A, B, d, b, W, bias, base_out = (get(k) for k in ("x", "A", "B", "lambda_d", "lambda_b", "weight", "bias",
                                                         "base_out"))
    g = grad.detach().double()
    x, g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    m, in_features, out_features, rank = x.shape[0], x.shape[1], g.shape[1], A.shape[0]
    if base_out is None and W is not None:
        base_out = x @ W.t()  # what verify's vera_delta check adds the adapter to
    # Each output three ways from the same terms: their sum, the sum of their squares, the sum of |terms|.
    ways = [(lambda t: t), (lambda t: t * t), torch.abs]
    out = {}
    for way_index, f in enumerate(ways):
        xx, AA, BB, dd_, bb, gg = (f(t) for t in (x, A, B, d, b, g))
        s, dt = xx @ AA.t(), (gg * bb) @ BB
        adapter = bb * ((dd_ * s) @ BB.t())
        sums = dict(dd=(dt * s).sum(0), db=(gg * ((dd_ * s) @ BB.t())).sum(0), dbias=gg.sum(0),
                    dx=(dd_ * dt) @ AA)
        if base_out is not None:
            sums["delta"] = f(base_out.reshape(-1, out_features)) + adapter
        if W is not None:
            sums["y"] = xx @ f(W).t() + adapter + (0 if bias is None else f(bias))
            sums["dx"] = sums["dx"] + gg @ f(W)
        elif base_out is not None:
            sums["y"] = sums.pop("delta")
        out[way_index] = sums
    results, squares, magnitudes = out[0], out[1], out[2]
    chains = dict(dd=m + in_features + out_features, db=m + in_features + rank, dbias=m, y=in_features + rank,
                  delta=in_features + rank, dx=out_features + rank)
    u, u_acc = UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF[torch.float32]
    bounds = {}
    for name in results:
        n_u = ROUNDINGS[name] * u + chains[name] ** 0.5 * u_acc
        norm, no_cancellation = (float(torch.linalg.vector_norm(t).clamp_min(1e-300))
                                 for t in (results[name], magnitudes[name]))
        excess = max(0.0, 1 / norm - 1 / no_cancellation)
        bounds[name] = SAFETY * n_u * float(squares[name].sum().sqrt()) * excess
    return bounds


def error_limit(baseline: float, dtype: torch.dtype, bound: float | None = None) -> float:
    """The largest error that passes: the dtype's tolerance, or the output's conditioning-aware bound
    (``bound``, from conditioning_bounds), or without one twice PyTorch's own error in that dtype."""
    return max(OP_TOLERANCE[dtype], 2 * baseline if bound is None else bound)


def op_passed(errors: dict, baseline: dict, dtype: torch.dtype, bounds: dict | None = None) -> bool:
    """The pass criterion (docs/DESIGN.md#the-pass-criterion): each output passes when its relative error is under
    the dtype's tolerance or under its conditioning-aware bound (``bounds``, from conditioning_bounds), which
    depends on the inputs alone; an output without a bound is held to twice the error of PyTorch's own
    computation in the same dtype on the same inputs (``baseline``). NaN or inf never passes."""
    bounds = bounds or {}
    return all(err < float("inf") and err <= error_limit(baseline[k], dtype, bounds.get(k))
               for k, err in errors.items())


def op_check(backend: str, device, dtype: torch.dtype, shape, seed: int, baseline: dict | None = None,
             bounds: dict | None = None):
    """(passed, errors, PyTorch's own errors) of one backend on one shape; ``baseline``, the torch backend's
    errors on the same (dtype, shape, seed), and ``bounds``, the outputs' conditioning-aware limits, are
    computed when not given (the inputs and the float64 reference are made once for all three)."""
    low, grad = op_inputs(device, dtype, shape, seed)
    oracle = op_outputs(_exact(low), grad, "torch")
    if baseline is None:
        baseline = output_errors(op_outputs(low, grad, "torch"), oracle)
    if bounds is None:
        bounds = conditioning_bounds(low, grad, dtype)
    errors = baseline if backend == "torch" else output_errors(op_outputs(low, grad, backend), oracle)
    return op_passed(errors, baseline, dtype, bounds), errors, baseline


def _shape_label(shape) -> str:
    return f"M,in,out,r={shape[:4]}" + (f" batch {shape[4]}" if shape[4] else "")


def _synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def op_group(backend_names, device, dtype: torch.dtype, set_name: str, shapes) -> list[Row]:
    """Rows of every backend on one (shape set, dtype). Per shape: fresh random inputs made once on the
    device, the float64 reference computed once, then each backend (the torch backend first: its error
    in ``dtype`` is PyTorch's own, the criterion's baseline). A row's detail names the seed; a backend
    that raises gets a failed row, and the others still run."""
    name = _dtype_name(dtype)
    rows = []
    for shape in shapes:
        seed = int(torch.randint(0, 2**31, ()))
        check = f"ops {name} {set_name} {_shape_label(shape)}"
        try:
            low, grad = op_inputs(device, dtype, shape, seed)
            oracle = op_outputs(_exact(low), grad, "torch")
            bounds = conditioning_bounds(low, grad, dtype)
        except Exception as exc:  # noqa: BLE001 (every backend's row fails, with the reason)
            rows += [Row(b, check, float("inf"), "rel", False, f"seed {seed}: reference {_raised(exc)}")
                     for b in backend_names]
            continue
        baseline = None
        for backend in ["torch"] + [b for b in backend_names if b != "torch"]:
            start = time.perf_counter()
            try:
                errors = output_errors(op_outputs(low, grad, backend), oracle)
                _synchronize(device)
            except Exception as exc:  # noqa: BLE001
                if backend in backend_names:
                    rows.append(Row(backend, check, float("inf"), "rel", False, f"seed {seed}: {_raised(exc)}",
                                    seconds=time.perf_counter() - start))
                continue
            if backend == "torch":
                baseline = errors
            if backend not in backend_names:
                continue
            judged = baseline or {k: 0.0 for k in errors}  # no baseline (torch failed): the bounds alone
            passed = op_passed(errors, judged, dtype, bounds)
            limits = {k: error_limit(judged[k], dtype, bounds.get(k)) for k in errors}
            # The output nearest its limit speaks for the row.
            worst = max(errors, key=lambda k: errors[k] / limits[k])
            detail = f"seed {seed}: " + ", ".join(f"{k} {v:.1e} (torch {judged[k]:.1e})" for k, v in errors.items())
            rows.append(Row(backend, check, errors[worst], "rel", passed, detail, output=worst,
                            limit=limits[worst], seconds=time.perf_counter() - start,
                            errors=errors, torch_errors=baseline))
    return rows


# --------------------------------------------------------------------------------------------------


def runnable_backends(device: str, backend_names: list[str] | None = None) -> list[str]:
    """The backends (of ``backend_names``, or all) that run on ``device``; a line for each that does not."""
    from .dispatch import backends

    runnable = []
    for status in backends().values():
        if backend_names and status.name not in backend_names:
            continue
        if not status.available or torch.device(device).type not in status.devices:
            why = status.reason if not status.available else f"runs on {'/'.join(status.devices)} only"
            print(f"[skip] {status.name}: {why}", flush=True)
            continue
        runnable.append(status.name)
    return runnable


def run(device: str, backend_names: list[str] | None = None, *, level: str = "default", on_group=None,
        dtypes=DTYPE_ORDER) -> list[Row]:
    """Every check of ``level`` of every backend that runs on ``device`` (or of ``backend_names``), group by
    group: the projection scheme per backend, the ops per dtype (of ``dtypes``, in DTYPE_ORDER: bf16 first)
    and shape set, the float64 reference. ``on_group(what, rows, seconds)`` is called after each group
    (default: a progress line)."""
    from . import ops  # noqa: F401  registers the torch backend's ops

    on_group = on_group or _progress
    golden = load_golden()
    rows: list[Row] = []
    runnable = runnable_backends(device, backend_names)

    def group(what, make):
        start = time.perf_counter()
        found = make()
        rows.extend(found)
        on_group(what, found, time.perf_counter() - start)

    with _one_triton_config():
        for backend in runnable:
            group(f"{backend}: projection scheme", lambda: projection_rows(backend, device, golden, level))
        with_ops = [b for b in runnable if _implements(b, "vera_linear")]
        for backend in sorted(set(runnable) - set(with_ops)):
            print(f"[skip] {backend}: does not implement vera_linear yet", flush=True)
        if with_ops:
            for dtype in [d for d in DTYPE_ORDER if d in dtypes]:
                for set_name, shapes in shape_sets(device, level).items():
                    what = f"ops {_dtype_name(dtype)} {set_name}, {len(shapes)} shape{'s' * (len(shapes) > 1)}"
                    group(what, lambda: op_group(with_ops, device, dtype, set_name, shapes))
        if not backend_names or "torch" in backend_names:
            group("torch: reference math", lambda: _guarded_rows("reference math", lambda: reference_rows(device)))
    return rows


def _guarded_rows(check: str, make) -> list[Row]:
    try:
        return make()
    except Exception as exc:  # noqa: BLE001
        return [Row("torch", check, float("inf"), "rel", False, _raised(exc))]


def _one_triton_config():
    """Triton's kernels run one config each while verifying (the first one autotuning would time)."""
    try:
        from .triton import autotune
    except Exception:  # noqa: BLE001  no (working) Triton: nothing to pin
        return contextlib.nullcontext()
    return autotune.untuned()


def _progress(what: str, group: list[Row], seconds: float) -> None:
    failed = [r for r in group if not r.passed]
    verdict = f"{len(group)} pass" if not failed else f"{len(failed)} of {len(group)} FAIL: " + "; ".join(
        f"{r.backend} {r.check}" for r in failed[:3])
    times = {}
    for r in group:
        if r.unit == "rel" and r.seconds:
            times[r.backend] = times.get(r.backend, 0.0) + r.seconds
    timing = " (" + ", ".join(f"{b} {t:.1f} s" for b, t in times.items()) + ")" if times else ""
    print(f"[{seconds:6.1f} s] {what}{timing}: {verdict}", flush=True)


def _implements(backend: str, op: str) -> bool:
    from .dispatch import _implementation

    return _implementation(backend, op) is not None


def format_table(rows: list[Row], header: bool = True) -> str:
    """One line per row: the error (the output nearest its limit, for the ops) and the limit it is held to
    (error_limit: docs/DESIGN.md#the-pass-criterion)."""
    titles = ("backend", "check", "error", "limit", "result")

    def error(r):
        if r.unit == "elements":
            return f"{int(r.error)} differ" if r.error < float("inf") else "-"
        return f"{r.output} {r.error:.2e}" if r.output else f"{r.error:.2e}"

    body = [
        (r.backend, r.check, error(r), "" if r.limit is None else f"{r.limit:.1e}",
         "pass" if r.passed else "FAIL" + (f" ({r.detail})" if r.detail else ""))
        for r in rows
    ]
    lines = [titles] * header + body
    widths = [max(len(line[i]) for line in lines) for i in range(len(titles))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    if header:
        out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def environment(device: str) -> dict:
    """What a run ran on: the device's name, torch, Triton and Python versions."""
    env = {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model and the cores torch uses (``platform.processor()`` is often empty)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"CPU {model}, {threads} thread{'' if threads == 1 else 's'}"


def write_json(path: str, env: dict, level: str, seconds: float, rows: list[Row], complete: bool) -> None:
    """The rows so far, replaced atomically (a reader never sees half a file)."""
    with open(path + ".tmp", "w") as f:
        json.dump({"environment": env, "mode": level, "complete": complete, "seconds": round(seconds, 1),
                   "rows": [asdict(r) for r in rows]}, f, indent=1)
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vera_kernels.verify", description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when a GPU is visible)")
    parser.add_argument("--backend", action="append", help="check only this backend (repeatable)")
    how_much = parser.add_mutually_exclusive_group()
    how_much.add_argument("--full", action="store_true",
                          help="the whole matrix: every shape, every known answer, the full-size pairs")
    how_much.add_argument("--quick", action="store_true",
                          help="the odd shapes and the scheme's known answers only (a smoke test); "
                          "default: a representative subset, under 2 minutes on 2 CPU cores (CI runs it)")
    parser.add_argument("--dtype", action="append", choices=[_dtype_name(d) for d in DTYPE_ORDER],
                        help="check the ops in this dtype only (repeatable; default: all, bfloat16 first)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows and the environment as JSON, "
                        "rewritten after every group")
    parser.add_argument("--static", action="store_true",
                        help="instead: compile every Triton kernel for sm_90a and sm_80 (no GPU needed) and print "
                        "registers, shared memory, spills and tensor-core instructions; exit 1 on a failure or a spill")
    args = parser.parse_args(argv)
    if args.static:
        return static_main(args.json)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to torch")
    if torch.device(device).type == "cpu" and "TRITON_INTERPRET" not in os.environ:
        # Triton runs on CPU tensors only under its interpreter, which Triton fixes for each kernel when it
        # is defined, its own library's included: `import vera_kernels` has already loaded those, so check
        # the Triton backend in a fresh process with the interpreter on.
        env = dict(os.environ, TRITON_INTERPRET="1")
        argv = sys.argv[1:] if argv is None else list(argv)
        return subprocess.call([sys.executable, "-m", "vera_kernels.verify", *argv], env=env)

    start = time.perf_counter()
    env = environment(device)
    level = "full" if args.full else "quick" if args.quick else "default"
    print(f"vera_kernels.verify ({level}) on " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    done: list[Row] = []

    def on_group(what, group, seconds):
        _progress(what, group, seconds)
        print(format_table(group), flush=True)
        done.extend(group)
        if args.json:
            write_json(args.json, env, level, time.perf_counter() - start, done, complete=False)

    dtypes = [d for d in DTYPE_ORDER if not args.dtype or _dtype_name(d) in args.dtype]
    rows = run(device, args.backend, level=level, on_group=on_group, dtypes=dtypes)
    failed = [r for r in rows if not r.passed]
    elapsed = time.perf_counter() - start
    if failed:
        print("\nFailed:\n" + format_table(failed))
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed in {elapsed:.0f} s")
    if args.json:
        write_json(args.json, env, level, elapsed, rows, complete=True)
    return 1 if failed or not rows else 0


def static_main(json_path: str | None = None) -> int:
    """``--static``: the table and the totals; exit status 1 when a kernel fails to compile, spills or breaks
    the pipeline rule (static.passed)."""
    from .triton import static

    result = static.report()
    print(static.format_rows(result["rows"]))
    print(static.summary(result))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if static.passed(result) else 1


if __name__ == "__main__":
    sys.exit(main())
