"""Torch ops per sealed segment on the one-launch path, alone and in batches.

On a GPU each op is a kernel launch, and an 8B-shaped segment's policy work is hundreds
of small ones; ``PackedSealer.seal_many`` shares the scorers and statistics among the
segments it takes at once. Counted on whatever machine this runs on (the CPU too) with
torch's profiler, top-level ops only (views and reads of a scalar left out), with the
knapsack's share apart: it solves every segment of a call together, where the inputs
are, without reading back. The packer's own launch (one per call) is left out.

    python benchmarks/sealing/count_ops.py --layers 32 --kv-heads 8 --head-dim 128 --batches 1 8 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

os.environ.setdefault("TRITON_INTERPRET", "1")  # the packer's module imports Triton

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import mosaickv.policies.strategies as strategies  # noqa: E402
from mosaickv.config import load_policy  # noqa: E402
from mosaickv.packed_sealing import PackedSealer  # noqa: E402
from mosaickv.sealer import SegmentInputs  # noqa: E402

NOT_COUNTED = {  # views, metadata and scalar reads: no kernel of their own
    "aten::select", "aten::reshape", "aten::view", "aten::alias", "aten::unsqueeze", "aten::expand", "aten::slice",
    "aten::detach_", "aten::lift_fresh", "aten::squeeze", "aten::permute", "aten::t", "aten::transpose",
    "aten::as_strided", "aten::detach", "aten::item", "aten::is_nonzero", "aten::_local_scalar_dense",
    "aten::resolve_conj", "aten::resolve_neg", "aten::split", "aten::unbind", "aten::chunk", "aten::narrow",
    "aten::_reshape_alias", "aten::flatten", "aten::result_type",
}


def counted(fn) -> tuple[object, int]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(1 for e in prof.events() if e.cpu_parent is None and e.name not in NOT_COUNTED)


def add_shape_args(ap: argparse.ArgumentParser) -> None:
    """The policy and the 8B-shaped pool (by default) a counted sealing call seals for."""
    ap.add_argument("--policy", default="mosaic")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)


def unpacked_sealer(policy_name: str, layers: int, hkv: int, d: int) -> tuple[PackedSealer, Callable[[int], SegmentInputs]]:
    """A sealer whose packer launch is left out (one a call, not counted), and a maker of
    random segments of this shape (segment ``i`` at its own slab)."""
    policy = load_policy(policy_name)
    s = policy.segment_size
    budget = int(s * layers * hkv * d * 2 * 2 / policy.ratio)
    g = torch.Generator().manual_seed(0)

    def segment(i: int) -> SegmentInputs:
        k, v = (torch.randn(layers, hkv, s, d, generator=g).bfloat16() for _ in range(2))
        return SegmentInputs(k, v, budget, torch.rand(layers, hkv, d, generator=g) + 0.1,
                             torch.softmax(torch.randn(layers, hkv, s, generator=g), -1), 4096 * (i + 1))

    sealer = PackedSealer(policy, d)
    sealer.packer.plan_placed = lambda *a, **kw: None
    sealer.packer.run = lambda *a, **kw: None
    return sealer, segment


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    sealer, segment = unpacked_sealer(args.policy, args.layers, args.kv_heads, args.head_dim)
    knapsack_ops = [0]
    solve = strategies.knapsack

    def knapsack(*a, **kw):
        out, n = counted(lambda: solve(*a, **kw))
        knapsack_ops[0] += n
        return out

    rows = []
    for n in args.batches:
        batch = [segment(i) for i in range(n)]
        sealer.seal_many(batch)  # warm-up
        _, total = counted(lambda: sealer.seal_many(batch))
        knapsack_ops[0] = 0
        strategies.knapsack = knapsack  # a second pass: profilers do not nest
        try:
            sealer.seal_many(batch)
        finally:
            strategies.knapsack = solve
        rows.append({"segments_per_call": n, "ops_per_segment": round(total / n, 1),
                     "knapsack_ops_per_segment": round(knapsack_ops[0] / n, 1)})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/sealing/count_ops.py " + " ".join(sys.argv[1:] if argv is None else argv), "policy": args.policy,
                       "shape": {"layers": args.layers, "kv_heads": args.kv_heads, "head_dim": args.head_dim}, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
