"""Put VeRA into any model (apply_vera) and move between this package and Hugging Face PEFT (from_peft, to_peft).

apply_vera matches module names as PEFT does: a list entry matches a module whose qualified name equals it or
ends with "." + it; a single string is a regular expression that must match the whole qualified name.
"""

from __future__ import annotations

import re
import sys

import torch
from torch import nn

from .layer import VERA_LAYERS, FusedVeRALinear, VeRAWrapper, _conv1d_type, _tied_message, refuse_loads_into_merged_layers
from .projection_sources import ExplicitProjections, SeededProjections
from .routing import RoutingBlock, routing_ids
from .vera_base import _check_base_dtype
from .projections import check_positive_int
from .quantized import _conv1d_type, model_quantization_config
from .quantized import fusable as _fusable

BIAS_OPTIONS = ("none", "vera_only", "all")


def _matches(target_modules, name: str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def _in_out_features(module: nn.Module) -> tuple[int, int] | None:
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return module.weight.shape[0], module.weight.shape[1]
    in_features, out_features = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(in_features, int) and isinstance(out_features, int):
        return in_features, out_features
    return None


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def vera_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every FusedVeRALinear and VeRAWrapper of the model with its qualified name."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, VERA_LAYERS)]


def set_adapter_ids(model: nn.Module, ids) -> None:
    """Route the model's next batches: row (2-D inputs) or sequence (3-D inputs) m of every VeRA layer's input
    uses adapter ids[m] of that layer's bank; -1 or None: the base model. ids: an int64 tensor, or a sequence
    (or iterator, read once) of indices, names and None (names are looked up per layer, now); a dict or a
    set is refused (no row order). ``None`` clears the routing (each layer's own adapter again). Every id is
    checked here, before any layer changes, and the routing keeps its own copy of what was checked (a
    tensor's values are read back once, here: the forward never synchronizes, and a later edit of the
    caller's tensor changes nothing). Routing again with as many ids writes them into the tensor the layers
    already route by, so a captured CUDA graph replays with the new ids. This routing is the model's
    default, shared by every thread; :func:`adapter_ids` routes one thread's block. Removing an adapter
    from a layer makes the routings made before it stale: the next forward raises until the model is
    routed again."""
    layers = vera_layers(model)
    if not layers:
        raise ValueError("set_adapter_ids: the model has no VeRA layer")
    ids = routing_ids(ids)
    resolved = [(module, module.make_routing(ids)) for _, module in layers]
    for module, routing in resolved:
        current = module._routing
        if (routing.ids is not None and current is not None and current.ids is not None
                and current.ids.shape == routing.ids.shape and current.ids.device == routing.ids.device):
            current.ids.copy_(routing.ids)
            routing = routing._replace(ids=current.ids)
        module._routing = routing


def _compiled_module(model: nn.Module) -> str | None:
    """The name of a module of ``model`` (itself: "") that runs compiled: torch.compile(module) (an
    OptimizedModule) or module.compile() (nn.Module's in-place compile, which sets _compiled_call_impl)."""
    optimized = torch._dynamo.eval_frame.OptimizedModule if "torch._dynamo" in sys.modules else ()
    for name, module in model.named_modules():
        if isinstance(module, optimized) or getattr(module, "_compiled_call_impl", None) is not None:
            return name
    return None


def adapter_ids(model: nn.Module, ids):
    """``with vera_kernels.adapter_ids(model, ids): model(x)``: route the block's forwards as set_adapter_ids
    would, for this thread (and asyncio task) only: other threads serving through the same model keep their
    own routing. Blocks nest (the inner one routes the layers it names). A generator that yields inside its
    block keeps its routing: each call is routed by the block entered nearest to it on its own call stack
    (two generators, each in its own block, interleaved, each serve their own adapters). A block entered in
    a generator that is suspended inside it (a context manager wrapping this one, or a generator the caller
    is consuming) routes the caller's calls as if the caller had entered it there: among the blocks entered
    from the same frame, the latest wins.

    Eager only: torch.compile cannot trace per-thread state, so a model that is compiled or holds a compiled
    module (``torch.compile(model)``, ``model.compile()``) is refused; route it with set_adapter_ids, or
    pass adapter_ids to the layers. Only the model given and its submodules are checked: call the model you
    passed, not a compiled module around it."""
    compiled = _compiled_module(model)
    if compiled is not None:
        where = "the model" if compiled == "" else f"its module {compiled!r}"
        raise TypeError(
            f"adapter_ids: {where} is compiled (torch.compile or Module.compile), and compiled code cannot see "
            "per-thread routing; use vera_kernels.set_adapter_ids")
    layers = vera_layers(model)
    if not layers:
        raise ValueError("adapter_ids: the model has no VeRA layer")
    ids = routing_ids(ids, "adapter_ids")
    return RoutingBlock({module: module.make_routing(ids, "adapter_ids") for _, module in layers}, model)


def _ties(model: nn.Module, layer_name: str, layer: nn.Module) -> list[str]:
    """The name of every parameter outside ``layer`` that is its weight, or a view of the
    same memory (tied weights: GPT-2's lm_head and wte), so that merging ΔW into it would change that module
    too."""
    weight = layer.weight
    start = weight.data_ptr() if weight.device.type != "meta" and weight.numel() else None
    found = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        if module is layer or module_name == layer_name or module_name.startswith(layer_name + "."):
            continue
        for attribute, parameter in module._parameters.items():
            if parameter is None:
                continue
            shares = parameter is weight or (
                start is not None and parameter.device == weight.device and parameter.numel() > 0
                and parameter.data_ptr() == start)
            if shares:
                found.append(f"{module_name}.{attribute}" if module_name else attribute)
    return found


def find_targets(model: nn.Module, target_modules) -> list[tuple[str, nn.Module, tuple[int, int]]]:
    """(name, module, (in, out)) of every module apply_vera would adapt; errors name what is wrong."""
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"target_modules: {target_modules!r} is not a valid regular expression ({exc})") from None
    elif not (isinstance(target_modules, (list, tuple, set)) and target_modules
              and all(isinstance(t, str) for t in target_modules)):
        raise TypeError(f"target_modules: expected a regular expression or a non-empty list of names, got {target_modules!r}")
    targets = []
    for name, module in model.named_modules():
        if not name or not _matches(target_modules, name):
            continue
        if isinstance(module, VERA_LAYERS):
            raise ValueError(f"module {name!r} already has a VeRA adapter")
        features = _in_out_features(module)
        if features is None:
            raise TypeError(
                f"target_modules {target_modules!r} matched {name!r}, a {type(module).__name__} without integer "
                "in_features/out_features: VeRA adapts linear maps (nn.Linear, Conv1D, or modules that declare them)"
            )
        targets.append((name, module, features))
    if not targets:
        some = [name for name, _ in model.named_modules() if name][:8]
        raise ValueError(
            f"target_modules {target_modules!r} matched no module of {type(model).__name__} "
            f"(module names look like: {', '.join(some)})"
        )
    return targets


def apply_vera(
    model: nn.Module,
    target_modules,
    rank: int = 256,
    seed: int = 0,
    d_initial: float = 0.1,
    dropout: float = 0.0,
    backend: str = "auto",
    *,
    bias: str = "none",
    projections=None,
    quantization_config=None,
) -> nn.Module:
    """Adapt every matching module of ``model`` in place and return the model.

    nn.Linear and GPT-2's Conv1D with a plain dense weight become FusedVeRALinear (sharing their weight
    Parameters); every other matching module with in_features/out_features (a quantized layer: bitsandbytes,
    torchao, HQQ, GPTQ...; a tensor-subclass weight; a custom module) is wrapped in VeRAWrapper, whose base
    runs its own forward (``vera_kernels.quantized``). One projection pair sized to the largest in/out of the
    targets serves every layer. Everything else is frozen. ``bias`` follows PEFT: "none" (frozen),
    "vera_only" (the adapted layers' biases train), "all" (every bias of the model trains). ``projections``
    (an ExplicitProjections) replaces the seeded pair, e.g. to use PEFT's. ``quantization_config``: the
    torchao config the model was quantized with, which ``merge()`` re-quantizes torchao bases with (default:
    the one a transformers model quantized through TorchAoConfig records).
    """
    check_positive_int("rank", rank)
    if bias not in BIAS_OPTIONS:
        raise ValueError(f"bias must be one of {', '.join(BIAS_OPTIONS)}; got {bias!r}")
    targets = find_targets(model, target_modules)
    if quantization_config is None:
        quantization_config = model_quantization_config(model)
    max_in = max(features[0] for _, _, features in targets)
    max_out = max(features[1] for _, _, features in targets)
    if projections is None:
        projections = SeededProjections(seed, rank, max_in, max_out)
    common = dict(rank=rank, d_initial=d_initial, dropout=dropout, backend=backend, projections=projections)
    # Check every base and build every new layer before changing any, so a failure leaves the model as it
    # was: from_linear and VeRAWrapper freeze the base they take, so a failure in a later layer (generating
    # the projections, say) puts the flags back.
    for _, module, _ in targets:
        if _fusable(module):
            _check_base_dtype(module.weight.dtype, backend)
    trainable = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    new_layers = []
    try:
        for name, module, (in_features, out_features) in targets:
            if _fusable(module):
                layer = FusedVeRALinear.from_linear(module, train_bias=bias == "vera_only", **common)
            else:
                layer = VeRAWrapper(module, in_features=in_features, out_features=out_features,
                                    quantization_config=quantization_config, **common)
            new_layers.append((name, layer))
    except BaseException:
        for parameter, flag in trainable:
            parameter.requires_grad_(flag)
        raise
    model.requires_grad_(False)
    for name, layer in new_layers:
        _replace(model, name, layer)
    for name, layer in new_layers:
        tied = _ties(model, name, layer) if isinstance(layer, FusedVeRALinear) else ()
        if tied:
            # For merge() to refuse while the layer holds this weight (merge_and_unload looks at the model again).
            layer._tied = (tuple(tied), layer.weight)
        layer.lambda_d.requires_grad_(True)
        layer.lambda_b.requires_grad_(True)
        if bias == "vera_only" and getattr(layer, "bias", None) is not None:
            layer.bias.requires_grad_(True)
    if bias == "all":
        for name, parameter in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                parameter.requires_grad_(True)
    # The whole model's load_state_dict refuses a merged layer before any module is loaded (the layer's own
    # check runs only when the load reaches it).
    hooks = [getattr(hook, "hook", hook) for hook in model._load_state_dict_pre_hooks.values()]
    if refuse_loads_into_merged_layers not in hooks:
        model.register_load_state_dict_pre_hook(refuse_loads_into_merged_layers)
    return model


# --------------------------------------------------------------------------------------------------
# PEFT interoperability. peft is optional: imported only here.


def _import_peft():
    try:
        import peft
        from peft.tuners.vera.layer import Linear as PeftVeraLinear
    except ImportError as exc:
        raise ImportError(f"from_peft/to_peft need the peft package (pip install peft): {exc}") from None
    return peft, PeftVeraLinear


def from_peft(peft_model) -> nn.Module:
    """Swap every PEFT VeRA layer of ``peft_model`` (a PeftModel with one active VeRA adapter) for a
    FusedVeRALinear (VeRAWrapper for a base that can't be fused) using PEFT's own projections, its
    lambda Parameters (the same objects) and its base weights. Returns the underlying base model, changed
    in place; its outputs and gradients are PEFT's."""
    _, PeftVeraLinear = _import_peft()
    adapters = list(peft_model.active_adapters)
    if len(adapters) != 1:
        raise ValueError(f"from_peft: expected one active VeRA adapter, got {adapters}")
    adapter = adapters[0]
    config = peft_model.peft_config[adapter]
    if getattr(config, "peft_type", None) is None or config.peft_type.value != "VERA":
        raise ValueError(f"from_peft: adapter {adapter!r} is {config.peft_type}, not VeRA")
    base_model = peft_model.get_base_model()
    layers = [(name, module) for name, module in base_model.named_modules() if isinstance(module, PeftVeraLinear)]
    if not layers:
        raise ValueError("from_peft: the model has no PEFT VeRA layer")
    # The pair lives in the tuner (vera_A/vera_B BufferDicts, shared by every layer). With save_projection=False
    # PEFT regenerated it from projection_prng_key with torch's CPU generator when it built the model.
    first = layers[0][1]
    projections = ExplicitProjections(first.vera_A[adapter], first.vera_B[adapter], prng_key=config.projection_prng_key)
    new_layers = []
    for name, module in layers:
        if module.merged:
            raise ValueError(f"from_peft: layer {name!r} is merged; call peft_model.unmerge_adapter() first")
        base = module.get_base_layer()
        common = dict(rank=config.r, d_initial=config.d_initial, dropout=config.vera_dropout, projections=projections)
        if _fusable(base):
            layer = FusedVeRALinear.from_linear(base, train_bias=config.bias != "none", **common)
        else:
            # PEFT's torchao backend holds the config it re-quantizes with: ours merges with the same one.
            get_config = getattr(getattr(module, "quantization_backend", None), "get_apply_tensor_subclass", None)
            quantization_config = get_config() if callable(get_config) else model_quantization_config(base_model)
            layer = VeRAWrapper(base, in_features=module.in_features, out_features=module.out_features,
                                quantization_config=quantization_config, **common)
        # The very Parameters PEFT trained (and an optimizer may hold): no copy.
        layer.lambda_d = module.vera_lambda_d[adapter]
        layer.lambda_b = module.vera_lambda_b[adapter]
        new_layers.append((name, layer))
    for name, layer in new_layers:
        _replace(base_model, name, layer)
    return base_model


def _shared_projections(layers):
    sources = {module.projections.key(): module.projections for _, module in layers}
    if len(sources) != 1:
        raise ValueError("the model's VeRA layers use different projection pairs; one shared pair is expected")
    return next(iter(sources.values()))


def _uniform(layers, attribute: str):
    values = {getattr(module, attribute) for _, module in layers}
    if len(values) != 1:
        raise ValueError(f"the model's VeRA layers have different {attribute} values {sorted(values)}; expected one")
    return values.pop()


def _trained_outside_layers(model: nn.Module, layers) -> tuple[list[str], list[str]]:
    """(trained biases outside the VeRA layers, modules with other trained parameters): what a PEFT export
    must carry besides the lambdas (bias="all", modules_to_save)."""
    layer_names = {name for name, _ in layers}
    trained = [(name.rpartition("."), name) for name, p in model.named_parameters() if p.requires_grad]
    trained = [(owner, leaf, name) for (owner, _, leaf), name in trained
               if not (owner in layer_names and leaf in ("lambda_d", "lambda_b", "bias"))]
    modules = list(dict.fromkeys(owner for owner, leaf, _ in trained if leaf != "bias"))
    # A trained bias of a module saved whole travels with it.
    biases = [name for owner, leaf, name in trained if leaf == "bias" and owner not in modules]
    return biases, modules


def trained_extras(model: nn.Module, layers, caller: str) -> tuple[str, list[str]]:
    """What a PEFT export must carry besides each layer's adapter: which biases train ("none"; "layers": only
    the adapted layers' own, PEFT's "vera_only"/"lora_only"; "all": others too, PEFT's "all") and the other
    trained modules (PEFT's modules_to_save). Raises, naming ``caller``, for what PEFT can't express."""
    trains_bias = any(getattr(module, "bias", None) is not None and module.bias.requires_grad for _, module in layers)
    other_biases, other_modules = _trained_outside_layers(model, layers)
    if "" in other_modules:
        raise ValueError(f"{caller}: the model's own (top-level) parameters train; PEFT can only save submodules")
    # PEFT picks modules_to_save by how names end, without a dot boundary: each must name one module.
    all_names = [name for name, _ in model.named_modules() if name]
    for wanted in other_modules:
        matching = [name for name in all_names if name.endswith(wanted)]
        if matching != [wanted]:
            raise ValueError(
                f"{caller}: trained module {wanted!r} can't be exported: PEFT's modules_to_save would match "
                f"{matching} (names ending with it)"
            )
    return ("all" if other_biases else "layers" if trains_bias else "none"), other_modules


def to_peft(model: nn.Module, adapter_name: str = "default"):
    """A PEFT VeRA model with this model's adapters: the VeRA layers are replaced in place by their bases and
    ``peft.get_peft_model`` wraps the model with a VeraConfig (save_projection=True) whose vera_A/vera_B are
    our projections and whose lambdas are ours. Its outputs equal ours; ``save_pretrained`` writes a
    checkpoint that ``PeftModel.from_pretrained`` loads anywhere.

    Every trained tensor is exported: the lambdas, trained biases (PEFT's bias="vera_only", or "all" when a
    bias outside the VeRA layers trains) and any other trained module (PEFT's modules_to_save). Everything is
    checked before the model changes; what PEFT can't express is refused with the model untouched."""
    peft, PeftVeraLinear = _import_peft()
    layers = vera_layers(model)
    if not layers:
        raise ValueError("to_peft: the model has no VeRA layer (apply_vera first)")
    projections = _shared_projections(layers)
    for name, module in layers:
        if getattr(module, "merged", False):
            raise ValueError(f"to_peft: layer {name!r} is merged; unmerge() first")
    if not isinstance(adapter_name, str) or not adapter_name:
        raise TypeError(f"to_peft: adapter_name must be a non-empty str, got {adapter_name!r}")
    trained_biases, other_modules = trained_extras(model, layers, "to_peft")
    config = peft.VeraConfig(
        r=projections.rank,
        # A full-match regular expression of exactly our layers: a list would also adapt every module whose
        # name ends with one of them (a layer "fc" would adapt "other.fc" too).
        target_modules="|".join(re.escape(name) for name, _ in layers),
        # Only used by PEFT to regenerate a pair that isn't saved; ours always is. Keep PEFT's key if it was its pair.
        projection_prng_key=getattr(projections, "prng_key", None) or 0,
        save_projection=True,  # our pair is not PEFT's generator's: the checkpoint must carry it
        vera_dropout=_uniform(layers, "dropout"),
        d_initial=_uniform(layers, "d_initial"),
        fan_in_fan_out=any(getattr(module, "fan_in_fan_out", False) for _, module in layers),
        bias={"layers": "vera_only"}.get(trained_biases, trained_biases),
        modules_to_save=other_modules or None,
    )
    lambdas = {name: (module.lambda_d.detach(), module.lambda_b.detach()) for name, module in layers}
    pair = projections.pair(torch.device("cpu"), torch.float32)
    for name, module in layers:
        _replace(model, name, module.to_base() if isinstance(module, FusedVeRALinear) else module.base_layer)
    try:
        peft_model = peft.get_peft_model(model, config, adapter_name=adapter_name)
    except BaseException:
        for name, module in layers:  # as it was
            _replace(model, name, module)
        raise
    with torch.no_grad():
        tuner = peft_model.base_model
        for buffers, ours in ((tuner.vera_A, pair[0]), (tuner.vera_B, pair[1])):
            theirs = buffers[adapter_name]
            theirs.copy_(ours[: theirs.shape[0], : theirs.shape[1]])
        for name, module in peft_model.get_base_model().named_modules():
            if isinstance(module, PeftVeraLinear):
                lambda_d, lambda_b = lambdas[name]
                module.vera_lambda_d[adapter_name].copy_(lambda_d)
                module.vera_lambda_b[adapter_name].copy_(lambda_b)
    return peft_model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain base modules back: returns ``model``, changed
    in place, with an ``nn.Linear`` (or GPT-2 ``Conv1D``) wherever a FusedVeRALinear was, holding the merged
    weight W0 + ΔW and the same bias Parameter, and the base module itself (its own type: bitsandbytes'
    Linear4bit, HQQLinear, a torchao-quantized nn.Linear) wherever a VeRAWrapper was, its weight merged by
    dequantizing, adding ΔW in fp32 and quantizing again (``VeRAWrapper.merge``). The result needs nothing
    from this package: it runs, saves and loads as the original architecture.

    Only each layer's own adapter (lambda_d, lambda_b) is merged; adapters added to a layer's bank for
    batched serving are dropped. A layer already merged (``merge()``) keeps its weight as it is. The merge
    is one rounding of W0 + ΔW to the weight's dtype: the outputs equal the unmerged layer's to fp32 rounding
    in fp32, but in bf16/fp16 they differ by about one ulp of the weight (not bit-exact), as any merge does;
    a quantized base is rounded to its format's grid (one quantization step per weight). A model with a
    wrapped base that can't be re-quantized (GPTQ, AWQ, an unknown layer) is refused before anything changes.
    Parameters keep their requires_grad flags (the base weights stay frozen).
    """
    layers = vera_layers(model)
    if not layers:
        raise ValueError("merge_and_unload: the model has no VeRA layer (apply_vera first)")
    for name, module in layers:
        if isinstance(module, VeRAWrapper) and not module.merged:
            try:
                module.check_mergeable()
            except TypeError as exc:
                raise TypeError(f"merge_and_unload: layer {name!r}: {exc}") from None
    for name, layer in layers:
        if isinstance(layer, FusedVeRALinear):
            tied = _ties(model, name, layer)
            if tied and not layer.merged:
                raise ValueError(_tied_message("merge_and_unload", f"VeRA layer {name!r}", tied))
    for name, layer in layers:
        if isinstance(layer, VeRAWrapper):
            if not layer.merged:
                layer.merge()
            base = layer.base_layer
        elif layer.merged:
            # The weight already holds W0 + ΔW; to_base() refuses merged layers to protect W0, which is not
            # wanted here, so it is asked for the unmerged view of the same Parameters.
            layer.merged = False
            try:
                base = layer.to_base()
            finally:
                layer.merged = True
        else:
            base = layer.to_base()  # shares the weight Parameter: the merge below lands in it
            layer.merge()
        _replace(model, name, base)
    return model
