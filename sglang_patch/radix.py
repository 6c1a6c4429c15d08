"""Radix cache whose nodes own sealed, compressed segments.

Built on SGLang's RadixCache: the tree's page granularity is the policy's segment size,
so every node starts and ends on a segment boundary and owns whole segments; a split
hands each side its own segments, eviction frees a node's slabs with its tokens. After
each insert the path is walked and every full segment that is neither a sink nor inside
the recent window is sealed once: a prefix shared by many requests is compressed once,
from its own keys, values and queries (nothing from any one request's suffix).

Sealing never takes the request down with it: a policy part that fails leaves that
segment dense for good (logged once per part, counted per segment), and a full arena
leaves it dense until eviction frees a slab (the next insert on its path retries).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from sglang.srt.mem_cache.base_prefix_cache import InsertParams, InsertResult, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache, TreeNode

from mosaickv.compressor import PartFailure
from mosaickv.formats import PackedBlock
from mosaickv.sglang_patch.pool import UNMAPPED, MosaicKVPool

logger = logging.getLogger(__name__)

# compress(k, v, budget_bytes, query_stats, attention) with k, v [layers, kv_heads, segment_size,
# head_dim], query_stats [layers, kv_heads, head_dim] and attention [layers, kv_heads,
# segment_size] (each None when not recorded; see query_stats.py)
# -> blocks[layer][kv_head] whose bytes sum to at most budget_bytes (the arena slab).
# A part that fails raises mosaickv.compressor.PartFailure.
CompressFn = Callable[[torch.Tensor, torch.Tensor, int, Optional[torch.Tensor], Optional[torch.Tensor]],
                      list[list[PackedBlock]]]
# node.mosaic_slabs entry of a segment whose compression failed: it stays dense, never retried.
LEFT_DENSE = -2


class MosaicRadixCache(RadixCache):
    """RadixCache + per-node sealed segments in the pool's arena."""

    def __init__(self, params: CacheInitParams, *, compress: CompressFn, segment_size: int,
                 sink_segments: int, window: int) -> None:
        pool = params.token_to_kv_pool_allocator.get_kvcache()
        if not isinstance(pool, MosaicKVPool):
            raise TypeError(f"MosaicRadixCache needs a MosaicKVPool, got {type(pool).__name__}")
        if segment_size % params.page_size:
            raise ValueError(f"page_size {params.page_size} must divide segment_size {segment_size}")
        self.pool = pool
        self.compress = compress
        self.segment_size = segment_size
        self.sink_segments = sink_segments
        self.window = window
        self.allocator_page_size = params.page_size
        params.page_size = segment_size  # tree granularity: nodes hold whole segments
        super().__init__(params)

    # -- node bookkeeping ------------------------------------------------------------
    def _slabs(self, node: TreeNode) -> list[int]:
        """Slab id per segment of ``node`` (UNMAPPED while still dense)."""
        if not hasattr(node, "mosaic_slabs"):
            node.mosaic_slabs = [UNMAPPED] * (len(node.value) // self.segment_size)
        return node.mosaic_slabs

    def _split_node(self, key, child: TreeNode, split_len: int) -> TreeNode:
        slabs = self._slabs(child)
        new_node = super()._split_node(key, child, split_len)
        cut = split_len // self.segment_size
        new_node.mosaic_slabs, child.mosaic_slabs = slabs[:cut], slabs[cut:]
        return new_node

    def _delete_leaf(self, node: TreeNode) -> None:
        for slab in getattr(node, "mosaic_slabs", []):
            if slab >= 0:
                self.pool.free_slab(slab)
        node.mosaic_slabs = []
        super()._delete_leaf(node)

    def reset(self) -> None:
        if hasattr(self, "root_node"):
            stack = [self.root_node]
            while stack:
                node = stack.pop()
                stack.extend(node.children.values())
                for slab in getattr(node, "mosaic_slabs", []):
                    if slab >= 0:
                        self.pool.free_slab(slab)
        super().reset()

    # -- sealing ----------------------------------------------------------------------
    def insert(self, params: InsertParams) -> InsertResult:
        result = super().insert(params)
        if not self.disable:
            self._seal_path(params.key)
        return result

    def _seal_path(self, key) -> None:
        """Seal every full, unsealed segment on ``key``'s path outside sinks and window."""
        match = super().match_prefix(MatchPrefixParams(key=key))
        node, chain = match.last_device_node, []
        while node is not None and node is not self.root_node:
            chain.append(node)
            node = node.parent
        total = sum(len(n.value) for n in chain)
        offset = 0
        for node in reversed(chain):
            slabs = self._slabs(node)
            for j in range(len(slabs)):
                start = offset + j * self.segment_size
                index = start // self.segment_size
                if slabs[j] != UNMAPPED or index < self.sink_segments or start + self.segment_size > total - self.window:
                    continue
                slabs[j] = self._seal(node.value[j * self.segment_size : (j + 1) * self.segment_size])
            offset += len(node.value)

    def _seal(self, slots: torch.Tensor) -> int:
        """Compress one segment's dense KV (all layers) into the arena; returns its slab,
        UNMAPPED if the arena is full (retried later) or LEFT_DENSE if a part failed."""
        pool, counters = self.pool, self.pool.counters
        if pool.arena.free_slabs == 0:
            # No over-allocation: the segment keeps its dense rows, and the allocator
            # (whose logical capacity counts those rows) makes SGLang evict.
            if counters.arena_full == 0:
                logger.warning("MosaicKV segment arena is full (%d slabs): new segments stay dense until "
                               "eviction frees slabs", pool.arena.num_slabs)
            counters.arena_full += 1
            return UNMAPPED
        first = int(slots[0])
        rows = pool.dense_rows(slots)
        # The compressor runs on the host (a side stream is the kernels issue's business).
        k = torch.stack([pool.k_buffer[i][rows] for i in range(pool.layer_num)]).transpose(1, 2).cpu()
        v = torch.stack([pool.v_buffer[i][rows] for i in range(pool.layer_num)]).transpose(1, 2).cpu()
        counters.compression_calls += 1
        try:
            blocks = self.compress(k, v, pool.plan.slab_bytes, pool.query_stats.rms(first),
                                   pool.query_stats.attention(first))
        except PartFailure as err:
            failures = counters.part_failures
            if err.part_name not in failures:
                logger.error("MosaicKV: %s; segments it fails on stay dense (logged once per part, counted in "
                             "server info: kv_compress_info.part_failures)", err)
            failures[err.part_name] = failures.get(err.part_name, 0) + 1
            pool.query_stats.drop(first)
            return LEFT_DENSE
        pages = torch.unique(slots.cpu().long() // self.allocator_page_size).tolist()
        slab = pool.seal(pages, blocks)
        pool.query_stats.drop(first)
        return slab

    def sealed_bytes(self) -> int:
        return self.pool.arena.used_bytes


def default_compress(policy, head_dim: int) -> CompressFn:
    """``mosaickv.compressor.compress_segment`` with the backend's query statistics; a plan
    over the slab is the strategy's failure (a fixed strategy may ignore the budget)."""
    from mosaickv.compressor import compress_segment

    bound = policy.bind(head_dim)

    def compress(k: torch.Tensor, v: torch.Tensor, budget_bytes: int, query_stats: Optional[torch.Tensor],
                 attention: Optional[torch.Tensor]) -> list[list[PackedBlock]]:
        blocks = compress_segment(bound, k, v, budget_bytes, query_stats=query_stats, attention=attention)
        used = sum(block.nbytes() for layer in blocks for block in layer)
        if used > budget_bytes:
            raise PartFailure("strategy", bound.strategy, f"packed {used} bytes, over the {budget_bytes}-byte slab")
        return blocks

    return compress


def mosaic_radix_factory(ctx) -> RadixCache:
    """``register_radix_cache_backend`` factory: falls back to SGLang's chain when the
    radix cache is disabled (sealed segments then belong to one request)."""
    from sglang.srt.mem_cache.registry import default_radix_cache_factory

    if ctx.disable_radix_cache:
        return default_radix_cache_factory(ctx)
    policy = ctx.server_args.mosaic_policy
    return MosaicRadixCache(
        ctx.params,
        compress=default_compress(policy, ctx.model_config.head_dim),
        segment_size=policy.segment_size,
        sink_segments=policy.sink_segments,
        window=policy.window,
    )


def register_backend() -> None:
    from sglang.srt.mem_cache.registry import registered_radix_cache_backends, register_radix_cache_backend

    if "mosaickv" not in registered_radix_cache_backends():
        register_radix_cache_backend("mosaickv", mosaic_radix_factory)

