"""Launch configurations of the fused kernels: autotuned on a GPU, one fixed config under the interpreter,
or a config pinned by the user.

Kernels (names used by :func:`pin_config`):
  shrink    s = x Aᵀ, t = d ⊙ s                    BLOCK_M, BLOCK_R, BLOCK_K
  gemm      the two-source GEMM (forward y, dx)    BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M
  backward  the pass over g (dt, db/dd partials)   BLOCK_M, BLOCK_R, BLOCK_N
  sum       the second stage of the reductions     BLOCK_P, BLOCK_N

The autotune key is (M bucket, the problem's sizes, dtypes): M is bucketed to a power of two so that a
training run with varying sequence lengths tunes a handful of times, not once per length. The config
lists depend on the GPU generation (sm_80: mma.sync with cp.async pipelines; sm_90: wgmma wants 64-row
warpgroup tiles and deeper stages). A tuned choice is cached per key for the process, so repeated calls
give the same bits; pin a config to get the same bits across processes too (autotuning may pick
another BLOCK_K, hence another summation order, in another process).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch
import triton
from triton import Config

KERNELS = ("shrink", "gemm", "backward", "sum")

# Under the interpreter every program is a Python loop over numpy ops: few, large programs are fast. The
# blocks are still smaller than the test shapes' r and in, so the K loops and the r split are exercised.
INTERPRETER_CONFIGS = {
    "shrink": Config(dict(BLOCK_M=64, BLOCK_R=32, BLOCK_K=32)),
    "gemm": Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=4)),
    "backward": Config(dict(BLOCK_M=64, BLOCK_R=32, BLOCK_N=64)),
    "sum": Config(dict(BLOCK_P=16, BLOCK_N=64)),
}


def _c(num_warps, num_stages, **blocks):
    return Config(blocks, num_warps=num_warps, num_stages=num_stages)


# Decode (M <= 32) configs have BLOCK_M 16 or 32: wgmma needs 64 rows, so on sm_90 these use mma.sync
# (HMMA) and spend the machine on a wide N and K instead. BLOCK_K is 64 on sm_90 (128-byte bf16 rows
# for the wgmma shared-memory swizzle) and 32 on sm_80 (its 164 KB of shared memory at 3-4 stages).
_GEMM = {
    90: [
        _c(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
        _c(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _c(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _c(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _c(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1),
        _c(4, 3, BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, GROUP_M=1),
    ],
    80: [
        # (128 x 256 with 8 warps spills 48 bytes under Triton 3.6.)
        _c(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
        _c(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
        _c(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
        _c(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1),
        _c(4, 3, BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, GROUP_M=1),
    ],
}
_SHRINK = {
    90: [
        _c(4, 4, BLOCK_M=64, BLOCK_R=128, BLOCK_K=64),
        _c(8, 3, BLOCK_M=128, BLOCK_R=128, BLOCK_K=64),
        _c(4, 4, BLOCK_M=128, BLOCK_R=64, BLOCK_K=64),
        _c(4, 4, BLOCK_M=16, BLOCK_R=64, BLOCK_K=128),
        _c(4, 4, BLOCK_M=32, BLOCK_R=32, BLOCK_K=128),
    ],
    80: [
        _c(4, 4, BLOCK_M=64, BLOCK_R=128, BLOCK_K=32),
        _c(4, 4, BLOCK_M=128, BLOCK_R=64, BLOCK_K=32),
        _c(4, 4, BLOCK_M=16, BLOCK_R=64, BLOCK_K=128),
        _c(4, 4, BLOCK_M=32, BLOCK_R=32, BLOCK_K=128),
    ],
}
# The backward pass's BLOCK_M and BLOCK_R fix the layout of its partial sums, so the host chooses them
# (backward_blocks) and autotuning only varies BLOCK_N, warps and stages.
_BACKWARD = {
    # 8 warps: dt (BLOCK_M x BLOCK_R = 64 x 128 fp32) and u beside it spill with 4 (checked statically).
    90: [_c(8, 3, BLOCK_N=64), _c(8, 2, BLOCK_N=64), _c(8, 3, BLOCK_N=32)],
    80: [_c(8, 3, BLOCK_N=64), _c(8, 3, BLOCK_N=32), _c(4, 3, BLOCK_N=32)],
}
# The second stage is memory-bound and tiny; its BLOCK_P fixes the summation order, so it is never tuned.
_SUM = {90: [_c(4, 1, BLOCK_P=16, BLOCK_N=256)], 80: [_c(4, 1, BLOCK_P=16, BLOCK_N=256)]}

# fp32 inputs take IEEE fp32 dots (as torch does by default: no TF32), which run on the FMA units with
# each thread's rows of one operand and columns of the other in registers for the whole BLOCK_K: the
# tensor-core tiles above spill there (and take tens of seconds each to compile). fp32 has its own tiles,
# the same on both generations: BLOCK_K 16 and 8 warps for 64-row tiles, which compile without spilling
# (the backward pass's BLOCK_M and BLOCK_R shrink with them, see linear.backward_blocks).
_IEEE = {
    "shrink": [_c(4, 3, BLOCK_M=64, BLOCK_R=64, BLOCK_K=16), _c(4, 3, BLOCK_M=16, BLOCK_R=64, BLOCK_K=16)],
    "gemm": [_c(8, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8), _c(4, 3, BLOCK_M=16, BLOCK_N=64, BLOCK_K=16, GROUP_M=1)],
    "backward": [_c(8, 2, BLOCK_N=16)],
}

_TABLES = {"shrink": _SHRINK, "gemm": _GEMM, "backward": _BACKWARD, "sum": _SUM}
_KEYS = {
    "shrink": ["M_BUCKET", "R", "K"],
    "gemm": ["M_BUCKET", "N", "K_ADAPTER", "K_BASE"],
    "backward": ["M_BUCKET", "N", "R", "BLOCK_M", "BLOCK_R"],
    "sum": ["P", "N"],
}


def arch_of(capability: tuple[int, int]) -> int:
    """The config table for a compute capability: 90 for Hopper and newer, 80 for Ampere/Ada."""
    return 90 if capability[0] >= 9 else 80


def configs(kernel: str, arch: int, ieee: bool = False) -> list[Config]:
    """The autotune configs of ``kernel`` for sm_``arch`` (80 or 90); ``ieee``: for fp32 inputs."""
    if ieee and kernel in _IEEE:
        return list(_IEEE[kernel])
    return list(_TABLES[kernel][arch])


def m_bucket(m: int) -> int:
    return min(max(16, triton.next_power_of_2(m)), 8192)


def _small(config: Config) -> bool:
    return config.kwargs.get("BLOCK_M", 64) <= 32


def usable(kernel: str, config: Config, *, decode: bool, on_the_fly: bool, gathered: bool = False,
           base_out: bool = False) -> bool:
    """Whether autotuning should time ``config``: decode-sized M (<= 32) gets the narrow-M configs and
    larger M the wide ones. What else sits in registers beside the accumulator shrinks the tiles that
    compile without spilling for sm_80 and sm_90a (the static check compiles every config each launch can
    reach): a gathered b[ids] tile (many adapters) or a base_out tile (vera_delta) in the GEMM's epilogue,
    projection tiles generated on the fly (the GEMM tiles keep to 2048 accumulator elements per warp and
    BLOCK_K 64, the dx GEMM's generated BLOCK_K x BLOCK_N tile of A being the largest; the backward pass
    to BLOCK_N 32 and BLOCK_R 64, see linear.backward_blocks)."""
    if _small(config) != decode:
        return False
    kw = config.kwargs
    fits = kw.get("BLOCK_M", 0) * kw.get("BLOCK_N", kw.get("BLOCK_R", 0)) <= 2048 * config.num_warps
    if kernel == "gemm" and (gathered or base_out) and not fits:
        return False
    if not on_the_fly:
        return True
    if kernel == "backward":
        return kw["BLOCK_N"] <= 32
    return fits and (kernel != "gemm" or kw["BLOCK_K"] <= 64)


def candidates(kernel: str, arch: int, args: dict) -> list[Config]:
    """The configs autotuning times for a launch of ``kernel`` with ``args`` on sm_``arch`` (its pruner
    applies this): those of its table (the fp32 one for IEEE dots) that :func:`usable` keeps, or all of
    them when it keeps none."""
    return _prune(kernel, configs(kernel, arch, _ieee(args)), args)


def _ieee(args: dict) -> bool:
    return bool(args.get("IEEE", False))


def _prune(kernel: str, configs_: list[Config], args: dict) -> list[Config]:
    if kernel not in _PRUNED:
        return list(configs_)
    flags = dict(decode=args["M_BUCKET"] <= 32, on_the_fly=bool(args["ON_THE_FLY"]),
                 gathered=bool(args.get("HAS_IDS", False)), base_out=bool(args.get("HAS_BASE_OUT", False)))
    return [c for c in configs_ if usable(kernel, c, **flags)] or list(configs_)


_PRUNED = ("shrink", "gemm", "backward")


def _pruner(kernel: str):
    def prune(configs_, named_args, **kwargs):
        # The Autotuner passes the positional arguments as named_args and the keyword ones (all of ours,
        # see launch) as kwargs.
        return _prune(kernel, configs_, {**named_args, **kwargs})

    return prune


# ---------------------------------------------------------------------------------------------------

_pinned: dict[str, Config] = {}
_tuners: dict[tuple[str, int, bool], object] = {}
_lock = threading.Lock()
_capture = None  # a list while static.captured() records launches instead of running them
_untuned = False  # within untuned(): the first candidate instead of autotuning


@dataclass(frozen=True)
class Launch:
    """A launch as :func:`launch` received it (recorded instead of run while the static check captures)."""

    kernel: str  # the autotune table's name, or the jit function's for a launch with a given config
    fn: object
    args: dict
    device: torch.device
    config: Config | None  # given by the caller; None: pinned, the interpreter's or autotuned


def pin_config(kernel: str, config: dict | None, *, num_warps: int = 4, num_stages: int = 3) -> None:
    """Launch ``kernel`` with the block sizes in ``config`` instead of autotuning (or the interpreter's
    config); ``None`` unpins. Example: ``pin_config("gemm", dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64,
    GROUP_M=8), num_warps=8)``. Sizes must be powers of two (BLOCK_K, BLOCK_R and BLOCK_N >= 16)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
    with _lock:
        if config is None:
            _pinned.pop(kernel, None)
        else:
            _pinned[kernel] = Config(dict(config), num_warps=num_warps, num_stages=num_stages)


@contextlib.contextmanager
def untuned():
    """Within this block, a launch that would autotune runs the first config autotuning would time for it
    instead (:func:`candidates`; pinned configs still win): one compile per kernel and regime, the same
    config in every run. ``python -m vera_kernels.verify`` checks correctness under it; autotuning belongs
    to the benchmarks."""
    global _untuned
    previous, _untuned = _untuned, True
    try:
        yield
    finally:
        _untuned = previous


def fixed_config(kernel: str, interpreted: bool) -> Config | None:
    """The config a launch will use without tuning: the pinned one, else the interpreter's; None on a GPU
    where the autotuner chooses."""
    return _pinned.get(kernel) or (INTERPRETER_CONFIGS[kernel] if interpreted else None)


def _tuner(kernel: str, fn, arch: int, ieee: bool):
    with _lock:
        if (kernel, arch, ieee) not in _tuners:
            prune = {"early_config_prune": _pruner(kernel)} if kernel in _PRUNED else None
            _tuners[(kernel, arch, ieee)] = triton.autotune(configs(kernel, arch, ieee), key=_KEYS[kernel],
                                                            prune_configs_by=prune)(fn)
        return _tuners[(kernel, arch, ieee)]


def on_device(device: torch.device):
    """The device guard of every launch: Triton launches on the current CUDA device, so make it the
    tensors' (a tensor on cuda:1 while cuda:0 is current would otherwise get its kernel on cuda:0)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch(kernel: str, fn, grid, args: dict, *, interpreted: bool, device: torch.device,
           config: Config | None = None) -> None:
    """The one place the package launches a Triton kernel: ``fn`` over ``grid`` (a tuple, or a callable of
    the meta-parameters) with ``args``, on ``device`` (the tensors'), under ``config`` when given, else
    the pinned, the interpreter's or the autotuned config of ``kernel``. While the static check captures,
    the launch is recorded instead."""
    if _capture is not None:
        _capture.append(Launch(kernel, fn, args, device, config))
        return
    with on_device(device):
        config = config or fixed_config(kernel, interpreted)
        if config is None and _untuned:
            config = candidates(kernel, arch_of(torch.cuda.get_device_capability(device)), args)[0]
        if config is not None:
            meta = {**args, **config.kwargs}
            fn[grid(meta) if callable(grid) else grid](**meta, num_warps=config.num_warps,
                                                       num_stages=config.num_stages)
            return
        tuner = _tuner(kernel, fn, arch_of(torch.cuda.get_device_capability(device)), _ieee(args))
        tuner[grid](**args)
