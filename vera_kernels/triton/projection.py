"""Triton kernels for the projection scheme (docs/DESIGN.md section 3); the in-kernel helpers are reused by
kernels that generate A/B tiles on the fly."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import Config

from ..projections import projection_scale
from . import autotune

_OUT_FP32, _OUT_BF16, _OUT_FP16 = 0, 1, 2
_OUT_KIND = {torch.float32: _OUT_FP32, torch.bfloat16: _OUT_BF16, torch.float16: _OUT_FP16}


@triton.jit
def fp32_to_bf16_bits(v):
    """Round to nearest even on the bit pattern: the interpreter's float->bf16 cast truncates."""
    bits = v.to(tl.uint32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)


@triton.jit
def fp32_to_fp16_bits(v):
    """Round to nearest even with integer operations: normals, half subnormals, overflow to inf."""
    bits = v.to(tl.uint32, bitcast=True)
    sign = (bits >> 16) & 0x8000
    a = bits & 0x7FFFFFFF
    exponent = (a >> 23).to(tl.int32)

    normal = (((exponent - 112) << 10).to(tl.uint32)) | ((a >> 13) & 0x3FF)
    rem = a & 0x1FFF
    normal += ((rem > 0x1000) | ((rem == 0x1000) & ((normal & 1) == 1))).to(tl.uint32)

    shift = tl.minimum(tl.maximum(126 - exponent, 14), 24).to(tl.uint32)
    mantissa = (a & 0x7FFFFF) | 0x800000
    quotient = mantissa >> shift
    rem = mantissa & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    subnormal = quotient + ((rem > half) | ((rem == half) & ((quotient & 1) == 1))).to(tl.uint32)

    magnitude = tl.where(exponent >= 113, normal, tl.where(exponent >= 102, subnormal, 0))
    magnitude = tl.where(a >= 0x477FF000, 0x7C00, magnitude)
    return (sign | magnitude).to(tl.uint16)


@triton.jit
def projection_tile(seed, tag, scale, row0, group0, BLOCK_ROWS: tl.constexpr, BLOCK_GROUPS: tl.constexpr):
    """fp32 elements of rows [row0, row0 + BLOCK_ROWS) x cols [4 group0, 4 (group0 + BLOCK_GROUPS)).

    One Philox call yields the four words of a column group; they are interleaved into columns."""
    rows = (row0 + tl.arange(0, BLOCK_ROWS)).to(tl.uint32)
    groups = (group0 + tl.arange(0, BLOCK_GROUPS)).to(tl.uint32)
    c0 = tl.broadcast_to(groups[None, :], (BLOCK_ROWS, BLOCK_GROUPS))
    c1 = tl.broadcast_to(rows[:, None], (BLOCK_ROWS, BLOCK_GROUPS))
    c3 = tl.full((BLOCK_ROWS, BLOCK_GROUPS), 0, tl.uint32)
    c2 = (c3 + tag).to(tl.uint32)
    o0, o1, o2, o3 = tl.philox(seed, c0, c1, c2, c3)
    # join(join(o0, o2), join(o1, o3))[r, g, k, j] is o(2k + j): flattening (k, j) gives o0..o3 in order.
    words = tl.join(tl.join(o0, o2), tl.join(o1, o3)).reshape(BLOCK_ROWS, 4 * BLOCK_GROUPS)
    odd = (2 * (words >> 8) + 1).to(tl.int32) - (1 << 24)
    return odd.to(tl.float32) * scale


@triton.jit
def _fill_projection_kernel(
    out_ptr, stride_row, stride_col, rows, cols, seed, tag, scale, row_offset, col_offset,
    OUT_KIND: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_GROUPS: tl.constexpr,
):
    pid_row = tl.program_id(0)
    pid_group = tl.program_id(1)
    row0 = row_offset + pid_row.to(tl.int64) * BLOCK_ROWS
    group0 = (col_offset >> 2) + pid_group.to(tl.int64) * BLOCK_GROUPS
    values = projection_tile(seed, tag, scale, row0, group0, BLOCK_ROWS, BLOCK_GROUPS)

    local_rows = row0 - row_offset + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    local_cols = 4 * group0 - col_offset + tl.arange(0, 4 * BLOCK_GROUPS).to(tl.int64)
    mask = (local_rows[:, None] < rows) & (local_cols[None, :] >= 0) & (local_cols[None, :] < cols)
    ptrs = out_ptr + local_rows[:, None] * stride_row + local_cols[None, :] * stride_col
    if OUT_KIND == 1:
        values = fp32_to_bf16_bits(values).to(tl.bfloat16, bitcast=True)
    elif OUT_KIND == 2:
        values = fp32_to_fp16_bits(values).to(tl.float16, bitcast=True)
    tl.store(ptrs, values, mask=mask)


@triton.jit
def _philox_kernel(counters_ptr, keys_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # Four named loads and stores, not comprehensions over tl.static_range: the compiler (unlike the
    # interpreter) accepts only tuple comprehensions, so a list comprehension fails to compile for a GPU.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    counters = counters_ptr + 4 * offs.to(tl.int64)
    c0 = tl.load(counters, mask=mask, other=0).to(tl.uint32)
    c1 = tl.load(counters + 1, mask=mask, other=0).to(tl.uint32)
    c2 = tl.load(counters + 2, mask=mask, other=0).to(tl.uint32)
    c3 = tl.load(counters + 3, mask=mask, other=0).to(tl.uint32)
    k0 = tl.load(keys_ptr + 2 * offs, mask=mask, other=0).to(tl.uint64)
    k1 = tl.load(keys_ptr + 2 * offs + 1, mask=mask, other=0).to(tl.uint64)
    o0, o1, o2, o3 = tl.philox((k1 << 32) | k0, c0, c1, c2, c3)
    out = out_ptr + 4 * offs.to(tl.int64)
    tl.store(out, o0.to(tl.int64), mask=mask)
    tl.store(out + 1, o1.to(tl.int64), mask=mask)
    tl.store(out + 2, o2.to(tl.int64), mask=mask)
    tl.store(out + 3, o3.to(tl.int64), mask=mask)


# Both kernels take their block sizes as arguments: launched with Triton's default warps and stages.
_FIXED = Config({}, num_warps=4, num_stages=3)


def interpreted() -> bool:
    return type(_fill_projection_kernel).__name__ == "InterpretedFunction"


def fill_projection_(out: torch.Tensor, seed: int, tag: int, fan_in: int, row_offset: int, col_offset: int) -> None:
    rows, cols = out.shape
    n_groups = ((col_offset + cols - 1) >> 2) - (col_offset >> 2) + 1
    if interpreted():
        # The interpreter pays per program, not per element: few programs, each no larger than the block.
        block_rows = min(64, triton.next_power_of_2(rows))
        block_groups = min(256, triton.next_power_of_2(n_groups))
    else:
        block_rows, block_groups = 16, 64
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(n_groups, block_groups))
    args = dict(
        out_ptr=out, stride_row=out.stride(0), stride_col=out.stride(1), rows=rows, cols=cols, seed=seed, tag=tag,
        scale=projection_scale(fan_in), row_offset=row_offset, col_offset=col_offset,
        OUT_KIND=_OUT_KIND[out.dtype], BLOCK_ROWS=block_rows, BLOCK_GROUPS=block_groups,
    )
    _launch(_fill_projection_kernel, grid, args, out.device)


def philox4x32_10(counters: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    counters = counters.to(torch.int64).contiguous()
    keys = keys.to(torch.int64).contiguous()
    n = counters.shape[0]
    out = torch.empty(n, 4, dtype=torch.int64, device=counters.device)
    block = 128
    args = dict(counters_ptr=counters, keys_ptr=keys, out_ptr=out, n=n, BLOCK=block)
    _launch(_philox_kernel, (triton.cdiv(n, block),), args, out.device)
    return out


def _launch(fn, grid, args, device):
    autotune.launch(fn.__name__, fn, grid, args, interpreted=interpreted(), device=device, config=_FIXED)
