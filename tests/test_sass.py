"""The SASS pipeline parse (vera_kernels/triton/sass.py) on SASS captured from real compiles for sm_90a
(tests/data/sass: the lines the parse reads, addresses as cuobjdump printed them)."""

import os

import pytest

from vera_kernels.triton import sass, static

DATA = os.path.join(os.path.dirname(__file__), "data", "sass")


def fixture(name: str) -> str:
    with open(os.path.join(DATA, name)) as f:
        return f.read()


def _violations(p: sass.Pipeline) -> list[str]:
    """The static check's rule on this pipeline, for a kernel without allowances."""
    return static.judge_pipeline("_k", "", p.as_dict())[0]


def test_tma_fused_gemm_two_loops_drain_between_them():
    """Triton 3.9's TMA fused GEMM: two wgmma K loops (in, then r), each at wait depth 1, and a full
    wait (depth 0) between them with no store: the pipeline drains once per tile."""
    p = sass.pipeline(fixture("fused_gemm_tma_two_loops.sass"))
    assert [(l.start, l.end) for l in p.loops] == [(0x1770, 0x1D00), (0x2580, 0x2B10)]
    assert all(l.wgmma and l.wait_depth == 1 and l.mmas == 4 for l in p.loops)
    assert p.drains == 1
    assert p.store == "STG.E.128"
    assert _violations(p) == ["1 drain(s) between K loops"]
    assert p.describe() == "wgmma x4 wait 1; wgmma x4 wait 1; drains 1; store STG.E.128"


def test_register_operand_wgmma_waits_to_zero():
    """MODE_DT as it was, g ⊙ b scaled in registers: wgmma takes it from registers and every wgmma is
    followed by a wait to depth 0."""
    p = sass.pipeline(fixture("rank_gemm_dt.sass"))
    assert len(p.loops) == 1 and p.loops[0].wgmma and p.loops[0].wait_depth == 0
    assert p.drains == 0
    assert _violations(p) == ["wgmma K loop at 0x1750 waits to depth 0"]


def test_mma_sync_loop_has_no_wgmma_rule():
    """Decode tiles (16 rows) take mma.sync (HMMA): a K loop, no wgmma wait to judge."""
    p = sass.pipeline(fixture("rank_gemm_decode.sass"))
    assert len(p.loops) == 1 and not p.loops[0].wgmma and p.loops[0].mmas == 16
    assert _violations(p) == [] and p.describe().startswith("mma.sync x16;")


def test_unconditional_back_edges_and_spin_loops_are_not_k_loops():
    """A tile loop's back edge and an mbarrier retry loop (no tensor-core work) are not K loops; a loop
    that contains another is not innermost; a store between two loops is an epilogue, not a drain."""
    text = "\n".join([
        "/*0100*/ HGMMA.64x256x16.F32.BF16 R24, gdesc[UR16], R24, gsb0 ;",
        "/*0110*/ WARPGROUP.DEPBAR.LE gsb0, 0x1 ;",
        "/*0120*/ @!P4 BRA 0x100 ;",
        "/*0130*/ WARPGROUP.DEPBAR.LE gsb0, 0x0 ;",
        "/*0140*/ STG.E.64 desc[UR24][R2.64], R24 ;",
        "/*0150*/ HGMMA.64x256x16.F32.BF16 R24, gdesc[UR16], R24, gsb0 ;",
        "/*0160*/ @P1 BRA 0x150 ;",
        "/*0170*/ SYNCS.PHASECHK.TRANS64.TRYWAIT P4, [UR14+0x24000], R157 ;",
        "/*0180*/ @!P4 BRA 0x170 ;",
        "/*0190*/ @!P2 BRA 0x100 ;",
        "/*01a0*/ BRA 0x100 ;",
    ])
    p = sass.pipeline(text)
    assert [(l.start, l.end, l.wait_depth) for l in p.loops] == [(0x100, 0x120, 1), (0x150, 0x160, None)]
    assert p.drains == 0 and p.store == "STG.E.64"


def test_tma_store_kind():
    assert sass.pipeline("/*0200*/ UTMASTG.2D [UR4], [UR8] ;\n/*0210*/ STG.E.128 desc[UR4][R2.64], R4 ;").store == "TMA"
    assert sass.pipeline("/*0200*/ EXIT ;").store == "none"


@pytest.mark.parametrize("regs, smem, warps, expected", [
    (226, 147456 + 1024, 8, 1),  # the TMA fused GEMM: shared memory and registers allow one block
    (128, 32768, 4, 4),  # 128 x 32 x 4 = 16K registers a block: 4 blocks
    (32, 0, 4, 16),  # the warp limit: 64 / 4
    (255, 0, 8, 1),
])
def test_occupancy(regs, smem, warps, expected):
    assert sass.occupancy(regs, smem, warps) == expected


def test_waves():
    assert sass.waves(192, 1) == pytest.approx(192 / 132)
    assert sass.waves(132, 1) == 1.0


def test_tma_store_epilogue():
    """The TMA variant with TMA_STORE: the output leaves by two UTMASTG (half-width subtiles), no STG; the
    drain between the in and r loops is still there (Triton cannot pipeline one loop over two descriptors)."""
    p = sass.pipeline(fixture("fused_gemm_tma_store.sass"))
    assert p.store == "TMA" and len(p.loops) == 2 and all(l.wait_depth == 1 for l in p.loops)
    assert p.drains == 1
