"""The shared random projections A (r x max_in) and B (max_out x r), regenerated from a seed.

Scheme ``vera-philox-v1`` (docs/DESIGN.md section 3). Element (row, col) of A (tag 0) or B (tag 1):

    key     = (seed & 0xFFFFFFFF, seed >> 32)
    counter = (col >> 2, row, tag, 0)
    w       = Philox4x32-10(counter, key)[col & 3]
    s       = 2 * (w >> 8) + 1 - 2**24          odd, |s| < 2**24: exact in fp32
    v       = fp32(s) * (fp32(bound) * 2**-24)   one IEEE multiply; bound = sqrt(3) * sqrt(2) / sqrt(fan_in)

then rounded to bf16 or fp16 to nearest even with integer operations. Only integer Philox, one exact
conversion and one IEEE multiply are involved, so every backend produces the same bits. An element does
not depend on the matrix's shape, so a slice of a larger matrix equals the smaller matrix.

This module holds the plain-torch implementation (the ``torch`` backend), the argument checks, the
dispatch to the other backends and the per-(seed, shape, device, dtype) cache.
"""

from __future__ import annotations

import math
import numbers
import struct
import threading
from collections import OrderedDict

import torch

from . import dispatch

SCHEME = "vera-philox-v1"
TAG_A = 0
TAG_B = 1
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_MASK32 = 0xFFFFFFFF
# What the scheme addresses: the counter holds a row in 32 bits and a column group (col // 4) in 32 bits,
# so rows < 2**32 and columns < 2**34 (past them elements would repeat). A (rank x max_in) and B
# (max_out x rank) must fit: these are the limits of a seeded pair, its layers and its adapter files.
MAX_ROWS = 2**32
MAX_COLS = 2**34
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


# --------------------------------------------------------------------------------------------------
# Argument checks, shared by every backend.


def check_seed(seed) -> int:
    # bool is an int subclass; a True seed is almost certainly a bug.
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int in [0, 2**63), got {type(seed).__name__} {seed!r}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_finite_float(name: str, value) -> float:
    """A real number (int, float, a NumPy scalar; not bool) that is finite, as a float; errors name the
    argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number (int or float), got {type(value).__name__} {value!r}")
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a finite number, got an int too large for a float") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def check_scheme_sizes(rank: int, max_in: int, max_out: int) -> None:
    """The sizes of a seeded pair, within what the scheme addresses (MAX_ROWS, MAX_COLS): A is rank x max_in,
    B is max_out x rank. Each must already be a positive int."""
    for name, value, limit in (("rank", rank, MAX_ROWS), ("max_in", max_in, MAX_COLS), ("max_out", max_out, MAX_ROWS)):
        if value > limit:
            raise ValueError(
                f"{name} must be <= {limit} (2**{limit.bit_length() - 1}: the projection scheme {SCHEME} addresses "
                f"A's columns < 2**34 and rows < 2**32), got {value}")


def check_dtype(dtype) -> torch.dtype:
    if dtype not in SUPPORTED_DTYPES:
        allowed = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"dtype must be one of {allowed}; got {dtype!r}")
    return dtype


def projection_bound(fan_in: int) -> float:
    """PEFT's Kaiming-uniform bound sqrt(3) * (sqrt(2) / sqrt(fan_in)), computed in double, rounded to fp32."""
    bound = math.sqrt(3.0) * (math.sqrt(2.0) / math.sqrt(fan_in))
    return struct.unpack("f", struct.pack("f", bound))[0]


def projection_scale(fan_in: int) -> float:
    """The fp32 factor applied to the odd integer s: bound * 2**-24 (an exact power-of-two scaling)."""
    return projection_bound(fan_in) * 2.0**-24


# --------------------------------------------------------------------------------------------------
# The torch backend: Philox4x32-10 on int64 tensors holding uint32 values.


def _mulhilo32(multiplier: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The 64-bit product of two uint32 overflows int64, so split x into 16-bit halves: each partial
    # product stays below 2**48.
    p_lo = (x & 0xFFFF) * multiplier
    p_hi = (x >> 16) * multiplier
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & _MASK32
    return hi, lo


def philox4x32_10_torch(counters: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Random123 Philox4x32-10. counters (..., 4) and keys (..., 2) int64 holding uint32 values."""
    c0, c1, c2, c3 = counters.to(torch.int64).unbind(-1)
    k0, k1 = keys.to(torch.int64).unbind(-1)
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W0) & _MASK32
        k1 = (k1 + _PHILOX_W1) & _MASK32
    return torch.stack(torch.broadcast_tensors(c0, c1, c2, c3), dim=-1)


def fp32_bits_to_bf16_bits(bits: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even fp32 -> bf16 on the bit pattern (int64 tensor of uint32), finite inputs."""
    return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16


def fp32_bits_to_fp16_bits(bits: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even fp32 -> fp16 on the bit pattern (int64 tensor of uint32), finite inputs.

    Normals keep 10 mantissa bits (a carry into the exponent is the correct rounding); magnitudes below
    2**-14 become half subnormals in units of 2**-24; 65520 and above overflow to infinity.
    """
    sign = (bits >> 16) & 0x8000
    a = bits & 0x7FFFFFFF
    exponent = a >> 23

    normal = ((exponent - 112) << 10) | ((a >> 13) & 0x3FF)
    rem = a & 0x1FFF
    normal = normal + ((rem > 0x1000) | ((rem == 0x1000) & ((normal & 1) == 1))).to(torch.int64)

    shift = (126 - exponent).clamp(14, 24)
    mantissa = (a & 0x7FFFFF) | 0x800000
    quotient = mantissa >> shift
    rem = mantissa & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    subnormal = quotient + ((rem > half) | ((rem == half) & ((quotient & 1) == 1))).to(torch.int64)

    magnitude = torch.where(exponent >= 113, normal, torch.where(exponent >= 102, subnormal, 0))
    magnitude = torch.where(a >= 0x477FF000, 0x7C00, magnitude)
    return sign | magnitude


def _bits16_to(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # int64 in [0, 65536) -> int16 with the same bit pattern, then reinterpret as the half type.
    signed = bits - ((bits >> 15) & 1) * 65536
    return signed.to(torch.int16).view(dtype)


def _fill_projection_torch(out, seed, tag, fan_in, row_offset, col_offset):
    rows, cols = out.shape
    device = out.device
    first_group = col_offset >> 2
    n_groups = ((col_offset + cols - 1) >> 2) - first_group + 1
    groups = torch.arange(first_group, first_group + n_groups, dtype=torch.int64, device=device)
    row_ids = torch.arange(row_offset, row_offset + rows, dtype=torch.int64, device=device)
    counters = torch.stack(
        torch.broadcast_tensors(
            groups[None, :],
            row_ids[:, None],
            torch.tensor(tag, dtype=torch.int64, device=device),
            torch.tensor(0, dtype=torch.int64, device=device),
        ),
        dim=-1,
    )
    keys = torch.tensor([seed & _MASK32, seed >> 32], dtype=torch.int64, device=device)
    words = philox4x32_10_torch(counters, keys).reshape(rows, 4 * n_groups)
    start = col_offset - 4 * first_group
    words = words[:, start : start + cols]

    odd = 2 * (words >> 8) + 1 - (1 << 24)
    values = odd.to(torch.float32) * torch.tensor(projection_scale(fan_in), dtype=torch.float32)
    if out.dtype == torch.float32:
        out.copy_(values)
        return
    fp32_bits = values.view(torch.int32).to(torch.int64) & _MASK32
    to_half_bits = fp32_bits_to_bf16_bits if out.dtype == torch.bfloat16 else fp32_bits_to_fp16_bits
    out.copy_(_bits16_to(to_half_bits(fp32_bits), out.dtype))




# --------------------------------------------------------------------------------------------------
# Public entry points.


def _check_tag(tag) -> int:
    if tag not in (TAG_A, TAG_B):
        raise ValueError(f"tag must be {TAG_A} (A) or {TAG_B} (B), got {tag!r}")
    return tag


def projection_block(
    seed: int,
    tag: int,
    rows: int,
    cols: int,
    fan_in: int,
    *,
    row_offset: int = 0,
    col_offset: int = 0,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    backend: str = "auto",
) -> torch.Tensor:
    """Rows [row_offset, row_offset + rows) x cols [col_offset, col_offset + cols) of A (tag 0) or B (tag 1).

    ``fan_in`` sets the scale: ``max_in`` for A, ``rank`` for B (PEFT's convention).
    """
    check_seed(seed)
    _check_tag(tag)
    for name, value in (("rows", rows), ("cols", cols), ("fan_in", fan_in)):
        check_positive_int(name, value)
    for name, value in (("row_offset", row_offset), ("col_offset", col_offset)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if row_offset + rows > MAX_ROWS or col_offset + cols > MAX_COLS:
        raise ValueError("the scheme addresses rows < 2**32 and cols < 2**34; the block reaches past that")
    check_dtype(dtype)
    device = torch.device(device)
    fill = dispatch.lookup("fill_projection_", backend, device)
    out = torch.empty(rows, cols, dtype=dtype, device=device)
    fill(out, seed, tag, fan_in, row_offset, col_offset)
    return out


def generate_projections(
    seed: int,
    rank: int,
    max_in: int,
    max_out: int,
    *,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared pair ``A`` (rank x max_in, fan_in = max_in) and ``B`` (max_out x rank, fan_in = rank).

    Bit-identical on every backend; ``backend`` is one of ``"auto"``, ``"torch"``, ``"triton"``,
    ``"cpu"``, ``"cuda"`` (see :func:`vera_kernels.backends`). Layers of in < max_in or out < max_out
    use the slices ``A[:, :in]`` and ``B[:out, :]``.
    """
    check_seed(seed)
    check_positive_int("rank", rank)
    check_positive_int("max_in", max_in)
    check_positive_int("max_out", max_out)
    common = dict(dtype=dtype, device=device, backend=backend)
    A = projection_block(seed, TAG_A, rank, max_in, max_in, **common)
    B = projection_block(seed, TAG_B, max_out, rank, rank, **common)
    return A, B


# Least recently used first. Bounded: a process that cycles through seeds or sizes (a sweep, a server
# loading many models) would otherwise keep every pair it ever made. Layers hold their own pair, so an
# evicted pair stays alive as long as a layer uses it; eviction only ends the sharing with later callers.
CACHE_ENTRIES = 16
_cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
# The pairs' blocks, each generated once: pairs that differ in one slice share the other's tensor (the
# colwise layers of a tensor-parallel rank: each its own rows of B, all the same A).
_blocks: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_cache_lock = threading.Lock()


def _cached_block(key: tuple, make) -> torch.Tensor:
    """The cached block for key, made by make() on a miss; call under _cache_lock."""
    block = _blocks.get(key)
    if block is None:
        block = _blocks[key] = make()
        while len(_blocks) > 2 * CACHE_ENTRIES:
            _blocks.popitem(last=False)
    else:
        _blocks.move_to_end(key)
    return block


def get_projections(
    seed: int, rank: int, max_in: int, max_out: int, *, dtype=torch.float32, device="cpu",
    in_features: int | None = None, out_features: int | None = None, in_offset: int = 0, out_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached pair for (seed, rank, max_in, max_out, device, dtype): every layer of a model shares it.

    ``in_features``/``out_features`` (default max_in/max_out): generate only ``A_max[:, :in_features]`` and
    ``B_max[:out_features]``, the widest slices the layers use. The values are those of the full pair (its
    scale follows max_in), without the memory of columns and rows no layer reads.

    ``in_offset``/``out_offset`` (default 0): start the slices there instead, ``A_max[:, in_offset:in_offset +
    in_features]`` and ``B_max[out_offset:out_offset + out_features]`` (a tensor-parallel rank's shard; the
    widths then default to the rest of the pair).

    The tensors are shared: treat them as read-only.
    """
    # Checked on every call, not only when generating: a cache hit must not accept what a miss refuses.
    check_seed(seed)
    check_positive_int("rank", rank)
    check_positive_int("max_in", max_in)
    check_positive_int("max_out", max_out)
    check_dtype(dtype)
    for name, value, limit in (("in_offset", in_offset, max_in), ("out_offset", out_offset, max_out)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
            bound = "max_in" if name == "in_offset" else "max_out"
            raise ValueError(f"{name} must be an int in [0, {bound} = {limit}), got {value!r}")
    in_features = max_in - in_offset if in_features is None else in_features
    out_features = max_out - out_offset if out_features is None else out_features
    for name, value, offset, limit in (("in_features", in_features, in_offset, max_in),
                                       ("out_features", out_features, out_offset, max_out)):
        check_positive_int(name, value)
        if offset + value > limit:
            bound = "max_in" if name == "in_features" else "max_out"
            raise ValueError(f"{name} must be <= {bound} = {limit} minus its offset {offset} (a slice of the full "
                             f"pair), got {value}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (seed, rank, max_in, max_out, in_offset, in_features, out_offset, out_features, device, dtype)
    with _cache_lock:
        pair = _cache.get(key)
        if pair is None:
            common = dict(dtype=dtype, device=device)
            # A's values depend on max_in (its scale), B's on nothing but the rank: neither on the other's size.
            pair = (_cached_block((TAG_A, seed, rank, max_in, in_offset, in_features, device, dtype), lambda: (
                        projection_block(seed, TAG_A, rank, in_features, max_in, col_offset=in_offset, **common))),
                    _cached_block((TAG_B, seed, rank, out_offset, out_features, device, dtype), lambda: (
                        projection_block(seed, TAG_B, out_features, rank, rank, row_offset=out_offset, **common))))
            _cache[key] = pair
            while len(_cache) > CACHE_ENTRIES:
                _cache.popitem(last=False)
        else:
            _cache.move_to_end(key)
    return pair


def clear_projection_cache() -> None:
    with _cache_lock:
        _cache.clear()
        _blocks.clear()
