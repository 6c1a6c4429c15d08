"""Per-format decode bandwidth and launch-parameter sweep (diagnostics for the kernel).

One fixed shape (B=32, L=32k, Hq=32, Hkv=8, d=128) in segments of ``--segment`` tokens
(32: the presets' ``segment_size``, so the server's blocks; earlier runs used 128); every
block in one format (or the benchmark's 2x/3x/6x mixes, or at 32 the formats the presets
chose on real text); several launch settings
(:data:`SETTINGS`: the server's decode tuning first, every other output compared with
its). Prints and writes JSON.

    PYTHONUNBUFFERED=1 python benchmarks/kernels/diag_formats.py --out DIR [--segment 32]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import triton.testing

from mosaickv.kernels.decode import MixedDecodeWrapper
from mosaickv.kernels.synthetic import Recipe, synthetic_arena

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import POLICY_SEGMENT, pattern_for, policy_patterns  # noqa: E402

# The block formats the presets chose on SmolLM2 text (head dim 64, values dense or low
# rank as the presets keep them), scaled to this shape: what a server decodes.
POLICY_REPORT = Path(__file__).parents[1] / "results" / "eval_dense_values_2k_segment.json"
# The formats heads_fp8 chose on the same text (nearly every kept block's rows in fp8).
FP8_POLICY_REPORT = Path(__file__).parents[1] / "results" / "eval_heads_fp8_2k_segment.json"

B, L, HQ, HKV, D = 32, 32768, 32, 8, 128
# The server's DECODE_TUNING; settings from 35 on are it with a few changes.
SERVER = {"block_n": 32, "pack_tokens": True, "wide_block_n": 32, "pack_sparse_keys": True, "unroll_group": True,
          "chunk_by_kind": True, "tile_starts": True, "tile_blocks": 4, "pipeline_stages": 7, "sparse_key_stages": 1,
          "defer_row_sums": True, "max_registers": 128, "block_stages": 7}
# MixedDecodeWrapper settings beside programs per SM; the first is the server's. A setting
# is named by its place in this list (--settings, the runs' records): one removed leaves
# None in its place.
SETTINGS = [
    (SERVER, 8),
    ({"block_n": 32}, 8),  # one block per tile: the server's for segments over 32 tokens
    ({"block_n": 32, "pack_tokens": True, "wide_block_n": 32}, 16),
    ({"block_n": 32, "pack_tokens": True, "wide_block_n": 128}, 8),
    # 64-token packed tiles: the server's through the ninth run; 252 registers a thread in
    # the packed dense launch against 128 at 32 (sm_90, registers.py), 12.5% occupancy and
    # 33% of DRAM bandwidth under ncu (h200x2_2026-11-30i/kernels/ncu_decode.csv).
    ({"block_n": 32, "pack_tokens": True}, 8),
    ({"block_n": 64, "pack_tokens": True, "wide_block_n": 32}, 8),
    ({"block_n": 32, "prefetch_entries": True}, 8),
    # Eight warps: twice the threads a tile hold fewer registers each. Four programs per
    # SM: the same threads as eight of four warps.
    ({"block_n": 32, "pack_tokens": True, "wide_block_n": 32, "num_warps": 8}, 4),
    ({"block_n": 32, "pack_tokens": True, "num_warps": 8}, 4),
    ({"block_n": 32, "num_warps": 8}, 4),
    # Setting 10: dense pairs alone packed (the server's through the tenth run); sparse keys
    # beside dense values packed too (setting 0) decoded the 3x mix in 712 us against 840
    # (eleventh run, h200x2_2026-11-30k/kernels/diag_formats_segment32.json).
    ({"block_n": 32, "pack_tokens": True, "wide_block_n": 32}, 8),
    # Setting 11: setting 16 with 9 stages. Until the seventeenth run it was each packed
    # tile's loads issued before the products of the tile before (prefetch_tiles: 204
    # registers against 128), slower on every format: dense 2,178 us against 1,527, the 3x
    # mix 944 against 697 (h200_2026-12-01e/call11_kernels); removed from the kernel.
    ({"block_n": 32, "pack_tokens": True, "wide_block_n": 64, "pack_sparse_keys": True, "unroll_group": True,
      "chunk_by_kind": True, "block_span": 32, "pipeline_stages": 9}, 8),
    # Setting 12: dense pairs' blocks each in its own 32 lanes (block_span), not packed, so a
    # tile's addresses follow from the loop index and Triton pipelines the loop (3 stages:
    # keys and values one tile ahead in shared memory): 110 registers against 128
    # (registers.py --launches dense_spanned). Seventeenth run (h200_2026-12-01e/call11_kernels):
    # dense 1,260 us against the server's 1,527, but the presets' 3x mix 1,291 against 697
    # and 6x 1,265 against 429: a spanned launch takes a loop step per block whatever the
    # block keeps, so it pays for blocks that keep all their tokens only.
    ({"block_n": 32, "pack_tokens": True, "wide_block_n": 32, "pack_sparse_keys": True, "unroll_group": True,
      "chunk_by_kind": True, "block_span": 32}, 8),
    # Setting 13: the server's before the fifteenth run, one run length for every format
    # pair. Setting 0 cuts each pair's runs by its own work (chunk_by_kind): in the eleventh
    # run's ncu profile the packed sparse-key launch had 256 items (one per request and KV
    # head) on 132 SMs, 11% of DRAM bandwidth, beside the dense launch's 48%. With unrolled
    # gathers, in the fifteenth run (h200_2026-12-01c/call8_kernels, setting 13 then the
    # cut one) 6x decoded in 428 us cut against 457, 3x in 697 against 708, dense 1,517
    # against 1,521.
    ({"block_n": 32, "pack_tokens": True, "wide_block_n": 32, "pack_sparse_keys": True, "unroll_group": True}, 8),
    # Sparse keys read 16 or 8 channels a pass (126 registers, no stack) were slower than
    # setting 0 in the thirteenth run: 811 and 904 us against 716 on the 3x mix, 528 and 598
    # against 470 on 6x (h200_2026-12-01/call6_kernels): removed from the kernel.
    # Setting 14: the server's before the fourteenth run, a GQA group's query rows gathering
    # sparse keys' channels one row after another. Setting 0 gathers them in one unrolled
    # step (their loads in flight together): the packed launch at 153 registers, no stack,
    # against 128 and 8 bytes of stack (registers_decode_sm90_triton36_unroll_group.json),
    # occupancy 18.8% against 25%. In the fourteenth run (h200_2026-12-01b/call8_kernels,
    # when setting 14 was the unrolled one) 6x decoded in 454 us unrolled against 465, 3x in
    # 710 against 711, dense in 1,509 both.
    ({"block_n": 32, "pack_tokens": True, "wide_block_n": 32, "pack_sparse_keys": True}, 8),
    # Settings 15-17: setting 12 with 9 stages (keys and values two tiles ahead, as the
    # compiled loop's buffers show: Triton 3.6 takes its chain for four dependent loads, one
    # ceil((stages - 2) / 4) stages after another), two blocks a tile (168 registers, 18.8%
    # occupancy), eight warps (80 registers, 37.5%). Seventeenth run: dense 1,265, 1,216
    # (the fastest, 1.26x the server's) and 2,413 us; the 3x mix 1,354, 1,204 and 2,481.
    ({"block_n": 32, "pack_tokens": True, "wide_block_n": 32, "pack_sparse_keys": True, "unroll_group": True,
      "chunk_by_kind": True, "block_span": 32, "pipeline_stages": 9}, 8),
    ({"block_n": 32, "pack_tokens": True, "wide_block_n": 64, "pack_sparse_keys": True, "unroll_group": True,
      "chunk_by_kind": True, "block_span": 32}, 8),
    ({"block_n": 32, "pack_tokens": True, "wide_block_n": 32, "pack_sparse_keys": True, "unroll_group": True,
      "chunk_by_kind": True, "block_span": 32, "num_warps": 8}, 4),
    # Setting 18: the server's before the eighteenth run, each packed tile starting where
    # the one before ended; settings 19-20: the server's (tile_starts) at 9 stages (157
    # registers) and on eight warps at 3 (92; registers.py --launches
    # dense_packed_tile_starts --stages 3 9). Eighteenth run (h200_2026-12-02/call5_diag),
    # tile starts at 3 stages, then 18, 19, 20: the 3x mix 672 us, 704, 722, 1,107; 6x 425,
    # 433, 459, 672; dense 1,413, 1,521, 1,533, 2,526.
    ({"block_n": 32, "pack_tokens": True, "wide_block_n": 32, "pack_sparse_keys": True, "unroll_group": True,
      "chunk_by_kind": True}, 8),
    ({"block_n": 32, "pack_tokens": True, "wide_block_n": 32, "pack_sparse_keys": True, "unroll_group": True,
      "chunk_by_kind": True, "tile_starts": True, "pipeline_stages": 9}, 8),
    ({"block_n": 32, "pack_tokens": True, "wide_block_n": 32, "pack_sparse_keys": True, "unroll_group": True,
      "chunk_by_kind": True, "tile_starts": True, "num_warps": 8}, 4),
    # Settings 21-23: the server's of the eighteenth run with packed tiles reading 8 block
    # entries (one a lane) instead of one a token, so a tile's index work ([tokens, lanes]
    # compares, gathers over the lanes) shrinks; 64-token dense tiles with 8 lanes; 4 lanes
    # (the server's since the nineteenth run, setting 0). Compiled for sm_90 with Triton 3.6
    # (registers.py --launches dense_packed_tile_starts sparse_keys_packed_tile_starts
    # --block-n 32 64 --warps 4 --unroll-group --tile-blocks 0 4 8 16): dense 32-token tiles
    # 120 registers (8 lanes) and 123 (4) against 128, 64-token ones 168 against 255; packed
    # sparse keys 128 either way. Nineteenth run (h200_2026-12-02b/call5_diag_ncu), 0 (then
    # without tile_blocks), 21, 22, 23: the 3x mix 670, 654, 649, 645 us; 6x 418, 416, 424,
    # 412; dense 1,424, 1,348, 1,278, 1,306. Under Nsight Compute the dense launch read 51%
    # of DRAM's bandwidth without and 55% with 8 lanes, 8.6 and 8.3 cycles a warp between
    # issued instructions, 25% occupancy (register-bound) either way.
    ({"block_n": 32, "pack_tokens": True, "wide_block_n": 32, "pack_sparse_keys": True, "unroll_group": True,
      "chunk_by_kind": True, "tile_starts": True, "tile_blocks": 8}, 8),
    ({"block_n": 32, "pack_tokens": True, "wide_block_n": 64, "pack_sparse_keys": True, "unroll_group": True,
      "chunk_by_kind": True, "tile_starts": True, "tile_blocks": 8}, 8),
    ({"block_n": 32, "pack_tokens": True, "wide_block_n": 32, "pack_sparse_keys": True, "unroll_group": True,
      "chunk_by_kind": True, "tile_starts": True, "tile_blocks": 4}, 8),
    # Setting 24: the server's at 7 stages. At 3 to 6 the pipeliner gives the tile's keys
    # and values one shared slot each (the loads before them take the other stages), so one
    # tile's data is in flight; at 7, two slots each, at 128 registers (25% occupancy) and
    # 439 instructions a pass against 392 (registers.py --launches dense_packed_tile_starts
    # --tile-blocks 4 --stages 7 --loop; results/registers_decode_sm90_triton36_loop_census_candidates.json).
    # At 32 lanes 9 stages took 157 registers and were slower (setting 19). Not yet run.
    ({"block_n": 32, "pack_tokens": True, "wide_block_n": 32, "pack_sparse_keys": True, "unroll_group": True,
      "chunk_by_kind": True, "tile_starts": True, "tile_blocks": 4, "pipeline_stages": 7}, 8),
    # Setting 25: one warp a program, 16-token tiles: the tile's row maxima and sums and
    # its probabilities' re-layout stay inside the warp (2 barriers a pass against 16), 647
    # instructions a pass for 16 tokens against 392 a warp for 32 on four warps (the SM
    # issues 17% fewer a token), 168 registers (12 warps an SM against 16). The packed
    # sparse-key launch is worse so (255 registers, 2,710 instructions for 16 tokens): read
    # the dense rows (same census file as setting 24). Not yet run.
    ({"block_n": 16, "pack_tokens": True, "wide_block_n": 16, "pack_sparse_keys": True, "unroll_group": True,
      "chunk_by_kind": True, "tile_starts": True, "tile_blocks": 4, "num_warps": 1}, 16),
    # Setting 26: setting 25's dense launches (one warp, 16-token tiles) beside the server's
    # other launches (four warps; sparse keys in 32-token tiles): dense_num_warps.
    ({"block_n": 32, "pack_tokens": True, "wide_block_n": 16, "pack_sparse_keys": True, "unroll_group": True,
      "chunk_by_kind": True, "tile_starts": True, "tile_blocks": 4, "dense_num_warps": 1}, 16),
    # Settings 27 and 28: the server's (7 stages since the twentieth run) at 9 and 11 stages.
    ({"block_n": 32, "pack_tokens": True, "wide_block_n": 32, "pack_sparse_keys": True, "unroll_group": True,
      "chunk_by_kind": True, "tile_starts": True, "tile_blocks": 4, "pipeline_stages": 9}, 8),
    ({"block_n": 32, "pack_tokens": True, "wide_block_n": 32, "pack_sparse_keys": True, "unroll_group": True,
      "chunk_by_kind": True, "tile_starts": True, "tile_blocks": 4, "pipeline_stages": 11}, 8),
    # Settings 29 and 30: the server's on eight warps, 32-token tiles (80 registers, 37.5%
    # occupancy, 351 instructions a warp a pass against 439 on four) and 64-token tiles
    # (123 registers, 25%, 444): registers.py --launches dense_packed_tile_starts --stages 7
    # --tile-blocks 4 --warps 8 --loop (results/registers_decode_sm90_triton36_loop_census_7stages.json).
    ({"block_n": 32, "pack_tokens": True, "wide_block_n": 32, "pack_sparse_keys": True, "unroll_group": True,
      "chunk_by_kind": True, "tile_starts": True, "tile_blocks": 4, "pipeline_stages": 7, "num_warps": 8}, 3),
    ({"block_n": 32, "pack_tokens": True, "wide_block_n": 64, "pack_sparse_keys": True, "unroll_group": True,
      "chunk_by_kind": True, "tile_starts": True, "tile_blocks": 4, "pipeline_stages": 7, "num_warps": 8}, 2),
    # Setting 31: the server's with the packed sparse-key launch pipelined at 3 stages
    # (sparse_key_stages): compiled for one query token a request, its tile loop has no
    # inner loop over rows past the GQA group, which had kept Triton from pipelining it:
    # 128 registers, 18 async copies, 1,368 instructions and 49 barriers a pass against
    # 1,469 and 50 unpipelined (at 7 stages it would take 229 registers; registers.py
    # --sparse-key-stages, results/registers_decode_sm90_triton36_sparse_key_stages.json).
    ({"block_n": 32, "pack_tokens": True, "wide_block_n": 32, "pack_sparse_keys": True, "unroll_group": True,
      "chunk_by_kind": True, "tile_starts": True, "tile_blocks": 4, "pipeline_stages": 7, "sparse_key_stages": 3}, 8),
    # Settings 32-34: launches of dense keys sum each row's probabilities per lane and reduce
    # them once an item (defer_row_sums): a tile's 32 lanes lie across the four warps, so its
    # row sum was a reduction through shared memory a tile. Packed dense launch, 7 stages
    # (registers.py --defer-row-sums [--max-registers 128] --loop): 419 instructions and 15
    # barriers a pass against 439 and 18 at 128 registers held by maxnreg (setting 32); left
    # to the compiler, 417 and 15 at 143 registers, 18.8% occupancy against 25% (setting 34).
    # Setting 33: setting 32 with setting 31's pipelined sparse keys (1,328 instructions
    # and 47 barriers a pass against 1,368 and 49, 128 registers). Twenty-first run
    # (h200_2026-12-02d/call6_diag), settings 0 (then), 31, 32, 33: the 3x mix 597, 593,
    # 585, 582 us; 6x 385, 384, 379, 378; dense 1,209, 1,209, 1,174, 1,177. Setting 34: the
    # 3x mix 631 against 600 (call5_diag). Setting 33 is the server's since (setting 0).
    ({"block_n": 32, "pack_tokens": True, "wide_block_n": 32, "pack_sparse_keys": True, "unroll_group": True,
      "chunk_by_kind": True, "tile_starts": True, "tile_blocks": 4, "pipeline_stages": 7, "defer_row_sums": True,
      "max_registers": 128}, 8),
    ({"block_n": 32, "pack_tokens": True, "wide_block_n": 32, "pack_sparse_keys": True, "unroll_group": True,
      "chunk_by_kind": True, "tile_starts": True, "tile_blocks": 4, "pipeline_stages": 7, "sparse_key_stages": 3,
      "defer_row_sums": True, "max_registers": 128}, 8),
    ({"block_n": 32, "pack_tokens": True, "wide_block_n": 32, "pack_sparse_keys": True, "unroll_group": True,
      "chunk_by_kind": True, "tile_starts": True, "tile_blocks": 4, "pipeline_stages": 7, "defer_row_sums": True}, 8),
    # Setting 35: the server's with its launches of a block a tile (low rank, masks, sparse
    # values; the presets' 3x mix's low-rank blocks took about 46 of 711-722 us in the
    # twentieth run's profile for under 1% of the bytes) reading each 32-token block as one tile through a
    # block loop pipelined 7 deep (block_stages). Offline (registers.py --launches lowrank
    # --block-stages 7 ... --loop): 128 registers against 92, 441 instructions a pass
    # against 579; Triton 3.6 pipelines the blocks' table entries (35 async copies), not
    # their data. Twenty-second run (h200_2026-12-02e/call10_diag), against setting 0 then
    # (this without block_stages): low-rank blocks 2,314 us against 2,457, the low-rank 3x
    # mix 4,086 against 4,250, the presets' 3x mix level (640 against 640); the server's
    # since, so setting 0 now.
    (SERVER, 8),
    # Settings 36 and 37 (and 39 and 40, dropped from the end) were warp tiles
    # (MixedAttention(warp_tiles=True): a packed dense tile a warp, each warp its own softmax
    # state). Measured in the twenty-third run (h200_2026-12-02f/summary.json), they lost at
    # every setting: the 3x mix 716-838 us against the server's 568, 6x 557-651 against 369,
    # dense 1,168-1,584 against 1,150; removed since. Their places stay empty (None) so that
    # setting 38, and every run's record of a setting by its number, keep their numbers.
    None,
    None,
    # Setting 38: the server's through the twenty-third run, its packed sparse-key tile loop
    # pipelined 3 stages deep (sparse_key_stages 3). In that run this setting was the
    # server's with that loop not pipelined (sparse_key_stages 1, so their channel loads are
    # vectors into registers, not shared buffers: VECTOR_KEYS; offline 828 instructions and
    # 36 barriers a pass against 1,026 and 38 at 3 stages, no conflicted shared read either
    # way; the twentieth run's unpipelined loop waited on global loads, long scoreboard
    # 2.74): the 3x mix 559 us against 568, 6x 363 against 369, dense 1,148 against 1,150
    # (h200_2026-12-02f/summary.json). The server's since (setting 0), not yet timed as such.
    ({**SERVER, "sparse_key_stages": 3}, 8),
    # Settings 39 and 40: the server's with packed tiles of whole rows that have an fp8
    # side 64 and 128 tokens long (fp8_block_n). Twenty-ninth run (h200_2026-12-03d/
    # call8_decode_fp8, bench_decode): heads_fp8's mixes read 1.7-2.0 TB/s where
    # mosaic_heads' (dense rows) read 2.9-3.5, about as many tokens a second either way.
    # Offline (sm_90, Triton 3.9, registers.py --launches dense_packed_tile_starts
    # fp8_packed_tile_starts --block-n 32 64 128 --warps 4 --tile-blocks 4 --stages 7
    # --defer-row-sums --max-registers 128 --loop): a pass over 32 fp8 rows takes 471
    # instructions (76 shared loads, 3 ldmatrix; dense rows: 337, 24 and 19), 14.7 a token
    # against dense's 10.5; 64 rows 778 (12.2 a token, 128 B of stack), 128 rows 1,492
    # (11.7, 408 B, 18.8% occupancy). With fp8 values grouped by four tokens (no byte-wide
    # loads): 433 at 32 rows, 111 registers, and 640 at 64, 72 B spilled
    # (results/registers_decode_sm90_triton39_fp8_grouped.json). Thirtieth run (B=32, L=32k):
    # both slower than the server's 32 rows (heads_fp8 3x 1,022 and 2,204 against 925 us).
    ({**SERVER, "fp8_block_n": 64}, 8),
    ({**SERVER, "fp8_block_n": 128}, 8),
]


def formats(seg: int) -> dict[str, list[Recipe]]:
    real = {}
    if seg == POLICY_SEGMENT:
        report = json.loads(POLICY_REPORT.read_text())
        real = {name: pat for name, pat, _ in policy_patterns(report, D, 64) if name.startswith("mosaic_dense_values")}
        fp8 = json.loads(FP8_POLICY_REPORT.read_text())
        real.update((name, pat) for name, pat, _ in policy_patterns(fp8, D, 64) if name.startswith("heads_fp8"))
    return {
        **real,
        "dense_8and32": [Recipe(8, ("dense", 0), ("dense", 0)), Recipe(seg, ("dense", 0), ("dense", 0))],
        "dense": [Recipe(seg, ("dense", 0), ("dense", 0))],
        "sparse32": [Recipe(seg, ("sparse", 32), ("sparse", 32))],
        "sparseK_denseV": [Recipe(seg, ("sparse", 32), ("dense", 0))],
        "lowrank32": [Recipe(seg, ("lowrank", 32), ("lowrank", 32))],
        "fp8": [Recipe(seg, ("fp8", 0), ("fp8", 0))],
        **{f"mix{t}x": pattern_for(float(t), D, seg)[0] for t in (2, 3, 6)},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--segment", type=int, default=32, help="tokens per segment (the presets' segment_size: 32)")
    ap.add_argument("--formats", nargs="*", help="only these (default: all)")
    ap.add_argument("--settings", nargs="*", type=int, help="only these rows of SETTINGS, by index (default: all)")
    ap.add_argument("--profile-once", action="store_true",
                    help="no timing: each setting runs once after its warm-up, for a profiler such as ncu to read "
                         "(benchmarks/kernels/ncu_decode.sh)")
    args = ap.parse_args()
    gone = [i for i in args.settings or () if not 0 <= i < len(SETTINGS) or SETTINGS[i] is None]
    if gone:
        ap.error(f"settings {gone} are past the end of SETTINGS ({len(SETTINGS)}) or removed (None in their places)")
    args.out.mkdir(parents=True, exist_ok=True)  # written after each format: a missing folder lost all but the first
    seg = args.segment
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    segs = L // seg - 1
    tail_len = L - segs * seg
    tail = torch.empty(B * tail_len, HKV, D, device="cuda", dtype=torch.bfloat16).normal_()
    q = torch.randn(B, HQ, D, device="cuda").bfloat16()
    rows = []
    for name, pattern in formats(seg).items():
        if args.formats and name not in args.formats:
            continue
        arena, indptr, indices = synthetic_arena(B * HKV, segs, pattern, D, "cuda")
        read = arena.nbytes() + arena.table.numel() * 8 + tail.numel() * 4
        ref = None
        for i, setting in enumerate(SETTINGS):
            if setting is None or (args.settings is not None and i not in args.settings):
                continue
            kwargs, per_sm = setting
            w = MixedDecodeWrapper(**kwargs)
            w.plan_arena(arena, indptr, indices, tail, tail, np.arange(B + 1) * tail_len, np.ones(B, dtype=np.int64),
                         HQ, HKV, max_programs=per_sm * sms)
            out = w.run(q)
            ref = out.float() if ref is None else ref
            err = float((out.float() - ref).norm() / ref.norm())
            if args.profile_once:
                torch.cuda.synchronize()
                print(f"profiled run: {name} setting {i} {kwargs} per_sm={per_sm}, launches "
                      f"{[(ln.k_kind, ln.v_kind) for ln in w.plan_info.launches]}", flush=True)
                w.run(q, out=out)
                torch.cuda.synchronize()
                continue
            t = triton.testing.do_bench(lambda: w.run(q, out=out), warmup=10, rep=40, return_mode="median") * 1e-3
            rows.append({"format": name, "segment": seg, **kwargs, "programs_per_sm": per_sm,
                         "rel_err_vs_first": err, "time_s": t, "bytes": read, "GBps": read / t / 1e9})
            print(f"{name:14s} {kwargs} per_sm={per_sm}: {t * 1e6:8.0f} us {read / t / 1e9:6.0f} GB/s  rel err {err:.1e}",
                  flush=True)
        del arena
        (args.out / "diag_formats.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "segment": seg,
                                                                "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
