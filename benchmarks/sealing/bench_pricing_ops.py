"""The two GPU ops that dominate pricing a seal_many call's formats, against their
alternatives, side by side: the eigenvalues of every block's 32 x 32 Gram matrix (low-rank
pricing, ``compressor.squared_singular_values``) in float64 and float32, by cuSOLVER's
default and by MAGMA, and as singular values (of the Gram matrix, which cuSOLVER's batched
Jacobi SVD takes up to 32 x 32, and of the block itself); and the per-vector channel
ranking (``PerVector.lost_many``) by ``topk``, by a full descending sort, and whole (every
width's loss) by that sort's ops and by one launch (``mosaickv.kernels.channel_pricing``);
and the sealing knapsack of a call's segments by its PyTorch ops and by one launch
(``mosaickv.kernels.knapsack``). Each alternative's largest error against float64,
relative to the block's largest value; the knapsack's plans' values side by side.

    python benchmarks/sealing/bench_pricing_ops.py --json benchmarks/results/sealing_kernels_h200.json
    python benchmarks/sealing/bench_pricing_ops.py --only channels knapsack   # seconds, not minutes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from mosaickv.kernels.channel_pricing import channel_losses
from mosaickv.kernels.knapsack import BLOCK_ROWS, NUM_WARPS, knapsack_launch
from mosaickv.policies.strategies import KNAPSACK_ENV, KNAPSACK_MODES, knapsack


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return round(sorted(times)[len(times) // 2] * 1e3, 3)


def median_ms_with(library: str, fn, reps: int) -> float | str:
    """``median_ms`` with torch's preferred linear-algebra library set to ``library``."""
    before = torch.backends.cuda.preferred_linalg_library()
    try:
        torch.backends.cuda.preferred_linalg_library(library)
        return median_ms(fn, reps)
    except RuntimeError as err:  # a build without it
        return f"unavailable: {str(err).splitlines()[0]}"
    finally:
        torch.backends.cuda.preferred_linalg_library(before)


def eigen_results(args: argparse.Namespace) -> dict:
    """Low-rank pricing's eigenvalues by each solver: times and errors against float64."""
    x = torch.randn(args.blocks, args.tokens, args.head_dim, device="cuda")
    gram = x.double() @ x.double().mT
    g32 = gram.float()
    e64, e32 = torch.linalg.eigvalsh(gram), torch.linalg.eigvalsh(g32).double()
    alternatives = {  # each [blocks, tokens] descending, float64
        "eigvalsh_float32": lambda: torch.linalg.eigvalsh(g32).flip(-1),
        "svdvals_gram_float32": lambda: torch.linalg.svdvals(g32),
        "svdvals_block_float32": lambda: torch.linalg.svdvals(x).pow(2),
    }
    errors = {name: float(((fn().double() - e64.flip(-1)).abs().amax(-1) / e64[:, -1]).max())
              for name, fn in alternatives.items()}
    return {
        "median_ms": {
            "eigvalsh_float64": median_ms(lambda: torch.linalg.eigvalsh(gram), args.reps),
            "eigvalsh_float32": median_ms(lambda: torch.linalg.eigvalsh(g32), args.reps),
            "eigvalsh_float32_magma": median_ms_with("magma", lambda: torch.linalg.eigvalsh(g32), args.reps),
            "svdvals_gram_float32": median_ms(lambda: torch.linalg.svdvals(g32), args.reps),
            "svdvals_block_float32": median_ms(lambda: torch.linalg.svdvals(x), args.reps),
        },
        "float32_eigvalsh_max_error_over_largest": float(((e32 - e64).abs().amax(-1) / e64[:, -1]).max()),
        "max_error_over_largest": errors,
    }


def channel_results(args: argparse.Namespace) -> dict:
    """Per-vector channel pricing: topk, a sort, and every width's loss by the sort's ops
    and by the one launch, with the launch's largest error relative to a vector's total."""
    scores = torch.rand(args.blocks * args.tokens, args.head_dim, device="cuda")
    widths = [args.width // 4, args.width // 2, args.width]

    def lost_by_sort() -> torch.Tensor:  # PerVector.lost_many's ops
        top = scores.sort(dim=-1, descending=True).values
        total = scores.sum(-1)
        return torch.stack([total - top[..., :w].contiguous().sum(-1) for w in widths], -1)

    by_topk = scores.topk(args.width, dim=-1).values.sum(-1)
    by_sort = scores.sort(dim=-1, descending=True).values[:, : args.width].contiguous().sum(-1)
    return {
        "median_ms": {
            "topk_sorted": median_ms(lambda: scores.topk(args.width, dim=-1).values, args.reps),
            "sort_descending": median_ms(lambda: scores.sort(dim=-1, descending=True).values, args.reps),
            "lost_many_by_sort": median_ms(lost_by_sort, args.reps),
            "lost_many_kernel": median_ms(lambda: channel_losses(scores, widths), args.reps),
        },
        "lost_many_widths": widths,
        "lost_many_kernel_max_error_over_total": float(((channel_losses(scores, widths) - lost_by_sort()).abs()
                                                        / scores.sum(-1, keepdim=True)).max()),
        "sort_sums_equal_topk_sums": bool(torch.equal(by_topk, by_sort)),
    }


def knapsack_results(args: argparse.Namespace) -> dict:
    """The knapsack of a call of ``--segments`` segments (each ``--blocks // --segments``
    rows of the mosaic preset's 73 options, losses falling as bytes rise, a third of the
    dearest plan's bytes to spend), by its PyTorch ops and by the one launch."""
    groups, rows, options = args.segments, args.blocks // args.segments, 73
    g = torch.Generator().manual_seed(0)
    cost = sorted(set(float(c) for c in torch.randint(64, 16384, (options,), generator=g)))
    value = -torch.rand(groups, rows, len(cost), generator=g, dtype=torch.float64).cumsum(-1).flip(-1).cuda()
    budget = rows * cost[-1] / 3

    def solve(mode: str) -> torch.Tensor:
        os.environ[KNAPSACK_ENV] = mode
        return knapsack(value, cost, budget)

    before = os.environ.get(KNAPSACK_ENV)
    try:
        plans = {mode: solve(mode) for mode in KNAPSACK_MODES}
        times = {f"knapsack_{mode}": median_ms(lambda m=mode: solve(m), args.reps) for mode in KNAPSACK_MODES}
    finally:
        if before is None:
            os.environ.pop(KNAPSACK_ENV, None)
        else:
            os.environ[KNAPSACK_ENV] = before
    # The launch with other tiles: rows a step and warps (the server's is the first).
    floor = min(cost)
    bracket = (torch.tensor(cost, dtype=torch.float64, device="cuda"), budget, cost.index(floor),
               max(min((c - floor for c in cost if c > floor), default=1.0), 1.0), 4, 16, 8)
    for block_rows, warps in TILES:
        name = f"kernel_{block_rows}x{warps}"
        plans[name] = knapsack_launch(value, *bracket, block_rows=block_rows, num_warps=warps)
        times[f"knapsack_{name}"] = median_ms(lambda b=block_rows, w=warps: knapsack_launch(value, *bracket, block_rows=b,
                                                                                               num_warps=w), args.reps)
    totals = {mode: value.gather(-1, p[..., None]).sum().item() for mode, p in plans.items()}
    return {"median_ms": times, "knapsack_shape": [groups, rows, len(cost)], "knapsack_plan_values": totals,
            "knapsack_same_picks": {mode: bool(torch.equal(p, plans["ops"])) for mode, p in plans.items()}}


TILES = [(BLOCK_ROWS, NUM_WARPS), (32, 8), (16, 4)]  # (rows a step, warps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=8192, help="blocks per call: 32 segments of 32 layers x 8 KV heads")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--width", type=int, default=64, help="the widest per-vector width priced")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--segments", type=int, default=32, help="segments the knapsack's --blocks are split into")
    ap.add_argument("--only", nargs="+", choices=list(PARTS), default=list(PARTS),
                    help="these parts only (the eigenvalue part's block SVD takes minutes)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a GPU")
    torch.manual_seed(0)
    parts = [PARTS[name](args) for name in args.only]
    res = {
        "device": torch.cuda.get_device_name(),
        "shape": {"blocks": args.blocks, "tokens": args.tokens, "head_dim": args.head_dim, "width": args.width},
        "median_ms": {k: v for part in parts for k, v in part.pop("median_ms").items()},
        **{k: v for part in parts for k, v in part.items()},
        "command": "python benchmarks/sealing/bench_pricing_ops.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


PARTS = {"eigen": eigen_results, "channels": channel_results, "knapsack": knapsack_results}


if __name__ == "__main__":
    raise SystemExit(main())
