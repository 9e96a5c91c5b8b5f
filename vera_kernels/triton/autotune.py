"""Launch configurations of the fused kernels: autotuned on a GPU, one fixed config under the interpreter,
or a config pinned by the user.

Kernels (names used by :func:`pin_config`):
  rank      GEMMs with N = r: s = x Aᵀ, G = gᵀ s, dt = g (b ⊙ B)   BLOCK_M, BLOCK_R, BLOCK_K
  gemm      the persistent fused GEMM (forward y, dx)          BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M
  sum       the second stage of the reductions over M          BLOCK_P, BLOCK_N

The autotune key is (M bucket, sizes, every constexpr the configs do not set, dtypes): M is bucketed to a
power of two so that a training run with varying sequence lengths tunes a handful of times, not once per
length. The config
lists depend on the GPU generation (sm_80: mma.sync with cp.async pipelines; sm_90: wgmma wants 64-row
warpgroup tiles and deeper stages). A tuned choice is cached per key for the process, so repeated calls
give the same bits; pin a config to get the same bits across processes too (autotuning may pick
another BLOCK_K, hence another summation order, in another process).

CUDA graphs: autotuning times configs and synchronizes, which a capture forbids. A launch met while its
stream captures takes the choice autotuning made for its key (run the shape once before capturing), else
the first candidate, with one warning naming the shape; it never tunes.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import warnings
from dataclasses import dataclass

import torch
import triton
from triton import Config

from .. import buffers

KERNELS = ("rank", "gemm", "sum")

# Under the interpreter every program is a Python loop over numpy ops: few, large programs are fast. The
# blocks are still smaller than the test shapes' r and in, so the K loops, the r split, the K split and
# the persistent loop (linear.INTERPRETER_SMS programs) are exercised.
INTERPRETER_CONFIGS = {
    "rank": Config(dict(BLOCK_M=64, BLOCK_R=32, BLOCK_K=32)),
    "gemm": Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=4)),
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
    # sm_80: the one-loop pointer variant (dx) holds both sources' addresses: 128 x 256 tiles (8 warps) and
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
# The rank GEMMs (s = x Aᵀ, G = gᵀ s, dt = g (b ⊙ B)): the host fixes BLOCK_M and BLOCK_R (they set the layout
# of the partial sums, linear.rank_blocks), autotuning varies BLOCK_K, warps and stages.
_RANK = {
    90: [_c(8, 3, BLOCK_K=64), _c(8, 3, BLOCK_K=128), _c(4, 4, BLOCK_K=64), _c(4, 4, BLOCK_K=128), _c(4, 3, BLOCK_K=256)],
    80: [_c(8, 3, BLOCK_K=32), _c(8, 3, BLOCK_K=64), _c(4, 4, BLOCK_K=32), _c(4, 4, BLOCK_K=64), _c(4, 3, BLOCK_K=128)],
}
# Memory-bound and tiny: one config each; the second stages' blocks fix the summation order, never tuned.
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

_TABLES = {"rank": _RANK, "gemm": _GEMM, "sum": _SUM}
# The autotune key of a tuned kernel: these sizes, then every constexpr of the kernel that the configs do not
# set (key_names): each one changes the compiled kernel, hence which config is fastest and which ones the
# pruner keeps (vera_delta's GEMM, without the base GEMM, is not vera_linear's). Triton adds the dtypes.
_SIZES = {"rank": ["M_BUCKET", "R", "K"], "gemm": ["M_BUCKET", "N", "K_ADAPTER", "K_BASE"]}
_TUNED = ("rank", "gemm")
# Descriptor arguments of the fused GEMM and their block shapes, set from the config before each launch.
_DESCRIPTORS = ("x_desc", "w_desc", "t_desc", "p_desc", "out_desc")


def parameters(fn) -> list[tuple[str, bool]]:
    """(name, is constexpr) of each parameter of a jit function (or of the interpreter's stand-in, which
    keeps only the Python function: its annotations then say which are constexpr)."""
    if hasattr(fn, "params"):
        return [(p.name, p.is_constexpr) for p in fn.params]
    return [(name, str(p.annotation).split(".")[-1].endswith("constexpr"))
            for name, p in inspect.signature(fn.fn).parameters.items()]


@functools.lru_cache(maxsize=None)
def key_names(kernel: str, fn) -> tuple[str, ...]:
    """The autotune key of ``kernel`` (a tuned one) launched as ``fn``: its sizes, then every constexpr of
    ``fn`` that no config sets."""
    tuned = {name for arch in (80, 90) for ieee in (False, True) for c in configs(kernel, arch, ieee)
             for name in c.kwargs}
    return tuple(_SIZES[kernel]) + tuple(name for name, constexpr in parameters(fn)
                                         if constexpr and name not in tuned and name not in _SIZES[kernel])


def tune_key(kernel: str, fn, args: dict) -> tuple:
    """What autotuning keys its choice on for this launch: the key's values and the tensors' dtypes."""
    return (tuple((name, args[name]) for name in key_names(kernel, fn))
            + tuple(str(v.dtype) for v in args.values() if isinstance(v, torch.Tensor)))


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


# The shared memory a block may have on sm_90 (227 KB): a rank GEMM's 16-bit operand tiles, one pair per
# stage, must fit in it (sm_80's 163 KB hold every stage count its table gives).
RANK_SHARED_BYTES = 227 * 1024


def usable(kernel: str, config: Config, *, decode: bool, on_the_fly: bool, gathered: bool = False,
           scaled_pointers: bool = False, delta: bool = False, tile: tuple[int, int] = (0, 0), ieee: bool = False,
           split: bool = False) -> bool:
    """Whether autotuning should time ``config``. The fused GEMM: decode-sized M (<= 32) gets the narrow-M
    configs and larger M the wide ones; generating projection tiles on the fly takes registers, so there
    the tiles keep to 2048 accumulator elements per warp, as with the many-adapter epilogue's gathered
    b[ids] tile and the forward's pointer variant (``scaled_pointers``: two loops of pointer loads, the r
    part scaled by b between them; 128 x 256 with 8 warps spills on sm_90a) and vera_delta's forward
    (``delta``: b's tile, base_out's and the accumulator meet in the epilogue; 128 x 256 spills there with
    TMA too), where generated tiles also keep BLOCK_N to 64 with 4 warps (64 x 128 x 32, 4 warps and 4
    stages spilled on sm_80): what compiles without spilling, checked statically under both Tritons. The rank GEMM (its BLOCK_M x BLOCK_R
    ``tile`` chosen by the host): 2048 accumulator elements per warp at most (128 x 128 with 4 warps spills
    in the db epilogue), and 8 warps only for tiles that need them; its operand stages within a block's
    shared memory (RANK_SHARED_BYTES: 64 x 128 x 256 in 3 stages is 288 KB, which cannot launch);
    decode-sized M takes K steps of 128, the split's granule (16 x 128 x 64 also keeps an 8-byte stack
    frame under Triton 3.6), larger M generating a projection K steps of 64 at most (the generated tile
    sits in registers).
    fp32 (``ieee``) has its own table, all usable but for a split (``split``) 32 x 64 tile: the last program's
    sum of the partials adds registers there, and K steps of 32 spilled (sm_80, Triton 3.9)."""
    if kernel == "rank":
        if ieee:
            return not (split and tile[0] * tile[1] >= 32 * 64 and config.kwargs["BLOCK_K"] > 16)
        per_warp = tile[0] * tile[1] / config.num_warps
        block_k = config.kwargs["BLOCK_K"]
        k_step = block_k == split_granule(True) if decode else not on_the_fly or block_k <= 64
        fits = config.num_stages * (tile[0] + tile[1]) * block_k * 2 <= RANK_SHARED_BYTES
        return per_warp <= 2048 and (config.num_warps == 4 or per_warp >= 1024) and k_step and fits
    if kernel != "gemm":
        return True
    if _decode_tile(config) != decode:
        return False
    if delta and on_the_fly and config.num_warps == 4 and config.kwargs["BLOCK_N"] > 64:
        return False
    if gathered or on_the_fly or scaled_pointers or delta:
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
    scaled_pointers = bool(args.get("SCALE_R", False)) and not args.get("USE_TMA", False)
    delta = bool(args.get("SCALE_R", False)) and not args.get("HAS_BASE_GEMM", True)
    tile = (args.get("BLOCK_M", 0), args.get("BLOCK_R", 0))
    kept = [c for c in configs_ if usable(kernel, c, decode=decode, on_the_fly=on_the_fly, gathered=gathered,
                                          scaled_pointers=scaled_pointers, delta=delta,
                                          tile=tile, ieee=bool(args.get("IEEE", False)),
                                          split=bool(args.get("SPLIT", False)))]
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
_chosen: dict[tuple, Config] = {}  # (kernel, arch, tune_key) -> the config autotuning chose
_warned: set[tuple] = set()  # the keys met untuned during a CUDA graph capture (one warning each)


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
            key = list(key_names(kernel, fn))
            _tuners[(kernel, arch, ieee)] = triton.autotune(hooked, key=key, prune_configs_by=prune)(fn)
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
        if config is None:
            arch = arch_of(torch.cuda.get_device_capability(device))
            config = _without_tuning(kernel, fn, arch, args)
        if config is not None:
            meta = {**args, **config.kwargs}
            if kernel == "gemm":
                set_block_shapes(meta)
            compiled = fn[grid(meta) if callable(grid) else grid](**meta, num_warps=config.num_warps,
                                                                  num_stages=config.num_stages)
            _record(kernel, config, compiled)
            return
        tuner = _tuner(kernel, fn, arch, bool(args.get("IEEE", False)))
        tuned_before = len(tuner.cache)
        compiled = tuner[grid](**args)
        if len(tuner.cache) != tuned_before:  # a new key was tuned: keep its choice (captures take it)
            with _lock:
                _chosen[(kernel, arch, tune_key(kernel, fn, args))] = tuner.best_config
        _record(kernel, tuner.best_config, compiled)


_recorders: list[dict] = []  # one per open recording() block


@contextlib.contextmanager
def recording():
    """Within this block, each distinct compiled kernel the package launches is kept with its config; the
    dict yielded maps each to :func:`kernel_facts` when the block ends (bench/conftest.py: the static facts
    of every kernel a benchmark case ran, beside its time)."""
    seen: dict = {}
    with _lock:
        _recorders.append(seen)
    facts: dict = {}
    try:
        yield facts
    finally:
        with _lock:
            _recorders.remove(seen)
        facts.update({key: kernel_facts(kernel, config, compiled) for key, (kernel, config, compiled) in seen.items()})


def _record(kernel: str, config: Config, compiled) -> None:
    if _recorders and hasattr(compiled, "metadata"):  # a CompiledKernel (the interpreter returns none)
        key = (kernel, getattr(compiled, "hash", id(compiled)))
        with _lock:
            for seen in _recorders:
                seen.setdefault(key, (kernel, config, compiled))


def kernel_facts(kernel: str, config: Config, compiled) -> dict:
    """What a compiled kernel is: its name, config, registers and spills per thread (known once it has been
    loaded, i.e. launched), shared memory, and its tensor-core and TMA instructions counted in its PTX
    (wgmma: Hopper's warpgroup MMA; mma.sync: Ampere's; cp.async.bulk.tensor: TMA loads)."""
    metadata = compiled.metadata
    ptx = compiled.asm.get("ptx", "") if hasattr(compiled, "asm") else ""
    return dict(kernel=kernel, name=metadata.name, config=_describe(config), num_warps=metadata.num_warps,
                num_stages=metadata.num_stages, shared_bytes=metadata.shared,
                registers=getattr(compiled, "n_regs", None), spills=getattr(compiled, "n_spills", None),
                wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"),
                tma_loads=ptx.count("cp.async.bulk.tensor"))


def _without_tuning(kernel: str, fn, arch: int, args: dict) -> Config | None:
    """The config of a launch that must not autotune, else None (autotune). A kernel with one config (sum)
    takes it; within :func:`untuned` the first candidate; while the stream captures a CUDA graph
    (autotuning synchronizes, which fails a capture) the choice autotuning made for this key, else the
    first candidate, with one warning per key when there was a choice to make."""
    if kernel not in _TUNED:
        return configs(kernel, arch)[0]
    if _untuned:
        return candidates(kernel, arch, args)[0]
    if not buffers.graph_capturing():  # (launch holds the tensors' device current)
        return None
    key = (kernel, arch, tune_key(kernel, fn, args))
    found = candidates(kernel, arch, args)
    with _lock:
        chosen = _chosen.get(key)
        warn = chosen is None and len(found) > 1 and key not in _warned
        _warned.add(key)
    if warn:
        warnings.warn(f"vera_kernels: the {kernel} kernel met an untuned shape during a CUDA graph capture "
                      f"({describe_key(kernel, fn, args)}): it runs the first candidate config "
                      f"({_describe(found[0])}), not a tuned one. Run this shape once before capturing "
                      f"to capture the tuned config.", RuntimeWarning, stacklevel=4)
    return chosen or found[0]


def describe_key(kernel: str, fn, args: dict) -> str:
    """A launch's shape as its autotune key sees it: "M_BUCKET=512 N=4096 ... bfloat16 HAS_BASE_GEMM ..."
    (the constexpr switches that are on; the dtypes of its tensors)."""
    names = key_names(kernel, fn)
    sizes = [f"{n}={args[n]}" for n in _SIZES[kernel]]
    flags = [n if args[n] is True else f"{n}={args[n]}" for n in names[len(_SIZES[kernel]):]
             if args[n] not in (None, False, 0) and n != "INTERPRET"]
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in args.values() if isinstance(v, torch.Tensor)})
    return " ".join(sizes + dtypes + flags)


def _describe(config: Config) -> str:
    blocks = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{blocks} num_warps={config.num_warps} num_stages={config.num_stages}"


def choices() -> list[dict]:
    """Every choice autotuning made in this process: its kernel, arch, key (the key's names and values, then
    the tensors' dtypes) and config."""
    with _lock:
        items = list(_chosen.items())
    return [dict(kernel=kernel, arch=arch, key=[list(k) if isinstance(k, tuple) else k for k in key],
                 config=_describe(config)) for (kernel, arch, key), config in items]
