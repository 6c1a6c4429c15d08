"""Mixed-format decode kernel against the PyTorch reference (Triton interpreter on the CPU)."""

from __future__ import annotations

import math
import os
import zlib

import numpy as np
import torch

if not torch.cuda.is_available():  # must precede the first import of the kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from mosaickv.formats import HEADER_BYTES, SIDE_KINDS, BlockFormat, SideFormat
from mosaickv.kernels.decode import MixedAttention, MixedDecodeWrapper, run_plan
from mosaickv.kernels.block_runs import KIND_PAIRS, NUM_KINDS, TileShape, batch_runs, block_runs, run_tile_starts
from mosaickv.kernels.layout import DENSE, FP8, FP8_GROUP, SPARSE, pack_requests
from mosaickv.kernels.synthetic import Recipe, random_layer, synthetic_arena
from mosaickv.reference import CompressedLayer, attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KINDS = SIDE_KINDS


def oracle(q: torch.Tensor, layer: CompressedLayer, tk: torch.Tensor, tv: torch.Tensor) -> torch.Tensor:
    """``reference.attention`` for ``q`` [Hq, nq, d]; where the tail is shorter than ``nq``
    (a decode query with an empty tail) the same softmax over what each query sees."""
    hq, nq, d = q.shape
    hkv, t, _ = tk.shape
    if t >= nq:
        return attention(q, layer, tk, tv)
    out = torch.zeros(hq, nq, d)
    group = hq // hkv
    for h, (ck, cv) in enumerate(layer.decompressed(hkv, d)):
        for i in range(nq):
            vis = t - nq + i + 1
            keys = torch.cat([ck, tk[h, : max(vis, 0)].float()])
            vals = torch.cat([cv, tv[h, : max(vis, 0)].float()])
            if keys.shape[0]:
                w = torch.softmax(q[h * group : (h + 1) * group, i].float() @ keys.T / math.sqrt(d), -1)
                out[h * group : (h + 1) * group, i] = w @ vals
    return out


def check_close(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-2) -> None:
    """Every element written and finite; relative error within ``tol`` (bf16 kernels)."""
    out = out.float().cpu()
    assert torch.isfinite(out).all(), "output has NaN/inf (unwritten or bad merge)"
    scale = ref.abs().max().clamp_min(1e-3)
    assert (out - ref).norm() <= tol * ref.norm().clamp_min(1e-3), f"rel err {(out - ref).norm() / ref.norm():.3e}"
    assert (out - ref).abs().max() <= 3 * tol * scale, f"max abs err {(out - ref).abs().max():.3e}"


def run_decode(
    gen: torch.Generator,
    layers: list[CompressedLayer],
    tail_lens: list[int],
    hkv: int,
    group: int,
    d: int,
    sparse_densify: str = "scan",
    keys_by_query: bool = True,
    wide_block_n: int = 64,
    pack_tokens: bool = False,
    prefetch_entries: bool = False,
    block_n: int = 16,
    pack_sparse_keys: bool = False,
    chunk_by_kind: bool = False,
    unroll_group: bool = False,
    block_span: int = 0,
    pipeline_stages: int = 3,
    tile_starts: bool = False,
    tile_blocks: int = 0,
    sparse_key_stages: int = 0,
    defer_row_sums: bool = False,
    block_stages: int = 0,
    fp8_block_n: int = 0,
    **plan_kw: int,
) -> None:
    hq = hkv * group
    tk = [torch.randn(hkv, t, d, generator=gen).bfloat16() for t in tail_lens]
    tv = [torch.randn(hkv, t, d, generator=gen).bfloat16() for t in tail_lens]
    q = torch.randn(len(layers), hq, d, generator=gen).bfloat16()
    w = MixedDecodeWrapper(block_n=block_n, sparse_densify=sparse_densify, keys_by_query=keys_by_query,
                           wide_block_n=wide_block_n, pack_tokens=pack_tokens, prefetch_entries=prefetch_entries,
                           pack_sparse_keys=pack_sparse_keys, chunk_by_kind=chunk_by_kind, unroll_group=unroll_group,
                           block_span=block_span, pipeline_stages=pipeline_stages,
                           tile_starts=tile_starts, tile_blocks=tile_blocks, sparse_key_stages=sparse_key_stages,
                           defer_row_sums=defer_row_sums, block_stages=block_stages, fp8_block_n=fp8_block_n)
    w.plan(layers, tk, tv, hq, hkv, d, device=DEVICE, **plan_kw)
    out = torch.full((len(layers), hq, d), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    w.run(q.to(DEVICE), out=out)
    ref = torch.stack([oracle(q[b][:, None], layers[b], tk[b], tv[b])[:, 0] for b in range(len(layers))])
    check_close(out, ref)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("k_kind", KINDS)
@pytest.mark.parametrize("v_kind", KINDS)
def test_each_format_alone(k_kind: str, v_kind: str, d: int) -> None:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{k_kind}-{v_kind}-{d}".encode()))
    w = {"dense": 0, "sparse": 13, "mask": 24, "lowrank": 7, "fp8": 0}
    fmt = BlockFormat(21, SideFormat(k_kind, w[k_kind]), SideFormat(v_kind, w[v_kind]))
    layers = [random_layer(gen, 2, 24, 1, d, fmt=fmt), random_layer(gen, 1, 24, 1, d, fmt=fmt)]
    run_decode(gen, layers, [3, 1], hkv=1, group=2, d=d)


@pytest.mark.parametrize(("wide_block_n", "prefetch"), [(16, False), (64, False), (64, True)])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_mixed_gqa_ragged(group: int, d: int, wide_block_n: int, prefetch: bool) -> None:
    """Random formats per block; ragged segments and tails; a request with no segments,
    one with an empty tail; small chunks and few programs so split-K, the merge and the
    persistent loop all run; tiles without a sparse side as long as the sparse ones, or
    longer than any block and tail chunk; table entries loaded one block ahead or not."""
    gen = torch.Generator().manual_seed(17 * group + d)
    hkv = 2
    layers = [random_layer(gen, s, 16, hkv, d) for s in (3, 0, 2, 1)]
    run_decode(gen, layers, [5, 9, 0, 40], hkv=hkv, group=group, d=d, chunk_tokens=20, max_programs=3,
               wide_block_n=wide_block_n, prefetch_entries=prefetch)


@pytest.mark.parametrize(("group", "d", "keys_by_query"), [(1, 64, True), (3, 64, False), (4, 128, True), (8, 128, True)])
def test_packed_tiles(group: int, d: int, keys_by_query: bool) -> None:
    """Dense blocks keeping every token count from 0 to 16, packed back to back into 16-
    and 32-token tiles: blocks that share a tile, blocks split across tiles, runs of empty
    blocks, runs cut anywhere (split-K), beside requests of every format (whose other
    launches keep a block per tile, their entries loaded one block ahead or not)."""
    gen = torch.Generator().manual_seed(group * 10 + d)
    hkv = 2
    layers = [random_layer(gen, s, 16, hkv, d, kinds=("dense",)) for s in (7, 0, 5, 11)]
    layers.append(random_layer(gen, 3, 16, hkv, d))
    tokens = {blk.fmt.tokens for layer in layers for seg in layer.blocks for blk in seg}
    assert 0 in tokens and len(tokens) >= 8, tokens
    run_decode(gen, layers, [3, 4, 0, 9, 2], hkv=hkv, group=group, d=d, pack_tokens=True, chunk_tokens=40,
               max_programs=3, keys_by_query=keys_by_query)
    run_decode(gen, layers, [3, 4, 0, 9, 2], hkv=hkv, group=group, d=d, pack_tokens=True, wide_block_n=32,
               prefetch_entries=True)
    run_decode(gen, layers, [3, 4, 0, 9, 2], hkv=hkv, group=group, d=d, pack_tokens=True, chunk_tokens=24,
               max_programs=2)
    # Tile starts read from the plan (items of several tiles, tiles starting inside a
    # block), the tile loop pipelined or not, tiles reading every block they may hold or
    # capped at fewer (ending at their last lane, fuller or not).
    for stages, chunk, lanes in ((1, 40, 0), (3, 100, 0), (3, 100, 4), (1, 24, 2)):
        run_decode(gen, layers, [3, 4, 0, 9, 2], hkv=hkv, group=group, d=d, pack_tokens=True, chunk_tokens=chunk,
                   wide_block_n=16, max_programs=3, tile_starts=True, pipeline_stages=stages,
                   keys_by_query=keys_by_query, tile_blocks=lanes)


@pytest.mark.parametrize(("group", "d"), [(1, 64), (4, 128), (3, 64)])
def test_packed_tiles_of_fp8_sides(group: int, d: int) -> None:
    """Blocks whose keys and values are dense or fp8, in all four pairs, keeping every token
    count from 0 to 16, packed into shared tiles: e4m3 rows read from the index arena
    beside bf16 rows, tile starts planned or found, runs cut anywhere, few programs."""
    gen = torch.Generator().manual_seed(500 + group * 10 + d)
    hkv = 2
    layers = [random_layer(gen, s, 16, hkv, d, kinds=("dense", "fp8")) for s in (7, 0, 5, 11)]
    pairs = {(blk.fmt.k.kind, blk.fmt.v.kind) for layer in layers for seg in layer.blocks for blk in seg}
    assert len(pairs) == 4, pairs
    # The last two: tiles with an fp8 side twice the dense ones' length (fp8_block_n), their
    # blocks capped at 4 lanes or not, so dense and fp8 launches of one plan differ in length.
    for starts, stages, chunk, fp8_n, lanes in ((False, 1, 40, 0, 0), (True, 3, 100, 0, 0), (True, 1, 24, 0, 0),
                                                 (True, 3, 100, 32, 4), (True, 1, 24, 32, 0)):
        run_decode(gen, layers, [3, 4, 0, 9], hkv=hkv, group=group, d=d, pack_tokens=True, chunk_tokens=chunk,
                   wide_block_n=16, max_programs=3, tile_starts=starts, pipeline_stages=stages, fp8_block_n=fp8_n,
                   tile_blocks=lanes)


def fp8_value_layer(gen: torch.Generator, d: int, hkv: int, kept: list[int]) -> CompressedLayer:
    """Segments of 16 tokens whose blocks keep ``kept`` tokens in turn, fp8 values beside
    dense and fp8 keys."""
    layer = CompressedLayer()
    for s in range(len(kept) // hkv):
        seg = []
        for h in range(hkv):
            n = kept[s * hkv + h]
            fmt = BlockFormat(n, SideFormat(("dense", "fp8")[(s + h) % 2], 0), SideFormat("fp8", 0))
            seg.append(random_layer(gen, 1, 16, 1, d, fmt=fmt).blocks[0][0])
        layer.append(seg)
    return layer


@pytest.mark.parametrize(("group", "d"), [(4, 128), (3, 64)])
def test_packed_fp8_values_in_whole_groups(group: int, d: int) -> None:
    """fp8 values keeping whole groups of :data:`FP8_GROUP` tokens (0 to 16, so every packed
    tile's rows start at multiples of the group): the arena is aligned, and packed tiles read
    them through whole-group offsets, the form a GPU loads a thread's tokens of a channel in one word;
    tiles as long as dense ones or twice, capped at four blocks or two or not; and a block a
    tile, as segments longer than the packed tiles are read."""
    gen = torch.Generator().manual_seed(900 + d)
    hkv = 2
    layers = [fp8_value_layer(gen, d, hkv, [FP8_GROUP * int(x) for x in torch.randint(0, 16 // FP8_GROUP + 1, (12,), generator=gen)])
              for _ in range(3)]
    arena, _, _ = pack_requests(layers, hkv, d)
    assert arena.widths_aligned
    for fp8_n, lanes, chunk in ((0, 0, 40), (32, 4, 100), (0, 2, 24)):
        run_decode(gen, layers, [3, 0, 5], hkv=hkv, group=group, d=d, pack_tokens=True, wide_block_n=16,
                   chunk_tokens=chunk, max_programs=3, tile_starts=True, tile_blocks=lanes, fp8_block_n=fp8_n)
    run_decode(gen, layers, [3, 0, 5], hkv=hkv, group=group, d=d, block_n=16, wide_block_n=16, chunk_tokens=40)


def test_fp8_values_past_whole_groups_unalign_the_arena() -> None:
    """A block whose fp8 values keep tokens past their last whole group of four (stored as
    rows there) makes the arena unaligned, so the kernels read them by the general offsets,
    packed and a block a tile; fp8 keys of any count leave it aligned (keys are rows)."""
    gen = torch.Generator().manual_seed(7)
    d, hkv = 64, 1
    ragged = fp8_value_layer(gen, d, hkv, [8, 5, 12, 3])
    assert not pack_requests([ragged], hkv, d)[0].widths_aligned
    keys = CompressedLayer()
    for n in (5, 7):
        fmt = BlockFormat(n, SideFormat("fp8", 0), SideFormat("dense", 0))
        keys.append([random_layer(gen, 1, 16, 1, d, fmt=fmt).blocks[0][0]])
    assert pack_requests([keys], hkv, d)[0].widths_aligned
    for pack in (True, False):
        run_decode(gen, [ragged, keys], [2, 3], hkv=hkv, group=2, d=d, pack_tokens=pack, wide_block_n=16,
                   tile_starts=pack)


def test_fp8_values_are_grouped_by_tokens_in_the_arena() -> None:
    """The arena holds an fp8 value side's whole groups of :data:`FP8_GROUP` tokens channel
    by channel and the tokens past them as rows, exactly its bytes; read back, the block is
    the same."""
    from mosaickv.kernels.layout import group_fp8_values, ungroup_fp8_values

    g, m, d = FP8_GROUP, 2 * FP8_GROUP - 1, 3
    rows = torch.arange(m * d, dtype=torch.uint8).reshape(m, d)
    flat = group_fp8_values(rows)
    assert flat.tolist() == [rows[i, c].item() for c in range(d) for i in range(g)] + rows[g:].flatten().tolist()
    for m in (0, 1, g, g + 2, 2 * g - 1):
        part = rows[:m].contiguous()
        assert torch.equal(ungroup_fp8_values(group_fp8_values(part), m, d), part)
    gen = torch.Generator().manual_seed(3)
    layer = fp8_value_layer(gen, 64, 1, [g + 2])
    arena, _, _ = pack_requests([layer], 1, 64)
    block = layer.blocks[0][0]
    back = arena.block(0)
    assert torch.equal(back.v.values.view(torch.uint8), block.v.values.view(torch.uint8))
    assert torch.equal(back.k.values, block.k.values)


def test_fp8_tiles_take_their_own_length() -> None:
    """``fp8_block_n`` sets the length of packed tiles of whole rows with an fp8 side only:
    dense pairs keep ``wide_block_n``, sparse keys beside fp8 values ``block_n``, unpacked
    fp8 launches ``wide_block_n``; the plan's tile shape follows."""
    w = MixedDecodeWrapper(block_n=16, wide_block_n=32, pack_tokens=True, pack_sparse_keys=True, tile_starts=True,
                           fp8_block_n=64)
    assert [w.tile_n(k, v) for k, v in ((FP8, FP8), (DENSE, FP8), (FP8, DENSE))] == [64, 64, 64]
    assert (w.tile_n(DENSE, DENSE), w.tile_n(SPARSE, FP8), w.tile_n(SPARSE, DENSE)) == (32, 16, 16)
    assert MixedDecodeWrapper(wide_block_n=32, fp8_block_n=64).tile_n(FP8, FP8) == 32
    widths = w.tile_shape().widths
    assert widths[NUM_KINDS * FP8 + FP8] == 64 and widths[NUM_KINDS * DENSE + DENSE] == 32
    for bad in (48, 8, 256, -64):
        with pytest.raises(ValueError, match=f"fp8_block_n={bad} must be 0 .wide_block_n. or a power of two from 16 to 128"):
            MixedDecodeWrapper(fp8_block_n=bad)


@pytest.mark.parametrize("lanes", [0, 4])
def test_packed_tiles_over_more_blocks_than_lanes(lanes: int) -> None:
    """Tokens of one 16-token tile spread over more blocks than it has lanes (one-token
    blocks with empty ones between): with tile starts, each tile ends at its last lane and
    the next starts there, so no token is left out. Until empty blocks were left out of
    runs (and tiles capped at their lanes), such a tile dropped the tokens past lane 16."""
    gen = torch.Generator().manual_seed(40 + lanes)
    d = 64
    dense = (SideFormat("dense", 0), SideFormat("dense", 0))
    layer = CompressedLayer()
    for kept in [1] + [0] * 20 + [1] * 3 + [0] * 20 + [1] * 18 + [5, 9]:
        layer.append(random_layer(gen, 1, 16, 1, d, fmt=BlockFormat(kept, *dense)).blocks[0])
    run_decode(gen, [layer], [2], hkv=1, group=2, d=d, pack_tokens=True, wide_block_n=16, chunk_tokens=1000,
               tile_starts=True, tile_blocks=lanes)


@pytest.mark.parametrize(("group", "d"), [(1, 64), (3, 64), (4, 128), (8, 128)])
def test_spanned_tiles(group: int, d: int) -> None:
    """Dense blocks keeping every token count from 0 to 16 of 16-token segments, one,
    two and four whole blocks a tile (a block's dropped tokens' lanes masked), the last
    tile of a run part empty, runs cut anywhere, pipelined 1 and 3 deep, beside requests
    of every format (whose other launches keep their own tiles)."""
    gen = torch.Generator().manual_seed(group * 7 + d)
    hkv = 2
    layers = [random_layer(gen, s, 16, hkv, d, kinds=("dense",)) for s in (7, 0, 5, 11)]
    layers.append(random_layer(gen, 3, 16, hkv, d))
    tokens = {blk.fmt.tokens for layer in layers for seg in layer.blocks for blk in seg}
    assert 0 in tokens and 16 in tokens and len(tokens) >= 8, tokens
    for wide_block_n, stages, chunk in ((16, 3, 40), (32, 1, None), (64, 3, 24)):
        run_decode(gen, layers, [3, 4, 0, 9, 2], hkv=hkv, group=group, d=d, block_span=16, wide_block_n=wide_block_n,
                   pipeline_stages=stages, chunk_tokens=chunk, max_programs=3, pack_tokens=True, pack_sparse_keys=True)


@pytest.mark.parametrize(("group", "d"), [(1, 128), (3, 64), (4, 64), (8, 128)])
def test_row_sums_deferred_to_the_items_end(group: int, d: int) -> None:
    """defer_row_sums: every launch of dense keys (tails, spanned and packed tiles, packed
    sparse keys) sums probabilities per lane and reduces them once an item; with ragged
    tails, an empty tail, a request without segments, blocks keeping no token, split-K
    runs and every other format beside them: the reference's answer."""
    gen = torch.Generator().manual_seed(2700 + 10 * group + d)
    hkv = 2
    layers = [random_layer(gen, s, 16, hkv, d, kinds=("dense", "sparse")) for s in (6, 0, 4)]
    layers.append(random_layer(gen, 3, 16, hkv, d))
    common = dict(hkv=hkv, group=group, d=d, max_programs=3, defer_row_sums=True, chunk_tokens=24)
    run_decode(gen, layers, [5, 9, 0, 3], pack_tokens=True, pack_sparse_keys=True, unroll_group=True, block_n=16,
               wide_block_n=16, tile_starts=True, tile_blocks=2, sparse_key_stages=2, **common)
    dense = [random_layer(gen, s, 16, hkv, d, kinds=("dense",)) for s in (5, 2)]
    run_decode(gen, dense, [4, 0], block_span=16, wide_block_n=32, pack_tokens=True, **common)


@pytest.mark.parametrize(("group", "d"), [(1, 64), (3, 128), (4, 128), (8, 64)])
def test_pipelined_block_loops_read_each_block_as_one_tile(group: int, d: int) -> None:
    """block_stages: launches of a block a tile (masks, low rank, sparse values) read each
    block of at most a tile's tokens as one tile through a pipelined block loop; with
    every format, blocks keeping no token, ragged and empty tails, split-K runs and few
    programs: the reference's answer, packed launches beside them or not."""
    gen = torch.Generator().manual_seed(2800 + 10 * group + d)
    hkv = 2
    layers = [random_layer(gen, s, 16, hkv, d) for s in (5, 0, 3, 4)]
    common = dict(hkv=hkv, group=group, d=d, max_programs=3, block_stages=2, block_n=16, wide_block_n=16,
                  chunk_tokens=40)
    run_decode(gen, layers, [4, 7, 0, 2], **common)
    run_decode(gen, layers, [4, 7, 0, 2], pack_tokens=True, pack_sparse_keys=True, unroll_group=True,
               defer_row_sums=True, **common)


def test_pipelined_block_loops_refuse_blocks_longer_than_a_tile() -> None:
    gen = torch.Generator().manual_seed(2900)
    fmt = BlockFormat(24, SideFormat("lowrank", 7), SideFormat("mask", 24))
    layer = random_layer(gen, 2, 24, 1, 64, fmt=fmt)
    w = MixedDecodeWrapper(block_n=16, wide_block_n=16, block_stages=2)
    assert w.block_loop_stages(3, 2) == 2 and w.block_loop_stages(-1, -1) == 0
    tk = [torch.zeros(1, 1, 64).bfloat16()]
    with pytest.raises(ValueError, match="block_stages=2 reads a block as one tile of 16 tokens, but a block of key "
                                         "kind 3 and value kind 2 keeps 24"):
        w.plan([layer], tk, tk, 2, 1, 64, device=DEVICE)
    with pytest.raises(ValueError, match="block_stages=-1 must be 0 .* or more"):
        MixedDecodeWrapper(block_stages=-1)


def test_max_registers_bound_packed_launches_only() -> None:
    packed = MixedAttention(max_registers=128, pack_tokens=True)
    assert packed.compile_options(DENSE, DENSE) == {"maxnreg": 128}
    assert packed.compile_options(3, 3) == {} and packed.compile_options(-1, -1) == {}
    assert MixedAttention(pack_tokens=True).compile_options(DENSE, DENSE) == {}
    with pytest.raises(ValueError, match="max_registers=300 must be 0 .* or from 24 to 255"):
        MixedAttention(max_registers=300)


def test_spanned_launches_are_dense_pairs_of_blocks_within_the_span() -> None:
    """block_span replaces packing for dense pairs only, and a plan whose dense blocks
    keep more tokens than the span is refused (their tail tokens would go unread)."""
    w = MixedDecodeWrapper(pack_tokens=True, pack_sparse_keys=True, block_span=16, wide_block_n=32)
    pairs = [(k, v) for k in range(4) for v in range(4)]
    assert [pair for pair in pairs if w.span(*pair)] == [(0, 0)]
    assert [pair for pair in pairs if w.packs(*pair)] == [(1, 0)]
    gen = torch.Generator().manual_seed(5)
    layers = [random_layer(gen, 2, 24, 1, 64, fmt=BlockFormat(20))]
    tails = [torch.zeros(1, 1, 64).bfloat16()]
    with pytest.raises(ValueError, match="block_span=16 but a dense block keeps 20 tokens"):
        w.plan(layers, tails, tails, 2, 1, 64)
    for bad in ({"block_span": 12}, {"block_span": 64, "wide_block_n": 32}):
        with pytest.raises(ValueError, match="must be a power of two dividing wide_block_n"):
            MixedDecodeWrapper(**bad)
    with pytest.raises(ValueError, match="pipeline_stages=0 must be at least 1"):
        MixedDecodeWrapper(pipeline_stages=0)
    with pytest.raises(ValueError, match="dense_num_warps=3 must be 0 .num_warps. or a power of two up to 8"):
        MixedDecodeWrapper(dense_num_warps=3)
    for bad in ({"tile_blocks": 6, "tile_starts": True}, {"tile_blocks": 8}):
        with pytest.raises(ValueError, match=f"tile_blocks={bad['tile_blocks']} must be 0 or a power of two, and needs "
                                             "tile_starts=True"):
            MixedDecodeWrapper(pack_tokens=True, **bad)


def test_launches_of_dense_pairs_take_their_own_warps() -> None:
    """dense_num_warps sets the warps of dense-key, dense-value launches only (the tails'
    and every other pair's keep num_warps); 0 leaves them at num_warps."""
    from mosaickv.kernels.layout import DENSE, LOWRANK, SPARSE, TAIL

    one = MixedDecodeWrapper(num_warps=4, dense_num_warps=1)
    assert one.warps(DENSE, DENSE) == 1
    assert one.warps(SPARSE, DENSE) == one.warps(LOWRANK, LOWRANK) == one.warps(TAIL, TAIL) == 4
    assert MixedDecodeWrapper(num_warps=8).warps(DENSE, DENSE) == 8


@pytest.mark.parametrize("lanes", [0, 1, 2, 4])
def test_run_tile_starts_match_a_walk_over_the_blocks(lanes: int) -> None:
    """Each packed tile starts in the first block keeping a token past the tokens of the
    tiles before (empty blocks skipped), counted from its run's first block, that many of
    its tokens already taken, and ends after its width in tokens or its lanes in block
    positions (empty ones too), whichever comes first; runs not packed get no tiles, a run
    keeping nothing none either, and each run's tiles follow the run before's."""
    rng = np.random.default_rng(3 + lanes)
    kept = rng.choice([0, 0, 3, 8, 16, 32], size=60)
    kept[30:45] = rng.choice([0, 1], size=15)  # many short and empty blocks to a tile
    lo, hi = np.array([0, 10, 25, 25, 50]), np.array([10, 25, 50, 50, 60])
    kept[50:60] = 0
    widths = np.array([16, 32, 16, 0, 16])
    tile_lo, tile_hi, tiles = run_tile_starts(kept, lo, hi, widths, lanes)
    expected, counts = [], []
    for a, b, width in zip(lo, hi, widths):
        owner = [j for j in range(a, b) for _ in range(kept[j])] if width else []  # each kept token's block
        token, n = 0, 0
        while token < len(owner):
            j = owner[token]
            expected.append((j - a, token - sum(kept[a:j])))
            cap = lanes or width
            token = min(token + width, sum(kept[a:min(j + cap, b)]))
            n += 1
        counts.append(n)
    assert tile_hi.tolist() == np.cumsum(counts).tolist() and tile_lo.tolist() == (np.cumsum(counts) - counts).tolist()
    assert tiles.tolist() == [block << 16 | taken for block, taken in expected]
    # What a decode graph's buffer is sized by (GraphCapacity.tiles): a run of n blocks of
    # at most 32 kept tokens takes at most n * ceil(32 / width) tiles.
    assert all(n <= (b - a) * -(-32 // w) for n, a, b, w in zip(counts, lo, hi, widths) if w)
    longest = (1 << 15) + 1  # a tile starting in block 32,768 of its run does not fit 15 bits
    with pytest.raises(ValueError, match=f"a run of {longest} blocks"):
        run_tile_starts(np.ones(longest, dtype=np.int64), np.array([0]), np.array([longest]), np.array([1]))


def test_a_batchs_runs_keep_each_requests_tile_starts() -> None:
    """batch_runs places requests' runs back to back: each run's tiles are the rows its
    request's runs had, moved by the tiles of the requests before; a request's runs cut
    without tile starts beside one cut with them is refused."""
    gen = torch.Generator().manual_seed(4)
    widths = np.zeros(KIND_PAIRS, dtype=np.int64)
    widths[0] = 16
    parts = []
    for segments in (5, 0, 7):
        arena, indptr, indices = pack_requests([random_layer(gen, segments, 16, 2, 64, kinds=("dense", "sparse"))],
                                               2, 64)
        parts.append(block_runs(arena.table, indptr, indices, 40, tile_shape=TileShape(widths)))
    batch = batch_runs(parts, 2, tile_starts=True)
    sizes = np.array([p.block_indices.numel() for p in parts])
    offsets, tile_offsets = np.cumsum(sizes) - sizes, np.cumsum([len(p.tiles) for p in parts]) - [len(p.tiles) for p in parts]
    assert len(batch.lo) == sum(len(p.lo) for p in parts) and int(batch.tile_hi.max()) == len(batch.tiles) > 0
    for lo, t_lo, t_hi in zip(batch.lo, batch.tile_lo, batch.tile_hi):
        b = int(np.searchsorted(offsets, lo, side="right")) - 1
        i = int(np.flatnonzero(parts[b].lo == lo - offsets[b])[0])
        assert (t_lo - tile_offsets[b], t_hi - tile_offsets[b]) == (parts[b].tile_lo[i], parts[b].tile_hi[i])
        assert batch.tiles[t_lo:t_hi].tolist() == parts[b].tiles[parts[b].tile_lo[i] : parts[b].tile_hi[i]].tolist()
    plain = block_runs(arena.table, indptr, indices, 40)
    assert plain.tiles is None and not plain.tile_hi.any()
    with pytest.raises(ValueError, match=r"batch_runs\(tile_starts=True\) got runs cut without tile starts"):
        batch_runs([parts[0], plain], 2, tile_starts=True)
    with pytest.raises(ValueError, match=r"batch_runs\(tile_starts=False\) got runs cut with tile starts"):
        batch_runs(parts, 2)
    assert len(batch_runs([], 2, tile_starts=True).tiles) == 0  # an empty batch (a graph's capture) has them too


def test_tile_starts_need_a_plan_that_has_them() -> None:
    """A plan made without tile starts (by a tuning without them) is refused by a tuning that
    reads them, not run with tiles starting nowhere."""
    gen = torch.Generator().manual_seed(9)
    arena, indptr, indices = pack_requests([random_layer(gen, 2, 16, 1, 64, kinds=("dense",))], 1, 64)
    tail = torch.randn(2, 1, 64, generator=gen).bfloat16()
    plain = MixedDecodeWrapper(pack_tokens=True)
    plain.plan_arena(arena, indptr, indices, tail, tail, np.array([0, 2]), np.array([1]), 2, 1)
    q = torch.zeros(1, 2, 64).bfloat16()
    with pytest.raises(ValueError, match="tile_starts=True reads packed tiles' starts from the plan"):
        run_plan(plain.plan_info, arena.values, arena.index, arena.table, arena.widths_aligned, tail, tail, None, q,
                 torch.empty_like(q), 0.125, 2, MixedAttention(pack_tokens=True, tile_starts=True))


def test_packed_tiles_aligned_widths() -> None:
    """Packed tiles on the vectorised-load specialisation (widths multiples of 8, as the
    presets' are): dense blocks of every kept count 0..16 beside sparse ones."""
    gen = torch.Generator().manual_seed(21)
    fmts = [BlockFormat(t) for t in range(17)]
    fmts += [BlockFormat(t, SideFormat("sparse", 16), SideFormat("sparse", 8)) for t in (5, 16)]
    layers = [CompressedLayer(), CompressedLayer()]
    for i, f in enumerate(fmts):
        layers[i % 2].append(random_layer(gen, 1, 16, 2, 64, fmt=f).blocks[0])
    arena, _, _ = pack_requests(layers, 2, 64)
    assert arena.widths_aligned
    run_decode(gen, layers, [2, 3], hkv=2, group=4, d=64, pack_tokens=True, max_programs=2)


def test_packing_is_for_pairs_of_whole_rows() -> None:
    """Dense and fp8 sides (every channel of every kept row) pack; sparse keys beside them
    with ``pack_sparse_keys``; nothing else."""
    kinds = range(len(SIDE_KINDS))
    whole = {(k, v) for k in (DENSE, FP8) for v in (DENSE, FP8)}
    w = MixedDecodeWrapper(pack_tokens=True)
    assert w.packs(0, 0) and not MixedDecodeWrapper().packs(0, 0)
    assert {(k, v) for k in kinds for v in kinds if w.packs(k, v)} == whole
    sparse = MixedDecodeWrapper(pack_tokens=True, pack_sparse_keys=True)
    assert {(k, v) for k in kinds for v in kinds if sparse.packs(k, v)} == whole | {(SPARSE, DENSE), (SPARSE, FP8)}


def test_entries_are_prefetched_in_launches_of_a_block_per_tile_only() -> None:
    """prefetch_entries loads the next block's entry in launches of a block per tile;
    packed and spanned launches' tiles span several blocks and load their entries whole."""
    pairs = [(k, v) for k in range(4) for v in range(4)]
    entries = MixedDecodeWrapper(pack_tokens=True, pack_sparse_keys=True, prefetch_entries=True)
    assert [pair for pair in pairs if entries.prefetches(*pair)] == [pair for pair in pairs if pair not in ((0, 0), (1, 0))]
    spanned = MixedDecodeWrapper(prefetch_entries=True, block_span=16, wide_block_n=32)
    assert [pair for pair in pairs if spanned.prefetches(*pair)] == pairs[1:]


def test_packing_sparse_keys_needs_packed_tiles_read_by_query() -> None:
    for kw in ({"pack_tokens": False}, {"pack_tokens": True, "keys_by_query": False}):
        with pytest.raises(ValueError, match="pack_sparse_keys=True .* needs pack_tokens=True and keys_by_query=True"):
            MixedDecodeWrapper(pack_sparse_keys=True, **kw)


@pytest.mark.parametrize(("group", "d", "aligned"), [(1, 64, False), (3, 64, True), (4, 128, False), (8, 128, True)])
def test_packed_sparse_key_tiles(group: int, d: int, aligned: bool) -> None:
    """Blocks of sparse keys (several widths, in one launch) and dense or fp8 values keeping
    every token count from 0 to 16 share 16- and 32-token tiles, beside dense pairs and
    blocks of every other format; runs cut anywhere (split-K), few programs. ``aligned``:
    widths and counts the vectorised-load specialisation takes (multiples of 8; fp8 values
    in whole groups of :data:`FP8_GROUP` tokens, else some past them)."""
    gen = torch.Generator().manual_seed(group * 100 + d)
    hkv = 2
    widths = (8, 16, 24) if aligned else (3, 8, 13, 20)
    fp8_values = (lambda t: t % FP8_GROUP == 0) if aligned else (lambda t: t % 5 == 2)
    fmts = [BlockFormat(t, SideFormat("sparse", widths[t % len(widths)]), SideFormat("fp8" if fp8_values(t) else "dense"))
            for t in range(17)] + [BlockFormat(t) for t in (0, 5, 16)]
    layers = [CompressedLayer() for _ in range(4)]
    for i, f in enumerate(fmts * 2):
        layers[i % 3].append(random_layer(gen, 1, 16, hkv, d, fmt=f).blocks[0])
    # Every format (one block per tile) where widths may be anything; aligned, dense ones.
    layers[3] = random_layer(gen, 3, 16, hkv, d, **({"kinds": ("dense",)} if aligned else {}))
    arena, _, _ = pack_requests(layers, hkv, d)
    assert arena.widths_aligned == aligned
    for block_n, chunk, starts in ((16, 40, False), (32, None, False), (16, 100, True), (32, 40, True)):
        run_decode(gen, layers, [3, 0, 9, 2], hkv=hkv, group=group, d=d, pack_tokens=True, pack_sparse_keys=True,
                   block_n=block_n, wide_block_n=block_n, max_programs=3, tile_starts=starts,
                   **({"chunk_tokens": chunk} if chunk else {}))


@pytest.mark.parametrize(("group", "d", "pack"), [(1, 64, False), (4, 128, True), (3, 64, True)])
def test_runs_cut_per_format_pair(group: int, d: int, pack: bool) -> None:
    """chunk_by_kind: each format pair's blocks cut by its own share of the work (more,
    shorter items for a pair with few tokens; long enough requests that pairs split),
    random dense and sparse formats, ragged segments and tails, a request without
    segments, an empty tail, few programs: the same answer."""
    gen = torch.Generator().manual_seed(1000 + 10 * group + d + pack)
    hkv = 2
    layers = [random_layer(gen, s, 16, hkv, d, kinds=("dense", "sparse")) for s in (40, 0, 30, 5)]
    run_decode(gen, layers, [5, 9, 0, 33], hkv=hkv, group=group, d=d, max_programs=3, chunk_by_kind=True,
               pack_tokens=pack, pack_sparse_keys=pack, block_n=16, wide_block_n=16)


@pytest.mark.parametrize(("group", "d"), [(1, 64), (3, 128), (4, 64), (8, 128)])
def test_sparse_keys_gathered_for_a_whole_group_at_once(group: int, d: int) -> None:
    """unroll_group: in packed tiles the GQA group's query rows gather their channels in
    one unrolled step, beside every other format (one block a tile), ragged tails, a
    request without segments, few programs: the same answer."""
    gen = torch.Generator().manual_seed(2000 + 10 * group + d)
    hkv = 2
    layers = [random_layer(gen, s, 16, hkv, d, kinds=("dense", "sparse")) for s in (6, 0, 4)]
    layers.append(random_layer(gen, 3, 16, hkv, d))
    run_decode(gen, layers, [5, 9, 0, 3], hkv=hkv, group=group, d=d, max_programs=3, unroll_group=True,
               pack_tokens=True, pack_sparse_keys=True, block_n=16, wide_block_n=16)


@pytest.mark.parametrize(("group", "d"), [(1, 64), (3, 128), (4, 64), (8, 128)])
def test_pipelined_sparse_key_tiles_for_one_query_token(group: int, d: int) -> None:
    """sparse_key_stages: a decode plan's packed sparse-key launch is compiled without the
    loop over rows past the GQA group (so its tile loop pipelines) and reads its tiles
    at its own stages; beside every other format, ragged tails, an empty tail, a request
    without segments, widths of every kind, capped tiles, few programs: the same answer."""
    gen = torch.Generator().manual_seed(2500 + 10 * group + d)
    hkv = 2
    layers = [random_layer(gen, s, 16, hkv, d, kinds=("dense", "sparse")) for s in (6, 0, 4)]
    layers.append(random_layer(gen, 3, 16, hkv, d))
    tuning = MixedDecodeWrapper(pack_tokens=True, pack_sparse_keys=True, unroll_group=True, tile_starts=True,
                                sparse_key_stages=2)
    assert not tuning.rows_past_unroll(SPARSE, DENSE, rows=group, group=group)
    assert tuning.stages(SPARSE, DENSE) == 2 and tuning.stages(DENSE, DENSE) == tuning.pipeline_stages
    for lanes in (0, 2):
        run_decode(gen, layers, [5, 9, 0, 3], hkv=hkv, group=group, d=d, max_programs=3, unroll_group=True,
                   pack_tokens=True, pack_sparse_keys=True, block_n=16, wide_block_n=16, tile_starts=True,
                   tile_blocks=lanes, sparse_key_stages=2)


@pytest.mark.parametrize("group", [1, 4])
def test_pipelined_sparse_keys_still_read_every_row_of_several_query_tokens(group: int) -> None:
    """With sparse_key_stages, a plan whose requests have several query tokens keeps the
    loop over rows past the GQA group: every query row's logits, against the reference."""
    gen = torch.Generator().manual_seed(2600 + group)
    hkv, d, qo_lens, tail_lens = 2, 64, [2, 1, 3], [4, 2, 5]
    hq = hkv * group
    layers = [random_layer(gen, s, 16, hkv, d, kinds=("dense", "sparse")) for s in (5, 3, 4)]
    tk = [torch.randn(hkv, t, d, generator=gen).bfloat16() for t in tail_lens]
    tv = [torch.randn(hkv, t, d, generator=gen).bfloat16() for t in tail_lens]
    qs = [torch.randn(nq, hq, d, generator=gen).bfloat16() for nq in qo_lens]
    w = MixedAttention(block_n=16, wide_block_n=16, pack_tokens=True, pack_sparse_keys=True, unroll_group=True,
                       tile_starts=True, sparse_key_stages=2)
    w.plan_layers(layers, tk, tv, qo_lens, hq, hkv, d, device=DEVICE, max_programs=3)
    assert w.plan_info.max_q == 3
    assert w.rows_past_unroll(SPARSE, DENSE, rows=min(w.plan_info.block_m, 3 * group), group=group)
    q = torch.cat(qs).to(DEVICE)
    out = torch.full_like(q, float("nan"))
    w.run(q, out=out)
    start = 0
    for b, nq in enumerate(qo_lens):
        ref = attention(qs[b].transpose(0, 1), layers[b], tk[b], tv[b]).transpose(0, 1)
        check_close(out[start : start + nq].float().cpu(), ref)
        start += nq


def test_pipelined_sparse_keys_need_planned_packed_tiles_of_unrolled_groups() -> None:
    with pytest.raises(ValueError, match="sparse_key_stages=3 pipelines packed sparse-key tiles .* needs tile_starts, "
                                         "pack_sparse_keys and unroll_group, got False, True and True"):
        MixedDecodeWrapper(pack_tokens=True, pack_sparse_keys=True, unroll_group=True, sparse_key_stages=3)


@pytest.mark.parametrize(
    ("sparse_densify", "keys_by_query"), [("scan", True), ("scan", False), ("search", False), ("scatter", False)]
)
@pytest.mark.parametrize("group", [1, 3, 8])
def test_sparse_modes(sparse_densify: str, keys_by_query: bool, group: int) -> None:
    """Sparse keys read by query gathers, and sparse tiles densified by the bitmask scan,
    the binary search or the scratch scatter, all match the reference (widths 1, 19 and
    the whole head; tokens ragged)."""
    gen = torch.Generator().manual_seed(11 + group)
    fmts = [BlockFormat(16, SideFormat("sparse", 1), SideFormat("sparse", 64)), BlockFormat(7, SideFormat("sparse", 19)),
            BlockFormat(12, SideFormat("sparse", 64), SideFormat("lowrank", 5))]
    layers = [random_layer(gen, 2, 16, 1, 64, fmt=f) for f in fmts]
    run_decode(gen, layers, [2, 5, 0], hkv=1, group=group, d=64, sparse_densify=sparse_densify,
               keys_by_query=keys_by_query, max_programs=2)


@pytest.mark.parametrize("d", [64, 128])
def test_scan_densify_across_bitmask_words(d: int) -> None:
    """Channels in every 64-channel word, each word's top bit (channel 63 or 127: the sign
    bit of its int64) included, densified by the scan: values keep all but one channel
    per vector, so nearly every row sets every top bit."""
    gen = torch.Generator().manual_seed(d)
    fmt = BlockFormat(16, SideFormat("sparse", d // 2), SideFormat("sparse", d - 1))
    layers = [random_layer(gen, 2, 16, 2, d, fmt=fmt)]
    run_decode(gen, layers, [3], hkv=2, group=4, d=d, keys_by_query=False)


def test_unknown_densify_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="sparse_densify='fast' is not one of scan, search, scatter"):
        MixedDecodeWrapper(sparse_densify="fast")


def test_every_token_dropped() -> None:
    gen = torch.Generator().manual_seed(3)
    fmts = [BlockFormat(0, SideFormat("sparse", 4), SideFormat("lowrank", 3)), BlockFormat(0)]
    layers = [random_layer(gen, 2, 16, 2, 64, fmt=f) for f in fmts]
    run_decode(gen, layers, [4, 1], hkv=2, group=4, d=64, chunk_tokens=8)
    # dropped segments and an empty tail: nothing to attend to, the output is zero
    layers.append(random_layer(gen, 1, 16, 2, 64, fmt=fmts[0]))
    run_decode(gen, layers, [4, 1, 0], hkv=2, group=4, d=64)


def test_no_keys_at_all_gives_zeros() -> None:
    gen = torch.Generator().manual_seed(4)
    run_decode(gen, [CompressedLayer(), random_layer(gen, 1, 16, 1, 64)], [0, 2], hkv=1, group=3, d=64)


def test_aligned_widths_path() -> None:
    """Widths that are multiples of 8 take the vectorised-load specialisation."""
    gen = torch.Generator().manual_seed(5)
    fmts = [BlockFormat(16, SideFormat("sparse", 16), SideFormat("mask", 24)), BlockFormat(9, SideFormat("lowrank", 8))]
    layers = [random_layer(gen, 2, 16, 1, 64, fmt=f) for f in fmts]
    arena, _, _ = pack_requests(layers, 1, 64)
    assert arena.widths_aligned
    run_decode(gen, layers, [2, 3], hkv=1, group=4, d=64)


@pytest.mark.parametrize("align", [1, 16])
def test_arena_bytes_and_round_trip(align: int) -> None:
    gen = torch.Generator().manual_seed(6)
    layers = [random_layer(gen, 3, 16, 2, 64) for _ in range(2)]
    blocks = [seg[h] for layer in layers for h in range(2) for seg in layer.blocks]
    arena, indptr, indices = pack_requests(layers, 2, 64, align=align)
    assert arena.nbytes() == sum(b.nbytes() for b in blocks) - HEADER_BYTES * len(blocks) + arena.pad_bytes
    assert align > 1 or arena.pad_bytes == 0
    used = [s for b in blocks for s in (b.k, b.v) if b.fmt.tokens]
    assert arena.has_sparse == any(s.fmt.kind == "sparse" for s in used)
    assert list(indptr) == [0, 3, 6, 9, 12] and list(indices) == list(range(12))
    for i, blk in enumerate(blocks):
        back = arena.block(i, blk.n)
        assert back.fmt == blk.fmt and back.nbytes() == blk.nbytes()
        for a, b in zip(back.k.tensors() + back.v.tensors(), blk.k.tensors() + blk.v.tensors()):
            assert torch.equal(a, b)


def test_synthetic_arena_is_valid() -> None:
    """The vectorised benchmark generator writes blocks ``formats.py`` would accept."""
    d = 64
    pattern = [
        Recipe(16, ("sparse", 16), ("mask", 32)),
        Recipe(8, ("lowrank", 8), ("dense", 0)),
        Recipe(0, ("sparse", 8), ("dense", 0)),
        Recipe(16, ("mask", 24), ("sparse", 8)),
        Recipe(24, ("fp8", 0), ("fp8", 0)),
        Recipe(8, ("sparse", 16), ("fp8", 0)),
    ]
    arena, indptr, _ = synthetic_arena(3, 5, pattern, d, "cpu")
    payload = 0
    for i in range(arena.num_blocks):
        blk = arena.block(i)
        payload += blk.nbytes() - HEADER_BYTES
        for side in (blk.k, blk.v) if blk.fmt.tokens else ():
            if side.fmt.kind == "sparse":
                idx = side.index.long()
                assert (idx.diff(dim=1) > 0).all() and idx.max() < d
            if side.fmt.kind == "mask":
                assert (side.index.long().diff() > 0).all()
            if side.fmt.kind == "fp8":
                assert torch.isfinite(side.values.float()).all() and side.values.float().abs().max() > 0
    assert {SIDE_KINDS[k] for k in arena.table_host[:, [1, 5]].flatten()} == set(SIDE_KINDS)
    assert arena.nbytes() == payload + arena.pad_bytes
    assert arena.widths_aligned and list(indptr) == [0, 5, 10, 15]


def test_plan_rejects_bad_shapes() -> None:
    gen = torch.Generator().manual_seed(7)
    layer = random_layer(gen, 1, 16, 2, 64)
    w = MixedDecodeWrapper()
    with pytest.raises(ValueError):
        w.plan([layer], [torch.zeros(2, 1, 64)], [torch.zeros(2, 1, 64)], 3, 2, 64)
    w.plan([layer], [torch.zeros(2, 1, 64)], [torch.zeros(2, 1, 64)], 4, 2, 64, device=DEVICE)
    with pytest.raises(ValueError):
        w.run(torch.zeros(2, 4, 64, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_matches_eager() -> None:
    """``run`` launches fixed grids over planned buffers: capture once, replay on new q."""
    gen = torch.Generator().manual_seed(8)
    hkv, group, d = 4, 4, 128
    layers = [random_layer(gen, s, 64, hkv, d) for s in (4, 1, 0, 6)]
    tk = [torch.randn(hkv, t, d, generator=gen).bfloat16() for t in (33, 1, 70, 5)]
    tv = [torch.randn(hkv, t, d, generator=gen).bfloat16() for t in (33, 1, 70, 5)]
    w = MixedDecodeWrapper()
    w.plan(layers, tk, tv, hkv * group, hkv, d, device="cuda", chunk_tokens=64)
    q = torch.randn(4, hkv * group, d, device="cuda").bfloat16()
    out = torch.empty_like(q)
    w.run(q, out=out)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w.run(q, out=out)
    for _ in range(2):
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        graph.replay()
        ref = torch.stack([oracle(q[b][:, None].cpu(), layers[b], tk[b], tv[b])[:, 0] for b in range(4)])
        check_close(out, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_packed_tiles() -> None:
    """The packed-tile path compiled (the CPU cases run it in the interpreter), also on
    the benchmark's aligned arenas against the unpacked kernel, and with fp8 rows (the GPU's
    own e4m3 conversion, which the interpreter stands in for), and fp8 values in whole
    groups, read under the compiler hints the interpreter ignores."""
    test_packed_tiles(4, 128, True)
    test_packed_tiles(3, 64, False)
    test_packed_tiles_of_fp8_sides(4, 128)
    test_packed_fp8_values_in_whole_groups(4, 128)
    test_packed_fp8_values_in_whole_groups(3, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_spanned_tiles() -> None:
    """Spanned tiles compiled, their loop software-pipelined (the CPU cases interpret it)."""
    test_spanned_tiles(4, 128)
    test_spanned_tiles(3, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (9, 3, 64)])
def test_gpu_sized_against_reference(hq: int, hkv: int, d: int) -> None:
    gen = torch.Generator().manual_seed(hq)
    layers = [random_layer(gen, s, 64, hkv, d) for s in (40, 7, 0, 23)]
    run_decode(gen, layers, [100, 1, 64, 0], hkv=hkv, group=hq // hkv, d=d)
