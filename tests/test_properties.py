"""Property-based tests (hypothesis): vera_linear and vera_delta on every backend available here, on random
shapes (M 0..70, in/out 1..300, r 1..64), input layouts (contiguous, transposed, strided, expanded), dtypes,
bias on or off and every combination of which inputs require grad, against the float64 torch path on the
same rounded inputs: the forward and every gradient, outputs poisoned with NaN first, judged by verify's
criterion (the dtype's tolerance; the conditioning-aware bound for the reductions dd, db, dbias; twice
PyTorch's own error in the dtype for the others).

Examples per backend: VERA_HYPOTHESIS_EXAMPLES (default: a few dozen, so the file stays within ~2 minutes
on 2 CPU cores with the Triton interpreter; set it to e.g. 2000 for a long run).
"""

import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vera_kernels import verify  # noqa: E402
from vera_kernels.dispatch import poisoned_outputs  # noqa: E402
from vera_kernels.ops import vera_delta, vera_linear  # noqa: E402

from conftest import DEVICE, backend_params  # noqa: E402

# The interpreter runs Triton's kernels element by element in numpy: fewer examples keep it in budget.
DEFAULT_EXAMPLES = {"torch": 40, "cpu": 40, "triton": 15, "cuda": 40}
LAYOUTS = ("contiguous", "transposed", "strided", "expanded")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _examples(backend: str) -> int:
    value = os.environ.get("VERA_HYPOTHESIS_EXAMPLES")
    return int(value) if value else DEFAULT_EXAMPLES[backend]


@st.composite
def problems(draw):
    return dict(
        m=draw(st.integers(0, 70)),
        in_features=draw(st.integers(1, 300)),
        out_features=draw(st.integers(1, 300)),
        rank=draw(st.integers(1, 64)),
        layout=draw(st.sampled_from(LAYOUTS)),
        dtype=draw(st.sampled_from(DTYPES)),
        form=draw(st.sampled_from(("linear", "delta"))),
        bias=draw(st.booleans()),
        # x, bias (or base_out for vera_delta), lambda_d, lambda_b: every combination
        grads=draw(st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans())),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _layout(leaf: torch.Tensor, layout: str, m: int) -> torch.Tensor:
    """The (m, in) input the op sees, built from the leaf that receives the gradient."""
    if layout == "transposed":  # column-major storage: stride (1, m)
        return leaf.t()
    if layout == "strided":  # every other column of a wider tensor
        return leaf[:, ::2]
    if layout == "expanded":  # one row repeated: stride 0 over the rows
        return leaf.expand(m, -1)
    return leaf


def _leaf_shape(layout: str, m: int, in_features: int) -> tuple[int, int]:
    return {"transposed": (in_features, m), "strided": (m, 2 * in_features), "expanded": (1, in_features)}.get(
        layout, (m, in_features))


def _run(p, inputs, x_leaf, grad, backend):
    """Outputs and gradients of one forward and backward on fresh leaves (those p["grads"] selects)."""
    wants_x, wants_second, wants_d, wants_b = p["grads"]
    leaves = {k: (None if v is None else v.detach().clone()) for k, v in inputs.items()}
    x_leaf = x_leaf.detach().clone().requires_grad_(wants_x)
    second = "bias" if p["form"] == "linear" else "base_out"
    if leaves.get(second) is not None:
        leaves[second].requires_grad_(wants_second)
    leaves["lambda_d"].requires_grad_(wants_d)
    leaves["lambda_b"].requires_grad_(wants_b)
    x = _layout(x_leaf, p["layout"], p["m"])
    with poisoned_outputs():
        if p["form"] == "linear":
            y = vera_linear(x, leaves["weight"], leaves["bias"], leaves["A"], leaves["B"], leaves["lambda_d"],
                            leaves["lambda_b"], backend=backend)
        else:
            y = vera_delta(x, leaves["A"], leaves["B"], leaves["lambda_d"], leaves["lambda_b"], leaves["base_out"],
                           backend=backend)
        if y.requires_grad:
            y.backward(grad.to(y.dtype))
    results = {"y": y.detach()}
    for name, tensor in (("dx", x_leaf), ("d" + second, leaves.get(second)), ("dd", leaves["lambda_d"]),
                         ("db", leaves["lambda_b"])):
        if tensor is not None and tensor.requires_grad:
            assert tensor.grad is not None or y.numel() == 0, f"{name}: no gradient"
            results[name] = tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
    return results


def _check(backend, p):
    m, in_features, out_features, rank, dtype = (p[k] for k in ("m", "in_features", "out_features", "rank", "dtype"))
    g = torch.Generator().manual_seed(p["seed"])
    problem = verify.random_problem(max(m, 1), in_features, out_features, rank, seed=p["seed"] % 1000)
    x_leaf = torch.randn(_leaf_shape(p["layout"], m, in_features), generator=g, dtype=torch.float64)
    inputs = dict(weight=problem["weight"], bias=problem["bias"] if p["bias"] else None, A=problem["A"],
                  B=problem["B"], lambda_d=problem["lambda_d"], lambda_b=problem["lambda_b"])
    if p["form"] == "delta":
        inputs = {k: v for k, v in inputs.items() if k not in ("weight", "bias")}
        inputs["base_out"] = torch.randn(m, out_features, generator=g, dtype=torch.float64)
    grad = torch.randn(m, out_features, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    # Rounded once to the dtype (the lambdas stay fp32); the float64 oracle runs on the same values.
    low = {k: (None if v is None else (v.float() if k.startswith("lambda") else v.to(dtype)).to(DEVICE))
           for k, v in inputs.items()}
    x_low = x_leaf.to(dtype).to(DEVICE)
    exact = {k: (None if v is None else v.double()) for k, v in low.items()}

    got = _run(p, low, x_low, grad, backend)
    want = _run(p, exact, x_low.double(), grad.double(), "torch")
    own = _run(p, low, x_low, grad, "torch")  # PyTorch's own computation in the dtype
    assert got.keys() == want.keys()
    errors = {k: verify.relative_error(got[k], want[k]) for k in want}
    baseline = {k: verify.relative_error(own[k], want[k]) for k in want}
    bounds = verify.conditioning_bounds(dict(low, x=_layout(x_low, p["layout"], m)), grad, dtype)
    bounds["dbase_out"] = bounds["dbias"]  # d base_out = g, as dbias, element by element
    if p["layout"] == "expanded":  # dx of the one row: the sum of every row's dx, a reduction over M
        bounds.pop("dx")
    assert verify.op_passed(errors, baseline, dtype, bounds), (
        f"{p}: errors {errors}, PyTorch's own {baseline}, reduction bounds {bounds}")


@pytest.mark.parametrize("backend", backend_params())
def test_ops_match_float64_on_random_problems(backend):
    @settings(max_examples=_examples(backend), deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(problems())
    def check(p):
        _check(backend, p)

    check()


# ---------------------------------------------------------------------------------------------------
# The adapter bank and its routing: random sequences of add, remove, route (set_adapter_ids, an
# adapter_ids block, ids given to the call, the caller's tensor edited after routing) and forward, against a
# dict model of the bank (name -> (lambda_d, lambda_b)). Every output is compared with the formula in
# float64 for each row's adapter taken from the dict model; every refusal must leave the layer as it was.

ROUTING_EXAMPLES = {"torch": 30, "cpu": 30, "triton": 6, "cuda": 30}
NAMES = ("fr", "de", "es")


@st.composite
def bank_programs(draw):
    """Rounds of: changes to the bank (add, remove), a routing (set_adapter_ids with names or a tensor of
    indices, an adapter_ids block, ids given to the call), maybe an edit of the caller's ids tensor, then a
    forward under the default routing; flattened into steps."""
    names = st.lists(st.one_of(st.none(), st.sampled_from(NAMES)), min_size=1, max_size=5)
    change = st.one_of(
        st.tuples(st.just("add"), st.sampled_from(NAMES), st.integers(0, 2**16)),
        st.tuples(st.just("remove"), st.sampled_from(NAMES)),
    )
    route = st.one_of(
        st.tuples(st.just("set"), st.one_of(st.none(), names), st.booleans()),  # (names, as a tensor of indices)
        st.tuples(st.just("block"), names),
        st.tuples(st.just("call"), names, st.integers(-3, 6)),  # ids given to the call; the first replaced
    )
    # the caller's ids tensor edited after routing: in range, a removed slot, below -1, far out of range
    edit = st.one_of(st.integers(-6, 6), st.integers(-2**40, 2**40))
    steps = [("add", "fr", draw(st.integers(0, 2**16))), ("add", "de", draw(st.integers(0, 2**16)))]
    for _ in range(draw(st.integers(1, 6))):
        steps += draw(st.lists(change, max_size=2))
        steps.append(draw(route))
        if draw(st.booleans()):
            steps.append(("edit", draw(edit)))
        steps.append(("forward", draw(st.integers(1, 5)), draw(st.booleans())))  # (rows, 3-D input)
    return dict(in_features=draw(st.integers(1, 24)), out_features=draw(st.integers(1, 24)),
                rank=draw(st.integers(1, 12)), steps=steps, seed=draw(st.integers(0, 2**31 - 1)))


def _formula(layer, x, rows):
    """float64: x W0ᵀ + bias + b ⊙ ((d ⊙ (x Aᵀ)) Bᵀ) row by row, (d, b) = rows[i] (None: the base alone)."""
    A, B = (t.double() for t in layer._projection_slices(x.device, x.dtype))
    x = x.double().reshape(-1, layer.in_features)
    base = x @ layer.weight.double().t() + layer.bias.double()
    per_row = len(rows)
    repeat = x.shape[0] // per_row
    out = []
    for i, vectors in enumerate(rows):
        xi, yi = x[i * repeat:(i + 1) * repeat], base[i * repeat:(i + 1) * repeat]
        if vectors is not None:
            d, b = (t.double() for t in vectors)
            yi = yi + b * (((xi @ A.t()) * d) @ B.t())
        out.append(yi)
    return torch.cat(out)


def _run_bank_program(backend, p):
    from vera_kernels import FusedVeRALinear

    g = torch.Generator().manual_seed(p["seed"])
    torch.manual_seed(p["seed"])
    layer = FusedVeRALinear(p["in_features"], p["out_features"], p["rank"], backend=backend).to(DEVICE).eval()
    with torch.no_grad():
        layer.weight.normal_()
        layer.lambda_b.normal_()
    bank: dict = {}  # the dict model: name -> (lambda_d, lambda_b)
    index: dict = {}  # name -> its index while banked (stable: a removal changes no other)
    routing = None  # the default routing as the dict model sees it: (names, stale)
    caller_ids = None  # the tensor given to set_adapter_ids, which the caller may edit afterwards

    def expect_rows(names):
        return [None if name is None else bank[name] for name in names]

    def check(y, x, rows):
        want = _formula(layer, x, rows)
        torch.testing.assert_close(y.double().reshape(want.shape), want, rtol=2e-4, atol=2e-4)

    def snapshot():
        return (dict(layer.adapters), layer._routing, layer._bank_generation)

    with torch.no_grad():
        for step in p["steps"]:
            kind = step[0]
            if kind == "add":
                _, name, seed = step
                gen = torch.Generator().manual_seed(seed)
                d, b = torch.randn(p["rank"], generator=gen), torch.randn(p["out_features"], generator=gen)
                if name in bank:
                    before = snapshot()
                    with pytest.raises(ValueError, match="already in the bank"):
                        layer.add_adapter(name, d, b)
                    assert snapshot() == before
                    continue
                i = layer.add_adapter(name, d, b)
                assert i not in index.values() and i == layer.adapters[name]
                bank[name], index[name] = (d, b), i
            elif kind == "remove":
                name = step[1]
                if name not in bank:
                    before = snapshot()
                    with pytest.raises(KeyError):
                        layer.remove_adapter(name)
                    assert snapshot() == before
                    continue
                layer.remove_adapter(name)
                del bank[name], index[name]
                if routing is not None:
                    routing = (routing[0], True)  # made before the removal: stale
            elif kind == "set":
                _, names, as_tensor = step
                if names is not None and any(name is not None and name not in bank for name in names):
                    before = snapshot()
                    with pytest.raises(KeyError, match="no adapter named"):
                        vera_kernels_set(layer, names)
                    assert snapshot() == before
                    continue
                if names is not None and as_tensor:
                    caller_ids = torch.tensor([-1 if n is None else index[n] for n in names], device=DEVICE)
                    vera_kernels_set(layer, caller_ids)
                else:
                    vera_kernels_set(layer, names)
                routing = None if names is None else (names, False)
            elif kind == "edit":
                if caller_ids is not None:
                    caller_ids[0] = step[1]  # owned by the routing: changes nothing
            elif kind == "forward":
                _, rows, three_d = step
                if routing is not None:
                    rows = len(routing[0])
                x = torch.randn((rows, 3, p["in_features"]) if three_d else (rows, p["in_features"]), generator=g)
                x = x.to(DEVICE)
                if routing is not None and routing[1]:
                    with pytest.raises(RuntimeError, match="routing was set before an adapter was removed"):
                        layer(x)
                    continue
                names = routing[0] if routing is not None else None
                rows_vectors = ([(layer.lambda_d, layer.lambda_b)] * rows if names is None else expect_rows(names))
                check(layer(x), x, rows_vectors)
            elif kind == "block":
                names = step[1]
                x = torch.randn(len(names), p["in_features"], generator=g).to(DEVICE)
                if any(name is not None and name not in bank for name in names):
                    with pytest.raises(KeyError, match="no adapter named"):
                        with vera_kernels_block(layer, names):
                            pass
                    continue
                with vera_kernels_block(layer, names):
                    check(layer(x), x, expect_rows(names))
            elif kind == "call":
                _, names, replacement = step
                ids = [index.get(name, -1) if name is not None else -1 for name in names]
                names = [name if name in bank else None for name in names]
                valid = -1 <= replacement < len(layer._bank_names) and (
                    replacement == -1 or layer._bank_names[replacement] is not None)
                ids[0] = replacement
                x = torch.randn(len(ids), p["in_features"], generator=g).to(DEVICE)
                if not valid:  # out of range or a removed slot: refused (checked on the device, no read-back)
                    with pytest.raises(RuntimeError, match="adapter_ids must be in"):
                        layer(x, adapter_ids=torch.tensor(ids, device=DEVICE))
                    continue
                names[0] = None if replacement == -1 else layer._bank_names[replacement]
                check(layer(x, adapter_ids=torch.tensor(ids, device=DEVICE)), x, expect_rows(names))
        assert layer.adapters == index


def vera_kernels_set(layer, ids):
    import vera_kernels

    vera_kernels.set_adapter_ids(layer, ids)


def vera_kernels_block(layer, ids):
    import vera_kernels

    return vera_kernels.adapter_ids(layer, ids)


@pytest.mark.parametrize("backend", backend_params("torch", "cpu", "triton"))
def test_bank_and_routing_follow_a_dict_model(backend):
    @settings(max_examples=int(os.environ.get("VERA_HYPOTHESIS_EXAMPLES") or ROUTING_EXAMPLES[backend]),
              deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(bank_programs())
    def check(p):
        _run_bank_program(backend, p)

    check()


# Module casts: any sequence of .half()/.bfloat16()/.float()/.double()/.to(dtype), with or without gradients
# on the lambdas, completes: the base follows the cast, the lambdas, their gradients and the bank stay fp32
# under a narrowing (float64 after .double()), and no value of them changes.

CASTS = ("half", "bfloat16", "float", "double", "to_fp16", "to_bf16", "to_fp32", "to_fp64")
_CAST_DTYPES = {"half": torch.float16, "bfloat16": torch.bfloat16, "float": torch.float32, "double": torch.float64}


def _cast(model, cast):
    if cast.startswith("to_"):
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[cast[3:]]
        return model.to(dtype), dtype
    return getattr(model, cast)(), _CAST_DTYPES[cast]


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.sampled_from(CASTS), st.booleans()), min_size=1, max_size=6),
       banked=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_casts_complete_and_keep_the_lambdas(steps, banked, seed):
    import vera_kernels
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 10), nn.GELU(), nn.Linear(10, 6))
    vera_kernels.apply_vera(model, ["0", "2"], rank=3, seed=seed)
    layers = [layer for _, layer in vera_kernels.vera_layers(model)]
    for layer in layers:
        with torch.no_grad():
            layer.lambda_d.normal_()
            layer.lambda_b.normal_()
        if banked:
            layer.add_adapter("other", torch.randn(3), torch.randn(layer.out_features))
    originals = {(i, name): getattr(layer, name).detach().double().clone()
                 for i, layer in enumerate(layers) for name in layer._FP32_TENSORS}
    grads = {}
    dtype = torch.float32
    for cast, backward in steps:
        if backward:
            x = torch.randn(4, 12, dtype=dtype)
            model(x).float().square().sum().backward()
            grads = {(i, name): getattr(layer, name).grad.detach().double().clone()
                     for i, layer in enumerate(layers) for name in ("lambda_d", "lambda_b")}
        params = {(i, name): getattr(layer, name) for i, layer in enumerate(layers) for name in ("lambda_d", "lambda_b")}
        model, dtype = _cast(model, cast)
        kept = torch.float64 if dtype == torch.float64 else torch.float32
        for i, layer in enumerate(layers):
            assert layer.weight.dtype == dtype, (steps, cast)
            for name in layer._FP32_TENSORS:
                t = getattr(layer, name)
                assert t.dtype == kept, (steps, cast, name, t.dtype)
                assert torch.equal(t.detach().double(), originals[(i, name)]), (steps, cast, name)
            for name in ("lambda_d", "lambda_b"):
                t = getattr(layer, name)
                assert t is params[(i, name)]  # the Parameters an optimizer holds
                if (i, name) in grads:
                    # A float64 gradient (of a .double() model) is rounded once by a narrowing cast.
                    grads[(i, name)] = grads[(i, name)].to(kept).double()
                    assert t.grad is not None and t.grad.dtype == kept, (steps, cast, name)
                    assert torch.equal(t.grad.double(), grads[(i, name)]), (steps, cast, name)
    y = model(torch.randn(4, 12, dtype=dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
