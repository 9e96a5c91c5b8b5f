"""vera_linear and vera_delta on every backend that implements them, against the float64 oracle:
y, dx, dd, db, dbias and the delta, fresh random inputs, odd shapes, every dtype, outputs poisoned."""

import pytest
import torch

from vera_kernels import verify
from vera_kernels.dispatch import _implementation

from conftest import DEVICE, backend_params


def _with_ops(params):
    import vera_kernels.ops  # noqa: F401  registers the torch backend

    out = []
    for p in params:
        (name,) = p.values
        missing = not p.marks and _implementation(name, "vera_linear") is None
        marks = [pytest.mark.skip(reason=f"{name} does not implement vera_linear yet")] if missing else p.marks
        out.append(pytest.param(name, id=name, marks=marks))
    return out


@pytest.mark.parametrize("shape", verify.OP_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(verify.OP_TOLERANCE), ids=str)
@pytest.mark.parametrize("backend", _with_ops(backend_params()))
def test_ops_against_float64(backend, dtype, shape):
    seed = int(torch.randint(0, 2**31, ()))
    passed, errors, baseline = verify.op_check(backend, DEVICE, dtype, shape, seed)
    assert set(errors) == {"y", "dx", "dbias", "dd", "db", "delta"}
    assert passed, f"seed {seed}: errors {errors}, PyTorch's own errors in {dtype}: {baseline}"


def test_poisoned_output_is_caught():
    # An op that leaves one element unwritten must fail the check: NaN never passes.
    from vera_kernels.dispatch import new_output, poisoned_outputs

    with poisoned_outputs():
        out = new_output(3, 4, dtype=torch.float32, device="cpu")
    out[:, :3] = 1.0
    assert verify.relative_error(out, torch.ones(3, 4)) == float("inf")
