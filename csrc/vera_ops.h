// Torch-facing entry points of the extension: argument checks, then dispatch to the CPU or CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace vera {

// Fills the 2-D tensor `out` (float32, bfloat16 or float16; CPU or CUDA; any strides) with the block of
// the shared projection matrix `tag` (0: A, 1: B) starting at (row_offset, col_offset), for `seed` and
// the Kaiming-uniform bound of `fan_in`.
void fill_projection_(at::Tensor out, int64_t seed, int64_t tag, int64_t fan_in, int64_t row_offset,
                      int64_t col_offset);

// Philox4x32-10 on each row of `counters` (N x 4) with the matching row of `keys` (N x 2): int64 tensors
// with values in [0, 2^32), contiguous, on the same device. Returns N x 4 int64.
at::Tensor philox4x32_10(const at::Tensor& counters, const at::Tensor& keys);

// The VeRA forward written into the caller's buffers (so that the caller chooses how they are allocated):
//   weight given:   y = x W0ᵀ + bias + b ⊙ ((d ⊙ s) Bᵀ)
//   base_out given: y = base_out + b ⊙ ((d ⊙ s) Bᵀ)           (exactly one of weight and base_out)
// with s = x Aᵀ, the only activation the backward needs. x (M, in), weight (out, in), bias (out), A (r, in),
// B (out, r), base_out (M, out): one dtype (float32, bfloat16 or float16), any strides; lambda_d (r) and
// lambda_b (out): float32 or x's dtype. y (M, out) and s (M, r): x's dtype, contiguous, sharing no memory
// with the inputs. No M x out temporary: y is written once by the adapter term s Bdbᵀ (Bdb = b ⊙ B ⊙ d, out
// x r, folded in each call into a temporary of the call; nothing is kept between calls: see vera_ops.cpp)
// with the bias or base_out, then the base GEMM accumulates into it (beta = 1). On CUDA at M <= 16 (decode)
// the adapter term comes from split-K kernels instead (vera_math.h, DecodeAdapter), which read B and the
// vectors as they are; on CPU a small problem (vera_math.h, kSmallWork) is one pass of plain loops instead
// (SmallForward), with nothing folded and no GEMM call.
void vera_forward_(at::Tensor y, at::Tensor s, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                   const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
                   const at::Tensor& lambda_d, const at::Tensor& lambda_b,
                   const std::optional<at::Tensor>& base_out);

// Many adapters in one batch, inference only (no s is returned: there is no backward). Row m uses adapter
// a = adapter_ids[m] of the banks lambda_d_bank (N, r) and lambda_b_bank (N, out) (float32 or x's dtype):
//   weight given:   y_m = x_m W0ᵀ + bias + b[a] ⊙ ((d[a] ⊙ (x_m Aᵀ)) Bᵀ)
//   base_out given: y_m = base_out_m + b[a] ⊙ ((d[a] ⊙ (x_m Aᵀ)) Bᵀ)
// a = -1: y_m is the base output alone, bit for bit (x W0ᵀ + bias as at::addmm computes it, or base_out).
// adapter_ids: int64 (M,), values in [-1, N) (checked here without a host sync: on CUDA by a device-side
// assert). The adapter term is added over blocks of rows: u = t Bᵀ for a block, then y += b[ids] ⊙ u; the
// block is a CPU cache size on CPU (2^17 elements), a bounded temporary on CUDA (2^24 elements: a few blocks
// at most). On CUDA at M <= 16 the decode kernels gather each row's vectors instead (no temporary). Other
// arguments as vera_forward_.
void vera_forward_multi_(at::Tensor y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
                         const at::Tensor& lambda_d_bank, const at::Tensor& lambda_b_bank,
                         const at::Tensor& adapter_ids, const std::optional<at::Tensor>& base_out);

// The hand-written backward (docs/DESIGN.md section 2) from grad_out = dL/dy (M, out, contiguous) and the saved
// s (M, r, contiguous), written into the outputs given (a missing one is not computed):
//   dx (M, in)   = g W0 + (d ⊙ dt) A      (weight missing: (d ⊙ dt) A, vera_delta's)   dt = g (b ⊙ B)
//   dd (r)       = Σ_m dt ⊙ s             as Σ_j b_j B_jk G_jk, G = gᵀ s (out x r); in lambda_d's dtype
//   db (out)     = Σ_m g ⊙ (t Bᵀ)         as Σ_k B_jk d_k G_jk, t = d ⊙ s; in lambda_b's dtype
//   dbias (out)  = Σ_m g                  in grad_out's dtype
// G accumulates and is stored in fp32 (its sums over M overflow fp16); d ⊙ dt = g Bdb, then dx is written
// once by (d ⊙ dt) A and g W0 accumulates into it. Reductions in fp32 in a fixed order; no M x out
// temporary. Outputs are contiguous and share no memory with the inputs or each other. Bdb is folded
// again here, from the vectors as they are now (nothing is kept from the forward). On CPU a small problem
// with finite vectors, g and s is one pass of plain loops instead (vera_math.h, SmallBackward).
void vera_backward_(const std::optional<at::Tensor>& dx, const std::optional<at::Tensor>& dd,
                    const std::optional<at::Tensor>& db, const std::optional<at::Tensor>& dbias,
                    const at::Tensor& grad_out, const at::Tensor& s, const std::optional<at::Tensor>& weight,
                    const at::Tensor& A, const at::Tensor& B, const at::Tensor& lambda_d,
                    const at::Tensor& lambda_b);

// Whether the CUDA kernels were compiled in.
bool built_with_cuda();

}  // namespace vera
