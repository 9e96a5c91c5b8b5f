"""The float64 reference (docs/DESIGN.md section 2): analytic backward, gradcheck, PEFT's conventions."""

import pytest
import torch

import vera_kernels
from vera_kernels import verify
from vera_kernels.reference import vera_forward, vera_linear, vera_linear_naive

TRAINABLE = verify.TRAINABLE


@pytest.mark.parametrize("m, in_features, out_features, rank, batch", [
    (1, 40, 130, 1, None), (17, 130, 40, 17, None), (300, 40, 40, 64, None), (17, 40, 130, 17, 3),
])
def test_analytic_backward_equals_autograd_on_naive_formula(m, in_features, out_features, rank, batch):
    problem = verify.random_problem(m, in_features, out_features, rank, batch=batch, seed=m)
    errors = verify.analytic_vs_autograd_errors(problem)
    assert set(errors) == {"y", "dx", "dd", "db", "dbias"}
    assert all(err < 1e-12 for err in errors.values()), errors


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(bias):
    problem = verify.random_problem(4, 6, 5, 3)
    if not bias:
        problem["bias"] = None
    inputs = tuple(v.requires_grad_(k in TRAINABLE) if v is not None else None for k, v in problem.items())
    assert torch.autograd.gradcheck(vera_linear, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_relative_error_rejects_nan_and_inf():
    want = torch.ones(3)
    assert verify.relative_error(torch.tensor([1.0, float("nan"), 1.0]), want) == float("inf")
    assert verify.relative_error(torch.tensor([1.0, float("inf"), 1.0]), want) == float("inf")
    assert verify.relative_error(want.clone(), want) == 0.0


def test_only_s_is_saved():
    problem = verify.random_problem(64, 48, 80, 8)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        vera_linear(**{k: v.requires_grad_(k in TRAINABLE) for k, v in problem.items()})
    activations = [t for t in saved if t.shape[0] == 64]
    assert [tuple(t.shape) for t in activations] == [(64, 8)]


def test_peft_conventions_fresh_adapter_is_identity():
    # One shared pair sized to the largest layer; a layer uses A_max[:, :in], B_max[:out, :];
    # d starts at d_initial = 0.1 and b at 0, so a fresh adapter leaves the base output unchanged.
    A_max, B_max = (p.double() for p in vera_kernels.generate_projections(0, 16, 64, 96))
    x = torch.randn(5, 48, dtype=torch.float64)
    weight = torch.randn(80, 48, dtype=torch.float64)
    bias = torch.randn(80, dtype=torch.float64)
    d = torch.full((16,), 0.1, dtype=torch.float64)
    b = torch.zeros(80, dtype=torch.float64)
    y, s = vera_forward(x, weight, bias, A_max[:, :48], B_max[:80], d, b)
    assert torch.equal(y, x @ weight.t() + bias)
    assert torch.equal(s, x @ A_max[:, :48].t())
    # With b != 0 the adapter term is exactly PEFT's formula on the slices.
    b = torch.randn(80, dtype=torch.float64)
    y = vera_linear(x, weight, bias, A_max[:, :48], B_max[:80], d, b)
    torch.testing.assert_close(y, vera_linear_naive(x, weight, bias, A_max[:, :48], B_max[:80], d, b))


def test_trainable_base_weight_is_refused():
    problem = verify.random_problem(3, 8, 8, 2)
    problem["weight"].requires_grad_(True)
    with pytest.raises(ValueError, match="weight must be frozen"):
        vera_linear(**problem)


def test_verify_reference_rows_pass():
    rows = verify.reference_rows("cpu")
    assert rows and all(r.passed for r in rows), [r for r in rows if not r.passed]
