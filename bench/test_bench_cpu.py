"""Forward + backward on CPU, fp32: the extension's ``cpu`` backend against PEFT's own VeRA layer and against
the frozen base ``nn.Linear`` alone (forward + backward for dx), with the activation bytes autograd saves.

    pytest bench/test_bench_cpu.py --benchmark-only     VERA_BENCH_QUICK=1: the smaller shape, one round

Each step is y = layer(x); y.backward(g) with x requiring grad, W0 and its bias frozen, and (VeRA) the
trained lambda_d, lambda_b. extra_info holds the saved-activation bytes (tensors autograd saves that are
neither parameters nor x), the analytic FLOPs and their ratio to the base's, the time ratios to the base
and PEFT runs of this session and, for ours, the ratios of a few rounds of the three run in turn.

Ours does the floor of docs/DESIGN.md section 5, 2 r (2 in + 3 out) M FLOPs over the base (~1.16x at
in = out = 4096, r = 256): db and dd come from the out x r product gᵀ s (see python -m bench.plan). PEFT keeps u and does 4 r (in + out) M, but moves
M x out tensors through memory (u, b ⊙ u, the sum, g ⊙ u, g ⊙ b).
"""

import statistics
import time

import pytest
import torch

import harness
import vera_kernels
from bench_common import QUICK, rounds, run

peft = pytest.importorskip("peft")
# On a GPU machine the GPU suites matter; this suite is for CPU-only machines.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU benchmark runs on CPU-only machines")

RANK = 256
SHAPES = [(512, 4096, 4096), (2048, 1024, 1024)]  # (M, in, out)
if QUICK:
    SHAPES = SHAPES[1:]  # the smaller (2048 x 1024 x 1024: a quarter of the other's work)
INTERLEAVED_ROUNDS = rounds(5)
# Medians (s) of the runs so far, by (variant, shape): the ratios need the base (and PEFT) first.
_medians: dict[tuple[str, tuple], float] = {}


class _Wrapper(torch.nn.Module):
    """What get_peft_model adapts: a module holding the linear layer."""

    def __init__(self, linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def _base_linear(in_features, out_features):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features)
    linear.requires_grad_(False)
    return linear


def _trained(t):
    return torch.nn.Parameter(t.normal_() * 0.1)


def make_step(variant, m, in_features, out_features):
    """(layer, parameters not to count as activations): layer(x) -> y."""
    linear = _base_linear(in_features, out_features)
    if variant == "base":
        return linear, list(linear.parameters())
    if variant == "peft":
        model = peft.get_peft_model(_Wrapper(linear), peft.VeraConfig(r=RANK, target_modules=["proj"]))
        layer = model.base_model.model.proj
        for adapter in layer.vera_lambda_d:
            # PEFT starts b at 0; train from a nonzero point as the others do (the cost is the same).
            layer.vera_lambda_d[adapter].data.normal_()
            layer.vera_lambda_b[adapter].data.normal_()
        return model, list(model.parameters()) + list(model.buffers())
    A, B = vera_kernels.generate_projections(0, RANK, in_features, out_features)
    lambda_d, lambda_b = _trained(torch.empty(RANK)), _trained(torch.empty(out_features))

    def layer(x):
        return vera_kernels.vera_linear(x, linear.weight, linear.bias, A, B, lambda_d, lambda_b, backend=variant)

    return layer, [linear.weight, linear.bias, A, B, lambda_d, lambda_b]


def make_inputs(m, in_features, out_features):
    torch.manual_seed(1)
    return torch.randn(m, in_features, requires_grad=True), torch.randn(m, out_features)


def training_step(layer, x, grad):
    def step():
        x.grad = None
        layer(x).backward(grad)

    return step


def interleaved_medians(steps, rounds=INTERLEAVED_ROUNDS):
    """Median seconds of each step, timed in turn round after round: on a shared machine the load drifts
    between consecutive benchmarks, so ratios of separate runs mislead; interleaved ones see the same load."""
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def flops(variant, m, in_features, out_features):
    base = 4 * m * in_features * out_features  # x W0ᵀ and g W0
    if variant == "base":
        return base
    if variant == "peft":  # x Aᵀ, t Bᵀ; (g ⊙ b) B, (d ⊙ dt) A
        return base + 4 * RANK * (in_features + out_features) * m
    # x Aᵀ, s Bdbᵀ (Bdb = b ⊙ B ⊙ d); gᵀ s (for db and dd), g Bdb = d ⊙ dt, (d ⊙ dt) A
    return base + 2 * RANK * (2 * in_features + 3 * out_features) * m


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M={},in={},out={}".format(*s))
@pytest.mark.parametrize("variant", ["base", "peft", "cpu"])  # in this order: the ratios need the others
def test_forward_backward(benchmark, variant, shape):
    status = vera_kernels.backends().get(variant)
    if status is not None and not (status.available and "cpu" in status.devices):
        pytest.skip(f"{variant}: {status.reason}")
    m, in_features, out_features = shape
    layer, parameters = make_step(variant, m, in_features, out_features)
    x, grad = make_inputs(m, in_features, out_features)
    step = training_step(layer, x, grad)
    step()  # warm-up: first-call allocations, PEFT's projection copies
    run(benchmark, step)

    info = dict(
        device="cpu", threads=torch.get_num_threads(), dtype="float32", M=m, in_features=in_features,
        out_features=out_features, rank=RANK, flops=flops(variant, m, in_features, out_features),
        saved_activation_bytes=harness.saved_activation_bytes(
            layer, x, {p.untyped_storage().data_ptr() for p in parameters}),
    )
    info["flops_ratio_to_base"] = info["flops"] / flops("base", m, in_features, out_features)
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        _medians[(variant, shape)] = median
        info["gflop_per_s"] = info["flops"] / median / 1e9
        for other in ("base", "peft"):
            if other != variant and (other, shape) in _medians:
                info[f"time_ratio_to_{other}"] = median / _medians[(other, shape)]
    if variant == "cpu":
        steps = {"cpu": step}
        for other in ("base", "peft"):
            other_step = training_step(make_step(other, m, in_features, out_features)[0], x, grad)
            other_step()
            steps[other] = other_step
        medians = interleaved_medians(steps)
        for other in ("base", "peft"):
            info[f"interleaved_time_ratio_to_{other}"] = medians["cpu"] / medians[other]
    benchmark.extra_info.update(info)
