// CUDA kernels for vera_math.h. Only CUDA headers here: torch is bound in vera_ops.cpp. The reductions
// use no atomics: each output element is summed by one thread (or one warp) in a fixed order, so two runs
// give the same bits.
#include <cuda_runtime.h>

#include <algorithm>

#include "vera_math.h"

namespace vera {

namespace {

constexpr int kScaleThreadsX = 64;  // columns per block
constexpr int kScaleThreadsY = 4;   // rows per block
constexpr int kSumThreads = 256;    // columns per block of the column sums
constexpr int kWarp = 32;
constexpr int kDotWarps = 8;  // rows per block of the row dots, one warp each
// The y grid dimension is capped by CUDA at 65535; x is capped here too. Grid-stride loops cover the rest.
constexpr int64_t kMaxBlocksY = 65535;
constexpr int64_t kMaxBlocksX = 1 << 16;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned blocks_x(int64_t n, int64_t per_block) { return unsigned(std::min(ceil_div(n, per_block), kMaxBlocksX)); }

unsigned blocks_y(int64_t n, int64_t per_block) { return unsigned(std::min(ceil_div(n, per_block), kMaxBlocksY)); }

template <typename E, typename D, typename B>
__global__ void fold_projection_kernel(FoldProjection p) {
  using T = typename E::type;
  const T* const in = static_cast<const T*>(p.B);
  T* const out = static_cast<T*>(p.out);
  const typename D::type* const d = static_cast<const typename D::type*>(p.d);
  const typename B::type* const b = static_cast<const typename B::type*>(p.b);
  for (int64_t i = blockIdx.y * int64_t(blockDim.y) + threadIdx.y; i < p.rows;
       i += int64_t(gridDim.y) * blockDim.y) {
    const float bi = B::load(b[i]);
    for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < p.cols;
         j += int64_t(gridDim.x) * blockDim.x) {
      const int64_t k = i * p.cols + j;
      out[k] = E::store(bi * E::load(in[k]) * D::load(d[j]));
    }
  }
}

template <typename E, typename V>
__global__ void gather_scale_kernel(GatherScale p) {
  using T = typename E::type;
  const T* const in = static_cast<const T*>(p.in);
  T* const out = static_cast<T*>(p.out);
  const typename V::type* const bank = static_cast<const typename V::type*>(p.v);
  for (int64_t i = blockIdx.y * int64_t(blockDim.y) + threadIdx.y; i < p.rows;
       i += int64_t(gridDim.y) * blockDim.y) {
    const int64_t id = p.ids[i];
    if (id < 0 && p.accumulate) continue;  // the base alone: y keeps the base output bit for bit
    for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < p.cols;
         j += int64_t(gridDim.x) * blockDim.x) {
      const int64_t k = i * p.cols + j;
      out[k] = id < 0 ? E::store(0.0f) : gather_scale_element<E, V>(out[k], in[k], bank[id * p.cols + j], p.accumulate);
    }
  }
}

// Stage 1: scratch[c, j] = the fp32 sum of column j over the rows of chunk c. Consecutive threads read
// consecutive columns of a row: coalesced.
template <typename E>
__global__ void column_chunk_sums_kernel(ColumnSums p, float* scratch, int64_t chunks) {
  using T = typename E::type;
  const T* const a = static_cast<const T*>(p.a);
  for (int64_t c = blockIdx.y; c < chunks; c += gridDim.y) {
    const int64_t row_begin = c * kSumRowChunk;
    const int64_t row_end = row_begin + kSumRowChunk < p.rows ? row_begin + kSumRowChunk : p.rows;
    for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < p.cols;
         j += int64_t(gridDim.x) * blockDim.x) {
      float sum = 0.0f;
      for (int64_t i = row_begin; i < row_end; ++i) {
        sum += E::load(a[i * p.cols + j]);
      }
      scratch[c * p.cols + j] = sum;
    }
  }
}

// Stage 2: out[j] = the chunk sums of column j added in row order.
template <typename O>
__global__ void column_total_kernel(void* out, const float* scratch, int64_t chunks, int64_t cols) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < cols; j += int64_t(gridDim.x) * blockDim.x) {
    float total = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) total += scratch[c * cols + j];
    static_cast<typename O::type*>(out)[j] = O::store(total);
  }
}

// db: one warp per row j, lane l sums columns l, l + 32, ... of B[j, k] d[k] G[j, k]; then a butterfly over
// the lanes, the same order in every run.
template <typename E, typename D, typename B>
__global__ void db_rows_kernel(LambdaGrads p) {
  using T = typename E::type;
  const typename D::type* const d = static_cast<const typename D::type*>(p.d);
  const int lane = threadIdx.x % kWarp;
  for (int64_t i = blockIdx.x * int64_t(kDotWarps) + threadIdx.x / kWarp; i < p.rows;
       i += int64_t(gridDim.x) * kDotWarps) {
    const T* const Bi = static_cast<const T*>(p.B) + i * p.cols;
    const float* const Gi = p.G + i * p.cols;
    float sum = 0.0f;
    for (int64_t j = lane; j < p.cols; j += kWarp) sum += E::load(Bi[j]) * D::load(d[j]) * Gi[j];
    for (int offset = kWarp / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, offset);
    if (lane == 0) static_cast<typename B::type*>(p.db)[i] = B::store(sum);
  }
}

// dd, stage 1: scratch[c, k] = Σ_{j in chunk c} b[j] B[j, k] G[j, k] (stage 2: column_total_kernel).
template <typename E, typename B>
__global__ void dd_chunk_sums_kernel(LambdaGrads p, float* scratch, int64_t chunks) {
  using T = typename E::type;
  const typename B::type* const b = static_cast<const typename B::type*>(p.b);
  for (int64_t c = blockIdx.y; c < chunks; c += gridDim.y) {
    const int64_t row_begin = c * kSumRowChunk;
    const int64_t row_end = row_begin + kSumRowChunk < p.rows ? row_begin + kSumRowChunk : p.rows;
    for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < p.cols;
         k += int64_t(gridDim.x) * blockDim.x) {
      float sum = 0.0f;
      for (int64_t j = row_begin; j < row_end; ++j) {
        sum += B::load(b[j]) * E::load(static_cast<const T*>(p.B)[j * p.cols + k]) * p.G[j * p.cols + k];
      }
      scratch[c * p.cols + k] = sum;
    }
  }
}

const char* last_launch_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* fold_projection_cuda(const FoldProjection& p, void* stream) {
  if (p.rows == 0 || p.cols == 0) return nullptr;  // a zero-sized grid is a launch error
  const dim3 block(kScaleThreadsX, kScaleThreadsY);
  const dim3 grid(blocks_x(p.cols, kScaleThreadsX), blocks_y(p.rows, kScaleThreadsY));
  dispatch_dtype(p.dtype, [&](auto e) {
    dispatch_dtype(p.d_dtype, [&](auto d) {
      dispatch_dtype(p.b_dtype, [&](auto b) {
        fold_projection_kernel<decltype(e), decltype(d), decltype(b)>
            <<<grid, block, 0, static_cast<cudaStream_t>(stream)>>>(p);
      });
    });
  });
  return last_launch_error();
}

const char* lambda_grads_cuda(const LambdaGrads& p, float* scratch, void* stream) {
  if (p.cols == 0) return nullptr;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t chunks = sum_chunks(p.rows);
  dispatch_dtype(p.dtype, [&](auto e) {
    dispatch_dtype(p.d_dtype, [&](auto d) {
      dispatch_dtype(p.b_dtype, [&](auto b) {
        using E = decltype(e);
        using D = decltype(d);
        using B = decltype(b);
        if (p.db != nullptr && p.rows > 0) {
          db_rows_kernel<E, D, B><<<blocks_x(p.rows, kDotWarps), kDotWarps * kWarp, 0, s>>>(p);
        }
        if (p.dd != nullptr) {
          if (chunks > 0) {
            const dim3 grid(blocks_x(p.cols, kSumThreads), blocks_y(chunks, 1));
            dd_chunk_sums_kernel<E, B><<<grid, kSumThreads, 0, s>>>(p, scratch, chunks);
          }
          column_total_kernel<D><<<blocks_x(p.cols, kSumThreads), kSumThreads, 0, s>>>(p.dd, scratch, chunks, p.cols);
        }
      });
    });
  });
  return last_launch_error();
}

const char* gather_scale_cuda(const GatherScale& p, void* stream) {
  if (p.rows == 0 || p.cols == 0) return nullptr;
  const dim3 block(kScaleThreadsX, kScaleThreadsY);
  const dim3 grid(blocks_x(p.cols, kScaleThreadsX), blocks_y(p.rows, kScaleThreadsY));
  dispatch_dtype(p.dtype, [&](auto e) {
    dispatch_dtype(p.v_dtype, [&](auto v) {
      gather_scale_kernel<decltype(e), decltype(v)><<<grid, block, 0, static_cast<cudaStream_t>(stream)>>>(p);
    });
  });
  return last_launch_error();
}

const char* column_sums_cuda(const ColumnSums& p, float* scratch, void* stream) {
  if (p.cols == 0) return nullptr;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t chunks = sum_chunks(p.rows);  // 0 rows: no chunk, every total is 0
  dispatch_dtype(p.dtype, [&](auto e) {
    if (chunks == 0) return;
    const dim3 grid(blocks_x(p.cols, kSumThreads), blocks_y(chunks, 1));
    column_chunk_sums_kernel<decltype(e)><<<grid, kSumThreads, 0, s>>>(p, scratch, chunks);
  });
  dispatch_dtype(p.out_dtype, [&](auto o) {
    column_total_kernel<decltype(o)><<<blocks_x(p.cols, kSumThreads), kSumThreads, 0, s>>>(p.out, scratch, chunks, p.cols);
  });
  return last_launch_error();
}

bool stream_is_capturing(void* stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  // An error here (no capture support) means no capture is going on.
  return cudaStreamIsCapturing(static_cast<cudaStream_t>(stream), &status) == cudaSuccess &&
         status != cudaStreamCaptureStatusNone;
}

}  // namespace vera
