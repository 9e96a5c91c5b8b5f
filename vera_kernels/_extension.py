"""Loads the compiled extension ``vera_kernels._C`` and registers its ops as the ``cpu`` and ``cuda`` backends.

The package works without it (the ``torch`` backend); :func:`load` says why it is missing.

The VeRA forward and backward are torch.library custom ops in the ``vera_kernels`` namespace around the
extension's calls, with fake kernels (so torch.compile(fullgraph=True) traces through them) and autograd
registered on the forward. The op implementations allocate the buffers the C++ code writes with
:func:`dispatch.new_output`, so poisoned-output tests see any element it leaves unwritten. The autograd
context keeps s (M x r) and the parameters only; the backward is the C++ one (csrc/vera_ops.cpp).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from . import dispatch


@functools.cache
def load():
    """(module, None) when the extension imports, else (None, a one-line reason)."""
    try:
        from . import _C
    except ImportError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, f"extension vera_kernels._C is not built or failed to load ({reason}); see README, Install"
    return _C, None


def _module():
    """The extension module; a RuntimeError with the reason where it did not load."""
    ext, error = load()
    if ext is None:
        raise RuntimeError(error)
    return ext


def _fill_projection_(out, seed, tag, fan_in, row_offset, col_offset):
    _module().fill_projection_(out, seed, tag, fan_in, row_offset, col_offset)


def _philox4x32_10(counters, keys):
    return _module().philox4x32_10(counters.contiguous(), keys.contiguous())


@torch.library.custom_op("vera_kernels::forward", mutates_args=())
def forward_op(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], A: Tensor, B: Tensor, lambda_d: Tensor,
    lambda_b: Tensor, base_out: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """(y, s) for x (M, in): y = x W0ᵀ + bias + b ⊙ ((d ⊙ s) Bᵀ), or base_out + b ⊙ ((d ⊙ s) Bᵀ) when
    weight is None; s = x Aᵀ."""
    y = dispatch.new_output(x.shape[0], B.shape[0], dtype=x.dtype, device=x.device)
    s = dispatch.new_output(x.shape[0], A.shape[0], dtype=x.dtype, device=x.device)
    _module().vera_forward_(y, s, x, weight, bias, A, B, lambda_d, lambda_b, base_out)
    return y, s


@forward_op.register_fake
def _(x, weight, bias, A, B, lambda_d, lambda_b, base_out):
    return x.new_empty(x.shape[0], B.shape[0]), x.new_empty(x.shape[0], A.shape[0])


@torch.library.custom_op("vera_kernels::backward", mutates_args=())
def backward_op(
    grad: Tensor, s: Tensor, weight: Optional[Tensor], A: Tensor, B: Tensor, lambda_d: Tensor, lambda_b: Tensor,
    need_dx: bool, need_dd: bool, need_db: bool, need_dbias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dd, db, dbias) from grad (M, out, contiguous) and s; each is empty when not asked for (a custom
    op returns tensors). weight None: vera_delta's dx = (d ⊙ dt) A."""
    wanted = _backward_outputs(grad, s, A, lambda_d, lambda_b, need_dx, need_dd, need_db, need_dbias)
    outputs = [dispatch.new_output(*shape, dtype=dtype, device=grad.device) if needed else None
               for needed, shape, dtype in wanted]
    _module().vera_backward_(*outputs, grad, s, weight, A, B, lambda_d, lambda_b)
    return tuple(grad.new_empty(0) if out is None else out for out in outputs)


def _backward_outputs(grad, s, A, lambda_d, lambda_b, need_dx, need_dd, need_db, need_dbias):
    """(needed, shape, dtype) of dx, dd, db, dbias."""
    m, n = grad.shape
    return (
        (need_dx, (m, A.shape[1]), grad.dtype),
        (need_dd, (s.shape[1],), lambda_d.dtype),
        (need_db, (n,), lambda_b.dtype),
        (need_dbias, (n,), grad.dtype),
    )


@backward_op.register_fake
def _(grad, s, weight, A, B, lambda_d, lambda_b, need_dx, need_dd, need_db, need_dbias):
    outputs = _backward_outputs(grad, s, A, lambda_d, lambda_b, need_dx, need_dd, need_db, need_dbias)
    return tuple(grad.new_empty(shape if needed else (0,), dtype=dtype) for needed, shape, dtype in outputs)


def _setup_context(ctx, inputs, output):
    x, weight, bias, A, B, lambda_d, lambda_b, base_out = inputs
    _, s = output
    ctx.save_for_backward(s, weight, A, B, lambda_d, lambda_b)
    ctx.with_bias, ctx.with_base_out = bias is not None, base_out is not None
    # s leaves the op only to be saved: no gradient flows into it, and none is materialized for it.
    ctx.mark_non_differentiable(s)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, grad_s):
    s, weight, A, B, lambda_d, lambda_b = ctx.saved_tensors
    needs = ctx.needs_input_grad
    need_dbias = ctx.with_bias and needs[2]
    # The kernels read grad_y row by row; autograd may hand over a broadcast or transposed view.
    dx, dd, db, dbias = backward_op(
        grad_y.contiguous(), s, weight, A, B, lambda_d, lambda_b, needs[0], needs[5], needs[6], need_dbias
    )
    return (
        dx if needs[0] else None, None, dbias if need_dbias else None, None, None,
        dd if needs[5] else None, db if needs[6] else None, grad_y if ctx.with_base_out and needs[7] else None,
    )


forward_op.register_autograd(_backward, setup_context=_setup_context)


def _vera_linear(x, weight, bias, A, B, lambda_d, lambda_b):
    return forward_op(x, weight, bias, A, B, lambda_d, lambda_b, None)[0]


def _vera_delta(x, A, B, lambda_d, lambda_b, base_out):
    return forward_op(x, None, None, A, B, lambda_d, lambda_b, base_out)[0]


@torch.library.custom_op("vera_kernels::forward_multi", mutates_args=())
def forward_multi_op(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], A: Tensor, B: Tensor, lambda_d_bank: Tensor,
    lambda_b_bank: Tensor, adapter_ids: Tensor, base_out: Optional[Tensor],
) -> Tensor:
    """y for x (M, in), row m with adapter adapter_ids[m] of the banks (-1: none). No autograd is registered:
    vera_kernels.ops refuses inputs that require grad (the multi-adapter ops serve, they don't train)."""
    y = dispatch.new_output(x.shape[0], B.shape[0], dtype=x.dtype, device=x.device)
    _module().vera_forward_multi_(y, x, weight, bias, A, B, lambda_d_bank, lambda_b_bank, adapter_ids, base_out)
    return y


@forward_multi_op.register_fake
def _(x, weight, bias, A, B, lambda_d_bank, lambda_b_bank, adapter_ids, base_out):
    return x.new_empty(x.shape[0], B.shape[0])


for _backend in ("cpu", "cuda"):
    dispatch.register(_backend, "vera_linear_multi", forward_multi_op)
    dispatch.register(_backend, "vera_delta_multi", forward_multi_op)
    dispatch.register(_backend, "fill_projection_", _fill_projection_)
    dispatch.register(_backend, "philox4x32_10", _philox4x32_10)
    dispatch.register(_backend, "vera_linear", _vera_linear)
    dispatch.register(_backend, "vera_delta", _vera_delta)
