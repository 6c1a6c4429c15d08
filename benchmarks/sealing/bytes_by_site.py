"""Bytes a ``seal_many`` call's PyTorch ops read and write, by the line of this tree that
called them: a map of where a sealing call moves memory, on any machine.

On a GPU a sealing call's elementwise and reduction ops are passes over tensors as large
as the segments' keys and values, bound by memory; their count and size do not depend on
the device, so the CPU can say which lines to fuse or drop. Every aten op but views is
counted (inputs and outputs, in bytes) through a dispatch mode, against the innermost
frame of ``mosaickv/`` or ``policies/``. On the CPU the knapsack and per-vector channel
pricing run as ops (on a GPU each is one launch); the packer's launch is left out.

    python benchmarks/sealing/bytes_by_site.py --segments 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections import Counter
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the packer's module imports Triton

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from count_ops import add_shape_args, unpacked_sealer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
VIEWS = {"view", "reshape", "select", "slice", "alias", "unsqueeze", "expand", "t", "transpose", "permute", "squeeze",
         "as_strided", "_unsafe_view", "detach", "lift_fresh", "split", "unbind"}


class BytesBySite(TorchDispatchMode):
    """Counts each non-view aten op's tensor bytes against the tree's line that called it."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: Counter[str] = Counter()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ not in VIEWS:
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            site = "elsewhere"
            for frame in reversed(traceback.extract_stack()[:-1]):
                rel = Path(frame.filename).resolve()
                if rel.is_relative_to(ROOT) and rel.parts[len(ROOT.parts)] in ("mosaickv", "policies"):
                    site = f"{rel.relative_to(ROOT)}:{frame.lineno}"
                    break
            self.bytes[site] += sum(t.numel() * t.element_size() for t in tensors)
            self.ops[site] += 1
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap)
    ap.add_argument("--segments", type=int, default=4, help="segments of the one seal_many call counted")
    ap.add_argument("--top", type=int, default=25, help="sites printed and written, by bytes")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    sealer, segment = unpacked_sealer(args.policy, args.layers, args.kv_heads, args.head_dim)
    batch = [segment(i) for i in range(args.segments)]
    sealer.seal_many(batch)  # warm-up
    with BytesBySite() as count:
        sealer.seal_many(batch)
    sites = [{"site": site, "mb": round(b / 1e6, 1), "ops": count.ops[site]} for site, b in count.bytes.most_common(args.top)]
    total = round(sum(count.bytes.values()) / 1e6, 1)
    for row in sites:
        print(f"{row['mb']:9.1f} MB {row['ops']:4d} ops  {row['site']}")
    print(f"{total:9.1f} MB {sum(count.ops.values()):4d} ops  in all")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": "python benchmarks/sealing/bytes_by_site.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "policy": args.policy, "shape": {"layers": args.layers, "kv_heads": args.kv_heads, "head_dim": args.head_dim},
            "segments": args.segments,
            "total_mb": total, "ops": sum(count.ops.values()), "sites": sites}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
