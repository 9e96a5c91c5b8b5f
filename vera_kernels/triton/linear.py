"""The fused VeRA kernels (docs/DESIGN.md sections 2 and 4) and their host-side launchers.

Forward, two launches, no M x out intermediate:
  _shrink_kernel            s = x Aᵀ (M x r, x's dtype, saved for backward) and t = d ⊙ s
  _two_source_gemm_kernel   y = b ⊙ (t Bᵀ) + x W0ᵀ + bias: the K loop runs over r (t, B) into the fp32
                            accumulator, which is then scaled by b per column, then over in (x, W0).
                            vera_delta: the base GEMM is off and base_out is added in the epilogue.
Backward:
  _backward_kernel          one pass over g per block of r: dt = (g ⊙ b) B, ds = d ⊙ dt, and per-program
                            partials of db = Σ_m g ⊙ u (u = t Bᵀ recomputed tile by tile), dd = Σ_m dt ⊙ s
                            and dbias = Σ_m g
  _sum_rows_kernel          the second stage of those reductions, in a fixed order: no atomics, so two
                            runs give the same bits
  _two_source_gemm_kernel   dx = ds A + g W0 (the forward's kernel; the operands transposed via strides)

Projections: A and B are read from memory (the materialized pair, any strides: A_max[:, :in] works), or,
with ON_THE_FLY, each tile is generated from the seed by ``projection_tile`` and rounded to x's dtype as
the materialized pair is, so both modes feed the tensor cores the same bits.

Precision (reference.py's policy): GEMM operands in x's dtype, accumulation and scaling in fp32, one
rounding when a result is stored. fp32 inputs use IEEE fp32 dots (not TF32), as torch does by default.

Interpreter (TRITON_INTERPRET=1) work-arounds, selected by the constexpr INTERPRET so the GPU code is
unchanged: bf16/fp16 dot operands are upcast to fp32 (exact: the products of bf16/fp16 numbers are
exact in fp32), and fp32 -> bf16/fp16 roundings go through integer round-to-nearest-even, because the
interpreter's casts truncate.

Offsets: row indices are widened to int64 before they are multiplied by a stride, so tensors beyond 2^31
elements are addressed correctly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import dispatch
from ..projections import TAG_A, TAG_B, projection_scale
from . import autotune
from .projection import _OUT_KIND, fp32_to_bf16_bits, fp32_to_fp16_bits, interpreted, projection_tile


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
def _accumulate(acc, a_ptr, stride_am, stride_ak, b_ptr, stride_bk, stride_bn, m0, n0, M, N, K,
                seed, tag, proj_scale, GENERATE_B: tl.constexpr, B_ROW_IS_N: tl.constexpr,
                OUT_KIND: tl.constexpr, INTERPRET: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += a[m0:m0+BLOCK_M, :K] @ b[:K, n0:n0+BLOCK_N], a (M x K) and b (K x N) given by strides, or b
    generated from the seed when GENERATE_B (b_ptr is then None)."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :].to(tl.int64) * stride_ak
    if not GENERATE_B:
        b_ptrs = b_ptr + offs_k[:, None].to(tl.int64) * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
        if GENERATE_B:
            b = _generated_tile(seed, tag, proj_scale, k0, n0, BLOCK_K, BLOCK_N, B_ROW_IS_N, OUT_KIND, INTERPRET)
        else:
            b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
            b_ptrs += BLOCK_K * stride_bk
        acc = _dot(a, b, acc, INTERPRET, IEEE)
        a_ptrs += BLOCK_K * stride_ak
    return acc


@triton.jit
def _shrink_kernel(
    x_ptr, stride_xm, stride_xk, a_ptr, stride_ar, stride_ak, d_ptr, stride_d,
    s_ptr, stride_sm, stride_sr, t_ptr, stride_tm, stride_tr,
    M, R, K, seed, proj_scale, M_BUCKET,
    ON_THE_FLY: tl.constexpr, OUT_KIND: tl.constexpr, INTERPRET: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ids_ptr, stride_ids, stride_d_bank, HAS_IDS: tl.constexpr,
):
    """s = x Aᵀ rounded to x's dtype, t = d ⊙ s (from the rounded s, as the backward recomputes it).

    HAS_IDS (many adapters, inference only): d is a bank (N x r, row stride stride_d_bank) and row m takes
    row ids[m] of it, gathered here per tile (ids[m] = -1: d = 0, so t = 0); s is not stored (s_ptr None)."""
    m0 = tl.program_id(0) * BLOCK_M
    r0 = tl.program_id(1) * BLOCK_R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # Aᵀ as the K x R right operand: element (k, r) of Aᵀ is A[r, k], so A's rows run along n.
    acc = _accumulate(acc, x_ptr, stride_xm, stride_xk, a_ptr, stride_ak, stride_ar, m0, r0, M, R, K,
                      seed, 0, proj_scale, ON_THE_FLY, True, OUT_KIND, INTERPRET, IEEE, BLOCK_M, BLOCK_R, BLOCK_K)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    mask = (offs_m[:, None] < M) & (offs_r[None, :] < R)
    s = _round_to(acc, OUT_KIND, INTERPRET)
    rows = offs_m[:, None].to(tl.int64)
    if HAS_IDS:
        ids = tl.load(ids_ptr + offs_m.to(tl.int64) * stride_ids, mask=offs_m < M, other=-1)
        d = tl.load(d_ptr + ids[:, None] * stride_d_bank + offs_r[None, :] * stride_d,
                    mask=mask & (ids[:, None] >= 0), other=0.0).to(tl.float32)
        t = _round_to(s.to(tl.float32) * d, OUT_KIND, INTERPRET)
    else:
        d = tl.load(d_ptr + offs_r * stride_d, mask=offs_r < R, other=0.0).to(tl.float32)
        t = _round_to(s.to(tl.float32) * d[None, :], OUT_KIND, INTERPRET)
        tl.store(s_ptr + rows * stride_sm + offs_r[None, :] * stride_sr, s, mask=mask)
    tl.store(t_ptr + rows * stride_tm + offs_r[None, :] * stride_tr, t, mask=mask)


@triton.jit
def _two_source_gemm_kernel(
    out_ptr, stride_om, stride_on,
    t_ptr, stride_tm, stride_tk, p_ptr, stride_pk, stride_pn, scale_ptr, stride_scale,
    x_ptr, stride_xm, stride_xk, w_ptr, stride_wk, stride_wn,
    bias_ptr, stride_bias, base_ptr, stride_basem, stride_basen,
    M, N, K_ADAPTER, K_BASE, seed, proj_scale, M_BUCKET,
    HAS_SCALE: tl.constexpr, HAS_BASE_GEMM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BASE_OUT: tl.constexpr,
    ON_THE_FLY: tl.constexpr, PROJ_TAG: tl.constexpr, PROJ_ROW_IS_N: tl.constexpr,
    OUT_KIND: tl.constexpr, INTERPRET: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ids_ptr, stride_ids, stride_scale_bank, HAS_IDS: tl.constexpr,
):
    """out = scale ⊙ (t P) + x W + bias + base, one fp32 accumulator, the output written once.

    HAS_IDS (many adapters): scale is a bank (N x out, row stride stride_scale_bank) and row m is scaled
    by its row ids[m], gathered per tile in the epilogue of the adapter source (ids[m] = -1: 0, and t is 0
    on those rows too), so the rows of different adapters share every tile of the two GEMMs.

    Forward: t (M x r), P = Bᵀ, scale = b, x W = x W0ᵀ.  dx: t = ds, P = A, no scale, x W = g W0.
    The adapter source runs first so that the per-column scale applies to its sum alone (b multiplies
    the adapter's output, not the base's) without a second accumulator."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row blocks share each column block's operand tiles while they are in L2.
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    m0 = (first_m + (pid % per_group) % group_rows) * BLOCK_M
    n0 = ((pid % per_group) // group_rows) * BLOCK_N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate(acc, t_ptr, stride_tm, stride_tk, p_ptr, stride_pk, stride_pn, m0, n0, M, N, K_ADAPTER,
                      seed, PROJ_TAG, proj_scale, ON_THE_FLY, PROJ_ROW_IS_N, OUT_KIND, INTERPRET, IEEE,
                      BLOCK_M, BLOCK_N, BLOCK_K)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    if HAS_IDS:
        ids = tl.load(ids_ptr + offs_m.to(tl.int64) * stride_ids, mask=offs_m < M, other=-1)
        scale = tl.load(scale_ptr + ids[:, None] * stride_scale_bank + offs_n[None, :] * stride_scale,
                        mask=(ids[:, None] >= 0) & n_ok[None, :], other=0.0).to(tl.float32)
        acc = acc * scale
    elif HAS_SCALE:
        scale = tl.load(scale_ptr + offs_n * stride_scale, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc * scale[None, :]
    if HAS_BASE_GEMM:
        acc = _accumulate(acc, x_ptr, stride_xm, stride_xk, w_ptr, stride_wk, stride_wn, m0, n0, M, N, K_BASE,
                          seed, PROJ_TAG, proj_scale, False, False, OUT_KIND, INTERPRET, IEEE,
                          BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    rows = offs_m[:, None].to(tl.int64)
    mask = (offs_m[:, None] < M) & n_ok[None, :]
    if HAS_BASE_OUT:
        acc += tl.load(base_ptr + rows * stride_basem + offs_n[None, :] * stride_basen, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows * stride_om + offs_n[None, :] * stride_on, _round_to(acc, OUT_KIND, INTERPRET), mask=mask)


@triton.jit
def _backward_kernel(
    g_ptr, stride_gm, stride_gn, s_ptr, stride_sm, stride_sr, b_mat_ptr, stride_bn, stride_br,
    d_ptr, stride_d, lb_ptr, stride_lb,
    ds_ptr, stride_dsm, stride_dsr, db_part_ptr, dd_part_ptr, dbias_part_ptr,
    M, N, R, seed, proj_scale, M_BUCKET,
    HAS_BIAS: tl.constexpr, ON_THE_FLY: tl.constexpr, OUT_KIND: tl.constexpr, INTERPRET: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (i, j) owns rows [i BLOCK_M, ...) and ranks [j BLOCK_R, ...); one pass over its rows of g:
        dt[:, j block] = Σ_n (g ⊙ b)[:, n] B[n, j block]         -> ds = d ⊙ dt (stored), dd partial
        db partial[n]  = Σ_m g[m, n] u_j[m, n],  u_j = t[:, j block] B[n, j block]ᵀ
    Summing the db partials over j gives Σ_m g ⊙ u with u = t Bᵀ: u is never stored. Partials: db
    (programs x out), dd (row blocks x r), dbias (row blocks x out, written by the j = 0 programs)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    r_ok = offs_r < R
    rows = offs_m[:, None].to(tl.int64)

    s = tl.load(s_ptr + rows * stride_sm + offs_r[None, :] * stride_sr, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    d = tl.load(d_ptr + offs_r * stride_d, mask=r_ok, other=0.0).to(tl.float32)
    t = _round_to(s.to(tl.float32) * d[None, :], OUT_KIND, INTERPRET)  # bit for bit the forward's t
    dt = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)

    g_ptrs = g_ptr + rows * stride_gm + offs_n[None, :].to(tl.int64) * stride_gn
    if not ON_THE_FLY:
        b_ptrs = b_mat_ptr + offs_n[:, None].to(tl.int64) * stride_bn + offs_r[None, :] * stride_br
    db_row = db_part_ptr + (pid_m * tl.num_programs(1) + pid_r).to(tl.int64) * N
    for n0 in range(0, N, BLOCK_N):
        n_ok = offs_n < N - n0
        g = tl.load(g_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        lb = tl.load(lb_ptr + (n0 + offs_n) * stride_lb, mask=n_ok, other=0.0).to(tl.float32)
        if ON_THE_FLY:
            # B tile (n, r) with B's rows along n: the [BLOCK_N, BLOCK_R] tile of the scheme as generated.
            b_tile = _round_to(projection_tile(seed, 1, proj_scale, n0, pid_r * (BLOCK_R // 4), BLOCK_N, BLOCK_R // 4),
                               OUT_KIND, INTERPRET)
        else:
            b_tile = tl.load(b_ptrs, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            b_ptrs += BLOCK_N * stride_bn
        u = _dot(t, tl.trans(b_tile), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), INTERPRET, IEEE)
        tl.store(db_row + n0 + offs_n, tl.sum(g * u, axis=0), mask=n_ok)
        if HAS_BIAS:  # dbias_part_ptr is None otherwise: no pointer arithmetic on it outside this branch
            if pid_r == 0:
                tl.store(dbias_part_ptr + pid_m.to(tl.int64) * N + n0 + offs_n, tl.sum(g, axis=0), mask=n_ok)
        gb = _round_to(g * lb[None, :], OUT_KIND, INTERPRET)
        dt = _dot(gb, b_tile, dt, INTERPRET, IEEE)
        g_ptrs += BLOCK_N * stride_gn

    tl.store(dd_part_ptr + pid_m.to(tl.int64) * R + offs_r, tl.sum(dt * s.to(tl.float32), axis=0), mask=r_ok)
    ds = _round_to(dt * d[None, :], OUT_KIND, INTERPRET)
    tl.store(ds_ptr + rows * stride_dsm + offs_r[None, :] * stride_dsr, ds, mask=m_ok[:, None] & r_ok[None, :])


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


def _flags(dtype: torch.dtype) -> dict:
    return dict(OUT_KIND=_OUT_KIND[dtype], INTERPRET=interpreted(), IEEE=dtype == torch.float32)


def _launch(kernel, fn, grid, args, device):
    autotune.launch(kernel, fn, grid, args, interpreted=interpreted(), device=device)


def _strides(t: torch.Tensor | None, transpose: bool = False) -> tuple[int, int]:
    if t is None:  # generated on the fly: no memory operand
        return 0, 0
    return (t.stride(1), t.stride(0)) if transpose else (t.stride(0), t.stride(1))


def _shrink(x, A, lambda_d, seed, max_in, ids=None):
    """(s, t); with ids, lambda_d is the bank (N x r) and s is not computed (None)."""
    m, k = x.shape
    r = lambda_d.shape[-1]
    s = None if ids is not None else dispatch.new_output(m, r, dtype=x.dtype, device=x.device)
    t = dispatch.new_output(m, r, dtype=x.dtype, device=x.device)
    stride_ar, stride_ak = _strides(A)
    args = dict(
        x_ptr=x, stride_xm=x.stride(0), stride_xk=x.stride(1), a_ptr=A, stride_ar=stride_ar, stride_ak=stride_ak,
        d_ptr=lambda_d, stride_d=lambda_d.stride(-1),
        s_ptr=s, stride_sm=0 if s is None else s.stride(0), stride_sr=0 if s is None else s.stride(1),
        t_ptr=t, stride_tm=t.stride(0), stride_tr=t.stride(1),
        M=m, R=r, K=k, seed=seed, proj_scale=projection_scale(max_in) if A is None else 1.0,
        M_BUCKET=autotune.m_bucket(m), ON_THE_FLY=A is None, **_flags(x.dtype),
        ids_ptr=ids, stride_ids=0 if ids is None else ids.stride(0),
        stride_d_bank=0 if ids is None else lambda_d.stride(0), HAS_IDS=ids is not None,
    )
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(r, meta["BLOCK_R"]))  # noqa: E731
    _launch("shrink", _shrink_kernel, grid, args, x.device)
    return s, t


def _two_source_gemm(out, t, proj, proj_strides, scale, x, w, w_strides, bias, base_out, *, k_adapter, k_base,
                     seed, proj_scale, tag, row_is_n, ids=None):
    m, n = out.shape
    args = dict(
        out_ptr=out, stride_om=out.stride(0), stride_on=out.stride(1),
        t_ptr=t, stride_tm=t.stride(0), stride_tk=t.stride(1),
        p_ptr=proj, stride_pk=proj_strides[0], stride_pn=proj_strides[1],
        scale_ptr=scale, stride_scale=0 if scale is None else scale.stride(-1),
        x_ptr=x, stride_xm=0 if x is None else x.stride(0), stride_xk=0 if x is None else x.stride(1),
        w_ptr=w, stride_wk=w_strides[0], stride_wn=w_strides[1],
        bias_ptr=bias, stride_bias=0 if bias is None else bias.stride(0),
        base_ptr=base_out, stride_basem=0 if base_out is None else base_out.stride(0),
        stride_basen=0 if base_out is None else base_out.stride(1),
        M=m, N=n, K_ADAPTER=k_adapter, K_BASE=k_base, seed=seed, proj_scale=proj_scale, M_BUCKET=autotune.m_bucket(m),
        HAS_SCALE=scale is not None, HAS_BASE_GEMM=x is not None, HAS_BIAS=bias is not None,
        HAS_BASE_OUT=base_out is not None, ON_THE_FLY=proj is None, PROJ_TAG=tag, PROJ_ROW_IS_N=row_is_n,
        ids_ptr=ids, stride_ids=0 if ids is None else ids.stride(0),
        stride_scale_bank=0 if ids is None else scale.stride(0), HAS_IDS=ids is not None, **_flags(out.dtype),
    )
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _launch("gemm", _two_source_gemm_kernel, grid, args, out.device)


def _sum_rows(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    p, n = part.shape
    out = dispatch.new_output(n, dtype=dtype, device=part.device)
    args = dict(part_ptr=part, P=p, N=n, out_ptr=out, stride_out=out.stride(0),
                OUT_KIND=_OUT_KIND[dtype], INTERPRET=interpreted())
    _launch("sum", _sum_rows_kernel, lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),), args, part.device)
    return out


def backward_blocks(m: int, r: int, on_the_fly: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_R) of the backward pass: they fix its partials' layout, so they are chosen here."""
    fixed = autotune.fixed_config("backward", interpreted())
    if fixed is not None:
        return fixed.kwargs["BLOCK_M"], fixed.kwargs["BLOCK_R"]
    # dt (BLOCK_M x BLOCK_R fp32) beside the u tile: 64 x 128 is what 8 warps hold without spilling, 64 x 64
    # when the B tiles are generated (checked statically). Larger r loops over blocks of r, reading g once
    # per block.
    block_r = 64 if on_the_fly else 128
    return (16 if m <= 16 else 32 if m <= 32 else 64), min(block_r, max(16, triton.next_power_of_2(r)))


def forward(x, weight, bias, A, B, lambda_d, lambda_b, base_out, seed: int, max_in: int):
    """(y, s): y = x W0ᵀ + bias + b ⊙ ((d ⊙ s) Bᵀ) (weight given) or base_out + b ⊙ ((d ⊙ s) Bᵀ), s = x Aᵀ.
    x is (M, in); A, B None: generated from seed."""
    m, k = x.shape
    r, n = lambda_d.shape[0], lambda_b.shape[0]
    if m == 0:
        return x.new_empty(0, n), x.new_empty(0, r)
    s, t = _shrink(x, A, lambda_d, seed, max_in)
    y = dispatch.new_output(m, n, dtype=x.dtype, device=x.device)
    _two_source_gemm(
        y, t, B, _strides(B, transpose=True), lambda_b, x if weight is not None else None, weight,
        _strides(weight, transpose=True), bias, base_out, k_adapter=r, k_base=k,
        seed=seed, proj_scale=projection_scale(r) if B is None else 1.0, tag=TAG_B, row_is_n=True,
    )
    return y, s


def forward_multi(x, weight, bias, A, B, bank_d, bank_b, ids, base_out):
    """Many adapters, inference only: y_m = x_m W0ᵀ + bias + b[a] ⊙ ((d[a] ⊙ (x_m Aᵀ)) Bᵀ), a = ids[m]
    (or base_out_m + ...), -1: no adapter term. The same two launches as forward: d[ids] is gathered in
    the shrink and b[ids] in the GEMM's epilogue; nothing per adapter, no per-row copy of d or b."""
    m, k = x.shape
    r, n = bank_d.shape[1], bank_b.shape[1]
    if m == 0:
        return x.new_empty(0, n)
    _, t = _shrink(x, A, bank_d, 0, 0, ids=ids)
    y = dispatch.new_output(m, n, dtype=x.dtype, device=x.device)
    _two_source_gemm(
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
    block_m, block_r = backward_blocks(m, r, on_the_fly=B is None)
    row_blocks, rank_blocks = triton.cdiv(m, block_m), triton.cdiv(r, block_r)
    ds = dispatch.new_output(m, r, dtype=g.dtype, device=g.device)
    db_part = dispatch.new_output(row_blocks * rank_blocks, n, dtype=torch.float32, device=g.device)
    dd_part = dispatch.new_output(row_blocks, r, dtype=torch.float32, device=g.device)
    dbias_part = dispatch.new_output(row_blocks, n, dtype=torch.float32, device=g.device) if with_bias else None
    stride_bn, stride_br = _strides(B)
    args = dict(
        g_ptr=g, stride_gm=g.stride(0), stride_gn=g.stride(1), s_ptr=s, stride_sm=s.stride(0), stride_sr=s.stride(1),
        b_mat_ptr=B, stride_bn=stride_bn, stride_br=stride_br,
        d_ptr=lambda_d, stride_d=lambda_d.stride(0), lb_ptr=lambda_b, stride_lb=lambda_b.stride(0),
        ds_ptr=ds, stride_dsm=ds.stride(0), stride_dsr=ds.stride(1),
        db_part_ptr=db_part, dd_part_ptr=dd_part, dbias_part_ptr=dbias_part,
        M=m, N=n, R=r, seed=seed, proj_scale=projection_scale(r) if B is None else 1.0,
        M_BUCKET=autotune.m_bucket(m), HAS_BIAS=with_bias, ON_THE_FLY=B is None, **_flags(g.dtype),
        BLOCK_M=block_m, BLOCK_R=block_r,
    )
    _launch("backward", _backward_kernel, lambda meta: (row_blocks, rank_blocks), args, g.device)
    dd = _sum_rows(dd_part, lambda_d.dtype)
    db = _sum_rows(db_part, lambda_b.dtype)
    dbias = _sum_rows(dbias_part, g.dtype) if with_bias else None
    dx = None
    if need_dx:
        dx = dispatch.new_output(m, in_features, dtype=g.dtype, device=g.device)
        _two_source_gemm(
            dx, ds, A, _strides(A), None, g if weight is not None else None, weight, _strides(weight), None, None,
            k_adapter=r, k_base=n, seed=seed, proj_scale=projection_scale(max_in) if A is None else 1.0,
            tag=TAG_A, row_is_n=False,
        )
    return dx, dd, db, dbias
