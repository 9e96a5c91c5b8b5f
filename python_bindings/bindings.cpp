// The Python module vera_kernels._C.
#include <torch/extension.h>

#include "vera_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "vera_kernels C++/CUDA kernels: the shared random projections, Philox4x32-10 and the VeRA forward and "
      "backward. vera_kernels._extension registers the VeRA ones as torch.library ops.";
  m.def("fill_projection_", &vera::fill_projection_, py::arg("out"), py::arg("seed"), py::arg("tag"),
        py::arg("fan_in"), py::arg("row_offset") = 0, py::arg("col_offset") = 0,
        "Fill the 2-D float32/bfloat16/float16 tensor `out` in place with the block at (row_offset, "
        "col_offset) of the shared projection matrix `tag` (0: A, 1: B) for `seed` and `fan_in`.");
  m.def("philox4x32_10", &vera::philox4x32_10, py::arg("counters"), py::arg("keys"),
        "Philox4x32-10 of each row of `counters` (N x 4 int64) under the matching row of `keys` "
        "(N x 2 int64), values in [0, 2^32). Returns N x 4 int64.");
  m.def("vera_forward_", &vera::vera_forward_, py::arg("y"), py::arg("s"), py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("A"), py::arg("B"), py::arg("lambda_d"), py::arg("lambda_b"),
        py::arg("base_out"),
        "Write y = x W0ᵀ + bias + b ⊙ ((d ⊙ s) Bᵀ) (weight given) or base_out + b ⊙ ((d ⊙ s) Bᵀ) (base_out "
        "given, weight and bias None) into y (M, out), and s = x Aᵀ into s (M, r).");
  m.def("vera_forward_multi_", &vera::vera_forward_multi_, py::arg("y"), py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("A"), py::arg("B"), py::arg("lambda_d_bank"), py::arg("lambda_b_bank"),
        py::arg("adapter_ids"), py::arg("base_out"),
        "Many adapters, inference only: write y_m = x_m W0ᵀ + bias (or base_out_m) + b[a] ⊙ ((d[a] ⊙ (x_m Aᵀ)) "
        "Bᵀ), a = adapter_ids[m] (-1: the base alone), into y (M, out).");
  m.def("vera_backward_", &vera::vera_backward_, py::arg("dx"), py::arg("dd"), py::arg("db"), py::arg("dbias"),
        py::arg("grad_out"), py::arg("s"), py::arg("weight"), py::arg("A"), py::arg("B"), py::arg("lambda_d"),
        py::arg("lambda_b"),
        "Write the gradients dx (M, in), dd (r), db (out), dbias (out) that are not None, from grad_out (M, "
        "out) and the saved s (M, r); weight None: vera_delta's dx = (d ⊙ dt) A.");
  m.def("built_with_cuda", &vera::built_with_cuda, "Whether the CUDA kernels were compiled in.");
}
