"""Capacity planning and the MosaicKV pool, on SGLang's real pool and allocator classes (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.plugins import load_plugins  # noqa: E402

load_plugins()

from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # noqa: E402

from mosaickv.config import load_policy  # noqa: E402
from mosaickv.formats import HEADER_BYTES, BlockFormat, SideFormat, pack_block, unpack_block  # noqa: E402
from mosaickv.kernels.layout import pack_region  # noqa: E402
from mosaickv.sglang_patch.pool import MosaicKVPool  # noqa: E402
from mosaickv.sglang_patch.sizing import KVShape, plan_capacity  # noqa: E402

LLAMA8B = KVShape(num_layers=32, num_kv_heads=8, head_dim=128, v_head_dim=128)
TINY = KVShape(num_layers=2, num_kv_heads=2, head_dim=32, v_head_dim=32)


def plan_for(shape, budget, policy="mosaic", **kw):
    p = load_policy(policy)
    return plan_capacity(shape, budget, segment_size=p.segment_size, ratio=float(p.ratio), sinks=p.sinks,
                         window=p.window, **kw)


def test_dense_cell_matches_sglang_cell_size():
    # DefaultPoolConfigurator: kv_heads * (head_dim + v_head_dim) * layers * element size
    assert LLAMA8B.dense_bytes_per_token == 8 * 256 * 32 * 2


@pytest.mark.parametrize("budget_gib", [4, 20, 60])
def test_capacity_at_3x_budget_is_at_least_2_5x_dense(budget_gib):
    plan = plan_for(LLAMA8B, budget_gib << 30)
    dense_tokens = (budget_gib << 30) // LLAMA8B.dense_bytes_per_token
    assert plan.max_total_num_tokens >= 2.5 * dense_tokens
    assert plan.used_bytes <= plan.budget_bytes
    assert plan.bytes_per_token < LLAMA8B.dense_bytes_per_token / 2.5


def test_one_prefill_batch_fits_the_dense_rows_on_top_of_the_tails():
    """A prefill chunk is dense until its segments seal: the dense rows hold one on top of
    every running request's tail (whole pages), and the logical capacity counts them."""
    base = plan_for(LLAMA8B, 20 << 30, max_running_requests=16, page_size=32)
    plan = plan_for(LLAMA8B, 20 << 30, max_running_requests=16, page_size=32, prefill_tokens=8010)
    assert plan.dense_tail_tokens == base.dense_tail_tokens + 8032  # 8010 rounded up to pages
    assert plan.max_total_num_tokens == plan.dense_tail_tokens + plan.num_slabs * plan.segment_size
    assert plan.used_bytes <= plan.budget_bytes
    with pytest.raises(ValueError, match="prefill_tokens = -1 is not allowed"):
        plan_for(LLAMA8B, 20 << 30, prefill_tokens=-1)
    with pytest.raises(ValueError, match="--chunked-prefill-size"):
        plan_for(LLAMA8B, 1 << 30, max_running_requests=16, prefill_tokens=200_000)


def test_capacity_grows_with_budget_and_ratio():
    small, big = plan_for(LLAMA8B, 8 << 30), plan_for(LLAMA8B, 16 << 30)
    assert big.max_total_num_tokens > 1.9 * small.max_total_num_tokens
    lossless = plan_capacity(LLAMA8B, 8 << 30, segment_size=32, ratio=1.0, sinks=0, window=32)
    assert lossless.max_total_num_tokens <= (8 << 30) // LLAMA8B.dense_bytes_per_token


def test_user_running_request_cap_sizes_the_tails():
    plan = plan_for(LLAMA8B, 8 << 30, max_running_requests=16)
    assert plan.max_running_requests == 16
    assert plan.dense_tail_tokens == 16 * plan.tail_tokens_per_request
    with pytest.raises(ValueError, match="max-running-requests"):
        plan_for(LLAMA8B, 1 << 20, max_running_requests=64)


def test_page_size_must_divide_segment():
    with pytest.raises(ValueError, match="page_size 3 must divide segment_size 32"):
        plan_for(LLAMA8B, 1 << 30, page_size=3)


def random_blocks(shape, seg, fmt, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[pack_block(torch.randn(seg, shape.head_dim, generator=g), torch.randn(seg, shape.head_dim, generator=g),
                        fmt) for _ in range(shape.num_kv_heads)] for _ in range(shape.num_layers)]


FMT = BlockFormat(32, SideFormat("sparse", 8), SideFormat("sparse", 4))


MIXED = [BlockFormat(32), BlockFormat(0), BlockFormat(27, SideFormat("sparse", 5), SideFormat("lowrank", 3)),
         BlockFormat(13, SideFormat("mask", 7), SideFormat("sparse", 3))]


def test_blocks_round_trip_through_the_slab_layout():
    """Odd widths and token counts (padding), an empty block, every kind: what the
    pool reads back from its slab is what was sealed, tensor for tensor."""
    pool, plan = make_pool(policy="lossless")
    g = torch.Generator().manual_seed(1)
    blocks = [[pack_block(torch.randn(32, 32, generator=g), torch.randn(32, 32, generator=g), MIXED[2 * i + h],
                          token_score=torch.rand(32, generator=g)) for h in range(2)] for i in range(2)]
    slab = pool.seal(list(range(1, 33)), blocks)
    back = pool.read_segment(slab)
    for i in range(2):
        for h in range(2):
            assert back[i][h].fmt == blocks[i][h].fmt
            for a, b in zip(unpack_block(blocks[i][h]), unpack_block(back[i][h])):
                assert torch.equal(a, b)
    assert pool.arena.used_bytes <= plan.slab_bytes
    assert not pool.widths_aligned  # widths 5, 3, 7: the kernels may not vector-load them


@pytest.mark.parametrize("seed", range(5))
def test_any_segment_within_its_budget_fits_its_slab(seed):
    """The slab bound (budget, minus headers, plus the most padding) holds for random
    formats that spend the compressor's whole budget in odd widths."""
    pool, plan = make_pool()
    rng = torch.Generator().manual_seed(seed)
    per_block = plan.segment_budget_bytes // 4
    blocks = []
    for _ in range(2):
        layer = []
        for _ in range(2):
            while True:
                kinds = [("sparse", "mask", "lowrank")[int(torch.randint(3, (1,), generator=rng))] for _ in range(2)]
                widths = [int(torch.randint(1, 12, (1,), generator=rng)) for _ in range(2)]
                tokens = int(torch.randint(1, 33, (1,), generator=rng))
                fmt = BlockFormat(tokens, SideFormat(kinds[0], widths[0]), SideFormat(kinds[1], widths[1]))
                if fmt.nbytes(32) <= per_block:
                    break
            layer.append(pack_block(torch.randn(32, 32, generator=rng), torch.randn(32, 32, generator=rng), fmt,
                                    token_score=torch.rand(32, generator=rng)))
        blocks.append(layer)
    pool.seal(list(range(1, 33)), blocks)
    assert pool.arena.used_bytes <= plan.slab_bytes


def make_pool(budget=1 << 20, policy="mosaic", page_size=1):
    plan = plan_for(TINY, budget, policy, page_size=page_size, max_running_requests=2)
    pool = MosaicKVPool(plan.max_total_num_tokens, page_size=page_size, dtype=torch.bfloat16, head_num=2, head_dim=32,
                        layer_num=2, device="cpu", enable_memory_saver=False, plan=plan, enable_alt_stream=False)
    return pool, plan


def test_pool_is_a_real_mha_pool_with_small_dense_part():
    pool, plan = make_pool()
    assert isinstance(pool, MHATokenToKVPool)
    assert pool.k_buffer[0].shape == (plan.dense_tail_tokens + 1, 2, 32)
    dense = MHATokenToKVPool(plan.max_total_num_tokens, page_size=1, dtype=torch.bfloat16, head_num=2, head_dim=32,
                             layer_num=2, device="cpu", enable_memory_saver=False, enable_alt_stream=False)
    ours = sum(pool.get_kv_size_bytes())
    assert ours <= plan.budget_bytes
    # Same admitted tokens; at this toy head size (d=32) the kernel layout's padding bound,
    # block table rows and page tables cost about 10% (test_capacity_at_3x... checks 8B).
    assert sum(dense.get_kv_size_bytes()) > 2.2 * ours


def test_a_forwards_writes_map_their_slots_once():
    """prepare_writes maps the forward's slots for every layer's write of that tensor (one
    host round trip, not one per layer); a different tensor is still mapped on its own;
    the stored rows equal those of writes without it."""
    (pool, plan), (plain, _) = make_pool(), make_pool()
    alloc = TokenToKVPoolAllocator(plan.max_total_num_tokens, torch.bfloat16, "cpu", pool, need_sort=False)
    slots = alloc.alloc(40)
    k = torch.randn(40, 2, 32, dtype=torch.bfloat16)
    calls = []
    mapped = pool.dense_rows
    pool.dense_rows = lambda loc: calls.append(len(loc)) or mapped(loc)
    pool.prepare_writes(slots)
    for layer in range(2):
        pool._store_kv_layer(layer, slots, k, -k)
        plain._store_kv_layer(layer, slots, k, -k)
    assert calls == [40]
    other = slots[:5].clone()
    pool._store_kv_layer(0, other, k[:5], -k[:5])
    assert calls == [40, 5]
    for layer in range(2):
        assert torch.equal(pool.k_buffer[layer][mapped(slots)], plain.k_buffer[layer][plain.dense_rows(slots)])
    pool.prepare_writes(None)
    pool._store_kv_layer(1, slots, k, -k)
    assert calls == [40, 5, 40]


def test_writes_seal_and_free_through_the_real_allocator():
    pool, plan = make_pool()
    alloc = TokenToKVPoolAllocator(plan.max_total_num_tokens, torch.bfloat16, "cpu", pool, need_sort=False)
    slots = alloc.alloc(40)
    k = torch.randn(40, 2, 32, dtype=torch.bfloat16)
    for layer in range(2):
        pool._store_kv_layer(layer, slots, k, -k)
    rows = pool.dense_rows(slots)
    assert torch.equal(pool.k_buffer[1][rows], k)
    free_before = len(pool._free_dense)
    slab = pool.seal(slots[:32].tolist(), random_blocks(TINY, 32, FMT))
    assert len(pool._free_dense) == free_before + 32
    assert pool.stats()["sealed_segments"] == 1
    # Stored without headers (the block table carries them); these widths need no padding.
    assert pool.arena.used_bytes == 2 * 2 * (FMT.nbytes(32) - HEADER_BYTES) <= plan.slab_bytes
    assert pool.read_segment(slab)[1][0].fmt == FMT
    pool.free_slab(slab)
    alloc.free(slots)  # the plugin's allocator hook returns the dense pages
    assert len(pool._free_dense) == plan.dense_tail_tokens
    assert pool.stats()["arena_bytes_written"] == 0


def _regions(pool, count, seed):
    """``count`` segments' regions, each packed for a slab of ``pool`` (allocated), with
    the MIXED formats (an odd width among them: an unaligned slab) or all FMT."""
    regions = []
    for i in range(count):
        slab = pool.arena.alloc()
        fmts = MIXED if i % 2 else [FMT] * 4
        g = torch.Generator().manual_seed(seed + i)
        blocks = [pack_block(torch.randn(32, 32, generator=g), torch.randn(32, 32, generator=g), fmt) for fmt in fmts]
        regions.append((slab, pack_region(blocks, 32, pool.arena.base(slab))))
    return regions


def test_installing_many_segments_at_once_is_installing_each():
    """A sealing call's segments go in with one scatter of bytes and one of table rows:
    bytes, table rows (host and device), generations, page maps, freed dense rows and the
    unaligned set are what one install at a time leaves."""
    states = []
    for together in (False, True):
        pool, _ = make_pool()
        jobs = _regions(pool, 5, seed=10)
        pages = [list(range(1 + 32 * i, 33 + 32 * i)) for i in range(5)]
        for page_list in pages:
            pool.dense_rows(torch.tensor(page_list))  # the segment's tokens held dense rows
        if together:
            pool.install_many([s for s, _ in jobs], pages, [r for _, r in jobs])
        else:
            for (slab, region), page_list in zip(jobs, pages):
                pool.install(slab, page_list, region)
        states.append((pool.arena.data.clone(), pool.block_table.clone(), pool.block_table_host.copy(),
                       pool.slab_generation.copy(), pool.page_to_slab.clone(), pool.page_to_dense.clone(),
                       sorted(pool._free_dense), set(pool._unaligned_slabs), pool.arena.used_bytes))
    alone, together = states
    assert alone[7] == together[7] and alone[7]  # an odd width: some slab unaligned, the same ones
    for a, b in zip(alone, together):
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else
                np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b)


def test_a_refused_segment_among_many_writes_nothing():
    """Checked before anything is written: one region laid out for another slab refuses
    the whole call, and the arena and tables are as they were."""
    pool, _ = make_pool()
    jobs = _regions(pool, 3, seed=20)
    before = (pool.arena.data.clone(), pool.block_table.clone(), pool.arena.used_bytes)
    slabs = [jobs[0][0], jobs[2][0], jobs[1][0]]  # region 1 is not laid out for slab 2
    with pytest.raises(ValueError, match="packed for arena offset"):
        pool.install_many(slabs, [list(range(1, 33))] * 3, [r for _, r in jobs])
    assert torch.equal(pool.arena.data, before[0]) and torch.equal(pool.block_table, before[1])
    assert pool.arena.used_bytes == before[2]


def test_oversized_segment_is_refused():
    pool, _ = make_pool()
    dense = random_blocks(TINY, 32, BlockFormat(32))
    with pytest.raises(ValueError, match="exceeds the slab size"):
        pool.seal(list(range(1, 33)), dense)


def test_stats_report_bytes_per_token_and_ratio():
    pool, plan = make_pool()
    pool.seal(list(range(1, 33)), random_blocks(TINY, 32, FMT))
    stats = pool.stats()
    assert stats["planned_bytes_per_token"] == pytest.approx(plan.bytes_per_token)
    assert stats["achieved_ratio"] == pytest.approx(4 * 32 * 128 / (4 * (FMT.nbytes(32) - HEADER_BYTES)))


@pytest.mark.parametrize("group", [False, True])
def test_paged_free_segment_returns_dense_pages_and_query_stats(group):
    # The paged allocator's free_segment (what the radix cache calls) bypasses free().
    pool, plan = make_pool(page_size=16)
    alloc = PagedTokenToKVPoolAllocator(plan.max_total_num_tokens, page_size=16, dtype=torch.bfloat16, device="cpu",
                                        kvcache=pool, need_sort=False)
    slots = alloc.alloc(64)
    for layer in range(2):
        pool._store_kv_layer(layer, slots, torch.ones(64, 2, 32, dtype=torch.bfloat16),
                             torch.ones(64, 2, 32, dtype=torch.bfloat16))
        pool.query_stats.observe(layer, torch.ones(64, 4, 32), slots)
    assert len(pool._free_dense) == plan.dense_tail_tokens // 16 - 4 and len(pool.query_stats) == 2
    if group:
        alloc.free_group_begin()
    alloc.free_segment(slots, start_pos=0)
    if group:
        alloc.free_group_end()
    assert len(pool._free_dense) == plan.dense_tail_tokens // 16 and len(pool.query_stats) == 0
    assert alloc.available_size() == plan.max_total_num_tokens


@pytest.mark.parametrize("paged", [False, True])
def test_allocator_clear_gives_back_every_dense_page_slab_and_statistic(paged):
    # Scheduler.flush_cache resets the tree, then calls the allocator's clear(), which frees
    # every slot without free(): the pool must come back to its starting state.
    page = 16 if paged else 1
    pool, plan = make_pool(page_size=page)
    alloc = (PagedTokenToKVPoolAllocator(plan.max_total_num_tokens, page_size=16, dtype=torch.bfloat16, device="cpu",
                                         kvcache=pool, need_sort=False) if paged else
             TokenToKVPoolAllocator(plan.max_total_num_tokens, torch.bfloat16, "cpu", pool, need_sort=False))
    start = pool.stats()
    slots = alloc.alloc(64)
    for layer in range(2):
        pool._store_kv_layer(layer, slots, torch.ones(64, 2, 32, dtype=torch.bfloat16),
                             torch.ones(64, 2, 32, dtype=torch.bfloat16))
        pool.query_stats.observe(layer, torch.ones(64, 4, 32), slots)
    blocks = [[pack_block(torch.ones(32, 32), torch.ones(32, 32), FMT) for _ in range(2)] for _ in range(2)]
    pool.seal(sorted(set((slots[:32] // page).tolist())), blocks)
    assert pool.stats()["sealed_segments"] == 1 and pool.stats()["dense_tail_tokens_in_use"] == 32
    alloc.clear()
    end = pool.stats()
    for key in ("sealed_segments", "dense_tail_tokens_in_use", "free_slabs", "arena_bytes_written"):
        assert end[key] == start[key], key
    assert len(pool.query_stats) == 0 and (pool.page_to_slab == -1).all() and (pool.page_to_dense[1:] == -1).all()
    assert alloc.available_size() == plan.max_total_num_tokens


def test_locate_reads_one_slot_per_page_and_finds_what_every_token_reads():
    """locate_many samples a request's pages (slot % page_size == position % page_size in
    SGLang's paged layout) and finds the runs a token-by-token reading of the page tables
    finds, request by request (an empty one; two that read the same sealed segment back to
    back, the first last, the second first); slots out of that layout are refused by name."""

    from mosaickv.sglang_patch.forward_inputs import locate_many
    from mosaickv.sglang_patch.pool import UNMAPPED

    pool, plan = make_pool(budget=1 << 22, page_size=16)
    alloc = PagedTokenToKVPoolAllocator(plan.max_total_num_tokens, page_size=16, dtype=torch.bfloat16, device="cpu",
                                        kvcache=pool, need_sort=False)
    seg, rng = plan.segment_size, torch.Generator().manual_seed(0)
    fmt = BlockFormat(8, SideFormat("sparse", 8), SideFormat("sparse", 4))
    requests = []
    for length, sealed in ((100, [0, 1]), (64, [1]), (7, []), (96, [0, 1, 2])):
        slots = alloc.alloc(-(-length // 16) * 16)[:length]
        for layer in range(2):
            kv = torch.randn(length, 2, 32, generator=rng).bfloat16()
            pool._store_kv_layer(layer, slots, kv, kv)
        for j in sealed:
            blocks = [[pack_block(torch.randn(seg, 32, generator=rng), torch.randn(seg, 32, generator=rng), fmt,
                                  token_score=torch.rand(seg, generator=rng)) for _ in range(2)] for _ in range(2)]
            pool.seal(sorted({int(s) // 16 for s in slots[j * seg : (j + 1) * seg]}), blocks)
        requests.append(slots)
    whole = requests[3]  # segments 0..2 sealed
    requests += [whole[:0], whole[:32], whole[:64]]  # nothing; segment 0's slab alone; that slab, then another
    page_to_slab = pool.page_to_slab.numpy()
    located = locate_many(pool, requests)
    assert len(located) == len(requests) and located[4] == [] and located[5] == located[6][:1]
    for slots, runs in zip(requests, located):
        per_token = page_to_slab[slots.numpy() // 16]
        bounds = [0, *(np.flatnonzero(per_token[1:] != per_token[:-1]) + 1).tolist(), len(slots)] if len(slots) else [0]
        assert len(runs) == len(bounds) - 1
        for run, lo, hi in zip(runs, bounds, bounds[1:]):
            if per_token[lo] == UNMAPPED:
                assert torch.equal(run, pool.dense_rows(slots[lo:hi]))
            else:
                assert run == int(per_token[lo]) and hi - lo == seg
    with pytest.raises(ValueError, match="page_size 16"):
        locate_many(pool, [requests[0][1:]])
