"""What is specific to the compiled extension vera_kernels._C: the argument checks of its projection ops.

The values it computes are tested with every other backend against the golden file; here each bad
argument must raise before any work, with a message that names the argument. The VeRA forward and
backward ops have their own file, tests/test_extension_ops.py.
"""

import pytest
import torch

C = pytest.importorskip("vera_kernels._C")

GOOD_FILL = dict(seed=0, tag=0, fan_in=16, row_offset=0, col_offset=0)


def fill(out, **overrides):
    C.fill_projection_(out, **{**GOOD_FILL, **overrides})


def test_fill_projection_accepts_good_arguments():
    out = torch.empty(4, 16)
    fill(out)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "out, overrides, pattern",
    [
        (torch.empty(4), {}, "out must be a 2-D tensor"),
        (torch.empty(2, 4, 16), {}, "out must be a 2-D tensor"),
        (torch.empty(4, 16, dtype=torch.float64), {}, "out must be float32, bfloat16 or float16"),
        (torch.empty(4, 16, dtype=torch.int32), {}, "out must be float32, bfloat16 or float16"),
        (torch.empty(4, 16), {"seed": -1}, "seed must be in"),
        (torch.empty(4, 16), {"tag": 2}, "tag must be 0"),
        (torch.empty(4, 16), {"tag": -1}, "tag must be 0"),
        (torch.empty(4, 16), {"fan_in": 0}, "fan_in must be >= 1"),
        (torch.empty(4, 16), {"row_offset": -1}, "row_offset must be >= 0"),
        (torch.empty(4, 16), {"col_offset": -3}, "col_offset must be >= 0"),
        (torch.empty(4, 16), {"row_offset": 2**32 - 3}, "row_offset \\+ out.size\\(0\\) must be <= 2\\^32"),
        (torch.empty(4, 16), {"col_offset": 2**34 - 15}, "col_offset \\+ out.size\\(1\\) must be <= 2\\^34"),
    ],
)
def test_fill_projection_rejects_bad_arguments(out, overrides, pattern):
    before = out.clone()
    with pytest.raises(RuntimeError, match=pattern):
        fill(out, **overrides)
    # Checked before any work: nothing was written.
    assert torch.equal(out.view(torch.uint8), before.view(torch.uint8))


def test_fill_projection_rejects_overlapping_out():
    out = torch.empty(1, 16).expand(4, 16)
    with pytest.raises(RuntimeError, match="single memory location"):
        fill(out)


@pytest.mark.skipif(
    C.built_with_cuda() or not torch.cuda.is_available(), reason="needs a CUDA tensor and a CPU-only build"
)
def test_cuda_tensor_without_cuda_build_names_the_cause():
    with pytest.raises(RuntimeError, match="built without CUDA"):
        fill(torch.empty(4, 16, device="cuda"))


def test_built_with_cuda_is_a_bool():
    assert isinstance(C.built_with_cuda(), bool)


KAT_COUNTERS = [[0, 0, 0, 0], [2**32 - 1] * 4]
KAT_KEYS = [[0, 0], [2**32 - 1] * 2]


def test_philox_accepts_good_arguments():
    out = C.philox4x32_10(torch.tensor(KAT_COUNTERS), torch.tensor(KAT_KEYS))
    assert out.dtype == torch.int64 and out.shape == (2, 4)
    assert out.tolist()[0] == [1713891541, 3781805453, 3159862348, 2600524760]


@pytest.mark.parametrize(
    "counters, keys, pattern",
    [
        (torch.zeros(2, 4, dtype=torch.int32), torch.tensor(KAT_KEYS), "counters must be int64"),
        (torch.tensor(KAT_COUNTERS), torch.tensor(KAT_KEYS, dtype=torch.float32), "keys must be int64"),
        (torch.tensor(KAT_COUNTERS).flatten(), torch.tensor(KAT_KEYS), "counters must have shape \\(N, 4\\)"),
        (torch.tensor(KAT_COUNTERS)[:, :3], torch.tensor(KAT_KEYS), "counters must have shape \\(N, 4\\)"),
        (torch.tensor(KAT_COUNTERS), torch.tensor(KAT_KEYS).flatten(), "keys must have shape \\(N, 2\\)"),
        (torch.tensor(KAT_COUNTERS), torch.tensor(KAT_KEYS)[:1], "same N"),
        (torch.tensor(KAT_COUNTERS).t().contiguous().t(), torch.tensor(KAT_KEYS), "counters must be contiguous"),
        (torch.tensor(KAT_COUNTERS), torch.tensor(KAT_KEYS).t().contiguous().t(), "keys must be contiguous"),
        (torch.tensor([[0, 0, -1, 0]] * 2), torch.tensor(KAT_KEYS), "counters values must be in \\[0, 2\\^32\\)"),
        (torch.tensor(KAT_COUNTERS), torch.tensor([[2**32, 0]] * 2), "keys values must be in \\[0, 2\\^32\\)"),
    ],
)
def test_philox_rejects_bad_arguments(counters, keys, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        C.philox4x32_10(counters, keys)
