"""The public VeRA ops: argument checks, then one dispatch to the backend's implementation.

    vera_linear(x, weight, bias, A, B, lambda_d, lambda_b)  y = x W0ᵀ + bias + b ⊙ ((d ⊙ (x Aᵀ)) Bᵀ)
    vera_delta(x, A, B, lambda_d, lambda_b, base_out)       base_out + b ⊙ ((d ⊙ (x Aᵀ)) Bᵀ)

``vera_linear_multi``/``vera_delta_multi`` serve many adapters in one batch: banks of lambdas (N x r,
N x out) and one adapter id per row (-1: the base alone); inference only.

``vera_delta`` is the card's ``x + ((x @ Aᵀ) * d) @ Bᵀ * b`` form: the adapter accumulated onto any tensor,
e.g. the output of a base layer that cannot be fused (a quantized one) or the residual stream.

Shapes: x (..., in), weight (out, in), bias (out) or None, A (r, in) (a slice ``A_max[:, :in]`` may be
strided), B (out, r), lambda_d (r), lambda_b (out), base_out (..., out). x, weight, bias, A, B and
base_out share one floating dtype (float32, bfloat16, float16; float64 on the torch backend); lambda_d
and lambda_b are float32 or that dtype. All on one device. Gradients flow to x, bias, lambda_d, lambda_b
(and base_out); weight, A and B are frozen.

Every backend implements ``vera_linear`` and ``vera_delta`` (found through vera_kernels.dispatch); they
receive checked arguments with x flattened to 2-D (M, in) and return (M, out) with autograd wired.
"""

from __future__ import annotations

import torch

from . import dispatch, reference

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _fail(name: str, expected: str, got) -> None:
    raise ValueError(f"{name}: expected {expected}, got {got}")


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype}, {t.device}"


def check_vera_args(x, weight, bias, A, B, lambda_d, lambda_b, base_out=None, *, backend="auto", x_name="x"):
    """Validate everything before any kernel runs; errors name the argument and what was expected.
    ``x_name``: what fixes the dtype and device of the others, as the errors call it (the backward's
    checks pass a stand-in for x with the gradient's dtype and device)."""
    named = dict(x=x, weight=weight, bias=bias, A=A, B=B, lambda_d=lambda_d, lambda_b=lambda_b, base_out=base_out)
    for name, t in named.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t is not None and t.layout != torch.strided:
            raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
    if x.dim() < 1 or x.shape[-1] < 1:
        _fail("x", "a tensor of shape (..., in_features) with in_features >= 1", _describe(x))
    in_features = x.shape[-1]
    rank = A.shape[0] if A.dim() == 2 else -1
    if A.dim() != 2 or A.shape[1] != in_features or rank < 1:
        _fail("A", f"shape (rank, {in_features}) (x's last dimension)", _describe(A))
    if B.dim() != 2 or B.shape[1] != rank or B.shape[0] < 1:
        _fail("B", f"shape (out_features, {rank}) (A's rank) with out_features >= 1", _describe(B))
    out_features = B.shape[0]
    if weight is not None and tuple(weight.shape) != (out_features, in_features):
        _fail("weight", f"shape ({out_features}, {in_features}) (B's rows, x's last dimension)", _describe(weight))
    if bias is not None and tuple(bias.shape) != (out_features,):
        _fail("bias", f"shape ({out_features},)", _describe(bias))
    if tuple(lambda_d.shape) != (rank,):
        _fail("lambda_d", f"shape ({rank},) (the rank)", _describe(lambda_d))
    if tuple(lambda_b.shape) != (out_features,):
        _fail("lambda_b", f"shape ({out_features},) (out_features)", _describe(lambda_b))
    if base_out is not None and tuple(base_out.shape) != (*x.shape[:-1], out_features):
        _fail("base_out", f"shape {(*x.shape[:-1], out_features)}", _describe(base_out))

    allowed = KERNEL_DTYPES + ((torch.float64,) if backend == "torch" else ())
    if x.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise TypeError(f"{x_name}: expected dtype in ({names}) for backend {backend!r}, got {x.dtype}")
    for name in ("weight", "bias", "A", "B", "base_out"):
        t = named[name]
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} ({x_name}'s dtype), got {t.dtype}")
    for name in ("lambda_d", "lambda_b"):
        if named[name].dtype not in (torch.float32, x.dtype):
            raise TypeError(f"{name}: expected dtype torch.float32 or {x.dtype} ({x_name}'s dtype), got {named[name].dtype}")
    for name, t in named.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} ({x_name}'s device), got {t.device}")
    for name in ("weight", "A", "B"):
        t = named[name]
        if t is not None and t.requires_grad:
            raise ValueError(f"{name}: must be frozen (requires_grad=False); VeRA trains lambda_d, lambda_b and bias")
    return in_features, out_features, rank


def check_backward_args(grad, s, weight, A, B, lambda_d, lambda_b, in_features, *, backend="auto"):
    """The backward's arguments (a backend's backward op: grad = dL/dy (M, out), s = x Aᵀ saved (M, r), x's
    in_features), checked as the forward's: check_vera_args with a stand-in for x, (M, in_features) in
    grad's dtype and on its device, and grad in base_out's place. A and B are the pair (or stand-ins for
    a generated one)."""
    for name, t in dict(grad=grad, s=s).items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
    if grad.dim() != 2 or grad.shape[1] < 1:
        _fail("grad", "a 2-D tensor (M, out_features) with out_features >= 1", _describe(grad))
    m, out_features = grad.shape
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
        raise ValueError(f"in_features: expected an int >= 1 (x's last dimension), got {in_features!r}")
    if s.dim() != 2 or s.shape[0] != m or s.shape[1] < 1:
        _fail("s", f"shape ({m}, rank) with rank >= 1 (grad's rows)", _describe(s))
    rank = s.shape[1]
    for name, t, shape, why in (("A", A, (rank, in_features), "s's columns, in_features"),
                                ("B", B, (out_features, rank), "grad's columns, s's columns"),
                                ("weight", weight, (out_features, in_features), "grad's columns, in_features")):
        if isinstance(t, torch.Tensor) and tuple(t.shape) != shape:
            _fail(name, f"shape {shape} ({why})", _describe(t))
    x = torch.empty((), dtype=grad.dtype, device=grad.device).expand(m, in_features)
    check_vera_args_cached(x, weight, None, A, B, lambda_d, lambda_b, grad, backend=backend, x_name="grad")
    if s.dtype != grad.dtype:
        raise TypeError(f"s: expected dtype {grad.dtype} (grad's dtype), got {s.dtype}")
    if s.device != grad.device:
        raise ValueError(f"s: expected device {grad.device} (grad's device), got {s.device}")


# Argument lists check_vera_args accepted, by what it looks at (layout, shape, dtype, device, requires_grad of each
# tensor): a call like an earlier one costs a dictionary lookup instead of the checks. Bounded: cleared when full.
_accepted: dict[tuple, tuple[int, int, int]] = {}
_ACCEPTED_MAX = 4096


def _metadata(t):
    return None if t is None else (type(t), t.layout, t.shape, t.dtype, t.device, t.requires_grad)


def check_vera_args_cached(x, weight, bias, A, B, lambda_d, lambda_b, base_out=None, *, backend="auto", x_name="x"):
    """check_vera_args, remembered by the tensors' metadata (its checks read nothing else)."""
    tensors = (x, weight, bias, A, B, lambda_d, lambda_b, base_out)
    if torch.compiler.is_compiling():
        return check_vera_args(*tensors, backend=backend, x_name=x_name)  # traced once: free at run time
    try:
        key = (backend, x_name, *map(_metadata, tensors))
    except AttributeError:  # not a tensor: the checks say which
        return check_vera_args(*tensors, backend=backend, x_name=x_name)
    found = _accepted.get(key)
    if found is None:
        found = check_vera_args(*tensors, backend=backend, x_name=x_name)
        if len(_accepted) >= _ACCEPTED_MAX:
            _accepted.clear()
        _accepted[key] = found
    return found


def vera_linear(x, weight, bias, A, B, lambda_d, lambda_b, *, backend: str = "auto") -> torch.Tensor:
    """y = x W0ᵀ + bias + b ⊙ ((d ⊙ (x Aᵀ)) Bᵀ), the base GEMM fused with the adapter."""
    if weight is None:
        raise TypeError("weight: expected a torch.Tensor of shape (out_features, in_features), got None")
    in_features, out_features, _ = check_vera_args_cached(x, weight, bias, A, B, lambda_d, lambda_b, backend=backend)
    impl = dispatch.lookup("vera_linear", backend, x.device)
    y = impl(x.reshape(-1, in_features), weight, bias, A, B, lambda_d, lambda_b)
    return y.reshape(*x.shape[:-1], out_features)


def vera_delta(x, A, B, lambda_d, lambda_b, base_out, *, backend: str = "auto") -> torch.Tensor:
    """base_out + b ⊙ ((d ⊙ (x Aᵀ)) Bᵀ): the adapter accumulated onto a given tensor."""
    if base_out is None:
        raise TypeError("base_out: expected a torch.Tensor of shape (..., out_features), got None")
    in_features, out_features, _ = check_vera_args_cached(x, None, None, A, B, lambda_d, lambda_b, base_out,
                                                          backend=backend)
    impl = dispatch.lookup("vera_delta", backend, x.device)
    y = impl(x.reshape(-1, in_features), A, B, lambda_d, lambda_b, base_out.reshape(-1, out_features))
    return y.reshape(*x.shape[:-1], out_features)


def check_multi_args(x, weight, bias, A, B, lambda_d_bank, lambda_b_bank, adapter_ids, base_out=None, *,
                     backend="auto"):
    """check_vera_args for the banks (N x r, N x out) and the per-row ids, then the ids' values: int64, one
    per row of x flattened to 2-D, on x's device, each in [-1, N). Everything is checked before any
    kernel runs, without a host sync (the range by check_ids_in_range)."""
    for name, t in dict(lambda_d_bank=lambda_d_bank, lambda_b_bank=lambda_b_bank, adapter_ids=adapter_ids).items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
    for name, t in dict(lambda_d_bank=lambda_d_bank, lambda_b_bank=lambda_b_bank).items():
        if t.dim() != 2:
            _fail(name, "a 2-D bank (adapters, size)", _describe(t))
    n_adapters = lambda_d_bank.shape[0]
    if lambda_b_bank.shape[0] != n_adapters:
        _fail("lambda_b_bank", f"{n_adapters} rows (lambda_d_bank's adapters)", _describe(lambda_b_bank))
    # The banks' own names in the errors, before check_vera_args sees one row of each as lambda_d/lambda_b.
    if A.dim() == 2 and lambda_d_bank.shape[1] != A.shape[0]:
        _fail("lambda_d_bank", f"shape (adapters, {A.shape[0]}) (A's rank)", _describe(lambda_d_bank))
    if B.dim() == 2 and lambda_b_bank.shape[1] != B.shape[0]:
        _fail("lambda_b_bank", f"shape (adapters, {B.shape[0]}) (B's out_features)", _describe(lambda_b_bank))
    for name, t in dict(lambda_d_bank=lambda_d_bank, lambda_b_bank=lambda_b_bank).items():
        if t.dtype not in (torch.float32, x.dtype):
            raise TypeError(f"{name}: expected dtype torch.float32 or {x.dtype} (x's dtype), got {t.dtype}")
    # The per-vector checks of the single-adapter op on one row of each bank: shapes, dtypes, device.
    in_features, out_features, rank = check_vera_args_cached(
        x, weight, bias, A, B, lambda_d_bank[0] if n_adapters else lambda_d_bank.new_empty(lambda_d_bank.shape[1]),
        lambda_b_bank[0] if n_adapters else lambda_b_bank.new_empty(lambda_b_bank.shape[1]), base_out, backend=backend,
    )
    rows = x.numel() // in_features
    if adapter_ids.dtype != torch.int64:
        raise TypeError(f"adapter_ids: expected dtype torch.int64, got {adapter_ids.dtype}")
    if tuple(adapter_ids.shape) != (rows,):
        _fail("adapter_ids", f"shape ({rows},) (one id per row of x, {tuple(x.shape)})", _describe(adapter_ids))
    if adapter_ids.device != x.device:
        raise ValueError(f"adapter_ids: expected device {x.device} (x's device), got {adapter_ids.device}")
    if rows:
        check_ids_in_range(adapter_ids, n_adapters)
    # Serving only: the banks are not trained through these ops and there is no multi-adapter backward.
    if torch.is_grad_enabled():
        named = dict(x=x, bias=bias, lambda_d_bank=lambda_d_bank, lambda_b_bank=lambda_b_bank, base_out=base_out)
        needing = [name for name, t in named.items() if t is not None and t.requires_grad]
        if needing:
            raise RuntimeError(
                f"vera_*_multi is inference-only (no backward), but {', '.join(needing)} require grad; run it "
                "under torch.no_grad() or torch.inference_mode(), or train one adapter at a time with vera_linear"
            )
    return in_features, out_features, rank


def check_ids_in_range(adapter_ids: torch.Tensor, n_adapters: int) -> None:
    """Every id in [-1, n_adapters), checked on the ids' device without reading them back, so that a serving
    step never waits for the GPU and can be captured in a CUDA graph: on CPU a bad id raises here; on CUDA
    the device asserts (the error surfaces at the next synchronization, and the CUDA context is lost)."""
    torch._assert_async(
        ((adapter_ids >= -1) & (adapter_ids < n_adapters)).all(),
        f"adapter_ids: values must be in [-1, {n_adapters}) (-1: the base alone; the banks hold {n_adapters} adapters)",
    )


def vera_linear_multi(x, weight, bias, A, B, lambda_d_bank, lambda_b_bank, adapter_ids, *,
                      backend: str = "auto") -> torch.Tensor:
    """Many adapters in one batch: row m of x (flattened to (M, in)) uses adapter a = adapter_ids[m],
        y_m = x_m W0ᵀ + bias + b[a] ⊙ ((d[a] ⊙ (x_m Aᵀ)) Bᵀ),   b[a] = lambda_b_bank[a], d[a] = lambda_d_bank[a],
    and a = -1 gives the base output x_m W0ᵀ + bias. Banks: lambda_d_bank (N, r), lambda_b_bank (N, out),
    float32 or x's dtype; adapter_ids int64 (M,). Inference only (see check_multi_args)."""
    if weight is None:
        raise TypeError("weight: expected a torch.Tensor of shape (out_features, in_features), got None")
    in_features, out_features, _ = check_multi_args(x, weight, bias, A, B, lambda_d_bank, lambda_b_bank,
                                                    adapter_ids, backend=backend)
    impl = dispatch.lookup("vera_linear_multi", backend, x.device)
    y = impl(x.reshape(-1, in_features), weight, bias, A, B, lambda_d_bank, lambda_b_bank, adapter_ids, None)
    return y.reshape(*x.shape[:-1], out_features)


def vera_delta_multi(x, A, B, lambda_d_bank, lambda_b_bank, adapter_ids, base_out, *,
                     backend: str = "auto") -> torch.Tensor:
    """base_out_m + b[a] ⊙ ((d[a] ⊙ (x_m Aᵀ)) Bᵀ) per row, a = adapter_ids[m]; -1: base_out_m itself."""
    if base_out is None:
        raise TypeError("base_out: expected a torch.Tensor of shape (..., out_features), got None")
    in_features, out_features, _ = check_multi_args(x, None, None, A, B, lambda_d_bank, lambda_b_bank,
                                                    adapter_ids, base_out, backend=backend)
    impl = dispatch.lookup("vera_delta_multi", backend, x.device)
    y = impl(x.reshape(-1, in_features), None, None, A, B, lambda_d_bank, lambda_b_bank, adapter_ids,
             base_out.reshape(-1, out_features))
    return y.reshape(*x.shape[:-1], out_features)
