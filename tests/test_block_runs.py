"""The plan's per-block half (block_runs), against a plain-Python loop over the blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mosaickv.formats import SIDE_KINDS
from mosaickv.kernels.block_runs import (
    KIND_PAIRS,
    NUM_KINDS,
    RunCache,
    batch_runs,
    block_runs,
    cut_runs,
    extend_blocks,
    group_blocks,
    kind_tokens,
    pack_entries,
)
from mosaickv.kernels.layout import TABLE_FIELDS, kind_chunk_tokens, plan_host


def loop_runs(table: np.ndarray, indptr: np.ndarray, indices: np.ndarray, chunks: int | np.ndarray):
    """Each pair's blocks, stably grouped by kind pair, cut where the kept tokens since the
    group's start cross a multiple of the kind pair's chunk (``chunks``: one for all, or
    one per kind pair); blocks and runs keeping no token left out."""
    order, runs = [], []
    for pair in range(len(indptr) - 1):
        blocks = list(indices[indptr[pair] : indptr[pair + 1]])
        for kind in range(KIND_PAIRS):
            chunk = int(chunks if np.ndim(chunks) == 0 else chunks[kind])
            group = [b for b in blocks if table[b, 1] * NUM_KINDS + table[b, 5] == kind and table[b, 0] > 0]
            # A block starts a new run where its first kept token enters another chunk.
            cuts, seen = [], 0
            for b in group:
                cuts.append(seen // chunk)
                seen += table[b, 0]
            start = len(order)
            order.extend(group)
            i = 0
            while i < len(group):
                j = i + 1
                while j < len(group) and cuts[j] == cuts[i]:
                    j += 1
                if sum(table[b, 0] for b in group[i:j]):
                    runs.append((pair, start + i, start + j, kind))
                i = j
    return np.asarray(order, dtype=np.int64), runs


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                  reason="needs a CUDA device")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(40))
def test_block_runs_match_a_loop_over_blocks(seed: int, device: str) -> None:
    rng = np.random.default_rng(seed)
    nblocks = int(rng.integers(1, 80))
    table = np.zeros((nblocks, len(TABLE_FIELDS)), dtype=np.int64)
    table[:, 0] = rng.integers(0, 33, nblocks) * (rng.random(nblocks) > 0.2)  # some blocks keep no token
    table[:, 1], table[:, 5] = rng.integers(0, 4, nblocks), rng.integers(0, 4, nblocks)
    table[:, 2], table[:, 6] = rng.integers(1, 129, nblocks), rng.integers(1, 129, nblocks)
    counts = rng.integers(0, 7, int(rng.integers(0, 9)))  # empty pairs and empty batches too
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    indices = rng.integers(0, nblocks, int(indptr[-1]))
    chunk = int(rng.choice([1, 16, 40, 1000])) if seed % 2 else rng.choice([1, 16, 40, 1000], KIND_PAIRS)
    got = block_runs(torch.from_numpy(table).to(device), indptr, torch.from_numpy(indices).to(device), chunk)
    order, runs = loop_runs(table, indptr, indices, chunk)
    assert got.block_indices.device.type == device
    assert np.array_equal(got.block_indices.cpu().numpy(), order)
    assert list(zip(got.pair, got.lo, got.hi, got.kind)) == runs
    kinds = table[indices, 1] * NUM_KINDS + table[indices, 5]
    for kind in range(KIND_PAIRS):
        rows = indices[kinds == kind]
        assert got.k_width_max[kind] == (table[rows, 2].max() if len(rows) else 0)
        assert got.v_width_max[kind] == (table[rows, 6].max() if len(rows) else 0)
    packed = block_runs(pack_entries(table), indptr, indices, chunk)  # what a pool keeps on the host
    assert np.array_equal(packed.block_indices.numpy(), order)
    assert list(zip(packed.pair, packed.lo, packed.hi, packed.kind)) == runs
    assert np.array_equal(packed.k_width_max, got.k_width_max) and np.array_equal(packed.v_width_max, got.v_width_max)


@pytest.mark.parametrize("seed", range(20))
def test_a_batch_of_requests_runs_is_the_runs_of_the_batch(seed: int) -> None:
    """batch_runs (each request's runs found alone, then placed in the batch) names the
    same blocks, run by run, with the same pairs and kinds as block_runs over the batch;
    requests without blocks, and a batch without requests, too."""
    rng = np.random.default_rng(100 + seed)
    layers, hkv = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    nblocks = 60
    table = np.zeros((nblocks, len(TABLE_FIELDS)), dtype=np.int64)
    table[:, 0] = rng.integers(0, 33, nblocks) * (rng.random(nblocks) > 0.2)
    table[:, 1], table[:, 5] = rng.integers(0, 4, nblocks), rng.integers(0, 4, nblocks)
    table[:, 2], table[:, 6] = rng.integers(1, 129, nblocks), rng.integers(1, 129, nblocks)
    counts = rng.integers(0, 6, int(rng.integers(0, 5)))  # blocks per (layer, head) of each request
    own = [rng.integers(0, nblocks, (layers, hkv, int(n))) for n in counts]
    chunk = int(rng.choice([1, 16, 40, 1000]))
    t = torch.from_numpy(table)
    parts = [block_runs(t, np.arange(layers * hkv + 1) * int(n), torch.from_numpy(b.reshape(-1)), chunk)
             for b, n in zip(own, counts)]
    got = batch_runs(parts, hkv)
    # The batch as block_runs sees it: pairs (layer, request, head), layer-major.
    flat = [own[r][layer, h] for layer in range(layers) for r in range(len(own)) for h in range(hkv)]
    indptr = np.concatenate([[0], np.cumsum([len(x) for x in flat])]).astype(np.int64)
    indices = np.concatenate(flat + [np.zeros(0, np.int64)]).astype(np.int64)
    want = block_runs(t, indptr, torch.from_numpy(indices), chunk)
    assert np.array_equal(got.pair, want.pair) and np.array_equal(got.kind, want.kind)
    got_rows, want_rows = got.block_indices.numpy(), want.block_indices.numpy()
    for lo, hi, wlo, whi in zip(got.lo, got.hi, want.lo, want.hi):
        assert np.array_equal(got_rows[lo:hi], want_rows[wlo:whi])
    assert np.array_equal(got.k_width_max, want.k_width_max) and np.array_equal(got.v_width_max, want.v_width_max)


@pytest.mark.parametrize("seed", range(30))
def test_a_request_extended_by_a_segment_groups_and_cuts_as_it_would_whole(seed: int) -> None:
    """extend_blocks (the blocks before the request's last segment, kept by a plan, plus
    that segment's) is group_blocks over every segment: the same order, kept tokens per
    format pair and widths, and so the same runs at any run length; all-dropped segments
    and format pairs first met in the new segment too."""
    rng = np.random.default_rng(300 + seed)
    layers, hkv, segments, slabs = int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(1, 9)), 12
    rows = slabs * layers * hkv
    table = np.zeros((rows, len(TABLE_FIELDS)), dtype=np.int64)
    table[:, 0] = rng.integers(0, 33, rows) * (rng.random(rows) > 0.2)
    table[:, 1], table[:, 5] = rng.integers(0, 4, rows), rng.integers(0, 4, rows)
    table[:, 2], table[:, 6] = rng.integers(1, 129, rows), rng.integers(1, 129, rows)
    own = rng.permutation(slabs)[:segments]
    if seed % 3 == 0:  # the new segment keeps no token
        table[own[-1] * layers * hkv + np.arange(layers * hkv), 0] = 0
    entries = pack_entries(table)

    def rows_of(s: np.ndarray) -> np.ndarray:  # (layer, KV head, segment) order, as a plan names them
        return ((s[None, None, :] * layers + np.arange(layers)[:, None, None]) * hkv
                + np.arange(hkv)[None, :, None]).reshape(-1)

    pairs = np.arange(layers * hkv + 1)
    whole = group_blocks(entries, pairs * segments, rows_of(own))
    before = group_blocks(entries, pairs * (segments - 1), rows_of(own[:-1]))
    extended = extend_blocks(before, entries, pairs[:-1], rows_of(own[-1:]))
    for field in ("key", "rows", "tokens", "kept", "k_width_max", "v_width_max"):
        assert np.array_equal(getattr(extended, field), getattr(whole, field)), field
    assert np.array_equal(whole.kept, kind_tokens(table, rows_of(own)))
    for chunk in (1, 16, 40, rng.choice([1, 16, 40], KIND_PAIRS)):
        want, got = block_runs(table, pairs * segments, rows_of(own), chunk), cut_runs(extended, chunk)
        assert np.array_equal(got.block_indices.numpy(), want.block_indices.numpy())
        for field in ("pair", "lo", "hi", "kind", "k_width_max", "v_width_max"):
            assert np.array_equal(getattr(got, field), getattr(want, field)), field


def test_extending_needs_one_row_for_each_pair_in_order() -> None:
    table = np.zeros((8, len(TABLE_FIELDS)), dtype=np.int64)
    blocks = group_blocks(table, np.asarray([0, 2, 4]), np.arange(4))
    with pytest.raises(ValueError, match="one row for each pair, pairs ascending: got 2 pairs and 1 rows"):
        extend_blocks(blocks, table, np.asarray([0, 1]), np.asarray([4]))
    with pytest.raises(ValueError, match="pairs ascending"):
        extend_blocks(blocks, table, np.asarray([1, 0]), np.asarray([4, 5]))


def test_entries_too_wide_for_their_bits_are_refused() -> None:
    table = np.zeros((2, len(TABLE_FIELDS)), dtype=np.int64)
    table[1, 2] = 1 << 16
    with pytest.raises(ValueError, match="16 bits each: got values from 0 to 65536"):
        pack_entries(table)


def test_chunks_per_format_pair_need_one_per_pair() -> None:
    table = np.zeros((4, len(TABLE_FIELDS)), dtype=np.int64)
    with pytest.raises(ValueError, match=f"needs {KIND_PAIRS} entries, got shape \\(3,\\)"):
        block_runs(table, np.asarray([0, 4]), np.arange(4), np.asarray([8, 8, 8]))


def test_a_format_pair_with_few_tokens_gets_an_item_per_program_slot() -> None:
    """One chunk for the batch leaves a format pair holding a tenth of the tokens one run
    per (request, KV head), fewer items than programs; chunks per pair give it about four
    per program slot, and leave the pair holding most tokens as it was."""
    requests, hkv, per_pair, programs, block_n = 4, 2, 200, 16, 16
    blocks = requests * hkv * per_pair
    table = np.zeros((blocks, len(TABLE_FIELDS)), dtype=np.int64)
    table[:, 0] = 32
    table[::10, 1] = 1  # every tenth block: keys sparse per vector (kind pair 4), values dense
    table[:, 2], table[:, 6] = 8, 128
    indptr = np.arange(requests * hkv + 1) * per_pair
    indices = np.arange(blocks)
    ones, tails = np.ones(requests, dtype=np.int64), np.zeros(requests, dtype=np.int64)

    def items(kind_chunks) -> dict[tuple[int, int], int]:
        plan = plan_host(table, indptr, indices, ones, tails, 1, hkv, 1, 16, block_n, None, programs,
                         kind_chunks=kind_chunks)
        return {(k, v): len(ids) for k, v, _, ids in plan.layers[0].launches}

    per_pair_chunks = kind_chunk_tokens(kind_tokens(table, indices), 0, 1, hkv, block_n, programs)
    batch, by_kind = items(None), items(per_pair_chunks)
    sparse, dense = (SIDE_KINDS.index("sparse"), SIDE_KINDS.index("dense")), (SIDE_KINDS.index("dense"),) * 2
    assert batch[sparse] < programs <= 4 * programs <= by_kind[sparse]
    assert by_kind[dense] == batch[dense]


def test_the_run_cache_keeps_what_recent_plans_used() -> None:
    cache, made = RunCache(keep=2), []
    make = lambda v: lambda: made.append(v) or v  # noqa: E731
    assert cache.get(("a",), make(1)) == 1 and cache.get(("a",), make(2)) == 1  # a hit makes nothing
    cache.end_plan()
    assert cache.get(("b",), make(3)) == 3
    cache.end_plan()
    cache.end_plan()  # "a" unused for two plans: gone; "b" was used one plan before
    assert cache.get(("a",), make(4)) == 4 and cache.get(("b",), make(5)) == 3
    assert made == [1, 3, 4] and (cache.hits, cache.misses) == (2, 3)
