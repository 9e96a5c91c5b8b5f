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
constexpr int kWarp = kDecodeLanes;  // 32 (vera_math.h, where the decode lanes' work is)
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

// Stage 1 of a fixed-order column sum: scratch[c, j] = Σ term(i, j) in fp32 over the rows i of chunk c.
// Consecutive threads read consecutive columns of a row: coalesced. The terms: ColumnTerm, DdTerm.
template <typename Term>
__global__ void chunk_sums_kernel(Term term, int64_t rows, int64_t cols, float* scratch, int64_t chunks) {
  for (int64_t c = blockIdx.y; c < chunks; c += gridDim.y) {
    const int64_t row_begin = c * kSumRowChunk;
    const int64_t row_end = row_begin + kSumRowChunk < rows ? row_begin + kSumRowChunk : rows;
    for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < cols;
         j += int64_t(gridDim.x) * blockDim.x) {
      float sum = 0.0f;
      for (int64_t i = row_begin; i < row_end; ++i) sum += term(i, j);
      scratch[c * cols + j] = sum;
    }
  }
}

// The terms of ColumnSums: a[i, j].
template <typename E>
struct ColumnTerm {
  ColumnSums p;
  __device__ float operator()(int64_t i, int64_t j) const {
    return E::load(static_cast<const typename E::type*>(p.a)[i * p.cols + j]);
  }
};

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

// The terms of dd (chunk_sums_kernel, then column_total_kernel): b[j] B[j, k] G[j, k], rows j, columns k.
template <typename E, typename B>
struct DdTerm {
  LambdaGrads p;
  __device__ float operator()(int64_t j, int64_t k) const {
    return B::load(static_cast<const typename B::type*>(p.b)[j]) *
           E::load(static_cast<const typename E::type*>(p.B)[j * p.cols + k]) * p.G[j * p.cols + k];
  }
};

// ---------------------------------------------------------------------------------------------------
// Decode (DecodeAdapter in vera_math.h).

constexpr int kDecodeWarps = 8;           // warps per block of the decode kernels
constexpr int64_t kDecodeMinSplit = 256;  // columns of x at least per split of the shrink

// The adapter of row m: ids[m], or 0 for one adapter.
__device__ int64_t adapter_of(const DecodeAdapter& p, int64_t m) { return p.ids == nullptr ? 0 : p.ids[m]; }

// Stage 1: one warp per rank row k, over the columns of split c (blockIdx.y): each lane adds its columns
// (decode_shrink_lane: vectors of kVec elements, kVectorElems<E> when the rows are 16-byte aligned, else
// 1), then a butterfly per row m.
template <typename E, int kVec>
__global__ void decode_shrink_kernel(DecodeAdapter p, int64_t split_len) {
  const int lane = threadIdx.x % kWarp;
  const int64_t k = blockIdx.x * int64_t(kDecodeWarps) + threadIdx.x / kWarp;
  if (k >= p.r) return;
  const int64_t c = blockIdx.y;
  float acc[kDecodeMaxRows];
#pragma unroll
  for (int m = 0; m < kDecodeMaxRows; ++m) acc[m] = 0.0f;
  decode_shrink_warp_lane<E, kVec>(acc, p, split_len, k, c, lane);
#pragma unroll
  for (int m = 0; m < kDecodeMaxRows; ++m) {
    if (m >= p.rows) break;
    float v = acc[m];
    for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
    if (lane == 0) p.scratch[(c * p.rows + m) * p.r + k] = v;
  }
}

// Stage 2: one thread per (m, k): the split sums in split order; s, and t = d[a_m] ⊙ σ after the partials.
template <typename E, typename V>
__global__ void decode_shrink_total_kernel(DecodeAdapter p) {
  const int64_t n = p.rows * p.r;
  float* const t = p.scratch + decode_t_offset(p.rows, p.r, p.splits);
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = idx / p.r, k = idx % p.r;
    float sigma = 0.0f;
    for (int64_t c = 0; c < p.splits; ++c) sigma += p.scratch[c * n + idx];
    if (p.s != nullptr) static_cast<typename E::type*>(p.s)[idx] = E::store(sigma);
    const int64_t a = adapter_of(p, m);
    t[idx] = a < 0 ? 0.0f : V::load(static_cast<const typename V::type*>(p.d_bank)[a * p.r + k]) * sigma;
  }
}

// Stage 3: one warp per output column j (grid-stride): each lane adds its k (decode_expand_lane: vectors of
// kVec elements of B and t when B's rows and t's are 16-byte aligned, else kVec = 1); lane m < rows writes
// y[m, j].
template <typename E, typename V, int kVec>
__global__ void decode_expand_kernel(DecodeAdapter p) {
  using T = typename E::type;
  const int lane = threadIdx.x % kWarp;
  for (int64_t j = blockIdx.x * int64_t(kDecodeWarps) + threadIdx.x / kWarp; j < p.out;
       j += int64_t(gridDim.x) * kDecodeWarps) {
    float acc[kDecodeMaxRows];
#pragma unroll
    for (int m = 0; m < kDecodeMaxRows; ++m) acc[m] = 0.0f;
    decode_expand_warp_lane<E, kVec>(acc, p, j, lane);
    float mine = 0.0f;  // lane m keeps the sum of row m
#pragma unroll
    for (int m = 0; m < kDecodeMaxRows; ++m) {
      if (m >= p.rows) break;
      float v = acc[m];
      for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
      if (lane == m) mine = v;
    }
    if (lane >= p.rows) continue;
    const int64_t m = lane;
    const int64_t a = adapter_of(p, m);
    T* const y = static_cast<T*>(p.y) + m * p.out + j;
    const float term = a < 0 ? 0.0f : V::load(static_cast<const typename V::type*>(p.b_bank)[a * p.out + j]) * mine;
    switch (p.base_kind) {
      case DecodeBase::kBias:
        *y = E::store((p.base == nullptr ? 0.0f : E::load(static_cast<const T*>(p.base)[j])) + term);
        break;
      case DecodeBase::kRows:
        *y = a < 0 ? static_cast<const T*>(p.base)[m * p.out + j]
                   : E::store(E::load(static_cast<const T*>(p.base)[m * p.out + j]) + term);
        break;
      case DecodeBase::kAccumulate:
        if (a >= 0) *y = E::store(E::load(*y) + term);
        break;
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
  dispatch_projection_dtypes(p, [&](auto e, auto d, auto b) {
    fold_projection_kernel<decltype(e), decltype(d), decltype(b)>
        <<<grid, block, 0, static_cast<cudaStream_t>(stream)>>>(p);
  });
  return last_launch_error();
}

const char* lambda_grads_cuda(const LambdaGrads& p, float* scratch, void* stream) {
  if (p.cols == 0) return nullptr;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t chunks = sum_chunks(p.rows);
  dispatch_projection_dtypes(p, [&](auto e, auto d, auto b) {
    using E = decltype(e);
    using D = decltype(d);
    using B = decltype(b);
    if (p.db != nullptr && p.rows > 0) {
      db_rows_kernel<E, D, B><<<blocks_x(p.rows, kDotWarps), kDotWarps * kWarp, 0, s>>>(p);
    }
    if (p.dd != nullptr) {
      if (chunks > 0) {
        const dim3 grid(blocks_x(p.cols, kSumThreads), blocks_y(chunks, 1));
        chunk_sums_kernel<<<grid, kSumThreads, 0, s>>>(DdTerm<E, B>{p}, p.rows, p.cols, scratch, chunks);
      }
      column_total_kernel<D><<<blocks_x(p.cols, kSumThreads), kSumThreads, 0, s>>>(p.dd, scratch, chunks, p.cols);
    }
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
    chunk_sums_kernel<<<grid, kSumThreads, 0, s>>>(ColumnTerm<decltype(e)>{p}, p.rows, p.cols, scratch, chunks);
  });
  dispatch_dtype(p.out_dtype, [&](auto o) {
    column_total_kernel<decltype(o)><<<blocks_x(p.cols, kSumThreads), kSumThreads, 0, s>>>(p.out, scratch, chunks, p.cols);
  });
  return last_launch_error();
}

int64_t decode_splits_cuda(int64_t in, int64_t r, int device) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) sms = 132;
  const int64_t row_blocks = ceil_div(r, kDecodeWarps);
  const int64_t wanted = ceil_div(2 * int64_t(sms), row_blocks);
  const int64_t most = std::max<int64_t>(1, in / kDecodeMinSplit);
  return std::max<int64_t>(1, std::min(wanted, most));
}

const char* decode_adapter_cuda(const DecodeAdapter& p, void* stream) {
  if (p.rows == 0 || p.out == 0) return nullptr;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(p.dtype, [&](auto e) {
    dispatch_dtype(p.v_dtype, [&](auto v) {
      using E = decltype(e);
      using V = decltype(v);
      const DecodeLayout layout = decode_layout(p, kVectorElems<E>, sizeof(typename E::type));
      const dim3 shrink_grid(unsigned(ceil_div(p.r, kDecodeWarps)), unsigned(p.splits));
      if (layout.shrink_vec > 1) {
        decode_shrink_kernel<E, kVectorElems<E>><<<shrink_grid, kDecodeWarps * kWarp, 0, s>>>(p, layout.split_len);
      } else {
        decode_shrink_kernel<E, 1><<<shrink_grid, kDecodeWarps * kWarp, 0, s>>>(p, layout.split_len);
      }
      decode_shrink_total_kernel<E, V><<<blocks_x(p.rows * p.r, kSumThreads), kSumThreads, 0, s>>>(p);
      if (layout.expand_vec > 1) {
        decode_expand_kernel<E, V, kVectorElems<E>><<<blocks_x(p.out, kDecodeWarps), kDecodeWarps * kWarp, 0, s>>>(p);
      } else {
        decode_expand_kernel<E, V, 1><<<blocks_x(p.out, kDecodeWarps), kDecodeWarps * kWarp, 0, s>>>(p);
      }
    });
  });
  return last_launch_error();
}

}  // namespace vera
