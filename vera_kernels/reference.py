"""Plain-PyTorch VeRA math: the forward and the analytic backward of docs/DESIGN.md section 2.

Runs in the dtype of its inputs: in float64 it is the oracle every kernel is checked against; in other
dtypes it is the fallback. With s = x Aᵀ, t = d ⊙ s, u = t Bᵀ and g = dL/dy:

    y     = x W0ᵀ + bias + b ⊙ u     (vera_linear)   or   base_out + b ⊙ u   (vera_delta)
    db    = Σ_m g ⊙ u           (u recomputed from s: no M x out tensor is saved)
    dt    = (g ⊙ b) B
    dd    = Σ_m dt ⊙ s
    dx    = g W0 + (d ⊙ dt) A      (vera_delta: (d ⊙ dt) A; d base_out = g)
    dbias = Σ_m g

Shapes: x (..., in), weight W0 (out, in), bias (out) or None, A (r, in), B (out, r), d (r), b (out).
A and B are the slices ``A_max[:, :in]`` and ``B_max[:out, :]`` of the shared pair (PEFT's convention).
"""

from __future__ import annotations

import torch


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # What the kernels accumulate and scale in: fp32 for every kernel dtype, float64 for the oracle.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _adapter_term(x, A, B, lambda_d, lambda_b):
    """(b ⊙ ((d ⊙ s) Bᵀ) in the accumulation dtype, s = x Aᵀ).

    The GEMM operands are in x's dtype; the scalings by d and b and the sums are in the accumulation
    dtype, as the kernels do them, so fp32 lambdas on a bf16 layer keep their precision."""
    acc = _accumulation_dtype(x.dtype)
    s = x @ A.t()
    t = (lambda_d.to(acc) * s.to(acc)).to(x.dtype)
    return lambda_b.to(acc) * (t @ B.t()).to(acc), s


def vera_forward(x, weight, bias, A, B, lambda_d, lambda_b):
    """Returns (y, s) with s = x Aᵀ, the only activation the backward needs."""
    term, s = _adapter_term(x, A, B, lambda_d, lambda_b)
    y = (x @ weight.t()).to(term.dtype) + term
    if bias is not None:
        y = y + bias.to(term.dtype)
    return y.to(x.dtype), s


def vera_delta_forward(x, A, B, lambda_d, lambda_b, base_out):
    """Returns (base_out + b ⊙ ((d ⊙ s) Bᵀ), s)."""
    term, s = _adapter_term(x, A, B, lambda_d, lambda_b)
    return (base_out.to(term.dtype) + term).to(base_out.dtype), s


def vera_backward(grad_out, s, weight, A, B, lambda_d, lambda_b):
    """Returns (dx, dd, db, dbias) from the output gradient and the saved s alone (weight None: the
    adapter's part of dx only). Reductions over M are in the accumulation dtype, then cast to the dtype
    of the parameter they belong to."""
    g = grad_out.reshape(-1, grad_out.shape[-1])
    s2 = s.reshape(-1, s.shape[-1])
    acc = _accumulation_dtype(g.dtype)
    u = (lambda_d.to(acc) * s2.to(acc)).to(g.dtype) @ B.t()
    db = (g.to(acc) * u.to(acc)).sum(0).to(lambda_b.dtype)
    dt = (g.to(acc) * lambda_b.to(acc)).to(g.dtype) @ B
    dd = (dt.to(acc) * s2.to(acc)).sum(0).to(lambda_d.dtype)
    dx = (lambda_d.to(acc) * dt.to(acc)).to(g.dtype) @ A
    if weight is not None:
        dx = g @ weight + dx
    dbias = g.to(acc).sum(0)
    return dx.reshape(*grad_out.shape[:-1], A.shape[1]), dd, db, dbias


def _check_frozen(**tensors):
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise ValueError(f"{name} must be frozen (requires_grad=False): VeRA trains only lambda_d, lambda_b and bias")


class VeRAFunction(torch.autograd.Function):
    """vera_linear with the analytic backward; saves only s (M x r). W0, A and B are frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, lambda_d, lambda_b):
        _check_frozen(weight=weight, A=A, B=B)
        y, s = vera_forward(x, weight, bias, A, B, lambda_d, lambda_b)
        ctx.save_for_backward(s, weight, A, B, lambda_d, lambda_b)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        s, weight, A, B, lambda_d, lambda_b = ctx.saved_tensors
        dx, dd, db, dbias = vera_backward(grad_out, s, weight, A, B, lambda_d, lambda_b)
        needs = ctx.needs_input_grad
        return (
            dx if needs[0] else None,
            None,
            dbias.to(ctx.bias_dtype) if ctx.bias_dtype is not None and needs[2] else None,
            None,
            None,
            dd if needs[5] else None,
            db if needs[6] else None,
        )


class VeRADeltaFunction(torch.autograd.Function):
    """vera_delta with the analytic backward; saves only s (M x r)."""

    @staticmethod
    def forward(ctx, x, A, B, lambda_d, lambda_b, base_out):
        _check_frozen(A=A, B=B)
        y, s = vera_delta_forward(x, A, B, lambda_d, lambda_b, base_out)
        ctx.save_for_backward(s, A, B, lambda_d, lambda_b)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        s, A, B, lambda_d, lambda_b = ctx.saved_tensors
        dx, dd, db, _ = vera_backward(grad_out, s, None, A, B, lambda_d, lambda_b)
        needs = ctx.needs_input_grad
        return (
            dx if needs[0] else None,
            None,
            None,
            dd if needs[3] else None,
            db if needs[4] else None,
            grad_out if needs[5] else None,
        )


def vera_linear(x, weight, bias, A, B, lambda_d, lambda_b):
    """y = x W0ᵀ + bias + b ⊙ ((d ⊙ (x Aᵀ)) Bᵀ) with the analytic backward."""
    return VeRAFunction.apply(x, weight, bias, A, B, lambda_d, lambda_b)


def vera_delta(x, A, B, lambda_d, lambda_b, base_out):
    """base_out + b ⊙ ((d ⊙ (x Aᵀ)) Bᵀ) with the analytic backward."""
    return VeRADeltaFunction.apply(x, A, B, lambda_d, lambda_b, base_out)


def vera_linear_naive(x, weight, bias, A, B, lambda_d, lambda_b):
    """The formula as PEFT writes it, differentiated by autograd: the check on the analytic backward."""
    y = torch.nn.functional.linear(x, weight, bias)
    return y + lambda_b * torch.nn.functional.linear(lambda_d * torch.nn.functional.linear(x, A), B)


def vera_forward_multi(x, weight, bias, A, B, bank_d, bank_b, adapter_ids, base_out=None):
    """Many adapters in one batch, forward only: row m uses adapter a = adapter_ids[m] of the banks,
        y_m = x_m W0ᵀ + bias + b[a] ⊙ ((d[a] ⊙ (x_m Aᵀ)) Bᵀ)      (weight given; else base_out_m + ...)
    and a = -1 rows are the base output itself: F.linear(x, W0, bias) (or base_out), bit for bit.

    Plain torch: it gathers a copy of d and b per row (M x r, M x out), which the kernels avoid; as the
    oracle (float64) and the fallback that is fine. Same dtype policy as _adapter_term: GEMM operands in
    x's dtype, the scalings and the sum in the accumulation dtype, one rounding at the end."""
    acc = _accumulation_dtype(x.dtype)
    used = adapter_ids >= 0
    if bank_d.shape[0] == 0:
        # An empty bank: every id is -1 (checked by the op) and there is no row to gather, not even row 0.
        return torch.nn.functional.linear(x, weight, bias) if weight is not None else base_out.clone()
    rows = adapter_ids.clamp(min=0)
    s = x @ A.t()
    t = (bank_d[rows].to(acc) * s.to(acc)).to(x.dtype)
    term = bank_b[rows].to(acc) * (t @ B.t()).to(acc)
    if weight is not None:
        base = torch.nn.functional.linear(x, weight, bias)
        y = (x @ weight.t()).to(acc) + term
        if bias is not None:
            y = y + bias.to(acc)
    else:
        base = base_out
        y = base_out.to(acc) + term
    return torch.where(used[:, None], y.to(x.dtype), base)
