"""Items per decode launch that the planner gives ``diag_formats.py``'s shapes, on the CPU.

A launch runs one program per item up to ``max_programs`` (eight per SM); a launch with
fewer items than SMs leaves the GPU idle. The eleventh run's Nsight Compute profile
(h200x2_2026-11-30k/kernels/ncu_decode.csv) found the presets' 3x mix's packed sparse-key
launch with 256 items on 132 SMs. This prints, without a GPU, what the planner gives each
launch with one chunk for the batch and with runs cut per format pair (``chunk_by_kind``),
from the block table alone (the formats' kept tokens and kinds, no data).

    python benchmarks/kernels/plan_items.py [--sms 132] [--formats mosaic_dense_values_3x ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from mosaickv.formats import SIDE_KINDS
from mosaickv.kernels.block_runs import kind_tokens
from mosaickv.kernels.layout import kind_chunk_tokens, plan_host
from mosaickv.kernels.synthetic import pattern_table

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import POLICY_SEGMENT, policy_patterns  # noqa: E402
from diag_formats import B, D, HKV, HQ, L, POLICY_REPORT  # noqa: E402


def items_per_launch(pattern, sms: int) -> dict:
    pairs, blocks = B * HKV, L // POLICY_SEGMENT - 1
    _, table = pattern_table(pairs, blocks, pattern, D)
    indptr, indices = np.arange(pairs + 1) * blocks, np.arange(pairs * blocks)
    tail_lens = np.full(B, L - blocks * POLICY_SEGMENT)
    programs = 8 * sms
    out = {}
    for name, chunks in (("one_chunk", None),
                         ("per_pair", kind_chunk_tokens(kind_tokens(table, indices), int(tail_lens.sum()), 1, HKV,
                                                        32, programs))):
        plan = plan_host(table, indptr, indices, np.ones(B, dtype=np.int64), tail_lens, 1, HKV, HQ // HKV, 16, 32,
                         None, programs, kind_chunks=chunks)
        out[name] = {f"{SIDE_KINDS[k] if k >= 0 else 'tail'}/{SIDE_KINDS[v] if v >= 0 else 'tail'}": len(ids)
                     for k, v, _, ids in plan.layers[0].launches}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sms", type=int, default=132, help="the GPU's SMs (H200: 132)")
    ap.add_argument("--formats", nargs="*", default=["mosaic_dense_values_3x", "mosaic_dense_values_6x"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    report = json.loads(POLICY_REPORT.read_text())
    patterns = {name: pat for name, pat, _ in policy_patterns(report, D, 64)}
    result = {"command": "python benchmarks/kernels/plan_items.py " + " ".join(sys.argv[1:]),
              "shape": {"B": B, "L": L, "HQ": HQ, "HKV": HKV, "D": D, "segment": POLICY_SEGMENT},
              "programs_per_launch": 8 * args.sms,
              "items": {name: items_per_launch(patterns[name], args.sms) for name in args.formats}}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
