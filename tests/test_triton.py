"""Triton-specific checks of the fused kernels; generic correctness against float64 (y, dx, dd, db, dbias,
vera_delta on odd shapes and every dtype) comes from test_backend_ops.py.

Here: what autograd saves, the two projection modes give the same bits, strided inputs, determinism,
large ranks, pinned configs, torch.compile, and the static check of the compiled kernels (SASS)."""

import pytest
import torch

from vera_kernels import generate_projections, verify
from vera_kernels.ops import vera_delta, vera_linear

from conftest import DEVICE, backend_params

pytestmark = pytest.mark.parametrize("backend", backend_params("triton"))
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _problem(m, in_features, out_features, rank, dtype, *, seed=0, batch=None):
    problem = verify.random_problem(m, in_features, out_features, rank, seed=seed, batch=batch)
    return {k: (v.float() if k.startswith("lambda") else v.to(dtype)).to(DEVICE) for k, v in problem.items()}


def _run(fn, inputs, grad, **kwargs):
    """Outputs and gradients of one forward and backward, on fresh leaves."""
    leaves = {k: v.detach().clone().requires_grad_(k in verify.TRAINABLE) for k, v in inputs.items()}
    y = fn(**leaves, **kwargs)
    y.backward(grad)
    return [y.detach()] + [leaves[k].grad for k in verify.TRAINABLE if k in leaves]


def _bits_equal(a, b):
    return all(torch.equal(verify.bits_of(x.cpu()), verify.bits_of(y.cpu())) for x, y in zip(a, b, strict=True))


@pytest.fixture
def pinned():
    """Pins every kernel's config for the test and unpins after, so that two calls whose autotune keys
    differ (e.g. the two projection modes) still use the same tiles and summation order."""
    from vera_kernels.triton import autotune, pin_config

    pin_config("rank", dict(BLOCK_M=32, BLOCK_R=16, BLOCK_K=16))
    pin_config("gemm", dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=2))
    pin_config("sum", dict(BLOCK_P=4, BLOCK_N=32))
    yield
    for kernel in autotune.KERNELS:
        pin_config(kernel, None)


def test_saves_only_s(backend):
    # Sizes chosen so that M x r differs from every parameter's size and from M x in, M x out.
    m, in_features, out_features, rank = 37, 40, 130, 17
    inputs = _problem(m, in_features, out_features, rank, torch.bfloat16)
    leaves = {k: v.requires_grad_(k in verify.TRAINABLE) for k, v in inputs.items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = vera_linear(**leaves, backend=backend)
    parameters = {leaves[k].data_ptr() for k in ("weight", "A", "B", "lambda_d", "lambda_b")}
    activations = [t for t in saved if t.data_ptr() not in parameters]
    assert saved, "nothing went through the hooks: the test would pass vacuously"
    assert not [t.shape for t in saved if t.numel() in (m * out_features, m * in_features)]
    assert [tuple(t.shape) for t in activations] == [(m, rank)]
    assert sum(t.numel() * t.element_size() for t in activations) == m * rank * 2
    y.backward(torch.randn_like(y))
    assert all(torch.isfinite(leaves[k].grad).all() for k in verify.TRAINABLE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_projection_modes_equal(backend, dtype, pinned):
    from vera_kernels.triton import vera_delta_on_the_fly, vera_linear_on_the_fly

    m, in_features, out_features, rank, max_in, seed = 19, 40, 70, 17, 52, 2**62 + 3
    inputs = _problem(m, in_features, out_features, rank, dtype, batch=2)
    A_max, B_max = generate_projections(seed, rank, max_in, out_features + 9, dtype=dtype, device=DEVICE)
    inputs["A"], inputs["B"] = A_max[:, :in_features], B_max[:out_features]
    grad = torch.randn(2, m, out_features, device=DEVICE).to(dtype)
    materialized = _run(vera_linear, inputs, grad, backend=backend)
    generated = {k: v for k, v in inputs.items() if k not in ("A", "B")}
    on_the_fly = _run(vera_linear_on_the_fly, generated, grad, seed=seed, max_in=max_in)
    assert _bits_equal(materialized, on_the_fly)
    # The modes agree, and both are right: against float64 on the same inputs.
    exact = _run(vera_linear, {k: v.double() for k, v in inputs.items()}, grad.double(), backend="torch")
    for got, want in zip(on_the_fly, exact):
        assert verify.relative_error(got, want) < verify.OP_TOLERANCE[dtype]

    base = torch.randn(2, m, out_features, device=DEVICE).to(dtype)
    args = (inputs["x"], inputs["A"], inputs["B"], inputs["lambda_d"], inputs["lambda_b"], base)
    want = vera_delta(*args, backend=backend)
    got = vera_delta_on_the_fly(inputs["x"], inputs["lambda_d"], inputs["lambda_b"], base, seed=seed, max_in=max_in)
    assert _bits_equal([want], [got])


def test_on_the_fly_argument_checks(backend):
    from vera_kernels.triton import vera_linear_on_the_fly

    inputs = _problem(3, 40, 30, 8, torch.float32)
    del inputs["A"], inputs["B"]
    with pytest.raises(ValueError, match="max_in"):
        vera_linear_on_the_fly(**inputs, seed=0, max_in=39)
    with pytest.raises(ValueError, match="seed"):
        vera_linear_on_the_fly(**inputs, seed=-1, max_in=40)
    with pytest.raises(ValueError, match="lambda_b"):
        vera_linear_on_the_fly(**{**inputs, "lambda_b": inputs["lambda_b"][:5]}, seed=0, max_in=40)


def test_strided_inputs(backend):
    # Every operand a non-contiguous view (x a column slice, W0 a transpose, B and the lambdas strided,
    # A = A_max[:, :in], g broadcast along M): the same bits as contiguous copies.
    m, in_features, out_features, rank = 33, 40, 50, 17
    dtype = torch.bfloat16
    inputs = _problem(m, in_features, out_features, rank, dtype)
    wide = torch.randn(m, 2 * in_features, device=DEVICE).to(dtype)
    A_max, _ = generate_projections(5, rank, in_features + 7, out_features, dtype=dtype, device=DEVICE)
    strided = dict(
        x=wide[:, ::2],
        weight=inputs["weight"].t().contiguous().t(),
        bias=torch.stack([inputs["bias"], inputs["bias"]], 1)[:, 0],
        A=A_max[:, :in_features],
        B=inputs["B"].t().contiguous().t(),
        lambda_d=torch.stack([inputs["lambda_d"]] * 3, 1)[:, 1],
        lambda_b=torch.stack([inputs["lambda_b"]] * 2, 1)[:, 1],
    )
    assert not any(v.is_contiguous() for v in strided.values())
    contiguous = {k: v.contiguous() for k, v in strided.items()}
    grad = torch.randn(1, out_features, device=DEVICE).to(dtype).expand(m, out_features)
    assert _bits_equal(_run(vera_linear, strided, grad, backend=backend),
                       _run(vera_linear, contiguous, grad.contiguous(), backend=backend))


def test_two_runs_same_bits(backend):
    inputs = _problem(300, 40, 130, 64, torch.bfloat16)
    grad = torch.randn(300, 130, device=DEVICE).to(torch.bfloat16)
    first, second = (_run(vera_linear, inputs, grad, backend=backend) for _ in range(2))
    assert _bits_equal(first, second)


@pytest.mark.parametrize("rank", [1000, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_rank(backend, dtype, rank):
    # r beyond one block: the shrink splits r over programs, the GEMMs loop over r, the backward pass
    # splits r over programs and sums their db partials.
    seed = int(torch.randint(0, 2**31, ()))
    passed, errors, baseline = verify.op_check(backend, DEVICE, dtype, (5, 40, 48, rank, None), seed)
    assert passed, f"seed {seed}: errors {errors}, PyTorch's own: {baseline}"


def test_pinned_config_is_used(backend, pinned):
    from vera_kernels.triton import autotune, linear, pin_config

    assert linear.rank_blocks(linear.MODE_DT, 1000, 1000, on_the_fly=False, ieee=False) == (32, 16)
    assert autotune.fixed_config("gemm", interpreted=False).kwargs["BLOCK_K"] == 16
    # Small tiles: many programs, K loops of several steps, r split into blocks of 16.
    seed = int(torch.randint(0, 2**31, ()))
    for dtype in (torch.float32, torch.bfloat16):
        passed, errors, baseline = verify.op_check(backend, DEVICE, dtype, (37, 40, 70, 40, None), seed)
        assert passed, f"seed {seed}: errors {errors}, PyTorch's own: {baseline}"
    with pytest.raises(ValueError, match="kernel must be one of"):
        pin_config("matmul", dict(BLOCK_M=16))


def test_autotune_pruning(backend, monkeypatch):
    # The GPU path, called the way triton.autotune calls it (keyword launch arguments in kwargs): decode
    # gets the narrow-M configs, on-the-fly generation the tiles that compile without spilling.
    from vera_kernels.triton import autotune, linear

    prune = autotune._pruner("gemm")
    for arch in (80, 90):
        configs = autotune.configs("gemm", arch)
        decode = prune(configs, {}, M_BUCKET=16, ON_THE_FLY=False)
        wide = prune(configs, {}, M_BUCKET=8192, ON_THE_FLY=False)
        generated = prune(configs, {}, M_BUCKET=8192, ON_THE_FLY=True)
        assert decode and all(c.kwargs["BLOCK_M"] <= 32 for c in decode)
        assert wide and all(c.kwargs["BLOCK_M"] >= 64 for c in wide)
        assert generated and set(generated) <= set(wide)
        assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 2048 * c.num_warps for c in generated)
        assert arch == 80 or set(generated) < set(wide)  # sm_90's 128 x 256 tiles are too wide for it
    assert autotune.m_bucket(1) == 16 and autotune.m_bucket(300) == 512 and autotune.m_bucket(10**6) == 8192
    # fp32's own tiles: a decode tile and a wide one (both narrow: IEEE FMA dots), told apart by GROUP_M.
    for m_bucket, rows in ((16, [16]), (8192, [32])):
        ieee = autotune.candidates("gemm", 90, dict(M_BUCKET=m_bucket, IEEE=True))
        assert [c.kwargs["BLOCK_M"] for c in ieee] == rows and all(c.kwargs["BLOCK_K"] == 16 for c in ieee)
    # The rank GEMMs: the host's tile decides the warps (128 x 128 spills with 4, 16 x 128 idles 8).
    prune = autotune._pruner("rank")
    for arch in (80, 90):
        configs = autotune.configs("rank", arch)
        wide = prune(configs, {}, M_BUCKET=8192, BLOCK_M=128, BLOCK_R=128)
        decode = prune(configs, {}, M_BUCKET=16, BLOCK_M=16, BLOCK_R=128)
        assert wide and all(c.num_warps == 8 for c in wide)
        assert decode and all(c.num_warps == 4 for c in decode)
        # Every operand stage fits a block's shared memory: 64 x 128 tiles in K steps of 256 over 3 stages
        # (288 KB) cannot launch; 64 x 64 ones (192 KB) can.
        assert all(c.num_stages * (64 + 128) * c.kwargs["BLOCK_K"] * 2 <= 227 * 1024
                   for c in prune(configs, {}, M_BUCKET=512, BLOCK_M=64, BLOCK_R=128))
        assert arch == 80 or 256 in [c.kwargs["BLOCK_K"] for c in prune(configs, {}, M_BUCKET=512, BLOCK_M=64, BLOCK_R=64)]
        # Generated projection tiles sit in registers: K steps of 64 at most beyond decode.
        generated = prune(configs, {}, M_BUCKET=8192, BLOCK_M=64, BLOCK_R=64, GENERATE_P=True)
        assert generated and all(c.kwargs["BLOCK_K"] <= 64 for c in generated)
        # fp32 (IEEE FMA dots): its own table, short K steps; the host keeps its tiles to 32 x 64.
        ieee = autotune.candidates("rank", arch, dict(M_BUCKET=8192, BLOCK_M=32, BLOCK_R=64, IEEE=True))
        assert ieee and all(c.kwargs["BLOCK_K"] <= 32 and c.num_warps == 4 for c in ieee)
        split = autotune.candidates("rank", arch, dict(M_BUCKET=8192, BLOCK_M=32, BLOCK_R=64, IEEE=True, SPLIT=True))
        assert [c.kwargs["BLOCK_K"] for c in split] == [16]  # K steps of 32 spill with the split's reduction
    monkeypatch.setattr(linear, "interpreted", lambda: False)  # the GPU's rank tiles, not the interpreter's
    for mode in (linear.MODE_SHRINK, linear.MODE_DT, linear.MODE_G):
        for m in (1, 32, 512, 8192):
            block_m, block_r = linear.rank_blocks(mode, m, 256, on_the_fly=False, ieee=True)
            assert block_m <= 32 and block_r <= 64


def test_torch_compile_fullgraph(backend):
    inputs = _problem(17, 40, 30, 8, torch.float32)
    grad = torch.randn(17, 30, device=DEVICE)

    def layer(x, weight, bias, A, B, lambda_d, lambda_b):
        return vera_linear(x, weight, bias, A, B, lambda_d, lambda_b, backend=backend) * 2

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert _bits_equal(_run(compiled, inputs, grad), _run(layer, inputs, grad))


@pytest.mark.parametrize("bias_state", ["frozen", "none"])
def test_backward_without_bias_gradient(backend, bias_state):
    # The layer's default: a frozen (or absent) bias, so the backward computes no dbias.
    p = _problem(17, 40, 30, 8, torch.float32)
    if bias_state == "none":
        p["bias"] = None
    for k in ("x", "lambda_d", "lambda_b"):
        p[k].requires_grad_(True)
    vera_linear(**p, backend=backend).sum().backward()
    ref = {k: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None) for k, v in p.items()}
    vera_linear(**ref, backend="torch").sum().backward()
    for k in ("x", "lambda_d", "lambda_b"):
        assert verify.relative_error(p[k].grad, ref[k].grad) < 1e-5, k


# ---------------------------------------------------------------------------------------------------
# The execution plan's paths: TMA descriptors or pointers, split-K decode shrink, the persistent grid,
# cached workspaces, and every combination of inputs that require grad.


def _captured_launches(fn):
    """(kernel, args) of every launch ``fn`` makes, recorded instead of run."""
    from vera_kernels.triton import static

    with static.captured() as launches:
        fn()
    return [(launch.kernel, launch.args) for launch in launches]


def _forward_launches(m, in_features, out_features, rank, dtype, x=None):
    from vera_kernels.triton import linear

    p = _problem(m, in_features, out_features, rank, dtype)
    x = p["x"] if x is None else x
    return _captured_launches(lambda: linear.forward(x, p["weight"], p["bias"], p["A"], p["B"], p["lambda_d"],
                                                     p["lambda_b"], None, 0, in_features))


def test_tma_selection(backend):
    from vera_kernels.triton import linear

    if linear.TensorDescriptor is None:
        pytest.skip("this Triton has no host-side tensor descriptors")
    # bf16 rows of 40 elements are 80 bytes (16-byte multiples): descriptors; 17 elements (34 bytes),
    # a base 2 bytes off alignment, or an fp32 row of 17 elements: the pointer variant. B (out x r) is read
    # as stored, so a rank of 17 (rows of 34 bytes) takes pointers too.
    use_tma = lambda launches: [a["USE_TMA"] for k, a in launches if k == "gemm"]  # noqa: E731
    aligned = _forward_launches(37, 40, 70, 24, torch.bfloat16)
    assert use_tma(aligned) == [linear._tma_capable(torch.device(DEVICE))]
    assert use_tma(_forward_launches(37, 40, 70, 17, torch.bfloat16)) == [False]
    assert use_tma(_forward_launches(37, 17, 70, 24, torch.bfloat16)) == [False]
    assert use_tma(_forward_launches(37, 40, 70, 24, torch.float32)) == [False]  # IEEE fp32 dots: no TMA
    wide = torch.randn(37, 41, device=DEVICE).to(torch.bfloat16)
    assert not linear.tma_ok(wide[:, 1:]) and linear.tma_ok(wide[:, :40].contiguous())
    assert not linear.tma_ok(wide[:1, :40].expand(37, 40))  # stride 0: overlapping rows
    assert use_tma(_forward_launches(37, 40, 70, 24, torch.bfloat16, x=wide[:, 1:])) == [False]
    # Decode-sized M takes the narrow mma.sync tiles with pointers (their descriptor variants keep stack
    # frames), as do generated projections.
    assert use_tma(_forward_launches(32, 40, 70, 24, torch.bfloat16)) == [False]
    assert use_tma(_forward_launches(3, 40, 70, 24, torch.bfloat16)) == [False]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_tma_and_pointer_variants_agree(backend, dtype, monkeypatch):
    # The descriptor variant and the pointer variant add the same K blocks in the same order (the forward:
    # the r part, scaled by b, then the in part; dx: one loop that switches source in the pointer variant):
    # the same bits, and both right against float64.
    from vera_kernels.triton import linear

    if not linear.interpreted():
        pytest.skip("on a GPU the static check and the op tests cover the variant the device takes")
    inputs = _problem(70, 48, 80, 24, dtype)  # every row 16-byte aligned
    grad = torch.randn(70, 80, device=DEVICE).to(dtype)
    results = {}
    for tma in (True, False):
        monkeypatch.setattr(linear, "FORCE_TMA", tma)
        launches = [a for k, a in _forward_launches(70, 48, 80, 24, dtype) if k == "gemm"]
        assert [(a["USE_TMA"], a["TMA_STORE"]) for a in launches] == [(tma, tma)]  # y (80 wide) by TMA stores
        results[tma] = _run(vera_linear, inputs, grad, backend=backend)
    assert _bits_equal(results[True], results[False])
    exact = _run(vera_linear, {k: v.double() for k, v in inputs.items()}, grad.double(), backend="torch")
    for got, want in zip(results[True], exact):
        assert verify.relative_error(got, want) < verify.OP_TOLERANCE[dtype]


@pytest.mark.parametrize("m", [1, 16])
def test_split_k_decode(backend, m):
    # Decode: few row blocks, so the shrink splits K over programs (fp32 partials, summed in a fixed
    # order by the last program of each tile, in the same launch) and the GEMM: two launches.
    from vera_kernels.triton import linear

    launches = _forward_launches(m, 200, 70, 17, torch.bfloat16)
    kernels = [k for k, _ in launches]
    assert kernels == ["rank", "gemm"], kernels
    rank_args = launches[0][1]
    assert rank_args["SPLIT"] and rank_args["K_SPLIT"] < 200
    splits, per_split = linear.split_k(1, 200, torch.device(DEVICE), 16)
    assert splits > 1 and (splits - 1) * per_split < 200 <= splits * per_split
    seed = int(torch.randint(0, 2**31, ()))
    for dtype in DTYPES if m == 1 else [torch.bfloat16]:
        passed, errors, baseline = verify.op_check(backend, DEVICE, dtype, (m, 200, 70, 17, None), seed)
        assert passed, f"seed {seed}: errors {errors}, PyTorch's own: {baseline}"
    inputs = _problem(m, 200, 70, 17, torch.bfloat16)
    grad = torch.randn(m, 70, device=DEVICE).to(torch.bfloat16)
    assert _bits_equal(_run(vera_linear, inputs, grad, backend=backend), _run(vera_linear, inputs, grad, backend=backend))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_shrink_sums_the_partials_in_split_order(backend, dtype):
    """The split shrink's last program sums the fp32 partials in split order: s and t are, bit for bit,
    the partials (left in the workspace) added one split after another in fp32 and rounded as the
    epilogue rounds (the two-launch path's second stage did exactly this); the ticket counters are back
    to 0 after the launch, and a second call gives the same bits."""
    from vera_kernels.triton import linear

    torch.manual_seed(3)
    m, k, r = 3, 200, 24
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    A = torch.randn(r, k, device=DEVICE).to(dtype)
    d = torch.randn(r, device=DEVICE)
    s, t = linear._shrink(x, A, d, 0, k)
    block_m, block_r = linear.rank_blocks(linear.MODE_SHRINK, m, r, False, dtype == torch.float32)
    tiles = triton_cdiv(m, block_m) * triton_cdiv(r, block_r)
    splits, per_split = linear.split_k(tiles, k, torch.device(DEVICE), autotune_bucket(m))
    assert splits > 1
    part = linear.workspace("rank", splits * m * r, torch.float32, x.device).view(splits, m, r)
    total = torch.zeros(m, r, dtype=torch.float32, device=DEVICE)
    for i in range(splits):
        total += part[i]
    want_s = total.to(dtype)
    want_t = (want_s.float() * d).to(dtype)
    assert _bits_equal([s, t], [want_s, want_t])
    # Every partial is exactly its split's K range (x and A are exact in fp32 up to rounding order).
    exact = x.double()[:, :per_split] @ A.double()[:, :per_split].T
    assert torch.allclose(part[0].double(), exact, rtol=1e-5, atol=1e-4)
    tickets = linear.workspace("tickets", tiles, torch.int32, x.device)
    assert int(tickets.abs().sum()) == 0
    s2, t2 = linear._shrink(x, A, d, 0, k)
    assert _bits_equal([s, t], [s2, t2.clone()])


def test_split_k_fills_the_sms_without_a_partial_wave(backend, monkeypatch):
    """The G GEMM at the target shape (out = 4096: 32 x 2 tiles of 128 x 128, one program per SM on 132
    SMs) splits 2 ways (128 programs), not 3 (192 programs: a second, partial wave); decode's single tile
    still splits as far as K allows."""
    from vera_kernels.triton import linear

    monkeypatch.setattr(linear, "num_sms", lambda device: 132)
    assert linear.split_k(64, 8192, torch.device(DEVICE), 8192)[0] == 2
    assert linear.split_k(67, 8192, torch.device(DEVICE), 8192)[0] == 1  # tiles x 2 > SMs: no split
    splits, per_split = linear.split_k(1, 4096, torch.device(DEVICE), 1)
    assert splits * 1 <= 132 and splits == -(-4096 // per_split) and splits > 16


def autotune_bucket(m):
    from vera_kernels.triton import autotune

    return autotune.m_bucket(m)


def test_persistent_grid_walks_every_tile(backend, pinned):
    # With the pinned 32 x 32 tiles, 150 x 130 has 5 x 5 = 25 output tiles (and dx 5 x 2) for at most
    # num_sms programs: each program loops over several tiles, and every element is written (poisoned).
    from vera_kernels.triton import linear

    programs = linear.num_sms(torch.device(DEVICE))
    assert triton_cdiv(150, 32) * triton_cdiv(130, 32) > programs or not linear.interpreted()
    seed = int(torch.randint(0, 2**31, ()))
    for dtype in (torch.bfloat16,):
        passed, errors, baseline = verify.op_check(backend, DEVICE, dtype, (150, 40, 130, 24, None), seed)
        assert passed, f"seed {seed}: errors {errors}, PyTorch's own: {baseline}"


@pytest.mark.parametrize("m", [1, 40, 300])
def test_forward_is_two_launches_at_every_m(backend, m):
    # The shrink and the GEMM, which scales its rank sum by b: no fold of b ⊙ B (it
    # was a third launch for M > 16), in the pointer variant and the TMA one alike.
    from vera_kernels.triton import linear

    for tma in (False, True):
        linear.FORCE_TMA = tma
        try:
            launches = _forward_launches(m, 200, 72, 17, torch.bfloat16)
        finally:
            linear.FORCE_TMA = None
        assert [k for k, _ in launches] == ["rank", "gemm"], (tma, launches)
        assert launches[1][1]["SCALE_R"] and not launches[1][1]["HAS_IDS"]


def triton_cdiv(a, b):
    return -(-a // b)


def test_decode_allocates_only_outputs(backend, monkeypatch):
    # A decode step allocates y and s and nothing else: the split-K partials and t live in workspaces
    # cached per (purpose, dtype, device, stream), and b scales the GEMM's rank sum (no folded copy).
    from vera_kernels.triton import linear

    p = _problem(4, 200, 70, 17, torch.bfloat16)
    call = lambda: linear.forward(p["x"], p["weight"], p["bias"], p["A"], p["B"], p["lambda_d"],  # noqa: E731
                                  p["lambda_b"], None, 0, 200)
    first = call()
    cached = dict(linear._workspaces)
    shapes = []
    real = linear.new_output
    monkeypatch.setattr(linear, "new_output", lambda *shape, **kw: shapes.append(shape) or real(*shape, **kw))
    monkeypatch.setattr(torch, "full", None)  # a workspace (re)allocation would call torch.full
    second = call()
    assert shapes == [(4, 17), (4, 70)]  # s, then y
    assert linear._workspaces.keys() == cached.keys()
    assert all(linear._workspaces[k] is v for k, v in cached.items())
    assert _bits_equal(first, second)


_GRAD_INPUTS = ("x", "bias", "lambda_d", "lambda_b")


@pytest.mark.parametrize("which", [c for c in range(1, 16)], ids=lambda c: "+".join(
    n for i, n in enumerate(_GRAD_INPUTS) if c >> i & 1))
def test_every_requires_grad_combination(backend, which):
    # Only the gradients asked for are computed and each is right (float64 oracle, fp32 and bf16).
    wanted = [n for i, n in enumerate(_GRAD_INPUTS) if which >> i & 1]
    for dtype in (torch.float32, torch.bfloat16):
        p = _problem(23, 40, 30, 12, dtype)
        exact = {k: v.double() for k, v in p.items()}
        grad = torch.randn(23, 30, device=DEVICE).to(dtype)
        for inputs, use in ((p, backend), (exact, "torch")):
            for k in wanted:
                inputs[k].requires_grad_(True)
            vera_linear(**inputs, backend=use).backward(grad.to(inputs["x"].dtype))
        for k in _GRAD_INPUTS:
            if k in wanted:
                assert verify.relative_error(p[k].grad, exact[k].grad) < verify.OP_TOLERANCE[dtype], (k, dtype)
            else:
                assert p[k].grad is None, k


@pytest.mark.parametrize("form", ["linear", "delta"])
def test_backward_with_frozen_input(backend, form):
    # The first adapted layer of a model: x without grad (and a frozen bias), so the backward computes
    # neither dx nor dbias. Regression: one empty tensor returned for both made the custom op refuse its
    # own outputs ("custom operator output may not alias").
    p = _problem(17, 40, 30, 8, torch.float32)
    for k in ("lambda_d", "lambda_b"):
        p[k].requires_grad_(True)
    base = torch.randn(17, 30, device=DEVICE)
    ref = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in p.items()}
    for inputs, use in ((p, backend), (ref, "torch")):
        if form == "linear":
            y = vera_linear(**inputs, backend=use)
        else:
            y = vera_delta(inputs["x"], inputs["A"], inputs["B"], inputs["lambda_d"], inputs["lambda_b"],
                           base.to(inputs["x"].dtype), backend=use)
        y.backward(torch.ones_like(y))
    for k in ("lambda_d", "lambda_b"):
        assert verify.relative_error(p[k].grad, ref[k].grad) < 1e-5, k
    assert p["x"].grad is None and p["bias"].grad is None


@pytest.mark.parametrize("m, out_features, rank", [(300, 40, 17), (37, 130, 40), (0, 30, 8)],
                         ids=["split-over-M", "several-tiles", "M=0"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dbias_is_the_column_sum_rounded_once(backend, dtype, m, out_features, rank):
    """dbias = Σ_m g, added in fp32 and rounded once to g's dtype. With g made of small positive integers
    every fp32 partial sum is exact, so dbias must equal the exact sum rounded to the dtype bit for bit,
    whatever the tiles and the order: a missing, doubled or misplaced partial (a row block, a split, a
    column block) or a partial rounded to the dtype on the way (sums reach ~1300, past bf16's and fp16's
    exact integers) changes it, and an unwritten one stays NaN (outputs are poisoned). Under the
    interpreter 300 x 40 at r = 17 is one G-GEMM tile whose K (= M) is split over 3 programs; 130 x 40
    spans several column and rank blocks; M = 0 gives zeros."""
    from vera_kernels.dispatch import poisoned_outputs

    p = _problem(max(m, 1), 40, out_features, rank, dtype)
    p["x"] = p["x"][:m]
    grad = torch.randint(1, 9, (m, out_features), device=DEVICE).to(dtype)
    leaves = {k: v.detach().clone().requires_grad_(k in ("bias", "lambda_b")) for k, v in p.items()}
    with poisoned_outputs():
        vera_linear(**leaves, backend=backend).backward(grad)
    want = grad.double().sum(0).to(dtype)
    assert leaves["bias"].grad.dtype == dtype
    assert torch.equal(verify.bits_of(leaves["bias"].grad.cpu()), verify.bits_of(want.cpu()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_lambda_gradients_round_nothing_but_s(backend, dtype):
    """dd = Σ_m dt ⊙ s and db = Σ_m g ⊙ u come from G = gᵀ s in fp32 (the G GEMM's epilogue): given the
    saved s, no rounding to the layer's dtype is on their path, so they match float64 on the same s to
    fp32 accuracy. Rounding g ⊙ b or b ⊙ B to the dtype on dd's path (dt's GEMM operands) costs ~1e-3
    here, and its error grows with √M where g and s are correlated across rows (docs/DESIGN.md)."""
    from vera_kernels.triton import linear

    for m, in_features, out_features, rank in ((300, 40, 130, 64), (37, 70, 130, 17)):
        p = _problem(m, in_features, out_features, rank, dtype)
        s = (p["x"].float() @ p["A"].float().t()).to(dtype)
        g = torch.randn(m, out_features, device=DEVICE).to(dtype)
        _, dd, db, _ = linear.backward(g, s, p["weight"], p["A"], p["B"], p["lambda_d"], p["lambda_b"],
                                       in_features=in_features, with_bias=False, need_dx=False, seed=0,
                                       max_in=in_features)
        g64, s64, B64, d64, b64 = (t.double() for t in (g, s, p["B"], p["lambda_d"], p["lambda_b"]))
        want_dd = (((g64 * b64) @ B64) * s64).sum(0)
        want_db = (g64 * ((d64 * s64) @ B64.t())).sum(0)
        assert verify.relative_error(dd, want_dd) < 1e-5 and verify.relative_error(db, want_db) < 1e-5
