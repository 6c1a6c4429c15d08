"""How fp8 values' storage layout decides what their product with the probabilities costs,
found offline: one tile loop ``acc += p @ v`` (16 query rows, ``--tokens`` tokens, ``--head-dim``
channels, e4m3 values widened to fp16 as the decode kernel's packed tiles do) compiled for
sm_90 in three layouts, its loop's SASS counted as ``registers.py --loop`` counts the decode
kernel's.

- ``rows``: the arena's layout, each token's channels back to back. The product reduces over
  tokens; with 8-bit values Triton loads each thread's four tokens of a channel one byte
  each (``LDS.U8``; ``ldmatrix`` has no 8-bit transposing form on sm_90).
- ``words``: four tokens of a channel in one 32-bit word, loaded as words and unpacked.
- ``interleaved``: the same bytes loaded as a ``[tokens, channels]`` byte tile through
  their addresses (token ``t``, channel ``c`` at ``(t // 4) * 4d + 4c + t % 4``), so the
  compiler sees runs of four tokens and loads each thread's operand as one word. The arena
  stores fp8 values so since, in groups of 8 tokens (:func:`mosaickv.kernels.layout.group_fp8_values`).

    python benchmarks/kernels/fp8_value_layout.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).parent))
from registers import loop_census, resources  # noqa: E402

LAYOUTS = ("rows", "words", "interleaved")


@triton.jit
def _byte_fp16(w, SHIFT: tl.constexpr):
    return ((w >> SHIFT) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)


@triton.jit
def _values_product(v_ptr, p_ptr, o_ptr, n_tiles, N: tl.constexpr, D: tl.constexpr, LAYOUT: tl.constexpr):
    m = tl.arange(0, 16)
    t = tl.arange(0, N)
    c = tl.arange(0, D)
    g = tl.arange(0, N // 4)
    p = tl.load(p_ptr + m[:, None] * N + t[None, :])
    acc = tl.zeros([16, D], tl.float32)
    for i in tl.range(0, n_tiles, num_stages=3):
        tile = v_ptr + i * N * D
        if LAYOUT == 0:
            v = tl.load(tile + t[:, None] * D + c[None, :]).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        elif LAYOUT == 1:
            w = tl.load(tile.to(tl.pointer_type(tl.int32)) + g[:, None] * D + c[None, :])
            v4 = tl.join(tl.join(_byte_fp16(w, 0), _byte_fp16(w, 8)), tl.join(_byte_fp16(w, 16), _byte_fp16(w, 24)))
            v = tl.reshape(tl.permute(v4, (0, 3, 2, 1)), (N, D))  # [g, y, x, c]: token 4g + 2y + x
        else:
            v = tl.load(tile + (t[:, None] // 4) * (4 * D) + c[None, :] * 4 + t[:, None] % 4)
            v = v.to(tl.float8e4nv, bitcast=True).to(tl.float16)
        acc += tl.dot(p, v)
    tl.store(o_ptr + m[:, None] * D + c[None, :], acc)


def census(layout: str, tokens: int, head_dim: int, warps: int = 4) -> dict:
    """One layout's tile loop compiled for sm_90: registers, stack, and one pass's census."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 defines the kernel for the interpreter: unset it to compile")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {', '.join(LAYOUTS)}")
    names = _values_product.arg_names
    const = {"N": tokens, "D": head_dim, "LAYOUT": LAYOUTS.index(layout)}
    sig = {"v_ptr": "*u8", "p_ptr": "*fp16", "o_ptr": "*fp32", "n_tiles": "i32", **{k: "constexpr" for k in const}}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if name.endswith("_ptr")}
    src = ASTSource(fn=_values_product, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1})
    return {"layout": layout, "tokens": tokens, "head_dim": head_dim, "warps": warps, **resources(kernel.asm["cubin"]),
            **loop_census(kernel.asm["cubin"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for d in args.head_dim:
        for n in args.tokens:
            for layout in LAYOUTS:
                row = census(layout, n, d)
                rows.append(row)
                print(f"d {d:3d} tokens {n:3d} {layout:11s}: {row['registers']:3d} registers, "
                      f"loop {row['loop_instructions']} instructions, {row['loop_lds_bytes']} byte-wide shared loads, "
                      f"{row['loop_ldsm']} ldmatrix, {row['loop_sts']} shared stores", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "target": "sm_90",
                                               "command": " ".join(["python", *sys.argv]), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
