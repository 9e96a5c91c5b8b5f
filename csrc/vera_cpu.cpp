// CPU kernels for vera_math.h: at::parallel_for over rows or column blocks, inner loops over contiguous
// elements that the compiler vectorizes. Results do not depend on the thread count: every output element
// is computed by one task in a fixed order.
#include <ATen/Parallel.h>

#include <algorithm>

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

template <typename E, typename V>
void scale_rows(const Scale& p, int64_t begin, int64_t end) {
  using T = typename E::type;
  const T* const in = static_cast<const T*>(p.in);
  T* const out = static_cast<T*>(p.out);
  const typename V::type* const v = static_cast<const typename V::type*>(p.v);
  for (int64_t i = begin; i < end; ++i) {
    const T* const src = in + i * p.cols;
    T* const dst = out + i * p.cols;
    if (p.per_row) {
      const float vi = V::load(v[i]);
      for (int64_t j = 0; j < p.cols; ++j) dst[j] = E::store(E::load(src[j]) * vi);
    } else {
      for (int64_t j = 0; j < p.cols; ++j) dst[j] = E::store(product<E, V>(src[j], v[j]));
    }
  }
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

template <typename E, typename O, bool kProduct>
void column_sums_block(const ColumnSums& p, int64_t col_begin) {
  using T = typename E::type;
  const T* const a = static_cast<const T*>(p.a);
  const T* const b = static_cast<const T*>(p.b);
  const int64_t width = std::min(kSumColBlock, p.cols - col_begin);
  float total[kSumColBlock] = {};
  float chunk[kSumColBlock];
  for (int64_t row_begin = 0; row_begin < p.rows; row_begin += kSumRowChunk) {
    const int64_t row_end = std::min(row_begin + kSumRowChunk, p.rows);
    std::fill(chunk, chunk + width, 0.0f);
    for (int64_t i = row_begin; i < row_end; ++i) {
      const T* const a_row = a + i * p.cols + col_begin;
      if (kProduct) {
        const T* const b_row = b + i * p.cols + col_begin;
        for (int64_t j = 0; j < width; ++j) chunk[j] += product<E, E>(a_row[j], b_row[j]);
      } else {
        for (int64_t j = 0; j < width; ++j) chunk[j] += E::load(a_row[j]);
      }
    }
    for (int64_t j = 0; j < width; ++j) total[j] += chunk[j];
  }
  typename O::type* const out = static_cast<typename O::type*>(p.out) + col_begin;
  for (int64_t j = 0; j < width; ++j) out[j] = O::store(total[j]);
}

template <typename E, typename O>
void row_dots_rows(const RowDots& p, int64_t begin, int64_t end) {
  using T = typename E::type;
  for (int64_t i = begin; i < end; ++i) {
    const T* const a = static_cast<const T*>(p.a) + i * p.cols;
    const T* const b = static_cast<const T*>(p.b) + i * p.cols;
    float lanes[kDotLanes] = {};
    int64_t j = 0;
    for (; j + kDotLanes <= p.cols; j += kDotLanes) {
      for (int64_t l = 0; l < kDotLanes; ++l) lanes[l] += product<E, E>(a[j + l], b[j + l]);
    }
    for (int64_t l = 0; j + l < p.cols; ++l) lanes[l] += product<E, E>(a[j + l], b[j + l]);
    float sum = 0.0f;
    for (int64_t l = 0; l < kDotLanes; ++l) sum += lanes[l];
    static_cast<typename O::type*>(p.out)[i] = O::store(sum);
  }
}

}  // namespace

void scale_cpu(const Scale& p) {
  dispatch_dtype(p.dtype, [&](auto e) {
    dispatch_dtype(p.v_dtype, [&](auto v) {
      at::parallel_for(0, p.rows, grain_rows(p.cols), [&](int64_t begin, int64_t end) {
        scale_rows<decltype(e), decltype(v)>(p, begin, end);
      });
    });
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
          if (p.b != nullptr) {
            column_sums_block<decltype(e), decltype(o), true>(p, block * kSumColBlock);
          } else {
            column_sums_block<decltype(e), decltype(o), false>(p, block * kSumColBlock);
          }
        }
      });
    });
  });
}

void row_dots_cpu(const RowDots& p) {
  dispatch_dtype(p.dtype, [&](auto e) {
    dispatch_dtype(p.out_dtype, [&](auto o) {
      at::parallel_for(0, p.rows, grain_rows(p.cols), [&](int64_t begin, int64_t end) {
        row_dots_rows<decltype(e), decltype(o)>(p, begin, end);
      });
    });
  });
}

}  // namespace vera
