"""One training step of a whole Llama-like model built from a config (random weights, nothing downloaded):
this package's VeRA against PEFT's VeRA and PEFT's LoRA, the comparison users ask about (PEFT's own
benchmark has its VeRA slower than LoRA).

    pytest bench/test_bench_training.py --benchmark-only

Model. GPU: TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads with 4 KV heads, MLP 5632, vocabulary
32000: 1.1 B parameters) in bf16, batch 1, sequence 2048. CPU: a quarter of the width and 4 layers, fp32,
sequence 256. Dry run and quick mode (VERA_BENCH_DRY_RUN=1, VERA_BENCH_QUICK=1): a tiny config (the
plumbing, no figures).
Adapters on every linear layer of the blocks (q, k, v, o, gate, up, down):
  vera-kernels  vera_kernels.apply_vera, r = 256 (its default backend for the device)
  peft-vera     PEFT's VeRA, r = 256
  peft-lora     PEFT's LoRA, r = 32
A step: forward, the language-model loss, backward, AdamW on the adapter's parameters. Recorded (the
benchmark's extra_info, and bench/conftest.py's per-case record): the median step time (CUDA events on a
GPU), the peak memory of a step (GPU; weights included), the trainable and total parameter counts.
"""

import pytest
import torch

from bench_common import DEVICE, DRY_RUN, QUICK

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
if DRY_RUN or QUICK:
    MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256)
    SEQ, DTYPE, RANKS, ROUNDS, WARMUP = 32, torch.float32, dict(vera=16, lora=8), 1, 1
elif DEVICE == "cuda":
    MODEL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000)
    SEQ, DTYPE, RANKS, ROUNDS, WARMUP = 2048, torch.bfloat16, dict(vera=256, lora=32), 5, 2
else:
    MODEL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=32000)
    SEQ, DTYPE, RANKS, ROUNDS, WARMUP = 256, torch.float32, dict(vera=64, lora=8), 3, 1
IMPLS = ("vera-kernels", "peft-vera", "peft-lora")


def build(impl: str):
    """The model with ``impl``'s adapters; only the adapters' parameters train."""
    import vera_kernels

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**MODEL, max_position_embeddings=SEQ)
    with torch.device(DEVICE):
        model = transformers.LlamaForCausalLM(config).to(DTYPE)
    if impl == "vera-kernels":
        return vera_kernels.apply_vera(model, TARGETS, rank=RANKS["vera"])
    if impl == "peft-vera":
        adapter = peft.VeraConfig(r=RANKS["vera"], target_modules=TARGETS)
    else:
        adapter = peft.LoraConfig(r=RANKS["lora"], lora_alpha=2 * RANKS["lora"], target_modules=TARGETS)
    return peft.get_peft_model(model, adapter)


@pytest.mark.parametrize("impl", IMPLS)
def test_training_step(benchmark, impl):
    model = build(impl)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # PEFT starts lambda_b / lora_B at 0: train from a nonzero point (same cost)
        for p in trainable:
            p.normal_(0, 0.01)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    tokens = torch.randint(0, MODEL["vocab_size"], (1, SEQ), device=DEVICE)
    times = []

    def step():
        start = end = None
        if DEVICE == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if DEVICE == "cuda":
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        assert torch.isfinite(loss)

    for _ in range(WARMUP):  # autotuning, compilation, the optimizer's state
        step()
    times.clear()
    peak = None
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1)
    if DEVICE == "cuda":
        peak = torch.cuda.max_memory_allocated()
    seconds = sorted(times)[len(times) // 2] if times else benchmark.stats.stats.median
    benchmark.extra_info.update(
        impl=impl, model=dict(MODEL, seq=SEQ, batch=1), dtype=str(DTYPE).removeprefix("torch."), device=DEVICE,
        rank=RANKS["lora" if impl == "peft-lora" else "vera"], step_seconds=seconds,
        timer="CUDA events" if times else "perf_counter", peak_bytes=peak,
        trainable_parameters=sum(p.numel() for p in trainable),
        parameters=sum(p.numel() for p in model.parameters()))
    del model, optimizer
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
