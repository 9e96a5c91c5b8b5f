// CPU kernels for projection.h.
#include <ATen/Parallel.h>

#include <algorithm>

#include "projection.h"

namespace vera {

namespace {

// Chunks of about this many elements per task, ATen's usual grain.
constexpr int64_t kGrainElements = 32768;

template <typename Traits>
void fill_rows(const ProjectionFill& p, int64_t begin, int64_t end) {
  using T = typename Traits::type;
  T* const out = static_cast<T*>(p.out);
  for (int64_t i = begin; i < end; ++i) {
    const uint64_t row = uint64_t(p.row_offset + i);
    T* const out_row = out + i * p.stride0;
    // One Philox call serves the (up to) four columns of a group; the first and last groups of the
    // range may be partial when col_offset or the end is not a multiple of 4.
    int64_t j = 0;
    while (j < p.cols) {
      const uint64_t col = uint64_t(p.col_offset + j);
      const PhiloxWords words = projection_words(p.seed, p.tag, row, col >> 2);
      for (uint32_t lane = uint32_t(col & 3); lane < 4 && j < p.cols; ++lane, ++j) {
        out_row[j * p.stride1] = Traits::encode(projection_value_from_word(words.w[lane], p.scale));
      }
    }
  }
}

}  // namespace

void fill_projection_cpu(const ProjectionFill& p) {
  const int64_t grain_rows = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, p.cols));
  dispatch_out_kind(p.kind, [&](auto traits) {
    using Traits = decltype(traits);
    at::parallel_for(0, p.rows, grain_rows,
                     [&](int64_t begin, int64_t end) { fill_rows<Traits>(p, begin, end); });
  });
}

void philox4x32_10_cpu(const int64_t* counters, const int64_t* keys, int64_t* out, int64_t n) {
  at::parallel_for(0, n, kGrainElements / 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint32_t ctr[4] = {uint32_t(counters[4 * i]), uint32_t(counters[4 * i + 1]),
                               uint32_t(counters[4 * i + 2]), uint32_t(counters[4 * i + 3])};
      const uint32_t key[2] = {uint32_t(keys[2 * i]), uint32_t(keys[2 * i + 1])};
      const PhiloxWords words = philox4x32_10(ctr, key);
      for (int k = 0; k < 4; ++k) out[4 * i + k] = int64_t(words.w[k]);
    }
  });
}

}  // namespace vera
