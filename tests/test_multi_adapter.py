"""Many adapters in one batch (vera_linear_multi, vera_delta_multi, the layers' adapter banks): each row
must equal its adapter run alone on it (float64 oracle), -1 rows the base output, and every bad argument
must be refused before any work."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vera_kernels
import vera_kernels.routing
from vera_kernels import FusedVeRALinear, VeRAWrapper, apply_vera, dispatch, load_adapter, ops, reference, save_adapter
from vera_kernels.dispatch import poisoned_outputs

from conftest import DEVICE, backend_params

BACKENDS = backend_params("torch", "triton", "cpu")
# ‖out − ref‖ / ‖ref‖ against float64 (docs/DESIGN.md section 7); measured: fp32 ~1e-7, bf16 ~3e-3, fp16 ~4e-4.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
M, IN, OUT, RANK, N_ADAPTERS = 37, 50, 70, 17, 5


def _ids(kind, m, generator):
    if kind == "mixed":  # every adapter and -1, in a random order
        ids = torch.arange(m) % (N_ADAPTERS + 1) - 1
        return ids[torch.randperm(m, generator=generator)]
    if kind == "all_base":
        return torch.full((m,), -1, dtype=torch.int64)
    return torch.full((m,), 3, dtype=torch.int64)  # one adapter for every row


def _problem(seed, m=M):
    g = torch.Generator().manual_seed(seed)
    f = lambda *shape, scale=1.0: torch.randn(*shape, generator=g) * scale  # noqa: E731
    return dict(x=f(m, IN), weight=f(OUT, IN, scale=IN**-0.5), bias=f(OUT), A=f(RANK, IN, scale=IN**-0.5),
                B=f(OUT, RANK, scale=RANK**-0.5), bank_d=f(N_ADAPTERS, RANK), bank_b=f(N_ADAPTERS, OUT)), g


def _alone(p, ids, base_out=None):
    """float64: each row through the single-adapter oracle with its own adapter (or the base alone)."""
    d = {k: v.double() for k, v in p.items()}
    out = torch.empty(ids.shape[0], OUT, dtype=torch.float64)
    for a in ids.unique().tolist():
        rows = ids == a
        base = F.linear(d["x"][rows], d["weight"], d["bias"]) if base_out is None else base_out[rows].double()
        if a < 0:
            out[rows] = base
        elif base_out is None:
            out[rows] = reference.vera_forward(d["x"][rows], d["weight"], d["bias"], d["A"], d["B"],
                                               d["bank_d"][a], d["bank_b"][a])[0]
        else:
            out[rows] = reference.vera_delta_forward(d["x"][rows], d["A"], d["B"], d["bank_d"][a], d["bank_b"][a],
                                                     base)[0]
    return out


def _relative_error(out, ref):
    assert torch.isfinite(out).all(), "NaN/inf in the output (an element left unwritten?)"
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("kind", ["mixed", "all_base", "single"])
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_row_equals_its_adapter_alone(backend, dtype, kind):
    seed = int(torch.randint(0, 2**31, ()))
    p, g = _problem(seed)
    ids = _ids(kind, M, g).to(DEVICE)
    c = {k: v.to(DEVICE, dtype) if k not in ("bank_d", "bank_b") else v.to(DEVICE) for k, v in p.items()}
    base_out = (torch.randn(M, OUT, generator=g)).to(DEVICE, dtype)
    with torch.no_grad(), poisoned_outputs():
        y = ops.vera_linear_multi(c["x"], c["weight"], c["bias"], c["A"], c["B"], c["bank_d"], c["bank_b"], ids,
                                  backend=backend)
        delta = ops.vera_delta_multi(c["x"], c["A"], c["B"], c["bank_d"], c["bank_b"], ids, base_out, backend=backend)
    # The oracle sees the inputs as rounded to dtype: the error measured is the op's alone.
    rounded = {k: v.to(dtype).double() if k not in ("bank_d", "bank_b") else v for k, v in p.items()}
    ids_cpu = ids.cpu()
    assert _relative_error(y.cpu(), _alone(rounded, ids_cpu)) < TOLERANCE[dtype], f"seed {seed}"
    assert _relative_error(delta.cpu(), _alone(rounded, ids_cpu, base_out.cpu())) < TOLERANCE[dtype], f"seed {seed}"

    base = ids == -1
    # -1 rows: vera_delta_multi gives base_out back, bit for bit, on every backend.
    assert torch.equal(delta[base], base_out[base])
    if backend in ("torch", "cpu"):
        # Both compute the base as F.linear does (one addmm): -1 rows are F.linear's output, bit for bit.
        assert torch.equal(y[base], F.linear(c["x"], c["weight"], c["bias"])[base])
    else:
        # Triton computes the base GEMM in its own kernel: -1 rows are exactly its single-adapter op with
        # b = 0 (the base layer on this backend), and within tolerance of F.linear.
        with torch.no_grad():
            alone = ops.vera_linear(c["x"], c["weight"], c["bias"], c["A"], c["B"], c["bank_d"][0],
                                    torch.zeros_like(c["bank_b"][0]), backend=backend)
        assert torch.equal(y[base], alone[base])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ids_per_sequence_of_3d_input(backend):
    p, g = _problem(1, m=4 * 6)
    ids = torch.tensor([2, -1, 0, 4])
    x3 = p["x"].reshape(4, 6, IN)
    layer = FusedVeRALinear(IN, OUT, RANK, backend=backend)
    with torch.no_grad():
        layer.weight.copy_(p["weight"]), layer.bias.copy_(p["bias"])
    layer.projections = vera_kernels.ExplicitProjections(p["A"], p["B"])
    for a in range(N_ADAPTERS):
        assert layer.add_adapter(f"a{a}", p["bank_d"][a], p["bank_b"][a]) == a
    layer.to(DEVICE)
    with torch.no_grad(), poisoned_outputs():
        y3 = layer(x3.to(DEVICE), adapter_ids=ids.to(DEVICE))
    assert y3.shape == (4, 6, OUT)
    ref = _alone(p, ids.repeat_interleave(6))
    assert _relative_error(y3.reshape(-1, OUT).cpu(), ref) < TOLERANCE[torch.float32]


def _layer_and_problem():
    p, _ = _problem(2)
    layer = FusedVeRALinear(IN, OUT, RANK, backend="torch", dtype=torch.float64)
    with torch.no_grad():
        layer.lambda_d.normal_(), layer.lambda_b.normal_()
    return layer, p


def test_bank_indices_are_stable_and_the_own_adapter_still_works():
    layer, p = _layer_and_problem()
    x = p["x"].double()
    own = layer(x)
    assert [layer.add_adapter(n, p["bank_d"][i], p["bank_b"][i]) for i, n in enumerate("abc")] == [0, 1, 2]
    layer.remove_adapter("b")
    assert layer.adapters == {"a": 0, "c": 2}
    assert layer.add_adapter("d", p["bank_d"][3], p["bank_b"][3]) == 1  # the free slot, others unchanged
    ids = torch.tensor([0, 1, 2, -1] * 9 + [2])
    with torch.no_grad():
        y = layer(x, adapter_ids=ids)
    for name, rows in (("a", ids == 0), ("d", ids == 1), ("c", ids == 2)):
        alone = copy.deepcopy(layer)
        with torch.no_grad():
            i = layer.adapter_index(name)
            alone.lambda_d.copy_(layer._bank_d[i]), alone.lambda_b.copy_(layer._bank_b[i])
            torch.testing.assert_close(y[rows], alone(x[rows]), rtol=1e-12, atol=1e-12)
    assert torch.equal(y[ids == -1], F.linear(x, layer.weight, layer.bias)[ids == -1])
    assert torch.equal(layer(x), own)  # adapter_ids None: the layer's own adapter, as before
    layer.remove_adapter("c")
    # Checked on the device without reading the ids back (a RuntimeError from the assert on CPU).
    with torch.no_grad(), pytest.raises(RuntimeError, match="removed adapter"):
        layer(x, adapter_ids=ids)


def test_bank_grows_past_its_capacity():
    layer, p = _layer_and_problem()
    for i in range(9):
        layer.add_adapter(str(i), p["bank_d"][i % N_ADAPTERS] * (i + 1), p["bank_b"][i % N_ADAPTERS])
    assert layer._bank_d.shape[0] >= 9 and layer.adapter_index("8") == 8
    torch.testing.assert_close(layer._bank_d[8], p["bank_d"][3].double().float() * 9)


@pytest.mark.parametrize(
    "ids, error, match",
    [
        # The range is checked on the device, never read back: a RuntimeError from the assert on CPU.
        (torch.full((M,), N_ADAPTERS), RuntimeError, r"in \[-1, 5\)"),
        (torch.full((M,), -2), RuntimeError, r"in \[-1, 5\)"),
        (torch.zeros(M, dtype=torch.int32), TypeError, "int64"),
        (torch.zeros(M, 1, dtype=torch.int64), ValueError, "one id per row"),
        (torch.zeros(M - 1, dtype=torch.int64), ValueError, "one id per row"),
        (torch.zeros(M, dtype=torch.int64, device="meta"), ValueError, "device"),
    ],
    ids=["too_large", "below_minus_one", "int32", "2d", "too_short", "device"],
)
def test_bad_ids_are_refused_before_any_work(monkeypatch, ids, error, match):
    p, _ = _problem(3)

    def no_work(*args, **kwargs):
        raise AssertionError("a backend was looked up: work started before the ids were checked")

    monkeypatch.setattr(dispatch, "lookup", no_work)
    with torch.no_grad(), pytest.raises(error, match=match):
        ops.vera_linear_multi(p["x"], p["weight"], p["bias"], p["A"], p["B"], p["bank_d"], p["bank_b"], ids)
    with torch.no_grad(), pytest.raises(error, match=match):
        ops.vera_delta_multi(p["x"], p["A"], p["B"], p["bank_d"], p["bank_b"], ids, p["x"].new_zeros(M, OUT))


def test_bank_shape_errors_name_the_bank():
    p, _ = _problem(3)
    ids = torch.zeros(M, dtype=torch.int64)
    with torch.no_grad(), pytest.raises(ValueError, match="lambda_d_bank"):
        ops.vera_linear_multi(p["x"], p["weight"], p["bias"], p["A"], p["B"], p["bank_d"][:, 1:], p["bank_b"], ids)
    with torch.no_grad(), pytest.raises(ValueError, match="lambda_b_bank"):
        ops.vera_linear_multi(p["x"], p["weight"], p["bias"], p["A"], p["B"], p["bank_d"], p["bank_b"][1:], ids)


@pytest.mark.parametrize("backend", backend_params("cpu"))
def test_extension_refuses_bad_ids(backend):
    from vera_kernels import _extension

    p, _ = _problem(4)
    forward_multi = _extension.ops()[2]
    for ids, match in ((torch.full((M,), N_ADAPTERS), r"\[-1, 5\)"), (torch.full((M,), -2), r"\[-1, 5\)"),
                       (torch.zeros(M, dtype=torch.int32), "int64"), (torch.zeros(M - 1, dtype=torch.int64), "shape")):
        with torch.no_grad(), pytest.raises(RuntimeError, match=match):
            forward_multi(p["x"], p["weight"], p["bias"], p["A"], p["B"], p["bank_d"], p["bank_b"], ids, None)


def test_inference_only():
    p, _ = _problem(5)
    ids = torch.zeros(M, dtype=torch.int64)
    bank_d = p["bank_d"].requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only.*lambda_d_bank"):
        ops.vera_linear_multi(p["x"], p["weight"], p["bias"], p["A"], p["B"], bank_d, p["bank_b"], ids)
    with torch.no_grad():
        ops.vera_linear_multi(p["x"], p["weight"], p["bias"], p["A"], p["B"], bank_d, p["bank_b"], ids)


def test_wrapper_routes_rows():
    p, _ = _problem(6)
    base = nn.Linear(IN, OUT)
    wrapper = VeRAWrapper(base, RANK, backend="torch", projections=vera_kernels.ExplicitProjections(p["A"], p["B"]))
    for a in range(N_ADAPTERS):
        wrapper.add_adapter(f"a{a}", p["bank_d"][a], p["bank_b"][a])
    ids = _ids("mixed", M, torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = wrapper(p["x"], adapter_ids=ids)
        base_out = base(p["x"])
    assert _relative_error(y, _alone(p, ids, base_out)) < TOLERANCE[torch.float32]
    assert torch.equal(y[ids == -1], base_out[ids == -1])


class Net(nn.Module):
    def __init__(self, dim=16, hidden=24):
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        return self.mlp(x + self.q(x))


def _saved(tmp_path, base, seed):
    model = apply_vera(copy.deepcopy(base), ["q", "mlp.0", "mlp.2"], rank=8, seed=5)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    path = tmp_path / f"adapter{seed}.safetensors"
    save_adapter(model, path)
    return model.eval(), path


def test_model_serves_saved_adapters_in_one_batch(tmp_path):
    base = Net().eval()
    alone = {}
    paths = {}
    for name, seed in (("fr", 1), ("de", 2)):
        alone[name], paths[name] = _saved(tmp_path, base, seed)
    server = copy.deepcopy(base)
    load_adapter(server, paths["fr"], name="fr")  # no VeRA layers yet: the file's layers are added
    load_adapter(server, paths["de"], name="de")
    x = torch.randn(6, 5, 16)  # 6 sequences of 5 tokens
    routing = ["de", None, "fr", "fr", None, "de"]
    with torch.no_grad():
        with vera_kernels.adapter_ids(server, routing):
            y = server(x)
        expected = torch.stack([(alone[r] if r else base)(x[i]) for i, r in enumerate(routing)])
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        assert all(m._routing is None for _, m in vera_kernels.vera_layers(server))  # restored
        assert vera_kernels.routing.ROUTES.get() is None
        vera_kernels.set_adapter_ids(server, torch.tensor([1, 0, -1, 1, 0, -1]))  # indices: fr 0, de 1
        torch.testing.assert_close(server(x), torch.stack(
            [(alone[r] if r else base)(x[i]) for i, r in enumerate(["de", "fr", None, "de", "fr", None])]),
            rtol=1e-5, atol=1e-5)
        vera_kernels.set_adapter_ids(server, None)
        torch.testing.assert_close(server(x), base(x))  # the servers' own adapters are fresh: b = 0

    with pytest.raises(KeyError, match="no adapter named 'es'"):
        vera_kernels.set_adapter_ids(server, ["es"] * 6)
    before = {n: (m._bank_names[:], m._bank_d.clone()) for n, m in vera_kernels.vera_layers(server)}
    with pytest.raises(ValueError, match="already in the bank"):
        load_adapter(server, paths["fr"], name="fr")
    after = {n: (m._bank_names, m._bank_d) for n, m in vera_kernels.vera_layers(server)}
    assert all(before[n][0] == after[n][0] and torch.equal(before[n][1], after[n][1]) for n in before)


def test_adapter_with_trained_biases_cannot_be_banked(tmp_path):
    model = apply_vera(Net(), ["q"], rank=8, bias="vera_only")
    path = tmp_path / "biased.safetensors"
    save_adapter(model, path)
    server = apply_vera(Net(), ["q"], rank=8)
    with pytest.raises(ValueError, match="trains biases"):
        load_adapter(server, path, name="biased")
    assert vera_kernels.vera_layers(server)[0][1].adapters == {}


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_bank_serves_the_base(backend):
    # Regression: the torch backend gathered row 0 of an empty bank (IndexError) when every id is -1.
    p, _ = _problem(3)
    x, weight, bias, A, B = (p[k].to(DEVICE) for k in ("x", "weight", "bias", "A", "B"))
    ids = torch.full((x.shape[0],), -1, dtype=torch.int64, device=DEVICE)
    bank_d, bank_b = torch.zeros(0, A.shape[0], device=DEVICE), torch.zeros(0, B.shape[0], device=DEVICE)
    base = F.linear(x, weight, bias)
    with torch.no_grad(), poisoned_outputs():
        y = ops.vera_linear_multi(x, weight, bias, A, B, bank_d, bank_b, ids, backend=backend)
        delta = ops.vera_delta_multi(x, A, B, bank_d, bank_b, ids, base, backend=backend)
    assert torch.equal(delta, base)
    if backend == "triton":  # its own base GEMM: within fp32 tolerance of F.linear (see above)
        assert _relative_error(y, base) < 1e-5
    else:
        assert torch.equal(y, base)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_vectors_are_banked_only_when_allowed(value):
    # Regression: NaN/inf vectors went into the bank silently.
    layer, p = _layer_and_problem()
    layer.add_adapter("a", p["bank_d"][0], p["bank_b"][0])
    bank = (layer._bank_d.clone(), layer._bank_b.clone())
    d, b = p["bank_d"][1].clone(), p["bank_b"][1].clone()
    b[2] = value
    with pytest.raises(ValueError, match="add_adapter: lambda_b of 'bad' holds NaN or inf.*allow_nonfinite=True"):
        layer.add_adapter("bad", d, b)
    d2 = d.clone()
    d2[0] = value
    with pytest.raises(ValueError, match="add_adapter: lambda_d of 'bad' holds NaN or inf"):
        layer.add_adapter("bad", d2, p["bank_b"][1])
    assert layer.adapters == {"a": 0}
    assert torch.equal(layer._bank_d, bank[0]) and torch.equal(layer._bank_b, bank[1])
    assert layer.add_adapter("bad", d, b, allow_nonfinite=True) == 1
