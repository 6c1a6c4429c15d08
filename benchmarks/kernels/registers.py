"""Registers a thread and occupancy of the decode kernel's launches on an H100/H200 (sm_90),
found offline: each launch is compiled for sm_90 (no GPU needed) and its cubin read with
the ``cuobjdump`` Triton ships.

Occupancy bounds how many loads are in flight; the ninth device run's Nsight Compute
read 255 registers a thread (12.5% occupancy, 33% of DRAM bandwidth) for the packed
dense launch of 64-token tiles (``benchmarks/results/h200x2_2026-11-30i/kernels``). With
the device's Triton (3.6: ``pip install --target DIR triton==3.6.0``, then
``PYTHONPATH=DIR``) the counts here were within ten of ncu's for every launch; another
Triton version compiles differently, so compare counts made with one version only. The
plan's pointers are int32, as the server's plans are (`upload_plans`, `GraphPlan`); counts
made before 2026-12-02 compiled them as int64, which cost the packed sparse-key launch 24
to 40 registers (152 and 168 against 128 at four warps,
``results/registers_decode_sm90_triton36_server_pointer_types.json``).

    python benchmarks/kernels/registers.py --block-n 32 64 --warps 4 8 --json out.json
    python benchmarks/kernels/registers.py --knapsack   # the sealing knapsack's launch
    python benchmarks/kernels/registers.py --channel-pricing --head-dim 128   # per-vector channel pricing's
    python benchmarks/kernels/registers.py --launches dense_packed_tile_starts --block-n 32 --warps 4 \
        --tile-blocks 4 --loop   # and what one pass of its tile loop executes, its shared reads' bank conflicts
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mosaickv.kernels.layout import DENSE, FP8, LOWRANK, SPARSE, TAIL

sys.path.insert(0, str(Path(__file__).parent))
from shared_reads import worst_read  # noqa: E402

# The server's decode launches by name: (key kind, value kind, packs tokens, R_MAX, lanes a
# block takes in a spanned tile or 0, packed tiles' starts read from the plan).
LAUNCHES = {
    "dense_packed": (DENSE, DENSE, True, 16, 0, False),
    "dense": (DENSE, DENSE, False, 16, 0, False),
    "sparse_keys": (SPARSE, DENSE, False, 64, 0, False),
    "lowrank": (LOWRANK, LOWRANK, False, 16, 0, False),
    "tail": (TAIL, TAIL, False, 16, 0, False),
    "sparse_keys_packed": (SPARSE, DENSE, True, 64, 0, False),  # the server's from the eleventh to the eighteenth run
    # Not the server's: whole 32-token blocks in their own lanes, the loop pipelined (block_span).
    "dense_spanned": (DENSE, DENSE, False, 16, 32, False),
    # The server's since the eighteenth run: packed tiles starting where the plan says, the
    # tile loop pipelined.
    "dense_packed_tile_starts": (DENSE, DENSE, True, 16, 0, True),
    "sparse_keys_packed_tile_starts": (SPARSE, DENSE, True, 64, 0, True),
    # The fp8 format's (heads_fp8): whole e4m3 rows packed as dense ones are, beside sparse keys.
    "fp8_packed_tile_starts": (FP8, FP8, True, 16, 0, True),
    "fp8": (FP8, FP8, False, 16, 0, False),  # a block a tile: segments over the packed tiles' 32 tokens
    # One side fp8, the other dense: which side's 8-bit rows cost the instructions.
    "fp8_keys_packed_tile_starts": (FP8, DENSE, True, 16, 0, True),
    "fp8_values_packed_tile_starts": (DENSE, FP8, True, 16, 0, True),
    "sparse_keys_fp8_values_packed_tile_starts": (SPARSE, FP8, True, 64, 0, True),
}
POINTERS = {"q_ptr": "*bf16", "values_ptr": "*bf16", "index_ptr": "*u8", "table_ptr": "*i64", "block_idx_ptr": "*i32",
            "tail_k_ptr": "*bf16", "tail_v_ptr": "*bf16", "tail_rows_ptr": "*i32", "req_ptr": "*i32",
            "items_ptr": "*i32", "item_list_ptr": "*i32", "count_ptr": "*i32", "o_part_ptr": "*fp32",
            "lse_part_ptr": "*fp32", "scratch_ptr": "*bf16", "tiles_ptr": "*i32"}
REGISTERS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 64, 32
# Shared memory an SM has and the driver's reserve a block (Nsight Compute's device
# attributes on the H200: max_shared_memory_per_multiprocessor, reserved_shared_memory_per_block).
SHARED_PER_SM, SHARED_RESERVED_PER_BLOCK = 233_472, 1_024


def compile_launch(k_kind: int, v_kind: int, pack: bool, r_max: int, *, head_dim: int, group: int, block_m: int,
                   block_n: int, warps: int, keys_by_query: bool = True, tails_indexed: bool = True,
                   unroll_group: bool = False, span: int = 0, stages: int = 3,
                   tile_starts: bool = False, tile_blocks: int = 0, rows_past_unroll: bool = True,
                   defer_row_sums: bool = False, max_registers: int = 0, block_stages: int = 0) -> dict:
    """The launch's sm_90 cubin, compiled as a run would: every pointer and stride
    divisible by 16 (what Triton specialises a launch on when they are). ``keys_by_query``
    False: sparse keys densified per tile, as an extend reads them. ``tails_indexed`` False:
    dense tails stored back to back, as the kernel benchmarks (diag_formats.py) store them.
    ``tile_blocks``: block entries a packed tile reads (0: one a token, as before).
    ``rows_past_unroll`` False: items hold no query rows past the unrolled GQA group (a
    decode plan under ``MixedAttention(sparse_key_stages=N)``). ``defer_row_sums`` and
    ``max_registers`` (packed launches), ``block_stages`` (launches of a block a tile): as
    ``MixedAttention``'s. Returns Triton's ``asm`` (``cubin``, ``ttgir``, ...) and
    ``shared_bytes``, the shared memory a block takes."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 defines the kernels for the interpreter: unset it to compile them")
    from mosaickv.kernels.decode import _mixed_attn_kernel  # defined here, after the check

    names = _mixed_attn_kernel.arg_names
    const = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, K_KIND=k_kind, V_KIND=v_kind,
                 R_MAX=r_max, R_LOG2=r_max.bit_length() - 1, ALIGNED=True, SPARSE_MODE=0, TAIL_INDEXED=tails_indexed,
                 KEYS_BY_QUERY=keys_by_query, PACK_TOKENS=pack, PREFETCH=False, UNROLL=group if unroll_group else 0,
                 SPAN=span, STAGES=stages, TILE_STARTS=tile_starts, TILE_BLOCKS=tile_blocks or block_n,
                 ROWS_PAST_UNROLL=rows_past_unroll, DEFER_ROW_SUMS=defer_row_sums,
                 BLOCK_STAGES=0 if pack or span or k_kind < 0 else block_stages)
    sig = {n: "constexpr" if n in const else POINTERS.get(n, "fp32" if n == "qk_scale" else "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n] not in ("constexpr", "fp32")}
    src = ASTSource(fn=_mixed_attn_kernel, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs=attrs)
    options = {"num_warps": warps, "num_stages": 1, **({"maxnreg": max_registers} if max_registers and pack else {})}
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    return {**kernel.asm, "shared_bytes": kernel.metadata.shared}


def compile_knapsack(warps: int | None = None, block_rows: int | None = None) -> bytes:
    """The sealing knapsack's sm_90 cubin (mosaickv.kernels.knapsack): the server's tile,
    or another (rows a step, warps) that bench_pricing_ops.py times."""
    from mosaickv.kernels.knapsack import BLOCK_ROWS, MAX_OPTIONS, NUM_WARPS, _knapsack_kernel

    warps, block_rows = warps or NUM_WARPS, block_rows or BLOCK_ROWS
    names = _knapsack_kernel.arg_names
    const = dict(ROUNDS=8, WAYS=16, STEPS=4, FILL_PASSES=4, BLOCK_R=block_rows, BLOCK_O=MAX_OPTIONS, BLOCK_J=block_rows)
    pointers = {"value": "*fp64", "cost": "*fp64", "choice": "*i64", "eff_buf": "*fp64", "col_buf": "*i64", "step_buf": "*fp64",
                "limits": "*fp64"}  # fmt: skip
    sig = {n: "constexpr" if n in const else pointers.get(n, "i32") for n in names}
    src = ASTSource(fn=_knapsack_kernel, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1}).asm["cubin"]


def compile_channel_pricing(warps: int = 4, head_dim: int = 128) -> bytes:
    """Per-vector channel pricing's sm_90 cubin (mosaickv.kernels.channel_pricing) at a head dim."""
    from mosaickv.kernels.channel_pricing import BLOCK_ROWS, _channel_losses_kernel

    names = _channel_losses_kernel.arg_names
    const = dict(D=head_dim, BLOCK_R=BLOCK_ROWS)
    pointers = {"scores": "*fp32", "widths": "*i32", "out": "*fp32"}
    sig = {n: "constexpr" if n in const else pointers.get(n, "i32") for n in names}
    src = ASTSource(fn=_channel_losses_kernel, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1}).asm["cubin"]


def resources(cubin: bytes) -> dict[str, int]:
    """Registers a thread and stack bytes of a cubin's kernel (``cuobjdump -res-usage``)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage: {out[-300:]!r}")
    return {"registers": int(m[1]), "stack_bytes": int(m[2])}


LOOP_OPS = ("BAR", "SHFL", "LDS", "STS", "LDSM", "HMMA", "LDGSTS", "LDG")


def loop_census(cubin: bytes) -> dict[str, int]:
    """What one pass of the launch's tile loop (the innermost backward branch around its
    first tensor-core product) executes, counted in its SASS: instructions, and of them
    barriers, shuffles, shared-memory and global loads, products. The nineteenth run's
    Nsight Compute found the dense launch bound by its instructions a tile, not by DRAM:
    these are the counts a change to the tile loop moves, found without a GPU."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    ops = {int(a, 16): (op, rest) for a, op, rest in
           re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", sass)}
    mmas = [a for a, (op, _) in ops.items() if op.startswith("HMMA")]
    back = [(int(m[1], 16), a) for a, (op, rest) in ops.items() if op == "BRA"
            and (m := re.search(r"0x([0-9a-f]+)", rest)) and int(m[1], 16) < a]
    around = [(lo, hi) for lo, hi in back if mmas and lo <= mmas[0] <= hi]
    if not around:
        return {"loop_instructions": 0}
    lo, hi = min(around, key=lambda r: r[1] - r[0])
    full = [op for a, (op, _) in ops.items() if lo <= a <= hi]
    body = [op.split(".")[0] for op in full]
    # Byte-wide shared loads: how 8-bit rows reach a product whose reduction runs across them.
    byte_loads = sum(op.startswith(("LDS.U8", "LDS.S8")) for op in full)
    # Bytes the async copies of a pass move (LDGSTS.E moves 4, .64 8, .128 16): over their
    # count, how wide the compiler found the tile's rows contiguous and aligned.
    copied = sum(16 if ".128" in op else 8 if ".64" in op else 4 for op in full if op.startswith("LDGSTS"))
    return {"loop_instructions": len(body), **{f"loop_{op.lower()}": body.count(op) for op in LOOP_OPS},
            "loop_lds_bytes": byte_loads, "loop_ldgsts_bytes": copied}


def shared_buffers(ttgir: str) -> list[str]:
    """Shapes of the shared-memory buffers Triton's pipeliner allocated (a leading 1 is a
    single slot: those loads are not in flight across passes of the loop)."""
    return re.findall(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<([0-9x]+)x\w+", ttgir)


def occupancy(registers: int, warps: int, shared_bytes: int = 0) -> float:
    """Resident warps over the SM's 64, bounded by registers (allocated per warp in
    units of 256), by the shared memory a block takes (with the driver's reserve) and by
    blocks."""
    per_warp = -(-registers * 32 // 256) * 256
    blocks = min(REGISTERS_PER_SM // (per_warp * warps), MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM // warps,
                 SHARED_PER_SM // (shared_bytes + SHARED_RESERVED_PER_BLOCK))
    return blocks * warps / MAX_WARPS_PER_SM


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--launches", nargs="+", choices=list(LAUNCHES), default=list(LAUNCHES))
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--group", type=int, default=4, help="query heads per KV head")
    ap.add_argument("--block-m", type=int, default=16, help="query rows a tile (the server's extend: 64)")
    ap.add_argument("--extend", action="store_true", help="sparse keys densified per tile, as an extend reads them")
    ap.add_argument("--tails-back-to-back", action="store_true",
                    help="dense tails stored back to back, as diag_formats.py stores them (the server reads them in place)")
    ap.add_argument("--block-n", type=int, nargs="+", default=[32, 64], help="tokens a tile")
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, default=3,
                    help="pipeline stages of spanned launches and of packed ones with tile starts")
    ap.add_argument("--sparse-key-stages", type=int, default=0,
                    help="packed sparse-key launches with tile starts at these stages, compiled for one query token "
                         "a request (MixedAttention(sparse_key_stages=N); needs --unroll-group)")
    ap.add_argument("--unroll-group", action="store_true",
                    help="sparse keys read by query gathers for the GQA group's rows in one unrolled step (MixedAttention(unroll_group=True))")
    ap.add_argument("--defer-row-sums", action="store_true",
                    help="dense-key tiles' row sums reduced once an item (MixedAttention(defer_row_sums=True))")
    ap.add_argument("--max-registers", type=int, default=0,
                    help="registers a thread at most (MixedAttention(max_registers=N), Triton's maxnreg; 0: the compiler's)")
    ap.add_argument("--block-stages", type=int, default=0,
                    help="launches of a block a tile pipeline their block loop this deep (MixedAttention(block_stages=N))")
    ap.add_argument("--knapsack", action="store_true", help="the sealing knapsack's launch instead")
    ap.add_argument("--knapsack-tiles", nargs="+", default=[], metavar="ROWSxWARPS",
                    help="with --knapsack, these tiles too (e.g. 32x8 16x8)")
    ap.add_argument("--channel-pricing", action="store_true",
                    help="per-vector channel pricing's launch instead, at --head-dim")
    ap.add_argument("--tile-blocks", type=int, nargs="+", default=[0],
                    help="block entries a packed tile with tile starts reads (0: one a token, the tile's width)")
    ap.add_argument("--loop", action="store_true",
                    help="also count what a pass of the tile loop executes (SASS), the pipeliner's shared buffers "
                         "and the worst bank conflict of a read from them (shared_reads.py)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.sparse_key_stages and not args.unroll_group:
        ap.error("--sparse-key-stages compiles packed sparse keys for a GQA group's unrolled rows: add --unroll-group")
    rows = []
    from mosaickv.kernels.knapsack import NUM_WARPS

    sealing = {"knapsack": (compile_knapsack, NUM_WARPS),
               "channel_pricing": (partial(compile_channel_pricing, head_dim=args.head_dim), 4)}
    for tile in args.knapsack_tiles if args.knapsack else []:
        rows_a_step, warps = map(int, tile.split("x"))
        sealing[f"knapsack_{tile}"] = (partial(compile_knapsack, warps, rows_a_step), warps)
    for name, (compile_sealing, warps) in sealing.items():
        if not getattr(args, name, True):
            continue
        args.launches = []
        start = time.perf_counter()
        cubin = compile_sealing()
        row = {"launch": name, "warps": warps, **resources(cubin), "cubin_bytes": len(cubin),
               "compile_s": round(time.perf_counter() - start, 1)}
        rows.append(row)
        print(f"{name}: {row['registers']} registers, stack {row['stack_bytes']} B, "
              f"{row['cubin_bytes']:,} bytes of cubin, compiled in {row['compile_s']} s", flush=True)
    for name in args.launches:
        k_kind, v_kind, pack, r_max, span, tile_starts = LAUNCHES[name]
        for block_n in args.block_n:
            for warps, lanes in ((w, b) for w in args.warps for b in (args.tile_blocks if tile_starts else [0])):
                if span > block_n:
                    continue
                own = bool(args.sparse_key_stages and k_kind == SPARSE and pack and tile_starts)
                stages = args.sparse_key_stages if own else args.stages
                asm = compile_launch(k_kind, v_kind, pack, r_max, head_dim=args.head_dim, group=args.group,
                                     block_m=args.block_m, block_n=block_n, warps=warps,
                                     keys_by_query=not args.extend, tails_indexed=not args.tails_back_to_back,
                                     unroll_group=args.unroll_group, span=span, stages=stages,
                                     tile_starts=tile_starts, tile_blocks=lanes, rows_past_unroll=not own,
                                     defer_row_sums=args.defer_row_sums, max_registers=args.max_registers,
                                     block_stages=args.block_stages)
                row = {"launch": name, "block_n": block_n, "warps": warps, **resources(asm["cubin"]),
                       "shared_bytes": asm["shared_bytes"]}
                if own:
                    row["rows_past_unroll"] = False
                block_loop = bool(args.block_stages and not pack and not span and k_kind >= 0)
                if span or tile_starts or block_loop:
                    row["stages"] = args.block_stages if block_loop else stages
                    row["async_copies"] = asm["ttgir"].count("async_copy_global_to_local")
                if tile_starts:
                    row["tile_blocks"] = lanes or block_n
                if args.loop:
                    row.update(loop_census(asm["cubin"]), shared_buffers=shared_buffers(asm["ttgir"]),
                               **worst_read(asm["ttgir"]))
                row["occupancy"] = occupancy(row["registers"], warps, row["shared_bytes"])
                rows.append(row)
                loop = (f", loop {row['loop_instructions']} instructions ({row.get('loop_lds_bytes', 0)} byte-wide shared loads), "
                        f"{row.get('loop_bar', 0)} barriers, "
                        f"shared reads at worst {row['shared_read_ways']:g}-way" if args.loop else "")
                print(f"{name:13s} block_n {block_n:3d} warps {warps} lanes {lanes or block_n:2d}: "
                      f"{row['registers']:3d} registers, stack {row['stack_bytes']:4d} B, "
                      f"{row['shared_bytes']:,} B shared, occupancy {row['occupancy']:.1%}{loop}", flush=True)
    result = {"triton": triton.__version__, "target": "sm_90", "head_dim": args.head_dim, "group": args.group,
              "block_m": args.block_m, "extend": args.extend, "unroll_group": args.unroll_group,
              "defer_row_sums": args.defer_row_sums, "max_registers": args.max_registers,
              "block_stages": args.block_stages,
              "tails_back_to_back": args.tails_back_to_back, "command": " ".join(["python", "benchmarks/kernels/registers.py",
                                                            *(argv if argv is not None else sys.argv[1:])]),
              "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # before the kernels are defined: they are compiled, not interpreted
    raise SystemExit(main())
