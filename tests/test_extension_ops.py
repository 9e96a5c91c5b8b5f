"""The extension's VeRA ops (vera_kernels::forward / ::backward / ::forward_multi, registered in C++):
torch.library registration, thread counts, run-to-run bits, layouts, what autograd saves, and the C++
argument checks.

The values themselves are checked against float64 for every dtype and the odd shapes by
tests/test_backend_ops.py (the "cpu" and "cuda" rows).
"""

import pytest
import torch

C = pytest.importorskip("vera_kernels._C")

import vera_kernels  # noqa: E402
from vera_kernels import _extension, verify  # noqa: E402
from vera_kernels.dispatch import poisoned_outputs  # noqa: E402

from conftest import DEVICE  # noqa: E402

BACKEND = "cuda" if DEVICE == "cuda" else "cpu"
if not vera_kernels.backends()[BACKEND].available:
    pytest.skip(f"backend {BACKEND}: {vera_kernels.backends()[BACKEND].reason}", allow_module_level=True)
FORWARD, BACKWARD, FORWARD_MULTI = _extension.ops()


def problem(m=17, in_features=40, out_features=30, rank=8, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    p = verify.random_problem(m, in_features, out_features, rank, seed=seed)
    return {k: (v.float() if k.startswith("lambda") else v.to(dtype)).to(DEVICE) for k, v in p.items()}


def run_layer(p, grad, backend=BACKEND):
    """(y, dx, dd, db, dbias) of vera_linear on ``backend``."""
    leaves = {k: v.detach().clone().requires_grad_(k in verify.TRAINABLE) for k, v in p.items()}
    y = vera_kernels.vera_linear(**leaves, backend=backend)
    y.backward(grad)
    return [y.detach()] + [leaves[k].grad for k in verify.TRAINABLE]


def same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(verify.bits_of(a.cpu()), verify.bits_of(b.cpu()))


# ---------------------------------------------------------------------------------------------------
# torch.library: opcheck on every op, torch.compile(fullgraph=True) through a model.


def _forward_args(p, linear=True, bias=True):
    if linear:
        return (p["x"], p["weight"], p["bias"] if bias else None, p["A"], p["B"], p["lambda_d"], p["lambda_b"], None,
                0, 0)
    base = torch.randn(p["x"].shape[0], p["B"].shape[0], dtype=p["x"].dtype, device=DEVICE)
    return (p["x"], None, None, p["A"], p["B"], p["lambda_d"], p["lambda_b"], base.requires_grad_(True), 0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("form", ["linear", "linear_no_bias", "delta"])
def test_opcheck_forward(form, dtype):
    p = problem(dtype=dtype)
    for k in verify.TRAINABLE:
        p[k].requires_grad_(True)
    args = _forward_args(p, linear=form != "delta", bias=form == "linear")
    torch.library.opcheck(FORWARD, args)


@pytest.mark.parametrize("needs", [(True, True, True, True), (False, True, True, False), (True, False, False, False)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_opcheck_backward(with_weight, needs):
    p = problem()
    grad = torch.randn(17, 30, device=DEVICE)
    s = p["x"] @ p["A"].t()
    weight = p["weight"] if with_weight else None
    torch.library.opcheck(BACKWARD, (grad, s, weight, p["A"], p["B"], p["lambda_d"], p["lambda_b"], 40, *needs, 0, 0))


@pytest.mark.parametrize("delta", [False, True])
def test_opcheck_forward_multi(delta):
    p = problem()
    ids = torch.tensor([0, -1, 1] * 5 + [1, 0], device=DEVICE)
    bank_d, bank_b = torch.randn(2, 8, device=DEVICE), torch.randn(2, 30, device=DEVICE)
    base = torch.randn(17, 30, device=DEVICE) if delta else None
    weight, bias = (None, None) if delta else (p["weight"], p["bias"])
    torch.library.opcheck(FORWARD_MULTI, (p["x"], weight, bias, p["A"], p["B"], bank_d, bank_b, ids, base))


def test_autocast_is_registered_on_the_ops():
    # Under autocast the op casts x, weight, bias, A, B to the autocast dtype and keeps the fp32 lambdas.
    p = problem()
    args = _forward_args(p)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        y, s = FORWARD(*args)
    assert y.dtype == s.dtype == torch.bfloat16
    cast = [a.bfloat16() if isinstance(a, torch.Tensor) and a is not p["lambda_d"] and a is not p["lambda_b"] else a
            for a in args]
    assert same_bits(y, FORWARD(*cast)[0])


def test_poisoned_outputs_reach_the_cpp_allocations():
    # The C++ ops allocate their outputs; the switch fills them with NaN first. A fully written output
    # is finite; the switch is off again after the block.
    C.set_poison_outputs(False)
    with poisoned_outputs():
        assert C.set_poison_outputs(True) is True
        y, s = FORWARD(*_forward_args(problem()))
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert C.set_poison_outputs(False) is False


class _Model(torch.nn.Module):
    """Two adapted layers sharing A and B, a nonlinearity between: a small model for torch.compile."""

    def __init__(self, p):
        super().__init__()
        self.weight = torch.nn.Parameter(p["weight"][:, :30].clone(), requires_grad=False)
        self.bias = torch.nn.Parameter(p["bias"].clone())
        self.A, self.B = p["A"], p["B"]
        self.d1, self.d2 = torch.nn.Parameter(p["lambda_d"].clone()), torch.nn.Parameter(p["lambda_d"].flip(0))
        self.b1, self.b2 = torch.nn.Parameter(p["lambda_b"].clone()), torch.nn.Parameter(p["lambda_b"].flip(0))

    def forward(self, x):
        A = self.A[:, :30]
        h = vera_kernels.vera_linear(x, self.weight, self.bias, A, self.B, self.d1, self.b1, backend=BACKEND)
        base = torch.nn.functional.linear(torch.tanh(h), self.weight)
        return vera_kernels.vera_delta(torch.tanh(h), A, self.B, self.d2, self.b2, base, backend=BACKEND)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    p = problem()
    model = _Model(p)
    x = torch.randn(2, 5, 30, device=DEVICE, requires_grad=True)
    grads = []
    for fn in (model, torch.compile(model, fullgraph=True)):
        for t in (x, *model.parameters()):
            t.grad = None
        fn(x).square().sum().backward()
        grads.append([t.grad for t in (x, model.bias, model.d1, model.d2, model.b1, model.b2)])
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Threads, bits, layouts, memory.


@pytest.fixture
def num_threads():
    """Sets the intra-op thread count for one test and restores it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU thread counts")
@pytest.mark.parametrize("shape", [(300, 130, 200, 64, None), (9, 40, 40, 17, 2)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_against_float64_with_threads(num_threads, threads, dtype, shape):
    num_threads(threads)
    seed = int(torch.randint(0, 2**31, ()))
    passed, errors, baseline = verify.op_check(BACKEND, DEVICE, dtype, shape, seed)
    assert passed, f"seed {seed}, {threads} threads: errors {errors}, PyTorch's own errors in {dtype}: {baseline}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_run_to_run_bit_equality(dtype):
    p = problem(300, 130, 200, 64, dtype=dtype)
    grad = torch.randn(300, 200, device=DEVICE).to(dtype)
    first, second = run_layer(p, grad), run_layer(p, grad)
    for name, a, b in zip(("y", "dx", "dbias", "dd", "db"), first, second):
        assert same_bits(a, b), name


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU thread counts")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reductions_do_not_depend_on_the_thread_count(num_threads, dtype):
    # dbias is our column reduction alone (no GEMM): fixed chunks, so the same bits on 1 and 2 threads.
    p = problem(1000, 40, 700, 8, dtype=dtype)
    grad = torch.randn(1000, 700).to(dtype)
    s = p["x"] @ p["A"].t()
    sums = []
    for threads in (1, 2):
        num_threads(threads)
        sums.append(BACKWARD(grad, s, None, p["A"], p["B"], p["lambda_d"], p["lambda_b"], 40,
                             False, False, False, True, 0, 0)[3])
    assert same_bits(sums[0], sums[1])
    torch.testing.assert_close(sums[0].double(), grad.double().sum(0), rtol=1e-2 if dtype != torch.float32 else 1e-5,
                               atol=1e-3)


def test_strided_inputs_and_gradient():
    # Transposed x, a column slice of A (PEFT's A_max[:, :in]), a transposed B, strided lambdas and a
    # broadcast gradient (what autograd passes for y.sum()): the same values as contiguous ones.
    p = problem(33, 40, 30, 8)
    strided = dict(p)
    strided["x"] = p["x"].t().contiguous().t()
    A_max = torch.randn(8, 57, device=DEVICE)
    A_max[:, :40] = p["A"]
    strided["A"] = A_max[:, :40]
    strided["B"] = p["B"].t().contiguous().t()
    strided["lambda_d"] = torch.stack([p["lambda_d"], -p["lambda_d"]], 1)[:, 0]
    strided["lambda_b"] = torch.stack([p["lambda_b"], -p["lambda_b"]], 1)[:, 0]
    assert not strided["A"].is_contiguous() and not strided["lambda_b"].is_contiguous()
    grad = torch.ones((), device=DEVICE).expand(33, 30)
    for got, want in zip(run_layer(strided, grad), run_layer(p, grad.contiguous())):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # BLAS order differs by layout


def test_autograd_saves_only_s():
    # Besides the parameters, the context keeps s (M x r): no M x out or M x in activation.
    p = problem(64, 40, 30, 8)
    leaves = {k: v.detach().clone().requires_grad_(k in verify.TRAINABLE) for k, v in p.items()}
    params = {leaves[k].data_ptr() for k in ("weight", "bias", "A", "B", "lambda_d", "lambda_b")}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = vera_kernels.vera_linear(**leaves, backend=BACKEND)
    activations = [t for t in saved if t.data_ptr() not in params]
    assert [tuple(t.shape) for t in activations] == [(64, 8)]
    y.backward(torch.randn_like(y))
    assert all(leaves[k].grad is not None for k in verify.TRAINABLE)


def test_frozen_input_and_no_bias():
    # x without grad (the first layer of a model): dx is not computed; no bias: no dbias.
    p = problem()
    p["bias"] = None
    d = p["lambda_d"].clone().requires_grad_(True)
    y = vera_kernels.vera_linear(p["x"], p["weight"], None, p["A"], p["B"], d, p["lambda_b"], backend=BACKEND)
    y.backward(torch.randn_like(y))
    assert d.grad is not None and d.grad.shape == (8,) and p["x"].grad is None


def test_empty_batch():
    p = problem()
    p["x"] = torch.randn(0, 40, device=DEVICE)
    grads = run_layer(p, torch.randn(0, 30, device=DEVICE))
    assert grads[0].shape == (0, 30) and grads[1].shape == (0, 40)
    for g in grads[2:]:
        assert torch.equal(g, torch.zeros_like(g))


# ---------------------------------------------------------------------------------------------------
# The C++ ops' argument checks: a RuntimeError naming the argument, raised before any work.


def _good_forward():
    p = problem()
    return dict(x=p["x"], weight=p["weight"], bias=p["bias"], A=p["A"], B=p["B"], lambda_d=p["lambda_d"],
                lambda_b=p["lambda_b"], base_out=None, seed=0, max_in=0)


def _good_backward():
    p = problem()
    return dict(grad=torch.randn(17, 30, device=DEVICE), s=p["x"] @ p["A"].t(), weight=p["weight"], A=p["A"],
                B=p["B"], lambda_d=p["lambda_d"], lambda_b=p["lambda_b"], in_features=40, need_dx=True, need_dd=True,
                need_db=True, need_dbias=True, seed=0, max_in=0)


def test_good_arguments_are_accepted():
    with poisoned_outputs():
        y, s = FORWARD(**_good_forward())
        grads = BACKWARD(**_good_backward())
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert all(torch.isfinite(g).all() for g in grads)


FORWARD_CASES = {
    "x 3-D": (dict(x=torch.randn(1, 17, 40)), "vera_kernels::forward: x must be a 2-D tensor"),
    "x float64": (dict(x=torch.randn(17, 40, dtype=torch.float64)), "x must be float32, bfloat16 or float16"),
    "x sparse": (dict(x=torch.randn(17, 40).to_sparse()), "SparseCPU"),  # no kernel for sparse tensors
    "A in_features": (dict(A=torch.randn(8, 41)), "A must have shape \\(r, in_features\\)"),
    "A 1-D": (dict(A=torch.randn(40)), "A must be a 2-D tensor"),
    "A None": (dict(A=None), "generating them inside the kernels .* is the triton backend's"),
    "B rank": (dict(B=torch.randn(30, 7)), "B must have shape \\(out_features, 8\\)"),
    "weight shape": (dict(weight=torch.randn(30, 39)), "weight must have shape \\[30, 40\\]"),
    "weight dtype": (dict(weight=torch.randn(30, 40).bfloat16()), "weight must be Float \\(x's dtype\\)"),
    "bias shape": (dict(bias=torch.randn(31)), "bias must have shape \\[30\\]"),
    "lambda_d shape": (dict(lambda_d=torch.randn(9)), "lambda_d must have shape \\[8\\]"),
    "lambda_d dtype": (dict(lambda_d=torch.randn(8, dtype=torch.float64)), "lambda_d must be float32 or Float"),
    "lambda_b shape": (dict(lambda_b=torch.randn(30, 1)), "lambda_b must have shape \\[30\\]"),
    "weight and base_out": (dict(base_out=torch.randn(17, 30)), "exactly one of weight"),
    "neither": (dict(weight=None, bias=None), "exactly one of weight"),
    "bias without weight": (dict(weight=None, base_out=torch.randn(17, 30)), "bias is only allowed with weight"),
    "base_out shape": (dict(weight=None, bias=None, base_out=torch.randn(17, 29)), "base_out must have shape"),
}


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_forward_rejects_bad_arguments(case):
    change, pattern = FORWARD_CASES[case]
    args = {**_good_forward(), **{k: (v.to(DEVICE) if isinstance(v, torch.Tensor) and not v.is_sparse else v)
                                  for k, v in change.items()}}
    with pytest.raises(RuntimeError, match=pattern):
        FORWARD(**args)


BACKWARD_CASES = {
    "grad dtype": (dict(grad=torch.randn(17, 30, dtype=torch.float64)), "grad_out must be float32"),
    "grad layout": (dict(grad=torch.randn(30, 17).t()), "grad_out must be contiguous"),
    "grad 1-D": (dict(grad=torch.randn(30)), "grad must be a 2-D tensor"),
    "s rows": (dict(s=torch.randn(16, 8)), "s must have shape \\(17, r\\)"),
    "s layout": (dict(s=torch.randn(8, 17).t()), "s must be contiguous"),
    "s dtype": (dict(s=torch.randn(17, 8).bfloat16()), "s must be Float \\(grad_out's dtype\\)"),
    "A rank": (dict(A=torch.randn(9, 40)), "A must have shape \\(8, in_features\\)"),
    "B None": (dict(B=None), "is the triton backend's"),
    "B shape": (dict(B=torch.randn(31, 8)), "B must have shape \\[30, 8\\]"),
    "weight shape": (dict(weight=torch.randn(30, 41)), "weight must have shape \\[30, 40\\]"),
    "lambda_b dtype": (dict(lambda_b=torch.randn(30).half()), "lambda_b must be float32 or Float"),
}


@pytest.mark.parametrize("case", BACKWARD_CASES)
def test_backward_rejects_bad_arguments(case):
    change, pattern = BACKWARD_CASES[case]
    args = {**_good_backward(), **{k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in change.items()}}
    with pytest.raises(RuntimeError, match=pattern):
        BACKWARD(**args)


def test_fp16_db_of_a_long_batch_is_finite():
    # db_j = Σ_k B_jk (gᵀ t)_jk: the out x r product gᵀ t sums over M rows and overflows fp16 (max 65504) at
    # M = 8192 with x = 8 and g = 1, although db itself is an fp32 value. Regression: it was formed in fp16
    # (64 of 64 elements NaN); it must be accumulated in fp32 as the other backends do.
    m, in_features, out_features, rank = 8192, 64, 64, 16
    p = problem(m, in_features, out_features, rank, dtype=torch.float16)
    p["x"] = torch.full_like(p["x"], 8.0)
    grad = torch.ones(m, out_features, dtype=torch.float16, device=DEVICE)
    *_, dd, db = run_layer(p, grad)
    exact = {k: v.double() for k, v in p.items()}
    *_, dd_ref, db_ref = run_layer(exact, grad.double(), backend="torch")
    assert torch.isfinite(db).all() and torch.isfinite(dd).all()
    assert verify.relative_error(db, db_ref) < 1e-2 and verify.relative_error(dd, dd_ref) < 1e-2


@pytest.mark.parametrize("form", ["linear", "delta"])
def test_infinite_lambda_b_gives_the_formulas_infinities(form):
    # y_j = ... + b_j Σ_k t_k B_jk: an infinite b_j gives ±inf (NaN only where the sum is 0). Regression: b
    # folded into B summed ±inf terms of both signs into NaN.
    p = problem(m=6, in_features=10, out_features=7, rank=3)
    p["lambda_b"][2], p["lambda_b"][4] = float("inf"), -float("inf")
    base = torch.randn(6, 7, device=DEVICE)
    results = []
    for inputs, backend in ((p, BACKEND), ({k: v.double() for k, v in p.items()}, "torch")):
        if form == "linear":
            y = vera_kernels.vera_linear(**inputs, backend=backend)
        else:
            y = vera_kernels.vera_delta(inputs["x"], inputs["A"], inputs["B"], inputs["lambda_d"],
                                        inputs["lambda_b"], base.to(inputs["x"].dtype), backend=backend)
        results.append(y.double().cpu())
    y, ref = results
    assert torch.isinf(ref[:, [2, 4]]).all() and not torch.isnan(ref).any()
    assert torch.equal(y[:, [2, 4]], ref[:, [2, 4]])
    finite = [0, 1, 3, 5, 6]
    assert verify.relative_error(y[:, finite], ref[:, finite]) < 1e-5


@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_a_nonfinite_lambda_b_written_after_a_cached_fold_is_seen(dtype, value):
    # The fold of B, d and b is cached between calls, and whether b is finite is decided when it is folded
    # (in every lambda dtype the op takes: fp32 or x's). An infinite or NaN b_j written in place afterwards
    # must reach y as the formula's inf / NaN in column j, never a NaN spread by the fold, nor a stale fold.
    p = problem(m=5, in_features=12, out_features=9, rank=4, dtype=dtype)
    p["lambda_b"] = p["lambda_b"].to(dtype)
    exact = {k: v.double() for k, v in p.items()}
    before = vera_kernels.vera_linear(**p, backend=BACKEND)  # folds with a finite b, and caches it
    assert torch.isfinite(before).all()
    with torch.no_grad():
        p["lambda_b"][3] = value
    exact["lambda_b"][3] = value
    y = vera_kernels.vera_linear(**p, backend=BACKEND).double().cpu()
    ref = vera_kernels.vera_linear(**exact, backend="torch").cpu()
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    assert torch.equal(y[:, 3][torch.isinf(ref[:, 3])], ref[:, 3][torch.isinf(ref[:, 3])])
    others = [j for j in range(9) if j != 3]
    assert verify.relative_error(y[:, others], ref[:, others]) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_create_graph_is_refused_with_an_error():
    # The backward has no derivative of its own: under create_graph it refuses with a RuntimeError (no crash and
    # no silently wrong second derivative), whichever kernel path the call takes (the small-problem kernels
    # make no inner call that could notice); without it, the gradients are right.
    p = problem(m=3, in_features=8, out_features=6, rank=2)
    x = p["x"].detach().requires_grad_(True)
    d = p["lambda_d"].detach().requires_grad_(True)

    def loss():
        return vera_kernels.vera_linear(x, p["weight"], p["bias"], p["A"], p["B"], d, p["lambda_b"],
                                        backend=BACKEND).square().sum()

    with pytest.raises(RuntimeError, match="automatic differentiation|not implemented"):
        torch.autograd.grad(loss(), x, create_graph=True)
    dx, dd = torch.autograd.grad(loss(), (x, d))
    exact = {k: v.double() for k, v in p.items()}
    xr, dr = exact["x"].requires_grad_(True), exact["lambda_d"].requires_grad_(True)
    ref = vera_kernels.vera_linear(xr, exact["weight"], exact["bias"], exact["A"], exact["B"], dr, exact["lambda_b"],
                                   backend="torch").square().sum()
    dx_ref, dd_ref = torch.autograd.grad(ref, (xr, dr))
    assert verify.relative_error(dx, dx_ref) < 1e-5 and verify.relative_error(dd, dd_ref) < 1e-5


def _op_samples():
    """(op, args) over what the ops take: each form, dtype and odd shape (M = 0 and 1 among them), which inputs
    require grad, every combination of the backward's outputs, ids with -1 and an empty bank."""
    for (m, in_features, out_features, rank), dtype in zip(((17, 40, 30, 8), (1, 3, 5, 1), (0, 7, 4, 2)),
                                                         (torch.float32, torch.bfloat16, torch.float16)):
        p = problem(m, in_features, out_features, rank, dtype=dtype, seed=m)
        base = torch.randn(m, out_features, device=DEVICE).to(dtype)
        for grads in ((True, True, True), (False, True, False)):
            x = p["x"].clone().requires_grad_(grads[0])
            d, b = p["lambda_d"].clone().requires_grad_(grads[1]), p["lambda_b"].clone().requires_grad_(grads[2])
            yield FORWARD, (x, p["weight"], p["bias"], p["A"], p["B"], d, b, None, 0, 0)
            yield FORWARD, (x, p["weight"], None, p["A"], p["B"], d, b, None, 0, 0)
            yield FORWARD, (x, None, None, p["A"], p["B"], d, b, base.clone().requires_grad_(grads[0]), 0, 0)
        s = p["x"] @ p["A"].t()
        grad = torch.randn(m, out_features, device=DEVICE).to(dtype)
        for needs in ((True, True, True, True), (False, True, True, False), (True, False, False, True)):
            for weight in (p["weight"], None):
                yield BACKWARD, (grad, s, weight, p["A"], p["B"], p["lambda_d"], p["lambda_b"], in_features, *needs, 0, 0)
        ids = (torch.arange(m, device=DEVICE) % 3) - 1
        bank_d, bank_b = torch.randn(2, rank, device=DEVICE), torch.randn(2, out_features, device=DEVICE)
        yield FORWARD_MULTI, (p["x"], p["weight"], p["bias"], p["A"], p["B"], bank_d, bank_b, ids, None)
        yield FORWARD_MULTI, (p["x"], None, None, p["A"], p["B"], bank_d, bank_b, ids, base)
        yield FORWARD_MULTI, (p["x"], p["weight"], None, p["A"], p["B"], bank_d[:0], bank_b[:0],
                              torch.full((m,), -1, device=DEVICE), None)


def test_opcheck_every_op_on_every_sample():
    # Regression: backward allocated dx from A's width and its fake from in_features, so opcheck failed on
    # a call where they differ (that call is now refused by both); here: opcheck over the samples.
    count = 0
    for op, args in _op_samples():
        torch.library.opcheck(op, args)
        count += 1
    assert count == 3 * (6 + 6 + 3)


def test_backward_refuses_an_in_features_that_is_not_as_wide_as_A():
    p = problem()
    grad, s = torch.randn(17, 30, device=DEVICE), p["x"] @ p["A"].t()
    args = (grad, s, p["weight"], p["A"], p["B"], p["lambda_d"], p["lambda_b"], 99, True, True, True, True, 0, 0)
    with pytest.raises(ValueError, match="in_features must be A's width 40, got 99"):
        BACKWARD(*args)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode, pytest.raises(ValueError, match="in_features must be A's width 40, got 99"):
        BACKWARD(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))


@pytest.mark.parametrize("frozen", ["weight", "A", "B"])
def test_forward_refuses_a_projection_or_weight_that_requires_grad(frozen):
    # Regression: W, A or B requiring grad got no gradient and no error from the op called directly.
    p = problem()
    p[frozen] = p[frozen].clone().requires_grad_()
    args = _forward_args(p)
    with pytest.raises(ValueError, match=f"vera_kernels::forward: {frozen} requires grad, but VeRA freezes W0, A and B"):
        FORWARD(*args)
    with torch.no_grad():
        y, _ = FORWARD(*args)  # nothing to differentiate: served
    assert torch.equal(y, FORWARD(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))[0])
