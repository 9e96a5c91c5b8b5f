"""Time to materialize the shared pair from the seed, per backend (once per model, device and dtype).

    pytest bench/ --benchmark-only        VERA_BENCH_QUICK=1: the smallest shape, one round (bench_common)
"""

import pytest
import torch

import vera_kernels
from bench_common import DEVICE, DRY_RUN, QUICK, run, synchronize

SHAPES = {"cpu": [(256, 4096, 4096)], "cuda": [(256, 4096, 4096), (1024, 11008, 11008)]}[DEVICE]
if DRY_RUN:
    SHAPES = [(16, 256, 256)]
elif QUICK:
    SHAPES = SHAPES[:1]


def _runnable(name):
    status = vera_kernels.backends()[name]
    # Interpreted Triton timings say nothing about the kernel: only time Triton on a GPU.
    return status.available and DEVICE in status.devices and not (name == "triton" and DEVICE == "cpu")


@pytest.mark.parametrize("rank, max_in, max_out", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("backend", ["torch", "triton", "cpu", "cuda"])
def test_generate_projections(benchmark, backend, dtype, rank, max_in, max_out):
    if not _runnable(backend):
        pytest.skip(f"{backend} not runnable on {DEVICE}: {vera_kernels.backends()[backend].reason}")

    def generate():
        pair = vera_kernels.generate_projections(0, rank, max_in, max_out, dtype=dtype, device=DEVICE, backend=backend)
        synchronize()
        return pair

    A, B = run(benchmark, generate)
    elements = A.numel() + B.numel()
    benchmark.extra_info.update(device=DEVICE, elements=elements, hardware=_hardware())
    assert torch.isfinite(A).all() and torch.isfinite(B).all()


def _hardware():
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
