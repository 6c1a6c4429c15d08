"""Host time of adding a forward's query statistics (``SegmentQueryStats.flush``).

Two shapes, on the CPU: a decode step of ``--requests`` requests (one query each, every
layer's sums deferred as a decode graph does) and a prefill chunk of ``--chunk`` tokens
(``observe`` per layer; the chunk's segments dropped after it, as sealing does). ``--module FILE`` times another version of
``sglang_patch/query_stats.py`` (``git show REV:sglang_patch/query_stats.py > FILE``),
so two versions compare side by side in one run.

    python benchmarks/host/stats_flush.py --layers 30 --kv-heads 3 --head-dim 64 --requests 240 \
        --module /tmp/query_stats_before.py --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import torch


def load(path: str, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def decode_ms(mod: ModuleType, layers: int, hkv: int, d: int, seg: int, group: int, requests: int, steps: int) -> float:
    stats = mod.SegmentQueryStats(layers, hkv, d, seg)
    keys = [seg * (b + 1) for b in range(requests)]
    times = []
    for _ in range(steps):
        for layer in range(layers):
            stats.defer_decode(layer, torch.rand(requests, hkv, d, dtype=torch.float64), None, keys,
                               [False] * requests, group=group)
        start = time.perf_counter()
        stats.flush()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3


def prefill_ms(mod: ModuleType, layers: int, hkv: int, d: int, seg: int, group: int, chunk: int, steps: int) -> float:
    """One request's chunks, each on new slots; after each, its segments seal and are
    dropped (untimed), as a server's prompts come and go."""
    q = torch.randn(chunk, hkv * group, d).bfloat16()
    stats = mod.SegmentQueryStats(layers, hkv, d, seg)
    times = []
    for step in range(steps):
        slots = torch.arange(chunk) + step * chunk
        for layer in range(layers):
            stats.observe(layer, q, slots)
        start = time.perf_counter()
        stats.flush()
        times.append(time.perf_counter() - start)
        for first in slots[::seg].tolist():
            stats.drop(first)
    return statistics.median(times[1:]) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--group", type=int, default=4, help="query heads per KV head")
    ap.add_argument("--segment", type=int, default=32)
    ap.add_argument("--requests", type=int, default=240, help="decode batch")
    ap.add_argument("--chunk", type=int, default=8192, help="prefill chunk tokens")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the versions")
    ap.add_argument("--module", help="another query_stats.py to time beside this tree's")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    versions = {"this tree": load(str(Path(__file__).parents[2] / "sglang_patch" / "query_stats.py"),
                                  "query_stats_this")}
    if args.module:
        versions[args.module] = load(args.module, "query_stats_other")
    shape = (args.layers, args.kv_heads, args.head_dim, args.segment, args.group)
    rows: dict[str, dict[str, list[float]]] = {name: {"decode_ms": [], "prefill_chunk_ms": []} for name in versions}
    for _ in range(args.rounds):
        for name, mod in versions.items():
            rows[name]["decode_ms"].append(round(decode_ms(mod, *shape, args.requests, args.steps), 3))
            rows[name]["prefill_chunk_ms"].append(round(prefill_ms(mod, *shape, args.chunk, max(3, args.steps // 4)), 3))
    result = {"command": " ".join(["python", "benchmarks/host/stats_flush.py", *(argv or sys.argv[1:])]),
              "args": vars(args), "rows": rows}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
