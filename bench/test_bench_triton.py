"""The Triton backend's fused kernels against torch.nn.functional.linear on the same inputs, in the same run
(GPU only: interpreted timings say nothing about the kernels).

    pytest bench/ --benchmark-only -k triton

Targets (issue 3; reported in extra_info and printed, not asserted), bf16, in = out = 4096, r = 256:
  forward           M = 8192         <= 1.15 x F.linear
  forward+backward  M = 8192         <= 1.25 x F.linear forward + its backward for dx (W0 frozen)
  decode forward    M = 1, 4, 16     <= 1.30 x F.linear
Each timed call runs the op ``REPEAT`` times and synchronizes once, so that launch and sync overheads
do not swamp the decode kernels; the reported time is per op. The autotuner runs before timing.
"""

import pytest
import torch
import torch.nn.functional as F

from bench_common import DEVICE, synchronize

pytestmark = pytest.mark.skipif(DEVICE != "cuda", reason="Triton benchmarks need a CUDA GPU")

IN = OUT = 4096
RANK = 256
REPEAT = 10
TARGETS = {"forward": 1.15, "forward+backward": 1.25, "decode": 1.30}
_base_times: dict[tuple, float] = {}  # (case, M) -> seconds per op of F.linear, filled by the "base" runs


def _inputs(m):
    from vera_kernels import generate_projections

    torch.manual_seed(0)
    dtype = torch.bfloat16
    A_max, B_max = generate_projections(0, RANK, IN, OUT, dtype=dtype, device=DEVICE)
    return dict(
        x=torch.randn(m, IN, device=DEVICE, dtype=dtype),
        weight=torch.randn(OUT, IN, device=DEVICE, dtype=dtype) / IN**0.5,
        bias=torch.randn(OUT, device=DEVICE, dtype=dtype),
        A=A_max, B=B_max,
        lambda_d=torch.randn(RANK, device=DEVICE), lambda_b=torch.randn(OUT, device=DEVICE),
    )


def _forward(impl, p):
    from vera_kernels import vera_linear

    if impl == "base":
        return F.linear(p["x"], p["weight"], p["bias"])
    return vera_linear(**p, backend="triton")


def _step(case, impl, p, grad):
    if case == "forward+backward":
        p["x"].grad = None
        for k in ("bias", "lambda_d", "lambda_b"):
            p[k].grad = None
        _forward(impl, p).backward(grad)
    else:
        with torch.no_grad():
            _forward(impl, p)


CASES = [("forward", 8192), ("forward+backward", 8192), ("decode", 1), ("decode", 4), ("decode", 16)]


@pytest.mark.parametrize("impl", ["base", "vera"])  # base first: the vera run reports its ratio to it
@pytest.mark.parametrize("case, m", CASES, ids=[f"{c}-M{m}" for c, m in CASES])
def test_triton_vs_linear(benchmark, case, m, impl):
    p = _inputs(m)
    if case == "forward+backward":
        # The base layer's backward computes dx only (W0 frozen); VeRA's adds d, b and bias.
        p["x"].requires_grad_(True)
        for k in ("bias", "lambda_d", "lambda_b"):
            p[k].requires_grad_(impl == "vera")
    grad = torch.randn(m, OUT, device=DEVICE, dtype=torch.bfloat16)

    def run():
        for _ in range(REPEAT):
            _step(case, impl, p, grad)
        synchronize()

    run()  # autotuning and compilation happen here, not in the timing
    benchmark.pedantic(run, rounds=20, warmup_rounds=2)
    per_op = benchmark.stats.stats.median / REPEAT
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), case=case, m=m, in_features=IN,
                                out_features=OUT, rank=RANK, dtype="bfloat16", seconds_per_op=per_op)
    if impl == "base":
        _base_times[(case, m)] = per_op
    elif (case, m) in _base_times:
        ratio = per_op / _base_times[(case, m)]
        benchmark.extra_info.update(ratio_to_linear=ratio, target=TARGETS[case])
        print(f"\n{case} M={m}: {per_op * 1e6:.1f} us, {ratio:.3f}x F.linear (target <= {TARGETS[case]}x)")
