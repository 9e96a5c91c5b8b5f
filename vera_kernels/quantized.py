"""Quantized and tensor-subclass bases: which bases the fused op may read, and, per library, how a quantized
base is dequantized and quantized again to merge an adapter into it.

The fused op (FusedVeRALinear) reads the base weight as a dense matrix. That is right only for a plain
``torch.Tensor``/``nn.Parameter`` in strided layout inside a module whose forward is exactly ``x Wᵀ + b``
(``nn.Linear``, GPT-2's ``Conv1D``). Anything else (a tensor subclass such as torchao's ``Int8Tensor`` or
bitsandbytes' ``Params4bit``, packed integers, a module without ``.weight`` such as ``HQQLinear``, a subclass
of ``nn.Linear`` with its own forward) keeps its own forward inside a VeRAWrapper, and the adapter is added to
its output by ``vera_delta``: nothing here ever computes with packed weights as if they were dense.

Merging (``VeRAWrapper.merge``) goes through one generic path, ``merge_delta``: dequantize the weight to
fp32, add ΔW in fp32, quantize again with the layer's own quantizer. The formats it knows are the ones
PEFT merges: bitsandbytes 4-bit (nf4, fp4) and 8-bit, HQQ, torchao (re-quantized with the torchao config the
model was quantized with). A merged quantized layer is not the unmerged one bit for bit: each merge or
unmerge rounds the weight to the format's grid again (within one step of it), so the merged forward differs
from the unmerged one by that rounding and ``unmerge()`` restores W0 within the two roundings, not bit for
bit. Other formats (GPTQ, AWQ, optimum-quanto, unknown layers) serve and train through the wrapper; merging
them raises a TypeError naming the layer.

The libraries are optional: each is looked at only when it is already imported (a model quantized by it
has imported it), so this module costs nothing without them.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn


def _conv1d_type():
    """transformers' GPT-2 ``Conv1D`` (weight stored in x out), or None when transformers isn't loaded: then
    no module can be one, and importing it (seconds) is not worth it."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_plain_tensor(tensor) -> bool:
    """A dense tensor the kernels can read: exactly torch.Tensor or nn.Parameter (no subclass: a subclass
    may hold packed or scaled data behind the same shape), strided, not a torch quantized tensor (qint8 and the like)."""
    return (type(tensor) in (torch.Tensor, nn.Parameter) and tensor.layout == torch.strided
            and not tensor.is_quantized)


def fusable(module: nn.Module) -> bool:
    """Whether FusedVeRALinear can replace ``module``: its forward is exactly x Wᵀ + bias (the class is
    nn.Linear or Conv1D itself, not a subclass with its own forward) and its weight is a plain dense tensor.
    Everything else goes through VeRAWrapper (the base's own forward plus ``vera_delta``)."""
    conv1d = _conv1d_type()
    exact = type(module) is nn.Linear or (conv1d is not None and type(module) is conv1d)
    return exact and is_plain_tensor(module.weight) and (module.bias is None or is_plain_tensor(module.bias))


# --------------------------------------------------------------------------------------------------
# The formats that merge. Each: dequantize(module) -> the weight, out x in, as a new fp32 tensor;
# requantize(module, weight, config) -> the module holding ``weight`` quantized by the same quantizer (the
# same module, changed only once the new weight exists, or a new one). Nothing is changed on failure.


class _Bnb4bit:
    name = "bitsandbytes 4-bit"

    @staticmethod
    def matches(module):
        bnb = sys.modules.get("bitsandbytes")
        return bnb is not None and isinstance(getattr(module, "weight", None), bnb.nn.Params4bit)

    @staticmethod
    def dequantize(module):
        import bitsandbytes as bnb

        weight, state = module.weight, module.weight.quant_state
        if not getattr(state, "packing_format_for_cpu", False):
            return bnb.functional.dequantize_4bit(weight.data, state).to(torch.float32)
        # An eval forward on a CPU with AVX512-BF16 repacks the weight in place for its CPU kernel: nibbles
        # reordered, block scales (absmax) made plain, transposed and rounded to bf16. Its forward computes with
        # those bf16 scales, so they are what the weight is: undo only the nibble order (exact), on copies.
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        copy_state = copy.deepcopy(state)
        copy_state.original_nested = False  # keep the bf16 scales as they are (no re-quantization)
        qweight, copy_state = _convert_weight_packed_for_cpu_inverse(weight.data.clone(), copy_state)
        copy_state.absmax = state.absmax.t().reshape(-1).to(torch.float32)
        copy_state.dtype = torch.float32
        return bnb.functional.dequantize_4bit(qweight, copy_state).to(torch.float32)

    @staticmethod
    def requantize(module, weight, config):
        import bitsandbytes as bnb

        old = module.weight
        state = old.quant_state
        # The same quantizer: block size, nf4/fp4, nested statistics, storage dtype; quantized from the dtype
        # the layer was quantized from (the state's, before any CPU repacking), on .to(device) as bitsandbytes does.
        dtype = state.original_dtype if getattr(state, "packing_format_for_cpu", False) else state.dtype
        new = bnb.nn.Params4bit(
            weight.to(dtype).cpu(), requires_grad=False, blocksize=old.blocksize,
            compress_statistics=old.compress_statistics, quant_type=old.quant_type, quant_storage=old.quant_storage,
            module=module,
        ).to(old.device)
        module.weight = new
        return module


class _Bnb8bit:
    name = "bitsandbytes 8-bit"

    @staticmethod
    def matches(module):
        bnb = sys.modules.get("bitsandbytes")
        weight = getattr(module, "weight", None)
        return bnb is not None and isinstance(weight, bnb.nn.Int8Params) and weight.dtype == torch.int8

    @staticmethod
    def _row_scales(module):
        # Before the first forward the scales sit on the weight; the forward moves them to the layer's state.
        scales = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
        if scales is None:
            raise RuntimeError(f"{type(module).__name__}: an 8-bit weight without its row scales (SCB)")
        return scales

    @staticmethod
    def dequantize(module):
        import bitsandbytes as bnb

        weight = module.weight
        return bnb.functional.int8_vectorwise_dequant(weight.data, _Bnb8bit._row_scales(module).to(weight.device)).to(
            torch.float32)

    @staticmethod
    def requantize(module, weight, config):
        import bitsandbytes as bnb

        old = module.weight
        # Int8Params quantizes (row-wise absmax, through fp16 as bitsandbytes does) when moved off the CPU copy.
        new = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False).to(old.device)
        module.weight = new
        module.state.reset_grads()  # the old CB/SCB: the forward takes the new ones from the weight
        module.state.CB = module.state.SCB = None
        return module


class _Hqq:
    name = "HQQ"

    @staticmethod
    def matches(module):
        hqq = sys.modules.get("hqq.core.quantize")
        return hqq is not None and isinstance(module, hqq.HQQLinear)

    @staticmethod
    def dequantize(module):
        return module.dequantize().to(torch.float32)

    @staticmethod
    def requantize(module, weight, config):
        from hqq.core.quantize import HQQLinear

        # HQQ quantizes into a new layer (as PEFT does), with the old one's config, dtype and device; the
        # bias is the old layer's (PEFT's HQQ merge drops it).
        quant_config = {**module.quant_config, "offload_meta": module.offload_meta}
        new = HQQLinear(None, quant_config, compute_dtype=module.compute_dtype, device=module.device)
        new.quantize(weight.to(module.compute_dtype), **module.quant_config)
        new.bias = module.bias
        new.train(module.training)
        return new


class _Torchao:
    name = "torchao"

    @staticmethod
    def matches(module):
        utils = sys.modules.get("torchao.utils")
        base = getattr(utils, "TorchAOBaseTensor", None)
        return base is not None and isinstance(getattr(module, "weight", None), base)

    @staticmethod
    def dequantize(module):
        try:
            return module.weight.dequantize().to(torch.float32)
        except NotImplementedError as exc:
            raise TypeError(f"torchao {type(module.weight).__name__} weights can't be dequantized: {exc}") from None

    @staticmethod
    def requantize(module, weight, config):
        if config is None:
            raise TypeError(
                f"torchao {type(module.weight).__name__} weight: re-quantizing needs the torchao config the model "
                "was quantized with; pass it as apply_vera(..., quantization_config=config) (a transformers model "
                "quantized through TorchAoConfig records it, and apply_vera/from_peft find it there)"
            )
        from torchao.quantization import quantize_

        old = module.weight
        # quantize_ takes a module: the dense weight goes in, and the module's own weight comes out quantized.
        module.weight = nn.Parameter(weight.to(old.dtype), requires_grad=False)
        try:
            quantize_(module, config)
        except BaseException:
            module.weight = old
            raise
        if is_plain_tensor(module.weight):  # the config's filter skipped it
            module.weight = old
            raise TypeError(f"torchao config {config!r} did not quantize {type(module).__name__}'s weight again")
        module.weight.requires_grad_(False)
        return module


FORMATS = (_Bnb4bit, _Bnb8bit, _Hqq, _Torchao)


def merge_format(module: nn.Module):
    """The format of ``module`` that merge knows, or None."""
    return next((fmt for fmt in FORMATS if fmt.matches(module)), None)


def describe(module: nn.Module) -> str:
    """The base as an error message names it: its class and, when it has one, its weight's type and dtype."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return f"{type(module).__name__} (weight {type(weight).__name__}, {weight.dtype})"
    return type(module).__name__


def check_mergeable(module: nn.Module, config=None) -> None:
    """Raise a TypeError naming the base when ``merge_delta`` can't merge into it (before anything changes)."""
    fmt = merge_format(module)
    if fmt is None:
        raise TypeError(
            f"{describe(module)}: no known way to dequantize and re-quantize this base (merge works for "
            f"{', '.join(f.name for f in FORMATS)}); keep the adapter unmerged: it trains and serves as it is"
        )
    if fmt is _Torchao and config is None:
        fmt.requantize(module, None, None)  # raises, naming what is missing


def merge_delta(module: nn.Module, delta: torch.Tensor, sign: int, config=None) -> nn.Module:
    """The base with ``W + sign * delta`` (out x in, fp32) in its weight: dequantized, added in fp32,
    re-quantized by the format's own quantizer. Returns the module to use (the same one, or a new one for
    formats that quantize into a new layer)."""
    check_mergeable(module, config)
    fmt = merge_format(module)
    weight = fmt.dequantize(module)
    if tuple(weight.shape) != tuple(delta.shape):
        raise ValueError(f"{describe(module)}: dequantized weight {tuple(weight.shape)}, ΔW {tuple(delta.shape)}")
    return fmt.requantize(module, weight.add_(delta.to(weight.device, torch.float32), alpha=sign), config)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The base's weight, out x in, in fp32, as its forward uses it (for references and tests)."""
    fmt = merge_format(module)
    if fmt is None:
        raise TypeError(f"{describe(module)}: not a format this package can dequantize")
    return fmt.dequantize(module)


def model_quantization_config(model: nn.Module):
    """The torchao config a transformers model was quantized with (what PEFT re-quantizes with), or None."""
    config = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    get = getattr(config, "get_apply_tensor_subclass", None)
    return get() if callable(get) else None
