// CUDA kernels for projection.h. Only CUDA headers here: torch is bound in vera_ops.cpp.
#include <cuda_runtime.h>

#include <algorithm>

#include "projection.h"

namespace vera {

namespace {

constexpr int kFillThreadsX = 64;  // column groups of 4 per block
constexpr int kFillThreadsY = 4;   // rows per block
constexpr int kPhiloxThreads = 256;
// The y grid dimension is capped by CUDA at 65535; x is capped here too. Grid-stride loops cover the rest.
constexpr int64_t kMaxBlocksY = 65535;
constexpr int64_t kMaxBlocksX = 1 << 16;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One thread per (row, group of 4 columns): one Philox call yields the four elements of the group. The
// first and last groups of the range may be partial when col_offset or its end is not a multiple of 4.
template <typename Traits>
__global__ void fill_projection_kernel(ProjectionFill p, int64_t first_group, int64_t num_groups) {
  using T = typename Traits::type;
  T* const out = static_cast<T*>(p.out);
  const int64_t col_end = p.col_offset + p.cols;
  for (int64_t i = blockIdx.y * int64_t(blockDim.y) + threadIdx.y; i < p.rows;
       i += int64_t(gridDim.y) * blockDim.y) {
    const uint64_t row = uint64_t(p.row_offset + i);
    T* const out_row = out + i * p.stride0;
    for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < num_groups;
         g += int64_t(gridDim.x) * blockDim.x) {
      const int64_t group = first_group + g;
      const PhiloxWords words = projection_words(p.seed, p.tag, row, uint64_t(group));
      const int64_t begin = group * 4 > p.col_offset ? group * 4 : p.col_offset;
      const int64_t end = group * 4 + 4 < col_end ? group * 4 + 4 : col_end;
      for (int64_t col = begin; col < end; ++col) {
        out_row[(col - p.col_offset) * p.stride1] =
            Traits::encode(projection_value_from_word(words.w[col & 3], p.scale));
      }
    }
  }
}

__global__ void philox4x32_10_kernel(const int64_t* counters, const int64_t* keys, int64_t* out,
                                     int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const uint32_t ctr[4] = {uint32_t(counters[4 * i]), uint32_t(counters[4 * i + 1]),
                             uint32_t(counters[4 * i + 2]), uint32_t(counters[4 * i + 3])};
    const uint32_t key[2] = {uint32_t(keys[2 * i]), uint32_t(keys[2 * i + 1])};
    const PhiloxWords words = philox4x32_10(ctr, key);
    for (int k = 0; k < 4; ++k) out[4 * i + k] = int64_t(words.w[k]);
  }
}

const char* last_launch_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* fill_projection_cuda(const ProjectionFill& p, void* stream) {
  if (p.rows == 0 || p.cols == 0) return nullptr;  // a zero-sized grid is a launch error
  const int64_t first_group = p.col_offset / 4;
  const int64_t num_groups = (p.col_offset + p.cols - 1) / 4 - first_group + 1;
  const dim3 block(kFillThreadsX, kFillThreadsY);
  const dim3 grid(unsigned(std::min(ceil_div(num_groups, kFillThreadsX), kMaxBlocksX)),
                  unsigned(std::min(ceil_div(p.rows, kFillThreadsY), kMaxBlocksY)));
  dispatch_out_kind(p.kind, [&](auto traits) {
    fill_projection_kernel<decltype(traits)>
        <<<grid, block, 0, static_cast<cudaStream_t>(stream)>>>(p, first_group, num_groups);
  });
  return last_launch_error();
}

const char* philox4x32_10_cuda(const int64_t* counters, const int64_t* keys, int64_t* out, int64_t n,
                               void* stream) {
  if (n == 0) return nullptr;
  const unsigned blocks = unsigned(std::min(ceil_div(n, kPhiloxThreads), kMaxBlocksX));
  philox4x32_10_kernel<<<blocks, kPhiloxThreads, 0, static_cast<cudaStream_t>(stream)>>>(counters, keys,
                                                                                          out, n);
  return last_launch_error();
}

}  // namespace vera
