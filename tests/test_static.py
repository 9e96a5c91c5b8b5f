"""The static check (vera_kernels/triton/static.py): every Triton kernel of the package is covered by it, the
launcher runs every kernel on its tensors' device, the exit status, and a few real compiles for sm_90a and
sm_80 (the full matrix, both Triton versions, runs in CI: python -m vera_kernels.verify --static)."""

import ast
import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
from unittest import mock

import pytest
import torch

import vera_kernels
from vera_kernels import verify

triton = pytest.importorskip("triton")
from vera_kernels.triton import autotune, linear, static  # noqa: E402


def _jit_functions():
    """Every @triton.jit function of the package, by (module, name): JITFunction, or InterpretedFunction
    under TRITON_INTERPRET; both keep the Python function as ``.fn``."""
    kinds = tuple(k for k in (getattr(triton.runtime.jit, "JITFunction", None),
                              getattr(getattr(triton.runtime, "interpreter", None), "InterpretedFunction", None)) if k)
    found = {}
    for info in pkgutil.walk_packages(vera_kernels.__path__, "vera_kernels."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if isinstance(obj, kinds) and obj.fn.__module__ == module.__name__:
                found[(module.__name__, name)] = obj
    return found


def _called_names(fn) -> set:
    """Names of the functions a jit function calls."""
    tree = ast.parse(inspect.getsource(fn.fn).lstrip())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            names.add(node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None))
    return names


def kernels():
    """The jit functions no other jit function calls: the ones a host launches."""
    functions = _jit_functions()
    called = set().union(*(_called_names(fn) for fn in functions.values()))
    return {key for key in functions if key[1] not in called}


def test_every_kernel_has_a_static_entry():
    launched = {(launch.fn.fn.__module__, static.kernel_name(launch.fn)) for *_, launch in static.capture()}
    found = kernels()
    assert {"_philox_kernel", "_fill_projection_kernel"} <= {name for _, name in found} and len(found) >= 5
    missing = sorted(found - launched)
    assert not missing, (
        f"Triton kernels no scenario of vera_kernels/triton/static.py launches: {missing}. Launch them through "
        "autotune.launch (linear._launch) and add a line to static.SCENARIOS calling the host function that "
        "launches them (see static.py's docstring).")
    assert launched <= found, f"static scenarios launch jit functions the package does not define: {launched - found}"


def test_scenarios_reach_every_dtype_and_mode():
    captures = static.capture()
    by_kernel = {}
    for _, dtype, m, launch in captures:
        by_kernel.setdefault(static.kernel_name(launch.fn), []).append((dtype, m, launch.args))
    for name, launches in by_kernel.items():
        if name != "_philox_kernel":  # the one kernel without a dtype
            assert {d for d, _, _ in launches} == set(static.DTYPES), name
    gemm = [args for _, _, args in by_kernel["_fused_gemm_kernel"]]
    # many adapters, on the fly, vera_delta, bias, the TMA variant, b scaling the r part (forward) or not (dx)
    for flag in ("HAS_IDS", "ON_THE_FLY", "HAS_BASE_OUT", "HAS_BIAS", "USE_TMA", "SCALE_R", "P_IS_NK"):
        assert {bool(a[flag]) for a in gemm} == {False, True}, flag
    assert {m for _, m, _ in by_kernel["_fused_gemm_kernel"]} == set(static.MS)  # decode tiles and wide ones


def test_jobs_cover_every_candidate_config_once():
    captures = [c for c in static.capture(dtypes=[torch.bfloat16]) if c[0] == "vera_linear"]
    jobs = static.jobs(captures)
    for _, _, m, launch in captures:
        for arch in static.ARCHS:
            given = [launch.config] if launch.config is not None else None  # a caller's own config
            for config in given or autotune.candidates(launch.kernel, arch, launch.args):
                described = static.describe_config(config, launch.args)
                assert any(j.kernel == static.kernel_name(launch.fn) and j.arch == arch and j.config == described
                           and m in j.ms for j in jobs)
    keys = [(j.kernel, j.arch, tuple(j.signature.items()), tuple(sorted(j.constexprs.items())), tuple(sorted(j.attrs)),
             j.config) for j in jobs]
    assert len(keys) == len(set(keys))
    assert len(static.jobs(captures, first_config_only=True)) < len(jobs)


def test_launcher_guards_the_tensors_device(monkeypatch):
    """The launcher makes the tensors' device current around the launch (Triton launches on the current
    device): checked with a mock of torch.cuda.device, on CPU."""
    events = []

    class Guard:
        def __init__(self, device):
            events.append(("guard", device))

        def __enter__(self):
            events.append(("enter",))

        def __exit__(self, *exc):
            events.append(("exit",))

    class Kernel:
        def __getitem__(self, grid):
            return lambda **kwargs: events.append(("launch", grid, kwargs["BLOCK"]))

    monkeypatch.setattr(torch.cuda, "device", Guard)
    config = triton.Config({"BLOCK": 32}, num_warps=4, num_stages=3)
    autotune.launch("k", Kernel(), lambda meta: (meta["BLOCK"],), {"n": 3}, interpreted=False,
                    device=torch.device("cuda", 1), config=config)
    assert events == [("guard", torch.device("cuda", 1)), ("enter",), ("launch", (32,), 32), ("exit",)]


def test_every_launch_asks_for_its_tensors_device():
    # Every op's launches name the device of its tensors (CPU here: the guard is then a no-op).
    launches = [launch for *_, launch in static.capture(dtypes=[torch.bfloat16], ms=[17])]
    assert launches
    for launch in launches:
        tensors = [v for v in launch.args.values() if isinstance(v, torch.Tensor)]
        assert tensors and all(t.device == launch.device for t in tensors)


def _pipeline(*waits, drains=0):
    """A pipeline dict as run_job stores it: one wgmma K loop per wait depth given."""
    loops = [dict(start=0x100 * (i + 1), end=0x100 * (i + 1) + 0x80, wgmma=True, mmas=4, wait_depth=w)
             for i, w in enumerate(waits)]
    return dict(loops=loops, drains=drains, store="TMA", summary="-")


def test_static_exit_status(monkeypatch, capsys, tmp_path):
    row = dict(kernel="_k", module="m", arch=90, sm="sm_90a", dtypes=["bf16"], ms=[1], flags="", config="w4 s3",
               scenarios=["s"], error=None, registers=32, local=0, stack=0, opcodes={"HMMA": 2}, shared=0,
               seconds=1.0, spill_instructions=0, spills=False, hgmma=0, hmma=2, blocks_per_sm=4,
               pipeline=dict(loops=[], drains=0, store="STG.E.128", summary="no K loop; drains 0; store STG.E.128"),
               pipeline_violations=[], pipeline_allowed=[])
    spilling = dict(row, local=16, spills=True)
    failed = dict(row, error="CompilationError: boom", registers=None, opcodes={}, hmma=0, pipeline=None)
    draining = dict(row, pipeline_violations=["1 drain(s) between K loops"])
    allowed = dict(row, pipeline_allowed=["1 drain(s) [b scales the finished rank sum]"])
    for rows, stale, status in (([row], [], 0), ([row, spilling], [], 1), ([row, failed], [], 1), ([], [], 1),
                                ([row, draining], [], 1), ([row, allowed], [], 0), ([row], ["_k X: why"], 1)):
        result = dict(environment=dict(triton="x"), seconds=1.0, totals=static.totals(rows, stale), rows=rows)
        monkeypatch.setattr(static, "report", lambda argv=(), result=result: result)
        assert verify.main(["--static", "--json", str(tmp_path / "s.json")]) == status
        assert json.loads((tmp_path / "s.json").read_text())["totals"] == static.totals(rows, stale)
    out = capsys.readouterr().out
    assert "SPILLS" in out and "FAILED: CompilationError: boom" in out and "PIPELINE: 1 drain(s) between K loops" in out
    assert "ok (allowed: 1 drain(s) [b scales the finished rank sum])" in out
    assert "stale allowance (no compiled kernel needs it; remove it): _k X: why" in out


def test_the_pipeline_rule_holds_for_every_kernel_but_its_allowances(monkeypatch):
    monkeypatch.setattr(static, "PIPELINE_ALLOWANCES", (
        static.Allowance("_k", ("USE_TMA",), ("HAS_IDS",), 1, 0, "drains"),
        static.Allowance("_k", ("GEN",), (), 0, 1, "waits")))
    judge = static.judge_pipeline
    assert judge("_k", "HAS_BIAS USE_TMA", _pipeline(1, 1, drains=1)) == ([], ["1 drain(s) [drains]"])
    # An allowance covers its count of its own finding, nothing more, and only the variant it names.
    assert judge("_k", "USE_TMA", _pipeline(1, 1, 1, drains=2)) == (["1 drain(s) between K loops"],
                                                                    ["1 drain(s) [drains]"])
    assert judge("_k", "USE_TMA", _pipeline(0, 1))[0] == ["wgmma K loop at 0x100 waits to depth 0"]
    assert judge("_k", "USE_TMA HAS_IDS", _pipeline(1, 1, drains=1))[0] == ["1 drain(s) between K loops"]
    assert judge("_other", "USE_TMA", _pipeline(1, 1, drains=1))[0] == ["1 drain(s) between K loops"]
    assert judge("_k", "GEN USE_TMA", _pipeline(0, 1, drains=1)) == (
        [], ["1 drain(s) [drains]", "1 wait(s) to depth 0 [waits]"])
    assert judge("_k", "GEN", _pipeline(0, 0))[0] == ["wgmma K loop at 0x200 waits to depth 0"]
    # A mma.sync loop has no wgmma wait to judge; a wgmma loop without a DEPBAR waits nowhere inside.
    mma_sync = dict(_pipeline(), loops=[dict(start=0x10, end=0x80, wgmma=False, mmas=8, wait_depth=None)])
    assert judge("_other", "", mma_sync) == ([], []) and judge("_other", "", _pipeline(None)) == ([], [])


def test_an_allowance_nothing_needs_is_stale(monkeypatch):
    monkeypatch.setattr(static, "PIPELINE_ALLOWANCES", (static.Allowance("_k", ("USE_TMA",), (), 1, 0, "drains"),))
    rows = [dict(kernel="_k", flags="USE_TMA", hgmma=8, pipeline=_pipeline(1, 1, drains=d)) for d in (0, 1)]
    for r in rows:
        r["pipeline_violations"], r["pipeline_allowed"] = static.judge_pipeline(r["kernel"], r["flags"], r["pipeline"])
    assert static.stale_allowances(rows) == []
    assert static.stale_allowances(rows[:1]) == ["_k USE_TMA: drains"]  # compiled, matched, never used
    assert static.stale_allowances([dict(rows[1], hgmma=0)]) == []  # no wgmma kernel matched: nothing to judge


def test_the_rank_and_fused_gemms_pass_the_rule_without_allowances_but_the_listed_ones():
    # docs/DESIGN.md section 4: the rank GEMMs pass in every variant but the on-the-fly shrink; the fused GEMM's
    # vera_delta and pointer dx (one loop over [in | r]) pass; the forward with a base GEMM, the TMA dx and
    # the on-the-fly variants keep one finding each.
    assert not static.allowances("_rank_gemm_kernel", "MODE=1 OUT_KIND=1")
    assert not static.allowances("_rank_gemm_kernel", "MODE=2 DBIAS ON_THE_FLY OUT_KIND=2")
    assert [a.waits_to_zero for a in static.allowances("_rank_gemm_kernel", "SPLIT GENERATE_P P_ROW_IS_R")] == [1]
    assert not static.allowances("_fused_gemm_kernel", "HAS_BASE_GEMM OUT_KIND=1")  # pointer dx
    assert not static.allowances("_fused_gemm_kernel", "SCALE_R HAS_BASE_OUT USE_TMA TMA_STORE P_IS_NK")
    assert [a.drains for a in static.allowances("_fused_gemm_kernel", "HAS_BASE_GEMM SCALE_R USE_TMA TMA_STORE")] == [1]
    assert [a.drains for a in static.allowances("_fused_gemm_kernel", "HAS_BASE_GEMM USE_TMA TMA_STORE")] == [1]


@pytest.fixture(scope="module")
def compiled():
    """A few real compilations in a process without the interpreter: the projection kernels, and the forward
    of vera_linear in bf16 under the config verify runs."""
    try:
        return static.report(["--scenario", "philox4x32-10", "--scenario", "projections", "--scenario", "vera_linear",
                              "--scenario", "vera_linear (TMA)", "--dtype", "bf16", "--m", "1", "--m", "512",
                              "--configs", "first"])
    except RuntimeError as exc:
        if "cuobjdump not found" in str(exc):
            pytest.skip(str(exc))
        raise


def test_kernels_compile_for_hopper_and_ampere(compiled):
    rows = compiled["rows"]
    assert static.passed(compiled), static.format_rows(rows)
    names = {r["kernel"] for r in rows}
    assert {"_philox_kernel", "_fill_projection_kernel", "_rank_gemm_kernel", "_fused_gemm_kernel"} <= names
    for r in rows:
        where = f"{r['kernel']} {r['sm']} {r['flags']} {r['config']}"
        assert {x["sm"] for x in rows if x["kernel"] == r["kernel"]} >= {"sm_90a", "sm_80"}, where
        if r["kernel"] == "_fused_gemm_kernel":  # bf16 dots: on the tensor cores
            wide = int(r["config"].split("x")[0]) >= 64
            expected = "hgmma" if r["arch"] == 90 and wide else "hmma"  # wgmma takes 64-row warpgroup tiles
            assert r[expected] > 0, f"{where}: no {expected.upper()}"
        if "USE_TMA" in r["flags"].split():
            assert r["arch"] == 90 and r["opcodes"].get("UTMALDG", 0) > 0, f"{where}: no TMA load"
        if r["hgmma"] or r["hmma"]:  # the SASS parse finds the tensor-core K loops of real compiles
            loops = r["pipeline"]["loops"]
            assert loops and all(loop["wgmma"] == bool(r["hgmma"]) for loop in loops), where
        assert r["blocks_per_sm"] >= 1 and r["pipeline"]["store"] != "none", where
    # The TMA forward as compiled: a TMA-store epilogue, and the one drain its allowance names (b scales the
    # finished rank sum before the base GEMM adds to it), nothing more.
    tma = [r for r in rows if r["kernel"] == "_fused_gemm_kernel" and r["hgmma"] and "USE_TMA" in r["flags"].split()]
    assert tma and all(r["pipeline"]["store"] == "TMA" for r in tma)
    assert all(r["pipeline_allowed"] == ["1 drain(s) [b scales the finished rank sum]"] for r in tma), [
        r["pipeline"]["summary"] for r in tma]


def test_triton_does_not_pipeline_a_k_loop_choosing_its_descriptors_per_step():
    """What the allowance "a TMA loop per source" rests on (tests/pipeline_probes.py): one K loop over
    [x | t] · [w ; p] picking its TMA descriptors per step compiles to wgmma waiting to depth 0 every step,
    with or without Triton's warp specialization, while a loop per source keeps a group in flight and drains
    once per tile between them. The day a Triton pipelines the one loop, this fails: fold the fused GEMM's
    TMA loops into one and drop the allowance."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pipeline_probes.py")
    done = subprocess.run([sys.executable, probe], env=env, capture_output=True, text=True)
    if "cuobjdump not found" in done.stderr:
        pytest.skip("cuobjdump not found")
    assert done.returncode == 0, done.stderr[-3000:]
    probes = json.loads(done.stdout)
    assert [loop["wait_depth"] for loop in probes["per_step"]["loops"]] == [0], probes["per_step"]["summary"]
    assert probes["two_loops"]["drains"] == 1 and probes["two_loops"]["store"] == "TMA"


def test_static_cli_prints_the_totals():
    done = subprocess.run([sys.executable, "-m", "vera_kernels.triton.static", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--configs" in done.stdout


def test_plan_rows_compile_each_launch_at_the_shape():
    """bench.plan's view (static.plan_rows through the CLI's --plan): every launch of the forward and the
    backward in order, compiled for sm_90a, with its grid at the shape and its pipeline from the SASS."""
    try:
        rows = static.report(["--plan", "512,512,512,256", "--dtype", "bf16"])
    except RuntimeError as exc:
        if "cuobjdump not found" in str(exc):
            pytest.skip(str(exc))
        raise
    assert [r["kernel"] for r in rows["forward"]] == ["_rank_gemm_kernel", "_fused_gemm_kernel"]
    assert [r["kernel"] for r in rows["backward"]][-1] == "_fused_gemm_kernel"
    for r in rows["forward"] + rows["backward"]:
        assert r["error"] is None and r["sm"] == "sm_90a" and r["blocks_per_sm"] >= 1 and r["programs"] >= 1
    gemm = rows["forward"][-1]
    block_m, block_n = (int(b) for b in gemm["config"].split("x")[:2])
    assert "USE_TMA" in gemm["flags"].split() and gemm["pipeline"]["store"] == "TMA"
    assert gemm["units"] == -(-512 // block_m) * -(-512 // block_n)  # the persistent GEMM's waves count tiles
    assert gemm["waves"] == pytest.approx(gemm["units"] / (132 * gemm["blocks_per_sm"]))
    assert all(loop["wgmma"] and loop["wait_depth"] >= 1 for loop in gemm["pipeline"]["loops"])
    # The backward's rank GEMMs (G = gᵀ s, then dt = g (b ⊙ B) with the fold from memory) are under the
    # pipeline rule and keep a wgmma group in flight (dt's loop waited to 0 while it scaled g in registers).
    ranks = [r for r in rows["backward"] if r["kernel"] == "_rank_gemm_kernel"]
    modes = [next(f for f in r["flags"].split() if f.startswith("MODE=")) for r in ranks]
    assert modes == ["MODE=2", "MODE=1"], [r["flags"] for r in ranks]
    for r in ranks:
        assert not r["pipeline_violations"] and not r["pipeline_allowed"], r["pipeline"]["summary"]
        loops = r["pipeline"]["loops"]
        assert loops and all(loop["wgmma"] and loop["wait_depth"] >= 1 for loop in loops), r["pipeline"]["summary"]
