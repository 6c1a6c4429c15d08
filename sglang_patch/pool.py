"""The MosaicKV token-to-KV pool: a small dense tail pool beside a compressed segment arena.

It follows SGLang's MHATokenToKVPool subclass pattern (as MHATokenToKVPoolFP4/MXFP8 do):
the base class keeps its constructor, allocator contract and per-layer write path, and
the subclass changes what the buffers are. Here ``size`` is the *logical* capacity the
scheduler admits; only ``plan.dense_tail_tokens`` rows are dense. A page table maps each
logical page to a dense page (tail) or to an arena slab (sealed segment).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.model_executor.pool_configurator import DefaultPoolConfigurator, MemoryPoolConfig

import numpy as np

from mosaickv.formats import VALUE_DTYPE, PackedBlock, unpack_block
from mosaickv.kernels.layout import TABLE_FIELDS, Region, pack_region, read_block, unaligned_blocks
from mosaickv.kernels.block_runs import RunCache, pack_entries
from mosaickv.policies.strategies import knapsack_on_gpu
from mosaickv.uploads import upload
from mosaickv.sglang_patch.decode_rows import DecodeRows
from mosaickv.sglang_patch.query_stats import SegmentQueryStats
from mosaickv.sglang_patch.args import KVCompressError
from mosaickv.sglang_patch.sizing import CapacityPlan, KVShape, cap_plan, plan_capacity, prefill_batch_tokens
from mosaickv.sglang_patch.sync_census import census_from_env

logger = logging.getLogger(__name__)

UNMAPPED = -1
DEFAULT_SEGMENT_CACHE_BYTES = 1 << 30

SegmentKV = torch.Tensor | list[torch.Tensor]
"""Densified keys (or values) of one layer of a sealed segment: ``[m, Hkv, d]`` when every
KV head kept ``m`` tokens, else one ``[m_h, d]`` per KV head (heads drop tokens apart)."""


@dataclass
class SegmentArena:
    """Fixed-size slabs in one byte tensor; a slab holds one sealed segment (all layers,
    KV heads) in the kernels' layout (:func:`mosaickv.kernels.layout.place_region`): the
    attention kernels read ``values`` (the bf16 view) and ``data`` in place."""

    num_slabs: int
    slab_bytes: int
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.slab_bytes % 16:
            raise ValueError(f"slab_bytes {self.slab_bytes} is not a multiple of 16")
        self.data = torch.zeros(max(self.num_slabs, 1) * self.slab_bytes, dtype=torch.uint8, device=self.device)
        self.values = self.data.view(VALUE_DTYPE)
        self._free = list(range(self.num_slabs - 1, -1, -1))
        self.used_bytes = 0  # bytes actually written into live slabs (<= slabs x slab_bytes)
        self._written: dict[int, int] = {}

    @property
    def live_slabs(self) -> int:
        return self.num_slabs - len(self._free)

    @property
    def free_slabs(self) -> int:
        return len(self._free)

    def alloc(self) -> int:
        if not self._free:
            raise MemoryError(f"segment arena is full ({self.num_slabs} slabs); evict before sealing")
        slab = self._free.pop()
        self._written[slab] = 0
        return slab

    def base(self, slab: int) -> int:
        """Byte offset of a slab in ``data``."""
        return slab * self.slab_bytes

    def write(self, slab: int, payload: torch.Tensor) -> None:
        """Copy ``payload`` (uint8) to the start of an allocated slab."""
        self.write_many([slab], [payload])

    def write_many(self, slabs: list[int], payloads: list[torch.Tensor]) -> None:
        """Copy each payload (uint8) to the start of its allocated slab, in one fused copy
        (``_foreach_copy_``): a sealing call installs up to 256 segments, and a copy each
        was a launch each. Every size is checked before anything is written."""
        sizes = [p.numel() for p in payloads]
        for size in sizes:
            if size > self.slab_bytes:
                raise ValueError(
                    f"sealed segment of {size} bytes exceeds the slab size {self.slab_bytes} "
                    "(the compressor must keep each segment within the policy's byte budget)"
                )
        if not payloads:
            return
        targets = [self.data[self.base(slab) : self.base(slab) + size] for slab, size in zip(slabs, sizes)]
        torch._foreach_copy_(targets, [p.reshape(-1).to(self.device) for p in payloads])
        for slab, size in zip(slabs, sizes):
            self.used_bytes += size - self._written[slab]
            self._written[slab] = size

    def view(self, slab: int) -> torch.Tensor:
        """The bytes a slab holds (its payload, without the unused rest)."""
        return self.data[self.base(slab) : self.base(slab) + self._written[slab]]

    def free(self, slab: int) -> None:
        self.used_bytes -= self._written.pop(slab)
        self._free.append(slab)


def densify_layer(blocks: list[PackedBlock], dtype: torch.dtype) -> tuple[SegmentKV, SegmentKV]:
    """Kept keys and values of one layer's blocks (one per KV head) in ``dtype``, where the
    blocks are; see :data:`SegmentKV`."""
    ks, vs = zip(*((k.to(dtype), v.to(dtype)) for k, v in map(unpack_block, blocks)))
    if len({k.shape[0] for k in ks}) == 1:
        return torch.stack(ks, dim=1), torch.stack(vs, dim=1)
    return list(ks), list(vs)


def _nbytes(kv: SegmentKV) -> int:
    return sum(t.numel() * t.element_size() for t in ([kv] if isinstance(kv, torch.Tensor) else kv))


class SegmentKVCache:
    """Densified sealed segments per (slab, layer), least recently used out first, at most
    ``limit`` bytes: decoding every layer of every segment each step would cost more than
    the attention that reads them. An entry larger than ``limit`` is not kept."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[tuple[int, int], tuple[SegmentKV, SegmentKV, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[int, int]) -> Optional[tuple[SegmentKV, SegmentKV]]:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry[0], entry[1]

    def put(self, key: tuple[int, int], k: SegmentKV, v: SegmentKV) -> None:
        size = _nbytes(k) + _nbytes(v)
        if size > self.limit:
            return
        while self.bytes + size > self.limit:
            self.bytes -= self._entries.popitem(last=False)[1][2]
        self._entries[key] = (k, v, size)
        self.bytes += size

    def drop(self, key: tuple[int, int]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[2]


# A segment pending longer than this means sealing is stalled (a hung worker, a backlog
# far beyond what the workers seal): server info says so; requests keep reading dense rows.
SEALING_STALL_S = 60.0


@dataclass
class SealingCounters:
    """What sealing did in this process, for ``kv_compress_info`` (the radix cache counts)."""

    compression_calls: int = 0  # segments handed to the compressor
    part_failures: dict[str, int] = field(default_factory=dict)  # part name -> segments left dense
    arena_full: int = 0  # seal attempts deferred because no slab was free
    worker_errors: int = 0  # segments left dense because the compressor raised (not a PartFailure)
    pending_since: dict[int, float] = field(default_factory=dict)  # first slot -> time.monotonic() at submit
    dense_reclaims: int = 0  # times the tree evicted cached paths to free dense rows
    slab_reclaims: int = 0  # times the tree evicted cached paths to free slabs for a prefill round
    dense_full: int = 0  # writes that found no dense row even after that (a MemoryError each)
    decode_inserts: int = 0  # running requests' decoded segments inserted (sealed) before they finished
    prefill_throttled: int = 0  # prefill rounds whose budget was cut to the free dense rows (admission.py)
    inline_seal_seconds: float = 0.0  # wall time the scheduler spent sealing inline (--kv-compress-sealing device)
    thread_seal_seconds: float = 0.0  # wall time the sealing thread spent sealing (--kv-compress-sealing device-thread)
    seal_deferrals: int = 0  # middle prefill chunks whose segments stayed dense until the prompt's last chunk
    waiting_for_slots: int = 0  # due segments whose slot values' copy has not passed yet (the radix cache's)


class MosaicKVPool(MHATokenToKVPool):
    """Dense tail pool (``plan.dense_tail_tokens`` rows) plus a :class:`SegmentArena`
    and its block table: row ``(slab * layers + layer) * kv_heads + kv_head`` describes
    one stored block (:data:`mosaickv.kernels.layout.TABLE_FIELDS`), on the device for
    the kernels and on the host for planning."""

    def __init__(self, size: int, page_size: int, dtype: torch.dtype, head_num: int, head_dim: int,
                 layer_num: int, device: str, enable_memory_saver: bool, *, plan: CapacityPlan,
                 attention_window: int = 0, segment_cache_bytes: int = DEFAULT_SEGMENT_CACHE_BYTES,
                 **kwargs) -> None:
        """``attention_window``: the policy token scorer's, so that the attention backend
        records what it reads at sealing (see :mod:`mosaickv.sglang_patch.query_stats`).
        ``segment_cache_bytes``: device memory for densified sealed segments (outside the
        KV budget), see :class:`SegmentKVCache`."""
        if size != plan.max_total_num_tokens:
            raise ValueError(f"pool size {size} differs from the plan's {plan.max_total_num_tokens} tokens")
        self.plan = plan  # read by _kv_buffer_shapes during the base constructor
        self.attention_window = attention_window
        self.segment_cache_bytes = segment_cache_bytes  # read by _create_buffers during the base constructor
        super().__init__(size, page_size, dtype, head_num, head_dim, layer_num, device, enable_memory_saver,
                         **kwargs)
        if self.head_dim != self.v_head_dim:
            raise ValueError(f"MosaicKV needs head_dim == v_head_dim, got {self.head_dim} and {self.v_head_dim}")
        self.sync_census = census_from_env()  # MOSAICKV_SYNC_CENSUS=1: where this process waits for the GPU

    def _create_buffers(self) -> None:
        """The base dense buffers (tail rows only, see _kv_buffer_shapes), page tables, arena."""
        super()._create_buffers()
        num_pages = (self.size + self.page_size) // self.page_size
        self.page_to_dense = torch.full((num_pages,), UNMAPPED, dtype=torch.int64)
        self.page_to_slab = torch.full((num_pages,), UNMAPPED, dtype=torch.int64)
        self.page_to_dense[0] = 0  # the padding page absorbs dummy writes, as in the base pool
        self._prepared: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # prepare_writes
        # Frees at least this many dense rows if it can (the tree cache evicts cached paths).
        self.dense_reclaimer: Optional[Callable[[int], None]] = None
        self._free_dense = self._all_dense_pages()
        self.arena = SegmentArena(self.plan.num_slabs, self.plan.slab_bytes, self.device)
        rows = max(self.plan.num_slabs, 1) * self.layer_num * self.head_num
        self.block_table = torch.zeros((rows, len(TABLE_FIELDS)), dtype=torch.int64, device=self.device)
        self.block_table_host = np.zeros((rows, len(TABLE_FIELDS)), dtype=np.int64)
        self.block_entries_host = pack_entries(self.block_table_host)  # what plans find runs from (block_runs)
        self._slab_pages: dict[int, list[int]] = {}
        self._unaligned_slabs: set[int] = set()  # slabs with a width the kernels cannot vector-load
        self.slab_generation = np.zeros(max(self.plan.num_slabs, 1), dtype=np.int64)  # segments each slab has held
        self.run_cache = RunCache()  # requests' block runs between plans (forward_inputs.host_plan)
        self.segment_cache = SegmentKVCache(self.segment_cache_bytes)
        self.query_stats = self._new_query_stats()
        self.counters = SealingCounters()
        self.decode_rows = DecodeRows()

    def _all_dense_pages(self) -> list[int]:
        return list(range(self.plan.dense_tail_tokens // self.page_size, 0, -1))

    def _new_query_stats(self) -> SegmentQueryStats:
        return SegmentQueryStats(self.layer_num, self.head_num, self.head_dim, self.plan.segment_size,
                                 self.attention_window, device=self.device)

    def release_all(self) -> None:
        """The allocator's ``clear`` (``/flush_cache``, after the tree's reset freed its
        slabs): every slot is free, so every dense page and all query statistics go, and
        any slab still mapped (a tree that did not own it) is freed."""
        for slab in list(self._slab_pages):
            self.free_slab(slab)
        self.page_to_dense[1:] = UNMAPPED
        self._free_dense = self._all_dense_pages()
        self.query_stats = self._new_query_stats()
        self.run_cache.clear()

    def _kv_buffer_shapes(self):
        rows = self.plan.dense_tail_tokens + self.page_size
        return (rows, self.head_num, self.head_dim), (rows, self.head_num, self.v_head_dim)

    # -- logical -> dense translation --------------------------------------------------
    def map_pages(self, pages: torch.Tensor) -> None:
        """Give dense pages to logical pages that have none (host side)."""
        pages = torch.unique(pages.cpu())
        missing = pages[self.page_to_dense[pages] == UNMAPPED]
        if len(missing) > len(self._free_dense) and self.dense_reclaimer is not None:
            self.dense_reclaimer(len(missing) * self.page_size)
        if len(missing) > len(self._free_dense):
            self.counters.dense_full += 1
            raise MemoryError(
                f"dense tail pool is full: {len(missing)} pages needed, {len(self._free_dense)} free "
                f"(it holds {self.plan.max_running_requests} requests' tails)"
            )
        for page in missing.tolist():
            if self.page_to_slab[page] != UNMAPPED:
                raise ValueError(f"logical page {page} is sealed; sealed segments are immutable")
            self.page_to_dense[page] = self._free_dense.pop()

    def free_dense_tokens(self) -> int:
        return len(self._free_dense) * self.page_size

    def dense_rows(self, loc: torch.Tensor) -> torch.Tensor:
        """Dense row of each logical slot in ``loc`` (mapping its page if needed)."""
        slots = loc.cpu().long()
        pages = slots // self.page_size
        self.map_pages(pages)
        return upload(self.page_to_dense[pages] * self.page_size + slots % self.page_size, loc.device)

    def prepare_writes(self, loc: Optional[torch.Tensor], rows: Optional[torch.Tensor] = None) -> None:
        """Map a forward's write slots ``loc`` (its ``out_cache_loc``) to dense rows once,
        for every layer's write of that tensor: mapping at each layer cost a host round
        trip per layer. Called before every forward (the tensor may be reused). ``rows``:
        the mapping, already computed into a buffer a CUDA graph captures."""
        self._prepared = None if loc is None else (loc, self.dense_rows(loc) if rows is None else rows)

    def _store_kv_layer(self, layer_idx: int, loc: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor):
        prepared = self._prepared
        rows = prepared[1] if prepared is not None and prepared[0] is loc else self.dense_rows(loc)
        super()._store_kv_layer(layer_idx, rows, cache_k, cache_v)

    # -- sealing and freeing -------------------------------------------------------------
    def table_row(self, slab: int, layer: int) -> int:
        """Block table row of KV head 0 of a slab's (local) ``layer``."""
        return (slab * self.layer_num + layer) * self.head_num

    @property
    def widths_aligned(self) -> bool:
        """Every live block's non-dense width is a multiple of 8 (the kernels' vector loads)."""
        return not self._unaligned_slabs

    def seal(self, pages: list[int], blocks: list[list[PackedBlock]]) -> int:
        """Store one segment (``blocks[layer][kv_head]``) in a new slab; see :meth:`install`."""
        if len(blocks) != self.layer_num or any(len(layer) != self.head_num for layer in blocks):
            raise ValueError(f"a segment needs blocks[{self.layer_num} layers][{self.head_num} kv heads]")
        slab = self.arena.alloc()
        try:
            self.install(slab, pages, pack_region([b for layer in blocks for b in layer], self.head_dim,
                                                  self.arena.base(slab)))
        except Exception:
            self.arena.free(slab)
            raise
        return slab

    def install(self, slab: int, pages: list[int], region: Region) -> None:
        """Write a segment packed for ``slab`` (allocated by the caller, who frees it if
        this raises) into it; its dense pages return.

        ``pages`` are the logical pages the segment covers; they stay allocated to the
        scheduler (the tokens still exist) but now read from the slab.
        """
        self.install_many([slab], [pages], [region])

    def install_many(self, slabs: list[int], pages: list[list[int]], regions: list[Region]) -> None:
        """:meth:`install` for many segments: their bytes in one fused copy and their table
        rows in one scatter (a sealing call's, up to 256). All are checked before any is
        written."""
        blocks = self.layer_num * self.head_num
        for slab, segment_pages, region in zip(slabs, pages, regions):
            if len(segment_pages) * self.page_size != self.plan.segment_size:
                raise ValueError(f"{len(segment_pages)} pages of {self.page_size} tokens are not one segment of "
                                 f"{self.plan.segment_size}")
            if region.table.shape != (blocks, len(TABLE_FIELDS)):
                raise ValueError(f"a sealed segment has {blocks} table rows ({self.layer_num} layers x "
                                 f"{self.head_num} kv heads), got {region.table.shape[0]}")
            if region.base_bytes != self.arena.base(slab):
                raise ValueError(f"segment packed for arena offset {region.base_bytes}, slab {slab} starts at "
                                 f"{self.arena.base(slab)}")
        if not slabs:
            return
        self.arena.write_many(slabs, [region.data for region in regions])
        at = np.asarray(slabs, dtype=np.int64)
        self.slab_generation[at] += 1
        rows = (at[:, None] * blocks + np.arange(blocks)).reshape(-1)  # table_row(slab, 0) onwards
        tables = np.concatenate([region.table for region in regions])
        self.block_table_host[rows] = tables
        self.block_entries_host[rows] = pack_entries(tables)
        self.block_table[upload(rows, self.device)] = upload(tables, self.device)  # not a stream sync per segment
        unaligned = unaligned_blocks(tables).reshape(len(slabs), blocks).any(axis=1)
        self._unaligned_slabs.update(at[unaligned].tolist())
        for slab, segment_pages in zip(slabs, pages):
            for page in segment_pages:
                dense = int(self.page_to_dense[page])
                if dense > 0:
                    self._free_dense.append(dense)
                self.page_to_dense[page] = UNMAPPED
                self.page_to_slab[page] = slab
            self._slab_pages[slab] = list(segment_pages)

    def _read_layer(self, slab: int, local: int) -> list[PackedBlock]:
        row = self.table_row(slab, local)
        return [read_block(self.arena.values, self.arena.data, self.block_table_host[row + h], self.head_dim,
                           self.plan.segment_size) for h in range(self.head_num)]

    def read_segment(self, slab: int) -> list[list[PackedBlock]]:
        """``blocks[layer][kv_head]`` of a sealed segment, rebuilt from the arena bytes on
        the arena's device."""
        return [self._read_layer(slab, local) for local in range(self.layer_num)]

    def segment_kv(self, slab: int, layer_id: int) -> tuple[SegmentKV, SegmentKV]:
        """Kept keys and values of layer ``layer_id`` of a sealed segment, densified in the
        pool's dtype on its device (the dense format exactly as it was written), through
        :attr:`segment_cache`."""
        key = (slab, layer_id - self.start_layer)
        kv = self.segment_cache.get(key)
        if kv is None:
            kv = densify_layer(self._read_layer(*key), self.dtype)
            self.segment_cache.put(key, *kv)
        return kv

    def free_slab(self, slab: int) -> None:
        """Release a sealed segment's bytes (its logical pages are freed by the allocator)."""
        for page in self._slab_pages.pop(slab):
            self.page_to_slab[page] = UNMAPPED
        self._unaligned_slabs.discard(slab)
        for local in range(self.layer_num):
            self.segment_cache.drop((slab, local))
        self.arena.free(slab)

    def release_pages(self, loc: torch.Tensor) -> None:
        """Called when the allocator frees logical slots: their dense pages return and
        the query statistics of segments they started go (the slots will be reused). The
        slots are read to the host once, and not at all when there are none (SGLang frees
        empty ranges after most prefill chunks; a read waits for the forward in flight)."""
        if not loc.numel():
            return
        host = loc.cpu().long()
        self.query_stats.release(host)
        pages = torch.unique(host // self.page_size)
        pages = pages[pages > 0]
        for page in pages[self.page_to_dense[pages] != UNMAPPED].tolist():
            self._free_dense.append(int(self.page_to_dense[page]))
            self.page_to_dense[page] = UNMAPPED

    def get_kv_size_bytes(self):
        k, v = super().get_kv_size_bytes()
        half = self.arena.data.numel() // 2
        table = self.block_table.numel() * self.block_table.element_size()
        return k + half + self.page_to_dense.numel() * 8 + table // 2, v + (self.arena.data.numel() - half) \
            + self.page_to_slab.numel() * 8 + table - table // 2

    def stats(self) -> dict:
        """What the server-info hook reports: capacity, bytes per token, achieved ratio."""
        dense_used_pages = self.plan.dense_tail_tokens // self.page_size - len(self._free_dense)
        sealed_tokens = self.arena.live_slabs * self.plan.segment_size
        dense_equiv = sealed_tokens * self.plan.dense_bytes_per_token
        pending = self.counters.pending_since.values()
        oldest = time.monotonic() - min(pending) if pending else 0.0
        return {
            "kv_compress": "mosaickv",
            "max_total_num_tokens": self.size,
            "dense_tail_tokens": self.plan.dense_tail_tokens,
            "dense_tail_tokens_in_use": dense_used_pages * self.page_size,
            "sealed_segments": self.arena.live_slabs,
            "sealed_tokens": sealed_tokens,
            "arena_bytes": self.arena.data.numel(),
            "arena_bytes_written": self.arena.used_bytes,
            "planned_bytes_per_token": self.plan.bytes_per_token,
            "dense_bytes_per_token": self.plan.dense_bytes_per_token,
            "capacity_gain": self.plan.capacity_gain,
            "achieved_ratio": dense_equiv / self.arena.used_bytes if self.arena.used_bytes else None,
            "free_slabs": self.arena.free_slabs,
            "compression_calls": self.counters.compression_calls,
            "part_failures": dict(self.counters.part_failures),
            "arena_full": self.counters.arena_full,
            "worker_errors": self.counters.worker_errors,
            "dense_reclaims": self.counters.dense_reclaims,
            "slab_reclaims": self.counters.slab_reclaims,
            "dense_full": self.counters.dense_full,
            "decode_inserts": self.counters.decode_inserts,
            "prefill_throttled": self.counters.prefill_throttled,
            "inline_seal_seconds": round(self.counters.inline_seal_seconds, 3),
            "thread_seal_seconds": round(self.counters.thread_seal_seconds, 3),
            "seal_deferrals": self.counters.seal_deferrals,
            "knapsack_on_gpu": knapsack_on_gpu(),  # MOSAICKV_KNAPSACK: a run's record of which one sealed on the device
            "plan_run_hits": self.run_cache.hits,  # requests whose block runs a plan reused (RunCache)
            "plan_run_misses": self.run_cache.misses,
            "plan_run_extends": self.run_cache.extends,  # of those misses, requests' blocks extended by one segment
            # decode forwards whose token rows were copied beside the scheduler's allocation
            # (DecodeRows), and those that read them themselves, after the previous step
            "decode_rows_prefetched": self.decode_rows.prefetched,
            "decode_rows_read_in_forward": self.decode_rows.read_in_forward,
            # Handed to sealing and not swapped in, or due and waiting for their slots' copy:
            # a client that waits for a sealed prefix (server_info.wait_sealed) waits for both.
            "sealing_pending": len(pending) + self.counters.waiting_for_slots,
            "sealing_waiting_for_slots": self.counters.waiting_for_slots,
            # A stalled worker shows here: sealing degrades to dense, the scheduler does not wait.
            "oldest_pending_s": oldest,
            "sealing_stalled": oldest > SEALING_STALL_S,
            "segment_cache_bytes_in_use": self.segment_cache.bytes,
            "segment_cache_limit_bytes": self.segment_cache.limit,
            "segment_cache_entries": len(self.segment_cache),
            "segment_cache_hits": self.segment_cache.hits,
            "segment_cache_misses": self.segment_cache.misses,
            **({"sync_census": self.sync_census.top()} if self.sync_census is not None else {}),
        }


# -- SGLang sizing hooks -------------------------------------------------------------------
def kv_shape_of(kvc) -> KVShape:
    """KV geometry of this rank from SGLang's KVCacheConfigurator."""
    from sglang.srt.runtime_context import get_parallel

    return KVShape(
        num_layers=kvc.layer_info.num_effective_layers,
        num_kv_heads=kvc.model_config.get_num_kv_heads(get_parallel().attn_tp_size),
        head_dim=kvc.model_config.head_dim,
        v_head_dim=kvc.model_config.v_head_dim,
        dtype_bytes=torch._utils._element_size(kvc.kv_cache_dtype),
    )


_PLANS: dict[int, CapacityPlan] = {}  # id(KVCacheConfigurator) -> plan, from sizing to pool building


class MosaicPoolConfigurator(DefaultPoolConfigurator):
    """Turns the KV budget into logical capacity with :func:`plan_capacity`.

    SGLang builds a fresh configurator for sizing and another for finalizing, so the
    plan is kept per KVCacheConfigurator for the second one and for the pool builder.
    """

    def __init__(self, kvc) -> None:
        super().__init__(kvc)
        self.shape = kv_shape_of(kvc)
        self.policy = kvc.server_args.mosaic_policy
        self.max_running_requests = kvc.server_args.max_running_requests
        self.prefill_tokens = prefill_batch_tokens(kvc.server_args)
        self._key = id(kvc)

    @property
    def plan(self) -> Optional[CapacityPlan]:
        return _PLANS.get(self._key)

    def calculate_pool_sizes(self, available_bytes: int, page_size: int) -> MemoryPoolConfig:
        p = self.policy
        plan = plan_capacity(self.shape, available_bytes, segment_size=p.segment_size, ratio=float(p.ratio),
                             sinks=p.sinks, window=p.window, page_size=page_size,
                             max_running_requests=self.max_running_requests, prefill_tokens=self.prefill_tokens)
        _PLANS[self._key] = plan
        return MemoryPoolConfig(max_total_num_tokens=plan.max_total_num_tokens)

    def calculate_pool_sizes_from_max_tokens(self, max_total_num_tokens: int, page_size: int) -> MemoryPoolConfig:
        """A user cap (--max-total-tokens) on the plan the budget gave (SGLang sizes from
        the budget first)."""
        tokens = max_total_num_tokens // page_size * page_size
        try:
            plan = cap_plan(_PLANS[self._key], tokens, running_fixed=self.max_running_requests is not None)
        except ValueError as err:
            raise KVCompressError(str(err)) from None
        _PLANS[self._key] = plan
        return MemoryPoolConfig(max_total_num_tokens=plan.max_total_num_tokens)

    def finalize_with_max_running_requests(self, config: MemoryPoolConfig) -> MemoryPoolConfig:
        if self.plan is not None and config.max_running_requests is not None:
            config.max_running_requests = min(config.max_running_requests, self.plan.max_running_requests)
        return config


def _enabled(server_args) -> bool:
    return getattr(server_args, "kv_compress", "none") == "mosaickv"


def create_configurator_hook(original, kvc):
    """AROUND hook on create_memory_pool_configurator: our configurator when enabled."""
    return MosaicPoolConfigurator(kvc) if _enabled(kvc.server_args) else original(kvc)


def build_mha_kv_pool_hook(original, kvc, *, max_total_num_tokens: int, mha_pool_class: type, quant_method=None):
    """AROUND hook on KVCacheConfigurator._build_mha_kv_pool: build a MosaicKVPool."""
    if not _enabled(kvc.server_args):
        return original(kvc, max_total_num_tokens=max_total_num_tokens, mha_pool_class=mha_pool_class,
                        quant_method=quant_method)
    if kvc.post_capture_kv_active:
        raise RuntimeError("post-capture KV backing cannot back the MosaicKV arena; turn it off")
    from sglang.srt.runtime_context import get_exec

    plan = _PLANS[id(kvc)]
    pool = MosaicKVPool(
        max_total_num_tokens,
        page_size=kvc.pool_page_size,
        dtype=kvc.kv_cache_dtype,
        head_num=kv_shape_of(kvc).num_kv_heads,
        head_dim=kvc.model_config.head_dim,
        v_head_dim=kvc.model_config.v_head_dim,
        layer_num=kvc.layer_info.num_effective_layers,
        device=kvc.device,
        enable_memory_saver=get_exec().features.enable_memory_saver,
        start_layer=kvc.layer_info.start_layer,
        end_layer=kvc.layer_info.end_layer,
        enable_alt_stream=False,
        plan=plan,
        attention_window=kvc.server_args.mosaic_policy.token_scorer.attention_window,
    )
    log_startup(pool, kvc.server_args.mosaic_policy.name)
    return pool


def log_startup(pool: MosaicKVPool, policy_name: str) -> None:
    """One line per pool at startup: what a token costs and how much more fits."""
    plan = pool.plan
    logger.info(
        "MosaicKV policy %r: %.1f bytes/token planned (dense %d, %.2fx fewer), sealed segments %.1f bytes/token; "
        "capacity %d tokens (%.2fx the dense pool), %d slabs, dense tails for %d requests; "
        "this rank holds %d KV heads of %d in %d layers",
        policy_name, plan.bytes_per_token, plan.dense_bytes_per_token,
        plan.dense_bytes_per_token / plan.bytes_per_token, plan.sealed_bytes_per_token,
        plan.max_total_num_tokens, plan.capacity_gain, plan.num_slabs, plan.max_running_requests,
        pool.head_num, pool.head_dim, pool.layer_num,
    )


def allocator_free_hook(original, allocator, free_index: torch.Tensor, *args, **kwargs):
    """AROUND hook on the token allocators' ``free``: freed slots give back dense pages."""
    pool = allocator.get_kvcache()
    if isinstance(pool, MosaicKVPool) and free_index.numel():
        pool.release_pages(free_index)
    return original(allocator, free_index, *args, **kwargs)


def decode_prefetch_hook(result, batch, *args, **kwargs):
    """AFTER hook on ``ScheduleBatch.prepare_for_decode``: copy the batch's token rows to
    the host beside the allocation that wrote them (see :mod:`.decode_rows`). Speculative
    decoding prepares its own steps: nothing is prefetched for them."""
    allocator = getattr(batch, "token_to_kv_pool_allocator", None)
    pool = allocator.get_kvcache() if allocator is not None else None
    if isinstance(pool, MosaicKVPool):
        if batch.spec_algorithm.is_none() and batch.seq_lens_cpu is not None:
            pool.decode_rows.prefetch(batch.req_to_token_pool.req_to_token, batch.req_pool_indices,
                                      batch.seq_lens_cpu.tolist())
        else:
            pool.decode_rows.discard()
    return result


def allocator_clear_hook(original, allocator, *args, **kwargs):
    """AROUND hook on the token allocators' ``clear``, which frees every slot without
    ``free`` (``Scheduler.flush_cache``): the pool's dense pages come back too."""
    pool = allocator.get_kvcache()
    if isinstance(pool, MosaicKVPool):
        pool.release_all()
    return original(allocator, *args, **kwargs)


def kv_compress_info(pool: MosaicKVPool) -> dict:
    """Server-info payload of a MosaicKV pool (its :meth:`MosaicKVPool.stats`).

    Plain ints, floats, strings and dicts only: it crosses the scheduler's msgpack channel.
    """
    return pool.stats()


def internal_state_hook(result, scheduler, *args, **kwargs):
    """AFTER hook on ``Scheduler.get_internal_state``: add ``kv_compress_info`` to what
    ``/server_info`` (and ``/get_server_info``, ``Engine.get_server_info``) list under
    ``internal_states`` (``kv_compress`` there is already the flag's value)."""
    pool = scheduler.token_to_kv_pool_allocator.get_kvcache()
    if isinstance(pool, MosaicKVPool):
        result.internal_state["kv_compress_info"] = kv_compress_info(pool)
    return result
