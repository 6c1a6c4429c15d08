"""Torch ops the query statistics of one chunked-prefill forward cost, on the machine it runs on.

Every layer of an extend hands its queries to ``SegmentQueryStats.observe``; on a GPU
each op is a launch and each read back to the host waits for the GPU, so what matters is
how many there are per forward, not the CPU's arithmetic. Counted with torch's profiler
(top-level ops, views left out, as ``benchmarks/sealing/count_ops.py``) for one chunk of
``--chunk`` tokens of one request through ``--layers`` layers, then the flush that brings
its sums to the host, with the 8B shape's defaults (32 layers, 32/8 heads of 128, the
``mosaic`` preset's 32-token segments and 32-query window). A version with
``extend_index`` finds it once for the forward, as the backend does (counted too).
``--module FILE`` counts another ``sglang_patch/query_stats.py`` beside this tree's
(``git show REV:sglang_patch/query_stats.py > FILE``).

    python benchmarks/host/prefill_stats_host.py --chunk 8192 --module /tmp/query_stats_before.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import ModuleType

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "sealing"))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from count_ops import counted  # noqa: E402
from stats_flush import load  # noqa: E402

import mosaickv.sglang_patch.query_stats as this_tree  # noqa: E402


def forward_ops(mod: ModuleType, args: argparse.Namespace) -> tuple[int, int, float]:
    """Ops of one chunk through every layer and the flush after it, with ``mod``'s
    statistics, the segments it touched and the seconds it took under the profiler."""
    g = torch.Generator().manual_seed(0)
    n, d = args.prefix + args.chunk, args.head_dim
    slots = torch.arange(1000, 1000 + n)
    q = torch.randn(args.chunk, args.q_heads, d, generator=g).bfloat16()
    keys = torch.randn(args.chunk + args.segment, args.kv_heads, d, generator=g).bfloat16()
    lse = torch.randn(args.chunk, args.q_heads, generator=g) + 8
    stats = mod.SegmentQueryStats(args.layers, args.kv_heads, d, args.segment, args.window)

    def forward() -> None:
        if not hasattr(stats, "extend_index"):  # a version that places the queries at every layer
            for layer in range(args.layers):
                stats.observe(layer, q, slots, keys=keys, lse=lse, scale=d ** -0.5)
        else:
            index = stats.extend_index([slots], [args.chunk], args.q_heads, q.device,
                                       [torch.arange(len(keys))] if args.window else None)
            for layer in range(args.layers):
                stats.observe(layer, q, keys=keys, lse=lse, scale=d ** -0.5, index=index)
        stats.flush()

    t0 = time.perf_counter()
    _, ops = counted(forward)
    return ops, len(stats), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--prefix", type=int, default=8192, help="tokens of the request before the chunk")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--segment", type=int, default=32)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--module", help="another query_stats.py to count beside this tree's")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    counted(lambda: None)  # the profiler's first start is slow: out of either version's wall time
    ops, touched, wall = forward_ops(this_tree, args)
    row = {"chunk": args.chunk, "prefix": args.prefix, "layers": args.layers, "heads": f"{args.q_heads}/{args.kv_heads}",
           "head_dim": args.head_dim, "segment": args.segment, "window": args.window, "segments_touched": touched,
           "ops_per_forward": ops, "ops_per_layer": round(ops / args.layers, 1),
           "cpu_wall_s_under_profiler": round(wall, 2), "device": "cpu",
           "command": "python benchmarks/host/prefill_stats_host.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.module:
        other, other_touched, other_wall = forward_ops(load(args.module, "query_stats_other"), args)
        if other_touched != touched:
            raise RuntimeError(f"{args.module} touched {other_touched} segments, this tree {touched}")
        row["module"] = {"path": args.module, "ops_per_forward": other, "ops_per_layer": round(other / args.layers, 1),
                         "cpu_wall_s_under_profiler": round(other_wall, 2)}
    print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
