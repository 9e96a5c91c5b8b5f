"""python -m vera_kernels.verify: the levels and their shape sets, the flash-attention criterion, inputs shared by
the backends, failed rows instead of crashes, the table, the JSON written after every group and the exit
status (the checks themselves are exercised by test_backend_ops and test_projections)."""

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
    low, exact, grad = verify.op_inputs(shape, torch.bfloat16, 7, "cpu")
    again, _, grad_again = verify.op_inputs(shape, torch.bfloat16, 7, "cpu")
    other, _, _ = verify.op_inputs(shape, torch.bfloat16, 8, "cpu")
    assert all(torch.equal(low[k], again[k]) for k in low) and torch.equal(grad, grad_again)
    assert not torch.equal(low["x"], other["x"])
    assert low["x"].shape == (2, 5, 12) and low["x"].dtype == torch.bfloat16 and grad.shape == (2, 5, 10)
    assert low["lambda_d"].dtype == low["lambda_b"].dtype == torch.float32  # trained vectors stay fp32
    assert all(exact[k].dtype == torch.float64 and torch.equal(exact[k], low[k].double()) for k in low)


def test_op_group_rows():
    rows = verify.op_group(["torch"], "cpu", torch.float32, "odd", verify.OP_SHAPES[:1])
    (row,) = rows
    assert row.passed and set(row.errors) == set(verify.OUTPUTS) and row.output in verify.OUTPUTS
    assert row.limit == verify.OP_TOLERANCE[torch.float32] and "seed" in row.detail


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
        def run(device, backends, *, level, on_group):
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
