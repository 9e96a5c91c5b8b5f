"""Where a layer's projections come from: the shared pair (A_max: rank x max_in, B_max: max_out x rank),
held by reference by every adapted layer of a model (PEFT's convention), not as buffers.

:class:`SeededProjections` regenerates the pair from a seed with the package's scheme (nothing random is
stored in the state_dict); :class:`ExplicitProjections` holds a given pair (PEFT's, drawn from torch's CPU
generator). Either materializes the pair on first use per (device, dtype), so ``.to()``, ``.cuda()`` and
``.half()`` just work.
"""

from __future__ import annotations

import torch

from .projections import check_positive_int, check_scheme_sizes, check_seed, get_projections


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
        check_scheme_sizes(self.rank, self.max_in, self.max_out)
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


class SeededProjectionShard(SeededProjections):
    """A tensor-parallel rank's shard of the seeded pair: ``A_max[:, in_offset:in_offset + in_features]`` and
    ``B_max[out_offset:out_offset + out_features]``, generated alone (``projection_block`` with offsets) and
    bit-identical to that slice of the full pair: the rank holds no other projection memory for its layer.
    ``VeRAColwiseParallel``/``VeRARowwiseParallel`` make them; ``pair()`` returns exactly the shard.
    ``key()`` is the full pair's, so the shards of one model still count as one shared pair (save_adapter)."""

    def __init__(self, seed: int, rank: int, max_in: int, max_out: int, *, in_offset: int, in_features: int,
                 out_offset: int, out_features: int):
        super().__init__(seed, rank, max_in, max_out)
        for name, offset, width, limit in (("in", in_offset, in_features, self.max_in),
                                           ("out", out_offset, out_features, self.max_out)):
            check_positive_int(f"{name}_features", width)
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0 or offset + width > limit:
                raise ValueError(f"{name}_offset {offset!r} + {name}_features {width} must lie in [0, max_{name}="
                                 f"{limit}]")
        self.in_offset, self.in_features = in_offset, in_features
        self.out_offset, self.out_features = out_offset, out_features

    def _make(self, device, dtype):
        widths = dict(in_features=self.in_features, out_features=self.out_features, in_offset=self.in_offset,
                      out_offset=self.out_offset)
        generate = torch.float32 if dtype == torch.float64 else dtype  # float64: as SeededProjections
        A, B = get_projections(self.seed, self.rank, self.max_in, self.max_out, dtype=generate, device=device,
                               **widths)
        return (A.double(), B.double()) if dtype == torch.float64 else (A, B)

    def describe(self) -> str:
        return (f"seed={self.seed}, shard A[:, {self.in_offset}:{self.in_offset + self.in_features}] "
                f"B[{self.out_offset}:{self.out_offset + self.out_features}]")


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
