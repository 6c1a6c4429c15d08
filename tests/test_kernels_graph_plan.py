"""One set of static plan buffers (GraphPlan) serves batches of every size and format mix:
the run reads its counts from the device, so what a CUDA graph captured once computes
every later batch (Triton interpreter on the CPU; capture and replay on a GPU)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of the kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

from mosaickv.formats import SIDE_KINDS, BlockFormat, SideFormat
from mosaickv.kernels.decode import MixedDecodeWrapper, run_plan
from mosaickv.kernels.graph_plan import GraphCapacity, GraphPlan
from mosaickv.kernels.layout import TAIL, Arena, pack_requests, plan_host
from mosaickv.kernels.synthetic import random_layer

from test_kernels_decode import check_close, oracle

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TUNING = MixedDecodeWrapper(block_n=16)
# The server's kind of decode tuning: packed tiles (dense and sparse-key blocks) whose
# starts come from the plan, beside a block per tile for the other formats.
TILE_STARTS = MixedDecodeWrapper(block_n=16, wide_block_n=16, pack_tokens=True, pack_sparse_keys=True,
                                 tile_starts=True)


class Store:
    """Every request's blocks in one arena and every tail in one buffer (a pool's shape):
    a batch is any subset of the requests, planned against those fixed buffers."""

    def __init__(self, gen: torch.Generator, segments: list[int], tails: list[int], hkv: int, d: int,
                 fmt: BlockFormat | None = None) -> None:
        self.layers = [random_layer(gen, s, 16, hkv, d, fmt=fmt) for s in segments]
        self.tk = [torch.randn(hkv, t, d, generator=gen).bfloat16() for t in tails]
        self.tv = [torch.randn(hkv, t, d, generator=gen).bfloat16() for t in tails]
        arena, self.indptr, _ = pack_requests(self.layers, hkv, d)
        self.arena: Arena = arena.to(DEVICE)
        self.tail_start = np.concatenate([[0], np.cumsum(tails)])
        self.tail_k = torch.cat([t.transpose(0, 1) for t in self.tk]).contiguous().to(DEVICE)
        self.tail_v = torch.cat([t.transpose(0, 1) for t in self.tv]).contiguous().to(DEVICE)
        self.hkv, self.d = hkv, d

    def plan(self, batch: list[int], group: int, tuning: MixedDecodeWrapper = TUNING,  # noqa: ANN201 - a HostPlan and the tail rows
             qo_lens: np.ndarray | None = None):
        hkv = self.hkv
        spans = [(self.indptr[b * hkv + h], self.indptr[b * hkv + h + 1]) for b in batch for h in range(hkv)]
        indices = np.concatenate([np.arange(lo, hi) for lo, hi in spans] + [np.zeros(0, dtype=np.int64)])
        indptr = np.concatenate([[0], np.cumsum([hi - lo for lo, hi in spans])])
        tail_lens = np.asarray([self.tk[b].shape[1] for b in batch])
        rows = np.concatenate([np.arange(self.tail_start[b], self.tail_start[b + 1]) for b in batch]
                              + [np.zeros(0, dtype=np.int64)])
        qo_lens = np.ones(len(batch), dtype=np.int64) if qo_lens is None else qo_lens
        host = plan_host(self.arena.table_host, indptr, indices, qo_lens, tail_lens, 1,
                         hkv, group, max(tuning.block_m, 1 << (group - 1).bit_length()), tuning.block_n, 32, 3,
                         tile_shape=tuning.tile_shape())
        return host, rows

    def reference(self, batch: list[int], q: torch.Tensor) -> torch.Tensor:
        return torch.stack([oracle(q[i][:, None].float().cpu(), self.layers[b], self.tk[b], self.tv[b])[:, 0]
                            for i, b in enumerate(batch)])


def menu(d: int) -> list[tuple[int, int, int]]:
    """Every format pair at the widest R_MAX (covers any width up to ``d``), and the tail."""
    return [(k, v, d) for k in range(len(SIDE_KINDS)) for v in range(len(SIDE_KINDS))] + [(TAIL, TAIL, 16)]


def graph_for(store: Store, group: int, capacity: GraphCapacity) -> GraphPlan:
    block_m = max(TUNING.block_m, 1 << (group - 1).bit_length())
    return GraphPlan(menu(store.d), capacity, 1, block_m, TUNING.block_n, store.d, 3, DEVICE)


BATCHES = [[0, 1, 2, 3, 4], [3], [4, 0, 2], []]


def run_batches(store: Store, gp: GraphPlan, group: int, gen: torch.Generator, capture: bool,
                tuning: MixedDecodeWrapper = TUNING) -> None:
    hq = store.hkv * group
    q = torch.zeros(gp.capacity.requests, hq, store.d, dtype=torch.bfloat16, device=DEVICE)
    out = torch.zeros_like(q)

    def run() -> None:
        run_plan(gp.plans[0], store.arena.values, store.arena.index, store.arena.table, store.arena.widths_aligned,
                 store.tail_k, store.tail_v, gp.tail_rows, q, out, store.d ** -0.5, group, tuning)

    graph = None
    for n, batch in enumerate(BATCHES):
        host, rows = store.plan(batch, group, tuning)
        gp.load(host, rows)
        q.copy_(torch.randn(q.shape, generator=gen).bfloat16())
        out.fill_(float("nan"))
        if graph is not None:
            graph.replay()
        else:
            run()
            if capture and n == 0:  # compiled by the eager run above; every later batch replays it
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    run()
        if batch:
            check_close(out[: len(batch)], store.reference(batch, q[: len(batch)]))
        assert gp._host.numel() < gp._flat.numel(), "a load shipped the whole capacity, not the plan"
        assert torch.isnan(out[len(batch) :].float()).all(), "rows past the batch were written"


CAPACITY = GraphCapacity(requests=6, blocks=64, items=96, groups=24, tail_rows=128)
# 16-token tiles of 16-token segments: a packed run takes at most a tile per block.
TILE_CAPACITY = GraphCapacity(requests=6, blocks=64, items=96, groups=24, tail_rows=128, tiles=64)


@pytest.mark.parametrize(("group", "d"), [(1, 64), (3, 64), (4, 128), (8, 64)])
def test_one_graph_plan_serves_changing_batches(group: int, d: int) -> None:
    """Batches of 5, 1, 3 and 0 requests, random formats per block (empty segments and
    empty tails included), through the same static buffers: each equals the reference,
    and no row past the batch is written."""
    gen = torch.Generator().manual_seed(group * d)
    store = Store(gen, segments=[3, 0, 2, 1, 4], tails=[5, 9, 0, 40, 1], hkv=2, d=d)
    run_batches(store, graph_for(store, group, CAPACITY), group, gen, capture=False)


@pytest.mark.parametrize(("group", "d"), [(1, 64), (4, 128), (3, 64)])
def test_one_graph_plan_serves_changing_batches_with_tile_starts(group: int, d: int) -> None:
    """The same through packed tiles whose starts the plan gives (the server's decode):
    each batch's tile starts go into the static buffer beside its blocks, dense and
    sparse-key blocks of every kept count share tiles, every batch equals the reference."""
    gen = torch.Generator().manual_seed(100 + group * d)
    store = Store(gen, segments=[3, 0, 2, 1, 4], tails=[5, 9, 0, 40, 1], hkv=2, d=d)
    host, _ = store.plan(BATCHES[0], group, TILE_STARTS)
    assert len(host.tiles) > 0
    gp = graph_for(store, group, TILE_CAPACITY)
    run_batches(store, gp, group, gen, capture=False, tuning=TILE_STARTS)


def test_tile_starts_in_a_graph_are_checked() -> None:
    """A graph that reads tile starts refuses a plan without them, and a batch with more
    tiles than its capacity, by name."""
    gen = torch.Generator().manual_seed(5)
    store = Store(gen, segments=[3, 2], tails=[4, 4], hkv=2, d=64, fmt=BlockFormat(16))  # a tile a block
    without, rows = store.plan([0, 1], 2)
    with pytest.raises(ValueError, match="this graph reads packed tiles' starts .* and the plan has none"):
        graph_for(store, 2, TILE_CAPACITY).load(without, rows)
    host, rows = store.plan([0, 1], 2, TILE_STARTS)
    few = GraphCapacity(requests=6, blocks=64, items=96, groups=24, tail_rows=128, tiles=1)
    with pytest.raises(ValueError, match=rf"this batch has {len(host.tiles)} tiles, above GraphCapacity.tiles=1"):
        graph_for(store, 2, few).load(host, rows)


def test_a_batch_above_capacity_is_refused_by_name() -> None:
    gen = torch.Generator().manual_seed(1)
    store = Store(gen, segments=[3, 2], tails=[4, 4], hkv=2, d=64)
    small = GraphCapacity(requests=6, blocks=64, items=96, groups=24, tail_rows=5)
    host, rows = store.plan([0, 1], 2)
    with pytest.raises(ValueError, match=r"this batch has 8 tail_rows, above GraphCapacity.tail_rows=5"):
        graph_for(store, 2, small).load(host, rows)
    few_items = GraphCapacity(requests=6, blocks=64, items=2, groups=24, tail_rows=64)
    with pytest.raises(ValueError, match=r"items, above GraphCapacity.items=2"):
        graph_for(store, 2, few_items).load(host, rows)
    with pytest.raises(ValueError, match=r"GraphCapacity.groups=0 must be at least 1"):
        GraphCapacity(requests=6, blocks=64, items=2, groups=0, tail_rows=64)


def test_a_request_with_more_query_tokens_than_the_graph_takes_is_refused() -> None:
    """A graph's launches are compiled for its plans' query tokens a request (decode: 1;
    packed sparse keys then leave out rows past the GQA group), so a plan with more is
    refused by name, not run on launches that would skip its rows."""
    gen = torch.Generator().manual_seed(6)
    store = Store(gen, segments=[2, 1], tails=[4, 4], hkv=2, d=64)
    one, rows = store.plan([0, 1], 2)
    assert one.max_q == 1 and graph_for(store, 2, CAPACITY).plans[0].max_q == 1
    two, rows = store.plan([0, 1], 2, qo_lens=np.asarray([2, 1]))
    assert two.max_q == 2
    with pytest.raises(ValueError, match="a request of this batch has 2 query tokens, the graph's launches were "
                                         "captured for 1"):
        graph_for(store, 2, CAPACITY).load(two, rows)


def test_a_format_outside_the_menu_is_refused() -> None:
    gen = torch.Generator().manual_seed(2)
    fmt = BlockFormat(16, SideFormat("sparse", 40), SideFormat("lowrank", 8))
    store = Store(gen, segments=[2], tails=[3], hkv=1, d=64, fmt=fmt)
    narrow = GraphPlan([(1, 3, 32), (TAIL, TAIL, 16)], CAPACITY, 1, 16, 16, 64, 3, DEVICE)
    host, rows = store.plan([0], 1)
    with pytest.raises(ValueError, match=r"R_MAX=64\) is not in this graph's menu"):
        narrow.load(host, rows)


def test_a_request_without_keys_reads_zeros() -> None:
    gen = torch.Generator().manual_seed(3)
    store = Store(gen, segments=[0, 1], tails=[0, 2], hkv=1, d=64)
    gp = graph_for(store, 2, CAPACITY)
    host, rows = store.plan([0, 1], 2)
    gp.load(host, rows)
    q = torch.randn(6, 2, 64, generator=gen).bfloat16().to(DEVICE)
    out = torch.full_like(q, float("nan"))
    run_plan(gp.plans[0], store.arena.values, store.arena.index, store.arena.table, store.arena.widths_aligned,
             store.tail_k, store.tail_v, gp.tail_rows, q, out, 0.125, 2, TUNING)
    assert (out[0] == 0).all()
    check_close(out[1:2], store.reference([1], q[1:2]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("group", "d"), [(4, 128), (3, 64)])
def test_captured_once_replayed_for_every_batch(group: int, d: int) -> None:
    """The first batch's run is captured in a CUDA graph; the next batches only load
    their plans and replay it."""
    gen = torch.Generator().manual_seed(group + d)
    store = Store(gen, segments=[3, 0, 2, 1, 4], tails=[5, 9, 0, 40, 1], hkv=2, d=d)
    run_batches(store, graph_for(store, group, CAPACITY), group, gen, capture=True)
    run_batches(store, graph_for(store, group, TILE_CAPACITY), group, gen, capture=True, tuning=TILE_STARTS)
