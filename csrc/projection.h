// Raw-pointer kernels for the shared projections and for Philox itself, on CPU and CUDA.
//
// Free of torch and CUDA headers: the .cu file includes it without torch, the glue without the CUDA
// runtime (a stream travels as void*). The glue validates every argument; these functions trust them.
#pragma once

#include <cstdint>

#include "philox.h"

namespace vera {

enum class OutKind { kFloat32, kBFloat16Bits, kFloat16Bits };

// The element type stored for each OutKind and the rounding that produces it.
template <OutKind K>
struct OutTraits;

template <>
struct OutTraits<OutKind::kFloat32> {
  using type = float;
  static VERA_HD float encode(float v) { return v; }
};

template <>
struct OutTraits<OutKind::kBFloat16Bits> {
  using type = uint16_t;
  static VERA_HD uint16_t encode(float v) { return fp32_to_bf16_bits(v); }
};

template <>
struct OutTraits<OutKind::kFloat16Bits> {
  using type = uint16_t;
  static VERA_HD uint16_t encode(float v) { return fp32_to_fp16_bits(v); }
};

// Calls f(OutTraits<kind>{}), turning the runtime kind into a compile-time one.
template <typename F>
void dispatch_out_kind(OutKind kind, F&& f) {
  switch (kind) {
    case OutKind::kFloat32:
      f(OutTraits<OutKind::kFloat32>{});
      return;
    case OutKind::kBFloat16Bits:
      f(OutTraits<OutKind::kBFloat16Bits>{});
      return;
    case OutKind::kFloat16Bits:
      f(OutTraits<OutKind::kFloat16Bits>{});
      return;
  }
}

// out[i * stride0 + j * stride1] = element (row_offset + i, col_offset + j), 0 <= i < rows, 0 <= j < cols,
// of the matrix given by (seed, tag, scale). Strides are in elements.
struct ProjectionFill {
  void* out;
  OutKind kind;
  int64_t rows, cols;
  int64_t stride0, stride1;
  int64_t row_offset, col_offset;
  uint64_t seed;
  uint32_t tag;
  float scale;
};

void fill_projection_cpu(const ProjectionFill& p);

// n Philox4x32-10 evaluations: counters n x 4, keys n x 2 (values in [0, 2^32)), out n x 4, all
// contiguous int64.
void philox4x32_10_cpu(const int64_t* counters, const int64_t* keys, int64_t* out, int64_t n);

// CUDA launchers on `stream` (a cudaStream_t). They return nullptr on success, else the CUDA error
// string. Defined only in builds with VERA_WITH_CUDA.
const char* fill_projection_cuda(const ProjectionFill& p, void* stream);
const char* philox4x32_10_cuda(const int64_t* counters, const int64_t* keys, int64_t* out, int64_t n,
                               void* stream);

}  // namespace vera
