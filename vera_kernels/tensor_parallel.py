"""Tensor parallelism on PyTorch's own (DTensor) TP: ``VeRAColwiseParallel`` and ``VeRARowwiseParallel``, the
``ParallelStyle``s that put a FusedVeRALinear in a ``parallelize_module`` plan where ``ColwiseParallel`` and
``RowwiseParallel`` put an nn.Linear. They take the stock styles' arguments (``input_layouts``,
``output_layouts``, ``use_local_output``; sequence parallel is ``input_layouts=Shard(1)`` on the colwise
layers and ``output_layouts=Shard(1)`` on the rowwise ones, as with the stock styles) and reuse their input
and output redistributions; what differs is the partition and the forward on each rank's shard.

No projection is stored or sent: each rank generates exactly its slice of A_max / B_max from the seed
(``SeededProjectionShard``), bit-identical to that slice of the full pair.

Column-parallel (W0 split along out): a rank holds rows o0:o1 of W0, the bias, ``lambda_b`` (Shard(0)) and
B_max; A and ``lambda_d`` whole (Replicate). Its output columns are complete; ``lambda_d``'s gradient is a
part on each rank (a sum over the rank's output columns), summed over the ranks by one all-reduce.

Row-parallel (W0 split along in): a rank holds columns i0:i1 of W0 and A; B, ``lambda_d`` and ``lambda_b``
whole (Replicate). ``s = x Aᵀ`` is a part, so the rank's whole output (base GEMM and adapter, the bias on the
first rank only) is a ``Partial`` DTensor, summed by the one reduction the base output needs anyway. Both
lambdas' gradients are parts (each involves the partial s), summed by one all-reduce each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from . import ops
from .layer import FusedVeRALinear
from .projection_sources import SeededProjectionShard, SeededProjections
from .vera_base import _backend_for

# Where each tensor of the layer lives on the TP mesh (W0 is stored out x in).
_PLACEMENTS = {
    "colwise": {"weight": Shard(0), "bias": Shard(0), "lambda_d": Replicate(), "lambda_b": Shard(0)},
    "rowwise": {"weight": Shard(1), "bias": Replicate(), "lambda_d": Replicate(), "lambda_b": Replicate()},
}


class _SumGradientParts(torch.autograd.Function):
    """The local tensor of a Replicate DTensor parameter whose gradient each rank computes only a part of.
    Forward hands out the local tensor; backward sums the parts over the TP mesh (one all-reduce) and returns
    the Replicate gradient the parameter's placement promises (optimizers, clipping and FSDP2 read it as is)."""

    @staticmethod
    def forward(ctx, parameter):
        ctx.mesh, ctx.placements = parameter.device_mesh, parameter.placements
        return parameter.to_local().view_as(parameter.to_local())

    @staticmethod
    def backward(ctx, grad):
        return DTensor.from_local(grad, ctx.mesh, [Partial()], run_check=False).redistribute(ctx.mesh, ctx.placements)


class _TensorParallel:
    """What a parallelized layer knows of its sharding: the mesh, colwise or rowwise, and its shard
    [lo, hi) of out_features (colwise) or in_features (rowwise)."""

    def __init__(self, mesh, kind: str, lo: int, hi: int):
        self.mesh, self.kind, self.lo, self.hi = mesh, kind, lo, hi
        self.first = mesh.get_local_rank() == 0

    def forward(self, layer: FusedVeRALinear, x, adapter_ids):
        if adapter_ids is not None or layer._routed_ids() is not None:
            raise NotImplementedError(
                f"FusedVeRALinear under {self.kind} tensor parallelism serves its own adapter only; the adapter "
                "bank (adapter_ids, set_adapter_ids) is not sharded"
            )
        if not isinstance(x, DTensor):
            raise TypeError(f"a {self.kind}-parallel FusedVeRALinear expects the DTensor its input hook makes, "
                            f"got {type(x).__name__}")
        if layer.merged:
            if layer.training and torch.is_grad_enabled():
                raise RuntimeError(
                    "FusedVeRALinear is merged: lambda_d/lambda_b would get no gradient; call unmerge() before training"
                )
            return F.linear(x, layer.weight, layer.bias)  # plain DTensor math, as the stock styles do
        colwise = self.kind == "colwise"
        # Colwise: x is replicated and this rank's columns give only a part of its gradient; the input's
        # redistribution (the stock style's hook) sums the parts.
        x_local = x.to_local(grad_placements=[Partial()] if colwise else None)
        d = _SumGradientParts.apply(layer.lambda_d)
        b = layer.lambda_b.to_local() if colwise else _SumGradientParts.apply(layer.lambda_b)
        bias = self._local_bias(layer.bias)
        y = layer._autocast(self._local_forward, x_local, layer.weight.to_local(), bias, layer, d, b)
        if colwise:
            shape = (*y.shape[:-1], layer.out_features)
            placements = [Shard(y.dim() - 1)]
        else:
            shape, placements = y.shape, [Partial()]
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(y, self.mesh, placements, run_check=False, shape=shape, stride=stride)

    def _local_bias(self, bias):
        if bias is None or self.kind == "colwise":
            return None if bias is None else bias.to_local()
        # Rowwise: the ranks' outputs are summed, so the bias joins on the first rank only. A trained bias
        # still takes part on every rank (times 0) so that every rank joins its gradient's all-reduce.
        if bias.requires_grad:
            local = _SumGradientParts.apply(bias)
            return local if self.first else local * 0
        return bias.to_local() if self.first else None

    @staticmethod
    def _local_forward(x, weight, bias, layer, d, b):
        A, B = layer.projections.pair(x.device, x.dtype)
        backend = _backend_for(layer.backend, x.dtype)
        if layer.dropout and layer.training:
            # As FusedVeRALinear: the adapter sees dropout(x) (a mask drawn on each rank), the base sees x.
            base_out = F.linear(x, weight, bias)
            return ops.vera_delta(F.dropout(x, layer.dropout, training=True), A, B, d, b, base_out, backend=backend)
        return ops.vera_linear(x, weight, bias, A, B, d, b, backend=backend)

    @torch.no_grad()
    def delta_weight(self, layer: FusedVeRALinear, lambdas=None) -> DTensor:
        """This rank's shard of ΔW = (b ⊙ B)(d ⊙ A) (rows o0:o1 colwise, columns i0:i1 rowwise), placed as the
        weight, so merge()/unmerge() update each shard in place without communication. ``lambdas``: (lambda_d,
        lambda_b) to take instead of the layer's (the copy merge() kept)."""
        weight = layer.weight
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        A, B = layer.projections.pair(weight.to_local().device, weight.dtype)
        d, b = lambdas if lambdas is not None else (layer.lambda_d, layer.lambda_b)
        d, b = d.to_local(), b.to_local()
        local = (b.to(acc)[:, None] * B.to(acc)) @ (d.to(acc)[:, None] * A.to(acc))
        return DTensor.from_local(local, self.mesh, weight.placements, run_check=False, shape=weight.shape,
                                  stride=weight.stride())


def _shard_range(size: int, mesh, what: str, name: str) -> tuple[int, int]:
    """[lo, hi) of this rank's Shard of a dimension of ``size``: torch.chunk's split, as DTensor's Shard."""
    world = mesh.size()
    chunk = -(-size // world)
    if (world - 1) * chunk >= size:
        raise ValueError(f"{name}: {what}={size} can't be split over a mesh of {world} ranks: the last rank's "
                         "shard would be empty")
    lo = min(mesh.get_local_rank() * chunk, size)
    return lo, min(lo + chunk, size)


class _VeRAParallelStyle:
    """The partition shared by the two styles (mixed in before the stock style, whose hooks are reused)."""

    kind: str

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        name = type(self).__name__
        if not isinstance(module, FusedVeRALinear):
            raise NotImplementedError(
                f"{name} parallelizes FusedVeRALinear; got {type(module).__name__} (VeRAWrapper's base is not a "
                "dense weight it can shard; put nn.Linear layers under the stock styles)"
            )
        if device_mesh.ndim != 1:
            raise ValueError(f"{name}: expected a 1-D TP mesh, got {device_mesh.ndim}-D (pass mesh['tp'])")
        if module._tensor_parallel is not None:
            raise ValueError(f"{name}: the layer is already tensor-parallel")
        if module.merged:
            raise ValueError(f"{name}: the layer is merged; unmerge() it before parallelizing")
        if module.fan_in_fan_out:
            raise NotImplementedError(f"{name}: GPT-2 Conv1D layers (fan_in_fan_out) are not supported")
        if module.adapters:
            raise NotImplementedError(f"{name}: the layer's adapter bank ({module.adapters}) is not sharded")
        source = module.projections
        if type(source) is not SeededProjections:
            raise NotImplementedError(
                f"{name}: each rank generates its slice of a seeded pair; the layer uses {source.describe()}")
        dim_name = "out_features" if self.kind == "colwise" else "in_features"
        lo, hi = _shard_range(getattr(module, dim_name), device_mesh, dim_name, name)
        for param_name, placement in _PLACEMENTS[self.kind].items():
            param = module._parameters.get(param_name)
            if param is not None:
                sharded = distribute_tensor(param.detach(), device_mesh, [placement], src_data_rank=self.src_data_rank)
                module.register_parameter(param_name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        split = module.weight.to_local().shape[0 if self.kind == "colwise" else 1]
        if split != hi - lo:
            raise RuntimeError(f"{name}: DTensor gave this rank {split} of {dim_name}, expected [{lo}, {hi})")
        if self.kind == "colwise":
            widths = dict(in_offset=0, in_features=module.in_features, out_offset=lo, out_features=hi - lo)
        else:
            widths = dict(in_offset=lo, in_features=hi - lo, out_offset=0, out_features=module.out_features)
        module.projections = SeededProjectionShard(source.seed, source.rank, source.max_in, source.max_out, **widths)
        module._tensor_parallel = _TensorParallel(device_mesh, self.kind, lo, hi)
        module._plans.clear()
        module._prepare_for_device()  # generates the rank's slice, unless the layer is on the meta device
        prepare_input = self._prepare_input_fn
        input_layouts, desired = self.input_layouts, self.desired_input_layouts
        module.register_forward_pre_hook(
            lambda mod, inputs: (prepare_input(input_layouts, desired, mod, inputs, device_mesh), *inputs[1:]))
        prepare_output, output_layouts, use_local = self._prepare_output_fn, self.output_layouts, self.use_local_output
        module.register_forward_hook(
            lambda mod, inputs, outputs: prepare_output(output_layouts, use_local, mod, outputs, device_mesh))
        return module


class VeRAColwiseParallel(_VeRAParallelStyle, ColwiseParallel):
    """``ColwiseParallel`` for FusedVeRALinear: W0, the bias and ``lambda_b`` split along out (Shard(0)),
    ``lambda_d`` replicated; each rank generates rows o0:o1 of B and the whole A. Arguments as
    ``ColwiseParallel`` (input_layouts, default Replicate; output_layouts, default Shard(-1);
    use_local_output)."""

    kind = "colwise"


class VeRARowwiseParallel(_VeRAParallelStyle, RowwiseParallel):
    """``RowwiseParallel`` for FusedVeRALinear: W0 split along in (Shard(1)), bias and lambdas replicated;
    each rank generates columns i0:i1 of A and the whole B. Its output (base and adapter) is one Partial sum.
    Arguments as ``RowwiseParallel`` (input_layouts, default Shard(-1); output_layouts, default Replicate;
    use_local_output)."""

    kind = "rowwise"

    def _apply(self, module, device_mesh):
        self.desired_input_layouts = (Shard(-1),)  # what the stock style sets for nn.Linear
        return super()._apply(module, device_mesh)
