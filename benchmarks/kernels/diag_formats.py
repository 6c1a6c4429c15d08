"""Per-format decode bandwidth and launch-parameter sweep (diagnostics for the kernel).

One fixed shape (B=32, L=32k, Hq=32, Hkv=8, d=128); every block in one format (or the
benchmark's 2x/3x/6x mixes); several (num_warps, block_n, wide_block_n, programs per SM,
num_stages, sparse_densify, keys_by_query) settings. Prints and writes JSON.

    PYTHONUNBUFFERED=1 python benchmarks/kernels/diag_formats.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import triton.testing

from mosaickv.kernels.decode import MixedDecodeWrapper
from mosaickv.kernels.synthetic import Recipe, synthetic_arena

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import pattern_for  # noqa: E402

B, L, HQ, HKV, D, SEG = 32, 32768, 32, 8, 128, 128
FORMATS = {
    "dense": [Recipe(SEG, ("dense", 0), ("dense", 0))],
    "sparse32": [Recipe(SEG, ("sparse", 32), ("sparse", 32))],
    "sparseK_denseV": [Recipe(SEG, ("sparse", 32), ("dense", 0))],
    "lowrank32": [Recipe(SEG, ("lowrank", 32), ("lowrank", 32))],
    **{f"mix{t}x": pattern_for(float(t), D)[0] for t in (2, 3, 6)},
}
# (num_warps, block_n, wide_block_n, programs per SM, num_stages, sparse_densify, keys_by_query);
# the first is the path the GPU tests checked before "scan": every other output is compared with it.
SETTINGS = [(4, 32, 32, 8, 1, "search", False), (4, 32, 64, 8, 1, "scan", True), (4, 16, 64, 8, 1, "scan", True),
            (4, 32, 128, 8, 1, "scan", True), (4, 32, 64, 8, 2, "scan", True), (8, 32, 64, 8, 1, "scan", True)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    segs = L // SEG - 1
    tail_len = L - segs * SEG
    tail = torch.empty(B * tail_len, HKV, D, device="cuda", dtype=torch.bfloat16).normal_()
    q = torch.randn(B, HQ, D, device="cuda").bfloat16()
    rows = []
    for name, pattern in FORMATS.items():
        arena, indptr, indices = synthetic_arena(B * HKV, segs, pattern, D, "cuda")
        read = arena.nbytes() + arena.table.numel() * 8 + tail.numel() * 4
        ref = None
        for nw, bn, wide, per_sm, st, densify, kbq in SETTINGS:
            if name in ("dense", "lowrank32") and bn == 16:
                continue  # no sparse tiles: the same kernel as the default
            w = MixedDecodeWrapper(block_n=bn, num_warps=nw, num_stages=st, sparse_densify=densify, keys_by_query=kbq,
                                   wide_block_n=wide)
            w.plan_arena(arena, indptr, indices, tail, tail, np.arange(B + 1) * tail_len, np.ones(B, dtype=np.int64),
                         HQ, HKV, max_programs=per_sm * sms)
            out = w.run(q)
            ref = out.float() if ref is None else ref
            err = float((out.float() - ref).norm() / ref.norm())
            t = triton.testing.do_bench(lambda: w.run(q, out=out), warmup=10, rep=40, return_mode="median") * 1e-3
            rows.append({"format": name, "num_warps": nw, "block_n": bn, "wide_block_n": wide, "programs_per_sm": per_sm,
                         "num_stages": st,
                         "sparse_densify": densify, "keys_by_query": kbq, "rel_err_vs_first": err,
                         "time_s": t, "bytes": read, "GBps": read / t / 1e9})
            print(f"{name:14s} nw={nw} bn={bn} wide={wide} per_sm={per_sm} st={st} {densify:6s} kbq={kbq:d}: {t * 1e6:8.0f} us "
                  f"{read / t / 1e9:6.0f} GB/s  rel err {err:.1e}", flush=True)
        del arena
    (args.out / "diag_formats.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
