"""Host time of one MosaicKV decode step, piece by piece, on the machine it runs on.

With CUDA graphs the GPU replays a step's attention, and what is left per step is host
work: find each request's runs (`locate`), plan the kernels over every sealed block
(`host_plan`), ship the plan (`GraphPlan.load`), and the statistics' inputs. On 2x H200
(benchmarks/results/h200x2_2026-11-30) `--tp 2` decode took 80 ms per step at 64
requests against 3.8 ms without compression, so this measures where a step's host time
goes, at the shape of one rank there (8 layers, 4 KV heads of 128, 32-token segments)
or any other, without a GPU: the pool lives on the CPU, the kernels are not run. With
``--device cuda`` the pool lives on the GPU, as in the server, so the plan's per-block
half (``block_runs``) runs there and the figures are a server's host time per step.

    python benchmarks/host/decode_step_host.py --requests 16 64 --segments 36 --json out.json

``host_plan_ms`` and ``graph_prepare_ms`` are steady decode steps: every request's block
runs are in the pool's ``RunCache`` from the step before (a request finds them again only
when it seals a segment, every 32 tokens). ``host_plan_cold_ms`` clears the cache first.
The requests here share their sealed segments, so even a cold plan finds their runs once.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
from types import SimpleNamespace

import torch

from mosaickv.compressor import compress_segment
from mosaickv.config import load_policy
from mosaickv.kernels.layout import launch_variants
from mosaickv.sglang_patch.attention import DECODE_TUNING, MosaicAttnBackend
from mosaickv.sglang_patch.decode_graph import DecodeGraph
from mosaickv.sglang_patch.forward_inputs import host_plan, stat_inputs
from mosaickv.sglang_patch.pool import MosaicKVPool
from mosaickv.sglang_patch.sizing import KVShape, plan_capacity


def build(args, requests: int):
    """A pool holding ``requests`` requests of ``segments`` sealed segments and a dense
    tail each, every segment sealed with the blocks ``mosaic`` chose for one random segment.
    The requests share their sealed segments (a radix prefix): a plan lists each request's
    blocks all the same, and the pool is built with one request's sealing."""
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    seg, layers, hkv, d = 32, args.layers, args.kv_heads, args.head_dim
    shape = KVShape(num_layers=layers, num_kv_heads=hkv, head_dim=d, v_head_dim=d)
    tokens = args.segments * seg + requests * (args.tail + 4 * seg)  # the sealed prefix is shared; dense tails each
    budget = tokens * shape.dense_bytes_per_token * 2
    plan = plan_capacity(shape, budget, segment_size=seg, ratio=float(args.ratio), sinks=0, window=seg, page_size=seg,
                         max_running_requests=requests)
    pool = MosaicKVPool(plan.max_total_num_tokens, page_size=seg, dtype=torch.bfloat16, head_num=hkv, head_dim=d,
                        layer_num=layers, device=args.device, enable_memory_saver=False, plan=plan, enable_alt_stream=False,
                        attention_window=seg)
    policy = load_policy("mosaic", ratio=args.ratio)
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(layers, hkv, seg, d, generator=g).bfloat16() for _ in range(2))
    blocks = compress_segment(policy, k, v, plan.segment_budget_bytes, torch.rand(layers, hkv, d, generator=g) + 0.1,
                              torch.softmax(torch.randn(layers, hkv, seg, generator=g), -1))
    length = args.segments * seg + args.tail
    req_pool = ReqToTokenPool(requests, length + 8, args.device, False)
    sealed = args.segments * seg
    prefix = torch.arange(seg, seg + sealed)  # pages 1..segments: one prefix every request shares, as radix hits do
    for s in range(args.segments):  # written dense, then sealed: its dense page returns
        pool.prepare_writes(prefix[s * seg : (s + 1) * seg])
        pool.seal([1 + s], blocks)
    page = 1 + args.segments
    for r in range(requests):
        pages = list(range(page, page + -(-args.tail // seg)))
        page += len(pages)
        tail = torch.cat([torch.arange(p * seg, (p + 1) * seg) for p in pages] + [prefix[:0]])[: args.tail]
        req_pool.req_to_token[r, :length] = torch.cat([prefix, tail]).int()
        pool.prepare_writes(tail)
    runner = SimpleNamespace(device=args.device, req_to_token_pool=req_pool, token_to_kv_pool=pool,
                             server_args=SimpleNamespace(kv_compress_attention="triton", mosaic_policy=policy),
                             model_config=SimpleNamespace(num_attention_heads=hkv * args.group,
                                                          get_total_num_kv_heads=lambda: hkv, context_len=length + 64))
    return pool, MosaicAttnBackend(runner), length


def timed(fn, repeat: int, device: str) -> float:
    """Median wall time, the device's queue drained after each call."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--segments", type=int, default=36, help="sealed segments per request")
    ap.add_argument("--tail", type=int, default=20, help="dense tail tokens per request")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--group", type=int, default=2, help="query heads per KV head")
    ap.add_argument("--ratio", type=float, default=3.0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="where the pool lives (cuda: as in the server)")
    ap.add_argument("--profile", action="store_true", help="print the top functions of one DecodeGraph.prepare")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for n in args.requests:
        pool, backend, length = build(args, n)
        idx, lens = torch.arange(n), [length] * n
        reqs = backend._requests(idx, lens, [1] * n)
        sealed = {sum(isinstance(r, int) for r in req.runs) for req in reqs}
        if sealed != {args.segments}:
            raise RuntimeError(f"requests read {sealed} sealed segments, {args.segments} were sealed each")
        group = args.group
        backend._menu = launch_variants(backend._policy_sides())
        graph = DecodeGraph(pool, pool.head_num * group, n, backend._menu, True, DECODE_TUNING, length + 64)
        loc = torch.tensor([int(r.slots[-1]) for r in reqs], device=args.device)
        row = {
            "requests": n, "sealed_blocks": n * args.segments * args.layers * args.kv_heads,
            "locate_ms": timed(lambda: backend._requests(idx, lens, [1] * n), args.repeat, args.device),
            "stat_inputs_ms": timed(lambda: stat_inputs(pool, reqs), args.repeat, args.device),
            "host_plan_ms": timed(lambda: host_plan(pool, reqs, group, DECODE_TUNING, 132), args.repeat, args.device),
            "host_plan_cold_ms": timed(lambda: (pool.run_cache.clear(), host_plan(pool, reqs, group, DECODE_TUNING, 132)),
                                       args.repeat, args.device),
            "graph_prepare_ms": timed(lambda: graph.prepare(reqs, n, loc), args.repeat, args.device),
        }
        print(json.dumps(row))
        rows.append(row)
        if args.profile:
            prof = cProfile.Profile()
            prof.runcall(lambda: graph.prepare(backend._requests(idx, lens, [1] * n), n, loc))
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
            print(out.getvalue())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "benchmarks/host/decode_step_host.py", "args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
