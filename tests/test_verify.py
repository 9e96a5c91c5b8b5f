"""python -m vera_kernels.verify: the levels and their shape sets, the pass criterion
(docs/DESIGN.md#the-pass-criterion), inputs shared by the backends, failed rows instead of crashes, the
table, the JSON written after every group and the exit status (the checks themselves are exercised by test_backend_ops and test_projections)."""

import json

import pytest
import torch

from vera_kernels import verify


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_shape_sets(device):
    full, default, quick = (verify.shape_sets(device, level) for level in ("full", "default", "quick"))
    assert set(full) == set(default) == {"odd", "decode", "llm"} and set(quick) == {"odd"}
    assert full["odd"] == default["odd"] == quick["odd"] == verify.OP_SHAPES
    for name in default:
        assert set(default[name]) <= set(full[name]) and len(default[name]) >= 1
    assert all(shape[0] == 1 for shape in full["decode"] + default["decode"])
    if device == "cuda":  # Llama-7B's layers and both ranks of the issue
        llm = full["llm"]
        assert {(s[1], s[2]) for s in llm} == {(4096, 4096), (4096, 11008)}
        assert {s[3] for s in llm} == {256, 1024} and {s[0] for s in llm} == {512, 8192}
    with pytest.raises(ValueError, match="level"):
        verify.shape_sets(device, "all")


def test_dtype_order_bf16_first():
    assert verify.DTYPE_ORDER[0] == torch.bfloat16 and set(verify.DTYPE_ORDER) == set(verify.OP_TOLERANCE)


def test_criterion():
    baseline = dict(y=1e-3, dd=4e-2)
    assert verify.op_passed(dict(y=9e-3, dd=8e-2), baseline, torch.bfloat16)  # tolerance; 2x PyTorch's own
    assert not verify.op_passed(dict(y=9e-3, dd=8.1e-2), baseline, torch.bfloat16)
    assert not verify.op_passed(dict(y=float("inf"), dd=0.0), dict(y=float("inf"), dd=0.0), torch.float32)
    assert verify.error_limit(4e-2, torch.bfloat16) == 8e-2 and verify.error_limit(0.0, torch.float32) == 1e-5


def test_op_inputs_are_made_once_per_seed():
    shape = (5, 12, 10, 3, 2)
    low, grad = verify.op_inputs("cpu", torch.bfloat16, shape, 7)
    again, grad_again = verify.op_inputs("cpu", torch.bfloat16, shape, 7)
    other, _ = verify.op_inputs("cpu", torch.bfloat16, shape, 8)
    exact = verify._exact(low)
    assert all(torch.equal(low[k], again[k]) for k in low) and torch.equal(grad, grad_again)
    assert not torch.equal(low["x"], other["x"])
    assert low["x"].shape == (2, 5, 12) and low["x"].dtype == torch.bfloat16 and grad.shape == (2, 5, 10)
    assert low["lambda_d"].dtype == low["lambda_b"].dtype == torch.float32  # trained vectors stay fp32
    assert all(exact[k].dtype == torch.float64 and torch.equal(exact[k], low[k].double()) for k in low)


def test_op_group_rows():
    # op_group draws its seed from the global generator: fixed here, so that the limit checked below (the
    # tolerance, unless PyTorch's own error is larger for some inputs) does not depend on the tests before.
    torch.manual_seed(0)
    rows = verify.op_group(["torch"], "cpu", torch.float32, "odd", verify.OP_SHAPES[:1])
    (row,) = rows
    assert row.passed and set(row.errors) == set(verify.OUTPUTS) and row.output in verify.OUTPUTS
    assert row.limit >= verify.OP_TOLERANCE[torch.float32] and "seed" in row.detail


def test_op_group_computes_the_reference_once_and_records_a_raising_backend(monkeypatch):
    calls = []
    real = verify.op_outputs

    def outputs(inputs, grad, backend):
        calls.append((backend, inputs["x"].dtype))
        if backend == "broken":
            raise RuntimeError("kernel launch failed\nmore")
        return real(inputs, grad, backend)

    monkeypatch.setattr(verify, "op_outputs", outputs)
    rows = verify.op_group(["broken", "torch"], "cpu", torch.bfloat16, "odd", verify.OP_SHAPES[:2])
    assert calls.count(("torch", torch.float64)) == 2  # one float64 reference per shape, for every backend
    assert [r.backend for r in rows] == ["torch", "broken"] * 2
    broken = [r for r in rows if r.backend == "broken"]
    assert all(not r.passed and "raised RuntimeError: kernel launch failed" in r.detail for r in broken)
    assert all(r.passed for r in rows if r.backend == "torch")


def test_projection_rows_record_a_raising_check(monkeypatch):
    def boom(*args, **kwargs):
        raise ValueError("no such block")

    monkeypatch.setattr(verify, "golden_block_mismatches", boom)
    rows = verify.projection_rows("torch", "cpu", verify.load_golden(), "quick")
    failed = [r for r in rows if not r.passed]
    assert len(failed) == len(verify.DTYPE_ORDER) and all("raised ValueError" in r.detail for r in failed)
    assert any(r.check.startswith("golden elements (every 24th)") and r.passed for r in rows)
    assert "-" in verify.format_table(failed)


def test_golden_element_sample():
    golden = verify.load_golden()
    assert verify.golden_element_mismatches("torch", "cpu", golden, torch.bfloat16, every=8) == 0


def test_main_table_json_after_every_group_and_exit_status(monkeypatch, tmp_path, capsys):
    good = verify.Row("torch", "a check", 0.0, "elements", True)
    bad = verify.Row("cpu", "ops float32 odd M,in,out,r=(1, 2, 3, 4)", 0.5, "rel", False, "seed 7: y 5.0e-01",
                     output="y", limit=1e-5)
    path = tmp_path / "verify.json"
    seen = []

    def fake_run(groups):
        def run(device, backends, *, level, on_group, dtypes):
            rows = []
            for group in groups:
                on_group("a group", group, 0.1)
                seen.append(json.loads(path.read_text()))  # written after every group
                rows += group
            return rows
        return run

    for groups, status, level in (([[good]], 0, "default"), ([[good], [bad]], 1, "full"), ([], 1, "quick")):
        monkeypatch.setattr(verify, "run", fake_run(groups))
        flag = {"default": [], "full": ["--full"], "quick": ["--quick"]}[level]
        assert verify.main(["--device", "cpu", *flag, "--json", str(path)]) == status
        data = json.loads(path.read_text())
        assert data["mode"] == level and data["complete"] and "torch" in data["environment"]
    assert [len(s["rows"]) for s in seen] == [1, 1, 2] and not any(s["complete"] for s in seen)
    out = capsys.readouterr().out
    assert "y 5.00e-01" in out and "FAIL (seed 7" in out and "1 passed, 1 failed" in out and "Failed:" in out
    with pytest.raises(SystemExit):
        verify.main(["--full", "--quick"])


def test_main_dtype_selects_the_op_groups(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(verify, "run", lambda device, backends, *, level, on_group, dtypes: seen.append(dtypes) or [
        verify.Row("torch", "a check", 0.0, "elements", True)])
    assert verify.main(["--device", "cpu", "--quick", "--dtype", "float32", "--dtype", "bfloat16"]) == 0
    assert verify.main(["--device", "cpu", "--quick"]) == 0
    assert seen == [[torch.bfloat16, torch.float32], list(verify.DTYPE_ORDER)]  # bf16 first, whatever the order given
    with pytest.raises(SystemExit):
        verify.main(["--dtype", "float64"])


def _terms(low, grad, name):
    """The M terms of a reduction (M x out or M x r), each formed in fp32 from dtype values and rounded to
    the dtype: a legitimate way to compute them."""
    dtype = grad.dtype
    x, g = low["x"].reshape(-1, low["x"].shape[-1]), grad.reshape(-1, grad.shape[-1])
    if name == "dbias":
        return g
    s = x @ low["A"].t()
    if name == "dd":
        dt = (g.float() * low["lambda_b"]).to(dtype) @ low["B"]
        return (dt.float() * s.float()).to(dtype)
    u = (low["lambda_d"] * s.float()).to(dtype) @ low["B"].t()
    return (g.float() * u.float()).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name, m", [("dd", 2000), ("db", 2000), ("dbias", 2000)])
def test_a_planted_one_ulp_per_term_bug_is_caught(name, m, dtype):
    # Each term of the reduction one ulp of the dtype too large (rounded up instead of to nearest) before an
    # fp32 sum: the errors add coherently (≈ u Σ|terms|), while a correct kernel's add like a random walk.
    # (In fp32 the same bug is as large as what a correct sequential fp32 sum may do, u √L ‖terms‖: no
    # bound that never fails a correct kernel can tell them apart.)
    shape = (m, 40, 130, 16, None)
    low, grad = verify.op_inputs("cpu", dtype, shape, seed=3)
    bounds = verify.conditioning_bounds(low, grad, dtype)
    exact = {k: v.double() for k, v in low.items()}
    reference = _terms(exact, grad.double(), name).sum(0)
    terms = _terms(low, grad, name)
    right = terms.float().sum(0)
    wrong = torch.nextafter(terms, torch.full_like(terms, float("inf"))).float().sum(0)
    baseline = {name: 0.0}
    right_error, wrong_error = verify.relative_error(right, reference), verify.relative_error(wrong, reference)
    assert verify.op_passed({name: right_error}, baseline, dtype, bounds), (right_error, bounds[name])
    assert not verify.op_passed({name: wrong_error}, baseline, dtype, bounds), (wrong_error, bounds[name])


def test_conditioning_bounds_never_loosen_a_well_conditioned_sum():
    # Terms of one sign: no cancellation, so the limit is the dtype's tolerance, whatever the sizes.
    for dtype in verify.OP_TOLERANCE:
        for shape in ((1, 40, 130, 1, None), (300, 40, 130, 64, None), (9, 40, 40, 17, 2)):
            low, grad = verify.op_inputs("cpu", dtype, shape, seed=0)
            low = {k: v.abs() for k, v in low.items()}
            bounds = verify.conditioning_bounds(low, grad.abs(), dtype)
            for name, bound in bounds.items():
                assert verify.error_limit(1.0, dtype, bound) == verify.OP_TOLERANCE[dtype], (dtype, shape, name)


@pytest.mark.parametrize("dtype", list(verify.OP_TOLERANCE), ids=str)
def test_no_false_failure_at_the_flaky_shape(dtype):
    # Regression: at M = r = 1 the outputs are sums whose terms may cancel, and comparing with one PyTorch
    # run's error failed correct kernels by bad luck (old criterion, 2,000 seeds: cpu backend 5 in fp32, 2 in
    # bf16, e.g. seeds 20, 576, 907, 1404, 1433, 1463, 1536; before the new C++ plan 2, 110 and 13 in fp32,
    # bf16, fp16; triton 1 in 150 in fp32, seed 56). Those seeds and 300 more here; the 2,000-seed figures
    # are in the closing note.
    from vera_kernels.dispatch import backends

    shape = (1, 40, 130, 1, None)
    runnable = [b for b in ("torch", "cpu") if backends()[b].available]
    failures = []
    for seed in [20, 37, 56, 176, 576, 907, 1404, 1433, 1463, 1536, *range(300)]:
        baseline = verify.op_errors("torch", "cpu", dtype, shape, seed)
        bounds = verify.conditioning_bounds(*verify.op_inputs("cpu", dtype, shape, seed), dtype)
        for backend in runnable:
            passed, errors, _ = verify.op_check(backend, "cpu", dtype, shape, seed, baseline, bounds)
            if not passed:
                failures.append((backend, seed, errors, bounds))
    assert not failures, failures[:3]
