// Torch glue: every argument is checked before any work, then the raw-pointer kernels of projection.h and
// vera_math.h run; the large GEMMs go through ATen (the CPU BLAS, cuBLAS).
#include "vera_ops.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <initializer_list>
#include <tuple>

#include <torch/version.h>

#include "projection.h"
#include "vera_math.h"

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

// ---------------------------------------------------------------------------------------------------
// Argument checks of vera_forward_ and vera_backward_: each message names the op and the argument.

bool is_kernel_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

Dtype kernel_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return Dtype::kFloat32;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    default:
      return Dtype::kFloat16;  // the checks admit nothing else
  }
}

// Layout, device (CPU or CUDA, the device of `first`) and shape.
void check_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& first,
                  const char* first_name, at::IntArrayRef shape) {
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor, got layout ",
              t.layout());
  check_device(op, name, t);
  TORCH_CHECK(t.device() == first.device(), op, ": ", name, " must be on ", first_name, "'s device ",
              first.device(), ", got ", t.device());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                 const char* whose) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, " (", whose, "), got ",
              t.scalar_type());
}

void check_lambda_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == dtype, op, ": ", name,
              " must be float32 or ", dtype, ", got ", t.scalar_type());
}

void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
}

// The first, checked argument that fixes the dtype and device of the others: float32, bfloat16 or float16,
// 2-D, dense, on CPU or CUDA.
void check_first(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor, got layout ",
              t.layout());
  check_device(op, name, t);
  TORCH_CHECK(is_kernel_dtype(t.scalar_type()), op, ": ", name, " must be float32, bfloat16 or float16, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be a 2-D tensor, got ", t.dim(), "-D");
}

// The checks both forward ops start with: x first (it fixes dtype and device), then the shapes of A and
// B against it, and which form was asked for. Returns (m, in, r, out).
std::tuple<int64_t, int64_t, int64_t, int64_t> check_forward_shapes(
    const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
    const std::optional<at::Tensor>& base_out) {
  check_first(op, "x", x);
  const int64_t in = x.size(1);
  TORCH_CHECK(A.dim() == 2 && A.size(0) >= 1 && A.size(1) == in, op,
              ": A must have shape (r, in_features) with r >= 1 and in_features = ", in,
              " (x's last dimension), got ", A.sizes());
  const int64_t r = A.size(0);
  TORCH_CHECK(B.dim() == 2 && B.size(1) == r, op, ": B must have shape (out_features, ", r,
              ") (A's rank), got ", B.sizes());
  TORCH_CHECK(weight.has_value() != base_out.has_value(), op,
              ": exactly one of weight (the linear form) and base_out (the delta form) must be given");
  TORCH_CHECK(!bias.has_value() || weight.has_value(), op, ": bias is only allowed with weight");
  return {x.size(0), in, r, B.size(0)};
}

struct Named {
  const char* name;
  const at::Tensor* tensor;  // null or undefined: absent
};

bool present(const Named& n) { return n.tensor != nullptr && n.tensor->defined(); }

// Outputs are written while inputs are still read (and by several threads): no output may share storage
// with an input or with another output.
void check_no_shared_memory(const char* op, std::initializer_list<Named> outputs,
                            std::initializer_list<Named> inputs) {
  for (auto out = outputs.begin(); out != outputs.end(); ++out) {
    if (!present(*out)) continue;
    const auto check = [&](const Named& other) {
      if (!present(other)) return;
      TORCH_CHECK(!out->tensor->storage().is_alias_of(other.tensor->storage()), op, ": ", out->name,
                  " must not share memory with ", other.name);
    };
    for (auto later = out + 1; later != outputs.end(); ++later) check(*later);
    for (const Named& in : inputs) check(in);
  }
}

const at::Tensor* get(const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

// ---------------------------------------------------------------------------------------------------
// The kernels of vera_math.h on the tensors' device. Every tensor given is contiguous and checked.

void scale(const at::Tensor& out, const at::Tensor& in, const at::Tensor& v, bool per_row) {
  Scale p;
  p.out = out.data_ptr();
  p.in = in.const_data_ptr();
  p.v = v.const_data_ptr();
  p.dtype = kernel_dtype(in.scalar_type());
  p.v_dtype = kernel_dtype(v.scalar_type());
  p.rows = in.size(0);
  p.cols = in.size(1);
  p.per_row = per_row;
#ifdef VERA_WITH_CUDA
  if (out.is_cuda()) {
    check_cuda("vera scale", scale_cuda(p, current_stream(out)));
    return;
  }
#endif
  scale_cpu(p);
}

// out = Σ_i a[i, :] (⊙ b[i, :] when b is defined).
void column_sums(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  ColumnSums p;
  p.out = out.data_ptr();
  p.a = a.const_data_ptr();
  p.b = b.defined() ? b.const_data_ptr() : nullptr;
  p.dtype = kernel_dtype(a.scalar_type());
  p.out_dtype = kernel_dtype(out.scalar_type());
  p.rows = a.size(0);
  p.cols = a.size(1);
#ifdef VERA_WITH_CUDA
  if (out.is_cuda()) {
    const at::Tensor scratch = at::empty({sum_chunks(p.rows), p.cols}, a.options().dtype(at::kFloat));
    check_cuda("vera column sums", column_sums_cuda(p, scratch.mutable_data_ptr<float>(), current_stream(out)));
    return;
  }
#endif
  column_sums_cpu(p);
}

void row_dots(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  RowDots p;
  p.out = out.data_ptr();
  p.a = a.const_data_ptr();
  p.b = b.const_data_ptr();
  p.dtype = kernel_dtype(a.scalar_type());
  p.out_dtype = kernel_dtype(out.scalar_type());
  p.rows = a.size(0);
  p.cols = a.size(1);
#ifdef VERA_WITH_CUDA
  if (out.is_cuda()) {
    check_cuda("vera row dots", row_dots_cuda(p, current_stream(out)));
    return;
  }
#endif
  row_dots_cpu(p);
}

// out (rows x cols) = in scaled by row ids[i] of the bank (accumulate: out += ...); see GatherScale.
void gather_scale(const at::Tensor& out, const at::Tensor& in, const at::Tensor& bank, const at::Tensor& ids,
                  bool accumulate) {
  GatherScale p;
  p.out = out.data_ptr();
  p.in = in.const_data_ptr();
  p.v = bank.const_data_ptr();
  p.ids = ids.const_data_ptr<int64_t>();
  p.dtype = kernel_dtype(in.scalar_type());
  p.v_dtype = kernel_dtype(bank.scalar_type());
  p.rows = in.size(0);
  p.cols = in.size(1);
  p.accumulate = accumulate;
#ifdef VERA_WITH_CUDA
  if (out.is_cuda()) {
    check_cuda("vera gather scale", gather_scale_cuda(p, current_stream(out)));
    return;
  }
#endif
  gather_scale_cpu(p);
}

// Elements of the row-blocked u = t Bᵀ temporary of vera_forward_multi_ (512 KB in fp32): small enough
// that y += b[ids] ⊙ u reads u back from the CPU's L2, large enough (32 rows at out = 4096) for the GEMM.
constexpr int64_t kMultiBlockElements = int64_t(1) << 17;

// gᵀ t (out x r) for g (M x out) and t (M x r) of one dtype, in fp32: the product sums over all M rows
// and overflows fp16 at long batches, although what it feeds (db) is an fp32 value.
at::Tensor transposed_product_fp32(const at::Tensor& g, const at::Tensor& t) {
  if (g.scalar_type() == at::kFloat) return at::mm(g.t(), t);
#if defined(VERA_WITH_CUDA) && (TORCH_VERSION_MAJOR > 2 || TORCH_VERSION_MINOR >= 8)
  // cuBLAS reads the half operands and accumulates and writes in fp32.
  if (g.is_cuda()) return at::mm(g.t(), t, at::kFloat);
#endif
  // Blocks of rows widened to fp32 (a bounded temporary), accumulated into one fp32 product.
  const int64_t m = g.size(0), out = g.size(1);
  const int64_t block = std::max<int64_t>(1, kMultiBlockElements / std::max<int64_t>(1, out));
  at::Tensor product = at::zeros({out, t.size(1)}, g.options().dtype(at::kFloat));
  for (int64_t row = 0; row < m; row += block) {
    const int64_t rows = std::min(block, m - row);
    product.addmm_(g.narrow(0, row, rows).t().to(at::kFloat), t.narrow(0, row, rows).to(at::kFloat));
  }
  return product;
}

// b ⊙ B (out x r, x's dtype): B's rows scaled by lambda_b, so that one GEMM with it applies both.
at::Tensor scaled_B(const at::Tensor& B, const at::Tensor& lambda_b) {
  const at::Tensor B_c = B.contiguous();
  at::Tensor out = at::empty(B_c.sizes(), B_c.options());
  scale(out, B_c, lambda_b.contiguous(), /*per_row=*/true);
  return out;
}

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

void vera_forward_(at::Tensor y, at::Tensor s, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                   const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
                   const at::Tensor& lambda_d, const at::Tensor& lambda_b,
                   const std::optional<at::Tensor>& base_out) {
  constexpr const char* op = "vera_forward_";
  const auto [m, in, r, out] = check_forward_shapes(op, x, weight, bias, A, B, base_out);

  const at::ScalarType dtype = x.scalar_type();
  const auto same_as_x = [&](const char* name, const at::Tensor& t, at::IntArrayRef shape) {
    check_tensor(op, name, t, x, "x", shape);
    check_dtype(op, name, t, dtype, "x's dtype");
  };
  if (weight) same_as_x("weight", *weight, {out, in});
  if (bias) same_as_x("bias", *bias, {out});
  same_as_x("A", A, {r, in});
  same_as_x("B", B, {out, r});
  if (base_out) same_as_x("base_out", *base_out, {m, out});
  check_tensor(op, "lambda_d", lambda_d, x, "x", {r});
  check_lambda_dtype(op, "lambda_d", lambda_d, dtype);
  check_tensor(op, "lambda_b", lambda_b, x, "x", {out});
  check_lambda_dtype(op, "lambda_b", lambda_b, dtype);
  same_as_x("y", y, {m, out});
  check_contiguous(op, "y", y);
  same_as_x("s", s, {m, r});
  check_contiguous(op, "s", s);
  check_no_shared_memory(op, {{"y", &y}, {"s", &s}},
                         {{"x", &x}, {"weight", get(weight)}, {"bias", get(bias)}, {"A", &A}, {"B", &B},
                          {"lambda_d", &lambda_d}, {"lambda_b", &lambda_b}, {"base_out", get(base_out)}});

  const c10::DeviceGuard guard(x.device());
  at::mm_out(s, x, A.t());
  at::Tensor t = at::empty({m, r}, s.options());
  scale(t, s, lambda_d.contiguous(), /*per_row=*/false);
  // b folded into B (one GEMM applies both) computes Σ_k t_k (b_j B_jk), which equals b_j Σ_k t_k B_jk only
  // for a finite b_j: an infinite one times entries of both signs sums to inf - inf = NaN where the formula
  // gives ±inf. A CPU tensor is checked for that (no device to wait for); then b scales u = t Bᵀ instead.
  const bool fold_b = !lambda_b.is_cpu() || at::isfinite(lambda_b).all().item<bool>();
  if (!fold_b) {
    if (weight) {
      if (bias) {
        at::addmm_out(y, *bias, x, weight->t());
      } else {
        at::mm_out(y, x, weight->t());
      }
    } else {
      y.copy_(*base_out);
    }
    // y += b ⊙ u in fp32, rounded once: the bank kernel with a one-adapter bank and every row on it.
    const at::Tensor u = at::mm(t, B.t());
    gather_scale(y, u, lambda_b.contiguous().view({1, out}), at::zeros({m}, x.options().dtype(at::kLong)),
                 /*accumulate=*/true);
    return;
  }
  const at::Tensor bB = scaled_B(B, lambda_b);
  if (weight) {
    if (bias) {
      at::addmm_out(y, *bias, x, weight->t());
    } else {
      at::mm_out(y, x, weight->t());
    }
    y.addmm_(t, bB.t());  // beta = 1: the adapter term accumulates into y
  } else {
    at::addmm_out(y, *base_out, t, bB.t());
  }
}

void vera_forward_multi_(at::Tensor y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
                         const at::Tensor& lambda_d_bank, const at::Tensor& lambda_b_bank,
                         const at::Tensor& adapter_ids, const std::optional<at::Tensor>& base_out) {
  constexpr const char* op = "vera_forward_multi_";
  const auto [m, in, r, out] = check_forward_shapes(op, x, weight, bias, A, B, base_out);
  TORCH_CHECK(lambda_d_bank.dim() == 2, op, ": lambda_d_bank must be 2-D (adapters, ", r, "), got ",
              lambda_d_bank.sizes());
  const int64_t n = lambda_d_bank.size(0);

  const at::ScalarType dtype = x.scalar_type();
  const auto same_as_x = [&](const char* name, const at::Tensor& t, at::IntArrayRef shape) {
    check_tensor(op, name, t, x, "x", shape);
    check_dtype(op, name, t, dtype, "x's dtype");
  };
  if (weight) same_as_x("weight", *weight, {out, in});
  if (bias) same_as_x("bias", *bias, {out});
  same_as_x("A", A, {r, in});
  same_as_x("B", B, {out, r});
  if (base_out) same_as_x("base_out", *base_out, {m, out});
  check_tensor(op, "lambda_d_bank", lambda_d_bank, x, "x", {n, r});
  check_lambda_dtype(op, "lambda_d_bank", lambda_d_bank, dtype);
  check_tensor(op, "lambda_b_bank", lambda_b_bank, x, "x", {n, out});
  check_lambda_dtype(op, "lambda_b_bank", lambda_b_bank, dtype);
  check_tensor(op, "adapter_ids", adapter_ids, x, "x", {m});
  TORCH_CHECK(adapter_ids.scalar_type() == at::kLong, op, ": adapter_ids must be int64, got ",
              adapter_ids.scalar_type());
  same_as_x("y", y, {m, out});
  check_contiguous(op, "y", y);
  check_no_shared_memory(op, {{"y", &y}},
                         {{"x", &x}, {"weight", get(weight)}, {"bias", get(bias)}, {"A", &A}, {"B", &B},
                          {"lambda_d_bank", &lambda_d_bank}, {"lambda_b_bank", &lambda_b_bank},
                          {"adapter_ids", &adapter_ids}, {"base_out", get(base_out)}});
  if (m > 0) {
    // The kernels index the banks with these values: out of range would read outside them.
    const int64_t low = adapter_ids.min().item<int64_t>(), high = adapter_ids.max().item<int64_t>();
    TORCH_CHECK(low >= -1 && high < n, op, ": adapter_ids must be in [-1, ", n, ") (-1: the base alone), got min ",
                low, ", max ", high);
  }

  const c10::DeviceGuard guard(x.device());
  const at::Tensor ids = adapter_ids.contiguous();
  const at::Tensor bank_d = lambda_d_bank.contiguous(), bank_b = lambda_b_bank.contiguous();
  // t = d[ids] ⊙ (x Aᵀ), in place over s (nothing is saved: no backward).
  at::Tensor t = at::mm(x, A.t());
  gather_scale(t, t, bank_d, ids, /*accumulate=*/false);
  if (weight) {
    if (bias) {
      at::addmm_out(y, *bias, x, weight->t());  // F.linear's own call: -1 rows equal it bit for bit
    } else {
      at::mm_out(y, x, weight->t());
    }
  } else {
    y.copy_(*base_out);
  }
  // b[ids] cannot be folded into B as in vera_forward_ (one b per row, not per launch): per block of rows,
  // u = t Bᵀ into a bounded temporary, then y += b[ids] ⊙ u.
  const int64_t block = std::max<int64_t>(1, kMultiBlockElements / std::max<int64_t>(1, out));
  at::Tensor u = at::empty({std::min(block, m), out}, y.options());
  const at::Tensor Bt = B.t();
  for (int64_t row = 0; row < m; row += block) {
    const int64_t rows = std::min(block, m - row);
    at::Tensor u_block = u.narrow(0, 0, rows);
    at::mm_out(u_block, t.narrow(0, row, rows), Bt);
    gather_scale(y.narrow(0, row, rows), u_block, bank_b, ids.narrow(0, row, rows), /*accumulate=*/true);
  }
}

void vera_backward_(const std::optional<at::Tensor>& dx, const std::optional<at::Tensor>& dd,
                    const std::optional<at::Tensor>& db, const std::optional<at::Tensor>& dbias,
                    const at::Tensor& grad_out, const at::Tensor& s, const std::optional<at::Tensor>& weight,
                    const at::Tensor& A, const at::Tensor& B, const at::Tensor& lambda_d,
                    const at::Tensor& lambda_b) {
  constexpr const char* op = "vera_backward_";
  check_first(op, "grad_out", grad_out);
  check_contiguous(op, "grad_out", grad_out);
  const int64_t m = grad_out.size(0), out = grad_out.size(1);
  TORCH_CHECK(s.dim() == 2 && s.size(0) == m && s.size(1) >= 1, op, ": s must have shape (", m,
              ", r) with r >= 1 (grad_out's rows), got ", s.sizes());
  const int64_t r = s.size(1);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == r && A.size(1) >= 1, op, ": A must have shape (", r,
              ", in_features) (s's columns), got ", A.sizes());
  const int64_t in = A.size(1);

  const at::ScalarType dtype = grad_out.scalar_type();
  const auto same_as_g = [&](const char* name, const at::Tensor& t, at::IntArrayRef shape) {
    check_tensor(op, name, t, grad_out, "grad_out", shape);
    check_dtype(op, name, t, dtype, "grad_out's dtype");
  };
  same_as_g("s", s, {m, r});
  check_contiguous(op, "s", s);
  if (weight) same_as_g("weight", *weight, {out, in});
  same_as_g("A", A, {r, in});
  same_as_g("B", B, {out, r});
  check_tensor(op, "lambda_d", lambda_d, grad_out, "grad_out", {r});
  check_lambda_dtype(op, "lambda_d", lambda_d, dtype);
  check_tensor(op, "lambda_b", lambda_b, grad_out, "grad_out", {out});
  check_lambda_dtype(op, "lambda_b", lambda_b, dtype);
  if (dx) {
    same_as_g("dx", *dx, {m, in});
    check_contiguous(op, "dx", *dx);
  }
  if (dd) {
    check_tensor(op, "dd", *dd, grad_out, "grad_out", {r});
    check_dtype(op, "dd", *dd, lambda_d.scalar_type(), "lambda_d's dtype");
    check_contiguous(op, "dd", *dd);
  }
  if (db) {
    check_tensor(op, "db", *db, grad_out, "grad_out", {out});
    check_dtype(op, "db", *db, lambda_b.scalar_type(), "lambda_b's dtype");
    check_contiguous(op, "db", *db);
  }
  if (dbias) {
    same_as_g("dbias", *dbias, {out});
    check_contiguous(op, "dbias", *dbias);
  }
  check_no_shared_memory(op, {{"dx", get(dx)}, {"dd", get(dd)}, {"db", get(db)}, {"dbias", get(dbias)}},
                         {{"grad_out", &grad_out}, {"s", &s}, {"weight", get(weight)}, {"A", &A}, {"B", &B},
                          {"lambda_d", &lambda_d}, {"lambda_b", &lambda_b}});

  const c10::DeviceGuard guard(grad_out.device());
  const at::Tensor d = lambda_d.contiguous();
  // dt = (g ⊙ b) B = g (b ⊙ B): M x r from an out x r operand, no M x out temporary.
  at::Tensor dt;
  if (dx || dd) dt = at::mm(grad_out, scaled_B(B, lambda_b));
  if (dd) column_sums(*dd, dt, s);
  // M x r scratch: t = d ⊙ s for db, then d ⊙ dt for dx.
  at::Tensor scratch;
  if (db || dx) scratch = at::empty({m, r}, s.options());
  if (db) {
    // db_j = Σ_m g_mj (t Bᵀ)_mj = Σ_k B_jk (gᵀ t)_jk: one out x r GEMM instead of recomputing u (M x out),
    // the same FLOPs, then a row-wise dot with B.
    scale(scratch, s, d, /*per_row=*/false);
    row_dots(*db, B.to(at::kFloat).contiguous(), transposed_product_fp32(grad_out, scratch));
  }
  if (dbias) column_sums(*dbias, grad_out, at::Tensor());
  if (dx) {
    at::Tensor dx_out = *dx;
    scale(scratch, dt, d, /*per_row=*/false);
    if (weight) {
      at::mm_out(dx_out, grad_out, *weight);
      dx_out.addmm_(scratch, A);  // beta = 1: dx = g W0 + (d ⊙ dt) A
    } else {
      at::mm_out(dx_out, scratch, A);
    }
  }
}

bool built_with_cuda() {
#ifdef VERA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace vera
