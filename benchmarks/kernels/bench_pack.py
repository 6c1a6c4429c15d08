"""Pack benchmark (GPU only): sealing every segment of a long prefill vs the prefill itself.

For one layer of a ``--tokens``-token prefill (default 32k) of the 32/8-head, d=128 shape,
cut into 128-token segments (all of them sealed, as if the prefill were one long span):
the time of :class:`PackWrapper.run` packing all ``segments x 8`` blocks in one launch,
for a mix of every format (about 3x smaller than dense) and for all-dense blocks (a pure
gather, the copy-bandwidth reference), next to the time of that layer's dense causal
prefill attention through torch SDPA (``enable_gqa``). Also the host ``plan`` time, bytes
moved (kept K/V rows read, arena bytes written) and GB/s. Format choice, scores and SVD are the policy's and not timed; the kernel's
cost does not depend on the values, so channel scores and bases are random.

    python benchmarks/kernels/bench_pack.py --out DIR [--tokens 32768]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import triton
import triton.testing

from mosaickv.formats import BlockFormat, SideFormat
from mosaickv.kernels.pack import PackWrapper, SideInputs

HQ, HKV, D, SEGMENT = 32, 8, 128, 128


def mixed_pattern(n: int, d: int) -> list[BlockFormat]:
    """A repeating mix of every kind and token count (about 3x over dense)."""
    return [
        BlockFormat(n, SideFormat("sparse", d // 4), SideFormat("mask", d // 2)),
        BlockFormat(n // 2, SideFormat("sparse", d // 4), SideFormat("sparse", d // 4)),
        BlockFormat(n // 2, SideFormat("lowrank", d // 4), SideFormat("dense")),
        BlockFormat(n, SideFormat("dense"), SideFormat("dense")),
        BlockFormat(n // 4, SideFormat("mask", d // 2), SideFormat("lowrank", d // 4)),
        BlockFormat(n // 8, SideFormat("sparse", d // 4), SideFormat("sparse", d // 4)),
        BlockFormat(0),
        BlockFormat(n, SideFormat("sparse", d // 8), SideFormat("lowrank", d // 8)),
    ]


def batch(fmts: list[BlockFormat], gen: torch.Generator) -> tuple[np.ndarray, torch.Tensor, SideInputs, SideInputs]:
    """Block ``i`` is KV head ``i % HKV`` of segment ``i // HKV``; random kept tokens,
    positive channel weights/scores and random lowrank bases."""
    heads = np.arange(len(fmts)) % HKV
    kept = [
        (i // HKV) * SEGMENT + torch.randperm(SEGMENT, generator=gen)[: f.tokens].sort().values for i, f in enumerate(fmts)
    ]

    def side(s: int) -> SideInputs:
        widths = [(f.k, f.v)[s].width for f in fmts if f.tokens and (f.k, f.v)[s].kind == "lowrank"]
        chan = torch.rand(len(fmts), D, generator=gen) + 0.05
        basis = torch.randn(sum(widths), D, generator=gen) if widths else None
        return SideInputs(chan, basis, None)

    return heads, torch.cat(kept), side(0), side(1)


def bench(fn) -> float:  # type: ignore[no-untyped-def]
    return float(triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")) * 1e-3


def pack_case(name: str, fmts: list[BlockFormat], src_k: torch.Tensor, src_v: torch.Tensor, gen: torch.Generator) -> dict:
    heads, kept, k, v = batch(fmts, gen)
    w = PackWrapper()
    plan_s = []
    for _ in range(5):
        t0 = time.perf_counter()
        plan = w.plan(fmts, heads, kept, D, "cuda", k=k, v=v)
        torch.cuda.synchronize()
        plan_s.append(time.perf_counter() - t0)
    values = torch.empty(plan.values_end, dtype=torch.bfloat16, device="cuda")
    index = torch.empty(plan.index_end, dtype=torch.uint8, device="cuda")
    arena = w.run(src_k, src_v, values, index)
    if name == "dense":  # sanity: an all-dense pack is a gather of the kept rows
        m = fmts[0].tokens
        want = src_k[kept[:m], heads[0]]
        assert torch.equal(arena.values[:m * D].view(m, D), want)
    read = int(kept.numel()) * (2 * D * 2 + 8)  # kept K and V rows (bf16) and their row numbers
    written = arena.nbytes()
    t = bench(lambda: w.run(src_k, src_v, values, index))
    return {
        "case": name,
        "blocks": len(fmts),
        "kept_tokens": int(kept.numel()),
        "items": plan.num_items,
        "bytes_read": read,
        "bytes_written": written,
        "compression": 4 * SEGMENT * D * len(fmts) / max(written, 1),
        "run_s": t,
        "GBps": (read + written) / t / 1e9,
        "plan_s_median": statistics.median(plan_s),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=32768)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_pack needs a CUDA device")
    gen = torch.Generator().manual_seed(0)
    L = args.tokens // SEGMENT * SEGMENT
    segs = L // SEGMENT
    src_k = torch.randn(L, HKV, D, device="cuda").bfloat16()
    src_v = torch.randn(L, HKV, D, device="cuda").bfloat16()
    pattern = mixed_pattern(SEGMENT, D)
    mixed = [pattern[(i // HKV + i % HKV) % len(pattern)] for i in range(segs * HKV)]
    res: dict = {
        "command": " ".join(["python", *sys.argv]),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shape": {"hq": HQ, "hkv": HKV, "d": D, "tokens": L, "segment": SEGMENT, "segments": segs},
        "pack": [pack_case("mixed", mixed, src_k, src_v, gen), pack_case("dense", [BlockFormat(SEGMENT)] * (segs * HKV), src_k, src_v, gen)],
    }
    q = torch.randn(1, HQ, L, D, device="cuda").bfloat16()
    k, v = src_k.transpose(0, 1)[None].contiguous(), src_v.transpose(0, 1)[None].contiguous()
    sdpa = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    res["sdpa_prefill_s"] = sdpa
    for row in res["pack"]:
        row["fraction_of_sdpa"] = row["run_s"] / sdpa
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_pack.json"
    path.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
