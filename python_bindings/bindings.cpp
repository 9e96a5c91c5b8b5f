// The Python module vera_kernels._C.
#include <torch/extension.h>

#include "vera_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vera_kernels C++/CUDA kernels: the shared random projections and Philox4x32-10.";
  m.def("fill_projection_", &vera::fill_projection_, py::arg("out"), py::arg("seed"), py::arg("tag"),
        py::arg("fan_in"), py::arg("row_offset") = 0, py::arg("col_offset") = 0,
        "Fill the 2-D float32/bfloat16/float16 tensor `out` in place with the block at (row_offset, "
        "col_offset) of the shared projection matrix `tag` (0: A, 1: B) for `seed` and `fan_in`.");
  m.def("philox4x32_10", &vera::philox4x32_10, py::arg("counters"), py::arg("keys"),
        "Philox4x32-10 of each row of `counters` (N x 4 int64) under the matching row of `keys` "
        "(N x 2 int64), values in [0, 2^32). Returns N x 4 int64.");
  m.def("built_with_cuda", &vera::built_with_cuda, "Whether the CUDA kernels were compiled in.");
}
