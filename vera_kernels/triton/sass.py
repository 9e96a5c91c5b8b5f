"""The software pipeline of a compiled kernel as its SASS has it (``cuobjdump -sass`` text), and its
occupancy: what the static check (static.py) reports per kernel and bench/plan.py prints beside each
Triton launch.

What is read, and how (mnemonics as cuobjdump prints them for sm_90a):
  K loop        an innermost loop that issues tensor-core work: a *conditional* backward branch
                (``@!P4 BRA <lower address>``) whose body holds HGMMA (wgmma) or HMMA (mma.sync), and no
                other such loop. Unconditional backward branches are the persistent tile loop's back edge
                or a jump back from an out-of-line mbarrier retry (``SYNCS.PHASECHK ...; BRA``), not K loops.
  wait depth    per wgmma K loop, the smallest N of ``WARPGROUP.DEPBAR.LE gsb0, 0xN`` inside it: how many
                wgmma groups stay in flight while the next stage's loads are issued. 0 serializes loads and
                tensor cores (the loop waits for its own wgmma every step); a loop without a DEPBAR waits
                nowhere inside (None).
  drain         between two consecutive K loops: a ``WARPGROUP.DEPBAR.LE gsb0, 0x0`` (every wgmma done)
                with no global store in between (the same tile's accumulator goes on into the next loop:
                the pipeline empties and refills, a second prologue), typically with the mbarriers
                invalidated and re-initialized (``SYNCS.CCTL.IV``).
  store kind    the epilogue's global stores: ``TMA`` (UTMASTG, the tensor-memory store) or ``STG.E.<bits>``
                (synchronous per-thread stores; the widest seen).
Occupancy: blocks per SM from registers (allocated per warp in units of 256), shared memory and the warp
limit (sm_90: 64K registers, 228 KB shared memory, 64 warps, 32 blocks per SM).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# "/*1c70*/  @!P4 BRA 0x1770 ;" : address, optional predicate, opcode (with its modifiers), operands.
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_DEPBAR = re.compile(r"gsb0\s*,\s*(0x[0-9a-f]+|\d+)")


@dataclass(frozen=True)
class Instruction:
    address: int
    predicated: bool
    opcode: str  # with modifiers: "WARPGROUP.DEPBAR.LE", "STG.E.128"
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


@dataclass
class KLoop:
    start: int  # the branch target (first instruction of the loop)
    end: int  # the address of the backward branch
    wgmma: bool  # HGMMA (wgmma) in the body, else HMMA (mma.sync)
    mmas: int  # tensor-core instructions in the body
    wait_depth: int | None  # smallest DEPBAR.LE gsb0 depth in the body (wgmma loops; None: no wait)

    def describe(self) -> str:
        if not self.wgmma:
            return f"mma.sync x{self.mmas}"
        return f"wgmma x{self.mmas} wait {'-' if self.wait_depth is None else self.wait_depth}"


@dataclass
class Pipeline:
    loops: list = field(default_factory=list)  # KLoop, in address order
    drains: int = 0  # how many consecutive K-loop pairs drain between them
    store: str = "none"  # "TMA", "STG.E.128", ... or "none"

    def describe(self) -> str:
        loops = "; ".join(loop.describe() for loop in self.loops) or "no K loop"
        return f"{loops}; drains {self.drains}; store {self.store}"

    def as_dict(self) -> dict:
        return dict(loops=[dict(start=loop.start, end=loop.end, wgmma=loop.wgmma, mmas=loop.mmas,
                                wait_depth=loop.wait_depth) for loop in self.loops],
                    drains=self.drains, store=self.store, summary=self.describe())


def instructions(sass: str) -> list[Instruction]:
    out = []
    for m in _LINE.finditer(sass):
        out.append(Instruction(int(m.group(1), 16), bool(m.group(2)), m.group(3), m.group(4).strip()))
    return out


def _branch_target(ins: Instruction) -> int | None:
    if ins.base != "BRA":
        return None
    m = re.search(r"0x[0-9a-f]+", ins.operands)  # cuobjdump prints absolute targets: "BRA 0x1770"
    return int(m.group(0), 16) if m else None


def _depbar_depth(ins: Instruction) -> int | None:
    if not ins.opcode.startswith("WARPGROUP.DEPBAR"):
        return None
    m = _DEPBAR.search(ins.operands)
    return int(m.group(1), 0) if m else None


def pipeline(sass: str) -> Pipeline:
    """The K loops, their wait depths, the drains between them and the epilogue's store kind of one
    kernel's SASS (see the module's docstring)."""
    code = instructions(sass)
    by_range = lambda lo, hi: [i for i in code if lo <= i.address <= hi]  # noqa: E731
    candidates = []
    for ins in code:
        target = _branch_target(ins)
        if target is None or target >= ins.address or not ins.predicated:
            continue
        body = by_range(target, ins.address)
        mmas = [i for i in body if i.base in ("HGMMA", "HMMA")]
        if mmas:
            candidates.append((target, ins.address, body, mmas))
    loops = []
    for target, end, body, mmas in candidates:
        if any(t >= target and e <= end and (t, e) != (target, end) for t, e, *_ in candidates):
            continue  # not innermost
        wgmma = any(i.base == "HGMMA" for i in mmas)
        depths = [d for d in map(_depbar_depth, body) if d is not None]
        loops.append(KLoop(target, end, wgmma, len(mmas), min(depths) if depths else None))
    loops.sort(key=lambda loop: loop.start)
    drains = 0
    for first, second in zip(loops, loops[1:]):
        between = by_range(first.end + 1, second.start - 1)
        stored = any(i.base in ("STG", "UTMASTG") for i in between)
        if not stored and any(_depbar_depth(i) == 0 for i in between):
            drains += 1
    stores = [i.opcode for i in code if i.base in ("STG", "UTMASTG")]
    if any(s.startswith("UTMASTG") for s in stores):
        store = "TMA"
    elif stores:
        store = max(stores, key=lambda s: int(s.rsplit(".", 1)[-1]) if s.rsplit(".", 1)[-1].isdigit() else 32)
    else:
        store = "none"
    return Pipeline(loops, drains, store)


# sm_90 (H100/H200) per-SM limits.
SM90 = dict(registers=65536, shared=233472, warps=64, blocks=32, register_unit=256)
# sm_80 (A100).
SM80 = dict(registers=65536, shared=167936, warps=64, blocks=32, register_unit=256)


def occupancy(registers: int, shared: int, num_warps: int, limits: dict = SM90) -> int:
    """Blocks per SM of a kernel with ``registers`` per thread, ``shared`` bytes per block and
    ``num_warps`` warps (0 when it cannot run)."""
    unit = limits["register_unit"]
    per_warp = -(-registers * 32 // unit) * unit
    by_regs = limits["registers"] // (per_warp * num_warps) if registers else limits["blocks"]
    by_smem = limits["shared"] // shared if shared else limits["blocks"]
    return max(0, min(by_regs, by_smem, limits["warps"] // num_warps, limits["blocks"]))


def waves(programs: int, blocks_per_sm: int, sms: int = 132) -> float:
    """Programs over what the device runs at once (1.45: a second, partial wave)."""
    return programs / max(1, blocks_per_sm * sms)
