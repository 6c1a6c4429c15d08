"""What a tile a warp costs without packing: a minimal decode loop, compiled for sm_90
offline, whose warps each read their own contiguous tile of ``--tokens`` keys and values
(no block table, no masks) and keep their own softmax state, merged once at the end.

It bounds what ``MixedAttention(warp_tiles=True)`` could reach: the packed launch's
census (``registers.py --warp-tiles --loop``) minus this one is what the packed tile's
row bases cost in the loop.

    PYTHONPATH=DIR_WITH_TRITON_3_6 python benchmarks/kernels/probe_warp_tiles.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).parent))
from registers import loop_census, occupancy, resources, shared_buffers  # noqa: E402


@triton.jit
def _warp_tiles_probe(q_ptr, k_ptr, v_ptr, o_ptr, n_tiles, W: tl.constexpr, M: tl.constexpr, N: tl.constexpr,
                      D: tl.constexpr, STAGES: tl.constexpr):
    w = tl.arange(0, W)[:, None, None]
    n = tl.arange(0, N)[None, :, None]
    d = tl.arange(0, D)[None, None, :]
    q = tl.load(q_ptr + tl.arange(0, M)[None, :, None] * D + d + w * 0)
    m_w = tl.full([W, M], float("-inf"), tl.float32)
    l_w = tl.zeros([W, M], tl.float32)
    acc = tl.zeros([W, M, D], tl.float32)
    for t in tl.range(0, n_tiles, num_stages=STAGES):
        rows = ((t * W + w) * N + n) * D + d
        kt = tl.load(k_ptr + rows)
        vt = tl.load(v_ptr + rows)
        s = tl.dot(q, tl.trans(kt, (0, 2, 1)))
        m_new = tl.maximum(m_w, tl.max(s, 2))
        alpha = tl.exp2(m_w - m_new)
        p = tl.exp2(s - m_new[:, :, None])
        l_w = l_w * alpha + tl.sum(p, 2)
        acc = acc * alpha[:, :, None] + tl.dot(p.to(tl.bfloat16), vt)
        m_w = m_new
    m = tl.max(m_w, 0)
    scale = tl.exp2(m_w - m[None, :])
    o = tl.sum(acc * scale[:, :, None], 0) / tl.sum(l_w * scale, 0)[:, None]
    tl.store(o_ptr + tl.arange(0, M)[:, None] * D + tl.arange(0, D)[None, :], o)


def compile_probe(warps: int, tokens: int, stages: int, max_registers: int, head_dim: int = 128,
                  rows: int = 16) -> dict:
    names = _warp_tiles_probe.arg_names
    const = dict(W=warps, M=rows, N=tokens, D=head_dim, STAGES=stages)
    sig = {n: "constexpr" if n in const else ("i32" if n == "n_tiles" else "*bf16") for n in names}
    sig["o_ptr"] = "*fp32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n] != "constexpr"}
    src = ASTSource(fn=_warp_tiles_probe, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs=attrs)
    options = {"num_warps": warps, "num_stages": 1, **({"maxnreg": max_registers} if max_registers else {})}
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    return {**kernel.asm, "shared_bytes": kernel.metadata.shared}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 32], help="tokens of a warp's tile")
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--max-registers", type=int, nargs="+", default=[0, 128])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = []
    for tokens in args.tokens:
        for stages in args.stages:
            for max_registers in args.max_registers:
                asm = compile_probe(args.warps, tokens, stages, max_registers)
                row = {"tokens": tokens, "stages": stages, "max_registers": max_registers, **resources(asm["cubin"]),
                       **loop_census(asm["cubin"]), "shared_buffers": shared_buffers(asm["ttgir"]),
                       "shared_bytes": asm["shared_bytes"]}
                row["occupancy"] = occupancy(row["registers"], args.warps, row["shared_bytes"])
                rows.append(row)
                print(f"{tokens} tokens a warp, {stages} stages, maxnreg {max_registers or '-'}: {row['registers']} "
                      f"registers, stack {row['stack_bytes']} B, loop {row['loop_instructions']} instructions, "
                      f"{row.get('loop_bar', 0)} barriers", flush=True)
    result = {"triton": triton.__version__, "target": "sm_90", "warps": args.warps, "rows": rows,
              "command": " ".join(["python", "benchmarks/kernels/probe_warp_tiles.py",
                                   *(argv if argv is not None else sys.argv[1:])])}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
