// Torch glue: every argument is checked before any work, then the raw-pointer kernels of projection.h run.
#include "vera_ops.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>

#include "projection.h"

#ifdef VERA_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

namespace vera {

namespace {

constexpr int64_t kWordEnd = int64_t(1) << 32;
// The scheme's counters hold the row in 32 bits and the column group (col / 4) in 32 bits; past these
// bounds elements would repeat.
constexpr int64_t kMaxRows = kWordEnd;
constexpr int64_t kMaxCols = kWordEnd * 4;

OutKind out_kind(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return OutKind::kFloat32;
    case at::kBFloat16:
      return OutKind::kBFloat16Bits;
    case at::kHalf:
      return OutKind::kFloat16Bits;
    default:
      TORCH_CHECK(false, "fill_projection_: out must be float32, bfloat16 or float16, got ", dtype);
  }
}

void check_device(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cpu() || t.is_cuda(), op, ": ", name, " must be a CPU or CUDA tensor, got device ",
              t.device());
#ifndef VERA_WITH_CUDA
  TORCH_CHECK(!t.is_cuda(), op, ": ", name,
              " is a CUDA tensor but vera_kernels._C was built without CUDA (rebuild with "
              "VERA_KERNELS_CUDA=1 and a CUDA build of torch)");
#endif
}

#ifdef VERA_WITH_CUDA
void check_cuda(const char* op, const char* error) {
  TORCH_CHECK(error == nullptr, op, ": CUDA kernel launch failed: ", error);
}

void* current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}
#endif

}  // namespace

void fill_projection_(at::Tensor out, int64_t seed, int64_t tag, int64_t fan_in, int64_t row_offset,
                      int64_t col_offset) {
  constexpr const char* op = "fill_projection_";
  TORCH_CHECK(out.dim() == 2, op, ": out must be a 2-D tensor, got ", out.dim(), "-D");
  const OutKind kind = out_kind(out.scalar_type());
  check_device(op, "out", out);
  TORCH_CHECK(seed >= 0, op, ": seed must be in [0, 2^63), got ", seed);
  TORCH_CHECK(tag == 0 || tag == 1, op, ": tag must be 0 (A) or 1 (B), got ", tag);
  TORCH_CHECK(fan_in >= 1, op, ": fan_in must be >= 1, got ", fan_in);
  TORCH_CHECK(row_offset >= 0, op, ": row_offset must be >= 0, got ", row_offset);
  TORCH_CHECK(col_offset >= 0, op, ": col_offset must be >= 0, got ", col_offset);
  const int64_t rows = out.size(0), cols = out.size(1);
  TORCH_CHECK(row_offset <= kMaxRows - rows, op, ": row_offset + out.size(0) must be <= 2^32, got ",
              row_offset, " + ", rows);
  TORCH_CHECK(col_offset <= kMaxCols - cols, op, ": col_offset + out.size(1) must be <= 2^34, got ",
              col_offset, " + ", cols);
  // Threads writing one element through two indices would race.
  at::assert_no_internal_overlap(out);
  if (out.numel() == 0) return;

  ProjectionFill p;
  p.out = out.data_ptr();
  p.kind = kind;
  p.rows = rows;
  p.cols = cols;
  p.stride0 = out.stride(0);
  p.stride1 = out.stride(1);
  p.row_offset = row_offset;
  p.col_offset = col_offset;
  p.seed = uint64_t(seed);
  p.tag = uint32_t(tag);
  p.scale = projection_scale(fan_in);
#ifdef VERA_WITH_CUDA
  if (out.is_cuda()) {
    const c10::DeviceGuard guard(out.device());
    check_cuda(op, fill_projection_cuda(p, current_stream(out)));
    return;
  }
#endif
  fill_projection_cpu(p);
}

at::Tensor philox4x32_10(const at::Tensor& counters, const at::Tensor& keys) {
  constexpr const char* op = "philox4x32_10";
  TORCH_CHECK(counters.scalar_type() == at::kLong, op, ": counters must be int64, got ",
              counters.scalar_type());
  TORCH_CHECK(keys.scalar_type() == at::kLong, op, ": keys must be int64, got ", keys.scalar_type());
  TORCH_CHECK(counters.dim() == 2 && counters.size(1) == 4, op, ": counters must have shape (N, 4), got ",
              counters.sizes());
  TORCH_CHECK(keys.dim() == 2 && keys.size(1) == 2, op, ": keys must have shape (N, 2), got ",
              keys.sizes());
  TORCH_CHECK(counters.size(0) == keys.size(0), op, ": counters and keys must have the same N, got ",
              counters.size(0), " and ", keys.size(0));
  check_device(op, "counters", counters);
  check_device(op, "keys", keys);
  TORCH_CHECK(counters.device() == keys.device(), op,
              ": counters and keys must be on the same device, got ", counters.device(), " and ",
              keys.device());
  TORCH_CHECK(counters.is_contiguous(), op, ": counters must be contiguous");
  TORCH_CHECK(keys.is_contiguous(), op, ": keys must be contiguous");
  // A known-answer helper, not a hot path: the range check may synchronize a CUDA device.
  const auto check_words = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.numel() == 0 || (t.min().item<int64_t>() >= 0 && t.max().item<int64_t>() < kWordEnd), op,
                ": ", name, " values must be in [0, 2^32)");
  };
  check_words("counters", counters);
  check_words("keys", keys);

  at::Tensor out = at::empty({counters.size(0), 4}, counters.options());
  const int64_t n = counters.size(0);
#ifdef VERA_WITH_CUDA
  if (counters.is_cuda()) {
    const c10::DeviceGuard guard(counters.device());
    check_cuda(op, philox4x32_10_cuda(counters.const_data_ptr<int64_t>(), keys.const_data_ptr<int64_t>(),
                                      out.mutable_data_ptr<int64_t>(), n, current_stream(counters)));
    return out;
  }
#endif
  philox4x32_10_cpu(counters.const_data_ptr<int64_t>(), keys.const_data_ptr<int64_t>(),
                    out.mutable_data_ptr<int64_t>(), n);
  return out;
}

bool built_with_cuda() {
#ifdef VERA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace vera
