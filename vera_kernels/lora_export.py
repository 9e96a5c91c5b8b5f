"""Exact LoRA export of VeRA adapters, for the engines that serve LoRA only (vLLM, SGLang, TGI, LoRAX).

A VeRA update is a rank-r LoRA:

    ΔW = (b ⊙ B)(d ⊙ A) = lora_B lora_A,   lora_A = d ⊙ A  (r x in),   lora_B = b ⊙ B  (out x r),

with ``lora_alpha = r`` (PEFT's scaling alpha / r = 1). Each element of a factor is one product of two fp32
numbers, formed in float64 (where it is exact) and rounded once to the saved dtype, so the LoRA reproduces the
adapter up to that one rounding per factor. PEFT's own route, ``convert_to_lora``, truncates an SVD of ΔW:
an approximation (``bench/lora_export.py`` measures both).

The trade-off: an engine serving the export holds r·(in + out) numbers per adapted layer where VeRA needs
r + out (and one projection pair shared by every layer and adapter): a rank-256 VeRA adapter of a
4096 x 4096 projection is 4352 numbers as a file and 2,097,152 as a LoRA. Export where the adapter is
served; store and ship the file.

``to_lora(model)`` converts a model in memory, as ``to_peft`` does; ``export_adapter_file`` converts an adapter
file (``save_adapter``) against a Hugging Face model directory without loading the model's weights (the
command line: ``python -m vera_kernels.export``); ``cached_export`` does that once per content, for servers
(``vllm_resolver``).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile

import torch
from torch import nn

from .adapters import _is_bias, _layer_names, read_adapter
from .layer import FusedVeRALinear, _conv1d_type
from .patching import (_in_out_features, _replace, _shared_projections, _uniform, trained_extras, vera_layers)
from .projection_sources import SeededProjections
from .projections import SCHEME

# What an exported directory holds, for cached_export's keys: bump it when the export writes something else.
EXPORT_FORMAT = "1"


def _import_peft():
    try:
        import peft
    except ImportError as exc:
        raise ImportError(f"the LoRA export needs the peft package (pip install peft): {exc}") from None
    return peft


# The factor dtypes: float64 products of fp32 numbers are exact, each of these is one rounding of them.
FACTOR_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _check_factor_dtype(who: str, dtype) -> None:
    if dtype not in FACTOR_DTYPES:
        raise TypeError(f"{who}: dtype must be one of {', '.join(map(str, FACTOR_DTYPES))}, got {dtype!r}")


def round_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 ``x`` rounded once (to nearest, ties to even) to ``dtype``. torch narrows float64 to bf16 and
    fp16 through fp32, which rounds twice (a value just above a bf16 tie becomes the tie, then rounds to
    even): here the fp32 step rounds to odd instead (truncate, then set the last bit when inexact), which
    keeps the side of the tie for the second rounding, exact as fp32 has more than two extra bits."""
    _check_factor_dtype("round_once", dtype)
    if dtype in (torch.float64, torch.float32):
        return x.to(dtype)
    narrow = x.to(torch.float32)
    inexact = narrow.to(torch.float64) != x
    too_far = inexact & (narrow.to(torch.float64).abs() > x.abs())
    truncated = torch.where(too_far, torch.nextafter(narrow, torch.zeros_like(narrow)), narrow)
    bits = truncated.view(torch.int32)
    return torch.where(inexact, bits | 1, bits).view(torch.float32).to(dtype)


def exact_factors(lambda_d: torch.Tensor, lambda_b: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A, lora_B) = (d ⊙ A, b ⊙ B) for A (r x in), B (out x r), d (r), b (out): every element one product,
    formed in float64 (exact for fp32 operands) and rounded once to ``dtype``; new contiguous tensors on the
    lambdas' device."""
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or lambda_d.shape != (A.shape[0],) \
            or lambda_b.shape != (B.shape[0],):
        raise ValueError(
            f"exact_factors: expected d (r), b (out), A (r, in), B (out, r); got d {tuple(lambda_d.shape)}, "
            f"b {tuple(lambda_b.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}"
        )
    _check_factor_dtype("exact_factors", dtype)
    device = lambda_d.device
    wide = torch.float64
    lora_A = lambda_d.detach().to(wide)[:, None] * A.to(device=device, dtype=wide)
    lora_B = lambda_b.detach().to(device=device, dtype=wide)[:, None] * B.to(device=device, dtype=wide)
    return round_once(lora_A, dtype).contiguous(), round_once(lora_B, dtype).contiguous()


def _forward_dtype(layer) -> torch.dtype:
    """The dtype in which the layer's forward meets the projections: its weight's for FusedVeRALinear; for a
    VeRAWrapper the input's, taken as its base's first floating-point parameter's (fp32 when it has none)."""
    if isinstance(layer, FusedVeRALinear):
        return layer.weight.dtype
    floats = [p.dtype for p in layer.base_layer.parameters() if p.dtype.is_floating_point]
    return floats[0] if floats else torch.float32


def layer_factors(layer, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A, lora_B) of a VeRA layer's own adapter (lambda_d, lambda_b), from its projections as its forward
    uses them (in its weight's dtype: bf16 values for a bf16 model), rounded once to ``dtype``."""
    A, B = layer._projection_slices(layer.lambda_d.device, _forward_dtype(layer))
    return exact_factors(layer.lambda_d, layer.lambda_b, A, B, dtype)


def _target_modules(names: list[str], all_names: list[str]):
    """PEFT's target_modules for exactly ``names``: the plain list every engine reads, unless PEFT's list
    matching (a name equal to an entry or ending with "." + it) would also catch another module of the model;
    then a full-match regular expression (which PEFT and vLLM read; some engines may not)."""
    wanted = set(names)
    ambiguous = any(other not in wanted and any(other.endswith("." + name) for name in names) for other in all_names)
    if ambiguous:
        return "|".join(re.escape(name) for name in names)
    return sorted(names)


def _lora_config(peft, names, all_names, *, rank, dropout, bias, modules_to_save, fan_in_fan_out,
                 base_model_name_or_path=None):
    return peft.LoraConfig(
        r=rank,
        lora_alpha=rank,  # scaling = alpha / r = 1: the factors carry the whole update
        target_modules=_target_modules(names, all_names),
        lora_dropout=dropout,  # VeRA's dropout is LoRA's: on the adapter's input only
        bias={"layers": "lora_only"}.get(bias, bias),
        modules_to_save=modules_to_save or None,
        fan_in_fan_out=fan_in_fan_out,
        base_model_name_or_path=base_model_name_or_path,
    )


def _wrap(peft, model, config, adapter_name):
    """peft.get_peft_model, a refusal that names the module where PEFT's LoRA can't adapt one."""
    try:
        return peft.get_peft_model(model, config, adapter_name=adapter_name)
    except ValueError as exc:
        if "is not supported" in str(exc):
            raise TypeError(f"PEFT's LoRA can't adapt one of the modules: {exc}") from None
        raise


def _install_factors(peft_model, adapter_name, factors, dtype):
    """Put each layer's factors into PEFT's LoRA layers as new Parameters in ``dtype`` (None: the dtype PEFT
    allocated), on the device PEFT put the adapter; every adapted layer must have its pair."""
    peft = _import_peft()
    found = set()
    for name, module in peft_model.get_base_model().named_modules():
        if not isinstance(module, peft.tuners.lora.LoraLayer) or adapter_name not in module.lora_A:
            continue
        lora_A, lora_B = factors[name]
        for linear, value in ((module.lora_A[adapter_name], lora_A), (module.lora_B[adapter_name], lora_B)):
            old = linear.weight
            if tuple(old.shape) != tuple(value.shape):
                raise RuntimeError(f"{name}: PEFT's LoRA factor is {tuple(old.shape)}, ours {tuple(value.shape)}")
            device = value.device if old.device.type == "meta" else old.device
            # Rounded once: value is already in the target dtype, or float64 (exact) when it is PEFT's own.
            value = value if dtype is not None else round_once(value, old.dtype)
            linear.weight = nn.Parameter(value.to(device=device), requires_grad=old.requires_grad)
        found.add(name)
    missing = sorted(set(factors) - found)
    if missing:
        raise RuntimeError(f"PEFT's LoRA did not adapt {missing[:5]}")


def to_lora(model: nn.Module, adapter_name: str = "default", *, dtype: torch.dtype | None = None):
    """A PEFT LoRA model holding this model's VeRA adapters exactly: the VeRA layers are replaced in place by
    their bases and ``peft.get_peft_model`` wraps the model with a LoraConfig (r = lora_alpha = the rank, so
    scaling 1) whose factors are ``lora_A = d ⊙ A``, ``lora_B = b ⊙ B``. Its ``save_pretrained(dir)`` writes
    a standard LoRA adapter directory (adapter_config.json, adapter_model.safetensors) that PEFT and the LoRA
    serving engines load as any LoRA.

    ``dtype``: the factors' dtype (default: the one PEFT gives a new LoRA, fp32 unless told otherwise); each
    factor is formed in float64 from the projections as the model's forward uses them and rounded once to it.

    The trade-off: the engine holds r·(in + out) numbers per layer where VeRA holds r + out.

    As ``to_peft``: every trained tensor is exported (trained biases as LoRA's bias="lora_only" or "all",
    other trained modules as modules_to_save); each layer's own adapter only (adapters added to a layer's
    bank are not); merged layers, different dropouts and what PEFT can't express are refused with the model
    untouched. vLLM serves neither biases nor modules_to_save (other than classification heads): export
    those for PEFT."""
    peft = _import_peft()
    if not isinstance(adapter_name, str) or not adapter_name:
        raise TypeError(f"to_lora: adapter_name must be a non-empty str, got {adapter_name!r}")
    if dtype is not None:
        _check_factor_dtype("to_lora", dtype)
    layers = vera_layers(model)
    if not layers:
        raise ValueError("to_lora: the model has no VeRA layer (apply_vera first)")
    for name, module in layers:
        if getattr(module, "merged", False):
            raise ValueError(f"to_lora: layer {name!r} is merged; unmerge() first")
    projections = _shared_projections(layers)
    bias, modules_to_save = trained_extras(model, layers, "to_lora")
    config = _lora_config(
        peft, [name for name, _ in layers], [name for name, _ in model.named_modules() if name],
        rank=projections.rank, dropout=_uniform(layers, "dropout"), bias=bias, modules_to_save=modules_to_save,
        fan_in_fan_out=any(getattr(module, "fan_in_fan_out", False) for _, module in layers),
    )
    # Everything that can fail on the numbers (memory) before the model changes.
    factors = {name: layer_factors(module, dtype or torch.float64) for name, module in layers}
    for name, module in layers:
        _replace(model, name, module.to_base() if isinstance(module, FusedVeRALinear) else module.base_layer)
    try:
        peft_model = _wrap(peft, model, config, adapter_name)
        _install_factors(peft_model, adapter_name, factors, dtype)
    except BaseException:
        # As it was: our layers back where PEFT put its LoRA layers (or the bases), the modules PEFT wrapped to
        # save unwrapped.
        for name, module in layers:
            _replace(model, name, module)
        for name in modules_to_save:
            wrapper = model.get_submodule(name)
            if isinstance(wrapper, peft.utils.other.ModulesToSaveWrapper):
                _replace(model, name, wrapper.original_module)
        raise
    return peft_model


# --------------------------------------------------------------------------------------------------
# Adapter files: a model directory's config gives the shapes (the model is built on the meta device: no
# weights are read or allocated); the file gives the lambdas and the seed.


def _meta_model(model_dir, auto_class: str):
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(f"--base needs the transformers package (pip install transformers): {exc}") from None
    factory = getattr(transformers, auto_class, None)
    if factory is None or not hasattr(factory, "from_config"):
        raise ValueError(f"auto_class: transformers has no auto class {auto_class!r} (e.g. AutoModelForCausalLM)")
    try:
        config = transformers.AutoConfig.from_pretrained(os.fspath(model_dir))
    except (OSError, ValueError) as exc:
        raise ValueError(f"base model {os.fspath(model_dir)!r}: no model configuration found ({exc})") from None
    with torch.device("meta"):
        return factory.from_config(config)


def export_adapter_file(adapter_file, model_dir, out_dir, *, dtype: torch.dtype = torch.float32,
                        auto_class: str = "AutoModelForCausalLM", base_model_name_or_path: str | None = None) -> str:
    """Write the exact LoRA directory of an adapter file (``save_adapter``) for the model in ``model_dir`` (a
    Hugging Face model directory, or a hub id transformers can resolve: only its config is read) to
    ``out_dir`` (created; files in it are overwritten) and return ``out_dir``. The factors use the scheme's
    fp32 projections, rounded once to ``dtype``. Every check (the file, its layers against the model's
    modules and sizes, the biases) runs before anything is written. ``base_model_name_or_path`` (default
    ``model_dir``) goes into adapter_config.json."""
    peft = _import_peft()
    _check_factor_dtype("export_adapter_file", dtype)
    adapter_file = os.fspath(adapter_file)
    config, tensors = read_adapter(adapter_file)
    names = _layer_names(adapter_file, tensors)
    model = _meta_model(model_dir, auto_class)
    all_names = [name for name, _ in model.named_modules() if name]
    modules = dict(model.named_modules())
    shapes = {}
    for name in names:
        module = modules.get(name)
        features = None if module is None else _in_out_features(module)
        if features is None:
            what = "no such module" if module is None else f"a {type(module).__name__} without in/out features"
            raise ValueError(f"adapter file {adapter_file!r} does not fit {os.fspath(model_dir)!r}: layer {name!r}: {what}")
        in_features, out_features = features
        if in_features > config["max_in"] or out_features > config["max_out"]:
            raise ValueError(
                f"adapter file {adapter_file!r}: module {name!r} ({in_features} -> {out_features}) is larger than "
                f"the file's max_in={config['max_in']}, max_out={config['max_out']}"
            )
        for key, shape in ((f"{name}.lambda_d", (config["rank"],)), (f"{name}.lambda_b", (out_features,))):
            if tuple(tensors[key].shape) != shape or not tensors[key].dtype.is_floating_point:
                raise ValueError(f"adapter file {adapter_file!r}: {key} is {tuple(tensors[key].shape)} "
                                 f"{tensors[key].dtype}, expected {shape} floating point")
        shapes[name] = features
    # Biases: the file names them as in the adapted model (a wrapped module's own under .base_layer.).
    biases = {}
    for key in (k for k in tensors if _is_bias(k)):
        plain = key
        for name in names:
            plain = plain.replace(f"{name}.base_layer.", f"{name}.")
        try:
            meta = model.get_parameter(plain)
        except AttributeError:
            raise ValueError(f"adapter file {adapter_file!r}: the model has no parameter {key!r}") from None
        if tuple(tensors[key].shape) != tuple(meta.shape):
            raise ValueError(f"adapter file {adapter_file!r}: {key} is {tuple(tensors[key].shape)}, the model's "
                             f"{plain} is {tuple(meta.shape)}")
        biases[plain] = tensors[key]
    # LoRA's bias="lora_only" saves every adapted layer's bias, "all" every bias of the model: the file must
    # hold all of them, as this export reads no weights.
    all_biases = {n for n, _ in model.named_parameters() if _is_bias(n)}
    layer_biases = {f"{name}.bias" for name in names} & all_biases
    bias = "none" if not biases else "layers" if set(biases) == layer_biases else "all"
    if biases and set(biases) != (layer_biases if bias == "layers" else all_biases):
        wanted = layer_biases if set(biases) <= layer_biases else all_biases
        raise ValueError(
            f"adapter file {adapter_file!r} trains some biases but not {sorted(wanted - set(biases))[:3]}: LoRA's "
            f"bias={'lora_only' if wanted is layer_biases else 'all'} saves those too, and this export reads no "
            "weights to take their values from"
        )

    projections = SeededProjections(config["seed"], config["rank"], config["max_in"], config["max_out"],
                                    in_features=max(f[0] for f in shapes.values()),
                                    out_features=max(f[1] for f in shapes.values()))
    A, B = projections.pair(torch.device("cpu"), torch.float32)
    factors = {}
    for name, (in_features, out_features) in shapes.items():
        factors[name] = exact_factors(tensors[f"{name}.lambda_d"], tensors[f"{name}.lambda_b"],
                                      A[:, :in_features], B[:out_features], dtype)
    for plain, value in biases.items():
        owner, _, leaf = plain.rpartition(".")
        setattr(model.get_submodule(owner), leaf, nn.Parameter(value.clone()))
    conv1d = _conv1d_type()
    conv1d = [name for name in names if conv1d is not None and isinstance(modules[name], conv1d)]
    lora_config = _lora_config(
        peft, names, all_names, rank=config["rank"], dropout=config["dropout"], bias=bias, modules_to_save=None,
        fan_in_fan_out=bool(conv1d),
        base_model_name_or_path=base_model_name_or_path if base_model_name_or_path is not None else os.fspath(model_dir),
    )
    peft_model = _wrap(peft, model, lora_config, "default")
    _install_factors(peft_model, "default", factors, dtype)
    out_dir = os.fspath(out_dir)
    peft_model.save_pretrained(out_dir)
    return out_dir


def cached_export(adapter_file, model_dir, cache_dir, *, dtype: torch.dtype = torch.float32) -> str:
    """The exact LoRA directory of ``adapter_file`` for ``model_dir`` under ``cache_dir``, exported on the
    first call and found on the next ones. Its name is a digest of what the export reads (the file's bytes,
    the base model's name and its config.json's bytes when it is a directory, the dtype, the export's format
    and the projection scheme): a changed file or base gets a new directory, never a stale one. The
    directory appears whole (written beside it, then renamed), so concurrent servers share it safely."""
    _check_factor_dtype("cached_export", dtype)
    adapter_file, model_dir, cache_dir = os.fspath(adapter_file), os.fspath(model_dir), os.fspath(cache_dir)
    digest = hashlib.sha256()
    with open(adapter_file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    config_json = os.path.join(model_dir, "config.json")
    base = b""
    if os.path.isfile(config_json):
        with open(config_json, "rb") as f:
            base = f.read()
    for part in (model_dir.encode(), base, str(dtype).encode(), EXPORT_FORMAT.encode(), SCHEME.encode()):
        digest.update(len(part).to_bytes(8, "little") + part)  # length-prefixed: no two inputs collide
    stem = os.path.splitext(os.path.basename(adapter_file))[0]
    final = os.path.join(cache_dir, f"{stem}-{digest.hexdigest()[:24]}")
    if os.path.isdir(final):
        return final
    os.makedirs(cache_dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".export-", dir=cache_dir)
    try:
        export_adapter_file(adapter_file, model_dir, scratch, dtype=dtype)
        try:
            os.rename(scratch, final)
        except OSError:
            if not os.path.isdir(final):  # not a concurrent export's: a real failure
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final
