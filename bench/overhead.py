"""Per-call host overhead of one adapted layer at decode size, against nn.Linear in the same run.

    .venv/bin/python -m bench.overhead     VERA_BENCH_QUICK=1: 5 rounds of 50 calls instead of 21 of 200, the
                                           1024x1024 layer up to M = 256 (CI)

Part 1 (1 thread): M = 1, in = out = 64, r = 16, fp32 on CPU, where the GEMMs cost almost nothing and the
time per call is the Python and dispatch work around them. Each round times N calls of every
implementation in turn (interleaved); the figure is the median over rounds of the per-call time, measured
as the thread's CPU time (time.thread_time: what a call costs the host, unaffected by other processes on a
busy machine), and the ratio is to the nn.Linear row's median in the same run. Three passes:
  inference                  y = layer(x) under torch.no_grad()
  training step              y = layer(x); y.backward(g), x without grad (nn.Linear: weight and bias
                             trained; VeRA: lambda_d, lambda_b)
  training step, x needs grad  the same with x requiring grad, against a frozen nn.Linear (only dx): what a
                             VeRA layer replaces when a model is fine-tuned
Target: FusedVeRALinear (backend auto) within 2x of nn.Linear in each.

Part 2: the ``cpu`` backend against the ``torch`` backend over M, at 64x64 r = 16 and 1024x1024 r = 64,
inference; the C++ path must never be the slower one. On 1 thread (thread CPU time: the work done), then on
the machine's default thread count (wall time: threading included, noisy on a busy machine).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

import vera_kernels as vk
from bench.bench_common import LoadProbe, dispersion, parser, quick
from vera_kernels.verify import device_name

QUICK = quick()
ROUNDS, CALLS = (5, 50) if QUICK else (21, 200)


def _peft_layer(in_features, out_features, rank):
    try:
        import peft
    except ImportError:
        return None

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(in_features, out_features)

        def forward(self, x):
            return self.proj(x)

    model = peft.get_peft_model(Holder(), peft.VeraConfig(r=rank, target_modules=["proj"]))
    return model.base_model.model.proj


def layers(in_features=64, out_features=64, rank=16):
    """name -> (module, its trainable parameters)."""
    torch.manual_seed(0)
    out = {}
    linear = nn.Linear(in_features, out_features)
    out["nn.Linear"] = (linear, list(linear.parameters()))
    frozen = nn.Linear(in_features, out_features).requires_grad_(False)
    out["nn.Linear frozen"] = (frozen, [])
    for backend in ("auto", "cpu", "torch"):
        status = vk.backends().get(backend)
        if backend != "auto" and not (status.available and "cpu" in status.devices):
            continue
        layer = vk.FusedVeRALinear.from_linear(nn.Linear(in_features, out_features), rank=rank, backend=backend)
        with torch.no_grad():
            layer.lambda_b.normal_()
        out[f"vera {backend}"] = (layer, [layer.lambda_d, layer.lambda_b])
    peft_layer = _peft_layer(in_features, out_features, rank)
    if peft_layer is not None:
        out["peft vera"] = (peft_layer, [p for p in peft_layer.parameters() if p.requires_grad])
    return out


def _time(step, calls, clock) -> float:
    start = clock()
    for _ in range(calls):
        step()
    return (clock() - start) / calls


def interleaved_samples(steps: dict, rounds=ROUNDS, calls=CALLS, clock=time.perf_counter) -> dict[str, list[float]]:
    """Per-call seconds of each step in every round, the steps timed in turn within every round."""
    for step in steps.values():
        _time(step, max(5, calls // 10), clock)  # warm up: first-call caches, allocator
    samples = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            samples[name].append(_time(step, calls, clock))
    return samples


def interleaved(steps: dict, rounds=ROUNDS, calls=CALLS, clock=time.perf_counter) -> dict[str, float]:
    """Median per-call seconds of each step, the steps timed in turn within every round."""
    return {name: statistics.median(s) for name, s in interleaved_samples(steps, rounds, calls, clock).items()}


def _inference(module, x):
    def step():
        with torch.no_grad():
            module(x)
    return step


def _training(module, x, params):
    def step():
        module(x).backward(g)
        x.grad = None
        for p in params:
            p.grad = None
    g = torch.randn(x.shape[0], module(x).shape[-1])
    return step


# pass -> (the nn.Linear row every ratio divides by, the rows timed: None for all but the other nn.Linear).
PASSES = {"inference": ("nn.Linear", None), "training step": ("nn.Linear", None),
          "training step, x needs grad": ("nn.Linear frozen", "nn.Linear")}


def part1() -> dict:
    torch.set_num_threads(1)
    x, x_grad = torch.randn(1, 64), torch.randn(1, 64, requires_grad=True)
    built = layers()
    results = {}
    for pass_, (base_name, left_out) in PASSES.items():
        if pass_ == "inference":
            steps = {name: _inference(module, x) for name, (module, _) in built.items()}
        else:
            x_pass = x_grad if "x needs grad" in pass_ else x
            # A frozen nn.Linear with an input that needs no grad has no backward at all.
            steps = {name: _training(module, x_pass, params) for name, (module, params) in built.items()
                     if x_pass.requires_grad or params}
        steps = {name: step for name, step in steps.items() if name != left_out}
        # One thread: its CPU time is the host time a call costs, whatever else the machine runs.
        samples = interleaved_samples(steps, clock=time.thread_time)
        times = {name: statistics.median(s) for name, s in samples.items()}
        base = times[base_name]
        print(f"\n{pass_}: M = 1, 64x64, r = 16, fp32, 1 thread; thread CPU time, median of {ROUNDS} rounds x "
              f"{CALLS} calls (IQR: the interquartile range of the rounds over the median)")
        print(f"{'implementation':<18}{'us/call':>10}{'IQR':>6}{'x ' + base_name:>20}")
        for name, seconds in times.items():
            spread = dispersion(samples[name])["iqr"] / seconds
            print(f"{name:<18}{seconds * 1e6:>10.1f}{spread:>6.0%}{seconds / base:>20.2f}")
        results[pass_] = times
    # The three passes side by side for the layer the goal is about, each against its own nn.Linear row.
    ratios = ", ".join(f"{pass_} {results[pass_]['vera auto'] / results[pass_][base]:.2f}x"
                       for pass_, (base, _) in PASSES.items())
    print(f"\nvera auto against nn.Linear (goal: at most 2x in each): {ratios}")
    return results


def part2(threads: int, clock=time.perf_counter) -> dict:
    torch.set_num_threads(threads)
    if not vk.backends()["cpu"].available:
        print("\ncpu backend not available: part 2 skipped")
        return {}
    results = {}
    shapes = [(64, 64, 16, (1, 16, 256, 4096)), (1024, 1024, 64, (1, 16, 256) if QUICK else (1, 16, 256, 2048))]
    what = "thread CPU time" if clock is time.thread_time else "wall time"
    print(f"\ncpu backend vs torch backend, inference, fp32, {threads} thread{'' if threads == 1 else 's'} ({what}, "
          "median us per call)")
    print(f"{'in x out, r':<16}{'M':>6}{'torch':>10}{'cpu':>10}{'cpu/torch':>11}")
    for in_f, out_f, rank, ms in shapes:
        torch.manual_seed(0)
        base = nn.Linear(in_f, out_f)
        mods = {b: vk.FusedVeRALinear.from_linear(base, rank=rank, backend=b) for b in ("torch", "cpu")}
        for m in ms:
            x = torch.randn(m, in_f)
            work = m * in_f * out_f
            calls = max(3, min(CALLS, int(2e8 / max(work, 1))))
            times = interleaved({b: _inference(mod, x) for b, mod in mods.items()}, rounds=max(3, ROUNDS // 3),
                                calls=calls, clock=clock)
            ratio = times["cpu"] / times["torch"]
            print(f"{f'{in_f}x{out_f}, {rank}':<16}{m:>6}{times['torch'] * 1e6:>10.1f}{times['cpu'] * 1e6:>10.1f}"
                  f"{ratio:>11.2f}")
            results[(in_f, out_f, rank, m)] = times
    return results


def main(argv=None):
    parser("python -m bench.overhead", __doc__).parse_args(argv)  # no options: --help, and nothing unknown
    threads = torch.get_num_threads()
    print(f"bench.overhead on {device_name('cpu')} (default), torch {torch.__version__}"
          f"{', quick' if QUICK else ''}")
    probe = LoadProbe()
    part1()
    part2(1, time.thread_time)  # the work each backend does, unaffected by other processes
    if threads > 1:
        part2(threads)  # threading included: wall time, as noisy as the machine is busy
    print(load_line(probe.result()))


def load_line(load: dict) -> str:
    """The machine's load while the benchmark ran (thread CPU times hardly depend on it; wall times do)."""
    others = "-" if load["others_busy"] is None else f"{load['others_busy']:.0%}"
    average = "-" if load["load_avg_1min"] is None else f"{load['load_avg_1min']:.1f}"
    return (f"\nmachine load: 1-min load average {average} at the end on {load['cpus']} CPUs; other processes kept "
            f"{others} of the CPUs busy meanwhile")


if __name__ == "__main__":
    main()
