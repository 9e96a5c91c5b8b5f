"""Launch configurations of the fused kernels: autotuned on a GPU, one fixed config under the interpreter,
or a config pinned by the user.

Kernels (names used by :func:`pin_config`):
  rank      GEMMs with N = r: s = x Aᵀ, dt = (g ⊙ b) B, G = gᵀ s   BLOCK_M, BLOCK_R, BLOCK_K
  gemm      the persistent fused GEMM (forward y, dx)          BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M
  fold      b ⊙ B                                              BLOCK_N, BLOCK_R
  sum       the second stage of the reductions over M          BLOCK_P, BLOCK_N

The autotune key is (M bucket, sizes, kernel variant, dtypes): M is bucketed to a power of two so that a
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

KERNELS = ("rank", "gemm", "fold", "sum")

# Under the interpreter every program is a Python loop over numpy ops: few, large programs are fast. The
# blocks are still smaller than the test shapes' r and in, so the K loops, the r split, the K split and
# the persistent loop (linear.INTERPRETER_SMS programs) are exercised.
INTERPRETER_CONFIGS = {
    "rank": Config(dict(BLOCK_M=64, BLOCK_R=32, BLOCK_K=32)),
    "gemm": Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=4)),
    "fold": Config(dict(BLOCK_N=64, BLOCK_R=64)),
    "sum": Config(dict(BLOCK_P=16, BLOCK_N=64)),
}
# Up to this M bucket a launch is decode-sized: the narrow-M configs, BLOCK_K 128 for the rank GEMMs.
DECODE_BUCKET = 32


# A split-K range of the rank GEMM starts on a multiple of the largest BLOCK_K autotuning may choose for
# it: 128 for decode-sized M (usable keeps BLOCK_K 128 there), 256 otherwise (the fp32 configs' 16 and 32
# divide both).
def split_granule(decode: bool) -> int:
    return 128 if decode else 256


def _c(num_warps, num_stages, **blocks):
    return Config(blocks, num_warps=num_warps, num_stages=num_stages)


# The fused GEMM is persistent (one program per SM). Wide-M tiles: 128 rows for wgmma on sm_90 (TMA loads
# when the strides allow, else cp.async), BLOCK_K 64 on sm_90 (128-byte bf16 rows, the wgmma swizzle) and
# 32 on sm_80 (its 164 KB of shared memory at 3-4 stages). Decode (M <= 32): BLOCK_M 16 or 32 (mma.sync:
# wgmma needs 64 rows), long K steps, and narrow N tiles so that 4096 outputs give 128-256 programs: every
# SM streams its share of W0, which is what bounds decode.
_GEMM = {
    90: [
        _c(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
        _c(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _c(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _c(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _c(4, 4, BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1),
        _c(4, 4, BLOCK_M=16, BLOCK_N=16, BLOCK_K=256, GROUP_M=1),
        _c(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1),
        _c(4, 3, BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=1),
    ],
    # sm_80: the one-loop pointer variant holds both sources' addresses: 128 x 256 tiles (8 warps) and
    # 128 x 128 with 4 warps spill there, so the wide tiles are 128 x 128 with 8 warps (checked statically).
    80: [
        _c(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
        _c(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
        _c(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
        _c(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
        _c(4, 4, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1),
        _c(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1),
        _c(4, 3, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=1),
    ],
}
# The rank GEMMs (s = x Aᵀ, dt = (g ⊙ b) B, G = gᵀ s): the host fixes BLOCK_M and BLOCK_R (they set the layout
# of the partial sums, linear.rank_blocks), autotuning varies BLOCK_K, warps and stages.
_RANK = {
    90: [_c(8, 3, BLOCK_K=64), _c(8, 3, BLOCK_K=128), _c(4, 4, BLOCK_K=64), _c(4, 4, BLOCK_K=128), _c(4, 3, BLOCK_K=256)],
    80: [_c(8, 3, BLOCK_K=32), _c(8, 3, BLOCK_K=64), _c(4, 4, BLOCK_K=32), _c(4, 4, BLOCK_K=64), _c(4, 3, BLOCK_K=128)],
}
# Memory-bound and tiny: one config each; the second stages' blocks fix the summation order, never tuned.
_FOLD = {90: [_c(4, 1, BLOCK_N=64, BLOCK_R=64)], 80: [_c(4, 1, BLOCK_N=64, BLOCK_R=64)]}
_SUM = {90: [_c(4, 1, BLOCK_P=16, BLOCK_N=256)], 80: [_c(4, 1, BLOCK_P=16, BLOCK_N=256)]}

# fp32 inputs take IEEE fp32 dots (as torch does by default: no TF32), which run on the FMA units with
# each thread's rows of one operand and columns of the other in registers for the whole BLOCK_K: every
# wide tensor-core tile above spills there (the static check). fp32 has its own tiles, the same on both
# generations: short K steps, 32 x 32 GEMM tiles (64 x 32 keeps stack frames in some variants, with 4 or
# 8 warps), and rank-GEMM tiles of at most 32 x 64 (linear.rank_blocks) with 4 warps.
_IEEE = {
    "gemm": [_c(4, 3, BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=8), _c(4, 3, BLOCK_M=16, BLOCK_N=64, BLOCK_K=16, GROUP_M=1)],
    "rank": [_c(4, 3, BLOCK_K=16), _c(4, 3, BLOCK_K=32)],
}

_TABLES = {"rank": _RANK, "gemm": _GEMM, "fold": _FOLD, "sum": _SUM}
_KEYS = {
    # The variant flags too: the pruner keeps different configs for them (spills, decode tiles).
    "rank": ["M_BUCKET", "R", "K", "MODE", "BLOCK_M", "BLOCK_R", "GENERATE_P", "SCALE_P", "HAS_BIAS", "HAS_IDS"],
    "gemm": ["M_BUCKET", "N", "K_ADAPTER", "K_BASE", "USE_TMA", "SCALE_IN_LOOP", "ON_THE_FLY", "HAS_IDS", "P_IS_NK"],
    "fold": ["R"],
    "sum": ["P", "N"],
}
_TUNED = ("rank", "gemm")
# Descriptor arguments of the fused GEMM and their block shapes, set from the config before each launch.
_DESCRIPTORS = ("x_desc", "w_desc", "t_desc", "p_desc", "out_desc")


def set_block_shapes(nargs: dict) -> None:
    """Give the fused GEMM's tensor descriptors the config's tile shapes (a Config pre-hook: TMA copies
    whole tiles, so the descriptor carries them). W0 and P are N x K in the forward, K x N in dx."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    shapes = dict(x_desc=[bm, bk], t_desc=[bm, bk], out_desc=[bm, bn // 2])  # the output in half-width subtiles
    shapes["w_desc"] = shapes["p_desc"] = [bn, bk] if nargs["P_IS_NK"] else [bk, bn]
    for name in _DESCRIPTORS:
        if nargs.get(name) is not None:
            nargs[name].block_shape = shapes[name]


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


def decode_sized(m: int) -> bool:
    """Whether a GEMM with ``m`` rows takes the decode (narrow-M) configs."""
    return m_bucket(m) <= DECODE_BUCKET


def _decode_tile(config: Config) -> bool:
    """Whether a fused-GEMM config is one of the decode tiles: those have GROUP_M 1 (a decode-sized M is
    one row block, nothing to group), the wide tiles GROUP_M 8 (fp32's wide tile has 32 rows too)."""
    return config.kwargs["GROUP_M"] == 1


def usable(kernel: str, config: Config, *, decode: bool, on_the_fly: bool, gathered: bool = False,
           tile: int = 0, block_m: int = 0, scaled_a: bool = False, ieee: bool = False) -> bool:
    """Whether autotuning should time ``config``. The fused GEMM: decode-sized M (<= 32) gets the narrow-M
    configs and larger M the wide ones; generating projection tiles on the fly takes registers, so there
    the tiles keep to 2048 accumulator elements per warp, as with the many-adapter epilogue's gathered
    b[ids] tile (what compiles without spilling, checked statically). The rank GEMM (its BLOCK_M x BLOCK_R
    ``tile`` chosen by the host): 2048 accumulator elements per warp at most (128 x 128 with 4 warps spills
    in the db epilogue), and 8 warps only for tiles that need them; decode-sized M takes K steps of 128,
    the split's granule (16 x 128 x 64 also keeps an 8-byte stack frame under Triton 3.6), larger M
    generating a projection K steps of 64 at most (the generated tile sits in registers); when the a tile
    is scaled in registers (dt = (g ⊙ b) B), 1024 of its elements per warp at most (BLOCK_M ``block_m``).
    fp32 (``ieee``) has its own table, all usable."""
    if kernel == "rank":
        if ieee:
            return True
        per_warp = tile / config.num_warps
        block_k = config.kwargs["BLOCK_K"]
        k_step = block_k == split_granule(True) if decode else not on_the_fly or block_k <= 64
        a_fits = not scaled_a or block_m * block_k <= 1024 * config.num_warps
        return per_warp <= 2048 and (config.num_warps == 4 or per_warp >= 1024) and k_step and a_fits
    if kernel != "gemm":
        return True
    if _decode_tile(config) != decode:
        return False
    if gathered or on_the_fly:
        return config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] <= 2048 * config.num_warps
    return True


def candidates(kernel: str, arch: int, args: dict) -> list[Config]:
    """The configs autotuning times for a launch of ``kernel`` with ``args`` on sm_``arch`` (its pruner
    applies this): those :func:`usable` keeps, or all of them when it keeps none."""
    return _prune(kernel, configs(kernel, arch, bool(args.get("IEEE", False))), args)


def _prune(kernel: str, configs_: list[Config], args: dict) -> list[Config]:
    if kernel not in _TUNED:
        return list(configs_)
    decode = args["M_BUCKET"] <= DECODE_BUCKET
    on_the_fly = bool(args.get("ON_THE_FLY", False) or args.get("GENERATE_P", False))
    gathered = bool(args.get("HAS_IDS", False))
    tile = args.get("BLOCK_M", 0) * args.get("BLOCK_R", 0)
    kept = [c for c in configs_ if usable(kernel, c, decode=decode, on_the_fly=on_the_fly, gathered=gathered,
                                          tile=tile, block_m=args.get("BLOCK_M", 0),
                                          scaled_a=args.get("SCALE_P", 0) == 1, ieee=bool(args.get("IEEE", False)))]
    return kept or list(configs_)


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
    grid: object = None  # as given: a tuple, or a function of the meta-parameters


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
    instead (:func:`candidates`; pinned configs still win): one compile per kernel and variant, the same
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
            prune = {"early_config_prune": _pruner(kernel)} if kernel in _TUNED else None
            hooked = [_with_hook(kernel, c) for c in configs(kernel, arch, ieee)]
            _tuners[(kernel, arch, ieee)] = triton.autotune(hooked, key=_KEYS[kernel], prune_configs_by=prune)(fn)
        return _tuners[(kernel, arch, ieee)]


def capturing() -> bool:
    """Whether launches are being recorded for the static check instead of run."""
    return _capture is not None


def _with_hook(kernel: str, config: Config) -> Config:
    if kernel != "gemm":
        return config
    return Config(dict(config.kwargs), num_warps=config.num_warps, num_stages=config.num_stages,
                  pre_hook=set_block_shapes)


def on_device(device: torch.device):
    """The device guard of every launch: Triton launches on the current CUDA device, so make it the
    tensors' (a tensor on cuda:1 while cuda:0 is current would otherwise get its kernel on cuda:0)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch(kernel: str, fn, grid, args: dict, *, interpreted: bool, device: torch.device,
           config: Config | None = None) -> None:
    """The one place the package launches a Triton kernel: ``fn`` over ``grid`` (a tuple, or a callable of
    the meta-parameters) with ``args``, on ``device`` (the tensors'), under the config pinned for
    ``kernel``, else ``config`` when given, else the interpreter's or the autotuned one. While the static
    check captures, the launch is recorded instead."""
    if _capture is not None:
        _capture.append(Launch(kernel, fn, args, device, config, grid))
        return
    with on_device(device):
        config = _pinned.get(kernel) or config or fixed_config(kernel, interpreted)
        if config is None and _untuned:
            config = candidates(kernel, arch_of(torch.cuda.get_device_capability(device)), args)[0]
        if config is not None:
            meta = {**args, **config.kwargs}
            if kernel == "gemm":
                set_block_shapes(meta)
            fn[grid(meta) if callable(grid) else grid](**meta, num_warps=config.num_warps,
                                                       num_stages=config.num_stages)
            return
        tuner = _tuner(kernel, fn, arch_of(torch.cuda.get_device_capability(device)), bool(args.get("IEEE", False)))
        tuner[grid](**args)
