"""benchmarks/kernels/registers.py compiles a decode launch for sm_90 offline (no GPU) and
reads its registers from the cubin; occupancy follows the SM's register file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parent.parent
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

needs_tools = pytest.mark.skipif(not (TOOLS / "cuobjdump").exists(), reason="this Triton ships no CUDA tools")


@needs_tools
def test_a_launch_compiles_offline_and_reports_registers(tmp_path):
    out = tmp_path / "regs.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "benchmarks/kernels/registers.py", "--launches", "lowrank", "--head-dim", "64",
                    "--group", "2", "--block-n", "32", "--warps", "4", "--json", str(out)],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["launch"] == "lowrank" and 16 <= row["registers"] <= 255 and result["target"] == "sm_90"
    assert 0 < row["occupancy"] <= 1


@needs_tools
def test_the_tile_loops_pass_is_counted_from_its_sass(tmp_path):
    """--loop finds the packed launch's tile loop (the one around its tensor-core
    products) and counts one pass: its products (QK and PV of a 16-row, 32-token tile over
    d=128: 16 m16n8k16 on four warps), its barriers, and the shared buffers the pipeliner
    gave the tile's keys and values."""
    out = tmp_path / "regs.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "benchmarks/kernels/registers.py", "--launches", "dense_packed_tile_starts",
                    "--block-n", "32", "--warps", "4", "--tile-blocks", "4", "--loop", "--json", str(out)],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["tile_blocks"] == 4 and row["loop_hmma"] == 16
    assert row["loop_instructions"] > row["loop_hmma"] + row["loop_bar"] > 16
    assert any(shape.endswith("32x128") for shape in row["shared_buffers"]), row["shared_buffers"]
    assert row["loop_lds_bytes"] == 0


@needs_tools
def test_grouped_fp8_values_reach_their_product_without_byte_wide_loads(tmp_path):
    """The arena's fp8 values, grouped by tokens per channel, reach the probabilities'
    product in words, packed or a block a tile (in rows they took 32 byte-wide shared loads
    a pass: fp8_value_layout.py's ``rows``); fp8 keys, rows, need none either. And they
    travel in async copies as wide as the keys' rows: groups of 4 took 14 copies a pass
    where rows take 10, 8-9% slower on the GPU (thirtieth run)."""
    out = tmp_path / "regs.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "benchmarks/kernels/registers.py", "--launches", "fp8_keys_packed_tile_starts",
                    "fp8_values_packed_tile_starts", "fp8", "--block-n", "32", "--warps", "4", "--tile-blocks", "4",
                    "--block-stages", "7", "--loop", "--json", str(out)],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    rows = {row["launch"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"fp8_keys_packed_tile_starts", "fp8_values_packed_tile_starts", "fp8"}
    assert all(row["loop_lds_bytes"] == 0 and row["loop_hmma"] > 0 for row in rows.values())
    keys, values = rows["fp8_keys_packed_tile_starts"], rows["fp8_values_packed_tile_starts"]
    assert values["loop_ldgsts_bytes"] == keys["loop_ldgsts_bytes"] > 0
    assert values["loop_ldgsts"] <= keys["loop_ldgsts"]


@needs_tools
@pytest.mark.parametrize("sparse_key_stages", [1, 3])
def test_the_census_reports_the_worst_shared_read_of_the_servers_sparse_key_launch(tmp_path, sparse_key_stages):
    """--loop reads the compiled TTGIR's shared reads: the server's packed sparse-key launch
    (its tile loop not pipelined, sparse_key_stages 1: channel loads as vectors into
    registers) and the one before it (3 pipelined stages, no vector hint there; diag
    setting 38) read every shared buffer they have without a bank conflict, and the report
    names the worst read (none where the loop reads no shared buffer)."""
    out = tmp_path / "regs.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "benchmarks/kernels/registers.py", "--launches", "sparse_keys_packed_tile_starts",
                    "--block-n", "32", "--warps", "4", "--unroll-group", "--stages", "7",
                    "--sparse-key-stages", str(sparse_key_stages),
                    "--tile-blocks", "4", "--loop", "--defer-row-sums", "--max-registers", "128", "--json", str(out)],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["shared_read_ways"] == 1.0, row["worst_shared_read"]
    assert row["worst_shared_read"] == "" or row["worst_shared_read"].endswith("1-way")


@needs_tools
def test_the_sealing_launches_compile_for_sm90_spilling_at_most_one_float64(tmp_path):
    # The interpreter runs what compiled Triton may refuse (the knapsack kernel's first GPU
    # run failed where every CPU test passed): both sealing kernels go through the compiler.
    out = tmp_path / "regs.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "benchmarks/kernels/registers.py", "--knapsack", "--channel-pricing", "--json", str(out)],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    rows = {row["launch"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"knapsack", "channel_pricing"}
    # Spilling is the compiler's: the knapsack's server tile (16 rows, eight warps) takes 202
    # registers and no stack under Triton 3.6 (the GPU machine's), 128 and 8 bytes (one
    # float64) under 3.9 (this machine's). More than that would be a tile to change.
    assert all(row["stack_bytes"] <= 8 and 16 <= row["registers"] <= 255 for row in rows.values()), rows


def test_occupancy_is_bounded_by_registers_warps_and_blocks():
    sys.path.insert(0, str(ROOT / "benchmarks" / "kernels"))
    try:
        from registers import occupancy
    finally:
        sys.path.pop(0)
    assert occupancy(255, 4) == 0.125  # ncu's theoretical occupancy at the packed launch's 255 registers
    assert occupancy(148, 4) == 0.1875  # and at the sparse-key launch's 148
    assert occupancy(128, 4) == 0.25
    assert occupancy(32, 4) == 1.0  # the SM's 64 warps, not its register file, bound it
    # Shared memory: 64 KiB a block (and the driver's 1 KiB) fits 3 blocks in the H200's
    # 228 KiB, under the 4 its registers allow; 16,560 bytes (the hinted sparse-key launch's,
    # as Nsight Compute read it) leave registers the bound.
    assert occupancy(128, 4, 65_536) == 0.1875
    assert occupancy(128, 4, 16_560) == 0.25


def _shared_reads():
    sys.path.insert(0, str(ROOT / "benchmarks" / "kernels"))
    try:
        import shared_reads
    finally:
        sys.path.pop(0)
    return shared_reads


# A tile loop's TTGIR as Triton 3.6 wrote it for the packed sparse-key launch whose channel
# loads were vector async copies (twenty-second device run: 204 µs against 115): the index
# and value tiles stored row by row, unswizzled, and read back one token a lane.
SPARSE_TILE_TTGIR = """\
#blocked2 = #ttg.blocked<{sizePerThread = [1, 8], threadsPerWarp = [4, 8], warpsPerCTA = [4, 1], order = [1, 0]}>
#blocked6 = #ttg.blocked<{sizePerThread = [1, 1], threadsPerWarp = [32, 1], warpsPerCTA = [1, 4], order = [0, 1]}>
#shared1 = #ttg.swizzled_shared<{vec = 8, perPhase = 1, maxPhase = 8, order = [1, 0]}>
#shared2 = #ttg.swizzled_shared<{vec = 1, perPhase = 1, maxPhase = 1, order = [1, 0]}>
        %qg_313 = ttg.local_load %ix_224 token %vt_312 : !ttg.memdesc<32x64xi8, #shared2, #smem, mutable> -> tensor<32x64xi8, #blocked6> loc(#loc435)
        %raw_315 = ttg.local_load %raw_233 token %vt_312 : !ttg.memdesc<32x64xbf16, #shared2, #smem, mutable> -> tensor<32x64xbf16, #blocked6> loc(#loc400)
"""


def test_rows_read_one_a_lane_from_an_unswizzled_buffer_conflict_by_row_stride():
    """A lane a token down rows 64 bytes apart lands on 2 of the 32 banks (16-way); rows
    128 bytes apart, on one (32-way)."""
    sr = _shared_reads()
    reads = sr.shared_reads(SPARSE_TILE_TTGIR)
    assert [(r.shape, r.dtype, r.ways) for r in reads] == [((32, 64), "i8", 16.0), ((32, 64), "bf16", 32.0)]
    assert sr.worst_read(SPARSE_TILE_TTGIR)["shared_read_ways"] == 32.0


def test_reads_along_a_buffers_rows_or_through_its_swizzle_conflict_less():
    """The same buffer read in the copy's own layout (8 contiguous channels a lane, 16-byte
    accesses) takes the fewest wavefronts; a swizzled buffer (8-element vectors permuted
    by row) read a token a lane spreads rows over 8 banks' groups: 4-way, not 32."""
    sr = _shared_reads()
    known = sr.layouts(SPARSE_TILE_TTGIR)
    assert sr.read_ways((32, 64), "bf16", known["#shared2"], known["#blocked2"]) == 1.0
    assert sr.read_ways((32, 64), "i8", known["#shared2"], known["#blocked2"]) == 1.0
    assert sr.read_ways((32, 128), "bf16", known["#shared1"], known["#blocked6"]) == 4.0
    one_d = sr.Blocked((1,), (32,), (0,))
    assert sr.read_ways((4,), "i64", sr.Swizzled(1, 1, 1, (0,)), one_d) == 1.0  # 4 entries broadcast to 32 lanes


@needs_tools
def test_fp8_values_interleaved_four_tokens_a_word_need_no_byte_wide_loads(tmp_path):
    """benchmarks/kernels/fp8_value_layout.py: the values' product over the arena's rows of
    bytes gathers its operand a byte at a time; stored four tokens of a channel a word and
    read through those addresses, it needs none and fewer instructions a pass."""
    out = tmp_path / "layouts.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "benchmarks/kernels/fp8_value_layout.py", "--tokens", "32", "--head-dim", "128",
                    "--json", str(out)], cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    rows = {row["layout"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["rows"]["loop_lds_bytes"] >= 16 and rows["interleaved"]["loop_lds_bytes"] == 0
    assert rows["interleaved"]["loop_instructions"] < rows["rows"]["loop_instructions"]
