"""The compiled evidence behind the static check's allowance "a TMA loop per source" (static.py,
docs/DESIGN.md section 4): three forms of one GEMM over the K concatenation [x | t] · [w ; p] with
tensor-descriptor (TMA) loads, compiled for sm_90a in bf16 at the fused GEMM's wide tile,
  per_step                    ONE K loop that picks its two descriptors per step,
  per_step_warp_specialized   the same kernel with that loop under Triton's automatic warp specialization,
  two_loops                   a K loop per source, one accumulator (what the fused GEMM does),
and each one's software pipeline as its SASS has it (sass.py), as JSON on stdout; the exit status is 1 when
the evidence no longer holds (``problems``: a Triton that pipelines the one loop).

    python tests/pipeline_probes.py          (no GPU; needs cuobjdump; never under TRITON_INTERPRET)

tests/test_static.py runs it under the newest Triton, CI under Triton 3.6 too: while Triton compiles per_step
to a wgmma wait to depth 0 every step, the two loops and their one drain per tile are the better pipeline.
"""

import json
import os
import sys
import tempfile

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vera_kernels.triton import static  # noqa: E402

BLOCK_M, BLOCK_N, BLOCK_K, WARPS, STAGES = 128, 256, 64, 8, 3  # the TMA forward's first config


@triton.jit
def per_step(xd, wd, td, pd, od, K_BASE, K_ADAPTER, WARP_SPECIALIZE: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    n0 = tl.program_id(1) * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    base_steps = tl.cdiv(K_BASE, BLOCK_K)
    for step in tl.range(0, base_steps + tl.cdiv(K_ADAPTER, BLOCK_K), warp_specialize=WARP_SPECIALIZE):
        if step < base_steps:
            a = xd.load([m0, step * BLOCK_K])
            p = wd.load([step * BLOCK_K, n0])
        else:
            a = td.load([m0, (step - base_steps) * BLOCK_K])
            p = pd.load([(step - base_steps) * BLOCK_K, n0])
        acc = tl.dot(a, p, acc)
    od.store([m0, n0], acc.to(tl.bfloat16))


@triton.jit
def two_loops(xd, wd, td, pd, od, K_BASE, K_ADAPTER,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    n0 = tl.program_id(1) * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_BASE, BLOCK_K):
        acc = tl.dot(xd.load([m0, k0]), wd.load([k0, n0]), acc)
    for k0 in range(0, K_ADAPTER, BLOCK_K):
        acc = tl.dot(td.load([m0, k0]), pd.load([k0, n0]), acc)
    od.store([m0, n0], acc.to(tl.bfloat16))


def main() -> dict:
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, k, n, r = 512, 512, 512, 256
    desc = lambda rows, cols, block: TensorDescriptor(torch.empty(rows, cols, dtype=torch.bfloat16),  # noqa: E731
                                                       [rows, cols], [cols, 1], block)
    args = dict(xd=desc(m, k, [BLOCK_M, BLOCK_K]), wd=desc(k, n, [BLOCK_K, BLOCK_N]),
                td=desc(m, r, [BLOCK_M, BLOCK_K]), pd=desc(r, n, [BLOCK_K, BLOCK_N]),
                od=desc(m, n, [BLOCK_M, BLOCK_N]), K_BASE=k, K_ADAPTER=r)
    config = triton.Config(dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K), num_warps=WARPS,
                           num_stages=STAGES)
    forms = dict(per_step=(per_step, False), per_step_warp_specialized=(per_step, True), two_loops=(two_loops, None))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TRITON_CACHE_DIR"] = tmp
        for name, (fn, warp_specialize) in forms.items():
            signature, constexprs, attrs = static.compile_spec(fn, dict(args, WARP_SPECIALIZE=warp_specialize), config)
            compiled = static._compile(fn, signature, constexprs, attrs, WARPS, STAGES, 90)
            out[name] = static.analyse(compiled.asm["cubin"], tmp)["pipeline"]
    return out


def problems(probes: dict) -> list[str]:
    """What no longer holds of the allowance's evidence (empty: it all holds)."""
    out = []
    for name in ("per_step", "per_step_warp_specialized"):
        if not any(loop["wgmma"] and loop["wait_depth"] == 0 for loop in probes[name]["loops"]):
            out.append(f"Triton {triton.__version__} pipelines {name} ({probes[name]['summary']}): fold the fused "
                       "GEMM's TMA loops into one and drop the allowance 'a TMA loop per source'")
    two = probes["two_loops"]
    if [loop["wait_depth"] for loop in two["loops"]] != [1, 1] or two["drains"] != 1 or two["store"] != "TMA":
        out.append(f"two_loops is not two loops at depth 1 with one drain and a TMA store: {two['summary']}")
    return out


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run with TRITON_INTERPRET unset: this compiles for sm_90a")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    probes = main()
    print(json.dumps(dict(triton=triton.__version__, **probes)))
    found = problems(probes)
    print("\n".join(found) or f"Triton {triton.__version__}: the evidence holds", file=sys.stderr)
    sys.exit(1 if found else 0)
