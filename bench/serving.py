"""Serving many VeRA adapters at once: tokens/s of a decode loop over a small model, each row of the batch
(one request) routed to its own adapter, K = 1, 16, 256, 4096 adapters in the bank.

    .venv/bin/python -m bench.serving     VERA_BENCH_QUICK=1: a smaller model, fewer steps (CI)
                                          VERA_BENCH_THREADS=N: run on N threads (1: the thread's CPU time)

The model: a residual stack of blocks, each with the six projections of a transformer block (q, k, v, o,
up, down; attention left out: its cost does not depend on the adapters), every one adapted. A decode step
maps the batch's hidden states (B rows, one token each) to the next ones; the loop runs T steps. Compared:
  base        the model without adapters (the floor)
  vera bank   vera_kernels: every layer holds the K adapters in its bank; vera_kernels.set_adapter_ids routes
              row m to adapter m mod K (rows shuffled); one batched forward per step whatever K is
  peft loop   PEFT's VeRA holds K adapters too, but runs one adapter at a time: per step, for each adapter in
              the batch, set_adapter and a forward over its rows. Measured up to PEFT_MAX_K adapters (creating
              thousands of PEFT adapters takes minutes); larger K is extrapolated from the per-adapter cost at
              the largest measured K, and labelled so.
Figures: median of ROUNDS timings of the whole loop (on one CPU thread, VERA_BENCH_THREADS=1: the thread's CPU
time, unaffected by other processes), tokens/s = B * T / seconds, and the ratio to base.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
from torch import nn

import vera_kernels as vk
from bench.bench_common import LoadProbe, dispersion, parser, quick
from vera_kernels.verify import device_name

QUICK = quick()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KS = (1, 16, 256, 4096)
if DEVICE == "cuda":
    DIM, HIDDEN, BLOCKS, RANK, BATCH, STEPS, ROUNDS, DTYPE, PEFT_MAX_K = 4096, 11008, 2, 256, 256, 16, 5, torch.bfloat16, 16
elif QUICK:
    DIM, HIDDEN, BLOCKS, RANK, BATCH, STEPS, ROUNDS, DTYPE, PEFT_MAX_K = 128, 256, 1, 16, 32, 4, 5, torch.float32, 16
else:
    DIM, HIDDEN, BLOCKS, RANK, BATCH, STEPS, ROUNDS, DTYPE, PEFT_MAX_K = 512, 1024, 2, 64, 256, 8, 3, torch.float32, 256
TARGETS = ["q", "k", "v", "o", "up", "down"]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
        self.up, self.down = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)
        self.norm = nn.LayerNorm(DIM)

    def forward(self, x):
        h = self.norm(x)
        x = x + self.o(torch.sigmoid(self.q(h)) * self.k(h) + self.v(h))
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*(Block() for _ in range(BLOCKS)))

    def forward(self, x):
        return self.blocks(x)


def _base():
    torch.manual_seed(0)
    return Model().to(DEVICE, DTYPE).eval()


def _ids(k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(k)
    ids = torch.arange(BATCH) % k
    return ids[torch.randperm(BATCH, generator=g)]


def _synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _decode(model, x0):
    def loop():
        with torch.inference_mode():
            x = x0
            for _ in range(STEPS):
                x = model(x)
    return loop


def _vera_bank(k: int):
    model = vk.apply_vera(_base(), TARGETS, rank=RANK)
    g = torch.Generator().manual_seed(1)
    for _, layer in vk.vera_layers(model):
        d = torch.randn(k, RANK, generator=g) * 0.1
        b = torch.randn(k, layer.out_features, generator=g) * 0.1
        for i in range(k):
            layer.add_adapter(f"a{i}", d[i], b[i])
    vk.set_adapter_ids(model, _ids(k).to(DEVICE))
    return model


def _peft(k: int):
    import peft

    model = _base()
    g = torch.Generator().manual_seed(1)
    config = peft.VeraConfig(r=RANK, target_modules=TARGETS)
    model = peft.get_peft_model(model, config, adapter_name="a0")
    for i in range(1, k):
        model.add_adapter(f"a{i}", config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vera_lambda" in name:
                p.normal_(0, 0.1, generator=g)
    return model.to(DEVICE, DTYPE).eval()


def _peft_loop(model, x0, ids):
    groups = [(f"a{a}", (ids == a).nonzero().flatten().to(DEVICE)) for a in ids.unique().tolist()]

    def loop():
        with torch.inference_mode():
            x = x0
            for _ in range(STEPS):
                out = torch.empty_like(x)
                for name, rows in groups:
                    model.set_adapter(name)
                    out[rows] = model(x[rows])
                x = out
    return loop


def main(argv=None):
    parser("python -m bench.serving", __doc__).parse_args(argv)  # no options: --help, and nothing unknown
    threads = os.environ.get("VERA_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    print(f"bench.serving on {device_name(DEVICE)}, torch {torch.__version__}{', quick' if QUICK else ''}")
    print(f"model: {BLOCKS} blocks x (q, k, v, o {DIM}x{DIM}; up {DIM}x{HIDDEN}; down {HIDDEN}x{DIM}), {DTYPE}, VeRA "
          f"r = {RANK} on all {6 * BLOCKS} projections; decode: batch {BATCH} rows x {STEPS} steps; median of "
          f"{ROUNDS} rounds, the loops timed in turn within each round")
    x0 = torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(2)).to(DEVICE, DTYPE)
    try:
        import peft  # noqa: F401
        have_peft = True
    except ImportError:
        have_peft = False
    loops = {("base", 0): _decode(_base(), x0)}
    for k in KS:
        loops[("vera", k)] = _decode(_vera_bank(k), x0)
        if have_peft and k <= PEFT_MAX_K:
            loops[("peft", k)] = _peft_loop(_peft(k), x0, _ids(k))
    # One CPU thread: that thread's CPU time is the work a loop costs, whatever else the machine runs.
    clock = time.thread_time if DEVICE == "cpu" and torch.get_num_threads() == 1 else time.perf_counter
    print(f"clock: {clock.__name__}")
    probe = LoadProbe()
    samples = interleaved_samples(loops, clock)
    seconds = {key: statistics.median(s) for key, s in samples.items()}
    spread = {key: dispersion(s)["iqr"] / seconds[key] for key, s in samples.items()}
    tokens = BATCH * STEPS
    base = seconds[("base", 0)]
    print(f"base: IQR {spread[('base', 0)]:.0%} of the median; vera bank IQR: "
          + ", ".join(f"K = {k} {spread[('vera', k)]:.0%}" for k in KS))
    print(f"\n{'K':>6}{'base tok/s':>12}{'vera bank tok/s':>17}{'x base':>8}{'peft loop tok/s':>20}{'x base':>8}")
    per_adapter = None
    for k in KS:
        bank = seconds[("vera", k)]
        peft_text, peft_ratio = "n/a", ""
        if ("peft", k) in seconds:
            per_adapter = seconds[("peft", k)] / min(k, BATCH)
            peft_text, peft_ratio = f"{tokens / seconds[('peft', k)]:.0f}", f"{base / seconds[('peft', k)]:.3f}"
        elif per_adapter is not None:
            extrapolated = per_adapter * min(k, BATCH)
            peft_text, peft_ratio = f"~{tokens / extrapolated:.0f} (extrap.)", f"{base / extrapolated:.3f}"
        print(f"{k:>6}{tokens / base:>12.0f}{tokens / bank:>17.0f}{base / bank:>8.2f}{peft_text:>20}{peft_ratio:>8}")
    print("(x base: tokens/s as a fraction of the base model's; K > batch: only batch-many adapters are in use)")
    load = probe.result()
    others = "-" if load["others_busy"] is None else f"{load['others_busy']:.0%}"
    average = "-" if load["load_avg_1min"] is None else f"{load['load_avg_1min']:.1f}"
    print(f"machine load while timing: 1-min load average {average} at the end on {load['cpus']} CPUs; other "
          f"processes kept {others} of the CPUs busy")


def interleaved_samples(loops: dict, clock=time.perf_counter) -> dict:
    """Seconds of each loop in every round, every loop timed once per round, in turn (a noisy neighbour slows
    them alike)."""
    for loop in loops.values():
        loop()  # warm-up: first-call caches, thread pools, allocator
    samples = {key: [] for key in loops}
    for _ in range(ROUNDS):
        for key, loop in loops.items():
            _synchronize()
            start = clock()
            loop()
            _synchronize()
            samples[key].append(clock() - start)
    return samples


if __name__ == "__main__":
    main()
