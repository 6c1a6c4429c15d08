"""Host cost of the bookkeeping around a sealing call, one segment at a time against all at once.

Around each ``seal_many`` call the radix cache reads every segment's query statistics
(``rms``, ``attention``) and moves them where sealing runs, then installs each region
(bytes and block-table rows) and drops the statistics. In the eighth GPU run's prefill
profile that was 25.6% of the scheduler's time, as much as the sealing calls themselves
(``results/h200x2_2026-11-30h/summary.json``). This times both ways on one pool, in
alternating rounds: ``rms``/``attention``/``install``/``drop`` per segment, as the radix
cache did, and ``rms_many``/``attention_many``/``install_many``/``drop_many``, as it
does now, after checking both read the same statistics and install the same bytes and
table rows; and counts their top-level torch ops (on a GPU each is a launch).

``--stats-module``/``--pool-module`` take the per-segment methods from other versions of
``sglang_patch/query_stats.py`` and ``pool.py`` (``git show REV:...``), applied to this
tree's objects (the tables and the pool are laid out alike), so that "one at a time" is
the code before the change, not today's per-segment wrappers of the batch methods.

    python benchmarks/host/seal_bookkeeping.py --segments 182 --stats-module /tmp/query_stats_before.py \
        --pool-module /tmp/pool_before.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "sealing"))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from count_ops import counted  # noqa: E402
from stats_flush import load  # noqa: E402
from mosaickv.compressor import compress_segment  # noqa: E402
from mosaickv.config import load_policy  # noqa: E402
from mosaickv.kernels.layout import pack_region  # noqa: E402
from mosaickv.sglang_patch.pool import MosaicKVPool  # noqa: E402
from mosaickv.sglang_patch.query_stats import SegmentQueryStats  # noqa: E402
from mosaickv.sglang_patch.sizing import KVShape, plan_capacity  # noqa: E402


def build(args) -> tuple[MosaicKVPool, list]:
    """A pool with room for ``segments`` sealed segments, and one segment's blocks as the
    ``mosaic`` policy seals them (every segment stores the same blocks)."""
    seg, layers, hkv, d = 32, args.layers, args.kv_heads, args.head_dim
    shape = KVShape(num_layers=layers, num_kv_heads=hkv, head_dim=d, v_head_dim=d)
    budget = 4 * args.segments * seg * shape.dense_bytes_per_token
    plan = plan_capacity(shape, budget, segment_size=seg, ratio=3.0, sinks=0, window=seg, page_size=seg,
                         max_running_requests=4)
    pool = MosaicKVPool(plan.max_total_num_tokens, page_size=seg, dtype=torch.bfloat16, head_num=hkv, head_dim=d,
                        layer_num=layers, device=args.device, enable_memory_saver=False, plan=plan,
                        enable_alt_stream=False, attention_window=seg)
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(layers, hkv, seg, d, generator=g).bfloat16() for _ in range(2))
    blocks = compress_segment(load_policy("mosaic"), k, v, plan.segment_budget_bytes,
                              torch.rand(layers, hkv, d, generator=g) + 0.1,
                              torch.softmax(torch.randn(layers, hkv, seg, generator=g), -1))
    return pool, [b for layer in blocks for b in layer]


def prepare(pool: MosaicKVPool, blocks: list, n: int, group: int, seed: int) -> tuple[list[int], list[int], list[list[int]], list]:
    """``n`` segments as a prefill leaves them before sealing: statistics observed at every
    layer, a slab reserved and a region packed for it."""
    seg, stats = pool.plan.segment_size, pool.query_stats
    slots = torch.arange(seg, seg + n * seg)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n * seg, pool.head_num * group, pool.head_dim, generator=g).to(pool.device)
    keys = torch.randn(n * seg, pool.head_num, pool.head_dim, generator=g).to(pool.device)
    lse = torch.zeros(n * seg, pool.head_num * group, device=pool.device)
    for layer in range(pool.layer_num):
        stats.observe(layer, q, slots, keys=keys, lse=lse, scale=pool.head_dim ** -0.5)
    stats.flush()
    slabs = [pool.arena.alloc() for _ in range(n)]
    regions = [pack_region(blocks, pool.head_dim, pool.arena.base(slab)) for slab in slabs]
    firsts = slots[::seg].tolist()
    return firsts, slabs, [[1 + i] for i in range(n)], regions


def one_at_a_time(stats_cls: type, pool_cls: type, pool: MosaicKVPool, firsts, slabs, pages, regions) -> tuple:
    """The per-segment methods of ``stats_cls`` and ``pool_cls`` on this tree's objects."""
    stats, where = pool.query_stats, pool.device
    rms = [stats_cls.rms(stats, first).to(where) for first in firsts]
    attention = [stats_cls.attention(stats, first).to(where) for first in firsts]
    for slab, page_list, region in zip(slabs, pages, regions):
        pool_cls.install(pool, slab, page_list, region)
    for first in firsts:
        stats_cls.drop(stats, first)
    return torch.stack(rms), torch.stack(attention)


def all_at_once(pool: MosaicKVPool, firsts, slabs, pages, regions) -> tuple:
    stats, where = pool.query_stats, pool.device
    rms = stats.rms_many(firsts)[0].to(where)
    attention = stats.attention_many(firsts)[0].to(where)
    pool.install_many(slabs, pages, regions)
    stats.drop_many(firsts)
    return rms, attention


def installed(pool: MosaicKVPool, slabs: list[int]) -> list[torch.Tensor]:
    """What the pool holds for ``slabs``: each one's bytes and block-table rows."""
    blocks = pool.layer_num * pool.head_num
    return [t for slab in slabs for t in (pool.arena.view(slab).cpu(),
                                          pool.block_table[slab * blocks : (slab + 1) * blocks].cpu())]


def release(pool: MosaicKVPool, slabs: list[int]) -> None:
    for slab in slabs:
        pool.free_slab(slab)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--segments", type=int, default=182, help="segments of one sealing call (SmolLM2's seal batch)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--group", type=int, default=3, help="query heads per KV head")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stats-module", help="another query_stats.py whose rms/attention/drop run one at a time")
    ap.add_argument("--pool-module", help="another pool.py whose install runs one at a time")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    pool, blocks = build(args)
    stats_cls = load(args.stats_module, "stats_before").SegmentQueryStats if args.stats_module else SegmentQueryStats
    pool_cls = load(args.pool_module, "pool_before").MosaicKVPool if args.pool_module else MosaicKVPool
    ways = {"one_at_a_time": partial(one_at_a_time, stats_cls, pool_cls), "all_at_once": all_at_once}
    times: dict[str, list[float]] = {name: [] for name in ways}
    ops: dict[str, int] = {}
    results: dict[str, list[torch.Tensor]] = {}
    for round_ in range(args.rounds):
        for name, way in ways.items():
            state = prepare(pool, blocks, args.segments, args.group, seed=round_)
            if pool.device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = way(pool, *state)
            if pool.device != "cpu":
                torch.cuda.synchronize()
            times[name].append(1e3 * (time.perf_counter() - start))
            results[name] = [*out, *installed(pool, sorted(state[1]))]
            release(pool, state[1])
            state = prepare(pool, blocks, args.segments, args.group, seed=round_)
            ops[name] = counted(lambda: way(pool, *state))[1]
            release(pool, state[1])
        if not all(torch.equal(a, b) for a, b in zip(*results.values())):
            raise RuntimeError("installing one segment at a time and all at once left different statistics or bytes")
    row = {name: {"median_ms": round(statistics.median(t), 2), "torch_ops": ops[name]} for name, t in times.items()}
    print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python " + " ".join(sys.argv), "args": vars(args), "result": row}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
