// The CUDA decode kernels' per-lane work (csrc/vera_math.h: decode_layout, decode_shrink_warp_lane,
// decode_expand_warp_lane), run on the CPU for every lane of every warp, without torch or a GPU: every
// column of a split or of B's row is added by exactly one lane, the vector paths are taken only where every
// 16-byte load is aligned (each one is checked), and the sums equal the exact ones. Inputs are small
// integers, so every fp32 sum is exact and any lost, doubled or misplaced element shows.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

static int misaligned_loads = 0;
static int vector_shrinks = 0, vector_expands = 0;  // cases that took the vector paths
#define VERA_DECODE_CHECK_ALIGNED(p) (misaligned_loads += reinterpret_cast<uintptr_t>(p) % 16 != 0)

#include "vera_math.h"

namespace {

using vera::DecodeAdapter;
using vera::kDecodeLanes;
using vera::kDecodeMaxRows;

int failures = 0;

void expect(bool ok, const char* what, long long a, long long b, long long c) {
  if (!ok) {
    std::printf("FAIL %s (%lld, %lld, %lld)\n", what, a, b, c);
    ++failures;
  }
}

uint32_t state = 12345;
int small_int() {  // -3..3
  state = state * 1664525u + 1013904223u;
  return int((state >> 16) % 7) - 3;
}

// Storage of the element type E, 64-byte aligned, holding `count` elements plus `offset` elements before
// them (to misalign the first on purpose).
template <typename E>
struct Buffer {
  using T = typename E::type;
  std::vector<unsigned char> bytes;
  T* data;
  Buffer(int64_t count, int64_t offset) : bytes((count + offset) * sizeof(T) + 64) {
    const uintptr_t base = (reinterpret_cast<uintptr_t>(bytes.data()) + 63) / 64 * 64;
    data = reinterpret_cast<T*>(base) + offset;
  }
};

// Every lane's deal of [0, n) for V-element chunks: each column exactly once; chunks start at multiples of V.
template <int V>
void test_lane_columns() {
  for (int64_t n = 0; n <= 700; ++n) {
    std::vector<int> seen(n, 0);
    for (int lane = 0; lane < kDecodeLanes; ++lane) {
      vera::for_lane_columns<V>(
          n, lane,
          [&](int64_t i) {
            expect(i % V == 0 && i + V <= n, "chunk start", n, i, V);
            for (int v = 0; v < V; ++v) ++seen[i + v];
          },
          [&](int64_t i) { ++seen[i]; });
    }
    for (int64_t i = 0; i < n; ++i) expect(seen[i] == 1, "column dealt once", n, i, seen[i]);
  }
}

// One decode problem: x (rows x in, row stride x_stride, first element `offset` elements past an aligned
// address), A (r x in, A_stride), B (out x r, B_stride), and t as the second stage leaves it; runs the
// layout, the shrink's and the expand's lanes as the kernels do, and compares with exact sums.
template <typename E>
void run_case(int64_t rows, int64_t in, int64_t r, int64_t out, int64_t splits, int64_t x_stride, int64_t B_stride,
              int64_t offset) {
  using T = typename E::type;
  const int64_t vec = vera::kVectorElems<E>, A_stride = x_stride;
  Buffer<E> x(rows * x_stride, offset), A(r * A_stride, offset), B(out * B_stride, offset);
  std::vector<int> xi(rows * in), ai(r * in), bi(out * r);
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t i = 0; i < in; ++i) x.data[m * x_stride + i] = E::store(float(xi[m * in + i] = small_int()));
  for (int64_t k = 0; k < r; ++k)
    for (int64_t i = 0; i < in; ++i) A.data[k * A_stride + i] = E::store(float(ai[k * in + i] = small_int()));
  for (int64_t j = 0; j < out; ++j)
    for (int64_t k = 0; k < r; ++k) B.data[j * B_stride + k] = E::store(float(bi[j * r + k] = small_int()));

  // The scratch, as the glue allocates it (the CUDA caching allocator aligns to far more than 16 bytes).
  std::vector<float> scratch_storage(vera::decode_scratch_floats(rows, r, splits) + 16);
  float* const scratch = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scratch_storage.data()) + 63) / 64 * 64);
  DecodeAdapter p{};
  p.x = x.data;
  p.A = A.data;
  p.B = B.data;
  p.x_stride = x_stride;
  p.A_stride = A_stride;
  p.B_stride = B_stride;
  p.rows = rows;
  p.in = in;
  p.r = r;
  p.out = out;
  p.splits = splits;
  p.scratch = scratch;
  const vera::DecodeLayout layout = vera::decode_layout(p, vera::kVectorElems<E>, sizeof(T));
  // The vector paths exactly where every row start is 16-byte aligned (and t's rows, r a multiple of 4).
  const bool shrink_can = offset == 0 && x_stride % vec == 0;
  const bool expand_can = offset == 0 && (out == 1 || B_stride % vec == 0) && r % 4 == 0;
  expect((layout.shrink_vec > 1) == shrink_can, "shrink path", rows, in, layout.shrink_vec);
  expect((layout.expand_vec > 1) == expand_can, "expand path", out, r, layout.expand_vec);
  vector_shrinks += layout.shrink_vec > 1;
  vector_expands += layout.expand_vec > 1;
  expect(layout.split_len % (kDecodeLanes * layout.shrink_vec) == 0 && layout.split_len * splits >= in,
         "split length", in, splits, layout.split_len);

  // Stage 1, every (split, rank row, lane); the warp's butterfly sums the lanes (exact here in any order).
  const auto shrink = [&](auto vec) {
    constexpr int V = decltype(vec)::value;
    for (int64_t c = 0; c < splits; ++c) {
      for (int64_t k = 0; k < r; ++k) {
        float total[kDecodeMaxRows] = {};
        for (int lane = 0; lane < kDecodeLanes; ++lane) {
          float acc[kDecodeMaxRows] = {};
          vera::decode_shrink_warp_lane<E, V>(acc, p, layout.split_len, k, c, lane);
          for (int m = 0; m < kDecodeMaxRows; ++m) total[m] += acc[m];
        }
        for (int64_t m = 0; m < rows; ++m) scratch[(c * rows + m) * r + k] = total[m];
        for (int64_t m = rows; m < kDecodeMaxRows; ++m) expect(total[m] == 0.0f, "row past rows", m, k, c);
      }
    }
  };
  if (layout.shrink_vec > 1) {
    shrink(std::integral_constant<int, vera::kVectorElems<E>>{});
  } else {
    shrink(std::integral_constant<int, 1>{});
  }
  // Stage 2 (d = 1): t = σ, the split sums; checked against the exact x Aᵀ.
  float* const t = scratch + vera::decode_t_offset(rows, r, splits);
  expect(reinterpret_cast<uintptr_t>(t) % 16 == 0, "t aligned", rows, r, splits);
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t k = 0; k < r; ++k) {
      float sigma = 0.0f;
      for (int64_t c = 0; c < splits; ++c) sigma += scratch[(c * rows + m) * r + k];
      long long want = 0;
      for (int64_t i = 0; i < in; ++i) want += xi[m * in + i] * ai[k * in + i];
      expect(sigma == float(want), "shrink sum", m, k, want);
      t[m * r + k] = sigma;
    }
  }
  // Stage 3, every (column, lane); checked against the exact t Bᵀ.
  const auto expand = [&](auto vec) {
    constexpr int V = decltype(vec)::value;
    for (int64_t j = 0; j < out; ++j) {
      float total[kDecodeMaxRows] = {};
      for (int lane = 0; lane < kDecodeLanes; ++lane) {
        float acc[kDecodeMaxRows] = {};
        vera::decode_expand_warp_lane<E, V>(acc, p, j, lane);
        for (int m = 0; m < kDecodeMaxRows; ++m) total[m] += acc[m];
      }
      for (int64_t m = 0; m < rows; ++m) {
        long long want = 0;
        for (int64_t k = 0; k < r; ++k) {
          long long s = 0;
          for (int64_t i = 0; i < in; ++i) s += xi[m * in + i] * ai[k * in + i];
          want += s * bi[j * r + k];
        }
        expect(total[m] == float(want), "expand sum", m, j, want);
      }
    }
  };
  if (layout.expand_vec > 1) {
    expand(std::integral_constant<int, vera::kVectorElems<E>>{});
  } else {
    expand(std::integral_constant<int, 1>{});
  }
}

template <typename E>
void test_cases() {
  const int64_t vec = vera::kVectorElems<E>;
  struct Shape {
    int64_t rows, in, r, out, splits;
  };
  const Shape shapes[] = {
      {1, 64, 8, 16, 1},     {1, 1000, 7, 5, 3},    {3, 333, 17, 9, 2},  {16, 512, 64, 40, 2},
      {16, 1030, 12, 33, 5}, {5, 8, 3, 1, 1},       {2, 4096, 33, 3, 16}, {7, 300, 40, 11, 4},
  };
  for (const Shape& s : shapes) {
    const int64_t in_aligned = (s.in + vec - 1) / vec * vec, r_aligned = (s.r + vec - 1) / vec * vec;
    for (int64_t offset : {0, 1}) {  // 1: the first element one element past a 16-byte boundary
      // Row strides padded to 16 bytes (vector paths where the rest allows), then as the sizes fall.
      run_case<E>(s.rows, s.in, s.r, s.out, s.splits, in_aligned, r_aligned, offset);
      run_case<E>(s.rows, s.in, s.r, s.out, s.splits, s.in, s.r, offset);
    }
  }
}

}  // namespace

int main() {
  test_lane_columns<1>();
  test_lane_columns<4>();
  test_lane_columns<8>();
  test_cases<vera::Elem<vera::Dtype::kFloat32>>();
  test_cases<vera::Elem<vera::Dtype::kBFloat16>>();
  test_cases<vera::Elem<vera::Dtype::kFloat16>>();
  expect(misaligned_loads == 0, "misaligned 16-byte loads", misaligned_loads, 0, 0);
  expect(vector_shrinks >= 24 && vector_expands >= 12, "vector paths taken", vector_shrinks, vector_expands, 0);
  if (failures != 0) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("test_decode: all passed\n");
  return 0;
}
