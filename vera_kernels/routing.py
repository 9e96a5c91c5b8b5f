"""Routing rows to adapters, and the adapter bank they are routed to: the half of a VeRA layer that serves
many adapters in one batch (inference only). Mixed into the layers' common base (``vera_base._VeRABase``),
which provides ``rank``, ``out_features``, ``lambda_d`` (for the device) and ``_plans``."""

from __future__ import annotations

import collections.abc
import contextvars
import numbers
import sys
from typing import NamedTuple

import torch


class Routing(NamedTuple):
    """Per-row adapter ids for a layer's bank, checked when they were set (range, removed slots), and the
    layer's bank generation then: removing an adapter bumps the generation, so a routing made before can
    never send rows to whatever takes the freed slot next (it raises instead)."""

    ids: torch.Tensor | None  # None: the layer's own adapter
    generation: int


# The open ``vera_kernels.adapter_ids`` blocks, innermost last (None: none), per thread and per asyncio task (a
# ContextVar): two threads serving different adapters through one model never see each other's, and a task
# or a thread started with a copy of the context inherits the blocks open where it was started.
# ``set_adapter_ids`` (no block) sets the layer's own default instead, shared by every thread.
ROUTES: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("vera_kernels_routes", default=None)


class RoutingBlock:
    """One ``with vera_kernels.adapter_ids(model, ids):`` block: the Routing of each of the model's layers.

    A context is shared by every generator of its thread, so the innermost block of the context is not
    always the one a call runs in: two generators, each inside its own block, interleaved, would serve each
    other's adapters. A block therefore remembers the call stack it was entered from (its frames), and a
    call is routed by the block whose entry shares the nearest frame with the call's own stack (the
    innermost such block on a tie): a generator that runs inside its block finds its own frame there. A
    call that shares no frame with any block (a thread or task started inside a block) takes the innermost.
    The frames are held while the block is open (a generator suspended inside it keeps them alive)."""

    def __init__(self, routes: dict, model):
        self.routes = routes  # layer -> Routing
        self.model = model
        self.frame_ids: frozenset = frozenset()
        self._frames: tuple = ()
        self._entered = False

    def __enter__(self):
        if self._entered:
            raise RuntimeError("adapter_ids: a block can be entered once; call vera_kernels.adapter_ids again")
        self._entered = True
        frames, frame = [], sys._getframe(1)
        while frame is not None:
            frames.append(frame)
            frame = frame.f_back
        self._frames = tuple(frames)  # held, so that no other frame takes one of their ids while the block is open
        self.frame_ids = frozenset(map(id, frames))
        ROUTES.set((*(ROUTES.get() or ()), self))
        return self.model

    def __exit__(self, *exc_info):
        # Removed by identity, not by resetting the context to what it was at __enter__: blocks of
        # interleaved generators close in any order, and each must leave the others open.
        blocks = ROUTES.get() or ()
        if any(block is self for block in blocks):
            rest = tuple(block for block in blocks if block is not self)
            ROUTES.set(rest or None)
        # Released: a copy of the context (a task started inside the block) may still hold the block, and
        # then routes by it only where no other block shares a frame with the call.
        self._frames, self.frame_ids = (), frozenset()
        return False


def _block_routing(blocks: tuple, layer):
    """The Routing the open ``blocks`` give ``layer`` for the current call (see RoutingBlock), or None."""
    candidates = [block for block in blocks if layer in block.routes]
    if not candidates:
        return None
    if len(candidates) > 1:
        frame = sys._getframe(1)
        while frame is not None:
            key = id(frame)
            for block in reversed(candidates):
                if key in block.frame_ids:
                    return block.routes[layer]
            frame = frame.f_back
    return candidates[-1].routes[layer]


def routing_ids(ids, caller: str = "set_adapter_ids") -> list | None:
    """The ids argument of set_adapter_ids / adapter_ids as a list, read once (a tensor's values are read
    back here; an iterator is consumed here, so that every layer routes by the same ids), or None; what
    can't be ids is refused, naming the argument."""
    if ids is None:
        return None
    if isinstance(ids, torch.Tensor):
        if ids.device.type == "meta":
            raise ValueError(f"{caller}: ids are on the meta device, which holds no values to route by; "
                             "give ids on the CPU or the model's device")
        if ids.layout != torch.strided:
            raise TypeError(f"{caller}: ids must be a dense (strided) tensor, got layout {ids.layout}")
        if ids.dtype != torch.int64:
            raise TypeError(f"{caller}: ids must be int64, got {ids.dtype}")
        if ids.dim() != 1:
            raise ValueError(f"{caller}: ids must be 1-D (one per row or sequence), got shape {tuple(ids.shape)}")
        return ids.tolist()
    # A mapping or a set iterates in no row order of the caller's: its keys would route the rows.
    if (isinstance(ids, (str, bytes, collections.abc.Mapping, collections.abc.Set))
            or not isinstance(ids, collections.abc.Iterable)):
        raise TypeError(
            f"{caller}: ids must be an int64 tensor or a sequence (list, tuple, iterator) of ids, names and "
            f"None, one per row or sequence, got {type(ids).__name__}")
    return list(ids)


def _device_ids(values: list, device: torch.device) -> torch.Tensor:
    """A new int64 tensor of ``values`` on ``device``; to a GPU through pinned memory, so that routing from
    ids the host holds never waits for the GPU's queue (a pageable copy would)."""
    ids = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return ids.pin_memory().to(device, non_blocking=True)
    return ids.to(device)


def _check_serving(x, *others):
    """The bank serves, it does not train: refuse inputs that require grad (ops.check_multi_args' rule, per
    call because requires_grad and the grad mode change without the tensors changing)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *others)):
        raise RuntimeError(
            "vera_*_multi is inference-only (no backward), but an input requires grad; run it under "
            "torch.no_grad() or torch.inference_mode(), or train one adapter at a time with vera_linear"
        )


class AdapterBank:
    """The bank (named adapters in slots, row i of ``_bank_d``/``_bank_b``) and the routing of rows to it."""

    def _init_bank(self, rank: int, out_features: int, device) -> None:
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

    def _routed_ids(self) -> torch.Tensor | None:
        """The ids the current routing gives this layer (the adapter_ids block of this thread, else the
        set_adapter_ids default), or None; a stale routing raises."""
        if torch.compiler.is_compiling():
            # Dynamo cannot trace a ContextVar: compiled models route by set_adapter_ids (a module attribute
            # it guards on) or by ids given to the call; vera_kernels.adapter_ids refuses compiled models.
            routing = self._routing
        else:
            blocks = ROUTES.get()
            routing = (blocks and _block_routing(blocks, self)) or self._routing
        if routing is None or routing.ids is None:
            return None  # the layer's own adapter: no bank slot to go stale
        if routing.generation != self._bank_generation:
            raise RuntimeError(
                f"{type(self).__name__}: the adapter routing was set before an adapter was removed from the bank "
                "(its slot may now hold another adapter); route again with vera_kernels.set_adapter_ids or "
                "vera_kernels.adapter_ids"
            )
        return routing.ids

    def make_routing(self, ids, caller: str = "set_adapter_ids") -> Routing:
        """A Routing of this layer for ``ids``: None (the layer's own adapter), an int64 tensor, or a sequence
        of indices, names (looked up in the bank now) and None (-1: the base alone). Everything is checked
        here, once: the range, and that no id names a removed adapter. The Routing owns what was checked: a
        tensor's values are read back once and the routing's ids are a new tensor on this layer's device,
        built from those values (a later edit of the caller's tensor changes nothing)."""
        ids = routing_ids(ids, caller)
        if ids is None:
            return Routing(None, self._bank_generation)
        values = []
        for item in ids:
            if item is None:
                values.append(-1)
            elif isinstance(item, str):
                values.append(self.adapter_index(item))
            elif isinstance(item, numbers.Integral) and not isinstance(item, bool):
                values.append(int(item))
            else:
                raise TypeError(f"{caller}: each id must be an int, a name or None, got {item!r}")
        n = len(self._bank_names)
        for value in values:
            if not -1 <= value < n:
                raise ValueError(
                    f"{caller}: ids must be in [-1, {n}) (-1: the base alone; the bank holds {n} slots), got {value}")
            if value >= 0 and self._bank_names[value] is None:
                raise ValueError(f"{caller}: id {value} routes rows to a removed adapter (a free slot)")
        return Routing(_device_ids(values, self.lambda_d.device), self._bank_generation)

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
    def add_adapter(self, name: str, lambda_d: torch.Tensor, lambda_b: torch.Tensor, *,
                    allow_nonfinite: bool = False) -> int:
        """Put an adapter (lambda_d: rank, lambda_b: out_features) in the bank; returns its index, the id that
        routes rows to it. Indices are stable: removing an adapter frees its slot for a later add and
        changes no other index. Vectors holding NaN or inf are refused unless ``allow_nonfinite``."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"add_adapter: name must be a non-empty str, got {name!r}")
        if name in self._bank_names:
            raise ValueError(f"add_adapter: an adapter named {name!r} is already in the bank (index {self.adapter_index(name)})")
        for arg, t, size in (("lambda_d", lambda_d, self.rank), ("lambda_b", lambda_b, self.out_features)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != (size,):
                got = f"shape {tuple(t.shape)}, {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"add_adapter: {arg} must be a floating tensor of shape ({size},), got {got}")
            if not allow_nonfinite and not torch.isfinite(t).all():
                raise ValueError(f"add_adapter: {arg} of {name!r} holds NaN or inf; pass allow_nonfinite=True to bank it anyway")
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
            if checked:
                raise ValueError(
                    f"{type(self).__name__}: the routing's ids are on {ids.device} (the layer's device when it was "
                    f"routed), the input on {x.device}; route again (set_adapter_ids, adapter_ids) after moving the model")
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
