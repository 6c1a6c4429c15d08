"""Plan once, run many: a decode batch's plan is kept between steps and only its tails'
ends patched (HostPlan.with_tails, the RunCache's batch plans, GraphPlan.load shipping
only what changed). Every reused plan must equal, field for field, one built afresh from
the same inputs, through tails growing, a segment sealing, requests leaving and joining,
and a slab holding another segment."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of the kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

from mosaickv.formats import BlockFormat, SideFormat, pack_block
from mosaickv.kernels.block_runs import NUM_KINDS, RunCache, batch_runs, block_runs, pair_kinds
from mosaickv.kernels.graph_plan import GraphCapacity
from mosaickv.kernels.layout import TAIL, HostPlan, pack_region, plan_host

from test_kernels_graph_plan import Store, graph_for


def assert_same_plan(got: HostPlan, want: HostPlan) -> None:
    """Bit for bit: what a kernel reads from either plan is the same."""
    assert np.array_equal(got.requests, want.requests)
    assert torch.equal(got.block_indices.cpu(), want.block_indices.cpu())
    assert (got.block_m, got.block_n) == (want.block_m, want.block_n)
    assert (got.tiles is None) == (want.tiles is None)
    assert got.tiles is None or torch.equal(got.tiles.cpu(), want.tiles.cpu())
    assert len(got.layers) == len(want.layers)
    for a, b in zip(got.layers, want.layers):
        assert np.array_equal(a.items, b.items) and a.items.dtype == b.items.dtype
        assert np.array_equal(a.groups, b.groups)
        assert np.array_equal(a.merge_indptr, b.merge_indptr)
        assert [(k, v, r) for k, v, r, _ in a.launches] == [(k, v, r) for k, v, r, _ in b.launches]
        for (*_, x), (*_, y) in zip(a.launches, b.launches):
            assert np.array_equal(x, y) and x.dtype == y.dtype


def store_plan(store: Store, tails: list[int], layers: int = 3, group: int = 2) -> HostPlan:
    """Every request of ``store`` at every one of ``layers`` layers (the same blocks), with
    tails of ``tails`` tokens."""
    hkv, batch = store.hkv, range(len(store.layers))
    spans = [(store.indptr[b * hkv + h], store.indptr[b * hkv + h + 1]) for b in batch for h in range(hkv)] * layers
    indices = np.concatenate([np.arange(lo, hi) for lo, hi in spans])
    indptr = np.concatenate([[0], np.cumsum([hi - lo for lo, hi in spans])])
    return plan_host(store.arena.table_host, indptr, indices, np.ones(len(batch), dtype=np.int64), tails, layers,
                     hkv, group, 16, 16, 32, 3)


@pytest.fixture(scope="module")
def store() -> Store:
    return Store(torch.Generator().manual_seed(0), [3, 5, 2, 4], [3, 7, 20, 9], 2, 32)


def test_plan_host_launches_equal_a_pass_per_layer(store):
    """The launches found for every layer at once are what a per-layer np.unique finds."""
    host = store_plan(store, [3, 7, 20, 9])
    for layer in host.layers:
        kinds = np.full(len(layer.items), -2)
        for k, v, _, ids in layer.launches:
            kinds[ids] = TAIL if k == TAIL else NUM_KINDS * k + v
        assert (kinds != -2).all()
        want = [(TAIL, TAIL) if kind == TAIL else pair_kinds(kind) for kind in np.unique(kinds)]
        assert [(k, v) for k, v, _, _ in layer.launches] == want
        for (k, v, _, ids), kind in zip(layer.launches, np.unique(kinds)):
            assert np.array_equal(ids, np.flatnonzero(kinds == kind))


def test_with_tails_equals_a_fresh_plan_and_refuses_other_tail_items(store):
    host = store_plan(store, [3, 7, 20, 9])
    for tails in ([4, 8, 21, 10], [3, 7, 20, 9], [31, 1, 32, 30]):
        assert_same_plan(host.with_tails(np.asarray(tails), 2), store_plan(store, tails))
    with pytest.raises(ValueError, match="tail items per"):
        host.with_tails(np.asarray([33, 7, 20, 9]), 2)  # a second tail chunk
    with pytest.raises(ValueError, match="tail items per"):
        host.with_tails(np.asarray([0, 7, 20, 9]), 2)  # no tail item
    with pytest.raises(ValueError, match="tail_lens has 3"):
        host.with_tails(np.asarray([3, 7, 20]), 2)
    assert not host.layers[0].items.flags.writeable  # shared between the copies


def test_graph_load_of_a_patched_plan_equals_a_full_load(store):
    cap = GraphCapacity(requests=4, blocks=200, items=64, groups=8, tail_rows=200)
    host = store_plan(store, [3, 7, 20, 9], layers=1)
    patched = host.with_tails(np.asarray([5, 8, 22, 10]), 2)
    rows = np.arange(45)
    reused, fresh = graph_for(store, 2, cap), graph_for(store, 2, cap)
    reused.load(host, np.arange(39))
    reused.load(patched, rows)  # ships only the tail ends, the requests and the rows
    fresh.load(store_plan(store, [5, 8, 22, 10], layers=1), rows)
    assert torch.equal(reused._flat, fresh._flat)
    other = store_plan(store, [5, 8, 22, 10], layers=1)  # another plan: loaded in full again
    reused.load(other, rows)
    assert reused._loaded is other.tails
    assert torch.equal(reused._flat, fresh._flat)


def test_the_run_cache_keeps_only_the_last_batch_plans():
    cache, made = RunCache(keep_plans=2), []
    for key in ("a", "b", "a", "c", "b"):
        cache.plan((key,), lambda key=key: made.append(key) or key)
    assert made == ["a", "b", "c", "b"]  # "b" went when "c" came (a was used after it)
    assert (cache.plan_hits, cache.plan_misses) == (1, 4)
    cache.drop_plans()
    cache.plan(("a",), lambda: made.append("a2"))
    assert made[-1] == "a2"


sglang = pytest.importorskip("sglang")

from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

from mosaickv.sglang_patch.attention import DECODE_TUNING  # noqa: E402
from mosaickv.kernels.block_runs import kind_tokens, pack_entries  # noqa: E402
from mosaickv.kernels.decode import MixedAttention  # noqa: E402
from mosaickv.kernels.layout import kind_chunk_tokens  # noqa: E402
from mosaickv.sglang_patch.forward_inputs import (  # noqa: E402
    block_rows, host_plan, power_of_two_at_least, sealed_and_tail)

from test_sglang_attention import HKV, LAYERS, SEG, Twin  # noqa: E402


def fresh_plan(pool, reqs, chunk: int, run_chunks=None, tuning=DECODE_TUNING) -> tuple[HostPlan, torch.Tensor]:
    """What host_plan built before it kept anything: each request's runs found again
    (cut at ``run_chunks``, one per format pair, if given; with ``tuning``'s tile starts),
    placed side by side (batch_runs), planned (plan_host). A kept plan must equal it."""
    found = [sealed_and_tail(req) for req in reqs]
    pairs = np.arange(LAYERS * HKV + 1)
    parts = [block_runs(pool.block_table, pairs * len(s), block_rows(s, np.asarray([len(s)]), LAYERS, HKV),
                        chunk if run_chunks is None else run_chunks, tile_shape=tuning.tile_shape())
             for s, _ in found]
    counts = np.asarray([len(s) for s, _ in found], dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(np.tile(np.repeat(counts, HKV), LAYERS))])
    runs = batch_runs(parts, HKV, tuning.tile_starts)
    host = plan_host(pool.block_table, indptr, runs.block_indices, [req.nq for req in reqs], [len(t) for _, t in found],
                     LAYERS, HKV, 3, DECODE_TUNING.block_m, DECODE_TUNING.block_n, chunk, 8, runs=runs)
    return host, torch.cat([t for _, t in found] + [torch.zeros(0, dtype=torch.int64)])


def test_a_kept_batch_plan_equals_a_fresh_one_step_after_step():
    twin = Twin(3, 64)
    twin.step([3 * SEG + 2, 2 * SEG + 1], ForwardMode.EXTEND, seed=0)
    for req, segment in ((0, 0), (0, 1), (1, 0)):
        twin.seal(req, segment)
    pool, cache = twin.pool, twin.pool.run_cache

    def check(batch: list[int], reused: bool) -> None:
        reqs = twin.mosaic._requests(torch.tensor(batch), [twin.lens[b] for b in batch], [1] * len(batch))
        hits = cache.plan_hits
        host, rows = host_plan(pool, reqs, 3, DECODE_TUNING, 8, chunk_tokens=64)
        assert (cache.plan_hits > hits) == reused
        want, want_rows = fresh_plan(pool, reqs, 64)
        assert host.tiles is not None  # the server's decode reads packed tiles' starts from its plans
        assert_same_plan(host, want)
        assert torch.equal(rows, want_rows)

    check([0, 1], reused=False)
    check([0, 1], reused=True)
    for seed in range(1, 4):  # the tails grow: the kept plan, new tail ends
        twin.step([1, 1], ForwardMode.DECODE, seed=seed)
        check([0, 1], reused=True)
    twin.seal(1, 1)  # request 1 reads another segment: planned again
    check([0, 1], reused=False)
    check([0], reused=False)  # a request left
    check([0, 1], reused=True)  # and came back: the batch's plan is still kept
    check([1, 0], reused=False)  # another order is another batch
    slab = int(sealed_and_tail(twin.mosaic._requests(torch.tensor([1]), [twin.lens[1]], [1])[0])[0][0])
    pages = pool._slab_pages[slab]
    other = [[pack_block(torch.randn(SEG, 64), torch.randn(SEG, 64), BlockFormat(SEG // 2, SideFormat("sparse", 4)))
              for _ in range(HKV)] for _ in range(LAYERS)]
    pool.install(slab, pages, pack_region([b for layer in other for b in layer], 64, pool.arena.base(slab)))
    check([0, 1], reused=False)  # the slab's generation changed
    pool.run_cache.clear()
    check([0, 1], reused=False)


def test_runs_are_found_from_the_host_mirror_of_the_table():
    """A plan finds its runs on the host, from the mirror the pool writes with the block
    table: a plan that read the table itself would wait for the GPU. With the table's
    fields overwritten (the mirror kept), a plan built afresh is still the one the table
    gave; and the mirror holds what the table holds."""
    twin = Twin(2, 64)
    twin.step([3 * SEG + 2, 2 * SEG + 1], ForwardMode.EXTEND, seed=5)
    for req, segment in ((0, 0), (0, 2), (1, 1)):
        twin.seal(req, segment)
    pool = twin.pool
    assert np.array_equal(pool.block_table.cpu().numpy(), pool.block_table_host)
    assert np.array_equal(pool.block_entries_host, pack_entries(pool.block_table_host))
    reqs = twin.mosaic._requests(torch.tensor([0, 1]), twin.lens[:2], [1, 1])
    want, want_rows = fresh_plan(pool, reqs, 32)
    pool.block_table.fill_(-7)
    pool.run_cache.clear()
    host, rows = host_plan(pool, reqs, 3, DECODE_TUNING, 8, chunk_tokens=32)
    assert_same_plan(host, want)
    assert torch.equal(rows, want_rows)


def test_runs_cut_per_format_pair_follow_the_batch_s_work():
    """With chunk_by_kind, each format pair's runs are cut at its share of the batch's
    work (kind_chunk_tokens, rounded up to a power of two): the plan equals one built
    afresh at those chunks, is kept while they hold, and is planned again when a sealed
    segment changes a pair's share."""
    tuning = MixedAttention(block_m=DECODE_TUNING.block_m, block_n=DECODE_TUNING.block_n,
                            wide_block_n=DECODE_TUNING.wide_block_n, pack_tokens=True, pack_sparse_keys=True,
                            chunk_by_kind=True)
    twin = Twin(3, 64)
    twin.step([3 * SEG + 2, 2 * SEG + 1], ForwardMode.EXTEND, seed=9)
    for req, segment in ((0, 0), (0, 2), (1, 0)):
        twin.seal(req, segment)
    pool = twin.pool

    def check(reused: bool) -> np.ndarray:
        reqs = twin.mosaic._requests(torch.tensor([0, 1]), twin.lens[:2], [1, 1])
        slabs = [sealed_and_tail(req)[0] for req in reqs]
        rows = block_rows(np.concatenate(slabs), np.asarray([len(s) for s in slabs]), LAYERS, HKV)
        tails = sum(len(sealed_and_tail(req)[1]) for req in reqs)
        chunks = power_of_two_at_least(kind_chunk_tokens(kind_tokens(pool.block_table, rows), tails, LAYERS, HKV,
                                                         tuning.block_n, 8))
        hits = pool.run_cache.plan_hits
        host, _ = host_plan(pool, reqs, 3, tuning, 8, chunk_tokens=8)  # tails' chunk: far below every pair's
        assert (pool.run_cache.plan_hits > hits) == reused
        assert_same_plan(host, fresh_plan(pool, reqs, 8, chunks, tuning)[0])
        return chunks

    check(reused=False)
    check(reused=True)
    twin.seal(0, 1)
    check(reused=False)
