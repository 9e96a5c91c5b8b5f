"""FusedVeRALinear, the drop-in VeRA layer, and VeRAWrapper for bases that cannot be fused.

    y = x W0ᵀ + bias + b ⊙ ((d ⊙ (x Aᵀ)) Bᵀ)     W0, bias (by default), A, B frozen; d (r) and b (out) trained

A and B are the slices ``A_max[:, :in]`` and ``B_max[:out, :]`` of one pair shared by every adapted layer of
a model, from a projection source (``projection_sources``). What both layers share is in ``vera_base``; the
adapter bank and routing in ``routing``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .projection_sources import ExplicitProjections, SeededProjections, _ProjectionSource  # noqa: F401  (re-exported)
from .projections import check_positive_int
from .quantized import _conv1d_type, check_mergeable, merge_delta
from .routing import ROUTES, _check_serving
from .vera_base import _accumulation_dtype, _backend_for, _check_base_dtype, _rows, _VeRABase


class FusedVeRALinear(_VeRABase):
    """A linear layer with a VeRA adapter, computed by one fused op (``vera_kernels.vera_linear``).

    The base weight (out x in; in x out for GPT-2's Conv1D with ``fan_in_fan_out``) and, unless
    ``train_bias``, the bias are frozen. Trainable: ``lambda_d`` (rank), initialized to ``d_initial``, and
    ``lambda_b`` (out), initialized to 0, so a fresh layer computes the base layer exactly.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 256,
        bias: bool = True,
        *,
        seed: int = 0,
        d_initial: float = 0.1,
        dropout: float = 0.0,
        max_in: int | None = None,
        max_out: int | None = None,
        backend: str = "auto",
        device=None,
        dtype=None,
        projections: _ProjectionSource | None = None,
        train_bias: bool = False,
    ):
        super().__init__()
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        _check_base_dtype(dtype if dtype is not None else torch.get_default_dtype(), backend)
        # The same initialization as nn.Linear, so the layer is a drop-in for it.
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_layer(base.weight, base.bias, False, rank, seed=seed, d_initial=d_initial, dropout=dropout,
                         max_in=max_in, max_out=max_out, projections=projections, backend=backend,
                         train_bias=train_bias)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        rank: int = 256,
        *,
        seed: int = 0,
        d_initial: float = 0.1,
        dropout: float = 0.0,
        max_in: int | None = None,
        max_out: int | None = None,
        backend: str = "auto",
        projections: _ProjectionSource | None = None,
        train_bias: bool = False,
    ) -> "FusedVeRALinear":
        """Adapt an ``nn.Linear`` or a GPT-2 ``Conv1D``: the new layer holds the same weight and bias
        Parameters (no copy; they are frozen in place)."""
        conv1d = _conv1d_type()
        if conv1d is not None and isinstance(linear, conv1d):
            fan_in_fan_out = True
        elif isinstance(linear, nn.Linear):
            fan_in_fan_out = False
        else:
            raise TypeError(
                f"from_linear: expected nn.Linear or transformers' Conv1D, got {type(linear).__name__}; "
                "wrap other modules with VeRAWrapper"
            )
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_layer(linear.weight, linear.bias, fan_in_fan_out, rank, seed=seed, d_initial=d_initial,
                          dropout=dropout, max_in=max_in, max_out=max_out, projections=projections,
                          backend=backend, train_bias=train_bias)
        return layer

    def _init_layer(self, weight, bias, fan_in_fan_out, rank, *, train_bias, **adapter):
        _check_base_dtype(weight.dtype, adapter["backend"])
        in_features, out_features = weight.shape[::-1] if not fan_in_fan_out else weight.shape
        # Every check first: the base's Parameters are changed (frozen) only once nothing can fail.
        self._init_adapter(in_features, out_features, rank, device=weight.device, **adapter)
        self.fan_in_fan_out = fan_in_fan_out
        self.weight = weight
        self.weight.requires_grad_(False)
        self.bias = bias
        if bias is not None:
            bias.requires_grad_(train_bias)
        self.merged = False
        self._prepare_for_device()

    def _prepare_for_device(self):
        self._prepare("vera_linear", self.weight.dtype)

    def _weight_out_in(self) -> torch.Tensor:
        # Conv1D stores W0ᵀ: its transpose is a view, never a copy.
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        """adapter_ids (int64, one per row of a 2-D x or per sequence of a 3-D x; default: the ids set by
        vera_kernels.set_adapter_ids, else None): each row uses that adapter of the bank, -1 the base layer
        alone (inference only). None: the layer's own adapter (lambda_d, lambda_b)."""
        if (adapter_ids is None and self._routing is None and not self.merged and not torch.compiler.is_compiling()
                and ROUTES.get() is None):
            # The per-call path of the layer's own adapter, once a call has checked everything for x's device
            # and dtype and these Parameters (compared by identity; read from _parameters, as nn.Module's
            # __getattr__ is slow): the op, and nothing else that costs. Anything else goes the long way.
            params = self._parameters
            weight, d, b = params["weight"], params["lambda_d"], params["lambda_b"]
            bias = params.get("bias")
            plan = self._plans.get(("linear", x.device, x.dtype))
            if (plan is not None and plan.checked[0] is weight and plan.checked[2] is d and plan.checked[3] is b
                    and plan.checked[1] is bias and x.dim() and x.shape[-1] == self.in_features
                    and not weight.requires_grad
                    and not (self.dropout and self.training) and not torch.is_autocast_enabled(x.device.type)):
                if self.fan_in_fan_out:
                    weight = weight.t()
                if x.dim() == 2:
                    return plan.impl(x, weight, bias, plan.A, plan.B, d, b)
                y = plan.impl(x.reshape(-1, self.in_features), weight, bias, plan.A, plan.B, d, b)
                return y.reshape(*x.shape[:-1], self.out_features)
        if self._tensor_parallel is not None:  # a shard under VeRAColwiseParallel / VeRARowwiseParallel
            return self._tensor_parallel.forward(self, x, adapter_ids)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            self._check_input(x)
        weight, bias = self._weight_out_in(), self.bias
        routed = adapter_ids is None
        if routed:
            adapter_ids = self._routed_ids()
        if adapter_ids is not None:
            if self.merged:
                raise RuntimeError("FusedVeRALinear is merged (its own adapter is in the weight); unmerge() to serve the bank")
            return self._autocast(self._banked, x, weight, bias, self._row_ids(x, adapter_ids, checked=routed))
        if self.merged:
            if self.training and torch.is_grad_enabled():
                raise RuntimeError(
                    "FusedVeRALinear is merged: lambda_d/lambda_b would get no gradient; call unmerge() before training"
                )
            return F.linear(x, weight, bias)
        return self._autocast(self._adapted, x, weight, bias)

    @staticmethod
    def _autocast(fn, x, weight, bias, *rest):
        # What autocast does for nn.Linear: run the GEMMs in its dtype. The lambdas stay fp32, as the op allows.
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            with torch.autocast(device_type, enabled=False):
                return fn(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), *rest)
        return fn(x, weight, bias, *rest)

    def _banked(self, x, weight, bias, row_ids):
        # No dropout: the bank serves (the op refuses inputs that require grad).
        bank_d, bank_b = self._banks()
        plan = self._plan("bank", "vera_linear_multi", x, (self.weight, bias, bank_d, bank_b), lambda A, B: (
            ops.check_multi_args(x, weight, bias, A, B, bank_d, bank_b, row_ids, backend=_backend_for(self.backend, x.dtype))))
        if plan is None:
            return ops.vera_linear_multi(x, weight, bias, *self._projection_slices(x.device, x.dtype), bank_d, bank_b,
                                         row_ids, backend=_backend_for(self.backend, x.dtype))
        _check_serving(x, bias)
        y = plan.impl(_rows(x), weight, bias, plan.A, plan.B, bank_d, bank_b, row_ids, None)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def _adapted(self, x, weight, bias):
        d, b = self.lambda_d, self.lambda_b
        if self.dropout and self.training:
            # The adapter sees dropout(x), the base sees x: two inputs, so the base GEMM runs on its own.
            A, B = self._projection_slices(x.device, x.dtype)
            base_out = F.linear(x, weight, bias)
            x_drop = F.dropout(x, self.dropout, training=True)
            return ops.vera_delta(x_drop, A, B, d, b, base_out, backend=_backend_for(self.backend, x.dtype))
        plan = self._plan("linear", "vera_linear", x, (self.weight, bias, d, b), lambda A, B: (
            ops.check_vera_args(x, weight, bias, A, B, d, b, backend=_backend_for(self.backend, x.dtype))))
        if plan is None:
            return ops.vera_linear(x, weight, bias, *self._projection_slices(x.device, x.dtype), d, b,
                                   backend=_backend_for(self.backend, x.dtype))
        if self.weight.requires_grad:  # frozen when the plan was checked; the one thing that can change in place
            ops.check_vera_args(x, weight, bias, plan.A, plan.B, d, b, backend=_backend_for(self.backend, x.dtype))
        y = plan.impl(_rows(x), weight, bias, plan.A, plan.B, d, b)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (b ⊙ B)(d ⊙ A), out x in, in fp32 (float64 for a float64 base), from the projections in the
        base dtype: exactly the adapter the unmerged forward applies. Under tensor parallelism: this rank's
        shard of it, a DTensor placed as the weight."""
        return self._delta_of(None)

    def _delta_of(self, lambdas) -> torch.Tensor:
        """ΔW of ``lambdas`` ((lambda_d, lambda_b); None: the layer's own, as they are now)."""
        if self._tensor_parallel is not None:
            return self._tensor_parallel.delta_weight(self, lambdas)
        return self._delta_weight(self.weight.device, self.weight.dtype, lambdas)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into the base weight in place (one rounding to its dtype); the forward is then the base alone.

        The lambdas merged are kept (a copy): unmerge() takes out that ΔW, whatever is done to the lambdas
        meanwhile. Refused when apply_vera found the weight tied to another module's (see merge_and_unload)."""
        if self.merged:
            raise RuntimeError("FusedVeRALinear is already merged; unmerge() first")
        tied = self._tied_now()
        if tied:
            raise RuntimeError(_tied_message("merge()", "this layer", tied))
        merged = (self.lambda_d.detach().clone(), self.lambda_b.detach().clone())
        weight = self._weight_out_in()
        weight.copy_((weight.to(_accumulation_dtype(weight.dtype)) + self._delta_of(merged)).to(weight.dtype))
        self._merged_lambdas = merged
        self.merged = True

    def _tied_now(self) -> list[str]:
        """The other modules' parameters that apply_vera found tied to this layer's weight, while the layer
        still holds that weight (``layer.weight = nn.Parameter(...)`` unties it)."""
        names, weight = getattr(self, "_tied", ((), None))
        return list(names) if weight is self.weight else []

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged ΔW out of the base weight again (exact in fp32 up to rounding; in bf16/fp16 within
        a few ulps): the ΔW of the lambdas as merge() saw them, not as they are now."""
        if not self.merged:
            raise RuntimeError("FusedVeRALinear is not merged")
        merged = getattr(self, "_merged_lambdas", None)
        weight = self._weight_out_in()
        weight.copy_((weight.to(_accumulation_dtype(weight.dtype)) - self._delta_of(merged)).to(weight.dtype))
        self._merged_lambdas = None
        self.merged = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        refuse_loads_into_merged_layers(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def to_base(self) -> nn.Module:
        """An nn.Linear (or Conv1D) holding this layer's weight and bias Parameters, without the adapter."""
        if self.merged:
            raise RuntimeError("FusedVeRALinear is merged; unmerge() first so the base weight is W0")
        if self.fan_in_fan_out:
            base = _conv1d_type().__new__(_conv1d_type())
            nn.Module.__init__(base)
            base.nf, base.nx = self.out_features, self.in_features
        else:
            base = nn.Linear.__new__(nn.Linear)
            nn.Module.__init__(base)
            base.in_features, base.out_features = self.in_features, self.out_features
        base.weight = self.weight
        if self.bias is None and not self.fan_in_fan_out:
            base.register_parameter("bias", None)
        else:
            base.bias = self.bias
        return base

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}",
                 f"bias={self.bias is not None}", self._adapter_repr(), f"dtype={self.weight.dtype}"]
        if self.fan_in_fan_out:
            parts.append("fan_in_fan_out=True")
        if self.bias is not None and self.bias.requires_grad:
            parts.append("train_bias=True")
        if self.merged:
            parts.append("merged=True")
        return ", ".join(parts)


class VeRAWrapper(_VeRABase):
    """A VeRA adapter around any base module mapping (..., in_features) to (..., out_features): a quantized
    layer, a custom module. The base's own forward computes its output; ``vera_delta`` adds the adapter."""

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int = 256,
        *,
        in_features: int | None = None,
        out_features: int | None = None,
        seed: int = 0,
        d_initial: float = 0.1,
        dropout: float = 0.0,
        max_in: int | None = None,
        max_out: int | None = None,
        backend: str = "auto",
        projections: _ProjectionSource | None = None,
        device=None,
        quantization_config=None,
    ):
        super().__init__()
        in_features = in_features if in_features is not None else getattr(base_layer, "in_features", None)
        out_features = out_features if out_features is not None else getattr(base_layer, "out_features", None)
        if in_features is None or out_features is None:
            raise TypeError(
                f"VeRAWrapper: {type(base_layer).__name__} has no in_features/out_features; pass them explicitly"
            )
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        if device is None:
            first = next(iter(base_layer.parameters()), None)
            device = first.device if first is not None else None
        self._init_adapter(in_features, out_features, rank, seed=seed, d_initial=d_initial, dropout=dropout,
                           max_in=max_in, max_out=max_out, projections=projections, backend=backend, device=device)
        self.base_layer = base_layer.requires_grad_(False)
        # What merge() re-quantizes a torchao base with (the config the model was quantized with).
        self.quantization_config = quantization_config
        self.merged = False
        self._prepare_for_device()

    def _prepare_for_device(self):
        self._prepare("vera_delta", torch.float32)

    def forward(self, x: torch.Tensor, *args, adapter_ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """adapter_ids: as FusedVeRALinear.forward (per-row adapters of the bank, -1: the base alone)."""
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            self._check_input(x)
        routed = adapter_ids is None
        if routed:
            adapter_ids = self._routed_ids()
        row_ids = None if adapter_ids is None else self._row_ids(x, adapter_ids, checked=routed)
        if self.merged:
            if row_ids is not None:
                raise RuntimeError("VeRAWrapper is merged (its own adapter is in the base); unmerge() to serve the bank")
            if self.training and torch.is_grad_enabled():
                raise RuntimeError(
                    "VeRAWrapper is merged: lambda_d/lambda_b would get no gradient; call unmerge() before training"
                )
            return self.base_layer(x, *args, **kwargs).to(x.dtype)
        base_out = self.base_layer(x, *args, **kwargs)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            with torch.autocast(device_type, enabled=False):
                return self._add_adapter(x.to(dtype), base_out.to(dtype), row_ids)
        # The result takes x's dtype, as PEFT's does, whatever the base returned.
        return self._add_adapter(x, base_out.to(x.dtype), row_ids)

    def _add_adapter(self, x, base_out, row_ids=None):
        if base_out.shape != (*x.shape[:-1], self.out_features):
            ops.check_vera_args(x, None, None, *self._projection_slices(x.device, x.dtype), self.lambda_d,
                                self.lambda_b, base_out, backend=_backend_for(self.backend, x.dtype))  # raises, naming base_out
        if row_ids is not None:
            bank_d, bank_b = self._banks()
            plan = self._plan("bank", "vera_delta_multi", x, (bank_d, bank_b), lambda A, B: ops.check_multi_args(
                x, None, None, A, B, bank_d, bank_b, row_ids, base_out, backend=_backend_for(self.backend, x.dtype)))
            if plan is None:
                return ops.vera_delta_multi(x, *self._projection_slices(x.device, x.dtype), bank_d, bank_b, row_ids,
                                            base_out, backend=_backend_for(self.backend, x.dtype))
            _check_serving(x, base_out)
            y = plan.impl(_rows(x), None, None, plan.A, plan.B, bank_d, bank_b, row_ids,
                          base_out.reshape(-1, self.out_features))
            return y.reshape(base_out.shape)
        d, b = self.lambda_d, self.lambda_b
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, training=True)
        plan = self._plan("delta", "vera_delta", x, (d, b), lambda A, B: ops.check_vera_args(
            x, None, None, A, B, d, b, base_out, backend=_backend_for(self.backend, x.dtype)))
        if plan is None:
            return ops.vera_delta(x, *self._projection_slices(x.device, x.dtype), d, b, base_out, backend=_backend_for(self.backend, x.dtype))
        y = plan.impl(_rows(x), plan.A, plan.B, d, b, base_out.reshape(-1, self.out_features))
        return y.reshape(base_out.shape)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (b ⊙ B)(d ⊙ A), out x in, in fp32 from fp32 projections."""
        return self._delta_weight(self.lambda_d.device, torch.float32)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into a quantized base (bitsandbytes 4/8-bit, HQQ, torchao): dequantize, add ΔW in fp32,
        quantize again with the base's own quantizer (``vera_kernels.quantized``). The merged base is on the
        format's grid: its outputs differ from the unmerged layer's by that rounding. Other bases: TypeError,
        nothing changed."""
        if self.merged:
            raise RuntimeError("VeRAWrapper is already merged; unmerge() first")
        merged = (self.lambda_d.detach().clone(), self.lambda_b.detach().clone())
        self._set_base(merge_delta(self.base_layer, self._delta_weight(self.lambda_d.device, torch.float32, merged),
                                   +1, self.quantization_config))
        self._merged_lambdas = merged
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged ΔW out of the base again (dequantize, subtract, re-quantize): the ΔW of the lambdas as
        merge() saw them; the base is W0 within the two roundings (merge's, unmerge's), not bit for bit the one
        before merge()."""
        if not self.merged:
            raise RuntimeError("VeRAWrapper is not merged")
        merged = getattr(self, "_merged_lambdas", None)
        self._set_base(merge_delta(self.base_layer, self._delta_weight(self.lambda_d.device, torch.float32, merged),
                                   -1, self.quantization_config))
        self._merged_lambdas = None
        self.merged = False

    def check_mergeable(self) -> None:
        """Raise a TypeError naming the base if merge() can't fold ΔW into it."""
        try:
            check_mergeable(self.base_layer, self.quantization_config)
        except TypeError as exc:
            raise TypeError(f"VeRAWrapper around {exc}") from None

    def _set_base(self, base: nn.Module) -> None:
        base.requires_grad_(False)
        self.base_layer = base

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}", self._adapter_repr()]
        if self.merged:
            parts.append("merged=True")
        return ", ".join(parts)


VERA_LAYERS = (FusedVeRALinear, VeRAWrapper)


def _tied_message(what: str, layer: str, tied) -> str:
    names = ", ".join(repr(name) for name in tied)
    return (
        f"{what}: the weight of {layer} is tied to {names} (the same Parameter or memory): merging ΔW into it would "
        f"change that module's output too. Untie it first, e.g. module.weight = "
        f"nn.Parameter(module.weight.detach().clone()) for the adapted module (for a Hugging Face model, also "
        f"set config.tie_word_embeddings = False so that it is not tied again), or keep the adapter unmerged"
    )


def refuse_loads_into_merged_layers(module, state_dict, prefix, *_):
    """A load_state_dict pre-hook (apply_vera puts it on the model; FusedVeRALinear runs it itself): refuse,
    before anything is copied, a state_dict that would set the weight or the lambdas of a merged layer. Its
    weight holds W0 + ΔW(lambdas): new lambdas under it would leave the old ΔW in the forward, and unmerge()
    would then subtract the new ΔW from W0."""
    for name, layer in module.named_modules(prefix=prefix.rstrip(".")):
        if not getattr(layer, "merged", False):
            continue
        keys = [f"{name}.{key}" if name else key for key in ("weight", "lambda_d", "lambda_b")]
        base = f"{name}.base_layer." if name else "base_layer."  # a merged VeRAWrapper's base holds ΔW
        loading = [key for key in state_dict if key in keys or key.startswith(base)]
        if loading:
            raise RuntimeError(
                f"load_state_dict: layer {name!r} is merged (ΔW is folded into its weight), so {loading} can't be "
                "loaded into it; call unmerge() on the merged layers first"
            )
