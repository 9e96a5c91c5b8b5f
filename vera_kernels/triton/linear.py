"""The fused VeRA kernels (docs/DESIGN.md sections 2 and 4) and their host-side launchers.

Forward: two launches, the shrink and the GEMM, no M x out intermediate:
  _rank_gemm_kernel     s = x Aᵀ (M x r, saved for backward) and t = d ⊙ s (MODE_SHRINK). Split over K for
                        decode-sized M: fp32 partials, summed in split order by the tile's last program
                        to finish (a ticket counter), in the same launch.
  _fused_gemm_kernel    y = b ⊙ (t Bᵀ) + x W0ᵀ + bias in one fp32 accumulator: the r loop first, its sum
                        scaled by b (by the gathered b[ids] with many adapters: HAS_IDS), then the in loop
                        on top; pointer loads, or pipelined TMA loads (tensor descriptors, sm_90, 16-bit
                        dtypes, M > 32, 16-byte aligned rows); persistent grouped grid (one program per SM
                        walks the tiles); output written once (TMA variant: by TMA stores of two half-width
                        subtiles where y's rows are aligned). b is never folded into B: b ⊙ B summed ±inf
                        terms of both signs into NaN where b_j is infinite, and overflowed fp16.
Backward (g = dL/dy), every product a GEMM tile, every reduction over M in a fixed order:
  _rank_gemm_kernel     G = gᵀ s (out x r, K = M; MODE_G), split over M to fill the GPU; in the epilogue the
                        db partials Σ_j B[n, j] d[j] G[n, j] (db = Σ_m g ⊙ u with u = t Bᵀ, regrouped so u
                        is never formed) and the dd partials Σ_n b[n] B[n, j] G[n, j] (dd = Σ_m dt ⊙ s
                        regrouped: fp32 throughout); with a trained bias, dbias partials Σ_m g added from
                        the g tiles the loop loads (on the CUDA cores, beside the wgmma). Its split-0
                        programs store the fold b ⊙ B (rounded once) before their K loop.
  _rank_gemm_kernel     dt = g (b ⊙ B) (M x r, K = out; MODE_DT), the fold as the second operand straight
                        from memory: ds = d ⊙ dt stored in the epilogue.
  _sum_rows_kernel      the second stage of the reductions, in a fixed order: no atomics, same bits twice
  _fused_gemm_kernel    dx = [g | ds] · [W0 ; A] (the forward's kernel, operands by strides)

Projections: A and B are read from memory (the materialized pair, any strides: A_max[:, :in] works), or,
with ON_THE_FLY, each tile is generated from the seed by ``projection_tile`` and rounded to x's dtype as
the materialized pair is: both modes give the same bits.

Precision (reference.py's policy): GEMM operands in x's dtype, accumulation in fp32, one rounding when a
result is stored (t = d ⊙ s is stored in x's dtype, as the reference rounds it; b scales the fp32 sum
t Bᵀ, unrounded). The backward's dt = g (b ⊙ B) takes b ⊙ B rounded once to x's dtype (in fp16 it
overflows for |b| > 65504 / max|B|, ~4e5 at r = 256). db = Σ_j B d (gᵀ s) and dd = Σ_n b B (gᵀ s) take
d ⊙ s and b ⊙ B unrounded, in fp32: no rounding to x's dtype on their path but s's. fp32 inputs use IEEE
fp32 dots.

Interpreter (TRITON_INTERPRET=1) work-arounds, selected by the constexpr INTERPRET so the GPU code is
unchanged: bf16/fp16 dot operands are upcast to fp32 (exact), and fp32 -> bf16/fp16 roundings go through
integer round-to-nearest-even, because the interpreter's casts truncate.

Offsets: row indices are widened to int64 before they are multiplied by a stride.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import triton
import triton.language as tl

from .. import buffers
from ..buffers import new_output
from ..projections import TAG_A, TAG_B, projection_scale
from . import autotune
from .projection import _OUT_KIND, fp32_to_bf16_bits, fp32_to_fp16_bits, interpreted, projection_tile

try:  # host-side tensor descriptors (TMA); Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the pointer variant only
    TensorDescriptor = None

MODE_SHRINK, MODE_DT, MODE_G = 0, 1, 2


@triton.jit
def _round_to(v, OUT_KIND: tl.constexpr, INTERPRET: tl.constexpr):
    """An fp32 tile in the storage dtype (0 fp32, 1 bf16, 2 fp16), rounded to nearest even."""
    if OUT_KIND == 1:
        if INTERPRET:
            r = fp32_to_bf16_bits(v).to(tl.bfloat16, bitcast=True)
        else:
            r = v.to(tl.bfloat16)
    elif OUT_KIND == 2:
        if INTERPRET:
            r = fp32_to_fp16_bits(v).to(tl.float16, bitcast=True)
        else:
            r = v.to(tl.float16)
    else:
        r = v
    return r


@triton.jit
def _dot(a, b, acc, INTERPRET: tl.constexpr, IEEE: tl.constexpr):
    if INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _generated_tile(seed, tag, proj_scale, k0, n0, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                    ROW_IS_N: tl.constexpr, OUT_KIND: tl.constexpr, INTERPRET: tl.constexpr):
    """[BLOCK_K, BLOCK_N] tile at (k0, n0) of a projection generated from the seed, in the storage dtype.
    ROW_IS_N: the matrix's rows run along n (B used as Bᵀ, or A in the shrink), else along k.

    Elements outside the matrix are not masked: every value is finite and the other operand is zero
    there along k, and outside along m or n nothing is stored."""
    if ROW_IS_N:
        v = tl.trans(projection_tile(seed, tag, proj_scale, n0, k0 // 4, BLOCK_N, BLOCK_K // 4))
    else:
        v = projection_tile(seed, tag, proj_scale, k0, n0 // 4, BLOCK_K, BLOCK_N // 4)
    return _round_to(v, OUT_KIND, INTERPRET)


@triton.jit
def _k_loop(acc, a_ptr, stride_am, stride_ak, p_ptr, stride_pk, stride_pn, k_begin, k_end, m0, n0, M, N,
            seed, tag, proj_scale, GENERATE_P: tl.constexpr, P_ROW_IS_N: tl.constexpr,
            OUT_KIND: tl.constexpr, INTERPRET: tl.constexpr, IEEE: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += a[m0:m0+BLOCK_M, k_begin:k_end] @ p[k_begin:k_end, n0:n0+BLOCK_N], a and p by strides, or p
    generated from the seed (GENERATE_P; p_ptr None)."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + (k_begin + offs_k)[None, :].to(tl.int64) * stride_ak
    if not GENERATE_P:
        p_ptrs = p_ptr + (k_begin + offs_k)[:, None].to(tl.int64) * stride_pk + offs_n[None, :].to(tl.int64) * stride_pn
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_ok = offs_k < k_end - k0
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
        if GENERATE_P:
            p = _generated_tile(seed, tag, proj_scale, k0, n0, BLOCK_K, BLOCK_N, P_ROW_IS_N, OUT_KIND, INTERPRET)
        else:
            p = tl.load(p_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
            p_ptrs += BLOCK_K * stride_pk
        acc = _dot(a, p, acc, INTERPRET, IEEE)
        a_ptrs += BLOCK_K * stride_ak
    return acc


@triton.jit
def _k_loop_two_sources(acc, x_ptr, stride_xm, stride_xk, w_ptr, stride_wk, stride_wn, K_BASE,
                        t_ptr, stride_tm, stride_tk, p_ptr, stride_pk, stride_pn, K_ADAPTER, m0, n0, M, N,
                        OUT_KIND: tl.constexpr, INTERPRET: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += [x | t] @ [w ; p] in ONE loop over the K blocks of in and then of r: each step picks its
    source with scalar selects, so the loads stay unconditional and the software pipeline runs through the
    switch from the base to the adapter operands without draining."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m[:, None].to(tl.int64)
    cols = offs_n[None, :].to(tl.int64)
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[None, :] < N
    base_steps = tl.cdiv(K_BASE, BLOCK_K)
    for step in range(0, base_steps + tl.cdiv(K_ADAPTER, BLOCK_K)):
        is_base = step < base_steps
        k0 = tl.where(is_base, step, step - base_steps) * BLOCK_K
        k_left = tl.where(is_base, K_BASE, K_ADAPTER) - k0
        a_base = tl.where(is_base, x_ptr, t_ptr)
        p_base = tl.where(is_base, w_ptr, p_ptr)
        kk = (k0 + offs_k).to(tl.int64)
        a = tl.load(a_base + rows * tl.where(is_base, stride_xm, stride_tm) + kk[None, :] * tl.where(is_base, stride_xk, stride_tk),
                    mask=m_ok & (offs_k[None, :] < k_left), other=0.0)
        p = tl.load(p_base + kk[:, None] * tl.where(is_base, stride_wk, stride_pk) + cols * tl.where(is_base, stride_wn, stride_pn),
                    mask=(offs_k[:, None] < k_left) & n_ok, other=0.0)
        acc = _dot(a, p, acc, INTERPRET, IEEE)
    return acc


@triton.jit
def _k_loop_tma(acc, a_desc, p_desc, K, m0, n0, P_IS_NK: tl.constexpr, INTERPRET: tl.constexpr,
                IEEE: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += a[m0:, :K] @ p[:K, n0:] with tensor-descriptor (TMA) loads; the hardware fills out-of-bounds
    elements with zeros, so no masks. P_IS_NK: p is stored as its transpose (N x K rows, W0 or B)."""
    for k0 in range(0, K, BLOCK_K):
        a = a_desc.load([m0, k0])
        if P_IS_NK:
            p = tl.trans(p_desc.load([n0, k0]))
        else:
            p = p_desc.load([k0, n0])
        acc = _dot(a, p, acc, INTERPRET, IEEE)
    return acc


@triton.jit
def _fused_gemm_kernel(
    out_ptr, stride_om, stride_on, out_desc,
    x_ptr, stride_xm, stride_xk, w_ptr, stride_wk, stride_wn, x_desc, w_desc,
    t_ptr, stride_tm, stride_tk, p_ptr, stride_pk, stride_pn, t_desc, p_desc,
    scale_ptr, stride_scale, stride_scale_bank, ids_ptr, stride_ids,
    bias_ptr, stride_bias, base_ptr, stride_basem, stride_basen,
    M, N, K_BASE, K_ADAPTER, seed, proj_scale, M_BUCKET,
    HAS_BASE_GEMM: tl.constexpr, SCALE_R: tl.constexpr, HAS_IDS: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_BASE_OUT: tl.constexpr, ON_THE_FLY: tl.constexpr, PROJ_TAG: tl.constexpr, PROJ_ROW_IS_N: tl.constexpr,
    USE_TMA: tl.constexpr, TMA_STORE: tl.constexpr, P_IS_NK: tl.constexpr, OUT_KIND: tl.constexpr,
    INTERPRET: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out = [x | t] · [w ; p] (+ bias, + base), one fp32 accumulator per tile, the output written once.

    Forward (SCALE_R): b ⊙ (t Bᵀ) and then x W0ᵀ on top: p = Bᵀ (stored or generated), the r part runs
    first so that b multiplies the rank sum alone, as the formula does. HAS_IDS (many adapters): scale is
    a bank (adapters x out, row stride stride_scale_bank) and row m takes row ids[m] of it (-1: 0).
    dx: g W0 and ds A (no scale). vera_delta: no base GEMM, base_out added in the epilogue.

    Persistent: the grid has at most one program per SM; program p takes tiles p, p + programs, ... in
    grouped order (GROUP_M row blocks share each column block's operand tiles while they are in L2). The
    tile loop is a plain range: ``tl.range(..., flatten=True)`` compiles to the same SASS (Triton 3.9,
    sm_90a, the TMA variant: its two inner loops are not flattened)."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    for tile in range(tl.program_id(0), num_m * num_n, tl.num_programs(0)):
        first_m = (tile // per_group) * GROUP_M
        group_rows = min(num_m - first_m, GROUP_M)
        m0 = (first_m + (tile % per_group) % group_rows) * BLOCK_M
        n0 = ((tile % per_group) // group_rows) * BLOCK_N
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if SCALE_R:
            # The forward: the r part alone first, u = t Bᵀ, scaled by b (or, with ids, by each row's b[ids])
            # as the formula scales it, after the rank sum: an infinite b_j gives ±inf (NaN where u_j = 0), not
            # NaN from ±inf terms of both signs, and b ⊙ B is never rounded to x's dtype (fp16 overflows it).
            # The in part then accumulates on top. The scale makes the two loops drain between them.
            if USE_TMA:
                acc = _k_loop_tma(acc, t_desc, p_desc, K_ADAPTER, m0, n0, P_IS_NK, INTERPRET, IEEE, BLOCK_K)
            else:
                acc = _k_loop(acc, t_ptr, stride_tm, stride_tk, p_ptr, stride_pk, stride_pn, 0, K_ADAPTER, m0, n0,
                              M, N, seed, PROJ_TAG, proj_scale, ON_THE_FLY, PROJ_ROW_IS_N,
                              OUT_KIND, INTERPRET, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
            if HAS_IDS:
                ids = tl.load(ids_ptr + offs_m.to(tl.int64) * stride_ids, mask=offs_m < M, other=-1)
                scale = tl.load(scale_ptr + ids[:, None] * stride_scale_bank + offs_n[None, :] * stride_scale,
                                mask=(ids[:, None] >= 0) & n_ok[None, :], other=0.0).to(tl.float32)
                acc = acc * scale
            else:
                acc = acc * tl.load(scale_ptr + offs_n * stride_scale, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_BASE_GEMM:
                if USE_TMA:
                    acc = _k_loop_tma(acc, x_desc, w_desc, K_BASE, m0, n0, P_IS_NK, INTERPRET, IEEE, BLOCK_K)
                else:
                    acc = _k_loop(acc, x_ptr, stride_xm, stride_xk, w_ptr, stride_wk, stride_wn, 0, K_BASE, m0, n0,
                                  M, N, seed, PROJ_TAG, proj_scale, False, False,
                                  OUT_KIND, INTERPRET, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
        elif USE_TMA:
            # dx. Two pipelined loops (wgmma wait depth 1 each, a drain between them: sass.py): Triton does not
            # pipeline descriptor loads under a branch, so one loop over [in | r] that picks its descriptors
            # per step compiles to wgmma waiting to depth 0 every step (checked in the SASS for sm_90a,
            # Triton 3.9, 128x256x64 bf16), worse than one drain per tile.
            if HAS_BASE_GEMM:
                acc = _k_loop_tma(acc, x_desc, w_desc, K_BASE, m0, n0, P_IS_NK, INTERPRET, IEEE, BLOCK_K)
            acc = _k_loop_tma(acc, t_desc, p_desc, K_ADAPTER, m0, n0, P_IS_NK, INTERPRET, IEEE, BLOCK_K)
        elif HAS_BASE_GEMM and not ON_THE_FLY:
            acc = _k_loop_two_sources(acc, x_ptr, stride_xm, stride_xk, w_ptr, stride_wk, stride_wn, K_BASE,
                                      t_ptr, stride_tm, stride_tk, p_ptr, stride_pk, stride_pn, K_ADAPTER,
                                      m0, n0, M, N, OUT_KIND, INTERPRET, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            if HAS_BASE_GEMM:
                acc = _k_loop(acc, x_ptr, stride_xm, stride_xk, w_ptr, stride_wk, stride_wn, 0, K_BASE, m0, n0,
                              M, N, seed, PROJ_TAG, proj_scale, False, False,
                              OUT_KIND, INTERPRET, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
            acc = _k_loop(acc, t_ptr, stride_tm, stride_tk, p_ptr, stride_pk, stride_pn, 0, K_ADAPTER, m0, n0, M, N,
                          seed, PROJ_TAG, proj_scale, ON_THE_FLY, PROJ_ROW_IS_N,
                          OUT_KIND, INTERPRET, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n * stride_bias, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        rows = offs_m[:, None].to(tl.int64)
        mask = (offs_m[:, None] < M) & n_ok[None, :]
        if HAS_BASE_OUT:
            acc += tl.load(base_ptr + rows * stride_basem + offs_n[None, :] * stride_basen, mask=mask, other=0.0).to(tl.float32)
        if TMA_STORE:
            # TMA store (the hardware clips the tile at the tensor's edges), in two half-width subtiles:
            # half the shared-memory staging, and the first copy runs while the second half converts.
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            left, right = tl.split(halves)
            out_desc.store([m0, n0], _round_to(left, OUT_KIND, INTERPRET))
            out_desc.store([m0, n0 + BLOCK_N // 2], _round_to(right, OUT_KIND, INTERPRET))
        else:
            tl.store(out_ptr + rows * stride_om + offs_n[None, :] * stride_on, _round_to(acc, OUT_KIND, INTERPRET),
                     mask=mask)


@triton.jit
def _b_tile(b_mat_ptr, stride_bn, stride_br, m0, r0, M, R, seed, proj_scale, ON_THE_FLY: tl.constexpr,
            OUT_KIND: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """B[m0:m0+BLOCK_M, r0:r0+BLOCK_R] in fp32 (0 outside B): loaded, or generated and rounded to the
    storage dtype as the materialized pair is (the same bits either way)."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    mask = (offs_m[:, None] < M) & (offs_r[None, :] < R)
    if ON_THE_FLY:
        tile = _round_to(projection_tile(seed, 1, proj_scale, m0, r0 // 4, BLOCK_M, BLOCK_R // 4), OUT_KIND, INTERPRET)
        tile = tl.where(mask, tile.to(tl.float32), 0.0)
    else:
        tile = tl.load(b_mat_ptr + offs_m[:, None].to(tl.int64) * stride_bn + offs_r[None, :] * stride_br, mask=mask,
                       other=0.0).to(tl.float32)
    return tile


@triton.jit
def _rank_epilogue(acc, m0, r0, split, M, R,
                   d_ptr, stride_d, stride_d_bank, ids_ptr, stride_ids, s_ptr, stride_sm, stride_sr,
                   t_ptr, stride_tm, stride_tr, red_ptr, red2_ptr, b_mat_ptr, stride_bn, stride_br, lb_ptr, stride_lb,
                   seed, proj_scale,
                   MODE: tl.constexpr, HAS_IDS: tl.constexpr, ON_THE_FLY: tl.constexpr,
                   OUT_KIND: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """What a rank GEMM does with its finished fp32 tile acc (rows m0.., ranks r0..) of K split ``split``:
    MODE_SHRINK  s = round(acc) stored (not with ids), t = round(d ⊙ s) stored (d gathered per row with ids)
    MODE_DT      (acc = dt) ds = round(d ⊙ dt) stored into t
    MODE_G       (acc = G, rows n = out)
                 red[split * ranks blocks + rank block, n] = Σ_j B[n, j] G[n, j] d[j]      (db partials)
                 red2[split * row blocks + row block, j] = Σ_n B[n, j] G[n, j] b[n]        (dd partials)"""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    r_ok = offs_r < R
    mask = m_ok[:, None] & r_ok[None, :]
    rows = offs_m[:, None].to(tl.int64)
    if MODE == 0:
        s = _round_to(acc, OUT_KIND, INTERPRET)
        if HAS_IDS:
            ids = tl.load(ids_ptr + offs_m.to(tl.int64) * stride_ids, mask=m_ok, other=-1)
            d = tl.load(d_ptr + ids[:, None] * stride_d_bank + offs_r[None, :] * stride_d,
                        mask=mask & (ids[:, None] >= 0), other=0.0).to(tl.float32)
            t = _round_to(s.to(tl.float32) * d, OUT_KIND, INTERPRET)
        else:
            d = tl.load(d_ptr + offs_r * stride_d, mask=r_ok, other=0.0).to(tl.float32)
            t = _round_to(s.to(tl.float32) * d[None, :], OUT_KIND, INTERPRET)
            tl.store(s_ptr + rows * stride_sm + offs_r[None, :] * stride_sr, s, mask=mask)
        tl.store(t_ptr + rows * stride_tm + offs_r[None, :] * stride_tr, t, mask=mask)
    elif MODE == 1:
        d = tl.load(d_ptr + offs_r * stride_d, mask=r_ok, other=0.0).to(tl.float32)
        tl.store(t_ptr + rows * stride_tm + offs_r[None, :] * stride_tr, _round_to(acc * d[None, :], OUT_KIND, INTERPRET), mask=mask)
    else:
        d = tl.load(d_ptr + offs_r * stride_d, mask=r_ok, other=0.0).to(tl.float32)
        lb = tl.load(lb_ptr + offs_m * stride_lb, mask=m_ok, other=0.0).to(tl.float32)
        bg = acc * _b_tile(b_mat_ptr, stride_bn, stride_br, m0, r0, M, R, seed, proj_scale, ON_THE_FLY, OUT_KIND,
                           INTERPRET, BLOCK_M, BLOCK_R)
        db_slot = split * tl.cdiv(R, BLOCK_R) + r0 // BLOCK_R
        dd_slot = split * tl.cdiv(M, BLOCK_M) + m0 // BLOCK_M
        tl.store(red_ptr + db_slot.to(tl.int64) * M + offs_m, tl.sum(bg * d[None, :], axis=1), mask=m_ok)
        tl.store(red2_ptr + dd_slot.to(tl.int64) * R + offs_r, tl.sum(bg * lb[:, None], axis=0), mask=r_ok)


@triton.jit
def _rank_gemm_kernel(
    a_ptr, stride_am, stride_ak, p_ptr, stride_pk, stride_pr, part_ptr, count_ptr,
    d_ptr, stride_d, stride_d_bank, ids_ptr, stride_ids, s_ptr, stride_sm, stride_sr, t_ptr, stride_tm, stride_tr,
    red_ptr, red2_ptr, b_mat_ptr, stride_bn, stride_br, lb_ptr, stride_lb, colsum_ptr,
    M, R, K, K_SPLIT, seed, tag, proj_scale, M_BUCKET,
    MODE: tl.constexpr, SPLIT: tl.constexpr, GENERATE_P: tl.constexpr, P_ROW_IS_R: tl.constexpr,
    HAS_IDS: tl.constexpr, DBIAS: tl.constexpr, ON_THE_FLY: tl.constexpr,
    OUT_KIND: tl.constexpr, INTERPRET: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc[m, j] = Σ_k a[m, k] p[k, j] over this program's K range, then _rank_epilogue. SPLIT (MODE_SHRINK,
    MODE_DT): the fp32 partial goes to part[split, m, j], and the last of the tile's programs to finish (a
    ticket counter per tile, count[pid], 0 between launches) sums them in split order and runs the
    epilogue. The GEMMs whose N is the rank r:
      MODE_SHRINK  a = x, p = Aᵀ (generated: GENERATE_P)              -> s, t
      MODE_G       a = gᵀ, p = s                                    -> db and dd partials, the fold b ⊙ B;
                                                                       with DBIAS, dbias partials
                                                                       colsum[split, n] = Σ_m g
      MODE_DT      a = g, p = b ⊙ B (the fold MODE_G wrote)          -> ds
    Both operands come straight from memory into the tensor cores' shared-memory tiles (nothing scaled in
    registers in the loop: wgmma keeps a group in flight, the static check's pipeline rule).
    Program (i, j) of axis 0 owns rows block i and ranks block j (j fastest: the programs that read the
    same rows of a run together); axis 1 is the K split."""
    num_r = tl.cdiv(R, BLOCK_R)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    m0 = (pid // num_r) * BLOCK_M
    r0 = (pid % num_r) * BLOCK_R
    k_begin = split * K_SPLIT
    k_end = min(K, k_begin + K_SPLIT)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if MODE == 2:
        if split == 0:
            # The fold b ⊙ B (fp32, rounded once) into t for dt's GEMM: it needs nothing of G, so it is
            # stored before the K loop, not beside the accumulator in the epilogue (which then spilled).
            offs_m = m0 + tl.arange(0, BLOCK_M)
            offs_r = r0 + tl.arange(0, BLOCK_R)
            lb = tl.load(lb_ptr + offs_m * stride_lb, mask=offs_m < M, other=0.0).to(tl.float32)
            folded = _b_tile(b_mat_ptr, stride_bn, stride_br, m0, r0, M, R, seed, proj_scale, ON_THE_FLY, OUT_KIND,
                             INTERPRET, BLOCK_M, BLOCK_R) * lb[:, None]
            tl.store(t_ptr + offs_m[:, None].to(tl.int64) * stride_tm + offs_r[None, :] * stride_tr,
                     _round_to(folded, OUT_KIND, INTERPRET), mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))
    if DBIAS:
        # MODE_G with a trained bias: dbias = Σ_m g, the row sums of a = gᵀ, taken from the tiles the K loop
        # loads anyway (not a ones column in p: that widened the GEMM by a rank block). Added elementwise
        # in fp32 per K step (no reduction across threads inside the loop), summed across the row once
        # after it; every rank block's programs add (no branch in the loop), rank block 0's store.
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_r = r0 + tl.arange(0, BLOCK_R)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + (k_begin + offs_k)[None, :].to(tl.int64) * stride_ak
        p_ptrs = p_ptr + (k_begin + offs_k)[:, None].to(tl.int64) * stride_pk + offs_r[None, :].to(tl.int64) * stride_pr
        a_sum = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            k_ok = offs_k < k_end - k0
            a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
            p = tl.load(p_ptrs, mask=k_ok[:, None] & (offs_r[None, :] < R), other=0.0)
            acc = _dot(a, p, acc, INTERPRET, IEEE)
            a_sum += a.to(tl.float32)
            a_ptrs += BLOCK_K * stride_ak
            p_ptrs += BLOCK_K * stride_pk
        if r0 == 0:
            tl.store(colsum_ptr + split.to(tl.int64) * M + offs_m, tl.sum(a_sum, axis=1), mask=offs_m < M)
    else:
        acc = _k_loop(acc, a_ptr, stride_am, stride_ak, p_ptr, stride_pk, stride_pr, k_begin, k_end, m0, r0, M, R,
                      seed, tag, proj_scale, GENERATE_P, P_ROW_IS_R,
                      OUT_KIND, INTERPRET, IEEE, BLOCK_M, BLOCK_R, BLOCK_K)
    if SPLIT:
        # Last-program reduction: each split stores its fp32 partial and takes a ticket; the program that
        # takes the last one sums every split's partial in split order (so the bits do not depend on which
        # program arrives last), runs the epilogue and puts the counter back to 0 for the next launch.
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask = (offs_m[:, None] < M) & (offs_r[None, :] < R)
        tl.store(part_ptr + (split * M + offs_m)[:, None].to(tl.int64) * R + offs_r[None, :], acc, mask=mask)
        # Every thread's stores are made before the ticket is taken (a CTA barrier; the atomic's release at
        # GPU scope then publishes them), and the winner's reads come after its acquire.
        tl.debug_barrier()
        splits = tl.num_programs(1)
        ticket = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel", scope="gpu")
        tl.debug_barrier()
        if ticket == splits - 1:
            total = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for i in range(0, splits):
                rows = (i * M + offs_m)[:, None].to(tl.int64)
                # .cg: from L2, where the other SMs' partials are (never a stale line of this SM's L1).
                total += tl.load(part_ptr + rows * R + offs_r[None, :], mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(count_ptr + pid, 0)
            _rank_epilogue(total, m0, r0, 0, M, R, d_ptr, stride_d, stride_d_bank, ids_ptr, stride_ids,
                           s_ptr, stride_sm, stride_sr, t_ptr, stride_tm, stride_tr, red_ptr, red2_ptr, b_mat_ptr,
                           stride_bn, stride_br, lb_ptr, stride_lb, seed, proj_scale, MODE, HAS_IDS, ON_THE_FLY,
                           OUT_KIND, INTERPRET, BLOCK_M, BLOCK_R)
    else:
        _rank_epilogue(acc, m0, r0, split, M, R, d_ptr, stride_d, stride_d_bank, ids_ptr, stride_ids,
                       s_ptr, stride_sm, stride_sr, t_ptr, stride_tm, stride_tr, red_ptr, red2_ptr, b_mat_ptr, stride_bn,
                       stride_br, lb_ptr, stride_lb, seed, proj_scale, MODE, HAS_IDS, ON_THE_FLY, OUT_KIND, INTERPRET,
                       BLOCK_M, BLOCK_R)


@triton.jit
def _sum_rows_kernel(part_ptr, P, N, out_ptr, stride_out, OUT_KIND: tl.constexpr, INTERPRET: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[n] = Σ_p part[p, n] (part contiguous P x N, fp32), always in the same order."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = (p0 + offs_p)[:, None].to(tl.int64)
        tile = tl.load(part_ptr + rows * N + offs_n[None, :], mask=(rows < P) & (offs_n[None, :] < N), other=0.0)
        acc += tl.sum(tile, axis=0)
    tl.store(out_ptr + offs_n * stride_out, _round_to(acc, OUT_KIND, INTERPRET), mask=offs_n < N)


# ---------------------------------------------------------------------------------------------------
# Host side. A and B are None in on-the-fly mode: the kernels generate them from ``seed`` with the
# scheme's fan-ins, max_in for A and the rank for B (then A is A_max[:, :in] and B is B_max[:out, :]).

DECODE_M = 16  # up to this many rows: split-K shrink, several GEMM programs per SM
INTERPRETER_SMS = 3  # the "SM count" under the interpreter: small, so tests see split K and persistent loops
STATIC_SMS = 132  # what the static check's captured launches assume (an H100/H200)


def _flags(dtype: torch.dtype) -> dict:
    return dict(OUT_KIND=_OUT_KIND[dtype], INTERPRET=interpreted(), IEEE=dtype == torch.float32)


def _launch(kernel, fn, grid, args, device, config=None):
    """The one launcher of every kernel of this module (pinned, else ``config``, interpreter or autotuned)."""
    autotune.launch(kernel, fn, grid, args, interpreted=interpreted(), device=device, config=config)


def _strides(t: torch.Tensor | None, transpose: bool = False) -> tuple[int, int]:
    if t is None:  # generated on the fly: no memory operand
        return 0, 0
    return (t.stride(1), t.stride(0)) if transpose else (t.stride(0), t.stride(1))


_sm_counts: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Programs that fill the device: its SM count (INTERPRETER_SMS under the interpreter)."""
    if autotune.capturing():
        return STATIC_SMS
    if interpreted() or device.type != "cuda":
        return INTERPRETER_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


# Workspaces (split-K partials and their tickets, t): allocated once per (purpose, dtype, device, stream,
# thread) and grown when a call needs more, so a decode step allocates nothing but its outputs. Kernels on
# one stream run in the order they were enqueued and one thread enqueues a call's kernels together, so a
# buffer is never overwritten by another call before the kernels that read it have run.
#
# CUDA graphs. A captured graph keeps the addresses its kernels were given and replays them later, in
# between eager calls; so the cache must never hand a graph a buffer it may later free or give to another
# call (a larger M replaces a cached buffer: the old one is freed). The rule: while the stream captures,
# a call takes no cached workspace and leaves the cache alone; it allocates its own, which the caching
# allocator takes from the graph's private pool, and drops it at the end of the call like any temporary
# of a PyTorch op. Memory a capture frees stays reserved for its graph: only later allocations of the same
# capture (which the graph runs after this call's kernels, in capture order) or of captures that share its
# pool (which torch requires to be replayed in capture order) can reuse it. No eager call, whatever its M,
# can then touch memory a graph reads. The cost is paid at capture time: a replay allocates nothing.
_workspaces: dict[tuple, torch.Tensor] = {}
_workspace_lock = threading.Lock()


def workspace(purpose: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer of ``numel`` elements for this call's kernels (see the rule above)."""
    if buffers.graph_capturing(device):
        if not dtype.is_floating_point:
            # Counters (the split rank GEMM's tickets) start at 0: the fill is captured and runs on every replay.
            return torch.zeros(max(numel, 1), dtype=dtype, device=device)[:numel]
        return new_output(max(numel, 1), dtype=dtype, device=device)[:numel]
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (purpose, dtype, str(device), stream, threading.get_ident())
    with _workspace_lock:
        buffer = _workspaces.get(key)
        if buffer is None or buffer.numel() < numel:
            # NaN-filled: an element a kernel forgets to write shows up in the results. Integer ones are
            # counters (the split rank GEMM's tickets): 0, which the kernels using them restore.
            fill = float("nan") if dtype.is_floating_point else 0
            buffer = torch.full((max(numel, 1),), fill, dtype=dtype, device=device)
            _workspaces[key] = buffer
        return buffer[:numel]


def _aligned_stride(cols: int, dtype: torch.dtype) -> int:
    """A row stride >= cols whose byte size is a multiple of 16 (a TMA requirement)."""
    per_16_bytes = 16 // torch.empty((), dtype=dtype).element_size()
    return -(-cols // per_16_bytes) * per_16_bytes


def tma_ok(*tensors) -> bool:
    """Whether tensor descriptors can address these 2-D tensors: last stride 1, rows that do not overlap
    (an expanded tensor's stride 0 is refused), the row stride and the base 16-byte aligned. The pointer
    variant serves every other case."""
    if TensorDescriptor is None:
        return False
    for t in tensors:
        if t is None or t.dim() != 2 or t.stride(1) != 1 or t.shape[0] == 0 or t.shape[1] == 0:
            return False
        if t.stride(0) < t.shape[1]:
            return False
        size = t.element_size()
        if t.data_ptr() % 16 or (t.stride(0) * size) % 16:
            return False
    return True


# None: tensor descriptors on sm_90+ (and under the interpreter) when tma_ok; True/False forces the choice
# (the static check compiles both variants; tests compare them; the GPU benchmark times both).
FORCE_TMA: bool | None = None


@contextlib.contextmanager
def forced_tma(tma: bool | None):
    """Within this block the fused GEMM takes tensor descriptors (True, where tma_ok) or pointers (False)."""
    global FORCE_TMA
    previous, FORCE_TMA = FORCE_TMA, tma
    try:
        yield
    finally:
        FORCE_TMA = previous


def _tma_capable(device: torch.device) -> bool:
    if FORCE_TMA is not None:
        return FORCE_TMA and TensorDescriptor is not None
    if interpreted():
        return True  # the interpreter runs the descriptor variant too, so the tests cover it
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _descriptor(t: torch.Tensor | None):
    # block_shape is a placeholder: autotune.launch sets it from the config (a pre-launch hook).
    return None if t is None else TensorDescriptor(t, list(t.shape), list(t.stride()), [16, 16])


def rank_blocks(mode: int, m: int, r: int, on_the_fly: bool, ieee: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_R) of a rank GEMM: they fix the layout of its partial sums, so the host chooses them
    (autotuning varies BLOCK_K, warps and stages). ``m`` is the GEMM's row count (out for MODE_G); ``ieee``:
    fp32, whose FMA dots keep both operands' slices in registers: tiles of 32 x 64 at most, 16 x 64 for
    MODE_G (whose dbias row sums add a BLOCK_M x BLOCK_K fp32 tile; larger ones spilled in some variants,
    the static check)."""
    fixed = autotune.fixed_config("rank", interpreted())
    if fixed is not None:
        return fixed.kwargs["BLOCK_M"], fixed.kwargs["BLOCK_R"]
    # 64 ranks per block for decode-sized M too: twice the programs to split K over (reading A is the cost).
    narrow = on_the_fly or ieee or (mode != MODE_G and autotune.decode_sized(m))
    block_r = min(64 if narrow else 128, max(16, triton.next_power_of_2(r)))
    if mode == MODE_G:
        return 16 if ieee else 64 if on_the_fly else 128, block_r
    if autotune.decode_sized(m):
        # 16 rows up to M = 32 too: 32-row decode tiles keep 8-byte stack frames on sm_90a whatever the K
        # step and stages (the static check); the second row block reads A again, from L2.
        return 16, block_r
    return (32 if ieee else 64 if (m <= 1024 or on_the_fly) else 128), block_r


def split_k(tiles: int, k: int, device: torch.device, m_bucket: int) -> tuple[int, int]:
    """(splits, K per split) so that tiles x splits programs fill the device's SMs without exceeding them
    (the G GEMM's 128 x 128 tiles run one program per SM: 4096 / 128 x 2 tiles split 3 ways would be 1.45
    waves, the second one partial; 2 ways is 0.97 waves); K per split is a multiple of every BLOCK_K the
    kernel may use (its K ranges start on a block)."""
    fixed = autotune.fixed_config("rank", interpreted())
    granule = fixed.kwargs["BLOCK_K"] if fixed is not None else autotune.split_granule(m_bucket <= autotune.DECODE_BUCKET)
    sms = num_sms(device)
    if tiles * 2 > sms or k <= granule:
        return 1, max(k, 1)
    splits = min(sms // tiles, -(-k // granule))
    per_split = -(-(-(-k // splits)) // granule) * granule
    return -(-k // per_split), per_split


def _rank_gemm(mode, a, a_strides, p, p_strides, m, r, k, *, dtype, device, d, ids=None, s=None, t=None,
               red=None, red2=None, b_mat=None, lambda_b=None, colsum=None, generate=False, p_row_is_r=False, seed=0,
               tag=0, proj_scale=1.0, on_the_fly_b=False):
    """One rank GEMM (see _rank_gemm_kernel): one launch, split over K where that fills the GPU. MODE_G
    with ``colsum`` (splits x m, fp32) also writes the dbias partials there."""
    block_m, block_r = rank_blocks(mode, m, r, generate or on_the_fly_b, dtype == torch.float32)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(r, block_r)
    splits, k_split = split_k(tiles, k, device, autotune.m_bucket(m))
    split_partials = splits > 1 and mode != MODE_G
    part = workspace("rank", splits * m * r, torch.float32, device) if split_partials else None
    count = workspace("tickets", tiles, torch.int32, device) if split_partials else None
    epilogue = dict(
        d_ptr=d, stride_d=d.stride(-1), stride_d_bank=d.stride(0) if ids is not None else 0,
        ids_ptr=ids, stride_ids=0 if ids is None else ids.stride(0),
        s_ptr=s, stride_sm=0 if s is None else s.stride(0), stride_sr=0 if s is None else s.stride(1),
        t_ptr=t, stride_tm=0 if t is None else t.stride(0), stride_tr=0 if t is None else t.stride(1),
        red_ptr=red, red2_ptr=red2,
    )
    args = dict(
        a_ptr=a, stride_am=a_strides[0], stride_ak=a_strides[1], p_ptr=p, stride_pk=p_strides[0], stride_pr=p_strides[1],
        part_ptr=part, count_ptr=count,
        **epilogue,
        b_mat_ptr=b_mat, stride_bn=0 if b_mat is None else b_mat.stride(0), stride_br=0 if b_mat is None else b_mat.stride(1),
        lb_ptr=lambda_b, stride_lb=0 if lambda_b is None else lambda_b.stride(0), colsum_ptr=colsum,
        M=m, R=r, K=k, K_SPLIT=k_split, seed=seed, tag=tag, proj_scale=proj_scale,
        M_BUCKET=autotune.m_bucket(m), MODE=mode, SPLIT=split_partials, GENERATE_P=generate, P_ROW_IS_R=p_row_is_r,
        HAS_IDS=ids is not None, DBIAS=colsum is not None, ON_THE_FLY=on_the_fly_b,
        **_flags(dtype), BLOCK_M=block_m, BLOCK_R=block_r,
    )
    _launch("rank", _rank_gemm_kernel, lambda meta: (tiles, splits), args, device)
    return splits


def _shrink(x, A, lambda_d, seed, max_in, ids=None):
    """(s, t) with t in a workspace; with ids, lambda_d is the bank (N x r) and s is not computed (None)."""
    m, k = x.shape
    r = lambda_d.shape[-1]
    s = None if ids is not None else new_output(m, r, dtype=x.dtype, device=x.device)
    stride = _aligned_stride(r, x.dtype)
    t = workspace("t", m * stride, x.dtype, x.device).view(m, stride)[:, :r]
    _rank_gemm(MODE_SHRINK, x, _strides(x), A, _strides(A, transpose=True), m, r, k, dtype=x.dtype, device=x.device,
               d=lambda_d, ids=ids, s=s, t=t, generate=A is None, p_row_is_r=True, seed=seed, tag=TAG_A,
               proj_scale=projection_scale(max_in) if A is None else 1.0)
    return s, t


def _fused_gemm(out, t, proj, proj_strides, scale, x, w, w_strides, bias, base_out, *, k_adapter, k_base,
                seed, proj_scale, tag, row_is_n, ids=None, proj_is_nk=True):
    """out = [x | t] · [w ; proj] (+ bias, base_out); see _fused_gemm_kernel. ``proj_is_nk``: proj (and w)
    are stored N x K (the forward's W0 and B), else K x N (dx's W0 and A)."""
    m, n = out.shape
    device = out.device
    on_the_fly = proj is None
    # Descriptors address the tensors as stored: W0 and B are N x K in the forward, W0 and A K x N in dx.
    # fp32 takes IEEE dots (CUDA cores), where TMA gains nothing: descriptors for 16-bit dtypes only. Nor
    # for decode-sized M: its narrow tiles take mma.sync, not wgmma, and cp.async streams W0 as well; their
    # descriptor variants keep small stack frames (8-16 bytes, the static check).
    use_tma = (_tma_capable(device) and out.dtype != torch.float32 and not on_the_fly
               and not autotune.decode_sized(m) and tma_ok(t, proj, *((x, w) if x is not None else ())))
    # The output through TMA too where it can be addressed so (its rows 16-byte aligned: out a multiple of
    # 8 elements in 16-bit dtypes).
    tma_store = use_tma and tma_ok(out)
    args = dict(
        out_ptr=out, stride_om=out.stride(0), stride_on=out.stride(1), out_desc=_descriptor(out) if tma_store else None,
        x_ptr=x, stride_xm=0 if x is None else x.stride(0), stride_xk=0 if x is None else x.stride(1),
        w_ptr=w, stride_wk=w_strides[0], stride_wn=w_strides[1],
        x_desc=_descriptor(x) if use_tma else None, w_desc=_descriptor(w) if use_tma else None,
        t_ptr=t, stride_tm=t.stride(0), stride_tk=t.stride(1),
        p_ptr=proj, stride_pk=proj_strides[0], stride_pn=proj_strides[1],
        t_desc=_descriptor(t) if use_tma else None, p_desc=_descriptor(proj) if use_tma else None,
        scale_ptr=scale, stride_scale=0 if scale is None else scale.stride(-1),
        stride_scale_bank=0 if ids is None else scale.stride(0), ids_ptr=ids, stride_ids=0 if ids is None else ids.stride(0),
        bias_ptr=bias, stride_bias=0 if bias is None else bias.stride(0),
        base_ptr=base_out, stride_basem=0 if base_out is None else base_out.stride(0),
        stride_basen=0 if base_out is None else base_out.stride(1),
        M=m, N=n, K_BASE=k_base, K_ADAPTER=k_adapter, seed=seed, proj_scale=proj_scale, M_BUCKET=autotune.m_bucket(m),
        HAS_BASE_GEMM=x is not None, SCALE_R=scale is not None, HAS_IDS=ids is not None, HAS_BIAS=bias is not None,
        HAS_BASE_OUT=base_out is not None, ON_THE_FLY=on_the_fly, PROJ_TAG=tag, PROJ_ROW_IS_N=row_is_n,
        USE_TMA=use_tma, TMA_STORE=tma_store, P_IS_NK=proj_is_nk, **_flags(out.dtype),
    )
    # Persistent: one program per SM. Decode-sized M: tiles are small and many, several per SM, so the
    # hardware balances them (a persistent loop over 2 tiles would leave SMs idle in the second round).
    programs = num_sms(device) * (4 if m <= DECODE_M else 1)
    grid = lambda meta: (min(programs, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])),)  # noqa: E731
    _launch("gemm", _fused_gemm_kernel, grid, args, device)
    return use_tma


def _sum_rows(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    p, n = part.shape
    out = new_output(n, dtype=dtype, device=part.device)
    args = dict(part_ptr=part, P=p, N=n, out_ptr=out, stride_out=out.stride(0),
                OUT_KIND=_OUT_KIND[dtype], INTERPRET=interpreted())
    _launch("sum", _sum_rows_kernel, lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),), args, part.device)
    return out


def forward(x, weight, bias, A, B, lambda_d, lambda_b, base_out, seed: int, max_in: int):
    """(y, s): y = x W0ᵀ + bias + b ⊙ ((d ⊙ s) Bᵀ) (weight given) or base_out + b ⊙ ((d ⊙ s) Bᵀ), s = x Aᵀ.
    x is (M, in); A, B None: generated from seed."""
    m, k = x.shape
    r, n = lambda_d.shape[0], lambda_b.shape[0]
    if m == 0:
        return x.new_empty(0, n), x.new_empty(0, r)
    s, t = _shrink(x, A, lambda_d, seed, max_in)
    y = new_output(m, n, dtype=x.dtype, device=x.device)
    _fused_gemm(
        y, t, B, _strides(B, transpose=True), lambda_b, x if weight is not None else None, weight,
        _strides(weight, transpose=True), bias, base_out, k_adapter=r, k_base=k, seed=seed,
        proj_scale=projection_scale(r) if B is None else 1.0, tag=TAG_B, row_is_n=True,
    )
    return y, s


def forward_multi(x, weight, bias, A, B, bank_d, bank_b, ids, base_out):
    """Many adapters, inference only: y_m = x_m W0ᵀ + bias + b[a] ⊙ ((d[a] ⊙ (x_m Aᵀ)) Bᵀ), a = ids[m]
    (or base_out_m + ...), -1: no adapter term. d[ids] is gathered in the shrink's epilogue and b[ids] in
    the GEMM's, between its r part and its in part: nothing per adapter, no per-row copy of d or b."""
    m, k = x.shape
    r, n = bank_d.shape[1], bank_b.shape[1]
    if m == 0:
        return x.new_empty(0, n)
    _, t = _shrink(x, A, bank_d, 0, 0, ids=ids)
    y = new_output(m, n, dtype=x.dtype, device=x.device)
    _fused_gemm(
        y, t, B, _strides(B, transpose=True), bank_b, x if weight is not None else None, weight,
        _strides(weight, transpose=True), bias, base_out, k_adapter=r, k_base=k,
        seed=0, proj_scale=1.0, tag=TAG_B, row_is_n=True, ids=ids,
    )
    return y


def backward(g, s, weight, A, B, lambda_d, lambda_b, *, in_features: int, with_bias: bool, need_dx: bool,
             seed: int, max_in: int):
    """(dx or None, dd, db, dbias or None) from g = dL/dy (M, out) and the saved s alone."""
    m, n = g.shape
    r = s.shape[1]
    if m == 0:
        zeros = lambda size, dtype: torch.zeros(size, dtype=dtype, device=g.device)  # noqa: E731
        return (g.new_empty(0, in_features) if need_dx else None, zeros(r, lambda_d.dtype),
                zeros(n, lambda_b.dtype), zeros(n, g.dtype) if with_bias else None)
    dtype, device = g.dtype, g.device
    on_the_fly = B is None
    b_scale = projection_scale(r) if on_the_fly else 1.0

    # G = gᵀ s (out x r, K = M), split over M: in its epilogue the db partials Σ_j B[n, j] d[j] G[n, j], the dd
    # partials Σ_n b[n] B[n, j] G[n, j] (dd = Σ_m dt ⊙ s regrouped, all in fp32: no rounding on its path but
    # s's), with a trained bias the dbias partials Σ_m g from the g tiles its loop loads, and the fold
    # b ⊙ B rounded once to the dtype (split 0's programs; B generated on the fly is rounded to the dtype
    # first, as the materialized pair is, so both modes give the same bits).
    block_n, block_r = rank_blocks(MODE_G, n, r, on_the_fly, dtype == torch.float32)
    row_blocks, rank_blocks_g = triton.cdiv(n, block_n), triton.cdiv(r, block_r)
    splits, _ = split_k(row_blocks * rank_blocks_g, m, device, autotune.m_bucket(n))
    db_part = new_output(splits * rank_blocks_g, n, dtype=torch.float32, device=device)
    dd_part = new_output(splits * row_blocks, r, dtype=torch.float32, device=device)
    dbias_part = new_output(splits, n, dtype=torch.float32, device=device) if with_bias else None
    folded = workspace("folded B", n * _aligned_stride(r, dtype), dtype, device).view(n, -1)[:, :r]
    _rank_gemm(MODE_G, g, _strides(g, transpose=True), s, _strides(s), n, r, m, dtype=dtype, device=device,
               d=lambda_d, t=folded, red=db_part, red2=dd_part, b_mat=B, lambda_b=lambda_b, colsum=dbias_part,
               on_the_fly_b=on_the_fly, seed=seed, proj_scale=b_scale)
    db = _sum_rows(db_part, lambda_b.dtype)
    dd = _sum_rows(dd_part, lambda_d.dtype)
    dbias = _sum_rows(dbias_part, dtype) if with_bias else None

    # dt = g (b ⊙ B) (M x r, K = out) with the fold as the second operand: both tiles go from memory to the
    # tensor cores' shared memory untouched, so the K loop keeps a wgmma group in flight (scaling g's tiles
    # by b in registers made wgmma take them from registers and wait for itself every step). ds = d ⊙ dt
    # in the epilogue; dt feeds dx alone (dd comes from G above), where each row's error is its own sum:
    # rounding b ⊙ B (once per element, shared by every row) instead of g ⊙ b costs dx nothing, while for
    # dd, a sum over M, it made the error grow with √M where g and s are correlated across rows
    # (docs/DESIGN.md section 4).
    ds = new_output(m, _aligned_stride(r, dtype), dtype=dtype, device=device)[:, :r]
    _rank_gemm(MODE_DT, g, _strides(g), folded, _strides(folded), m, r, n, dtype=dtype, device=device, d=lambda_d,
               t=ds)

    dx = None
    if need_dx:
        dx = new_output(m, in_features, dtype=dtype, device=device)
        _fused_gemm(
            dx, ds, A, _strides(A), None, g if weight is not None else None, weight, _strides(weight), None, None,
            k_adapter=r, k_base=n, seed=seed, proj_scale=projection_scale(max_in) if A is None else 1.0,
            tag=TAG_A, row_is_n=False, proj_is_nk=False,
        )
    return dx, dd, db, dbias
