"""The cpu backend's one-pass kernels for small problems (csrc/vera_cpu.cpp, SmallForward / SmallBackward: the
whole forward or backward of a call in plain loops, taken up to kSmallWork multiply-adds in fp32 and bf16)
against the float64 oracle: both forms, with and without bias, every dtype, y and every gradient, under every
combination of which inputs require grad. The profiler's record of each call shows which path ran, so each
case is known to test the path it names; the shapes past the bound, strided layouts, fp16 and non-finite
vectors take the GEMM path and must agree with the oracle as well."""

import itertools

import pytest
import torch

C = pytest.importorskip("vera_kernels._C")

import vera_kernels  # noqa: E402
from vera_kernels import verify  # noqa: E402
from vera_kernels.dispatch import poisoned_outputs  # noqa: E402

if not vera_kernels.backends()["cpu"].available:
    pytest.skip(f"backend cpu: {vera_kernels.backends()['cpu'].reason}", allow_module_level=True)

SMALL_WORK = 1 << 15  # kSmallWork of csrc/vera_math.h
# (M, in, out, r): decode at the benchmark's layer, odd sizes, an empty batch, and the largest M under the bound.
SMALL_SHAPES = ((1, 64, 64, 16), (3, 9, 7, 4), (0, 5, 6, 2), (7, 33, 31, 5))
LARGE_SHAPE = (8, 64, 64, 16)  # 49152 multiply-adds: the GEMM path
GRADS = ("x", "bias", "lambda_d", "lambda_b", "base_out")


def _work(m, in_features, out_features, rank):
    return m * (in_features * out_features + rank * (in_features + out_features))


def _inputs(shape, dtype, seed=0, lambda_dtype=torch.float32):
    m, in_features, out_features, rank = shape
    p = verify.random_problem(m, in_features, out_features, rank, seed=seed)
    p["base_out"] = torch.randn(m, out_features, dtype=torch.float64)
    low = {k: (v.to(lambda_dtype) if k.startswith("lambda") else v.to(dtype)) for k, v in p.items()}
    grad = torch.randn(m, out_features, dtype=torch.float64).to(dtype)
    return low, grad


def _run(inputs, grad, form, needs, backend):
    """(y, and the gradient of each input that requires grad) of one call; outputs poisoned first."""
    leaves = {k: v.detach().clone().requires_grad_(k in needs) for k, v in inputs.items()}
    with poisoned_outputs():
        if form == "delta":
            y = vera_kernels.vera_delta(leaves["x"], leaves["A"], leaves["B"], leaves["lambda_d"], leaves["lambda_b"],
                                        leaves["base_out"], backend=backend)
        else:
            bias = leaves["bias"] if form == "linear" else None
            y = vera_kernels.vera_linear(leaves["x"], leaves["weight"], bias, leaves["A"], leaves["B"],
                                         leaves["lambda_d"], leaves["lambda_b"], backend=backend)
        if y.requires_grad:
            y.backward(grad.to(y.dtype))
    return {"y": y.detach(), **{f"d{k}": leaves[k].grad for k in needs}}


def _cases(form):
    """Every subset of the inputs that can require grad in this form."""
    names = {"linear": ("x", "bias", "lambda_d", "lambda_b"), "linear_no_bias": ("x", "lambda_d", "lambda_b"),
             "delta": ("x", "lambda_d", "lambda_b", "base_out")}[form]
    for count in range(len(names) + 1):
        yield from itertools.combinations(names, count)


def _paths(fn):
    """(the result of fn(), the names of the kernel paths the profiler saw run)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, {e.name for e in prof.events()}


def _check_against_float64(shape, dtype, form, inputs=None, grad=None):
    """Every requires_grad combination of one (shape, dtype, form) against float64; returns the paths seen."""
    if inputs is None:
        inputs, grad = _inputs(shape, dtype)
    exact = {k: v.double() for k, v in inputs.items()}
    seen = set()
    for needs in _cases(form):
        (got, paths) = _paths(lambda: _run(inputs, grad, form, needs, "cpu"))
        seen |= paths
        want = _run(exact, grad.double(), form, needs, "torch")
        own = _run(inputs, grad, form, needs, "torch")  # PyTorch's own error in this dtype: the criterion's baseline
        assert set(got) == set(want) == {"y", *(f"d{k}" for k in needs)}
        for name in want:
            assert got[name].dtype == own[name].dtype and got[name].shape == want[name].shape, name
            if want[name].numel() == 0:
                continue
            error = verify.relative_error(got[name], want[name])
            limit = verify.error_limit(verify.relative_error(own[name], want[name]), dtype)
            assert error <= limit, f"{shape} {dtype} {form} needs={needs}: {name} error {error:.2e} > {limit:.2e}"
    return seen


@pytest.mark.parametrize("form", ["linear", "linear_no_bias", "delta"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_small_problems_against_float64(shape, dtype, form):
    assert _work(*shape) <= SMALL_WORK
    seen = _check_against_float64(shape, dtype, form)
    assert {"vera::small_forward", "vera::small_backward"} <= seen, seen
    assert "aten::mm" not in seen and "aten::addmm" not in seen, seen


@pytest.mark.parametrize("form", ["linear", "linear_no_bias", "delta"])
def test_bf16_lambdas(form):
    # The vectors in the layer's dtype (the ops take float32 or x's dtype) on a bf16 problem.
    inputs, grad = _inputs((3, 9, 7, 4), torch.bfloat16, lambda_dtype=torch.bfloat16)
    seen = _check_against_float64(None, torch.bfloat16, form, inputs, grad)
    assert {"vera::small_forward", "vera::small_backward"} <= seen, seen


@pytest.mark.parametrize("form", ["linear", "delta"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_past_the_bound_and_fp16_take_the_gemm_path(dtype, form):
    shapes = [LARGE_SHAPE] + ([SMALL_SHAPES[0]] if dtype == torch.float16 else [])
    for shape in shapes:
        assert dtype == torch.float16 or _work(*shape) > SMALL_WORK
        seen = _check_against_float64(shape, dtype, form)
        assert not {"vera::small_forward", "vera::small_backward"} & seen, seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layouts(dtype):
    # Row strides are read as given (PEFT's slice A_max[:, :in], a row slice of x): the small path. A column
    # stride other than 1 (a transposed x, GPT-2's Conv1D weight as W0ᵀ's view): the GEMM path. Both agree
    # with float64.
    inputs, grad = _inputs((3, 9, 7, 4), dtype)
    wide = torch.randn(3, 20).to(dtype)
    wide[:, 5:14] = inputs["x"]
    A_max = torch.randn(4, 16).to(dtype)
    A_max[:, :9] = inputs["A"]
    row_strided = dict(inputs, x=wide[:, 5:14], A=A_max[:, :9])
    assert row_strided["x"].stride() == (20, 1) and row_strided["A"].stride() == (16, 1)
    assert {"vera::small_forward", "vera::small_backward"} <= _check_against_float64(None, dtype, "linear",
                                                                                    row_strided, grad)
    transposed = dict(inputs, x=inputs["x"].t().contiguous().t(), weight=inputs["weight"].t().contiguous().t())
    seen = _check_against_float64(None, dtype, "linear", transposed, grad)
    assert not {"vera::small_forward", "vera::small_backward"} & seen, seen


def test_non_finite_vectors_and_gradients_take_the_formulas_gemm_path():
    # An infinite lambda or incoming gradient: the GEMM path in the formula's order (tests/test_nonfinite.py
    # judges the values); the small kernels see finite vectors, g and s only.
    inputs, grad = _inputs((3, 9, 7, 4), torch.float32)
    inputs["lambda_b"][2] = float("inf")
    _, seen = _paths(lambda: _run(inputs, grad, "linear", ("x", "lambda_d"), "cpu"))
    assert "vera::small_forward" not in seen and "vera::small_backward" not in seen
    inputs, _ = _inputs((3, 9, 7, 4), torch.float32)
    grad[1, 3] = float("inf")
    _, seen = _paths(lambda: _run(inputs, grad, "linear", ("x", "lambda_d"), "cpu"))
    assert "vera::small_forward" in seen and "vera::small_backward" not in seen


def test_small_problems_are_bit_reproducible():
    inputs, grad = _inputs((7, 33, 31, 5), torch.bfloat16)
    first, second = (_run(inputs, grad, "linear", GRADS[:4], "cpu") for _ in range(2))
    for name in first:
        assert torch.equal(verify.bits_of(first[name]), verify.bits_of(second[name])), name
