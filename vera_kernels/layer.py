"""FusedVeRALinear, the drop-in VeRA layer, and VeRAWrapper for bases that cannot be fused.

    y = x W0ᵀ + bias + b ⊙ ((d ⊙ (x Aᵀ)) Bᵀ)     W0, bias (by default), A, B frozen; d (r) and b (out) trained

A and B are the slices ``A_max[:, :in]`` and ``B_max[:out, :]`` of one pair shared by every adapted layer of
a model (PEFT's convention). The pair comes from a projection source held by reference, not from buffers:
:class:`SeededProjections` regenerates it from a seed with the package's scheme (nothing random is stored
in the state_dict), :class:`ExplicitProjections` holds a given pair (PEFT's, drawn from torch's CPU
generator). Either materializes the pair on first use per (device, dtype), so ``.to()``, ``.cuda()`` and
``.half()`` just work.
"""

from __future__ import annotations

import contextvars
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import dispatch, ops
from .projections import check_positive_int, check_seed, get_projections


class Routing(NamedTuple):
    """Per-row adapter ids for a layer's bank, checked when they were set (range, removed slots), and the
    layer's bank generation then: removing an adapter bumps the generation, so a routing made before can
    never send rows to whatever takes the freed slot next (it raises instead)."""

    ids: torch.Tensor | None  # None: the layer's own adapter
    generation: int


# Routing set by ``vera_kernels.adapter_ids(model, ids)``: layer -> Routing, per thread and per asyncio task
# (a ContextVar), so two threads serving different adapters through one model never see each other's.
# ``set_adapter_ids`` (no block) sets the layer's own default instead, shared by every thread.
ROUTES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("vera_kernels_routes", default=None)


class _Plan(NamedTuple):
    """What a layer's per-call path needs for one (device, dtype), checked once: the backend's implementation,
    the projection slices, and the tensors the checks saw (a call with other tensors checks again)."""

    impl: object
    A: torch.Tensor
    B: torch.Tensor
    checked: tuple  # the tensors check_vera_args / check_multi_args accepted, compared by identity


def _conv1d_type():
    """transformers' GPT-2 ``Conv1D`` (weight stored in x out), or None when transformers isn't loaded: then
    no module can be one, and importing it (seconds) is not worth it."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x flattened to 2-D (M, in), as the backends take it."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _check_serving(x, *others):
    """The bank serves, it does not train: refuse inputs that require grad (ops.check_multi_args' rule, per
    call because requires_grad and the grad mode change without the tensors changing)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *others)):
        raise RuntimeError(
            "vera_*_multi is inference-only (no backward), but an input requires grad; run it under "
            "torch.no_grad() or torch.inference_mode(), or train one adapter at a time with vera_linear"
        )


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _backend_for(backend: str, dtype: torch.dtype) -> str:
    """The backend a layer set to ``backend`` runs in ``dtype``: float64 (the oracle's dtype, e.g. after
    ``model.double()``) exists on the torch backend only, so "auto" means that one there."""
    return "torch" if backend == "auto" and dtype == torch.float64 else backend


def _check_base_dtype(dtype: torch.dtype, backend: str) -> None:
    allowed = ops.KERNEL_DTYPES + ((torch.float64,) if _backend_for(backend, torch.float64) == "torch" else ())
    if dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise TypeError(f"base weight dtype {dtype} can't run on backend {backend!r}; expected one of {names}")


def _outside_compiled_graphs(fn, *args):
    """fn(*args), never traced by torch.compile. torch.compiler.disable is applied at the first call, not as
    a decorator: decorating imports torch._dynamo (and Triton with it), seconds added to `import vera_kernels`."""
    return torch.compiler.disable(fn)(*args)


class _ProjectionSource:
    """The shared pair (A_max: rank x max_in, B_max: max_out x rank), materialized once per (device, dtype)."""

    def __init__(self, rank: int, max_in: int, max_out: int):
        self.rank = check_positive_int("rank", rank)
        self.max_in = check_positive_int("max_in", max_in)
        self.max_out = check_positive_int("max_out", max_out)
        # The widest slices A_max[:, :in_features], B_max[:out_features] a layer may use: what pair() holds.
        self.in_features, self.out_features = self.max_in, self.max_out
        self._pairs: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def pair(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # A compiled forward only reads this dict (layers fill it eagerly for their device and dtype);
        # materializing runs outside the graph.
        found = self._pairs.get((device, dtype))
        if found is None:
            found = self._materialize(device, dtype)
        return found

    def _materialize(self, device, dtype):
        return _outside_compiled_graphs(self._materialize_now, device, dtype)

    def _materialize_now(self, device, dtype):
        made = self._make(device, dtype)
        self._pairs[(device, dtype)] = made
        return made

    def _make(self, device, dtype):
        raise NotImplementedError

    def __getstate__(self):
        # Pickles and deep copies carry the definition and which (device, dtype) pairs were in use, not the
        # tensors themselves ...
        state = dict(self.__dict__)
        state["_pairs"] = {}
        state["_in_use"] = list(self._pairs)
        return state

    def __setstate__(self, state):
        # ... which the copy materializes again now, eagerly (from the shared cache: no copy), so that a
        # torch.compile'd forward of the copy finds them, as it does for the original.
        in_use = state.pop("_in_use", [])
        self.__dict__.update(state)
        for device, dtype in in_use:
            try:
                self._materialize_now(device, dtype)
            except (RuntimeError, AssertionError):
                pass  # a device this process lacks: the forward on it will say so


class SeededProjections(_ProjectionSource):
    """The pair regenerated from ``seed`` with the package's scheme (``vera_kernels.SCHEME``): bit-identical
    on every device, backend and process, so a file needs only the seed and the sizes."""

    def __init__(self, seed: int, rank: int, max_in: int, max_out: int, *, in_features: int | None = None,
                 out_features: int | None = None):
        """``in_features``/``out_features`` (default max_in/max_out): the widest layer that will use the pair;
        only those slices are generated (the scale still follows max_in), so a large max_in costs no memory."""
        super().__init__(rank, max_in, max_out)
        self.seed = check_seed(seed)
        for name, value, limit in (("in_features", in_features, self.max_in), ("out_features", out_features, self.max_out)):
            if value is not None:
                check_positive_int(name, value)
                if value > limit:
                    raise ValueError(f"{name} must be <= {limit} (max_in, max_out), got {value}")
                setattr(self, name, value)

    def _make(self, device, dtype):
        widths = dict(in_features=self.in_features, out_features=self.out_features)
        if dtype == torch.float64:
            # The scheme's values are fp32 numbers; float64 (the torch backend's oracle) holds them exactly.
            A, B = get_projections(self.seed, self.rank, self.max_in, self.max_out, dtype=torch.float32,
                                   device=device, **widths)
            return A.double(), B.double()
        return get_projections(self.seed, self.rank, self.max_in, self.max_out, dtype=dtype, device=device, **widths)

    def key(self) -> tuple:
        return ("seeded", self.seed, self.rank, self.max_in, self.max_out)

    def describe(self) -> str:
        return f"seed={self.seed}"


class ExplicitProjections(_ProjectionSource):
    """A given pair, e.g. PEFT's ``vera_A``/``vera_B`` (drawn from torch's CPU generator, which the seed
    scheme cannot reproduce). Kept as given (detached) and converted per (device, dtype) on first use."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, *, prng_key: int | None = None):
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"projections: expected A (r, max_in) and B (max_out, r), got {tuple(A.shape)} and {tuple(B.shape)}")
        super().__init__(A.shape[0], A.shape[1], B.shape[0])
        self.A = A.detach()
        self.B = B.detach()
        self.prng_key = prng_key  # PEFT's projection_prng_key they came from, when known

    def _make(self, device, dtype):
        return self.A.to(device=device, dtype=dtype), self.B.to(device=device, dtype=dtype)

    def key(self) -> tuple:
        return ("explicit", id(self))

    def describe(self) -> str:
        return "projections=explicit"


class _VeRABase(nn.Module):
    """The adapter half shared by FusedVeRALinear and VeRAWrapper: lambda_d, lambda_b, the projection source,
    dropout and the backend."""

    def _init_adapter(self, in_features, out_features, rank, *, seed, d_initial, dropout, max_in, max_out,
                      projections, backend, device):
        check_positive_int("rank", rank)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if backend != "auto" and backend not in dispatch.NAMES:
            raise ValueError(f"backend must be 'auto' or one of {', '.join(dispatch.NAMES)}; got {backend!r}")
        if projections is None:
            max_in = in_features if max_in is None else check_positive_int("max_in", max_in)
            max_out = out_features if max_out is None else check_positive_int("max_out", max_out)
            # Generated up to this layer's sizes (the check below names a max_in or max_out that is too small).
            projections = SeededProjections(seed, rank, max_in, max_out, in_features=min(in_features, max_in),
                                            out_features=min(out_features, max_out))
        elif max_in is not None or max_out is not None:
            raise ValueError("max_in/max_out come from the given projections; pass one or the other")
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
        self.backend = backend
        # fp32 whatever the base dtype: small vectors whose updates would vanish in bf16.
        self.lambda_d = nn.Parameter(torch.full((rank,), float(d_initial), dtype=torch.float32, device=device))
        self.lambda_b = nn.Parameter(torch.zeros(out_features, dtype=torch.float32, device=device))
        # The adapter bank (serving many adapters in one batch): slot i holds an adapter's lambda_d and
        # lambda_b in row i of these buffers (capacity rows; the first len(_bank_names) are slots). Not in
        # the state_dict: adapters come from their own files (vera_kernels.load_adapter(..., name=)).
        self._bank_names: list[str | None] = []  # slot -> name; None: removed, free for the next add
        self.register_buffer("_bank_d", torch.zeros(0, rank, dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("_bank_b", torch.zeros(0, out_features, dtype=torch.float32, device=device),
                             persistent=False)
        # Bumped by remove_adapter: routings made before are stale (see Routing).
        self._bank_generation = 0
        self._routing: Routing | None = None  # the default routing, set by vera_kernels.set_adapter_ids
        self._plans: dict = {}  # (kind, device, dtype) -> _Plan, cleared when the layer's tensors change

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
    # (.double()) is exact and follows the module.
    _FP32_TENSORS = ("lambda_d", "lambda_b", "_bank_d", "_bank_b")

    def _apply(self, fn, recurse=True):
        before = {name: (getattr(self, name), getattr(self, name).detach()) for name in self._FP32_TENSORS}
        grads = {name: t.grad for name, (t, _) in before.items() if isinstance(t, nn.Parameter)}
        module = super()._apply(fn, recurse)
        for name, (_, old) in before.items():
            now = getattr(self, name)
            if old.dtype == torch.float32 and now.dtype in (torch.float16, torch.bfloat16):
                with torch.no_grad():
                    kept = old.to(device=now.device)
                if isinstance(now, nn.Parameter):
                    now.data = kept
                    if grads[name] is not None:
                        now.grad = grads[name].to(device=now.device)
                else:
                    self._buffers[name] = kept
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

    # ---- routing ----------------------------------------------------------------------------------

    def _routed_ids(self) -> torch.Tensor | None:
        """The ids the current routing gives this layer (the adapter_ids block of this thread, else the
        set_adapter_ids default), or None; a stale routing raises."""
        if torch.compiler.is_compiling():
            # Dynamo cannot trace a ContextVar: compiled models route by set_adapter_ids (a module attribute
            # it guards on) or by ids given to the call; vera_kernels.adapter_ids refuses compiled models.
            routing = self._routing
        else:
            routes = ROUTES.get()
            routing = routes.get(self, self._routing) if routes is not None else self._routing
        if routing is None:
            return None
        if routing.generation != self._bank_generation:
            raise RuntimeError(
                f"{type(self).__name__}: the adapter routing was set before an adapter was removed from the bank "
                "(its slot may now hold another adapter); route again with vera_kernels.set_adapter_ids or "
                "vera_kernels.adapter_ids"
            )
        return routing.ids

    def make_routing(self, ids) -> Routing:
        """A Routing of this layer for ``ids``: None (the layer's own adapter), an int64 tensor, or a sequence
        of indices, names (looked up in the bank now) and None (-1: the base alone). Everything is checked
        here, once (a tensor's values are read back here, never per call): the range, and that no id names a
        removed adapter."""
        if ids is None:
            return Routing(None, self._bank_generation)
        if isinstance(ids, torch.Tensor):
            if ids.dtype != torch.int64:
                raise TypeError(f"set_adapter_ids: ids must be int64, got {ids.dtype}")
            if ids.dim() != 1:
                raise ValueError(f"set_adapter_ids: ids must be 1-D (one per row or sequence), got shape {tuple(ids.shape)}")
            values = ids.tolist()
            tensor = ids
        else:
            if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
                raise TypeError(
                    f"set_adapter_ids: expected an int64 tensor or a sequence of ids/names, got {type(ids).__name__}")
            values = []
            for item in ids:
                if item is None:
                    values.append(-1)
                elif isinstance(item, str):
                    values.append(self.adapter_index(item))
                elif isinstance(item, int) and not isinstance(item, bool):
                    values.append(item)
                else:
                    raise TypeError(f"set_adapter_ids: each id must be an int, a name or None, got {item!r}")
            tensor = None
        n = len(self._bank_names)
        for value in values:
            if not -1 <= value < n:
                raise ValueError(
                    f"set_adapter_ids: ids must be in [-1, {n}) (-1: the base alone; the bank holds {n} slots), got {value}")
            if value >= 0 and self._bank_names[value] is None:
                raise ValueError(f"set_adapter_ids: id {value} routes rows to a removed adapter (a free slot)")
        if tensor is None:
            tensor = torch.tensor(values, dtype=torch.int64, device=self.lambda_d.device)
        return Routing(tensor, self._bank_generation)

    # ---- the adapter bank -------------------------------------------------------------------------

    @property
    def adapters(self) -> dict[str, int]:
        """The banked adapters: name -> index (the id to route rows to it)."""
        return {name: index for index, name in enumerate(self._bank_names) if name is not None}

    def adapter_index(self, name: str) -> int:
        try:
            return self._bank_names.index(name)
        except ValueError:
            raise KeyError(f"{type(self).__name__}: no adapter named {name!r} in the bank (has {sorted(self.adapters)})") from None

    @torch.no_grad()
    def add_adapter(self, name: str, lambda_d: torch.Tensor, lambda_b: torch.Tensor) -> int:
        """Put an adapter (lambda_d: rank, lambda_b: out_features) in the bank; returns its index, the id that
        routes rows to it. Indices are stable: removing an adapter frees its slot for a later add and
        changes no other index."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"add_adapter: name must be a non-empty str, got {name!r}")
        if name in self._bank_names:
            raise ValueError(f"add_adapter: an adapter named {name!r} is already in the bank (index {self.adapter_index(name)})")
        for arg, t, size in (("lambda_d", lambda_d, self.rank), ("lambda_b", lambda_b, self.out_features)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != (size,):
                got = f"shape {tuple(t.shape)}, {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"add_adapter: {arg} must be a floating tensor of shape ({size},), got {got}")
        index = self._bank_names.index(None) if None in self._bank_names else len(self._bank_names)
        if index == self._bank_d.shape[0]:
            # Capacity doubles, so that adding N adapters copies O(N) rows in all.
            capacity = max(4, 2 * index)
            for buffer in ("_bank_d", "_bank_b"):
                old = getattr(self, buffer)
                grown = old.new_zeros(capacity, old.shape[1])
                grown[:index] = old
                setattr(self, buffer, grown)
        self._bank_d[index] = lambda_d.to(self._bank_d.device)
        self._bank_b[index] = lambda_b.to(self._bank_b.device)
        if index == len(self._bank_names):
            self._bank_names.append(name)
        else:
            self._bank_names[index] = name
        self._plans.clear()
        return index

    @torch.no_grad()
    def remove_adapter(self, name: str) -> None:
        """Take an adapter out of the bank; its index becomes free (routing rows to it is then an error)."""
        index = self.adapter_index(name)
        self._bank_names[index] = None
        self._bank_d[index] = 0
        self._bank_b[index] = 0
        self._bank_generation += 1
        self._plans.clear()

    def _banks(self):
        # The slices are cached (the plans are cleared on every add and remove), so that their identity
        # keys the bank plan.
        banks = self._plans.get(("banks", None, None))
        if banks is None:
            n = len(self._bank_names)
            banks = self._plans[("banks", None, None)] = (self._bank_d[:n], self._bank_b[:n])
        return banks

    def _ids_table(self, device) -> torch.Tensor:
        """Which ids are valid, for a check on the device: entry i + 2 for id i, with entry 0 for every id
        below -1 and the last for every id >= the slots (both False), entry 1 for -1 (True)."""
        key = ("ids table", device, None)
        table = self._plans.get(key)
        if table is None:
            valid = [False, True] + [name is not None for name in self._bank_names] + [False]
            table = self._plans[key] = torch.tensor(valid, device=device)
        return table

    def _row_ids(self, x: torch.Tensor, ids, *, checked: bool) -> torch.Tensor:
        """One id per row of x flattened to 2-D: ids holds one per row of a 2-D x or one per sequence
        (first dimension) of a 3-D or larger x. Ids given to this call (not ``checked`` when routed) are
        checked on the device, without reading them back: range and removed slots."""
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
            got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise TypeError(f"{type(self).__name__}: adapter_ids must be an int64 tensor, got {got}")
        if x.dim() < 2 or ids.dim() != 1 or ids.shape[0] != x.shape[0]:
            raise ValueError(
                f"{type(self).__name__}: adapter_ids must hold one id per row of a 2-D input or per sequence of a "
                f"3-D input: shape ({x.shape[0] if x.dim() >= 2 else '?'},) for input {tuple(x.shape)}, got {tuple(ids.shape)}"
            )
        if ids.device != x.device:
            raise ValueError(f"{type(self).__name__}: adapter_ids are on {ids.device}, the input on {x.device}")
        if not checked and ids.numel():
            slots = len(self._bank_names)
            torch._assert_async(
                self._ids_table(ids.device)[ids.clamp(-2, slots) + 2].all(),
                f"{type(self).__name__}: adapter_ids must be in [-1, {slots}) and name no removed adapter "
                f"(free slots: {[i for i, name in enumerate(self._bank_names) if name is None]})",
            )
        if x.dim() > 2:
            ids = ids[:, None].expand(x.shape[0], x[0].numel() // x.shape[-1]).reshape(-1)
        return ids

    def _adapter_repr(self) -> str:
        parts = [f"rank={self.rank}", self.projections.describe(), f"max_in={self.projections.max_in}",
                 f"max_out={self.projections.max_out}", f"d_initial={self.d_initial}"]
        if self.dropout:
            parts.append(f"dropout={self.dropout}")
        if self.backend != "auto":
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


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

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """ΔW = (b ⊙ B)(d ⊙ A), out x in, in fp32 (float64 for a float64 base), from the projections in the
        base dtype: exactly the adapter the unmerged forward applies."""
        acc = _accumulation_dtype(self.weight.dtype)
        A, B = self._projection_slices(self.weight.device, self.weight.dtype)
        return (self.lambda_b.to(acc)[:, None] * B.to(acc)) @ (self.lambda_d.to(acc)[:, None] * A.to(acc))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into the base weight in place (one rounding to its dtype); the forward is then the base alone."""
        if self.merged:
            raise RuntimeError("FusedVeRALinear is already merged; unmerge() first")
        weight = self._weight_out_in()
        weight.copy_((weight.to(_accumulation_dtype(weight.dtype)) + self.delta_weight()).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take ΔW out of the base weight again (exact in fp32 up to rounding; in bf16/fp16 within a few ulps)."""
        if not self.merged:
            raise RuntimeError("FusedVeRALinear is not merged")
        weight = self._weight_out_in()
        weight.copy_((weight.to(_accumulation_dtype(weight.dtype)) - self.delta_weight()).to(weight.dtype))
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

    def merge(self) -> None:
        raise NotImplementedError(
            f"VeRAWrapper around {type(self.base_layer).__name__}: its weight is not a dense matrix this package "
            "can fold ΔW into; keep the adapter unmerged"
        )

    unmerge = merge

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._adapter_repr()}"


VERA_LAYERS = (FusedVeRALinear, VeRAWrapper)


def refuse_loads_into_merged_layers(module, state_dict, prefix, *_):
    """A load_state_dict pre-hook (apply_vera puts it on the model; FusedVeRALinear runs it itself): refuse,
    before anything is copied, a state_dict that would set the weight or the lambdas of a merged layer. Its
    weight holds W0 + ΔW(lambdas): new lambdas under it would leave the old ΔW in the forward, and unmerge()
    would then subtract the new ΔW from W0."""
    for name, layer in module.named_modules(prefix=prefix.rstrip(".")):
        if not getattr(layer, "merged", False):
            continue
        keys = [f"{name}.{key}" if name else key for key in ("weight", "lambda_d", "lambda_b")]
        loading = [key for key in keys if key in state_dict]
        if loading:
            raise RuntimeError(
                f"load_state_dict: layer {name!r} is merged (ΔW is folded into its weight), so {loading} can't be "
                "loaded into it; call unmerge() on the merged layers first"
            )
