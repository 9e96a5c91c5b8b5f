"""The Triton backend's ops: torch.library custom ops around the kernel launches, with fake (meta)
implementations so that torch.compile(fullgraph=True) traces through them, and autograd registered on
the forward op. The autograd context keeps only s (M x r) and the parameters: no M x out or M x in
tensor is saved (the backward recomputes t, u from s).

They live in the package's one op namespace, ``vera_kernels``, with the same schemas as the C++
extension's ``forward``/``backward``/``forward_multi`` (python_bindings/bindings.cpp), prefixed
``triton_``: A and B None with (seed, max_in) means the kernels generate the projections (on-the-fly mode).

The ops are public (``torch.ops.vera_kernels.triton_*``), so each checks its arguments before any launch, as
the C++ ops do, with vera_kernels.ops' checks (one home): shapes, dtypes, devices, layouts, and the
adapter ids' range (without a host sync: ``torch._assert_async``). The kernels take any strides.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import dispatch, fakes, ops, projections
from . import linear


def _stand_in(like: Tensor, rows: int, cols: int) -> Tensor:
    """A tensor with the shape, dtype and device of a projection the kernels generate, for the checks."""
    return torch.empty((), dtype=like.dtype, device=like.device).expand(rows, cols)


def _pair(A, B, seed, max_in, like: Tensor, rank: int, in_features: int, out_features: int):
    """(A, B) as given, or, both None, stand-ins for the pair generated from (seed, max_in), checked."""
    if (A is None) != (B is None):
        raise ValueError(f"A, B: expected both (the materialized pair) or neither (generated from seed and max_in), "
                         f"got {'B' if A is None else 'A'} alone")
    if A is not None:
        return A, B
    projections.check_seed(seed)
    projections.check_positive_int("max_in", max_in)
    if max_in < in_features:
        raise ValueError(f"max_in: expected >= in_features = {in_features} (A is A_max[:, :in]), got {max_in}")
    return _stand_in(like, rank, in_features), _stand_in(like, out_features, rank)


def _vector_length(name: str, t) -> int:
    """The length of lambda_d (or lambda_b) where it sizes a generated projection; the full checks follow."""
    if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] < 1:
        got = f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a 1-D tensor of length >= 1 (it sizes the generated A and B), got {got}")
    return t.shape[0]


def _check_form(weight, bias, base_out) -> None:
    if (weight is None) == (base_out is None):
        raise ValueError("weight, base_out: expected exactly one (weight: the linear form, base_out: the delta form)")
    if bias is not None and weight is None:
        raise ValueError("bias: only allowed with weight (the linear form)")


def _check_2d(name: str, t: Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor (rows, features), got shape {tuple(t.shape)}")


def check_forward(x, weight, bias, A, B, lambda_d, lambda_b, base_out, seed, max_in) -> int:
    """triton_forward's checks (x of any rank >= 1: the on-the-fly API checks before flattening); returns
    in_features."""
    dispatch.lookup("vera_linear", "triton", x.device)  # says why not when Triton can't run on x's device
    _check_form(weight, bias, base_out)
    in_features = x.shape[-1] if x.dim() else 0
    if A is None or B is None:
        # out_features as the forward's output has it: weight's rows or base_out's columns.
        out_features = (weight.shape[0] if weight is not None and weight.dim() == 2 else
                        base_out.shape[-1] if base_out is not None and base_out.dim() else
                        _vector_length("lambda_b", lambda_b))
        A, B = _pair(A, B, seed, max_in, x, _vector_length("lambda_d", lambda_d), in_features, out_features)
    ops.check_vera_args_cached(x, weight, bias, A, B, lambda_d, lambda_b, base_out, backend="triton")
    return in_features


@torch.library.custom_op("vera_kernels::triton_forward", mutates_args=())
def forward_op(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], A: Optional[Tensor], B: Optional[Tensor],
    lambda_d: Tensor, lambda_b: Tensor, base_out: Optional[Tensor], seed: int, max_in: int,
) -> tuple[Tensor, Tensor]:
    """(y, s) for x (M, in); A and B None: generated from (seed, max_in)."""
    _check_2d("x", x)
    check_forward(x, weight, bias, A, B, lambda_d, lambda_b, base_out, seed, max_in)
    return linear.forward(x, weight, bias, A, B, lambda_d, lambda_b, base_out, seed, max_in)


forward_op.register_fake(fakes.forward)


def check_backward(grad, s, weight, A, B, lambda_d, lambda_b, in_features, seed, max_in) -> None:
    """triton_backward's checks."""
    dispatch.lookup("vera_linear", "triton", grad.device)
    if A is None or B is None:
        _check_2d("grad", grad)
        _check_2d("s", s)
        projections.check_positive_int("in_features", in_features)
        A, B = _pair(A, B, seed, max_in, grad, s.shape[1], in_features, grad.shape[1])
    ops.check_backward_args(grad, s, weight, A, B, lambda_d, lambda_b, in_features, backend="triton")


@torch.library.custom_op("vera_kernels::triton_backward", mutates_args=())
def backward_op(
    grad: Tensor, s: Tensor, weight: Optional[Tensor], A: Optional[Tensor], B: Optional[Tensor],
    lambda_d: Tensor, lambda_b: Tensor, in_features: int, need_dx: bool, need_dd: bool, need_db: bool,
    need_dbias: bool, seed: int, max_in: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dd, db, dbias); an output not asked for is empty (a custom op returns tensors). The kernel
    computes dd and db in one pass whether asked or not."""
    check_backward(grad, s, weight, A, B, lambda_d, lambda_b, in_features, seed, max_in)
    dx, dd, db, dbias = linear.backward(
        grad, s, weight, A, B, lambda_d, lambda_b, in_features=in_features, with_bias=need_dbias,
        need_dx=need_dx, seed=seed, max_in=max_in,
    )
    # Each empty stand-in is its own tensor: a custom op's outputs may not alias one another.
    return (dx if need_dx else grad.new_empty(0), dd if need_dd else grad.new_empty(0),
            db if need_db else grad.new_empty(0), dbias if need_dbias else grad.new_empty(0))


backward_op.register_fake(fakes.backward)


def _setup_context(ctx, inputs, output):
    x, weight, bias, A, B, lambda_d, lambda_b, base_out, seed, max_in = inputs
    _, s = output
    ctx.save_for_backward(s, weight, A, B, lambda_d, lambda_b)
    ctx.in_features = x.shape[1]
    ctx.seed, ctx.max_in = seed, max_in
    ctx.with_bias, ctx.with_base_out = bias is not None, base_out is not None


def _backward(ctx, grad_y, grad_s):
    # grad_s is always None or zero: s leaves the op only to be saved.
    s, weight, A, B, lambda_d, lambda_b = ctx.saved_tensors
    needs = ctx.needs_input_grad
    need_dbias = ctx.with_bias and needs[2]
    dx, dd, db, dbias = backward_op(
        grad_y, s, weight, A, B, lambda_d, lambda_b, ctx.in_features, needs[0], needs[5], needs[6], need_dbias,
        ctx.seed, ctx.max_in,
    )
    return (
        dx if needs[0] else None, None, dbias if need_dbias else None, None, None,
        dd if needs[5] else None, db if needs[6] else None, grad_y if ctx.with_base_out and needs[7] else None,
        None, None,
    )


forward_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("vera_kernels::triton_forward_multi", mutates_args=())
def forward_multi_op(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], A: Tensor, B: Tensor, lambda_d_bank: Tensor,
    lambda_b_bank: Tensor, adapter_ids: Tensor, base_out: Optional[Tensor],
) -> Tensor:
    """y for x (M, in), row m with adapter adapter_ids[m] of the banks (-1: none). No autograd is registered:
    vera_kernels.ops refuses inputs that require grad (the multi-adapter ops serve, they don't train)."""
    _check_2d("x", x)
    dispatch.lookup("vera_linear_multi", "triton", x.device)
    _check_form(weight, bias, base_out)
    ops.check_multi_args(x, weight, bias, A, B, lambda_d_bank, lambda_b_bank, adapter_ids, base_out, backend="triton")
    return linear.forward_multi(x, weight, bias, A, B, lambda_d_bank, lambda_b_bank, adapter_ids, base_out)


forward_multi_op.register_fake(fakes.forward_multi)


# ---------------------------------------------------------------------------------------------------
# The dispatch entry points (x already 2-D and checked by vera_kernels.ops) and the on-the-fly API.


def vera_linear(x, weight, bias, A, B, lambda_d, lambda_b):
    return forward_op(x, weight, bias, A, B, lambda_d, lambda_b, None, 0, 0)[0]


def vera_delta(x, A, B, lambda_d, lambda_b, base_out):
    return forward_op(x, None, None, A, B, lambda_d, lambda_b, base_out, 0, 0)[0]


vera_forward_multi = forward_multi_op


def vera_linear_on_the_fly(x, weight, bias, lambda_d, lambda_b, *, seed: int, max_in: int) -> Tensor:
    """vera_linear with A = A_max[:, :in] and B = B_max[:out, :] generated inside the kernels from ``seed``
    (fan-ins max_in and the rank, as ``vera_kernels.generate_projections``): no projection is read from
    memory. Same results, bit for bit, as the materialized pair in x's dtype."""
    if weight is None:
        raise TypeError("weight: expected a torch.Tensor of shape (out_features, in_features), got None")
    in_features = check_forward(x, weight, bias, None, None, lambda_d, lambda_b, None, seed, max_in)
    y = forward_op(x.reshape(-1, in_features), weight, bias, None, None, lambda_d, lambda_b, None, seed, max_in)[0]
    return y.reshape(*x.shape[:-1], lambda_b.shape[0])


def vera_delta_on_the_fly(x, lambda_d, lambda_b, base_out, *, seed: int, max_in: int) -> Tensor:
    """vera_delta with the projections generated inside the kernels (see :func:`vera_linear_on_the_fly`)."""
    if base_out is None:
        raise TypeError("base_out: expected a torch.Tensor of shape (..., out_features), got None")
    in_features = check_forward(x, None, None, None, None, lambda_d, lambda_b, base_out, seed, max_in)
    out_features = lambda_b.shape[0]
    y = forward_op(x.reshape(-1, in_features), None, None, None, None, lambda_d, lambda_b,
                   base_out.reshape(-1, out_features), seed, max_in)[0]
    return y.reshape(*x.shape[:-1], out_features)
