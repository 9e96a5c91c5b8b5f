// CPU kernels for vera_math.h: at::parallel_for over rows or column blocks, inner loops over contiguous
// elements that the compiler vectorizes. Results do not depend on the thread count: every output element
// is computed by one task in a fixed order.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "vera_math.h"

namespace vera {

namespace {

// Chunks of about this many elements per task, ATen's usual grain.
constexpr int64_t kGrainElements = 32768;
// Columns summed together by one task: the fp32 partial sums of a block stay in L1.
constexpr int64_t kSumColBlock = 64;
// Independent accumulators of a row dot product, so that the fixed-order sum still vectorizes.
constexpr int64_t kDotLanes = 8;

int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, cols)); }

template <typename E, typename D, typename B>
void fold_rows(const FoldProjection& p, int64_t begin, int64_t end) {
  using T = typename E::type;
  const typename D::type* const d = static_cast<const typename D::type*>(p.d);
  const typename B::type* const b = static_cast<const typename B::type*>(p.b);
  for (int64_t i = begin; i < end; ++i) {
    const T* const src = static_cast<const T*>(p.B) + i * p.cols;
    T* const dst = static_cast<T*>(p.out) + i * p.cols;
    const float bi = B::load(b[i]);
    for (int64_t j = 0; j < p.cols; ++j) dst[j] = E::store(bi * E::load(src[j]) * D::load(d[j]));
  }
}

// db[j] = Σ_k B[j, k] d[k] G[j, k] for the rows [begin, end), in kDotLanes interleaved fp32 partial sums
// (so that the fixed-order sum still vectorizes).
template <typename E, typename D, typename B>
void db_rows(const LambdaGrads& p, int64_t begin, int64_t end) {
  using T = typename E::type;
  const typename D::type* const d = static_cast<const typename D::type*>(p.d);
  for (int64_t i = begin; i < end; ++i) {
    const T* const Bi = static_cast<const T*>(p.B) + i * p.cols;
    const float* const Gi = p.G + i * p.cols;
    float lanes[kDotLanes] = {};
    int64_t j = 0;
    for (; j + kDotLanes <= p.cols; j += kDotLanes) {
      for (int64_t l = 0; l < kDotLanes; ++l) lanes[l] += E::load(Bi[j + l]) * D::load(d[j + l]) * Gi[j + l];
    }
    for (int64_t l = 0; j + l < p.cols; ++l) lanes[l] += E::load(Bi[j + l]) * D::load(d[j + l]) * Gi[j + l];
    float sum = 0.0f;
    for (int64_t l = 0; l < kDotLanes; ++l) sum += lanes[l];
    static_cast<typename B::type*>(p.db)[i] = B::store(sum);
  }
}

// out[j] = Σ_i (row i's term for column j) for the columns [col_begin, col_begin + kSumColBlock), in fp32
// over chunks of kSumRowChunk rows whose sums are added in row order (the order of the CUDA kernels' two
// stages), then stored as O. add_row(i, width, chunk) adds row i's terms of the block's `width` columns.
template <typename O, typename AddRow>
void chunked_column_block(int64_t rows, int64_t cols, int64_t col_begin, void* out, AddRow&& add_row) {
  const int64_t width = std::min(kSumColBlock, cols - col_begin);
  float total[kSumColBlock] = {};
  float chunk[kSumColBlock];
  for (int64_t row_begin = 0; row_begin < rows; row_begin += kSumRowChunk) {
    const int64_t row_end = std::min(row_begin + kSumRowChunk, rows);
    std::fill(chunk, chunk + width, 0.0f);
    for (int64_t i = row_begin; i < row_end; ++i) add_row(i, width, chunk);
    for (int64_t j = 0; j < width; ++j) total[j] += chunk[j];
  }
  typename O::type* const dst = static_cast<typename O::type*>(out) + col_begin;
  for (int64_t j = 0; j < width; ++j) dst[j] = O::store(total[j]);
}

// dd[k] = Σ_j b[j] B[j, k] G[j, k] for the columns [col_begin, col_begin + kSumColBlock), over chunks of
// kSumRowChunk rows added in row order (the order of the CUDA kernels' two stages).
template <typename E, typename D, typename B>
void dd_block(const LambdaGrads& p, int64_t col_begin) {
  using T = typename E::type;
  const typename B::type* const b = static_cast<const typename B::type*>(p.b);
  chunked_column_block<D>(p.rows, p.cols, col_begin, p.dd, [&](int64_t i, int64_t width, float* chunk) {
    const float bi = B::load(b[i]);
    const T* const Bi = static_cast<const T*>(p.B) + i * p.cols + col_begin;
    const float* const Gi = p.G + i * p.cols + col_begin;
    for (int64_t j = 0; j < width; ++j) chunk[j] += bi * E::load(Bi[j]) * Gi[j];
  });
}

// kAccumulate a template parameter and the two cases in separate loops, so that each inner loop is a plain
// element-wise loop the compiler vectorizes.
template <typename E, typename V, bool kAccumulate>
void gather_scale_rows(const GatherScale& p, int64_t begin, int64_t end) {
  using T = typename E::type;
  const T* const in = static_cast<const T*>(p.in);
  T* const out = static_cast<T*>(p.out);
  const typename V::type* const bank = static_cast<const typename V::type*>(p.v);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t id = p.ids[i];
    const T* const src = in + i * p.cols;
    T* const dst = out + i * p.cols;
    if (id < 0) {
      // The base alone: t = 0 (so that t Bᵀ adds nothing), and y keeps the base output bit for bit.
      if (!kAccumulate) std::fill(dst, dst + p.cols, E::store(0.0f));
      continue;
    }
    const typename V::type* const v = bank + id * p.cols;
    for (int64_t j = 0; j < p.cols; ++j) dst[j] = gather_scale_element<E, V>(dst[j], src[j], v[j], kAccumulate);
  }
}

template <typename E, typename O>
void column_sums_block(const ColumnSums& p, int64_t col_begin) {
  using T = typename E::type;
  const T* const a = static_cast<const T*>(p.a);
  chunked_column_block<O>(p.rows, p.cols, col_begin, p.out, [&](int64_t i, int64_t width, float* chunk) {
    const T* const a_row = a + i * p.cols + col_begin;
    for (int64_t j = 0; j < width; ++j) chunk[j] += E::load(a_row[j]);
  });
}

// ---------------------------------------------------------------------------------------------------
// The one-pass kernels of small problems (SmallForward, SmallBackward): plain loops on the calling thread.

using F32 = Elem<Dtype::kFloat32>;

// The kernels' fp32 scratch: on the stack up to kStackFloats (16 KB; every layer up to in + out = 1024 at
// r = 128), so that a call allocates nothing but its outputs; from the heap past it.
constexpr int64_t kStackFloats = 4096;

class Scratch {
 public:
  explicit Scratch(int64_t n) : data_(n <= kStackFloats ? stack_ : (heap_.resize(n), heap_.data())) {
    std::fill(data_, data_ + n, 0.0f);
  }
  float* data() { return data_; }

 private:
  float stack_[kStackFloats];
  std::vector<float> heap_;
  float* data_;
};

// Σ_i a[i] b[i] over n elements in fp32, in kDotLanes interleaved partial sums added in lane order.
template <typename EA, typename EB>
float dot(const typename EA::type* a, const typename EB::type* b, int64_t n) {
  float lanes[kDotLanes] = {};
  int64_t i = 0;
  for (; i + kDotLanes <= n; i += kDotLanes) {
    for (int64_t l = 0; l < kDotLanes; ++l) lanes[l] += EA::load(a[i + l]) * EB::load(b[i + l]);
  }
  for (int64_t l = 0; i + l < n; ++l) lanes[l] += EA::load(a[i + l]) * EB::load(b[i + l]);
  float sum = 0.0f;
  for (int64_t l = 0; l < kDotLanes; ++l) sum += lanes[l];
  return sum;
}

// acc[i] += c * row[i] over n elements, in fp32.
template <typename E>
void add_scaled(float* acc, float c, const typename E::type* row, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += c * E::load(row[i]);
}

template <typename E, typename D, typename B>
void small_forward(const SmallForward& p) {
  using T = typename E::type;
  const T* const x = static_cast<const T*>(p.x);
  const T* const W = static_cast<const T*>(p.W);
  const T* const bias = static_cast<const T*>(p.bias);
  const T* const base_out = static_cast<const T*>(p.base_out);
  const T* const A = static_cast<const T*>(p.A);
  const T* const Bm = static_cast<const T*>(p.B);
  const typename D::type* const d = static_cast<const typename D::type*>(p.d);
  const typename B::type* const b = static_cast<const typename B::type*>(p.b);
  // fp32 scratch: the row of x widened once (every dot product then converts one operand only), and
  // t = d ⊙ s of the row.
  Scratch scratch(p.in + p.r);
  float* const xm = scratch.data();
  float* const t = xm + p.in;
  for (int64_t m = 0; m < p.rows; ++m) {
    const T* const x_row = x + m * p.x_stride;
    for (int64_t i = 0; i < p.in; ++i) xm[i] = E::load(x_row[i]);
    T* const sm = static_cast<T*>(p.s) + m * p.r;
    for (int64_t k = 0; k < p.r; ++k) {
      sm[k] = E::store(dot<F32, E>(xm, A + k * p.A_stride, p.in));
      t[k] = D::load(d[k]) * E::load(sm[k]);  // s as stored: the value the backward reads
    }
    T* const ym = static_cast<T*>(p.y) + m * p.out;
    for (int64_t j = 0; j < p.out; ++j) {
      const float u = dot<F32, E>(t, Bm + j * p.B_stride, p.r);
      float base;
      if (W != nullptr) {
        base = dot<F32, E>(xm, W + j * p.W_stride, p.in);
        if (bias != nullptr) base += E::load(bias[j]);
      } else {
        base = E::load(base_out[m * p.base_stride + j]);
      }
      ym[j] = E::store(base + B::load(b[j]) * u);
    }
  }
}

template <typename E, typename D, typename B>
void small_backward(const SmallBackward& p) {
  using T = typename E::type;
  const T* const g = static_cast<const T*>(p.g);
  const T* const s = static_cast<const T*>(p.s);
  const T* const W = static_cast<const T*>(p.W);
  const T* const A = static_cast<const T*>(p.A);
  const T* const Bm = static_cast<const T*>(p.B);
  const typename D::type* const d = static_cast<const typename D::type*>(p.d);
  const typename B::type* const b = static_cast<const typename B::type*>(p.b);
  const bool need_dt = p.dx != nullptr || p.dd != nullptr;
  // fp32 scratch: t = d ⊙ s and dt of the row, the sums over rows of dd, db and dbias, and dx's row.
  Scratch scratch(3 * p.r + 2 * p.out + p.in);
  float* const t = scratch.data();
  float* const dt = t + p.r;
  float* const dd = dt + p.r;
  float* const db = dd + p.r;
  float* const dbias = db + p.out;
  float* const dx = dbias + p.out;
  for (int64_t m = 0; m < p.rows; ++m) {
    const T* const gm = g + m * p.out;
    const T* const sm = s + m * p.r;
    if (p.db != nullptr) {
      for (int64_t k = 0; k < p.r; ++k) t[k] = D::load(d[k]) * E::load(sm[k]);
    }
    std::fill(dt, dt + p.r, 0.0f);
    for (int64_t j = 0; j < p.out; ++j) {
      const float gj = E::load(gm[j]);
      const T* const Bj = Bm + j * p.B_stride;
      if (p.db != nullptr) db[j] += gj * dot<F32, E>(t, Bj, p.r);
      if (need_dt) add_scaled<E>(dt, gj * B::load(b[j]), Bj, p.r);
      dbias[j] += gj;
    }
    if (p.dd != nullptr) {
      for (int64_t k = 0; k < p.r; ++k) dd[k] += dt[k] * E::load(sm[k]);
    }
    if (p.dx != nullptr) {
      std::fill(dx, dx + p.in, 0.0f);
      if (W != nullptr) {
        for (int64_t j = 0; j < p.out; ++j) add_scaled<E>(dx, E::load(gm[j]), W + j * p.W_stride, p.in);
      }
      for (int64_t k = 0; k < p.r; ++k) add_scaled<E>(dx, D::load(d[k]) * dt[k], A + k * p.A_stride, p.in);
      T* const dxm = static_cast<T*>(p.dx) + m * p.in;
      for (int64_t i = 0; i < p.in; ++i) dxm[i] = E::store(dx[i]);
    }
  }
  if (p.dd != nullptr) {
    for (int64_t k = 0; k < p.r; ++k) static_cast<typename D::type*>(p.dd)[k] = D::store(dd[k]);
  }
  if (p.db != nullptr) {
    for (int64_t j = 0; j < p.out; ++j) static_cast<typename B::type*>(p.db)[j] = B::store(db[j]);
  }
  if (p.dbias != nullptr) {
    for (int64_t j = 0; j < p.out; ++j) static_cast<T*>(p.dbias)[j] = E::store(dbias[j]);
  }
}

}  // namespace

void fold_projection_cpu(const FoldProjection& p) {
  dispatch_projection_dtypes(p, [&](auto e, auto d, auto b) {
    at::parallel_for(0, p.rows, grain_rows(p.cols), [&](int64_t begin, int64_t end) {
      fold_rows<decltype(e), decltype(d), decltype(b)>(p, begin, end);
    });
  });
}

void lambda_grads_cpu(const LambdaGrads& p) {
  dispatch_projection_dtypes(p, [&](auto e, auto d, auto b) {
    using E = decltype(e);
    using D = decltype(d);
    using B = decltype(b);
    if (p.db != nullptr) {
      at::parallel_for(0, p.rows, grain_rows(p.cols), [&](int64_t begin, int64_t end) {
        db_rows<E, D, B>(p, begin, end);
      });
    }
    if (p.dd != nullptr) {
      const int64_t blocks = (p.cols + kSumColBlock - 1) / kSumColBlock;
      at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t block = begin; block < end; ++block) dd_block<E, D, B>(p, block * kSumColBlock);
      });
    }
  });
}

void gather_scale_cpu(const GatherScale& p) {
  dispatch_dtype(p.dtype, [&](auto e) {
    dispatch_dtype(p.v_dtype, [&](auto v) {
      at::parallel_for(0, p.rows, grain_rows(p.cols), [&](int64_t begin, int64_t end) {
        if (p.accumulate) {
          gather_scale_rows<decltype(e), decltype(v), true>(p, begin, end);
        } else {
          gather_scale_rows<decltype(e), decltype(v), false>(p, begin, end);
        }
      });
    });
  });
}

void column_sums_cpu(const ColumnSums& p) {
  const int64_t blocks = (p.cols + kSumColBlock - 1) / kSumColBlock;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, p.rows * kSumColBlock));
  dispatch_dtype(p.dtype, [&](auto e) {
    dispatch_dtype(p.out_dtype, [&](auto o) {
      at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
        for (int64_t block = begin; block < end; ++block) {
          column_sums_block<decltype(e), decltype(o)>(p, block * kSumColBlock);
        }
      });
    });
  });
}

void small_forward_cpu(const SmallForward& p) {
  dispatch_projection_dtypes(p, [&](auto e, auto d, auto b) { small_forward<decltype(e), decltype(d), decltype(b)>(p); });
}

void small_backward_cpu(const SmallBackward& p) {
  dispatch_projection_dtypes(p, [&](auto e, auto d, auto b) { small_backward<decltype(e), decltype(d), decltype(b)>(p); });
}

}  // namespace vera
