"""Back-pressure on prefill from the dense rows, through SGLang's own prefill budget.

SGLang admits a prefill batch by logical slots (``available_size`` plus what eviction
frees), and MosaicKV must keep reporting logical slots there: SGLang's idle leak check
adds free and evictable slots up to the pool size. But a prefill batch writes its new
tokens to dense rows, which come back only when their segments seal. A backlog of long
prompts whose segments wait for sealing can hold more dense rows than are free, and the
write would fail (``dense_full``, a ``MemoryError`` in the scheduler).

So each prefill round's budget (a ``PrefillAdder``) is cut to the dense rows that are
free, after evicting least recently used cached paths for them, less one page per
running request (its next decoded token may open a page). The round's segments need
slabs too: cached paths are evicted for them first, or they would stay dense while stale
prefixes keep theirs. With nothing free, no new request is admitted this round; decoding
goes on, sealing returns rows, and a later round admits. A request already being
prefilled in chunks gets at least one page, so it never stalls on an empty chunk.
"""

from __future__ import annotations

from mosaickv.sglang_patch.pool import MosaicKVPool
from mosaickv.sglang_patch.radix import MosaicRadixCache


def dense_room(pool: MosaicKVPool, tree, running: int, wanted: int) -> int:
    """Dense rows a prefill round may write: free rows (after reclaiming up to ``wanted``
    more from cached paths) less a page per running request, in whole pages."""
    reserve = running * pool.page_size
    if pool.free_dense_tokens() - reserve < wanted and isinstance(tree, MosaicRadixCache):
        tree.reclaim_dense(wanted + reserve)
    return max(0, pool.free_dense_tokens() - reserve) // pool.page_size * pool.page_size


def prefill_budget_hook(result, adder, *args, **kwargs) -> None:
    """AFTER hook on ``PrefillAdder.__init__``: the round's input and chunk budgets
    shrink to :func:`dense_room`."""
    allocator = adder.token_to_kv_pool_allocator
    pool = allocator.get_kvcache() if allocator is not None else None
    if not isinstance(pool, MosaicKVPool):
        return
    running = len(adder.running_batch.reqs) if adder.running_batch is not None else 0
    wanted = adder.rem_input_tokens if adder.rem_chunk_tokens is None else min(adder.rem_input_tokens,
                                                                               adder.rem_chunk_tokens)
    if isinstance(adder.tree_cache, MosaicRadixCache):
        adder.tree_cache.reclaim_slabs(wanted // pool.plan.segment_size)
    room = dense_room(pool, adder.tree_cache, running, wanted)
    if room >= wanted:
        return
    pool.counters.prefill_throttled += 1
    adder.rem_input_tokens = room  # 0: budget_state says OTHER, no new request this round
    if adder.rem_chunk_tokens is not None:
        adder.rem_chunk_tokens = room
    adder.mosaic_page_floor = pool.page_size


def chunked_floor_hook(original, adder, req, *args, **kwargs):
    """AROUND hook on ``PrefillAdder.add_chunked_req``: a request already half prefilled
    advances at least a page even in a throttled round (SGLang would give it an empty
    extend otherwise); what it takes leaves nothing for new requests."""
    floor = getattr(adder, "mosaic_page_floor", None)
    if floor is not None and adder.rem_chunk_tokens is not None and adder.rem_chunk_tokens < floor:
        adder.rem_chunk_tokens = floor
    return original(adder, req, *args, **kwargs)
