"""The C++ extension's plan (csrc/vera_ops.cpp), checked on CPU without timing anything: the launches it
makes (counted by bench/plan.py from the profiler, so the description cannot drift from the code), that
no M x out tensor is allocated besides the output (forward) and dx (backward), the roofline estimate of
the target shape against the arithmetic floor, the fp32 sums of the vector gradients in fp16, and the
folded projection (b ⊙ B ⊙ d), made in every call, against in-place updates and optimizers."""

import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("vera_kernels._C")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
from bench import plan  # noqa: E402

import vera_kernels  # noqa: E402
from vera_kernels import verify  # noqa: E402

if not vera_kernels.backends()["cpu"].available:
    pytest.skip(f"backend cpu: {vera_kernels.backends()['cpu'].reason}", allow_module_level=True)


def _cpp_launches():
    names = {}
    for pass_, (prepare, fn) in plan.cpp_passes(plan.PROXY).items():
        if prepare is not None:
            prepare()
        names[pass_] = [e.name for e in plan.trace(fn)]
    return names


def test_launches():
    names = _cpp_launches()
    # Inference: the fold Bdb = b ⊙ B ⊙ d (made in every call: nothing is kept between calls), s = x Aᵀ,
    # y = bias + s Bdbᵀ, y += x W0ᵀ. Training runs the same forward.
    assert names["forward"] == ["vera::fold_projection", "aten::mm", "aten::addmm", "aten::addmm_"]
    assert names["training forward"] == names["forward"]
    # G = gᵀ s, db and dd from it in one kernel, the fold again, d ⊙ dt = g Bdb, dx = (d ⊙ dt) A, dx += g W0
    # (the bias is frozen, as the base layer's).
    assert names["backward"] == ["aten::mm", "vera::lambda_grads", "vera::fold_projection", "aten::mm", "aten::mm",
                                 "aten::addmm_"]


def test_target_shape_estimate_is_within_5_percent_of_the_floor():
    shape = dict(plan.TARGET)
    plans = plan.build_plans(shape)
    floor = plan.floors(shape)
    assert floor["forward"] == 1.125 and floor["forward+backward"] == pytest.approx(1.156, abs=1e-3)
    cpp = plan.ratios(plans)["cpp"]
    for pass_ in ("forward", "forward+backward"):
        assert floor[pass_] <= cpp[pass_] <= 1.05 * floor[pass_], (pass_, cpp[pass_], floor[pass_])
    # The plan's GEMMs do the floor's FLOPs: 2 r (in + out) per token forward, 2 r (in + 2 out) backward.
    m, i, o, r = (shape[k] for k in ("m", "in_features", "out_features", "rank"))
    by_name = {p.name: p for p in plans}
    gemm_flops = {pass_: sum(launch.flops for launch in by_name["cpp"].passes[pass_] if "mm" in launch.name)
                  for pass_ in ("training forward", "backward")}
    assert gemm_flops["training forward"] == 2 * m * i * o + 2 * m * r * (i + o)
    assert gemm_flops["backward"] == 2 * m * i * o + 2 * m * r * (i + 2 * o)


def test_triton_plan_is_traced_from_its_kernels():
    if not plan.triton_on_cpu():
        pytest.skip("the Triton interpreter is off")
    shape = dict(plan.TARGET)
    plans = plan.build_plans(shape)
    triton = next(p for p in plans if p.name == "triton")
    m, i, o, r = (shape[k] for k in ("m", "in_features", "out_features", "rank"))
    assert all(launch.name.startswith("triton::") for pass_ in triton.passes.values() for launch in pass_)
    # Its GEMMs do exactly the floor's FLOPs (counted from the sizes each launch was given), and its
    # roofline estimate is within 5% of the floor, as the C++ plan's.
    assert sum(launch.flops for launch in triton.passes["forward"]) == 2 * m * i * o + 2 * m * r * (i + o)
    assert sum(launch.flops for launch in triton.passes["backward"]) == 2 * m * i * o + 2 * m * r * (i + 2 * o)
    floor = plan.floors(shape)
    ratios = plan.ratios(plans)["triton"]
    for pass_ in ("forward", "forward+backward"):
        assert floor[pass_] <= ratios[pass_] <= 1.05 * floor[pass_], (pass_, ratios[pass_], floor[pass_])


class _Allocations(TorchDispatchMode):
    """Records the shape of every tensor an ATen op returns that owns fresh memory (not a view of an input,
    not an out= or in-place result): the C++ code's at::empty, at::mm, ... calls all pass through here."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(result):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.shapes.append(tuple(t.shape))
        return result


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_no_m_by_out_temporary(dtype):
    m, in_features, out_features, rank = 41, 29, 23, 7  # every size distinct
    p = verify.random_problem(m, in_features, out_features, rank)
    leaves = {k: (v.float() if k.startswith("lambda") else v.to(dtype)).requires_grad_(k in verify.TRAINABLE)
              for k, v in p.items()}
    grad = torch.randn(m, out_features, dtype=dtype)
    big = m * min(in_features, out_features)
    with _Allocations() as forward:
        y = vera_kernels.vera_linear(**leaves, backend="cpu")
    assert [s for s in forward.shapes if torch.Size(s).numel() >= big] == [(m, out_features)], forward.shapes
    with _Allocations() as backward:
        y.backward(grad)
    large = [s for s in backward.shapes if torch.Size(s).numel() >= big]
    if dtype == torch.float32:  # (the CPU twin widens blocks of 16-bit rows of g to fp32 for G = gᵀ s)
        assert large == [(m, in_features)], backward.shapes  # dx alone


def test_wrapped_base_plan():
    # A wrapped (quantized) base: its own output (one GEMM here), then vera_delta: the C++ plan's adapter
    # launches with y = base_out + s Bdbᵀ in its one addmm (base_out read there) instead of the linear form's
    # base GEMM accumulated last (addmm_).
    shape = dict(plan.TARGET)
    plans = {p.name: p for p in plan.build_plans(shape)}
    for pass_ in ("forward", "training forward"):
        wrapped = [launch.name for launch in plans["wrapped"].passes[pass_]]
        linear = [launch.name for launch in plans["cpp"].passes[pass_]]
        assert linear[-1] == "addmm_" and wrapped == ["addmm"] + linear[:-1], (pass_, wrapped, linear)
    m, o = shape["m"], shape["out_features"]
    size = torch.empty(0, dtype=getattr(torch, shape["dtype"])).element_size()
    delta = plans["wrapped"].passes["forward"][-1]  # reads base_out (M x out) once and writes y (M x out) once
    assert delta.bytes_read >= m * o * size and m * o * size <= delta.bytes_written < 1.01 * m * o * size


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_vera_delta_allocates_only_its_output(dtype, backend):
    if backend == "triton" and not plan.triton_on_cpu():
        pytest.skip("the Triton interpreter is off")
    m, in_features, out_features, rank = 41, 29, 23, 7
    p = verify.random_problem(m, in_features, out_features, rank)
    leaves = {k: (v.float() if k.startswith("lambda") else v.to(dtype)).requires_grad_(k in verify.TRAINABLE)
              for k, v in p.items()}
    # (base_out's own gradient is g, handed on as it is; a leaf's .grad would be a copy of it, so none here)
    base_out = torch.randn(m, out_features, dtype=dtype)
    big = m * min(in_features, out_features)
    with _Allocations() as forward:
        y = vera_kernels.vera_delta(leaves["x"], leaves["A"], leaves["B"], leaves["lambda_d"], leaves["lambda_b"],
                                    base_out, backend=backend)
    # y beside base_out: no temporary; not in place (the caller's base_out is left as it was).
    assert [s for s in forward.shapes if torch.Size(s).numel() >= big] == [(m, out_features)], forward.shapes
    grad = torch.randn(m, out_features, dtype=dtype)
    with _Allocations() as backward:
        y.backward(grad)
    if dtype == torch.float32:
        assert [s for s in backward.shapes if torch.Size(s).numel() >= big] == [(m, in_features)], backward.shapes


def test_fp16_vector_gradients_sum_in_fp32():
    # G = gᵀ s sums 8192 rows of s ~ 11: about 9e4, past fp16's 65504. db and dd must stay finite and right.
    m, n, r = 8192, 64, 16
    A, B = vera_kernels.generate_projections(0, r, n, n, dtype=torch.float16)
    torch.manual_seed(0)
    weight = (torch.randn(n, n) / 8).half()
    x = torch.full((m, n), 8.0, dtype=torch.float16)
    d = torch.full((r,), 0.1, requires_grad=True)
    b = (torch.randn(n) * 0.1).requires_grad_(True)
    y = vera_kernels.vera_linear(x, weight, None, A, B, d, b, backend="cpu")
    y.backward(torch.ones_like(y))
    d64, b64 = d.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    y64 = vera_kernels.vera_linear(x.double(), weight.double(), None, A.double(), B.double(), d64, b64, backend="torch")
    y64.backward(torch.ones_like(y64))
    for ours, ref in ((d.grad, d64.grad), (b.grad, b64.grad)):
        assert torch.isfinite(ours).all()
        assert verify.relative_error(ours, ref) < 1e-2


def _layer_outputs(layer, x):
    with torch.no_grad():
        return layer(x)


@pytest.mark.parametrize("update", ["inplace", "sgd_foreach", "adam_fused", "load_state_dict"])
def test_folded_projection_follows_every_update(update):
    torch.manual_seed(0)
    layer = vera_kernels.FusedVeRALinear(24, 20, rank=8, backend="cpu")
    ref = vera_kernels.FusedVeRALinear(24, 20, rank=8, backend="torch")
    with torch.no_grad():
        layer.lambda_b.normal_()
    x = torch.randn(5, 24)
    _layer_outputs(layer, x)
    if update == "inplace":
        with torch.no_grad():
            layer.lambda_d.mul_(3.0)
            layer.lambda_b.add_(1.0)
    elif update == "load_state_dict":
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        state["lambda_b"].normal_()
        layer.load_state_dict(state)
    else:  # a training step: the backward computes db and dd, the optimizer changes the vectors
        optimizer = (torch.optim.SGD(layer.parameters(), lr=0.5, foreach=True) if update == "sgd_foreach"
                     else torch.optim.Adam(layer.parameters(), lr=0.5, fused=True))
        layer(x).square().sum().backward()
        optimizer.step()
    ref.load_state_dict(layer.state_dict())
    got, want = _layer_outputs(layer, x), _layer_outputs(ref, x)
    assert verify.relative_error(got, want) < 1e-5
    # Folded again for the next call: the same bits.
    assert torch.equal(_layer_outputs(layer, x), got)


def test_folded_projection_of_a_new_tensor_at_a_reused_address():
    # A fresh vector each call (as a per-call cast would make) may land where the last one was freed.
    torch.manual_seed(0)
    A, B = vera_kernels.generate_projections(0, 4, 6, 5)
    x, weight = torch.randn(3, 6), torch.randn(5, 6)
    d = torch.randn(4)
    for scale in (1.0, 2.0, 3.0):
        b = torch.full((5,), scale)
        y = vera_kernels.vera_linear(x, weight, None, A, B, d, b, backend="cpu")
        want = vera_kernels.vera_linear(x, weight, None, A, B, d, b, backend="torch")
        assert verify.relative_error(y, want) < 1e-5
        del b


@pytest.mark.parametrize("m, i, o, r, fold", [(1, 29, 23, 7, False), (64, 29, 23, 7, True)])
def test_inference_forward_allocates_its_outputs_and_at_most_one_fold(m, i, o, r, fold):
    # A forward allocates y and s (the op's outputs) and, on the GEMM path, the out x r fold, which it drops
    # when it returns; a small problem (the one-pass kernels, up to 2^15 multiply-adds) its outputs alone:
    # every allocation the CPU allocator sees, with its size, by the profiler.
    from torch.profiler import ProfilerActivity, profile

    p = {k: v.float() for k, v in verify.random_problem(m, i, o, r).items()}

    def forward():
        with torch.no_grad():
            return vera_kernels.vera_linear(**p, backend="cpu")

    forward()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = forward()
    sizes = sorted(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)
    assert sizes == sorted([4 * m * r, 4 * m * o] + ([4 * o * r] if fold else [])), sizes
    assert sum(e.self_cpu_memory_usage for e in prof.events()) == y.untyped_storage().nbytes()
    assert ("vera::small_forward" in {e.name for e in prof.events()}) != fold


def test_proxies_are_past_the_small_problem_bound():
    # The cpp plan is traced through the GEMMs, as the requested sizes run it (csrc/vera_math.h, kSmallWork).
    for proxy in (plan.PROXY, plan.DECODE_PROXY):
        m, i, o, r = (proxy[k] for k in ("m", "in_features", "out_features", "rank"))
        assert m * (i * o + r * (i + o)) > 2**15, proxy


def test_cuda_decode_plan_is_read_from_the_cuda_source():
    # The launches are those decode_adapter_cuda makes (its source, in order), then the base GEMM of the glue.
    assert plan.cuda_decode_launches() == ["decode_shrink_kernel", "decode_shrink_total_kernel", "decode_expand_kernel"]
    shape = dict(plan.TARGET, m=1)
    decode = plan.cuda_decode_plan(shape)
    assert [launch.name for launch in decode.passes["forward"]] == [
        "cuda::decode_shrink_kernel", "cuda::decode_shrink_total_kernel", "cuda::decode_expand_kernel", "addmm_"]
    # H200, r = 256: 32 blocks of 8 rank rows, about two blocks per SM: ceil(264 / 32) = 9 splits of x.
    assert plan.cuda_decode_splits(4096, 256) == 9
    assert plan.cuda_decode_splits(300, 256) == 1  # at least kDecodeMinSplit = 256 columns per split
    # A kernel added to the launcher without a byte model is an error, not a silently missing launch.
    source = plan._cuda_source().replace("decode_expand_kernel<E, V, 1><<<", "decode_extra_kernel<E, V, 1><<<")
    assert "decode_extra_kernel" in plan.cuda_decode_launches(source)
    with pytest.raises(ValueError, match="decode_extra_kernel"):
        plan.cuda_decode_plan(shape, source)


@pytest.mark.parametrize("m", [1, 16])
def test_cuda_decode_plan_reads_each_matrix_once(m):
    shape = dict(plan.TARGET, m=m)
    i, o, r, size = shape["in_features"], shape["out_features"], shape["rank"], 2
    launches = {launch.name: launch for launch in plan.cuda_decode_plan(shape).passes["forward"]}
    # A and B once each (with x, t, the vectors and the bias: small), W once by the base GEMM.
    assert r * i * size <= launches["cuda::decode_shrink_kernel"].bytes_read <= 1.01 * (r * i * size) + m * i * size
    assert o * r * size <= launches["cuda::decode_expand_kernel"].bytes_read <= 1.05 * o * r * size + 4 * m * r
    assert launches["addmm_"].bytes_read >= o * i * size
    assert sum(launch.flops for launch in launches.values()) >= 2 * m * (i * o + r * (i + o))
    # The bench's estimate for the cuda backend's decode forward is this plan's, within the decode target
    # (docs/DESIGN.md section 5: <= 1.3x F.linear at M = 1..16).
    estimate = plan.estimate_seconds("vera-cuda", "forward", m, i, o, r, "bfloat16")
    assert estimate == plan.cuda_decode_plan(shape).seconds("forward")
    base = next(p for p in plan.build_plans(shape) if p.name == "base").seconds("forward")
    assert estimate / base <= 1.3
    with pytest.raises(ValueError, match="1 <= M <= 16"):
        plan.cuda_decode_plan(dict(shape, m=17))


def _compiled_row(kernel, loops, drains=0, store="STG.E.128", programs=132, units=132, waves=1.0):
    pipeline = dict(loops=[dict(start=0, end=1, wgmma=w, mmas=4, wait_depth=d) for w, d in loops], drains=drains,
                    store=store, summary="...")
    return dict(kernel=kernel, sm="sm_90a", config="128x256x64 w8 s3", registers=200, shared=147456, blocks_per_sm=1,
                programs=programs, units=units, waves=waves, pipeline=pipeline, error=None)


def test_kernel_efficiency_model():
    """The estimate's model (docs/DESIGN.md section 4): a pipelined wgmma loop, a drain, an STG epilogue, a
    wait to depth 0, mma.sync and the last wave's idle SMs each scale the peak; no K loop: the peak."""
    full = _compiled_row("k", [(True, 1)], store="TMA")
    assert plan.kernel_efficiency(full) == pytest.approx(plan.WGMMA_PIPELINED)
    drained = _compiled_row("k", [(True, 1), (True, 1)], drains=1)
    assert plan.kernel_efficiency(drained) == pytest.approx(plan.WGMMA_PIPELINED * plan.PER_DRAIN * plan.STG_EPILOGUE)
    assert plan.kernel_efficiency(_compiled_row("k", [(True, 0)], store="TMA")) == pytest.approx(plan.WGMMA_WAIT_ZERO)
    assert plan.kernel_efficiency(_compiled_row("k", [(False, None)])) == pytest.approx(plan.MMA_SYNC)
    assert plan.kernel_efficiency(_compiled_row("k", [(True, 1)], store="TMA", waves=1.45)) == pytest.approx(
        plan.WGMMA_PIPELINED * 1.45 / 2)
    assert plan.kernel_efficiency(_compiled_row("k", [])) == 1.0


def test_compiled_facts_attach_in_launch_order():
    """Each Triton launch takes the compiled row of its kernel in launch order, and runs at its efficiency."""
    launches = [plan.Launch("triton::_rank", [], 1e12, 0, 0), plan.Launch("triton::_sum", [], 0, 1e6, 0),
                plan.Launch("triton::_rank", [], 1e12, 0, 0)]
    p = plan.Plan("triton", {"backward": launches})
    first, second = _compiled_row("_rank", [(True, 0)], store="TMA"), _compiled_row("_rank", [(True, 1)], store="TMA")
    first["pipeline_violations"] = ["wgmma K loop at 0x0 waits to depth 0"]  # the static check's verdicts
    second["pipeline_allowed"] = ["1 drain(s) [b scales the finished rank sum]"]
    at_peak = launches[0].seconds()
    plan.attach_facts(p, {"forward": [], "backward": [first, _compiled_row("_sum", []), second]})
    assert launches[0].efficiency == pytest.approx(plan.WGMMA_WAIT_ZERO)
    assert launches[2].efficiency == pytest.approx(plan.WGMMA_PIPELINED)
    assert launches[1].efficiency == 1.0 and "wgmma" not in launches[1].facts
    assert launches[0].seconds() == pytest.approx(at_peak / plan.WGMMA_WAIT_ZERO)
    assert "est. 35% of peak" in launches[0].facts
    assert "(BREAKS THE RULE: wgmma K loop at 0x0 waits to depth 0)" in launches[0].facts
    assert "(allowed: 1 drain(s) [b scales the finished rank sum])" in launches[2].facts


def test_triton_decode_is_two_launches():
    """Decode (M <= 16): the split shrink reduces its partials in its own launch, then the fused GEMM (b
    scaled in its loop: no fold)."""
    if not plan.triton_on_cpu():
        pytest.skip("the Triton interpreter is off")
    triton = next(p for p in plan.build_plans(dict(plan.TARGET, m=1)) if p.name == "triton")
    assert [launch.name for launch in triton.passes["forward"]] == ["triton::_rank_gemm_kernel",
                                                                     "triton::_fused_gemm_kernel"]
