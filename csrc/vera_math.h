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
// (N x r, N x out, `v_dtype`), base_rows, y (rows x out) and s (rows x r) are contiguous. Each lane reads A,
// B, x and t in 16-byte vectors where their rows are 16-byte aligned (decode_layout, decode_shrink_lane,
// decode_expand_lane below), element by element otherwise.
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

// The scratch: the partials (splits x rows x r floats), then t (rows x r floats) from a 16-byte boundary, so
// that t's rows are 16-byte aligned when r is a multiple of 4 (the scratch itself comes from an allocator
// that aligns far more).
VERA_HD int64_t decode_t_offset(int64_t rows, int64_t r, int64_t splits) { return (splits * rows * r + 3) / 4 * 4; }

VERA_HD int64_t decode_scratch_floats(int64_t rows, int64_t r, int64_t splits) {
  return decode_t_offset(rows, r, splits) + rows * r;
}

// ---------------------------------------------------------------------------------------------------
// What one lane of a decode kernel reads and adds: shared by the CUDA kernels (vera_cuda.cu) and the CPU
// unit test that runs every lane of a warp (tests/cpp/test_decode.cpp), so that the vector indexing is
// checked without a GPU.

#if defined(__CUDACC__)
#define VERA_UNROLL _Pragma("unroll")
#else
#define VERA_UNROLL
#endif

constexpr int kDecodeLanes = 32;  // a warp

// Elements of E's storage type in 16 bytes: the decode kernels' vector width (8 for bf16/fp16, 4 for fp32).
template <typename E>
constexpr int kVectorElems = int(16 / sizeof(typename E::type));

template <typename T, int V>
struct Pack {
  T v[V];
};

struct alignas(16) Bytes16 {
  uint32_t w[4];
};

// A hook for the CPU unit test (tests/cpp/test_decode.cpp), which checks that every vector load is 16-byte
// aligned; nothing in the kernels.
#ifndef VERA_DECODE_CHECK_ALIGNED
#define VERA_DECODE_CHECK_ALIGNED(p)
#endif

// V elements from p. When V * sizeof(T) is a multiple of 16: in 16-byte pieces, each one 16-byte load on
// the GPU (p must then be 16-byte aligned: the launcher checks, decode_layout); otherwise element by element.
template <typename T, int V>
VERA_HD Pack<T, V> load_pack(const T* p) {
  Pack<T, V> out;
  if constexpr (V * sizeof(T) % 16 == 0) {
    VERA_DECODE_CHECK_ALIGNED(p);
    VERA_UNROLL
    for (int i = 0; i < int(V * sizeof(T) / 16); ++i) {
#ifdef __CUDA_ARCH__
      const Bytes16 raw = reinterpret_cast<const Bytes16*>(p)[i];
#else
      Bytes16 raw;
      memcpy(&raw, reinterpret_cast<const unsigned char*>(p) + 16 * i, 16);
#endif
      memcpy(reinterpret_cast<unsigned char*>(out.v) + 16 * i, raw.w, 16);
    }
  } else {
    VERA_UNROLL
    for (int i = 0; i < V; ++i) out.v[i] = p[i];
  }
  return out;
}

// Whether a matrix (its first element at `base`, `rows` rows `row_stride` elements apart, `elem_size` bytes
// each) can be read in 16-byte vectors from the start of any row: base and every row start 16-byte aligned.
inline bool rows_16_byte_aligned(const void* base, int64_t rows, int64_t row_stride, int64_t elem_size) {
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && (rows <= 1 || (row_stride * elem_size) % 16 == 0);
}

// How a lane's columns of [0, n) are dealt (both decode kernels): in chunks of V consecutive columns,
// chunk c = [c V, c V + V) to lane c mod kDecodeLanes, two chunks per trip of the loop (their loads in
// flight together), then the n mod V columns past the last whole chunk one each to lanes 0, 1, ...: every
// column to exactly one lane. Calls chunk(first column) for the lane's chunks and single(column) for its
// tail columns, in a fixed order.
template <int V, typename Chunk, typename Single>
VERA_HD void for_lane_columns(int64_t n, int lane, Chunk&& chunk, Single&& single) {
  const int64_t chunks = n > 0 ? n / V : 0;
  int64_t c = lane;
  for (; c + kDecodeLanes < chunks; c += 2 * kDecodeLanes) {
    chunk(c * V);
    chunk((c + kDecodeLanes) * V);
  }
  if (c < chunks) chunk(c * V);
  for (int64_t i = chunks * V + lane; i < n; i += kDecodeLanes) single(i);
}

// Shrink, one lane of the warp of rank row k over the columns [begin, end) of split c: acc[m] += x[m, i]
// A[k, i] over the lane's columns i (for_lane_columns, offset by begin), m < rows, in fp32. x_rows points
// at x[0, begin], a_row at A[k, begin]. V > 1: both 16-byte aligned, and x's rows too (begin a multiple of
// V and rows_16_byte_aligned for x and A); V = 1 reads element by element, any layout.
template <typename E, int V>
VERA_HD void decode_shrink_lane(float (&acc)[kDecodeMaxRows], const typename E::type* x_rows, int64_t x_stride,
                                int64_t rows, const typename E::type* a_row, int64_t n, int lane) {
  using T = typename E::type;
  for_lane_columns<V>(
      n, lane,
      [&](int64_t i) {
        const Pack<T, V> a = load_pack<T, V>(a_row + i);
        VERA_UNROLL
        for (int m = 0; m < kDecodeMaxRows; ++m) {
          if (m < rows) {
            const Pack<T, V> xm = load_pack<T, V>(x_rows + m * x_stride + i);
            VERA_UNROLL
            for (int v = 0; v < V; ++v) acc[m] += E::load(xm.v[v]) * E::load(a.v[v]);
          }
        }
      },
      [&](int64_t i) {
        const float a = E::load(a_row[i]);
        VERA_UNROLL
        for (int m = 0; m < kDecodeMaxRows; ++m) {
          if (m < rows) acc[m] += E::load(x_rows[m * x_stride + i]) * a;
        }
      });
}

// Expand, one lane of the warp of output column j: acc[m] += t[m, k] B[j, k] over the lane's k of [0, r)
// (for_lane_columns), m < rows, in fp32. t: rows x r floats, contiguous; b_row: B[j, :]. V > 1: b_row and
// t's rows 16-byte aligned (rows_16_byte_aligned for B, r a multiple of 4, decode_t_offset); V = 1 reads
// element by element, any layout.
template <typename E, int V>
VERA_HD void decode_expand_lane(float (&acc)[kDecodeMaxRows], const float* t, int64_t rows, int64_t r,
                                const typename E::type* b_row, int lane) {
  using T = typename E::type;
  for_lane_columns<V>(
      r, lane,
      [&](int64_t k) {
        const Pack<T, V> b = load_pack<T, V>(b_row + k);
        VERA_UNROLL
        for (int m = 0; m < kDecodeMaxRows; ++m) {
          if (m < rows) {
            const Pack<float, V> tm = load_pack<float, V>(t + m * r + k);
            VERA_UNROLL
            for (int v = 0; v < V; ++v) acc[m] += tm.v[v] * E::load(b.v[v]);
          }
        }
      },
      [&](int64_t k) {
        const float b = E::load(b_row[k]);
        VERA_UNROLL
        for (int m = 0; m < kDecodeMaxRows; ++m) {
          if (m < rows) acc[m] += t[m * r + k] * b;
        }
      });
}

// Which path each decode kernel takes for these tensors (vec: kVectorElems of the dtype, elem_size its
// bytes): 16-byte loads where every row they start in is 16-byte aligned, element by element otherwise; and
// the columns of x per split, a multiple of the warp's columns per trip so that every split starts on a
// vector (the last splits may be empty).
struct DecodeLayout {
  int shrink_vec, expand_vec;  // elements per load: vec or 1
  int64_t split_len;
};

inline DecodeLayout decode_layout(const DecodeAdapter& p, int vec, int64_t elem_size) {
  DecodeLayout l;
  const bool shrink = rows_16_byte_aligned(p.x, p.rows, p.x_stride, elem_size) &&
                      rows_16_byte_aligned(p.A, p.r, p.A_stride, elem_size);
  const bool expand = rows_16_byte_aligned(p.B, p.out, p.B_stride, elem_size) && p.r % 4 == 0 &&
                      rows_16_byte_aligned(p.scratch + decode_t_offset(p.rows, p.r, p.splits), 1, 0, 4);
  l.shrink_vec = shrink ? vec : 1;
  l.expand_vec = expand ? vec : 1;
  const int64_t per_trip = int64_t(kDecodeLanes) * l.shrink_vec;
  l.split_len = ((p.in + p.splits - 1) / p.splits + per_trip - 1) / per_trip * per_trip;
  return l;
}

// Lane `lane` of the shrink's warp for rank row k and split c: its partial sums of x[m, :] A[k, :] over the
// split's columns (decode_shrink_lane), into acc.
template <typename E, int V>
VERA_HD void decode_shrink_warp_lane(float (&acc)[kDecodeMaxRows], const DecodeAdapter& p, int64_t split_len,
                                     int64_t k, int64_t c, int lane) {
  using T = typename E::type;
  const int64_t begin = c * split_len;
  if (begin >= p.in) return;  // an empty split (its sums are 0)
  const int64_t end = begin + split_len < p.in ? begin + split_len : p.in;
  decode_shrink_lane<E, V>(acc, static_cast<const T*>(p.x) + begin, p.x_stride, p.rows,
                           static_cast<const T*>(p.A) + k * p.A_stride + begin, end - begin, lane);
}

// Lane `lane` of the expand's warp for output column j: its partial sums of t[m, :] B[j, :] (decode_expand_lane).
template <typename E, int V>
VERA_HD void decode_expand_warp_lane(float (&acc)[kDecodeMaxRows], const DecodeAdapter& p, int64_t j, int lane) {
  decode_expand_lane<E, V>(acc, p.scratch + decode_t_offset(p.rows, p.r, p.splits), p.rows, p.r,
                           static_cast<const typename E::type*>(p.B) + j * p.B_stride, lane);
}

// Small problems on CPU, where a call's fixed costs (the GEMM library's, the dispatcher's, allocations) are
// most of its time: the whole forward, or the whole backward, of one call in one pass of plain loops on the
// calling thread, in the formula's order (vera_kernels/reference.py), every product and sum in fp32. The glue
// (vera_ops.cpp, small_problem) takes this path up to kSmallWork multiply-adds, in fp32 and bf16, for unit
// column strides and finite vectors (and, in the backward, a finite g and s); anything else goes through the
// GEMMs. Each output element is written once, by one sum in a fixed order: the bits depend on the shape
// alone. kSmallWork: where these loops (compiled for the baseline x86-64 vector width) stop beating the GEMM
// path on one core, measured over M and the layer's sizes (fp32 at M = 8, 64 x 64, r = 16 already loses; at
// M = 1 the crossover is past 256 x 256). fp16 stays on the GEMM path: its widening is a branchy scalar
// conversion here, which made these loops slower than the GEMMs at every size measured.
constexpr int64_t kSmallWork = int64_t(1) << 15;

// The forward: per row m of x,
//   s[m, k] = Σ_i x[m, i] A[k, i]                        rounded to `dtype` (stored: the backward's activation)
//   y[m, j] = base[m, j] + b[j] Σ_k (d[k] s[m, k]) B[j, k],   base = Σ_i x[m, i] W[j, i] + bias[j]  (W given)
//                                                             or base_out[m, j]                (W null)
// x (rows x in), W (out x in), A (r x in), B (out x r), base_out (rows x out): unit column strides, the
// given row strides; bias (out, or null), d (r, `d_dtype`), b (out, `b_dtype`), y (rows x out) and s
// (rows x r): contiguous. fp32 scratch: a row of x and t = d ⊙ s of that row (in + r floats, on the stack
// up to 16 KB).
struct SmallOperands {  // what the forward and the backward both read
  const void* W;
  const void* A;
  const void* B;
  int64_t W_stride, A_stride, B_stride;
  const void* d;
  const void* b;
  Dtype dtype, d_dtype, b_dtype;
  int64_t rows, in, r, out;
};

struct SmallForward : SmallOperands {
  const void* x;
  const void* bias;
  const void* base_out;
  int64_t x_stride, base_stride;
  void* y;
  void* s;
};

// The backward from g = dL/dy (rows x out) and the saved s (rows x r), both contiguous: per row m,
//   dt[k] = Σ_j (g[m, j] b[j]) B[j, k],  u[j] = Σ_k (d[k] s[m, k]) B[j, k]
//   dx[m, i] = Σ_j g[m, j] W[j, i] + Σ_k (d[k] dt[k]) A[k, i]       (W null: the second sum alone)
// and over the rows, in row order: dd[k] = Σ_m dt[k] s[m, k], db[j] = Σ_m g[m, j] u[j], dbias[j] = Σ_m g[m, j].
// A null output is not computed. W, A, B: unit column strides, the given row strides; d, b, the outputs:
// contiguous; dd and db in the vectors' dtypes, dx and dbias in `dtype`.
struct SmallBackward : SmallOperands {
  const void* g;
  const void* s;
  void* dx;
  void* dd;
  void* db;
  void* dbias;
};

void fold_projection_cpu(const FoldProjection& p);
void lambda_grads_cpu(const LambdaGrads& p);
void gather_scale_cpu(const GatherScale& p);
void column_sums_cpu(const ColumnSums& p);
void small_forward_cpu(const SmallForward& p);
void small_backward_cpu(const SmallBackward& p);

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

}  // namespace vera
