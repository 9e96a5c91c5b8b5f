"""Plain-PyTorch VeRA math: the forward and the analytic backward of DESIGN.md section 2.

Runs in the dtype of its inputs: in float64 it is the oracle every kernel is checked against; in other
dtypes it is the fallback. With s = x Aᵀ, t = d ⊙ s, u = t Bᵀ and g = dL/dy:

    y     = x W0ᵀ + bias + b ⊙ u
    db    = Σ_m g ⊙ u           (u recomputed from s: no M x out tensor is saved)
    dt    = (g ⊙ b) B
    dd    = Σ_m dt ⊙ s
    dx    = g W0 + (d ⊙ dt) A
    dbias = Σ_m g

Shapes: x (..., in), weight W0 (out, in), bias (out) or None, A (r, in), B (out, r), d (r), b (out).
A and B are the slices ``A_max[:, :in]`` and ``B_max[:out, :]`` of the shared pair (PEFT's convention).
"""

from __future__ import annotations

import torch


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # What the kernels accumulate and scale in: fp32 for every kernel dtype, float64 for the oracle.
    return torch.float64 if dtype == torch.float64 else torch.float32


def vera_forward(x, weight, bias, A, B, lambda_d, lambda_b):
    """Returns (y, s) with s = x Aᵀ, the only activation the backward needs.

    The GEMM operands are in x's dtype; the scalings by d and b and the sum are in the accumulation
    dtype, as the kernels do them, so fp32 lambdas on a bf16 layer keep their precision."""
    acc = _accumulation_dtype(x.dtype)
    s = x @ A.t()
    t = (lambda_d.to(acc) * s.to(acc)).to(x.dtype)
    y = (x @ weight.t()).to(acc) + lambda_b.to(acc) * (t @ B.t()).to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), s


def vera_backward(grad_out, s, weight, A, B, lambda_d, lambda_b):
    """Returns (dx, dd, db, dbias) from the output gradient and the saved s alone; the reductions over M
    are in the accumulation dtype, then cast to the dtype of the parameter they belong to."""
    g = grad_out.reshape(-1, grad_out.shape[-1])
    s2 = s.reshape(-1, s.shape[-1])
    acc = _accumulation_dtype(g.dtype)
    u = (lambda_d.to(acc) * s2.to(acc)).to(g.dtype) @ B.t()
    db = (g.to(acc) * u.to(acc)).sum(0).to(lambda_b.dtype)
    dt = (g.to(acc) * lambda_b.to(acc)).to(g.dtype) @ B
    dd = (dt.to(acc) * s2.to(acc)).sum(0).to(lambda_d.dtype)
    dx = g @ weight + (lambda_d.to(acc) * dt.to(acc)).to(g.dtype) @ A
    dbias = g.to(acc).sum(0)
    return dx.reshape(*grad_out.shape[:-1], weight.shape[1]), dd, db, dbias


class VeRAFunction(torch.autograd.Function):
    """Autograd with the analytic backward; saves only s (M x r). W0, A and B are frozen: no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, lambda_d, lambda_b):
        for name, frozen in (("weight", weight), ("A", A), ("B", B)):
            if frozen.requires_grad:
                raise ValueError(f"{name} must be frozen (requires_grad=False): VeRA trains only lambda_d, lambda_b and bias")
        y, s = vera_forward(x, weight, bias, A, B, lambda_d, lambda_b)
        ctx.save_for_backward(s, weight, A, B, lambda_d, lambda_b)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        s, weight, A, B, lambda_d, lambda_b = ctx.saved_tensors
        dx, dd, db, dbias = vera_backward(grad_out, s, weight, A, B, lambda_d, lambda_b)
        return (
            dx if ctx.needs_input_grad[0] else None,
            None,
            dbias.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None,
            None,
            None,
            dd if ctx.needs_input_grad[5] else None,
            db if ctx.needs_input_grad[6] else None,
        )


def vera_linear(x, weight, bias, A, B, lambda_d, lambda_b):
    """y = x W0ᵀ + bias + b ⊙ ((d ⊙ (x Aᵀ)) Bᵀ) with the analytic backward."""
    return VeRAFunction.apply(x, weight, bias, A, B, lambda_d, lambda_b)


def vera_linear_naive(x, weight, bias, A, B, lambda_d, lambda_b):
    """The formula as PEFT writes it, differentiated by autograd: the check on the analytic backward."""
    y = torch.nn.functional.linear(x, weight, bias)
    return y + lambda_b * torch.nn.functional.linear(lambda_d * torch.nn.functional.linear(x, A), B)
