"""The public ops' argument checks and the torch backend (the fallback) in every dtype."""

import pytest
import torch

from vera_kernels import verify
from vera_kernels.ops import vera_delta, vera_linear
from vera_kernels.reference import vera_forward


def problem(dtype=torch.float64, lambda_dtype=None, m=17, batch=None):
    p = verify.random_problem(m, 40, 30, 8, batch=batch)
    p = {k: v.to(dtype) for k, v in p.items()}
    if lambda_dtype is not None:
        p["lambda_d"], p["lambda_b"] = p["lambda_d"].to(lambda_dtype), p["lambda_b"].to(lambda_dtype)
    return p


@pytest.mark.parametrize("batch", [None, 3])
def test_torch_backend_float64_equals_reference(batch):
    p = problem(batch=batch)
    y = vera_linear(**p, backend="torch")
    assert torch.equal(y, vera_forward(**p)[0])
    base = torch.randn_like(y)
    delta = vera_delta(p["x"], p["A"], p["B"], p["lambda_d"], p["lambda_b"], base, backend="torch")
    p_no_base = dict(p, weight=torch.zeros_like(p["weight"]), bias=None)
    torch.testing.assert_close(delta - base, vera_forward(**p_no_base)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_torch_backend_low_precision_with_fp32_lambdas(dtype):
    p64 = problem()
    p = {k: v.to(dtype) for k, v in p64.items()}
    p["lambda_d"], p["lambda_b"] = p64["lambda_d"].float(), p64["lambda_b"].float()
    for k in verify.TRAINABLE:
        p[k].requires_grad_(True)
        p64[k].requires_grad_(True)
    y = vera_linear(**p, backend="torch")
    y64 = vera_linear(**p64, backend="torch")
    g = torch.randn_like(y64)
    y.backward(g.to(dtype))
    y64.backward(g)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert y.dtype == dtype and p["lambda_d"].grad.dtype == torch.float32
    assert verify.relative_error(y, y64) < tol
    for k in verify.TRAINABLE:
        assert verify.relative_error(p[k].grad, p64[k].grad) < tol, k


@pytest.mark.parametrize(
    "change, error, words",
    [
        (dict(x=torch.randn(5, 41)), ValueError, "A: expected shape"),
        (dict(A=torch.randn(8, 39)), ValueError, "A: expected shape"),
        (dict(B=torch.randn(30, 7)), ValueError, "B: expected shape"),
        (dict(weight=torch.randn(31, 40)), ValueError, "weight: expected shape"),
        (dict(bias=torch.randn(29)), ValueError, "bias: expected shape"),
        (dict(lambda_d=torch.randn(9)), ValueError, "lambda_d: expected shape"),
        (dict(lambda_b=torch.randn(31)), ValueError, "lambda_b: expected shape"),
        (dict(weight=torch.randn(30, 40, dtype=torch.float64)), TypeError, "weight: expected dtype"),
        (dict(lambda_d=torch.randn(8, dtype=torch.float16)), TypeError, "lambda_d: expected dtype"),
        (dict(x=torch.randn(5, 40).to(torch.int32)), TypeError, "x: expected dtype"),
        (dict(weight=torch.randn(30, 40, requires_grad=True)), ValueError, "weight: must be frozen"),
        (dict(x="not a tensor"), TypeError, "x: expected a torch.Tensor"),
        (dict(weight=None), TypeError, "weight: expected a torch.Tensor"),
    ],
)
def test_bad_arguments_name_the_argument(change, error, words):
    p = {k: v.float() for k, v in problem(torch.float32, m=5).items()} | change
    with pytest.raises(error, match=words):
        vera_linear(**p)


def test_float64_only_on_torch_backend():
    # The checks run before the backend is looked up, so this holds whichever backends are built.
    with pytest.raises(TypeError, match="x: expected dtype"):
        vera_linear(**problem(), backend="auto")


def test_zero_out_features_is_refused_by_name():
    # Regression: out_features = 0 passed the checks and failed in the backward (reshape of 0 elements).
    p = problem()
    p["weight"], p["bias"], p["B"], p["lambda_b"] = p["weight"][:0], p["bias"][:0], p["B"][:0], p["lambda_b"][:0]
    with pytest.raises(ValueError, match="B: expected shape .* with out_features >= 1, got shape \\(0, 8\\)"):
        vera_linear(**p, backend="torch")
    with pytest.raises(ValueError, match="out_features >= 1"):
        vera_delta(p["x"], p["A"], p["B"], p["lambda_d"], p["lambda_b"], p["x"][:, :0], backend="torch")
