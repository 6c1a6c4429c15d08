"""What a forward reads from the pool besides the queries, found on the host once for
every layer: where each request's tokens are (sealed slabs or dense rows), what the query
statistics need, and the kernels' plan. The eager backend and the decode graphs share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import triton

from mosaickv.kernels.decode import MixedAttention
from mosaickv.kernels.block_runs import KIND_PAIRS, GroupedBlocks, batch_runs, cut_runs, extend_blocks, group_blocks
from mosaickv.kernels.layout import (HostPlan, default_chunk_tokens, kind_chunk_tokens, plan_host, tail_chunk,
                                     tail_items)
from mosaickv.uploads import upload
from mosaickv.sglang_patch.pool import UNMAPPED, MosaicKVPool
from mosaickv.sglang_patch.query_stats import ExtendIndex, SegmentQueryStats

WHOLE_RUNS = 1 << 40  # chunk_tokens no run reaches: one item per (group, format pair) and one per tail

Run = int | torch.Tensor
"""Consecutive tokens of a request: a sealed segment's slab, or the dense-pool rows (host)
of still-dense tokens (a batch's rows go to the device together, not one run at a time)."""


class Runs(list):
    """A request's runs as :func:`locate_many` finds them, with what a plan reads of them
    found without a pass over every run (a 32k-token request is 1,024): its sealed slabs
    in token order and which runs are dense."""

    def __init__(self, runs: list[Run], sealed: np.ndarray, dense_at: list[int]) -> None:
        super().__init__(runs)
        self.sealed, self.dense_at = sealed, dense_at


def locate(pool: MosaicKVPool, slots: torch.Tensor) -> list[Run]:
    """A request's tokens (host ``slots``, in token order) as runs, from the page tables."""
    return locate_many(pool, [slots])[0]


def locate_many(pool: MosaicKVPool, requests: list[torch.Tensor]) -> list[Runs]:
    """:func:`locate` for a batch of separate slot lists (padded into rows for :func:`locate_rows`)."""
    lens = [len(slots) for slots in requests]
    rows = torch.zeros(len(requests), max(lens, default=0), dtype=requests[0].dtype if requests else torch.int32)
    for row, slots in zip(rows, requests):
        row[: len(slots)] = slots
    return locate_rows(pool, rows, lens)


def locate_rows(pool: MosaicKVPool, rows: torch.Tensor, lens: list[int]) -> list[Runs]:
    """:func:`locate` for a batch: request ``r`` holds the first ``lens[r]`` slots of host
    ``rows[r]`` (a ``req_to_token`` gather). The page tables are read in numpy, one slot
    per page (a request's tokens fill its pages in order, SGLang's paged layout: slot %
    page_size == position % page_size, checked), every request's pages at once (each
    request's first page starts a run), and the dense runs of every request gathered from
    ``rows`` and mapped to dense rows in one call each. Runs are found with numpy, not a
    Python loop over them (a 32k-token request is 1,024 sealed segments, each its own run):
    3.3 -> 0.9 ms for 8 such requests on a 2-core CPU
    (benchmarks/results/host_locate_32k_cpu.json)."""
    if not lens:
        return []
    ps, seg = pool.page_size, pool.plan.segment_size
    slots = rows.numpy()
    lens_np = np.asarray(lens, dtype=np.int64)
    pages = -(-lens_np // ps)
    page_cols = slots[:, ::ps]
    firsts = page_cols[np.arange(page_cols.shape[1])[None, :] < pages[:, None]]  # every request's pages, in order
    if ps > 1 and (firsts % ps).any():
        raise ValueError(f"a request's tokens do not start its pages (page_size {ps}): its slots are not in "
                         "SGLang's paged layout")
    sealed = pool.page_to_slab.numpy()[firsts // ps]
    start = np.cumsum(pages) - pages  # each request's first page in ``sealed``
    new = np.ones(len(sealed), dtype=bool)
    new[1:] = sealed[1:] != sealed[:-1]
    new[start[pages > 0]] = True
    lo = np.flatnonzero(new)
    req = np.searchsorted(start, lo, side="right") - 1  # a request with no pages starts where the next does
    first = (lo - start[req]) * ps
    last = np.minimum((np.append(lo[1:], len(sealed)) - start[req]) * ps, lens_np[req])
    slab = sealed[lo]
    is_dense = slab == UNMAPPED
    partial = np.flatnonzero(~is_dense & (last - first != seg))
    if len(partial):  # which tokens a part would see is not stored
        i = partial[0]
        raise ValueError(f"a request reads {last[i] - first[i]} tokens of sealed segment {slab[i]}; segments are "
                         "read whole")
    # Per request, slices of batch-wide results (one tolist, one mask): a pass per request
    # over numpy splits cost 3.8 of a 5.1 ms locate at 240 requests on a 2-core CPU.
    bounds = np.searchsorted(req, np.arange(len(lens) + 1))  # each request's runs: bounds[r]..bounds[r + 1]
    run_bounds = bounds.tolist()
    sealed_bounds = np.concatenate([[0], np.cumsum(~is_dense)])[bounds].tolist()
    runs_all, sealed_all = slab.tolist(), slab[~is_dense]
    dense_runs = np.flatnonzero(is_dense)
    dense_req, dense_local = req[dense_runs].tolist(), (dense_runs - bounds[req[dense_runs]]).tolist()
    dense_of: list[list[int]] = [[] for _ in lens]  # each request's dense runs, local indices
    for r, i in zip(dense_req, dense_local):
        dense_of[r].append(i)
    layouts = [Runs(runs_all[a:b], sealed_all[c:d], dense_of[r])
               for r, (a, b, c, d) in enumerate(zip(run_bounds, run_bounds[1:], sealed_bounds, sealed_bounds[1:]))]
    if dense_req:  # every dense run's slots in one gather from ``rows``, mapped to rows in one call
        size = (last - first)[dense_runs]
        offset = np.arange(size.sum()) - np.repeat(np.cumsum(size) - size, size)
        where = (np.repeat(req[dense_runs], size), np.repeat(first[dense_runs], size) + offset)
        dense = pool.dense_rows(torch.from_numpy(slots[where])).split(size.tolist())
        for r, i, rows_of_run in zip(dense_req, dense_local, dense):
            layouts[r][i] = rows_of_run
    return layouts


@dataclass
class RequestKV:
    """One request of a forward: its host ``slots`` (the step's ``nq`` own last) as runs."""

    slots: torch.Tensor
    runs: list[Run]
    nq: int


@dataclass
class StatInputs:
    """What the query statistics read besides the queries, the same for every layer of a
    forward: for a decode batch each query's position in its segment and that segment's
    first slot, for an extend where its queries fall (:meth:`extend_index`); with a window,
    the dense rows of the keys they read."""

    decode: bool
    positions: Optional[torch.Tensor] = None  # decode: [B] host
    firsts: Optional[list[int]] = None  # decode: first slot of each query's segment
    rows: Optional[torch.Tensor] = None  # decode: [B, S] device rows (past a query's position: 0)
    device_positions: Optional[torch.Tensor] = None  # decode, with a window: ``positions`` on the device
    request_rows: Optional[list[torch.Tensor]] = None  # extend: per request, rows from its first query's segment on
    index: Optional[ExtendIndex] = None  # extend: where the queries fall, found at the first layer (extend_index)

    def extend_index(self, stats: SegmentQueryStats, reqs: list[RequestKV], q_heads: int,
                     device: torch.device) -> ExtendIndex:
        """An extend's :class:`ExtendIndex` over the forward's ``reqs`` (those these inputs
        were found for): built at the first layer, where the query heads are known, and
        read by every other layer (a layer built a dozen index tensors per request)."""
        if self.index is None or self.index.q_heads != q_heads:
            self.index = stats.extend_index([req.slots for req in reqs], [req.nq for req in reqs], q_heads, device,
                                            self.request_rows)
        return self.index


def trailing_rows(req: RequestKV, count: int) -> torch.Tensor:
    """Dense rows of a request's last ``count`` tokens: a segment holding one of the step's
    queries is still being written, so it and everything after it are the last dense run."""
    return req.runs[-1][len(req.runs[-1]) - count :]


def stat_inputs(pool: MosaicKVPool, reqs: list[RequestKV]) -> StatInputs:
    stats = pool.query_stats
    seg = stats.segment_size
    if all(req.nq == 1 for req in reqs):
        # Batch-wide, not request by request: at 240 requests a loop of tensor indexing and
        # slice copies was 6 ms of a decode step's host work on an H200 machine.
        lens = np.fromiter((len(req.slots) for req in reqs), dtype=np.int64, count=len(reqs))
        pos_np = (lens - 1) % seg
        firsts = [int(req.slots.numpy()[i]) for req, i in zip(reqs, (lens - 1 - pos_np).tolist())]
        pos = torch.from_numpy(pos_np)
        if not stats.window:
            return StatInputs(True, pos, firsts)
        tails = [req.runs[-1] for req in reqs]  # each query's segment is in its request's last dense run
        ends = np.cumsum([len(t) for t in tails])
        counts = pos_np + 1
        local = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)  # 0..p of each request
        src = np.repeat(ends - counts, counts) + local
        rows = torch.zeros(len(reqs), seg, dtype=torch.int64)
        rows.view(-1)[torch.from_numpy(np.repeat(np.arange(len(reqs)) * seg, counts) + local)] = \
            torch.cat(tails).to(torch.int64)[torch.from_numpy(src)]
        return StatInputs(True, pos, firsts, upload(rows, pool.device), device_positions=upload(pos, pool.device))
    request_rows = None
    if stats.window:
        request_rows = [trailing_rows(req, len(req.slots) - (len(req.slots) - req.nq) // seg * seg) for req in reqs]
    return StatInputs(False, request_rows=request_rows)


def sealed_and_tail(req: RequestKV) -> tuple[np.ndarray, torch.Tensor]:
    """A request's sealed slabs (int64, token order) and its dense runs' rows back to back."""
    runs = req.runs
    if isinstance(runs, Runs):
        sealed, dense = runs.sealed, [runs[i] for i in runs.dense_at]
    else:
        sealed = np.asarray([r for r in runs if isinstance(r, int)], dtype=np.int64)
        dense = [r for r in runs if not isinstance(r, int)]
    return sealed, torch.cat(dense) if dense else torch.zeros(0, dtype=torch.int64)


def host_plan(pool: MosaicKVPool, reqs: list[RequestKV], group: int, tuning: MixedAttention, max_programs: int,
              chunk_tokens: Optional[int] = None, max_items: Optional[int] = None) -> tuple[HostPlan, torch.Tensor]:
    """Blocks of every (layer, request, KV head) from the block table, dense tails as row
    lists, cut into the kernels' items (:func:`plan_host`: the items on the host); and the
    tails' rows (host int64), each request's in token order, back to back. Each request's
    block runs come from the pool's :class:`~mosaickv.kernels.block_runs.RunCache` (found
    on the host from the pool's mirror of the table when missing: nothing is read back;
    a request that sealed one more segment has its kept blocks extended by it), so a step
    costs about its requests' runs, not their blocks; and the batch's plan too (FlashInfer's plan once, run many): the next
    decode step of a batch reads the same sealed blocks, and only its tails grew, so the
    kept plan gets new tail ends (:meth:`HostPlan.with_tails`) while every request keeps
    its slabs, their generations, its queries and its tail's item count. ``chunk_tokens``
    defaults to :func:`default_chunk_tokens` rounded up to a power of two, which a batch
    keeps while its work changes by less than half."""
    hkv, layers = pool.head_num, pool.layer_num
    table, cache = pool.block_table, pool.run_cache
    mirror = pool.block_entries_host  # runs are found on the host (block_runs), not read back
    found = [sealed_and_tail(req) for req in reqs]
    slabs = [s for s, _ in found]
    tails = [t for _, t in found]
    tail_lens = np.asarray([len(t) for t in tails], dtype=np.int64)
    qo_lens = np.asarray([req.nq for req in reqs], dtype=np.int64)
    keys = [(s.tobytes(), pool.slab_generation[s].tobytes()) for s in slabs]

    pairs = np.arange(layers * hkv + 1)

    def grouped(key: tuple[bytes, bytes], s: np.ndarray) -> GroupedBlocks:
        """A request's blocks grouped by format pair: its blocks before its last segment
        extended, where a plan kept them (a decode step after it sealed one), else all."""
        def make() -> GroupedBlocks:
            if len(s) > 1:
                before = cache.peek(("blocks", key[0][:-s.itemsize], key[1][:-pool.slab_generation.itemsize]))
                if before is not None:
                    cache.extends += 1
                    return extend_blocks(before, mirror, pairs[:-1], block_rows(s[-1:], np.asarray([1]), layers, hkv))
            return group_blocks(mirror, pairs * len(s), block_rows(s, np.asarray([len(s)]), layers, hkv))

        return cache.get(("blocks", *key), make)

    blocks = [grouped(key, s) for key, s in zip(keys, slabs)]
    kept = np.zeros(KIND_PAIRS, dtype=np.int64)  # the batch's kept tokens per format pair
    for b in blocks:
        kept += b.kept
    if chunk_tokens is None:
        chunk_tokens = triton.next_power_of_2(default_chunk_tokens(int(kept.sum()), int(tail_lens.sum()), layers, hkv,
                                                                   tuning.block_n, max_programs, max_items))
    run_chunks: int | np.ndarray = chunk_tokens
    if tuning.chunk_by_kind:
        run_chunks = power_of_two_at_least(kind_chunk_tokens(kept, int(tail_lens.sum()), layers, hkv, tuning.block_n,
                                                             max_programs, max_items))
    chunks_key = run_chunks if isinstance(run_chunks, int) else run_chunks.tobytes()
    shape = tuning.tile_shape()  # packed tiles' starts are found with the runs, and kept with them
    runs_key = (chunks_key, None if shape is None else (shape.widths.tobytes(), shape.lanes))
    parts = [cache.get(("runs", *key, runs_key), lambda b=b: cut_runs(b, run_chunks, table.device, shape))
             for key, b in zip(keys, blocks)]
    cache.end_plan()
    block_m = max(tuning.block_m, triton.next_power_of_2(group))

    def plan() -> HostPlan:
        counts = np.asarray([len(s) for s in slabs], dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(np.tile(np.repeat(counts, hkv), layers))])
        runs = batch_runs(parts, hkv, shape is not None)
        return plan_host(table, indptr, runs.block_indices, qo_lens, tail_lens, layers, hkv, group, block_m,
                         tuning.block_n, chunk_tokens, max_programs, max_items, runs)

    tail_counts = tail_items(qo_lens, tail_lens, group, block_m, tail_chunk(chunk_tokens, tuning.block_n))
    key = ("plan", layers, hkv, group, block_m, tuning.block_n, chunk_tokens, runs_key, tuple(keys),
           qo_lens.tobytes(), tail_counts.tobytes())
    host = cache.plan(key, plan).with_tails(tail_lens, group)
    return host, torch.cat(tails + [torch.zeros(0, dtype=torch.int64)])


def power_of_two_at_least(x: np.ndarray) -> np.ndarray:
    """Each entry rounded up to a power of two (a batch keeps its runs while its work
    changes by less than half, as ``chunk_tokens`` does)."""
    return np.left_shift(1, np.ceil(np.log2(np.maximum(x, 1))).astype(np.int64))


def block_rows(slabs: np.ndarray, counts: np.ndarray, layers: int, hkv: int) -> np.ndarray:
    """Block table rows of ``counts`` requests' ``slabs`` (back to back) in (layer, request,
    KV head, segment) order: a block's row is ``(slab * layers + layer) * hkv + head``."""
    slabs, counts = np.asarray(slabs, dtype=np.int64), np.asarray(counts, dtype=np.int64)
    pair_len = np.repeat(counts, hkv)
    pair = np.repeat(np.arange(len(pair_len)), pair_len)
    pair_start = np.cumsum(pair_len) - pair_len
    slab_start = np.cumsum(counts) - counts
    request, head = pair // hkv, pair % hkv
    slab = slabs[slab_start[request] + np.arange(len(pair)) - pair_start[pair]]
    per_layer = slab * (layers * hkv) + head
    return (per_layer[None, :] + (np.arange(layers) * hkv)[:, None]).reshape(-1)
