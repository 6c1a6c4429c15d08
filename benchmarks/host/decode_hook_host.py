"""Host time of the plugin's work after each decode step, at a server's number of running
requests, on SGLang's own Req, radix cache, allocator and the MosaicKV pool (CPU).

After every decode step the plugin's hook (``radix.decode_seal_hook``) inserts the
segments that running requests closed into the radix tree and, every few steps, seals
them together (``MosaicRadixCache.seal_decoded``). On the tenth run's SmolLM2 shared-
prefix workload (512 requests), a `mosaic` decode step's ITL p50 was 77.6 ms against
`none`'s 7.6, and the host's plan for the step measured alone took about 13 ms: this times
what the hook adds. Requests are built as the generated-shared-prefix workload's
(``--groups`` prompts prefixes of ``--prefix`` tokens, each shared by
``--requests-per-group`` requests with their own ``--question`` tokens), prefilled and
inserted as SGLang does, then decode ``--steps`` steps: a slot and KV per request outside
the timing, the hook inside it. Sealing runs inline with a fixed-format compressor on the
host; ``seal_ms`` is its share (``kv_compress_info.inline_seal_seconds``) and
``hook_ms`` less it is the bookkeeping. ``--seal-thread``: sealing on a thread beside the
hook (``--kv-compress-sealing device-thread``), drained after each step as the scheduler
does; the thread's own time is ``thread_seal_s``. The KV shape is small (the hook's work does not
depend on it); the tree, the paths and the request count are a server's.

    python benchmarks/host/decode_hook_host.py --groups 32 --requests-per-group 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from array import array
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))


def build(args):
    """(tree, pool, allocator, running requests) after every prompt's prefill and insert."""
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.common import maybe_cache_unfinished_req
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
    from sglang.srt.plugins import load_plugins
    from sglang.srt.runtime_context import publish
    from sglang.srt.sampling.sampling_params import SamplingParams
    from sglang.srt.server_args import ServerArgs

    from mosaickv.sglang_patch.pool import MosaicKVPool
    from mosaickv.sglang_patch.radix import MosaicRadixCache, default_seal_batch
    from mosaickv.sglang_patch.sizing import KVShape, plan_capacity
    from seal_compressors import CountingCompressor

    load_plugins()  # the plugin's hooks (freed slots give back dense rows) as in a server
    publish(ServerArgs(model_path="dummy"), role="bench")
    seg, layers, hkv, d = args.segment, args.layers, args.kv_heads, args.head_dim
    requests = args.groups * args.requests_per_group
    prompt = args.prefix + args.question
    shape = KVShape(num_layers=layers, num_kv_heads=hkv, head_dim=d, v_head_dim=d)
    # Dense tails for every request, and for one more prompt written dense before it seals.
    tails = requests + -(-prompt // (seg + 2 * seg)) + 1
    tokens = args.groups * args.prefix + requests * (args.question + args.steps) + tails * 3 * seg + 2 * prompt
    plan = plan_capacity(shape, tokens * shape.dense_bytes_per_token * 2, segment_size=seg, ratio=2.0, sinks=0,
                         window=seg, max_running_requests=tails)
    pool = MosaicKVPool(plan.max_total_num_tokens, page_size=1, dtype=torch.bfloat16, head_num=hkv, head_dim=d,
                        layer_num=layers, device="cpu", enable_memory_saver=False, plan=plan, enable_alt_stream=False)
    alloc = TokenToKVPoolAllocator(plan.max_total_num_tokens, torch.bfloat16, "cpu", pool, need_sort=False)
    params = CacheInitParams(disable=False, req_to_token_pool=ReqToTokenPool(requests, prompt + args.steps + 8, "cpu",
                                                                              False),
                             token_to_kv_pool_allocator=alloc, page_size=1)
    batch = args.decode_batch or default_seal_batch(pool, seg)
    tree = MosaicRadixCache(params, compress=CountingCompressor(), segment_size=seg, sink_segments=0, window=seg,
                            background=False, on_device=True, decode_batch=batch, seal_batch=batch,
                            seal_thread=args.seal_thread)
    reqs = []
    for g in range(args.groups):
        for r in range(args.requests_per_group):
            ids = list(range(g * 100_000, g * 100_000 + args.prefix))
            ids += list(range(g * 100_000 + 50_000 + r * args.question, g * 100_000 + 50_000 + (r + 1) * args.question))
            req = Req(f"g{g}r{r}", "", array("q", ids), SamplingParams(max_new_tokens=args.steps + 8))
            tree.req_to_token_pool.alloc([req])
            slots = write(pool, alloc, prompt, layers)
            tree.req_to_token_pool.write((req.req_pool_idx, slice(0, prompt)), slots.int())
            req.kv_committed_len = prompt
            req.last_node, req.cache_protected_len = tree.root_node, 0
            req.prefix_indices = torch.empty(0, dtype=torch.int64)
            req.set_extend_range(0, prompt)
            req._refresh_fill_ids()
            maybe_cache_unfinished_req(req, tree)  # a shared prefix's duplicate slots are freed here
            req.output_ids.append(1)
            reqs.append(req)
    tree.drain(wait=True)
    return tree, pool, alloc, reqs


def write(pool, alloc, n: int, layers: int) -> torch.Tensor:
    """``n`` new slots with their KV written (what a forward does, not timed)."""
    slots = alloc.alloc(n)
    if slots is None:
        raise MemoryError(f"the bench's pool has no room for {n} more tokens")
    kv = torch.ones(n, pool.head_num, pool.head_dim, dtype=torch.bfloat16)
    for layer in range(layers):
        pool._store_kv_layer(layer, slots, kv, kv)
    return slots


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=32)
    ap.add_argument("--requests-per-group", type=int, default=16)
    ap.add_argument("--prefix", type=int, default=4096, help="shared tokens of each group's prompts")
    ap.add_argument("--question", type=int, default=256, help="each request's own prompt tokens")
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed")
    ap.add_argument("--segment", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--decode-batch", type=int, help="segments sealed together (default: the server's seal batch)")
    ap.add_argument("--seal-thread", action="store_true", help="seal on a thread beside the hook (device-thread)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from mosaickv.sglang_patch.radix import decode_seal_hook

    start = time.perf_counter()
    tree, pool, alloc, reqs = build(args)
    built_s = time.perf_counter() - start
    processor, batch = SimpleNamespace(tree_cache=tree), SimpleNamespace(reqs=reqs)
    counters = pool.counters
    hook, seal, inserts = [], [], []
    for _ in range(args.steps):
        slots = write(pool, alloc, len(reqs), args.layers)
        table = tree.req_to_token_pool.req_to_token
        for req, slot in zip(reqs, slots.tolist()):
            table[req.req_pool_idx, req.kv_committed_len] = slot
            req.kv_committed_len += 1
            req.output_ids.append(len(req.output_ids) + 1)
        sealed_s, inserted = counters.inline_seal_seconds, counters.decode_inserts
        t0 = time.perf_counter()
        decode_seal_hook(None, processor, batch)
        hook.append((time.perf_counter() - t0) * 1e3)
        seal.append((counters.inline_seal_seconds - sealed_s) * 1e3)
        inserts.append(counters.decode_inserts - inserted)
    bookkeeping = [h - s for h, s in zip(hook, seal)]
    tree.drain(wait=True)  # a sealing thread's last batches (not timed)
    result = {
        "command": " ".join(["python", "benchmarks/host/decode_hook_host.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "requests": len(reqs), "steps": args.steps, "decode_batch": tree.decode_batch, "build_s": round(built_s, 1),
        "hook_ms": {"median": statistics.median(hook), "mean": statistics.fmean(hook), "max": max(hook)},
        "seal_ms_mean": statistics.fmean(seal),
        "bookkeeping_ms": {"median": statistics.median(bookkeeping), "mean": statistics.fmean(bookkeeping),
                           "max": max(bookkeeping)},
        "inserts_per_step_mean": statistics.fmean(inserts), "inserts_per_step_max": max(inserts),
        "steps_that_sealed": sum(s > 0 for s in seal),
        "thread_seal_s": round(counters.thread_seal_seconds, 3), "sealed_segments": pool.stats()["sealed_segments"],
    }
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
