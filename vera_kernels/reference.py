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


def vera_forward(x, weight, bias, A, B, lambda_d, lambda_b):
    """Returns (y, s) with s = x Aᵀ, the only activation the backward needs."""
    s = x @ A.t()
    y = x @ weight.t() + lambda_b * ((lambda_d * s) @ B.t())
    if bias is not None:
        y = y + bias
    return y, s


def vera_backward(grad_out, s, weight, A, B, lambda_d, lambda_b):
    """Returns (dx, dd, db, dbias) from the output gradient and the saved s alone."""
    g = grad_out.reshape(-1, grad_out.shape[-1])
    s2 = s.reshape(-1, s.shape[-1])
    u = (lambda_d * s2) @ B.t()
    db = (g * u).sum(0)
    dt = (g * lambda_b) @ B
    dd = (dt * s2).sum(0)
    dx = g @ weight + (lambda_d * dt) @ A
    dbias = g.sum(0)
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
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_out):
        s, weight, A, B, lambda_d, lambda_b = ctx.saved_tensors
        dx, dd, db, dbias = vera_backward(grad_out, s, weight, A, B, lambda_d, lambda_b)
        return (
            dx if ctx.needs_input_grad[0] else None,
            None,
            dbias if ctx.has_bias and ctx.needs_input_grad[2] else None,
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
