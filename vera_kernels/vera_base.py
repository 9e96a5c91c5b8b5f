"""What FusedVeRALinear and VeRAWrapper share: the adapter (lambda_d, lambda_b, the projection source,
dropout, the backend), its checks, the cached per-call plan, and the fp32 lambdas under module casts."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from . import dispatch, ops
from .projection_sources import SeededProjectionShard, SeededProjections
from .projections import check_finite_float, check_positive_int
from .routing import AdapterBank


class _Plan(NamedTuple):
    """What a layer's per-call path needs for one (device, dtype), checked once: the backend's implementation,
    the projection slices, and the tensors the checks saw (a call with other tensors checks again)."""

    impl: object
    A: torch.Tensor
    B: torch.Tensor
    checked: tuple  # the tensors check_vera_args / check_multi_args accepted, compared by identity


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x flattened to 2-D (M, in), as the backends take it."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _backend_for(backend: str, dtype: torch.dtype) -> str:
    """The backend a layer set to ``backend`` runs in ``dtype``: float64 (the oracle's dtype, e.g. after
    ``model.double()``) exists on the torch backend only, so "auto" means that one there."""
    return "torch" if backend == "auto" and dtype == torch.float64 else backend


def _check_backend(backend) -> str:
    if not isinstance(backend, str) or (backend != "auto" and backend not in dispatch.NAMES):
        raise ValueError(f"backend must be 'auto' or one of {', '.join(dispatch.NAMES)}; got {backend!r}")
    return backend


def _check_base_dtype(dtype: torch.dtype, backend: str) -> None:
    allowed = ops.KERNEL_DTYPES + ((torch.float64,) if _backend_for(backend, torch.float64) == "torch" else ())
    if dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise TypeError(f"base weight dtype {dtype} can't run on backend {backend!r}; expected one of {names}")


class _VeRABase(AdapterBank, nn.Module):
    """The adapter half shared by FusedVeRALinear and VeRAWrapper: lambda_d, lambda_b, the projection source,
    dropout, the backend, the per-(device, dtype) plans; the bank and its routing come from AdapterBank."""

    def _init_adapter(self, in_features, out_features, rank, *, seed, d_initial, dropout, max_in, max_out,
                      projections, backend, device):
        check_positive_int("rank", rank)
        d_initial = check_finite_float("d_initial", d_initial)
        if not 0.0 <= check_finite_float("dropout", dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        _check_backend(backend)
        if projections is None:
            max_in = in_features if max_in is None else check_positive_int("max_in", max_in)
            max_out = out_features if max_out is None else check_positive_int("max_out", max_out)
            # Generated up to this layer's sizes (the check below names a max_in or max_out that is too small).
            projections = SeededProjections(seed, rank, max_in, max_out, in_features=min(in_features, max_in),
                                            out_features=min(out_features, max_out))
        elif max_in is not None or max_out is not None:
            raise ValueError("max_in/max_out come from the given projections; pass one or the other")
        elif isinstance(projections, SeededProjectionShard):
            raise ValueError("projections: a SeededProjectionShard is a tensor-parallel rank's slice, made by "
                             "VeRAColwiseParallel/VeRARowwiseParallel; give the layer the whole SeededProjections")
        if projections.rank != rank:
            raise ValueError(f"rank {rank} differs from the projections' rank {projections.rank}")
        if projections.in_features < in_features or projections.out_features < out_features:
            raise ValueError(
                f"projections of max_in={projections.max_in}, max_out={projections.max_out} (generated for layers "
                f"up to {projections.in_features} -> {projections.out_features}) are too small for a layer of "
                f"in_features={in_features}, out_features={out_features}"
            )
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.projections = projections
        self.d_initial, self.dropout = float(d_initial), float(dropout)
        self._backend = backend
        # fp32 whatever the base dtype: small vectors whose updates would vanish in bf16.
        self.lambda_d = nn.Parameter(torch.full((rank,), float(d_initial), dtype=torch.float32, device=device))
        self.lambda_b = nn.Parameter(torch.zeros(out_features, dtype=torch.float32, device=device))
        self._init_bank(rank, out_features, device)
        self._plans: dict = {}  # (kind, device, dtype) -> _Plan, cleared when the layer's tensors change

    @property
    def backend(self) -> str:
        """The backend the layer's ops run on ("auto" or a name of vera_kernels.backends()). Setting it
        takes effect at the next call: the plans made for the old one are dropped."""
        return self._backend

    @backend.setter
    def backend(self, backend: str) -> None:
        _check_backend(backend)
        weight = self._parameters.get("weight")  # FusedVeRALinear's base weight: its dtype must run there
        if weight is not None:
            _check_base_dtype(weight.dtype, backend)
        self._backend = backend
        self._plans.clear()
        self._prepare_for_device()

    def _projection_slices(self, device, dtype):
        A, B = self.projections.pair(device, dtype)
        return A[:, : self.in_features], B[: self.out_features]

    def _check_input(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            got = f"a 0-d tensor ({x.dtype})" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__}: input must be a tensor of shape (..., {self.in_features}), got {got}")
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: input's last dimension is {x.shape[-1]}, expected in_features={self.in_features} "
                f"(input shape {tuple(x.shape)})"
            )

    def _prepare(self, op: str, dtype: torch.dtype) -> None:
        """Resolve the backend and materialize the projections for the layer's device now, eagerly, so that
        a torch.compile'd forward finds both cached and traces no dispatch logic."""
        device = self.lambda_d.device
        if device.type == "meta":
            return
        self.projections.pair(device, dtype)
        try:
            dispatch.lookup(op, _backend_for(self.backend, dtype), device)
        except (RuntimeError, NotImplementedError):
            # A layer may be built where its backend can't run (on CPU, then moved to the GPU): the forward
            # raises the same error if it is still unavailable there.
            pass

    # Kept fp32 when the module is cast to a narrower float (.half(), .to(torch.bfloat16)): updates to these
    # small vectors would vanish in bf16 (lambda_d = 0.1 does not move under AdamW at lr 1e-4). Widening
    # (.double()) is exact and follows the module. Their gradients follow them (a Parameter's .grad must
    # have its dtype), so a cast after a backward keeps both fp32.
    _FP32_TENSORS = ("lambda_d", "lambda_b", "_bank_d", "_bank_b")

    # Set by VeRAColwiseParallel / VeRARowwiseParallel (tensor_parallel._TensorParallel): the layer's shard.
    _tensor_parallel = None

    def _apply(self, fn, recurse=True):
        # The narrowing is refused for these tensors inside the function nn.Module._apply calls on each
        # tensor (and on each gradient), not patched afterwards: a fix-up after the fact is too late when
        # torch refuses to give an fp32 Parameter an fp16 .grad halfway through, which left the layer
        # half cast. And should the cast fail for another reason, these tensors are put back as they were.
        own = {name: getattr(self, name) for name in self._FP32_TENSORS}
        kept = {id(t) for t in (*own.values(), *(t.grad for t in own.values())) if t is not None}

        def keep_fp32(t):
            out = fn(t)
            if id(t) in kept and out.dtype in (torch.float16, torch.bfloat16) and t.is_floating_point():
                with torch.no_grad():
                    out = t.to(device=out.device, dtype=torch.float32)
                if out is t:  # a new tensor, as fn's results are (torch may swap it into the Parameter)
                    out = t.detach()
            return out

        # torch converts a Parameter and its gradient in place (through .data): keep what they hold.
        before = {name: (t, t.data, t.grad, None if t.grad is None else t.grad.data) for name, t in own.items()}
        try:
            module = super()._apply(keep_fp32, recurse)
        except BaseException:
            for name, (t, data, grad, grad_data) in before.items():
                if isinstance(t, nn.Parameter):
                    t.grad = None  # its dtype may have changed; set again below, matching the data
                    t.data = data
                    if grad is not None:
                        grad.data = grad_data
                    t.grad = grad
                    self._parameters[name] = t
                else:
                    self._buffers[name] = t
            raise
        self._plans.clear()
        self._prepare_for_device()
        return module

    def _plan(self, kind: str, op: str, x: torch.Tensor, checked: tuple, check) -> _Plan | None:
        """The cached plan for x's device and dtype; the checks run again only when the layer's tensors
        (``checked``: compared by identity, so a replaced Parameter or bank counts) or x's device or dtype
        differ from the last call's. Everything else of x (its last dimension, the ids' shape) is checked
        on every call by the caller."""
        if torch.compiler.is_compiling():
            return None  # traced once: the public op's checks cost nothing at run time there
        key = (kind, x.device, x.dtype)
        plan = self._plans.get(key)
        if plan is not None and len(plan.checked) == len(checked) and all(
                a is b for a, b in zip(plan.checked, checked)):
            return plan
        A, B = self._projection_slices(x.device, x.dtype)
        check(A, B)
        plan = _Plan(dispatch.lookup(op, _backend_for(self.backend, x.dtype), x.device), A, B, checked)
        self._plans[key] = plan
        return plan

    @torch.no_grad()
    def _delta_weight(self, device, projection_dtype, lambdas=None) -> torch.Tensor:
        """ΔW = (b ⊙ B)(d ⊙ A), out x in, accumulated in fp32 (float64 for float64), from the projections in
        ``projection_dtype``; of ``lambdas`` ((lambda_d, lambda_b), e.g. the copy merge() kept), else the
        layer's own."""
        acc = _accumulation_dtype(projection_dtype)
        A, B = self._projection_slices(device, projection_dtype)
        d, b = lambdas if lambdas is not None else (self.lambda_d, self.lambda_b)
        d, b = d.to(device=device, dtype=acc), b.to(device=device, dtype=acc)
        return (b[:, None] * B.to(acc)) @ (d[:, None] * A.to(acc))

    def _adapter_repr(self) -> str:
        parts = [f"rank={self.rank}", self.projections.describe(), f"max_in={self.projections.max_in}",
                 f"max_out={self.projections.max_out}", f"d_initial={self.d_initial}"]
        if self.dropout:
            parts.append(f"dropout={self.dropout}")
        if self.backend != "auto":
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)
