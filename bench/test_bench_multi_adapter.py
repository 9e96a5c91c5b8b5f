"""Many adapters in one batch: M tokens spread over K distinct VeRA adapters, K = 1, 16, 256, 4096.

    pytest bench/test_bench_multi_adapter.py --benchmark-only

Variants, all forward-only under torch.no_grad() (serving):
  vera_multi   vera_linear_multi: the two GEMMs of one adapter plus a gather of each row's d and b inside
               the kernels. extra_info: time relative to K = 1 (target on a GPU: <= 1.05x at K = 4096) and
               to the base nn.Linear alone.
  lora_gather  a LoRA-style mixed batch in plain torch (what Punica/S-LoRA do with custom kernels): gather
               each row's A (r_lora x in) and B (out x r_lora), then two bmm; rows in chunks to bound memory.
  peft_loop    PEFT's VeRA cannot mix adapters in a batch: one call per adapter on its rows
               (set_adapter, forward). Measured for K <= PEFT_MAX_K on CPU; larger K is extrapolated linearly
               from the K = 1 and K = PEFT_MAX_K times and labeled as such in extra_info.
Token-to-adapter assignment: token m gets adapter m mod K, then shuffled (every adapter gets M / K tokens;
at K > M only M of the bank's adapters are used). The bank always holds K adapters.

Memory: test_bank_bytes records bytes per adapter per layer and how many adapters of a Llama-7B-shaped
model (32 layers x q, k, v, o, gate, up, down) fit in 1 GiB, computed from shapes.

Shapes: GPU bf16, M = 8192, in = out = 4096, r = 256 (triton backend; skipped without a GPU). CPU fp32,
scaled down to M = 4096, in = out = 1024, r = 64 (the same r / in as the GPU shape), cpu backend.
Rounds: 20 on a GPU, 3 on CPU; one under VERA_BENCH_QUICK=1 (bench_common).
"""

from __future__ import annotations

import pytest
import torch

import vera_kernels
from bench_common import DEVICE, DRY_RUN, rounds, synchronize

KS = (1, 16, 256, 4096)
ON_GPU = DEVICE == "cuda"
if ON_GPU:
    M, IN, OUT, RANK, DTYPE, BACKEND, ROUNDS = 8192, 4096, 4096, 256, torch.bfloat16, "triton", 20
else:
    M, IN, OUT, RANK, DTYPE, BACKEND, ROUNDS = 4096, 1024, 1024, 64, torch.float32, "cpu", 3
if DRY_RUN:
    M, IN, OUT, RANK, ROUNDS = 64, 64, 96, 16, 1
LORA_RANK = 16  # a typical LoRA rank; LoRA stores r_lora x (in + out) per adapter, VeRA r + out
LORA_CHUNK = 256  # rows gathered at a time: LORA_CHUNK x r_lora x (in + out) elements live at once
PEFT_MAX_K = 16

_times: dict[tuple[str, int], float] = {}


def _ids(k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(k)
    ids = torch.arange(M) % k
    return ids[torch.randperm(M, generator=g)].to(DEVICE)


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, IN, generator=g).to(DEVICE, DTYPE)
    linear = torch.nn.Linear(IN, OUT).to(DEVICE, DTYPE).requires_grad_(False)
    return x, linear


def _median(benchmark) -> float:
    return benchmark.stats.stats.median


def _run(benchmark, fn, key):
    def step():
        out = fn()
        synchronize()
        return out

    benchmark.pedantic(step, rounds=rounds(ROUNDS), iterations=1, warmup_rounds=1)
    _times[key] = _median(benchmark)


def test_base(benchmark):
    x, linear = _inputs()
    with torch.no_grad():
        _run(benchmark, lambda: linear(x), ("base", 0))
    benchmark.extra_info.update(shape=(M, IN, OUT), dtype=str(DTYPE))


@pytest.mark.parametrize("k", KS)
def test_vera_multi(benchmark, k):
    status = vera_kernels.backends()[BACKEND]
    if not status.available:  # e.g. the extension did not build: the other suites' rows still run
        pytest.skip(f"{BACKEND}: {status.reason}")
    x, linear = _inputs()
    A, B = vera_kernels.get_projections(0, RANK, IN, OUT, dtype=DTYPE, device=DEVICE)
    g = torch.Generator().manual_seed(1)
    bank_d = torch.randn(k, RANK, generator=g).to(DEVICE)
    bank_b = (torch.randn(k, OUT, generator=g) * 0.01).to(DEVICE)
    ids = _ids(k)
    with torch.no_grad():
        _run(benchmark, lambda: vera_kernels.vera_linear_multi(x, linear.weight, linear.bias, A, B, bank_d, bank_b,
                                                               ids, backend=BACKEND), ("vera_multi", k))
    info = dict(k=k, backend=BACKEND, shape=(M, IN, OUT, RANK), dtype=str(DTYPE))
    if ("vera_multi", 1) in _times:
        info["ratio_to_k1"] = round(_times[("vera_multi", k)] / _times[("vera_multi", 1)], 3)
    if ("base", 0) in _times:
        info["ratio_to_base"] = round(_times[("vera_multi", k)] / _times[("base", 0)], 3)
    benchmark.extra_info.update(info)


def lora_gather(x, linear, bank_a, bank_b, ids):
    """y = x W0ᵀ + bias + per row m: (x_m A[ids_m]ᵀ) B[ids_m]ᵀ, the per-row matrices gathered (bmm)."""
    y = linear(x)
    for row in range(0, x.shape[0], LORA_CHUNK):
        rows = slice(row, row + LORA_CHUNK)
        a = bank_a[ids[rows]]  # chunk x r_lora x in: a copy of each row's A
        b = bank_b[ids[rows]]  # chunk x out x r_lora
        h = torch.bmm(x[rows, None, :], a.transpose(1, 2))  # chunk x 1 x r_lora
        y[rows] += torch.bmm(h, b.transpose(1, 2))[:, 0]
    return y


@pytest.mark.parametrize("k", KS)
def test_lora_gather(benchmark, k):
    x, linear = _inputs()
    g = torch.Generator().manual_seed(2)
    bank_a = (torch.randn(k, LORA_RANK, IN, generator=g) * IN**-0.5).to(DEVICE, DTYPE)
    bank_b = (torch.randn(k, OUT, LORA_RANK, generator=g) * 0.01).to(DEVICE, DTYPE)
    ids = _ids(k)
    with torch.no_grad():
        _run(benchmark, lambda: lora_gather(x, linear, bank_a, bank_b, ids), ("lora_gather", k))
    info = dict(k=k, lora_rank=LORA_RANK)
    if ("vera_multi", k) in _times:
        info["ratio_to_vera_multi"] = round(_times[("lora_gather", k)] / _times[("vera_multi", k)], 3)
    benchmark.extra_info.update(info)


def _peft_model(k):
    peft = pytest.importorskip("peft")

    class Wrapper(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.proj = linear

        def forward(self, x):
            return self.proj(x)

    _, linear = _inputs()
    config = lambda: peft.VeraConfig(r=RANK, target_modules=["proj"])  # noqa: E731
    model = peft.get_peft_model(Wrapper(linear), config(), adapter_name="a0")
    for a in range(1, k):
        model.add_adapter(f"a{a}", config())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vera_lambda" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.to(DEVICE).eval()


@pytest.mark.parametrize("k", [k for k in KS if ON_GPU or k <= PEFT_MAX_K])
def test_peft_loop(benchmark, k):
    x, _ = _inputs()
    model = _peft_model(k)
    ids = _ids(k)
    rows = [(f"a{a}", (ids == a).nonzero()[:, 0]) for a in range(k)]

    def loop():
        y = torch.empty(M, OUT, device=DEVICE, dtype=DTYPE)
        for name, index in rows:
            model.set_adapter(name)
            y[index] = model(x[index]).to(DTYPE)
        return y

    with torch.no_grad():
        _run(benchmark, loop, ("peft_loop", k))
    info = dict(k=k, measured=True)
    if ("vera_multi", k) in _times:
        info["ratio_to_vera_multi"] = round(_times[("peft_loop", k)] / _times[("vera_multi", k)], 3)
    if not ON_GPU and k == PEFT_MAX_K and ("peft_loop", 1) in _times:
        # Linear in K: the fixed part at K = 1 plus a per-adapter cost, extrapolated to the K not measured.
        t1, tk = _times[("peft_loop", 1)], _times[("peft_loop", k)]
        per_adapter = (tk - t1) / (k - 1)
        info["extrapolated_s"] = {big: round(t1 + per_adapter * (big - 1), 4) for big in KS if big > PEFT_MAX_K}
        info["extrapolated_ratio_to_vera_multi"] = {
            big: round((t1 + per_adapter * (big - 1)) / _times[("vera_multi", big)], 2)
            for big in KS if big > PEFT_MAX_K and ("vera_multi", big) in _times
        }
    benchmark.extra_info.update(info)


# Llama-7B: hidden 4096, MLP 11008, 32 layers; (in, out) of q, k, v, o, gate, up, down.
LLAMA_7B_PROJECTIONS = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]
LLAMA_7B_LAYERS = 32


def adapter_bytes(rank: int, bytes_per_element: int) -> dict:
    """Per adapter: VeRA stores lambda_d (r) + lambda_b (out) per projection; LoRA A (r x in) + B (out x r)."""
    vera = LLAMA_7B_LAYERS * sum(rank + out for _, out in LLAMA_7B_PROJECTIONS) * bytes_per_element
    lora = LLAMA_7B_LAYERS * sum(LORA_RANK * (i + o) for i, o in LLAMA_7B_PROJECTIONS) * bytes_per_element
    gib = 2**30
    return dict(vera_bytes_per_adapter=vera, vera_adapters_per_gib=gib // vera,
                lora_r16_bytes_per_adapter=lora, lora_r16_adapters_per_gib=gib // lora)


def test_bank_bytes(benchmark):
    """Bytes per adapter per layer at the benchmark's shape and for Llama-7B (fp32 banks, as the layers keep
    them, and bf16)."""
    benchmark.pedantic(lambda: adapter_bytes(256, 4), rounds=1, iterations=1)
    benchmark.extra_info.update(
        bytes_per_adapter_per_layer_fp32=(RANK + OUT) * 4,
        llama7b_r256_fp32=adapter_bytes(256, 4),
        llama7b_r256_bf16=adapter_bytes(256, 2),
    )
