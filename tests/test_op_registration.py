"""One op namespace, vera_kernels, with one schema per op for every backend: the C++ extension's forward,
backward and forward_multi and the Triton backend's triton_* ops take the same arguments; opcheck on the
Triton ops (the C++ ones: tests/test_extension_ops.py)."""

import pytest
import torch

import vera_kernels
from vera_kernels import verify

from conftest import DEVICE

OPS = ("forward", "backward", "forward_multi")


def _schema(op):
    return [(a.name, str(a.type)) for a in op._schema.arguments], [str(r.type) for r in op._schema.returns]


def test_the_cpp_and_triton_ops_share_their_schemas():
    if not (vera_kernels.backends()["cpu"].available or vera_kernels.backends()["cuda"].available):
        pytest.skip("the C++ extension is not built")
    if not vera_kernels.backends()["triton"].available:
        pytest.skip(vera_kernels.backends()["triton"].reason)
    from vera_kernels import _extension
    from vera_kernels.triton import function

    cpp = dict(zip(OPS, _extension.ops()))
    triton = dict(zip(OPS, (function.forward_op._opoverload, function.backward_op._opoverload,
                            function.forward_multi_op._opoverload)))
    for op in OPS:
        assert cpp[op].namespace == triton[op].namespace == "vera_kernels"
        assert _schema(cpp[op]) == _schema(triton[op]), op


@pytest.fixture
def triton_ops():
    if not vera_kernels.backends()["triton"].available or DEVICE not in vera_kernels.backends()["triton"].devices:
        pytest.skip(vera_kernels.backends()["triton"].reason)
    from vera_kernels.triton import function

    return function


def _problem():
    p = verify.random_problem(5, 8, 6, 4, seed=1)
    return {k: v.float().to(DEVICE) for k, v in p.items()}


@pytest.mark.parametrize("form", ["linear", "delta"])
def test_opcheck_triton_forward(triton_ops, form):
    p = _problem()
    d, b = p["lambda_d"].requires_grad_(), p["lambda_b"].requires_grad_()
    if form == "linear":
        args = (p["x"], p["weight"], p["bias"], p["A"], p["B"], d, b, None, 0, 0)
    else:
        args = (p["x"], None, None, p["A"], p["B"], d, b, torch.randn(5, 6, device=DEVICE), 0, 0)
    torch.library.opcheck(triton_ops.forward_op, args)


def test_opcheck_triton_backward_and_multi(triton_ops):
    p = _problem()
    s = p["x"] @ p["A"].t()
    grad = torch.randn(5, 6, device=DEVICE)
    for needs in ((True, True, True, True), (False, True, False, False)):
        torch.library.opcheck(triton_ops.backward_op,
                              (grad, s, p["weight"], p["A"], p["B"], p["lambda_d"], p["lambda_b"], 8, *needs, 0, 0))
    ids = torch.tensor([0, -1, 1, 1, 0], device=DEVICE)
    torch.library.opcheck(triton_ops.forward_multi_op, (p["x"], p["weight"], p["bias"], p["A"], p["B"],
                                                        torch.randn(2, 4, device=DEVICE), torch.randn(2, 6, device=DEVICE),
                                                        ids, None))
