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

``locate_ms`` starts from the batch's rows already on the host, as a server's step does
(the scheduler copies them beside the GPU's work, :mod:`~mosaickv.sglang_patch.decode_rows`);
``rows_to_host_ms`` is that copy. Through the tenth run ``locate_ms`` included it, a
synchronous copy with the pool on the GPU (16 MB at 512 SmolLM2 requests of 8k tokens).
``host_plan_ms`` and ``graph_prepare_ms`` are steady decode steps: every request's block
runs are in the pool's ``RunCache`` from the step before (a request finds them again only
when it seals a segment, every 32 tokens). ``host_plan_cold_ms`` clears the cache first.
The requests here share their sealed segments, so even a cold plan finds their runs once.
``host_plan_new_batch_ms`` drops the batch plans the cache keeps but not the requests'
runs: a step right after a request joined, left or sealed a segment. ``eager_plan_ms`` is
a step of a batch larger than the server's largest decode graph, which plans and uploads
without the graph's buffers (``plan_forward``).

Every segment is sealed with the blocks ``mosaic`` chose for one random segment, which
on random keys is one format pair per KV head. ``--policy-formats`` instead draws each
block's format from what a policy chose on real text (a ``mosaickv eval`` report's row,
as ``benchmarks/kernels/bench_decode.py --policy-formats`` does), over ``--mix-segments``
distinct segments, so each KV head reads several format pairs as a server's does; and
``--max-programs 1056`` (an H200's 132 SMs, eight programs each) cuts the runs as short
as the server's decode graphs do:

    python benchmarks/host/decode_step_host.py --requests 8 --segments 1023 --layers 32 --kv-heads 8 --group 4 \
        --policy-formats benchmarks/results/eval_fidelity_2k_segment.json --max-programs 1056
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import importlib.util
import io
import json
import pstats
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from mosaickv.compressor import compress_segment
from mosaickv.config import load_policy
from mosaickv.formats import BlockFormat, PackedBlock, SideFormat, pack_block
from mosaickv.kernels.layout import launch_variants
from mosaickv.sglang_patch.attention import DECODE_TUNING, MosaicAttnBackend, plan_forward
from mosaickv.sglang_patch.decode_graph import DecodeGraph
from mosaickv.sglang_patch.forward_inputs import host_plan, stat_inputs
from mosaickv.sglang_patch.pool import MosaicKVPool
from mosaickv.sglang_patch.sizing import KVShape, plan_capacity


def policy_blocks(path: str, row: str, eval_d: int, layers: int, hkv: int, d: int, seg: int, count: int,
                  budget: int, g: torch.Generator) -> list[list[list[PackedBlock]]]:
    """``count`` segments' blocks ``[layer][kv head]``, each block's format drawn from
    row ``row`` (e.g. ``mosaic_3x``) of a ``mosaickv eval`` report in its proportions,
    widths scaled from the report's head dim ``eval_d`` to ``d``, within ``budget`` bytes each."""
    spec = importlib.util.spec_from_file_location("bench_decode", Path(__file__).parents[1] / "kernels" / "bench_decode.py")
    bench_decode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_decode)
    report = json.loads(Path(path).read_text())
    names = {name: pattern for name, pattern, _ in bench_decode.policy_patterns(report, d, eval_d)}
    if row not in names:
        raise ValueError(f"--policy {row!r} is not a row of {path}: {sorted(names)}")
    pattern = names[row]
    out = []
    for _ in range(count):
        for _ in range(1000):  # a segment drawn again until it fits the slab, as the compressor keeps it
            picks = torch.randint(len(pattern), (layers, hkv), generator=g).tolist()
            fmts = [[BlockFormat(r.tokens, SideFormat(*r.k), SideFormat(*r.v)) for r in (pattern[i] for i in heads)]
                    for heads in picks]
            if sum(f.nbytes(d) for heads in fmts for f in heads) <= budget:
                break
        else:
            raise ValueError(f"no draw of {row!r}'s formats fits a segment's {budget} bytes: raise --ratio")
        out.append([[pack_block(*(torch.randn(seg, d, generator=g) for _ in range(2)), f,
                                token_score=torch.rand(seg, generator=g)) for f in heads] for heads in fmts])
    return out


def build(args, requests: int):
    """A pool holding ``requests`` requests of ``segments`` sealed segments and a dense
    tail each, every segment sealed with the blocks ``mosaic`` chose for one random segment
    (or, with ``--policy-formats``, with one of ``--mix-segments`` drawn from a report).
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
    mixed = [blocks]
    if args.policy_formats:
        mixed = policy_blocks(args.policy_formats, args.policy, args.policy_head_dim, layers, hkv, d, seg, args.mix_segments,
                              plan.segment_budget_bytes, g)
    length = args.segments * seg + args.tail
    req_pool = ReqToTokenPool(requests, length + 8, args.device, False)
    sealed = args.segments * seg
    prefix = torch.arange(seg, seg + sealed)  # pages 1..segments: one prefix every request shares, as radix hits do
    for s in range(args.segments):  # written dense, then sealed: its dense page returns
        pool.prepare_writes(prefix[s * seg : (s + 1) * seg])
        pool.seal([1 + s], mixed[s % len(mixed)])
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


def timed(fn, repeat: int, device: str, setup=None) -> float:
    """Median wall time, the device's queue drained after each call (and after
    ``setup``, run untimed before each)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    setup = setup or (lambda: None)
    setup()
    fn()
    sync()
    times = []
    for _ in range(repeat):
        setup()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def add_pool_args(ap: argparse.ArgumentParser) -> None:
    """The pool :func:`build` makes: its requests' shape and what seals their segments."""
    ap.add_argument("--segments", type=int, default=36, help="sealed segments per request")
    ap.add_argument("--tail", type=int, default=20, help="dense tail tokens per request")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--group", type=int, default=2, help="query heads per KV head")
    ap.add_argument("--ratio", type=float, default=3.0)
    ap.add_argument("--policy-formats", help="a mosaickv eval report whose formats the sealed blocks take")
    ap.add_argument("--policy", default="mosaic_3x", help="its row, <policy>_<ratio>x")
    ap.add_argument("--policy-head-dim", type=int, default=64, help="the report's head dim (SmolLM2's: 64)")
    ap.add_argument("--mix-segments", type=int, default=16, help="distinct segments drawn from the report")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, nargs="+", default=[16, 64])
    add_pool_args(ap)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--max-programs", type=int, help="programs per launch the plans assume (default: host_plan 132, "
                                                          "the graph its device's)")
    ap.add_argument("--device", default="cpu", help="where the pool lives (cuda: as in the server)")
    ap.add_argument("--profile", action="store_true", help="print the top functions of one DecodeGraph.prepare")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for n in args.requests:
        pool, backend, length = build(args, n)
        idx, lens = torch.arange(n), [length] * n
        table = backend.req_to_token_pool.req_to_token
        reqs = backend._requests(idx, lens, [1] * n)
        sealed = {sum(isinstance(r, int) for r in req.runs) for req in reqs}
        if sealed != {args.segments}:
            raise RuntimeError(f"requests read {sealed} sealed segments, {args.segments} were sealed each")
        group = args.group
        backend._menu = launch_variants(backend._policy_sides())
        graph = DecodeGraph(pool, pool.head_num * group, n, backend._menu, True, DECODE_TUNING, length + 64)
        programs = 132
        if args.max_programs:
            programs = graph.max_programs = args.max_programs
        row = {
            "requests": n, "sealed_blocks": n * args.segments * args.layers * args.kv_heads,
            # As in a server: the rows were copied to the host when the scheduler prepared the
            # batch (DecodeRows), beside the GPU's work; that copy is rows_to_host_ms.
            "locate_ms": timed(lambda: backend._requests(idx, lens, [1] * n), args.repeat, args.device,
                               setup=lambda: pool.decode_rows.prefetch(table, idx, lens)),
            "rows_to_host_ms": timed(lambda: (pool.decode_rows.prefetch(table, idx, lens), pool.decode_rows.take(lens)),
                                     args.repeat, args.device),
            "stat_inputs_ms": timed(lambda: stat_inputs(pool, reqs), args.repeat, args.device),
            "host_plan_ms": timed(lambda: host_plan(pool, reqs, group, DECODE_TUNING, programs), args.repeat, args.device),
            "host_plan_cold_ms": timed(lambda: (pool.run_cache.clear(), host_plan(pool, reqs, group, DECODE_TUNING, programs)),
                                       args.repeat, args.device),
            "host_plan_new_batch_ms": timed(lambda: (pool.run_cache.drop_plans(),
                                                     host_plan(pool, reqs, group, DECODE_TUNING, programs)),
                                            args.repeat, args.device),
            "graph_prepare_ms": timed(lambda: graph.prepare(reqs, n), args.repeat, args.device),
            # A batch above the server's largest decode graph (SGLang's --cuda-graph-max-bs,
            # 256 by default) runs eagerly: the kept plan uploaded whole, every step.
            "eager_plan_ms": timed(lambda: plan_forward(pool, reqs, pool.head_num * group, False), args.repeat,
                                   args.device),
        }
        print(json.dumps(row))
        rows.append(row)
        if args.profile:
            # A full collection first: otherwise the profiled step can hold one (~0.3 s of
            # SGLang's and torch's 600k module objects on a 2-core CPU), attributed to
            # whichever function allocated last.
            gc.collect()
            prof = cProfile.Profile()
            prof.runcall(lambda: graph.prepare(reqs, n))  # the requests located as graph_prepare_ms times it
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
            print(out.getvalue())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "benchmarks/host/decode_step_host.py", "args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
