// Torch glue: every argument is checked before any work, then the raw-pointer kernels of projection.h and
// vera_math.h run; the large GEMMs go through ATen (the CPU BLAS, cuBLAS).
#include "vera_ops.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/logical_and.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/record_function.h>
#include <torch/version.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <tuple>
#include <vector>

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

// The kernels index the banks with the ids: out of range would read outside them. Checked without reading a
// device back (no host sync: a decode step stays capturable in a CUDA graph): on CPU the ids are host
// memory, read in place; on CUDA a device-side assert fails the launch instead.
void check_adapter_ids(const char* op, const at::Tensor& ids, int64_t n) {
  if (ids.numel() == 0) return;
  if (ids.is_cpu()) {
    const at::Tensor c = ids.contiguous();
    const int64_t* v = c.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < c.numel(); ++i) {
      TORCH_CHECK(v[i] >= -1 && v[i] < n, op, ": adapter_ids must be in [-1, ", n,
                  ") (-1: the base alone), got ", v[i], " at row ", i);
    }
    return;
  }
  at::_assert_async(at::logical_and(ids.ge(-1), ids.lt(n)).all(), "adapter_ids must be in [-1, number of adapters)");
}

// ---------------------------------------------------------------------------------------------------
// The kernels of vera_math.h on the tensors' device. Every tensor given is contiguous and checked.

// out = Σ_i a[i, :].
void column_sums(const at::Tensor& out, const at::Tensor& a) {
  RECORD_FUNCTION("vera::column_sums", std::vector<c10::IValue>({a}));
  ColumnSums p;
  p.out = out.data_ptr();
  p.a = a.const_data_ptr();
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

// The fields FoldProjection and LambdaGrads share: the projection B (rows x cols) and the vectors d, b.
template <typename Params>
void set_projection_and_vectors(Params& p, const at::Tensor& B, const at::Tensor& d, const at::Tensor& b) {
  p.B = B.const_data_ptr();
  p.d = d.const_data_ptr();
  p.b = b.const_data_ptr();
  p.dtype = kernel_dtype(B.scalar_type());
  p.d_dtype = kernel_dtype(d.scalar_type());
  p.b_dtype = kernel_dtype(b.scalar_type());
  p.rows = B.size(0);
  p.cols = B.size(1);
}

// db and dd from G = gᵀ s (out x r, fp32); see LambdaGrads. An undefined db or dd is not computed.
void lambda_grads(const at::Tensor& db, const at::Tensor& dd, const at::Tensor& B, const at::Tensor& G,
                  const at::Tensor& d, const at::Tensor& b) {
  RECORD_FUNCTION("vera::lambda_grads", std::vector<c10::IValue>({B, G, d, b}));
  LambdaGrads p;
  p.db = db.defined() ? db.data_ptr() : nullptr;
  p.dd = dd.defined() ? dd.data_ptr() : nullptr;
  p.G = G.const_data_ptr<float>();
  set_projection_and_vectors(p, B, d, b);
#ifdef VERA_WITH_CUDA
  if (B.is_cuda()) {
    const at::Tensor scratch = at::empty({sum_chunks(p.rows), p.cols}, G.options());
    check_cuda("vera lambda grads", lambda_grads_cuda(p, scratch.mutable_data_ptr<float>(), current_stream(B)));
    return;
  }
#endif
  lambda_grads_cpu(p);
}

// out (rows x cols) = in scaled by row ids[i] of the bank (accumulate: out += ...); see GatherScale.
void gather_scale(const at::Tensor& out, const at::Tensor& in, const at::Tensor& bank, const at::Tensor& ids,
                  bool accumulate) {
  RECORD_FUNCTION("vera::gather_scale", std::vector<c10::IValue>({in, bank, ids}));
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

// Elements of the row-blocked u = t Bᵀ temporary of vera_forward_multi_. CPU: 512 KB in fp32, small enough
// that y += b[ids] ⊙ u reads u back from the L2, large enough (32 rows at out = 4096) for the GEMM. CUDA: a
// cache size means nothing there and each block costs two launches, so blocks are as large as a bounded
// temporary allows (2^24 elements, 32 MB in bf16: 4096 rows at out = 4096, two blocks at M = 8192).
constexpr int64_t kMultiBlockElements = int64_t(1) << 17;
constexpr int64_t kMultiBlockElementsCuda = int64_t(1) << 24;

// ---------------------------------------------------------------------------------------------------
// The folded projection Bdb = b[:, None] * B * d[None, :] (out x r, x's dtype).
//
// One GEMM with Bdb applies both vectors: the forward's adapter term is s Bdbᵀ and the backward's d ⊙ dt is
// g Bdb, so no pass over an M-sized tensor scales anything. It is folded anew in every call that needs it,
// from the vectors as they are at that moment, into a temporary that the call owns and drops when it
// returns (on CUDA from the caching allocator on the call's stream, which is the stream every launch of
// the call runs on: the memory goes back to that stream's pool and is reused there only after this call's
// launches, in stream order). Nothing is kept between calls: a cache would need a signal that the vectors
// changed, and none is reliable (version counters miss writes through `.data` or detached aliases, torch's
// fused optimizers, another process writing shared memory), and it would hold one out x r fold per layer.
// The cost is one out x r element-wise pass per call (the GEMMs around it are M x out x r and more). At
// most one fold is alive per call: memory for folds does not grow with the number of layers.

// Bdb for these B, lambda_d, lambda_b in B's dtype, contiguous, folded now into memory the caller owns. The
// callers fold only where the regrouping keeps the formula's result (fold_fits, finite_on_cpu).
at::Tensor folded_projection(const at::Tensor& B, const at::Tensor& lambda_d, const at::Tensor& lambda_b) {
  RECORD_FUNCTION("vera::fold_projection", std::vector<c10::IValue>({B, lambda_d, lambda_b}));
  at::Tensor Bdb = at::empty({B.size(0), B.size(1)}, B.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor B_c = B.contiguous(), d = lambda_d.contiguous(), b = lambda_b.contiguous();
  FoldProjection p;
  p.out = Bdb.data_ptr();
  set_projection_and_vectors(p, B_c, d, b);
#ifdef VERA_WITH_CUDA
  if (B.is_cuda()) {
    check_cuda("vera fold projection", fold_projection_cuda(p, current_stream(B)));
    return Bdb;
  }
#endif
  fold_projection_cpu(p);
  return Bdb;
}

// Rows of g widened to fp32 at a time by grad_outer on CPU (a temporary of kWidenRows x out floats).
constexpr int64_t kWidenRows = 256;

// G = gᵀ s (out x r) in fp32. Its sums over M exceed fp16's range long before the gradients built from it
// do (M = 8192 rows of g = 1 and s ~ 11 make 9e4), so the GEMM accumulates and writes in fp32.
at::Tensor grad_outer(const at::Tensor& g, const at::Tensor& s) {
  if (g.scalar_type() == at::kFloat) return at::mm(g.t(), s);
#if defined(VERA_WITH_CUDA) && (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8))
  // cuBLAS: 16-bit operands, fp32 accumulator and output (aten::mm.dtype, torch >= 2.8); older torch widens
  // blocks of rows as the CPU does.
  if (g.is_cuda()) return at::mm(g.t(), s, at::kFloat);
#endif
  // ATen's CPU GEMMs round their output to the operands' dtype: widen blocks of rows to fp32.
  at::Tensor G = at::zeros({g.size(1), s.size(1)}, s.options().dtype(at::kFloat));
  for (int64_t row = 0; row < g.size(0); row += kWidenRows) {
    const int64_t rows = std::min(kWidenRows, g.size(0) - row);
    G.addmm_(g.narrow(0, row, rows).to(at::kFloat).t(), s.narrow(0, row, rows).to(at::kFloat));
  }
  return G;
}

#ifdef VERA_WITH_CUDA
// t with a unit column stride, as the decode kernels read it (a copy only for exotic layouts).
at::Tensor unit_column_stride(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

// The decode kernels (DecodeAdapter in vera_math.h): banks of one row for one adapter (ids undefined).
// Scratch: decode_scratch_floats (about (splits + 1) M r floats) from the caching allocator on the call's
// stream, no device allocation after the first call.
void decode_adapter(const at::Tensor& y, const at::Tensor& s, const at::Tensor& x, const at::Tensor& A,
                    const at::Tensor& B, const at::Tensor& d_bank, const at::Tensor& b_bank, const at::Tensor& ids,
                    DecodeBase base_kind, const at::Tensor& base) {
  RECORD_FUNCTION("vera::decode_adapter", std::vector<c10::IValue>({x, A, B, d_bank, b_bank}));
  const at::Tensor x_u = unit_column_stride(x), A_u = unit_column_stride(A), B_u = unit_column_stride(B);
  DecodeAdapter p;
  p.x = x_u.const_data_ptr();
  p.A = A_u.const_data_ptr();
  p.B = B_u.const_data_ptr();
  p.x_stride = x_u.stride(0);
  p.A_stride = A_u.stride(0);
  p.B_stride = B_u.stride(0);
  p.d_bank = d_bank.const_data_ptr();
  p.b_bank = b_bank.const_data_ptr();
  p.ids = ids.defined() ? ids.const_data_ptr<int64_t>() : nullptr;
  p.base_kind = base_kind;
  p.base = base.defined() ? base.const_data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.s = s.defined() ? s.data_ptr() : nullptr;
  p.dtype = kernel_dtype(x.scalar_type());
  p.v_dtype = kernel_dtype(d_bank.scalar_type());
  p.rows = x.size(0);
  p.in = x.size(1);
  p.r = A.size(0);
  p.out = B.size(0);
  p.splits = decode_splits_cuda(p.in, p.r, x.device().index());
  const at::Tensor scratch = at::empty({decode_scratch_floats(p.rows, p.r, p.splits)}, x.options().dtype(at::kFloat));
  p.scratch = scratch.mutable_data_ptr<float>();
  check_cuda("vera decode", decode_adapter_cuda(p, current_stream(x)));
}
#endif

// Rows per block of the adapter term of vera_forward_multi_ (see there).
int64_t multi_block_rows(const at::Tensor& y, int64_t out) {
  return std::max<int64_t>(1, (y.is_cuda() ? kMultiBlockElementsCuda : kMultiBlockElements) / std::max<int64_t>(1, out));
}

// Whether the regrouped products give the formula's IEEE result. The fold (Bdb = b ⊙ B ⊙ d) and G = gᵀ s
// regroup the formula's sums: Σ_k s_k (b_j B_jk d_k) for b_j Σ_k (d_k s_k) B_jk, Σ_j b_j B_jk (Σ_m g_mj s_mk) for
// Σ_m s_mk (Σ_j g_mj b_j B_jk). For finite values that changes only the rounding; an infinite factor, multiplied
// in before a sum, meets the zeros and the opposite signs that the formula's sum would have absorbed first
// (0 * inf, inf - inf: NaN where the formula gives ±inf). Read on CPU tensors, where no device has to be
// waited for; assumed on CUDA (reading a device tensor back would synchronize every call).
// A plain loop over the (small: r, out, out x r) tensors: no ATen op, nothing allocated.
bool finite_on_cpu(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (!t->is_cpu()) continue;
    const at::Tensor c = t->contiguous();
    const auto all_finite = [&](auto tag) {
      using T = decltype(tag);
      const T* v = c.const_data_ptr<T>();
      for (int64_t i = 0; i < c.numel(); ++i) {
        if (!std::isfinite(static_cast<float>(v[i]))) return false;
      }
      return true;
    };
    bool finite = true;
    switch (c.scalar_type()) {
      case at::kFloat: finite = all_finite(float{}); break;
      case at::kBFloat16: finite = all_finite(at::BFloat16{}); break;
      case at::kHalf: finite = all_finite(at::Half{}); break;
      default: finite = at::isfinite(c).all().item<bool>();  // the checks admit no other dtype here
    }
    if (!finite) return false;
  }
  return true;
}

// Whether a call takes the one-pass kernels of small problems (SmallForward, SmallBackward): at most
// kSmallWork multiply-adds (the forward's count; the backward's is about twice it), fp32 or bf16, on CPU
// tensors laid out as those kernels read them, unit column strides (a dimension of one element has no stride
// to speak of).
bool small_problem(at::ScalarType dtype, int64_t m, int64_t in, int64_t r, int64_t out,
                   std::initializer_list<const at::Tensor*> matrices) {
  if (dtype == at::kHalf || double(m) * double(in * out + r * (in + out)) > double(kSmallWork)) return false;
  for (const at::Tensor* t : matrices) {
    if (t == nullptr) continue;
    if (!t->is_cpu() || (t->size(1) > 1 && t->stride(1) != 1)) return false;
  }
  return true;
}

// A row stride that is right for the kernels' indexing also where the tensor has one row (any stride then).
int64_t row_stride(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

// The operands both small passes read (sizes already checked: A is r x in, B out x r); d and b contiguous, kept
// alive by the caller.
void set_small_operands(SmallOperands& p, const std::optional<at::Tensor>& weight, const at::Tensor& A,
                        const at::Tensor& B, const at::Tensor& d, const at::Tensor& b, at::ScalarType dtype,
                        int64_t rows) {
  p.W = weight ? weight->const_data_ptr() : nullptr;
  p.W_stride = weight ? row_stride(*weight) : 0;
  p.A = A.const_data_ptr();
  p.A_stride = row_stride(A);
  p.B = B.const_data_ptr();
  p.B_stride = row_stride(B);
  p.d = d.const_data_ptr();
  p.b = b.const_data_ptr();
  p.dtype = kernel_dtype(dtype);
  p.d_dtype = kernel_dtype(d.scalar_type());
  p.b_dtype = kernel_dtype(b.scalar_type());
  p.rows = rows;
  p.in = A.size(1);
  p.r = A.size(0);
  p.out = B.size(0);
}

void small_forward(const at::Tensor& y, const at::Tensor& s, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                   const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
                   const at::Tensor& lambda_d, const at::Tensor& lambda_b, const std::optional<at::Tensor>& base_out) {
  RECORD_FUNCTION("vera::small_forward", std::vector<c10::IValue>({x, A, B, lambda_d, lambda_b}));
  const at::Tensor d = lambda_d.contiguous(), b = lambda_b.contiguous();
  const at::Tensor bias_c = bias ? bias->contiguous() : at::Tensor();
  SmallForward p;
  set_small_operands(p, weight, A, B, d, b, x.scalar_type(), x.size(0));
  p.x = x.const_data_ptr();
  p.x_stride = row_stride(x);
  p.bias = bias_c.defined() ? bias_c.const_data_ptr() : nullptr;
  p.base_out = base_out ? base_out->const_data_ptr() : nullptr;
  p.base_stride = base_out ? row_stride(*base_out) : 0;
  p.y = y.data_ptr();
  p.s = s.data_ptr();
  small_forward_cpu(p);
}

void small_backward(const std::optional<at::Tensor>& dx, const std::optional<at::Tensor>& dd,
                    const std::optional<at::Tensor>& db, const std::optional<at::Tensor>& dbias, const at::Tensor& g,
                    const at::Tensor& s, const std::optional<at::Tensor>& weight, const at::Tensor& A,
                    const at::Tensor& B, const at::Tensor& lambda_d, const at::Tensor& lambda_b) {
  RECORD_FUNCTION("vera::small_backward", std::vector<c10::IValue>({g, s, A, B, lambda_d, lambda_b}));
  const at::Tensor d = lambda_d.contiguous(), b = lambda_b.contiguous();
  SmallBackward p;
  set_small_operands(p, weight, A, B, d, b, g.scalar_type(), g.size(0));
  p.g = g.const_data_ptr();
  p.s = s.const_data_ptr();
  p.dx = dx ? dx->data_ptr() : nullptr;
  p.dd = dd ? dd->data_ptr() : nullptr;
  p.db = db ? db->data_ptr() : nullptr;
  p.dbias = dbias ? dbias->data_ptr() : nullptr;
  small_backward_cpu(p);
}

// Whether b ⊙ B ⊙ d may be rounded to `dtype`: not to fp16, whose range ends at 65504 and whose normal numbers at
// 6.1e-5, where the formula scales in fp32 (b·d ≈ 9e5 overflowed to inf, b ~ 1e-4 lost 2% to subnormals);
// bf16 has fp32's range and rounds Bdb as the formula rounds t = d ⊙ s.
bool fold_fits(at::ScalarType dtype) { return dtype != at::kHalf; }

// y = base (already in y), then y += b ⊙ ((d ⊙ s) Bᵀ) in the formula's order (reference.py): t = d ⊙ s in
// fp32 rounded to s's dtype, u = t Bᵀ, then b ⊙ u in fp32, rounded once onto y. Through the bank kernel with
// a one-adapter bank and every row on it (an M x out temporary: for the cases the fold can't take).
void add_adapter_term_unfolded(const at::Tensor& y, const at::Tensor& s, const at::Tensor& B, const at::Tensor& d,
                               const at::Tensor& b) {
  const int64_t m = s.size(0), r = s.size(1), out = B.size(0);
  const at::Tensor on_it = at::zeros({m}, s.options().dtype(at::kLong));
  at::Tensor t = at::empty({m, r}, s.options());
  gather_scale(t, s, d.contiguous().view({1, r}), on_it, /*accumulate=*/false);
  gather_scale(y, at::mm(t, B.t()), b.contiguous().view({1, out}), on_it, /*accumulate=*/true);
}

// The backward in the formula's order (reference.vera_backward), for what the regrouped products can't give
// (see finite_on_cpu, fold_fits): dt = (g ⊙ b) B, dd = Σ_m dt ⊙ s, db = Σ_m g ⊙ u with u = (d ⊙ s) Bᵀ,
// d ⊙ dt for dx; products in fp32 rounded to g's dtype, sums over M in fp32. Null outputs are not computed.
void backward_unfolded(at::Tensor* dx, const at::Tensor* dd, const at::Tensor* db, const at::Tensor& g,
                       const at::Tensor& s, const std::optional<at::Tensor>& weight, const at::Tensor& A,
                       const at::Tensor& B, const at::Tensor& d, const at::Tensor& b) {
  const int64_t m = g.size(0), r = s.size(1), out = g.size(1);
  const at::Tensor on_it = at::zeros({m}, g.options().dtype(at::kLong));
  const at::Tensor d_bank = d.contiguous().view({1, r}), b_bank = b.contiguous().view({1, out});
  if (db) {
    at::Tensor t = at::empty({m, r}, s.options());
    gather_scale(t, s, d_bank, on_it, /*accumulate=*/false);
    db->copy_(at::sum(at::mul(g.to(at::kFloat), at::mm(t, B.t()).to(at::kFloat)), 0));
  }
  if (!dd && !dx) return;
  at::Tensor gb = at::empty({m, out}, g.options());
  gather_scale(gb, g, b_bank, on_it, /*accumulate=*/false);
  const at::Tensor dt = at::mm(gb, B);
  if (dd) dd->copy_(at::sum(at::mul(dt.to(at::kFloat), s.to(at::kFloat)), 0));
  if (dx) {
    at::Tensor ds = at::empty({m, r}, g.options());
    gather_scale(ds, dt, d_bank, on_it, /*accumulate=*/false);
    at::mm_out(*dx, ds, A);
    if (weight) dx->addmm_(g, *weight);
  }
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
#ifdef VERA_WITH_CUDA
  if (x.is_cuda() && m > 0 && m <= kDecodeMaxRows) {
    // Decode: the adapter term by the split-K kernels (B is read once, unfolded; no GEMM call), then the
    // base GEMM accumulates into y.
    const at::Tensor d = lambda_d.contiguous().view({1, r}), b = lambda_b.contiguous().view({1, out});
    if (weight) {
      decode_adapter(y, s, x, A, B, d, b, at::Tensor(), DecodeBase::kBias, bias ? bias->contiguous() : at::Tensor());
      y.addmm_(x, weight->t());
    } else {
      decode_adapter(y, s, x, A, B, d, b, at::Tensor(), DecodeBase::kRows, base_out->contiguous());
    }
    return;
  }
#endif
  if (small_problem(dtype, m, in, r, out, {&x, get(weight), &A, &B, get(base_out)}) &&
      finite_on_cpu({&lambda_d, &lambda_b})) {
    small_forward(y, s, x, weight, bias, A, B, lambda_d, lambda_b, base_out);
    return;
  }
  // y is written once by the small product (with the bias or base_out), then the base GEMM accumulates
  // into it (beta = 1: in a compute-bound main loop the read of y costs nothing).
  const bool fold = fold_fits(dtype) && finite_on_cpu({&lambda_d, &lambda_b});
  const at::Tensor Bdb = fold ? folded_projection(B, lambda_d, lambda_b) : at::Tensor();
  at::mm_out(s, x, A.t());
  if (!fold) {
    // The formula's order (see fold_fits, finite_on_cpu): y = base, then y += b ⊙ ((d ⊙ s) Bᵀ).
    if (weight) {
      bias ? at::addmm_out(y, *bias, x, weight->t()) : at::mm_out(y, x, weight->t());
    } else {
      y.copy_(*base_out);
    }
    add_adapter_term_unfolded(y, s, B, lambda_d, lambda_b);
    return;
  }
  if (weight) {
    if (bias) {
      at::addmm_out(y, *bias, s, Bdb.t());
    } else {
      at::mm_out(y, s, Bdb.t());
    }
    y.addmm_(x, weight->t());
  } else {
    at::addmm_out(y, *base_out, s, Bdb.t());
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
  check_adapter_ids(op, adapter_ids, n);

  const c10::DeviceGuard guard(x.device());
  const at::Tensor ids = adapter_ids.contiguous();
  const at::Tensor bank_d = lambda_d_bank.contiguous(), bank_b = lambda_b_bank.contiguous();
  if (weight) {
    if (bias) {
      at::addmm_out(y, *bias, x, weight->t());  // F.linear's own call: -1 rows equal it bit for bit
    } else {
      at::mm_out(y, x, weight->t());
    }
  }
#ifdef VERA_WITH_CUDA
  if (x.is_cuda() && m > 0 && m <= kDecodeMaxRows) {
    // Decode: the split-K kernels gather each row's vectors in the shrink's second stage and the expand.
    if (weight) {
      decode_adapter(y, at::Tensor(), x, A, B, bank_d, bank_b, ids, DecodeBase::kAccumulate, at::Tensor());
    } else {
      decode_adapter(y, at::Tensor(), x, A, B, bank_d, bank_b, ids, DecodeBase::kRows, base_out->contiguous());
    }
    return;
  }
#endif
  if (!weight) y.copy_(*base_out);
  // t = d[ids] ⊙ (x Aᵀ), in place over s (nothing is saved: no backward).
  at::Tensor t = at::mm(x, A.t());
  gather_scale(t, t, bank_d, ids, /*accumulate=*/false);
  // b[ids] cannot be folded into B as in vera_forward_ (one b per row, not per launch): per block of rows,
  // u = t Bᵀ into a bounded temporary, then y += b[ids] ⊙ u.
  const int64_t block = multi_block_rows(y, out);
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
  const bool vectors_finite = finite_on_cpu({&lambda_d, &lambda_b});
  if (vectors_finite && small_problem(dtype, m, in, r, out, {&grad_out, get(weight), &A, &B}) &&
      finite_on_cpu({&grad_out, &s})) {
    small_backward(dx, dd, db, dbias, grad_out, s, weight, A, B, lambda_d, lambda_b);
    return;
  }
  if (dd || db) {
    // G = gᵀ s (out x r, fp32) holds every sum over M the vector gradients need:
    //   db_j = Σ_m g_mj (t Bᵀ)_mj = Σ_k B_jk d_k G_jk,   dd_k = Σ_m dt_mk s_mk = Σ_j b_j B_jk G_jk.
    // A non-finite g or s makes G non-finite: then the formula's order (see finite_on_cpu).
    const at::Tensor G = grad_outer(grad_out, s);
    if (vectors_finite && finite_on_cpu({&G})) {
      const at::Tensor d = lambda_d.contiguous(), b = lambda_b.contiguous();
      lambda_grads(db ? *db : at::Tensor(), dd ? *dd : at::Tensor(), B.contiguous(), G, d, b);
    } else {
      backward_unfolded(nullptr, get(dd), get(db), grad_out, s, weight, A, B, lambda_d, lambda_b);
    }
  }
  if (dbias) column_sums(*dbias, grad_out);
  if (dx) {
    at::Tensor dx_out = *dx;
    if (fold_fits(dtype) && vectors_finite) {
      // d ⊙ dt = g Bdb (M x r), then dx is written once by (d ⊙ dt) A and the base GEMM accumulates into it.
      at::mm_out(dx_out, at::mm(grad_out, folded_projection(B, lambda_d, lambda_b)), A);
      if (weight) dx_out.addmm_(grad_out, *weight);
    } else {
      backward_unfolded(&dx_out, nullptr, nullptr, grad_out, s, weight, A, B, lambda_d, lambda_b);
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
