"""The fake (meta) kernels of the package's ops: the shapes and dtypes of their outputs, without computing
them, so torch.compile traces through the ops. The C++ ops (``vera_kernels::forward``, ``backward``,
``forward_multi``) and the Triton ones (``triton_forward``, ...) share one schema per op, hence these."""

from __future__ import annotations


def forward(x, weight, bias, A, B, lambda_d, lambda_b, base_out, seed, max_in):
    m = x.shape[0]
    return x.new_empty(m, lambda_b.shape[0]), x.new_empty(m, lambda_d.shape[0])


def backward(grad, s, weight, A, B, lambda_d, lambda_b, in_features, need_dx, need_dd, need_db, need_dbias, seed,
             max_in):
    m, n = grad.shape
    if A is not None and A.shape[1] != in_features:  # the real kernels' check (dx is M x in_features)
        raise ValueError(f"vera_kernels::backward: in_features must be A's width {A.shape[1]}, got {in_features}")
    # An output not asked for is an empty tensor of its own (a custom op's outputs may not alias).
    return (
        grad.new_empty(m, in_features) if need_dx else grad.new_empty(0),
        lambda_d.new_empty(lambda_d.shape[0]) if need_dd else grad.new_empty(0),
        lambda_b.new_empty(n) if need_db else grad.new_empty(0),
        grad.new_empty(n) if need_dbias else grad.new_empty(0),
    )


def forward_multi(x, weight, bias, A, B, lambda_d_bank, lambda_b_bank, adapter_ids, base_out):
    return x.new_empty(x.shape[0], lambda_b_bank.shape[1])
