// Torch-facing entry points of the extension: argument checks, then dispatch to the CPU or CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace vera {

// Fills the 2-D tensor `out` (float32, bfloat16 or float16; CPU or CUDA; any strides) with the block of
// the shared projection matrix `tag` (0: A, 1: B) starting at (row_offset, col_offset), for `seed` and
// the Kaiming-uniform bound of `fan_in`.
void fill_projection_(at::Tensor out, int64_t seed, int64_t tag, int64_t fan_in, int64_t row_offset,
                      int64_t col_offset);

// Philox4x32-10 on each row of `counters` (N x 4) with the matching row of `keys` (N x 2): int64 tensors
// with values in [0, 2^32), contiguous, on the same device. Returns N x 4 int64.
at::Tensor philox4x32_10(const at::Tensor& counters, const at::Tensor& keys);

// Whether the CUDA kernels were compiled in.
bool built_with_cuda();

}  // namespace vera
