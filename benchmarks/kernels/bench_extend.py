"""Extend benchmark: a prefill chunk's dense part in our mixed-format kernel vs SGLang's.

Since the extend split (``sglang_patch.attention.extend_attention``) a prefill's dense
rows and new tokens go to SGLang's Triton extend kernel, the one ``--attention-backend
triton`` runs for ``none``, and only its sealed blocks to the mixed-format kernels. This
measures the part that moved, side by side in one run: ``nq`` new tokens attending
causally to themselves after a dense prefix of ``P`` tokens, through

* ``ours``: :class:`~mosaickv.kernels.extend.MixedExtendWrapper` with the server's extend
  tiles and one item per (row block, KV head) (``WHOLE_RUNS``, as ``plan_forward`` cuts
  an extend), and
* ``sglang``: ``extend_attention_fwd`` with its log-sum-exp (what the split calls).

Both outputs are checked against each other before timing. ``--tiles`` adds the part
that stayed: the same chunk over a prefix of ``P`` sealed tokens (32-token segments in a
mix of formats near ``mosaic`` at 3x, packed by ``pack_block``) and no dense row, in our
kernel with each ``BLOCK_MxBLOCK_N`` tile (the server's is EXTEND_TUNING's, 64x32), one block per tile and
dense blocks packed (``pack_tokens``, the server's with 32-token segments), checked against the
reference: a tile that does not match is recorded with its error, not timed, and the run
exits 1 after writing the JSON. Medians (``do_bench``) on a GPU; on the CPU (``--smoke``, Triton interpreter)
one timed run of a tiny shape, for tests.

    python benchmarks/kernels/bench_extend.py --json OUT.json [--chunk 8192] [--prefix 0 8192 24576] \
        [--tiles 32x32 64x32 64x64]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from mosaickv.formats import BlockFormat, SideFormat
from mosaickv.kernels._interpret import patch_interpreter
from mosaickv.kernels.extend import MixedExtendWrapper
from mosaickv.kernels.synthetic import random_layer
from mosaickv.reference import CompressedLayer, attention
from mosaickv.sglang_patch.attention import EXTEND_TUNING
from mosaickv.sglang_patch.forward_inputs import WHOLE_RUNS

patch_interpreter()


def median_s(fn, device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median")) * 1e-3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def row(prefix: int, nq: int, hq: int, hkv: int, d: int, device: torch.device) -> dict:
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

    g = torch.Generator(device="cpu").manual_seed(prefix + nq)
    t = prefix + nq
    k, v = (torch.randn(t, hkv, d, generator=g).to(device, torch.bfloat16) for _ in range(2))
    q = torch.randn(nq, hq, d, generator=g).to(device, torch.bfloat16)
    scale = 1 / math.sqrt(d)

    ours = MixedExtendWrapper(EXTEND_TUNING.block_m, EXTEND_TUNING.block_n, pack_tokens=EXTEND_TUNING.pack_tokens)
    ours.plan([CompressedLayer()], [k.transpose(0, 1).contiguous()], [v.transpose(0, 1).contiguous()], [nq], hq, hkv,
              d, device, scale, chunk_tokens=WHOLE_RUNS)
    out_ours = ours.run(q)

    qo_indptr = torch.tensor([0, nq], dtype=torch.int32, device=device)
    kv_indptr = torch.tensor([0, prefix], dtype=torch.int32, device=device)
    kv_indices = torch.arange(prefix, dtype=torch.int64, device=device)
    out_sglang = torch.empty(nq, hq, d, dtype=torch.float32, device=device)
    lse = torch.empty(nq, hq, dtype=torch.float32, device=device)

    def sglang() -> None:
        extend_attention_fwd(q, k[prefix:], v[prefix:], out_sglang, k, v, qo_indptr, kv_indptr, kv_indices, None, True,
                             None, nq, 1.0, 1.0, sm_scale=scale, lse_extend=lse)

    sglang()
    torch.testing.assert_close(out_ours.float(), out_sglang, atol=2e-2, rtol=2e-2,
                               msg=lambda m: f"P={prefix} nq={nq}: the two kernels differ. {m}")
    err = (out_ours.float() - out_sglang).abs().max().item()
    s_ours, s_sglang = median_s(lambda: ours.run(q), device), median_s(sglang, device)
    flops = 4 * nq * hq * d * (prefix + (nq + 1) / 2)  # causal: each query sees the prefix and half the chunk
    return {"prefix": prefix, "chunk": nq, "heads": f"{hq}/{hkv}", "head_dim": d, "max_abs_diff": err,
            "ours_ms": round(s_ours * 1e3, 3), "sglang_ms": round(s_sglang * 1e3, 3),
            "ours_tflops": round(flops / s_ours / 1e12, 1), "sglang_tflops": round(flops / s_sglang / 1e12, 1),
            "sglang_speedup": round(s_ours / s_sglang, 2)}


SEGMENT = 32  # the presets' segment_size


def sealed_mix(d: int) -> list[BlockFormat]:
    """Formats near what ``mosaic`` chose at 3x on real text (docs/policies.md): few kept
    tokens with dense sides, half with narrowed values, some low-rank, some dropped."""
    return [BlockFormat(8), BlockFormat(16, SideFormat("dense"), SideFormat("sparse", d // 4)),
            BlockFormat(16, SideFormat("sparse", d // 4), SideFormat("sparse", d // 4)),
            BlockFormat(SEGMENT, SideFormat("lowrank", d // 8), SideFormat("lowrank", d // 8)), BlockFormat(0)]


def sealed_rows(prefix: int, nq: int, hq: int, hkv: int, d: int, tiles: list[str], device: torch.device) -> list[dict]:
    """Our kernel over ``prefix`` sealed tokens for ``nq`` new queries, with each tile."""
    g = torch.Generator().manual_seed(prefix)
    mix = sealed_mix(d)
    layer = CompressedLayer()
    for seg in range(prefix // SEGMENT):
        layer.append(random_layer(g, 1, SEGMENT, hkv, d, fmt=mix[seg % len(mix)]).blocks[0])
    q = torch.randn(nq, hq, d, generator=g).bfloat16()
    empty = torch.zeros(hkv, 0, d)
    ref = attention(q.transpose(0, 1), layer, empty, empty).transpose(0, 1)
    rows = []
    for tile, pack in ((t, p) for t in tiles for p in (False, True)):
        block_m, block_n = (int(x) for x in tile.split("x"))
        ours = MixedExtendWrapper(block_m, block_n, pack_tokens=pack)
        ours.plan_layers([layer], [empty], [empty], [nq], hq, hkv, d, device, 1 / math.sqrt(d), chunk_tokens=WHOLE_RUNS)
        qd = q.to(device)
        out = ours.run(qd).float().cpu()
        try:
            torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)
        except AssertionError as err:  # recorded, not timed: a wrong tile has no speed
            bad = ~torch.isclose(out, ref, atol=3e-2, rtol=3e-2)
            rows.append({"sealed_prefix": prefix, "chunk": nq, "tile": tile, "packed": pack, "error": str(err).splitlines()[0],
                         "mismatched": round(float(bad.float().mean()), 4), "nan": bool(out.isnan().any())})
            print(json.dumps(rows[-1]), flush=True)
            continue
        rows.append({"sealed_prefix": prefix, "chunk": nq, "tile": tile, "packed": pack, "ours_ms": round(median_s(lambda: ours.run(qd), device) * 1e3, 3)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunk", type=int, default=8192, help="new tokens (SGLang's default chunked prefill size)")
    ap.add_argument("--prefix", type=int, nargs="+", default=[0, 8192, 24576], help="dense prefix tokens before them")
    ap.add_argument("--heads", default="32/8", help="query/KV heads (the 8B shape)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tiles", nargs="*", default=[], metavar="MxN",
                    help="also time our kernel over a sealed prefix of each --prefix size (> 0) with these tiles")
    ap.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU (Triton interpreter)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    hq, hkv = (int(x) for x in args.heads.split("/"))
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            ap.error("--smoke runs the kernels under TRITON_INTERPRET=1")
        device, args.chunk, args.prefix = torch.device("cpu"), 40, [0, 3 * SEGMENT + 5]
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        ap.error("the benchmark needs a GPU (or --smoke under TRITON_INTERPRET=1)")
    rows = []
    for prefix in args.prefix:
        rows.append(row(prefix, args.chunk, hq, hkv, args.head_dim, device))
        print(json.dumps(rows[-1]), flush=True)
    sealed = [r for prefix in args.prefix if prefix >= SEGMENT
              for r in sealed_rows(prefix, args.chunk, hq, hkv, args.head_dim, args.tiles, device)]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    result = {"command": "python benchmarks/kernels/bench_extend.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "device": device_name, "rows": rows, "sealed_rows": sealed}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    failed = [r["tile"] for r in sealed if "error" in r]
    if failed:
        print(f"tiles that do not match the reference: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
