"""Sealing throughput on the host: segments per second that ``compress_segment`` (what the
server's worker threads run) reaches with 1..N threads, for one model shape and policy.

    python benchmarks/sealing/bench_seal.py --policy mosaic --layers 30 --kv-heads 3 --head-dim 64 --threads 1 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import torch

from mosaickv.compressor import compress_segment
from mosaickv.config import load_policy


def segments_per_second(policy, k, v, budget: int, query_stats, attention, threads: int, per_thread: int) -> float:
    def work() -> None:
        for _ in range(per_thread):
            compress_segment(policy, k, v, budget, query_stats=query_stats, attention=attention)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return threads * per_thread / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="mosaic")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--segments", type=int, default=8, help="segments each thread seals per measurement")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    policy = load_policy(args.policy).bind(args.head_dim)
    s, shape = policy.segment_size, (args.layers, args.kv_heads)
    torch.manual_seed(0)
    k, v = torch.randn(*shape, s, args.head_dim), torch.randn(*shape, s, args.head_dim)
    query_stats, attention = torch.randn(*shape, args.head_dim).abs(), torch.rand(*shape, s)
    budget = int(s * args.layers * args.kv_heads * args.head_dim * 2 * 2 / policy.ratio)
    compress_segment(policy, k, v, budget, query_stats=query_stats, attention=attention)  # warm-up
    rows = [{"threads": n, "segments_per_s": round(segments_per_second(policy, k, v, budget, query_stats, attention, n,
                                                                       args.segments), 2)} for n in args.threads]
    res = {"policy": args.policy, "shape": {"layers": args.layers, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                                            "segment_size": s}, "cpus": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "results": rows}
    print(json.dumps(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
