// vera_kernels._C: the VeRA ops registered with the dispatcher (TORCH_LIBRARY), and a small pybind11 module
// for what is not an op (the projection fill, the Philox known-answer helper, build facts, the test switch
// that poisons fresh outputs).
//
// One namespace, one schema per op, shared with the Triton backend's ops (vera_kernels::triton_*):
//   forward(x, weight?, bias?, A?, B?, lambda_d, lambda_b, base_out?, seed, max_in) -> (y, s)
//   backward(grad, s, weight?, A?, B?, lambda_d, lambda_b, in_features, need_dx, need_dd, need_db, need_dbias,
//            seed, max_in) -> (dx, dd, db, dbias)          (an output not asked for is empty)
//   forward_multi(x, weight?, bias?, A, B, lambda_d_bank, lambda_b_bank, adapter_ids, base_out?) -> y
// A and B None with (seed, max_in) means "generate the projections inside the kernels": only Triton does;
// here they must be given. The kernels are csrc/vera_ops.cpp's (argument checks, then the work); this file
// allocates their outputs, and registers autograd (the hand-written backward) and autocast in C++, so that
// an eager call is one trip through the dispatcher and torch.compile / torch.export see plain ops (their
// fake kernels are registered in vera_kernels/_extension.py).
#include <torch/extension.h>

#include <ATen/autocast_mode.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include <atomic>
#include <limits>
#include <optional>
#include <tuple>

#include "vera_ops.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Forward = std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                           const OptTensor&, const Tensor&, const Tensor&, const OptTensor&,
                                           int64_t, int64_t);
using Backward = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                            const OptTensor&, const OptTensor&, const Tensor&,
                                                            const Tensor&, int64_t, bool, bool, bool, bool,
                                                            int64_t, int64_t);
using ForwardMulti = Tensor(const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&,
                            const Tensor&, const Tensor&, const Tensor&, const OptTensor&);

// Tests set this (vera_kernels.dispatch.poisoned_outputs) so that an element a kernel leaves unwritten shows
// up as NaN instead of passing by luck.
std::atomic<bool> poison_outputs{false};

Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor t = at::empty(sizes, options);
  if (poison_outputs.load(std::memory_order_relaxed)) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// Small problems run on the calling thread alone: below about this many multiply-adds (~0.1 ms on one core),
// handing work to other threads costs more than it saves, and on a busy machine a fork/join can wait for
// milliseconds (measured: a 1024 x 1024 decode step, M = 1, took 4x the torch backend's time on 2 threads of a
// loaded machine, and less than it on one). Decided per call and per thread: OpenMP's thread count is a
// per-thread setting (at::get_num_threads reads it), so this leaves other threads and the process-wide
// at::set_num_threads alone; every at::parallel_for inside the call (ours and ATen's) then runs inline.
constexpr int64_t kSerialWork = int64_t(1) << 22;

class SerialIfSmall {
 public:
  SerialIfSmall(const Tensor& t, int64_t work) {
#ifdef _OPENMP
    if (t.is_cpu() && work <= kSerialWork && !omp_in_parallel()) {
      const int threads = at::get_num_threads();  // also ATen's per-thread first-use initialization
      if (threads > 1) {
        previous_ = threads;
        omp_set_num_threads(1);
      }
    }
#endif
  }
  ~SerialIfSmall() {
#ifdef _OPENMP
    if (previous_ > 1) omp_set_num_threads(previous_);
#endif
  }
  SerialIfSmall(const SerialIfSmall&) = delete;
  SerialIfSmall& operator=(const SerialIfSmall&) = delete;

 private:
  int previous_ = 0;
};

void check_projections_given(const char* op, const OptTensor& A, const OptTensor& B) {
  TORCH_CHECK(A.has_value() && B.has_value(), op,
              ": the cpu and cuda backends read A and B; generating them inside the kernels (A and B None, "
              "from seed and max_in) is the triton backend's");
}

// The shapes the outputs are allocated from, checked before anything is allocated (the kernels' own checks
// then cover everything else).
void check_2d(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be a 2-D tensor, got ", t.dim(), "-D");
}

std::tuple<Tensor, Tensor> forward_kernel(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                          const OptTensor& A, const OptTensor& B, const Tensor& lambda_d,
                                          const Tensor& lambda_b, const OptTensor& base_out, int64_t /*seed*/,
                                          int64_t /*max_in*/) {
  constexpr const char* op = "vera_kernels::forward";
  check_projections_given(op, A, B);
  check_2d(op, "x", x);
  check_2d(op, "A", *A);
  check_2d(op, "B", *B);
  const int64_t m = x.size(0), in = x.size(1), r = A->size(0), out = B->size(0);
  const SerialIfSmall serial(x, m * (in * out + r * (in + out)) + r * out);
  Tensor y = new_output({m, out}, x.options());
  Tensor s = new_output({m, r}, x.options());
  vera::vera_forward_(y, s, x, weight, bias, *A, *B, lambda_d, lambda_b, base_out);
  return {y, s};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> backward_kernel(
    const Tensor& grad, const Tensor& s, const OptTensor& weight, const OptTensor& A, const OptTensor& B,
    const Tensor& lambda_d, const Tensor& lambda_b, int64_t in_features, bool need_dx, bool need_dd,
    bool need_db, bool need_dbias, int64_t /*seed*/, int64_t /*max_in*/) {
  constexpr const char* op = "vera_kernels::backward";
  check_projections_given(op, A, B);
  check_2d(op, "grad", grad);
  check_2d(op, "s", s);
  check_2d(op, "A", *A);
  // dx is (M, in_features): the fake kernel allocates it from in_features, so it must be A's width here too.
  TORCH_CHECK_VALUE(in_features == A->size(1), op, ": in_features must be A's width ", A->size(1), ", got ",
                    in_features);
  const int64_t m = grad.size(0), out = grad.size(1), r = s.size(1), in = A->size(1);
  const SerialIfSmall serial(grad, 2 * m * (in * out + r * (in + out)) + r * out);
  const auto maybe = [](bool needed, at::IntArrayRef sizes, const at::TensorOptions& options) -> OptTensor {
    return needed ? OptTensor(new_output(sizes, options)) : std::nullopt;
  };
  OptTensor dx = maybe(need_dx, {m, A->size(1)}, grad.options());
  OptTensor dd = maybe(need_dd, {s.size(1)}, lambda_d.options());
  OptTensor db = maybe(need_db, {out}, lambda_b.options());
  OptTensor dbias = maybe(need_dbias, {out}, grad.options());
  vera::vera_backward_(dx, dd, db, dbias, grad, s, weight, *A, *B, lambda_d, lambda_b);
  const auto or_empty = [&](const OptTensor& t) { return t ? *t : grad.new_empty({0}); };
  return {or_empty(dx), or_empty(dd), or_empty(db), or_empty(dbias)};
}

Tensor forward_multi_kernel(const Tensor& x, const OptTensor& weight, const OptTensor& bias, const Tensor& A,
                            const Tensor& B, const Tensor& lambda_d_bank, const Tensor& lambda_b_bank,
                            const Tensor& adapter_ids, const OptTensor& base_out) {
  constexpr const char* op = "vera_kernels::forward_multi";
  check_2d(op, "x", x);
  check_2d(op, "A", A);
  check_2d(op, "B", B);
  const int64_t m = x.size(0), out = B.size(0);
  const SerialIfSmall serial(x, m * (x.size(1) * out + A.size(0) * (x.size(1) + out)));
  Tensor y = new_output({m, out}, x.options());
  vera::vera_forward_multi_(y, x, weight, bias, A, B, lambda_d_bank, lambda_b_bank, adapter_ids, base_out);
  return y;
}

// ---------------------------------------------------------------------------------------------------
// Autograd: the forward saves s (M x r) and the parameters; the backward is the op above.

const c10::TypedOperatorHandle<Forward>& forward_op() {
  static const auto handle =
      c10::Dispatcher::singleton().findSchemaOrThrow("vera_kernels::forward", "").typed<Forward>();
  return handle;
}

const c10::TypedOperatorHandle<Backward>& backward_op() {
  static const auto handle =
      c10::Dispatcher::singleton().findSchemaOrThrow("vera_kernels::backward", "").typed<Backward>();
  return handle;
}

const c10::TypedOperatorHandle<ForwardMulti>& forward_multi_op() {
  static const auto handle =
      c10::Dispatcher::singleton().findSchemaOrThrow("vera_kernels::forward_multi", "").typed<ForwardMulti>();
  return handle;
}

class VeraFunction : public torch::autograd::Function<VeraFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& x,
                                                const OptTensor& weight, const OptTensor& bias, const OptTensor& A,
                                                const OptTensor& B, const Tensor& lambda_d, const Tensor& lambda_b,
                                                const OptTensor& base_out, int64_t seed, int64_t max_in) {
    Tensor y, s;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, s) = forward_op().call(x, weight, bias, A, B, lambda_d, lambda_b, base_out, seed, max_in);
    }
    ctx->save_for_backward({s, weight.value_or(Tensor()), A.value_or(Tensor()), B.value_or(Tensor()), lambda_d,
                            lambda_b});
    ctx->saved_data["in_features"] = x.size(1);
    ctx->saved_data["with_bias"] = bias.has_value();
    ctx->saved_data["with_base_out"] = base_out.has_value();
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["max_in"] = max_in;
    // s leaves the op only to be saved: no gradient flows into it, and none is materialized for it.
    ctx->mark_non_differentiable({s});
    ctx->set_materialize_grads(false);
    return {y, s};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (!grads[0].defined()) return torch::autograd::variable_list(10);  // y's gradient is zero
    // The backward is hand-written and has no derivative of its own: refused outright rather than left to
    // whichever of the kernel's inner calls would notice (the small-problem kernels make none).
    TORCH_CHECK(!at::GradMode::is_enabled(), "vera_kernels::forward: a double backward (create_graph=True) is "
                "not implemented: the op's backward has no derivative of its own");
    const auto saved = ctx->get_saved_variables();
    const auto optional = [](const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; };
    // needs_input_grad counts the tensor inputs that were given (an absent optional has no edge).
    const bool with_bias = ctx->saved_data["with_bias"].toBool();
    const bool with_base_out = ctx->saved_data["with_base_out"].toBool();
    const int64_t before_d = 1 + saved[1].defined() + with_bias + saved[2].defined() + saved[3].defined();
    const bool need_dx = ctx->needs_input_grad(0);
    const bool need_dbias = with_bias && ctx->needs_input_grad(1 + saved[1].defined());
    const bool need_dd = ctx->needs_input_grad(before_d), need_db = ctx->needs_input_grad(before_d + 1);
    const bool need_dbase = with_base_out && ctx->needs_input_grad(before_d + 2);
    // The kernels read grad row by row; autograd may hand over a broadcast or transposed view.
    const Tensor grad = grads[0].contiguous();
    Tensor dx, dd, db, dbias;
    if (need_dx || need_dbias || need_dd || need_db) {
      // Nothing here is recorded (no create_graph, above): go straight to the kernel, past the Autograd
      // key's boxed not-implemented fallback (which would only redispatch, and costs more than the kernel
      // at decode sizes).
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(dx, dd, db, dbias) = backward_op().call(
          grad, saved[0], optional(saved[1]), optional(saved[2]), optional(saved[3]), saved[4], saved[5],
          ctx->saved_data["in_features"].toInt(), need_dx, need_dd, need_db, need_dbias,
          ctx->saved_data["seed"].toInt(), ctx->saved_data["max_in"].toInt());
    }
    const auto when = [](bool needed, const Tensor& t) { return needed ? t : Tensor(); };
    return {when(need_dx, dx), Tensor(), when(need_dbias, dbias), Tensor(), Tensor(), when(need_dd, dd),
            when(need_db, db), when(need_dbase, grads[0]), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> forward_autograd(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                            const OptTensor& A, const OptTensor& B, const Tensor& lambda_d,
                                            const Tensor& lambda_b, const OptTensor& base_out, int64_t seed,
                                            int64_t max_in) {
  const auto wants_grad = [](const OptTensor& t) { return t.has_value() && t->requires_grad(); };
  // The backward gives gradients for x, bias, lambda_d, lambda_b and base_out only: a weight, A or B that
  // requires one would silently get none (vera_kernels.vera_linear refuses them the same way).
  const auto frozen = [&](const char* name, const OptTensor& t) {
    TORCH_CHECK_VALUE(!at::GradMode::is_enabled() || !wants_grad(t), "vera_kernels::forward: ", name,
                      " requires grad, but VeRA freezes W0, A and B and this op gives them no gradient; pass it "
                      "detached (or with requires_grad=False), or run under torch.no_grad()");
  };
  frozen("weight", weight);
  frozen("A", A);
  frozen("B", B);
  if (!at::GradMode::is_enabled() ||
      !(x.requires_grad() || wants_grad(bias) || lambda_d.requires_grad() || lambda_b.requires_grad() ||
        wants_grad(base_out))) {
    // Nothing to differentiate (serving): no autograd node, nothing saved.
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_op().call(x, weight, bias, A, B, lambda_d, lambda_b, base_out, seed, max_in);
  }
  auto out = VeraFunction::apply(x, weight, bias, A, B, lambda_d, lambda_b, base_out, seed, max_in);
  return {out[0], out[1]};
}

// ---------------------------------------------------------------------------------------------------
// Autocast: what autocast does for nn.Linear, run the GEMMs in its dtype. x, weight, bias, A, B and base_out
// are cast; lambda_d and lambda_b stay as they are (the ops take float32 lambdas on any dtype: small vectors
// whose updates would vanish in bf16).

OptTensor cast(const OptTensor& t, at::ScalarType dtype) {
  if (!t || !t->is_floating_point() || t->scalar_type() == dtype) return t;
  return t->to(dtype);
}

template <c10::DeviceType device_type, c10::DispatchKey key>
std::tuple<Tensor, Tensor> forward_autocast(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                            const OptTensor& A, const OptTensor& B, const Tensor& lambda_d,
                                            const Tensor& lambda_b, const OptTensor& base_out, int64_t seed,
                                            int64_t max_in) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device_type);
  const auto c = [&](const OptTensor& t) { return cast(t, dtype); };
  return forward_op().call(*c(x), c(weight), c(bias), c(A), c(B), lambda_d, lambda_b, c(base_out), seed, max_in);
}

template <c10::DeviceType device_type, c10::DispatchKey key>
Tensor forward_multi_autocast(const Tensor& x, const OptTensor& weight, const OptTensor& bias, const Tensor& A,
                              const Tensor& B, const Tensor& lambda_d_bank, const Tensor& lambda_b_bank,
                              const Tensor& adapter_ids, const OptTensor& base_out) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device_type);
  const auto c = [&](const OptTensor& t) { return cast(t, dtype); };
  return forward_multi_op().call(*c(x), c(weight), c(bias), *c(A), *c(B), lambda_d_bank, lambda_b_bank,
                                 adapter_ids, c(base_out));
}

}  // namespace

TORCH_LIBRARY(vera_kernels, m) {
  // Where the fake (meta) kernels live, for torch.compile when only this library was loaded.
  m.set_python_module("vera_kernels._extension");
  m.def(
      "forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? A, Tensor? B, Tensor lambda_d, Tensor lambda_b, "
      "Tensor? base_out, int seed, int max_in) -> (Tensor, Tensor)");
  m.def(
      "backward(Tensor grad, Tensor s, Tensor? weight, Tensor? A, Tensor? B, Tensor lambda_d, Tensor lambda_b, "
      "int in_features, bool need_dx, bool need_dd, bool need_db, bool need_dbias, int seed, int max_in) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "forward_multi(Tensor x, Tensor? weight, Tensor? bias, Tensor A, Tensor B, Tensor lambda_d_bank, "
      "Tensor lambda_b_bank, Tensor adapter_ids, Tensor? base_out) -> Tensor");
}

TORCH_LIBRARY_IMPL(vera_kernels, CPU, m) {
  m.impl("forward", &forward_kernel);
  m.impl("backward", &backward_kernel);
  m.impl("forward_multi", &forward_multi_kernel);
}

TORCH_LIBRARY_IMPL(vera_kernels, Autograd, m) {
  m.impl("forward", &forward_autograd);
  // Serving only: a clear error if a gradient is ever asked of it.
  m.impl("forward_multi", torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(vera_kernels, AutocastCPU, m) {
  m.impl("forward", &forward_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
  m.impl("forward_multi", &forward_multi_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

#ifdef VERA_WITH_CUDA
TORCH_LIBRARY_IMPL(vera_kernels, CUDA, m) {
  m.impl("forward", &forward_kernel);
  m.impl("backward", &backward_kernel);
  m.impl("forward_multi", &forward_multi_kernel);
}

TORCH_LIBRARY_IMPL(vera_kernels, AutocastCUDA, m) {
  m.impl("forward", &forward_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
  m.impl("forward_multi", &forward_multi_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "vera_kernels C++/CUDA kernels. The VeRA ops are torch.ops.vera_kernels.forward, .backward and "
      ".forward_multi (registered when this module loads); here: the shared random projections, Philox4x32-10, "
      "build facts and the test switch that poisons fresh outputs.";
  m.def("fill_projection_", &vera::fill_projection_, py::arg("out"), py::arg("seed"), py::arg("tag"),
        py::arg("fan_in"), py::arg("row_offset") = 0, py::arg("col_offset") = 0,
        "Fill the 2-D float32/bfloat16/float16 tensor `out` in place with the block at (row_offset, "
        "col_offset) of the shared projection matrix `tag` (0: A, 1: B) for `seed` and `fan_in`.");
  m.def("philox4x32_10", &vera::philox4x32_10, py::arg("counters"), py::arg("keys"),
        "Philox4x32-10 of each row of `counters` (N x 4 int64) under the matching row of `keys` "
        "(N x 2 int64), values in [0, 2^32). Returns N x 4 int64.");
  m.def("built_with_cuda", &vera::built_with_cuda, "Whether the CUDA kernels were compiled in.");
  m.def(
      "set_poison_outputs", [](bool on) { return poison_outputs.exchange(on); }, py::arg("on"),
      "Fill the ops' fresh outputs with NaN before the kernels run (tests); returns the previous setting.");
}
