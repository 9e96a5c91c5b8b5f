// The per-element VeRA math shared by the CPU kernels (vera_cpu.cpp) and the CUDA kernels (vera_cuda.cu):
// storage conversions, the fp32 products, and the kernels' parameter blocks.
//
// Free of torch and CUDA headers, like projection.h: the glue (vera_ops.cpp) validates every argument and
// the functions declared here trust them. Every product and sum is computed in fp32 and rounded once to
// the stored dtype (the dtype policy of vera_kernels/reference.py).
#pragma once

#include <cstdint>
#include <cstring>

#include "philox.h"  // VERA_HD, float_bits, fp32_to_bf16_bits, fp32_to_fp16_bits

namespace vera {

enum class Dtype { kFloat32, kBFloat16, kFloat16 };

VERA_HD float float_from_bits(uint32_t bits) {
  float v;
  memcpy(&v, &bits, sizeof v);
  return v;
}

VERA_HD bool is_nan_bits(uint32_t bits) { return (bits & 0x7FFFFFFFu) > 0x7F800000u; }

// Storage type of each Dtype, with the exact widening to fp32 and the round-to-nearest-even narrowing.
// philox.h's integer roundings cover finite values (and infinities); a NaN is kept a (quiet) NaN here,
// since gradients can carry one.
template <Dtype D>
struct Elem;

template <>
struct Elem<Dtype::kFloat32> {
  using type = float;
  static VERA_HD float load(float v) { return v; }
  static VERA_HD float store(float v) { return v; }
};

template <>
struct Elem<Dtype::kBFloat16> {
  using type = uint16_t;
  static VERA_HD float load(uint16_t v) { return float_from_bits(uint32_t(v) << 16); }
  static VERA_HD uint16_t store(float v) {
    const uint32_t bits = float_bits(v);
    return is_nan_bits(bits) ? uint16_t((bits >> 16) | 0x40u) : fp32_to_bf16_bits(v);
  }
};

template <>
struct Elem<Dtype::kFloat16> {
  using type = uint16_t;
  static VERA_HD float load(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0x1Fu) return float_from_bits(sign | 0x7F800000u | (m << 13));  // infinity or NaN
    if (e != 0) return float_from_bits(sign | ((e + 112u) << 23) | (m << 13));
    const float v = float(m) * 0x1p-24f;  // subnormal or zero: exact
    return sign ? -v : v;
  }
  static VERA_HD uint16_t store(float v) {
    const uint32_t bits = float_bits(v);
    return is_nan_bits(bits) ? uint16_t(((bits >> 16) & 0x8000u) | 0x7E00u) : fp32_to_fp16_bits(v);
  }
};

// Calls f(Elem<d>{}), turning the runtime dtype into a compile-time one.
template <typename F>
void dispatch_dtype(Dtype d, F&& f) {
  switch (d) {
    case Dtype::kFloat32:
      f(Elem<Dtype::kFloat32>{});
      return;
    case Dtype::kBFloat16:
      f(Elem<Dtype::kBFloat16>{});
      return;
    case Dtype::kFloat16:
      f(Elem<Dtype::kFloat16>{});
      return;
  }
}

// Calls f(E, D, B) with the element types of a projection and of the two vectors applied to it (the
// dtype, d_dtype and b_dtype of FoldProjection and LambdaGrads).
template <typename Params, typename F>
void dispatch_projection_dtypes(const Params& p, F&& f) {
  dispatch_dtype(p.dtype, [&](auto e) {
    dispatch_dtype(p.d_dtype, [&](auto d) { dispatch_dtype(p.b_dtype, [&](auto b) { f(e, d, b); }); });
  });
}

// a * b of two stored elements, in fp32: the one product every kernel here is made of.
template <typename EA, typename EB>
VERA_HD float product(typename EA::type a, typename EB::type b) {
  return EA::load(a) * EB::load(b);
}

// One element of GatherScale: `in_v` scaled by the bank value `v_v` (ids[i] >= 0), onto `out_v` or not.
template <typename E, typename V>
VERA_HD typename E::type gather_scale_element(typename E::type out_v, typename E::type in_v, typename V::type v_v,
                                              bool accumulate) {
  const float scaled = product<E, V>(in_v, v_v);
  return E::store(accumulate ? E::load(out_v) + scaled : scaled);
}

// The kernels read and write contiguous tensors only: the large ones (s, dt, g) are contiguous by
// construction, the glue makes contiguous copies of the small ones (B, the lambdas) when they are not.

// The frozen projection with both vectors folded in, out[j, k] = b[j] * B[j, k] * d[k] (out x r): one
// GEMM with it applies d and b, so that the forward's adapter term is s Bdbᵀ and the backward's
// d ⊙ dt is g Bdb, with no pass over an M-sized tensor. Products in fp32, rounded once to `dtype`.
// B and out (rows x cols) hold `dtype`; d (cols) holds `d_dtype`, b (rows) `b_dtype`.
struct FoldProjection {
  void* out;
  const void* B;
  const void* d;
  const void* b;
  Dtype dtype, d_dtype, b_dtype;
  int64_t rows, cols;
};

// The two vector gradients from G = gᵀ s (out x r, fp32, contiguous), both from one read of B and G:
//   db[j] = Σ_k B[j, k] d[k] G[j, k]    = Σ_m g ⊙ (t Bᵀ), t = d ⊙ s     (a null db: not computed)
//   dd[k] = Σ_j b[j] B[j, k] G[j, k]    = Σ_m dt ⊙ s, dt = g (b ⊙ B)    (a null dd: not computed)
// All in fp32 (G's sums over M can exceed fp16's range; the gradients are then rounded once to the
// vectors' dtypes, d_dtype and b_dtype). db sums a row in a fixed lane order; dd sums each column over
// chunks of kSumRowChunk rows, then the chunk sums in row order: the bits depend on the shape alone.
struct LambdaGrads {
  void* db;
  void* dd;
  const void* B;
  const float* G;
  const void* d;
  const void* b;
  Dtype dtype, d_dtype, b_dtype;
  int64_t rows, cols;
};

// out[j] = Σ_i a[i, j]: dbias = Σ_m g. a (rows x cols) holds `dtype`, out holds `out_dtype` and is written
// once per column. Each column is summed in fp32 over chunks of kSumRowChunk rows, and the chunk sums are
// added in row order: the bits depend on the shape alone, not on the thread count or the launch
// configuration.
struct ColumnSums {
  void* out;
  const void* a;
  Dtype dtype, out_dtype;
  int64_t rows, cols;
};

constexpr int64_t kSumRowChunk = 64;

VERA_HD int64_t sum_chunks(int64_t rows) { return (rows + kSumRowChunk - 1) / kSumRowChunk; }

// Scaling by a gathered vector, for many adapters in one batch: row i is scaled by row ids[i] of the bank
// v (N x cols, contiguous, `v_dtype`), in fp32, rounded once to `dtype`:
//   accumulate false:  out[i, j] = in[i, j] * v[ids[i], j]             t = d[ids] ⊙ s;   ids[i] = -1: 0
//   accumulate true:   out[i, j] = out[i, j] + in[i, j] * v[ids[i], j]  y += b[ids] ⊙ u;  -1: out untouched
// No per-row copy of the bank: each element reads its adapter's value where it is. ids (rows, int64) hold
// values in [-1, N), checked by the glue. `in` and `out` (rows x cols, `dtype`) may be the same buffer.
struct GatherScale {
  void* out;
  const void* in;
  const void* v;
  const int64_t* ids;
  Dtype dtype, v_dtype;
  int64_t rows, cols;
  bool accumulate;
};

// Decode on CUDA (M <= kDecodeMaxRows rows): the adapter term in three launches that spread over every SM,
// without a GEMM library call, without folding B and without an M x out temporary:
//   1. shrink, split over K: partial[c, m, k] = Σ_{i in split c} x[m, i] A[k, i]   (fp32; enough splits
//      that the grid has about two blocks per SM)
//   2. shrink, second stage: σ = Σ_c partial[c, m, k] in split order (a fixed order: the same bits in every
//      run); s[m, k] = σ rounded to `dtype` (s null: not stored); t[m, k] = d[a_m, k] σ (fp32 scratch)
//   3. expand, one warp per output column j: y[m, j] = base + b[a_m, j] Σ_k t[m, k] B[j, k]
// with a_m = ids[m] for many adapters in one batch (-1: no adapter, t = 0 and y = base bit for bit) and
// a_m = 0 for one adapter (ids null, banks of one row). The base: kBias writes y = bias (null: 0) plus the
// term, kRows y = base_rows + the term (base_out), kAccumulate adds the term to y as it is (-1: untouched).
// x (rows x in), A (r x in), B (out x r) have unit column strides and the given row strides; the banks
// (N x r, N x out, `v_dtype`), base_rows, y (rows x out) and s (rows x r) are contiguous.
constexpr int64_t kDecodeMaxRows = 16;

enum class DecodeBase { kBias, kRows, kAccumulate };

struct DecodeAdapter {
  const void* x;
  const void* A;
  const void* B;
  int64_t x_stride, A_stride, B_stride;
  const void* d_bank;
  const void* b_bank;
  const int64_t* ids;
  DecodeBase base_kind;
  const void* base;  // bias (out) for kBias, or null; base_out (rows x out) for kRows; unused for kAccumulate
  void* y;
  void* s;
  Dtype dtype, v_dtype;
  int64_t rows, in, r, out;
  int64_t splits;  // decode_splits(...)
  float* scratch;  // decode_scratch_floats(rows, r, splits) floats
};

VERA_HD int64_t decode_scratch_floats(int64_t rows, int64_t r, int64_t splits) { return (splits + 1) * rows * r; }

// Returns whether every b[j] is finite (see vera_ops.cpp, Folded).
bool fold_projection_cpu(const FoldProjection& p);
void lambda_grads_cpu(const LambdaGrads& p);
void gather_scale_cpu(const GatherScale& p);
void column_sums_cpu(const ColumnSums& p);

// CUDA launchers on `stream` (a cudaStream_t); nullptr on success, else the CUDA error string. Defined only
// in builds with VERA_WITH_CUDA. column_sums_cuda and lambda_grads_cuda need sum_chunks(p.rows) * p.cols
// floats of scratch.
const char* fold_projection_cuda(const FoldProjection& p, void* stream);
const char* lambda_grads_cuda(const LambdaGrads& p, float* scratch, void* stream);
const char* gather_scale_cuda(const GatherScale& p, void* stream);
const char* column_sums_cuda(const ColumnSums& p, float* scratch, void* stream);
// K splits of the decode shrink for this shape on `device`: about two blocks per SM, at least 256 columns
// of x per split.
int64_t decode_splits_cuda(int64_t in, int64_t r, int device);
const char* decode_adapter_cuda(const DecodeAdapter& p, void* stream);
// Whether `stream` is being captured into a CUDA graph (work issued now runs again at every replay).
bool stream_is_capturing(void* stream);

}  // namespace vera
