"""Host time to find one request's block runs, as a decode plan does for each request that
sealed a segment since the last step: grouped whole (``block_runs``) from the pool's packed
entries (what the server read until the twelfth run) and from the block table itself, and
the blocks a plan kept extended by the new segment (``extend_blocks``, what the server
reads now) then cut (``cut_runs``); all checked to give the same runs. SmolLM2's shape at
7k tokens by default (30 layers x 3 KV heads x 220 segments: 19,800 blocks) in a table of
a pool's size.

    python benchmarks/host/block_runs_host.py [--layers 30 --kv-heads 3 --segments 220] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from mosaickv.kernels.block_runs import block_runs, cut_runs, extend_blocks, group_blocks, kind_tokens, pack_entries
from mosaickv.kernels.layout import TABLE_FIELDS
from mosaickv.sglang_patch.forward_inputs import block_rows


def median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--segments", type=int, default=220, help="the request's sealed segments")
    ap.add_argument("--slabs", type=int, default=9200, help="slabs in the pool's table")
    ap.add_argument("--chunk", type=int, default=512, help="kept tokens per run")
    ap.add_argument("--repeat", type=int, default=100)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = args.slabs * args.layers * args.kv_heads
    table = np.zeros((rows, len(TABLE_FIELDS)), dtype=np.int64)
    table[:, 0] = rng.integers(0, 33, rows)
    table[:, 1], table[:, 5] = rng.integers(0, 4, rows), rng.integers(0, 4, rows)
    table[:, 2], table[:, 6] = rng.integers(0, 64, rows), rng.integers(0, 64, rows)
    entries = pack_entries(table)
    slabs = rng.permutation(args.slabs)[: args.segments]
    indices = block_rows(slabs, np.asarray([len(slabs)]), args.layers, args.kv_heads)
    pairs = np.arange(args.layers * args.kv_heads + 1)
    indptr = pairs * len(slabs)
    before = group_blocks(entries, pairs * (len(slabs) - 1), block_rows(slabs[:-1], np.asarray([len(slabs) - 1]),
                                                                         args.layers, args.kv_heads))
    last = block_rows(slabs[-1:], np.asarray([1]), args.layers, args.kv_heads)

    def extended():  # as host_plan finds them: the kept blocks extended, its runs cut
        blocks = extend_blocks(before, entries, pairs[:-1], last)
        return blocks, cut_runs(blocks, args.chunk)

    packed, plain = (block_runs(t, indptr, indices, args.chunk) for t in (entries, table))
    for name, got in (("the table", plain), ("the kept blocks extended", extended()[1])):
        for field in ("pair", "lo", "hi", "kind", "k_width_max", "v_width_max"):
            if not np.array_equal(getattr(packed, field), getattr(got, field)):
                raise RuntimeError(f"the packed entries and {name} give other runs ({field})")
    result = {
        "command": "python benchmarks/host/block_runs_host.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": "this CPU (numpy, one thread)", "blocks": len(indices),
        "packed_entries_ms": median_ms(lambda: block_runs(entries, indptr, indices, args.chunk), args.repeat),
        "table_ms": median_ms(lambda: block_runs(table, indptr, indices, args.chunk), args.repeat),
        # Until the twelfth run a plan also summed a request's kept tokens in a pass of their own.
        "kept_pass_ms": median_ms(lambda: kind_tokens(entries, block_rows(slabs, np.asarray([len(slabs)]), args.layers,
                                                                          args.kv_heads)), args.repeat),
        "extended_ms": median_ms(extended, args.repeat),
        "cut_only_ms": median_ms(lambda: cut_runs(before, args.chunk), args.repeat),
    }
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
