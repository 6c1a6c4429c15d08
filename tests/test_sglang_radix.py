"""MosaicRadixCache on SGLang's real RadixCache, pools and allocator (CPU)."""

from __future__ import annotations

from array import array
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.plugins import load_plugins  # noqa: E402

load_plugins()

from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams  # noqa: E402
from sglang.srt.mem_cache.cache_init_params import CacheInitParams  # noqa: E402
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixKey  # noqa: E402
from sglang.srt.mem_cache.registry import get_radix_cache_factory  # noqa: E402

from mosaickv.compressor import prices_lowrank  # noqa: E402
from mosaickv.config import load_policy  # noqa: E402
from mosaickv.formats import HEADER_BYTES  # noqa: E402
from mosaickv.sealer import seal_segment  # noqa: E402
from mosaickv.sglang_patch.pool import MosaicKVPool  # noqa: E402
from mosaickv.sglang_patch.radix import (  # noqa: E402
    DECODE_SEAL_BATCH,
    LOWRANK_FREE_WORKSPACE_SHARE,
    MAX_SEAL_BATCH,
    SEAL_BATCH,
    MosaicRadixCache,
    default_seal_batch,
    mosaic_radix_factory,
)
from mosaickv.sglang_patch.sizing import KVShape, plan_capacity  # noqa: E402
from seal_compressors import FMT, SEG, CountingCompressor, RecordingCompressor  # noqa: E402

WINDOW = 16
SHAPE = KVShape(num_layers=2, num_kv_heads=2, head_dim=32, v_head_dim=32)


def make_cache(compress, background: bool = False, workers: int = 1, on_device: bool = False, seal_inline=None,
               defer_margin: int = 0, decode_batch: int = 1, seal_batch: int = SEAL_BATCH, device: str = "cpu",
               seal_thread: bool = False):
    """(tree, pool, allocator) on SGLang's real allocator, sealing with ``compress``
    (inline unless ``background``: worker processes; ``on_device``: inline where the pool
    is, which is ``device``, or on a thread with ``seal_thread``)."""
    plan = plan_capacity(SHAPE, 1 << 20, segment_size=SEG, ratio=2.0, sinks=0, window=WINDOW,
                         max_running_requests=4)
    pool = MosaicKVPool(plan.max_total_num_tokens, page_size=1, dtype=torch.bfloat16, head_num=2, head_dim=32,
                        layer_num=2, device=device, enable_memory_saver=False, plan=plan, enable_alt_stream=False)
    alloc = TokenToKVPoolAllocator(plan.max_total_num_tokens, torch.bfloat16, device, pool, need_sort=False)
    params = CacheInitParams(disable=False, req_to_token_pool=ReqToTokenPool(4, 512, device, False),
                             token_to_kv_pool_allocator=alloc, page_size=1)
    tree = MosaicRadixCache(params, compress=compress, segment_size=SEG, sink_segments=0, window=WINDOW,
                            background=background, workers=workers, on_device=on_device, seal_inline=seal_inline,
                            defer_margin=defer_margin, decode_batch=decode_batch, seal_batch=seal_batch,
                            seal_thread=seal_thread)
    return tree, pool, alloc


@pytest.fixture
def cache():
    compressor = CountingCompressor()
    return (*make_cache(compressor), compressor)


def prefill(pool, alloc, n: int) -> torch.Tensor:
    slots = alloc.alloc(n)
    kv = torch.randn(n, 2, 32, dtype=torch.bfloat16).to(slots.device)
    for layer in range(2):
        pool._store_kv_layer(layer, slots, kv, kv * 2)
    return slots


def test_factory_is_registered_with_sglang():
    assert get_radix_cache_factory("mosaickv") is mosaic_radix_factory


@pytest.mark.parametrize("sealing, seal_batch", [("processes", None), ("device", None), ("device", 64),
                                                  ("device-thread", None)])
def test_factory_seals_as_the_sealing_flag_says(sealing, seal_batch):
    from mosaickv.config import load_policy

    _, pool, alloc = make_cache(CountingCompressor())
    params = CacheInitParams(disable=False, req_to_token_pool=ReqToTokenPool(4, 512, "cpu", False),
                             token_to_kv_pool_allocator=alloc, page_size=1)
    args = SimpleNamespace(mosaic_policy=load_policy("mosaic"), kv_compress_sealing=sealing, kv_compress_workers=1,
                           kv_compress_seal_batch=seal_batch, chunked_prefill_size=4096, max_prefill_tokens=16384)
    tree = mosaic_radix_factory(SimpleNamespace(disable_radix_cache=False, server_args=args, params=params,
                                                model_config=SimpleNamespace(head_dim=32)))
    on_device = sealing != "processes"
    assert tree.on_device == on_device and (tree._workers is None) == on_device
    assert (tree._thread is not None) == (sealing == "device-thread")
    assert tree.defer_margin == 4096  # room for the next chunk
    assert tree.seal_batch == (seal_batch or MAX_SEAL_BATCH)  # this pool's segments are tiny
    # Decoded segments seal a call's worth at a time on the device, eight to the workers.
    assert tree.decode_batch == (tree.seal_batch if on_device else DECODE_SEAL_BATCH) > 1


def test_default_seal_batch_keeps_the_workspace_of_32_8b_segments():
    shape = lambda layers, heads, d: SimpleNamespace(layer_num=layers, head_num=heads, head_dim=d)  # noqa: E731
    assert default_seal_batch(shape(32, 8, 128), 32) == SEAL_BATCH == 32  # Llama-8B: the measured default
    assert default_seal_batch(shape(30, 3, 64), 32) == 182  # SmolLM2-135M: 5.7x smaller segments
    assert default_seal_batch(shape(32, 4, 128), 32) == 64  # 8B at --tp 2: half the heads per rank
    assert default_seal_batch(shape(80, 8, 128), 32) == SEAL_BATCH  # larger models keep 32
    assert default_seal_batch(shape(2, 2, 32), 16) == MAX_SEAL_BATCH


def test_a_policy_without_low_rank_seals_more_segments_a_call():
    """It needs about a quarter of the workspace a segment, so the default call takes
    LOWRANK_FREE_WORKSPACE_SHARE times the segments, still within MAX_SEAL_BATCH."""
    shape = lambda layers, heads, d: SimpleNamespace(layer_num=layers, head_num=heads, head_dim=d)  # noqa: E731
    assert default_seal_batch(shape(32, 8, 128), 32, lowrank=False) == SEAL_BATCH * LOWRANK_FREE_WORKSPACE_SHARE
    assert default_seal_batch(shape(80, 8, 128), 32, lowrank=False) == 51  # 80 layers: 128 x 32 / 80
    assert default_seal_batch(shape(30, 3, 64), 32, lowrank=False) == MAX_SEAL_BATCH
    root = Path(__file__).parents[1]
    assert prices_lowrank(load_policy("mosaic"), 128)
    assert prices_lowrank(load_policy("mosaic_heads"), 64)  # through HeadWise's inner strategy
    assert not prices_lowrank(load_policy(str(root / "benchmarks/sealing/mosaic_no_lowrank.yaml")), 128)
    assert not prices_lowrank(load_policy(str(root / "benchmarks/sealing/mosaic_heads_no_lowrank.yaml")), 64)


def test_sealing_on_the_device_seals_the_bytes_inline_sealing_does():
    """K/V stay where the pool is (here the host) and seal at insert, to the same bytes."""
    arenas = []
    for on_device in (False, True):
        tree, pool, alloc = make_cache(CountingCompressor(), on_device=on_device)
        torch.manual_seed(0)
        slots = prefill(pool, alloc, 64)
        tree.insert(InsertParams(key=RadixKey(array("l", list(range(64)))), value=slots))
        assert pool.arena.live_slabs == 3
        arenas.append(pool.arena.data[: pool.arena.used_bytes].clone())
    assert torch.equal(*arenas)
    with pytest.raises(ValueError, match="background must be False"):
        make_cache(CountingCompressor(), background=True, on_device=True)


class ManySealer:
    """Seals the segments handed together at once, as the device's PackedSealer does; a
    segment whose first key starts with ``POISON`` makes the whole call fail."""

    POISON = 42.0

    def __init__(self) -> None:
        self.calls: list[int] = []

    def seal_many(self, batch):
        self.calls.append(len(batch))
        if any(float(x.k[0, 0, 0, 0]) == self.POISON for x in batch):
            raise RuntimeError("a part failed on a poisoned segment")
        return [seal_segment(CountingCompressor(), x) for x in batch]

    def __call__(self, inputs):
        return self.seal_many([inputs])[0]


def test_inline_sealing_hands_due_segments_over_together_and_a_failure_leaves_only_its_segment_dense(monkeypatch):
    monkeypatch.setenv("MOSAICKV_KNAPSACK", "ops")
    sealer = ManySealer()
    tree, pool, alloc = make_cache(CountingCompressor(), on_device=True, seal_inline=sealer)
    tree.insert(InsertParams(key=RadixKey(array("l", list(range(64)))), value=prefill(pool, alloc, 64)))
    tree.drain(wait=True)
    assert sealer.calls == [3] and pool.arena.live_slabs == 3  # segments 0..2 in one call
    spent = pool.counters.inline_seal_seconds
    assert spent > 0 and pool.stats()["inline_seal_seconds"] == round(spent, 3)
    assert pool.stats()["knapsack_on_gpu"] == "ops"  # a run's JSON says which knapsack sealed

    sealer.calls.clear()
    slots = alloc.alloc(64)
    kv = torch.randn(64, 2, 32, dtype=torch.bfloat16)
    kv[SEG, 0, 0] = ManySealer.POISON  # segment 1's first key
    for layer in range(2):
        pool._store_kv_layer(layer, slots, kv, kv)
    tree.insert(InsertParams(key=RadixKey(array("l", list(range(100, 164)))), value=slots))
    tree.drain(wait=True)
    assert sealer.calls == [3, 1, 1, 1]  # the batch failed; each segment again alone
    assert pool.arena.live_slabs == 3 + 2  # segments 0 and 2 sealed, segment 1 left dense
    assert pool.counters.compression_calls == 6


def test_inline_sealing_calls_take_seal_batch_segments_at_most():
    sealer = ManySealer()
    tree, pool, alloc = make_cache(CountingCompressor(), on_device=True, seal_inline=sealer, seal_batch=2)
    tree.insert(InsertParams(key=RadixKey(array("l", list(range(96)))), value=prefill(pool, alloc, 96)))
    tree.drain(wait=True)
    assert sealer.calls == [2, 2, 1] and pool.arena.live_slabs == 5  # segments 0..4; the window stays dense
    with pytest.raises(ValueError, match="seal_batch=0 must be at least 1"):
        make_cache(CountingCompressor(), on_device=True, seal_inline=sealer, seal_batch=0)


def test_each_segment_is_handed_its_own_keys_and_values_in_layer_head_token_order():
    comp = RecordingCompressor()
    tree, pool, alloc = make_cache(comp)
    slots = alloc.alloc(64)
    k = torch.randn(2, 64, 2, 32, dtype=torch.bfloat16)  # [layer, token, kv head, d], as the model writes them
    v = torch.randn_like(k)
    for layer in range(2):
        pool._store_kv_layer(layer, slots, k[layer], v[layer])
    tree.insert(InsertParams(key=RadixKey(array("l", list(range(64)))), value=slots))
    assert len(comp.inputs) == 3  # segments 0..2; segment 3 is in the window
    for g, (got_k, got_v) in enumerate(comp.inputs):
        seg = slice(g * SEG, (g + 1) * SEG)
        assert torch.equal(got_k, k[:, seg].transpose(1, 2)) and torch.equal(got_v, v[:, seg].transpose(1, 2))


def test_insert_seals_outside_window_and_match_returns_slots(cache):
    tree, pool, alloc, comp = cache
    tokens = list(range(64))
    slots = prefill(pool, alloc, 64)
    tree.insert(InsertParams(key=RadixKey(array("l", tokens)), value=slots))
    tree.drain(wait=True)
    assert comp.calls == 3  # 4 segments, the last inside the 16-token window
    assert pool.arena.live_slabs == 3 and tree.sealed_bytes() == 3 * 2 * 2 * (FMT.nbytes(32) - HEADER_BYTES)
    match = tree.match_prefix(MatchPrefixParams(key=RadixKey(array("l", tokens))))
    assert torch.equal(match.device_indices, slots)


def test_a_prompt_prefilled_in_chunks_seals_at_its_last_chunk_while_dense_rows_allow():
    """Middle chunks (``chunked`` inserts) leave the prompt dense while ``defer_margin``
    rows stay free, and are counted; the last chunk's insert seals every due segment. With
    fewer rows free, a middle chunk seals as any insert does."""
    comp = CountingCompressor()
    tree, pool, alloc = make_cache(comp, defer_margin=64)
    tokens, slots = list(range(96)), prefill(pool, alloc, 96)
    for end, chunked in ((32, True), (64, True), (96, False)):
        tree.insert(InsertParams(key=RadixKey(array("l", tokens[:end])), value=slots[:end], chunked=chunked))
        tree.drain(wait=True)
        assert comp.calls == (0 if chunked else 5)  # 6 segments, the last inside the window
    assert pool.counters.seal_deferrals == 2 and pool.stats()["seal_deferrals"] == 2
    match = tree.match_prefix(MatchPrefixParams(key=RadixKey(array("l", tokens))))
    assert torch.equal(match.device_indices, slots)

    comp = CountingCompressor()
    tree, pool, alloc = make_cache(comp, defer_margin=64)
    slots = prefill(pool, alloc, 64)
    margin = pool.free_dense_tokens() + 1  # one row more than is free: no room to defer
    tree.defer_margin = margin
    tree.insert(InsertParams(key=RadixKey(array("l", list(range(64)))), value=slots, chunked=True))
    tree.drain(wait=True)
    assert comp.calls == 3 and pool.counters.seal_deferrals == 0


def test_shared_prefix_is_compressed_once(cache):
    tree, pool, alloc, comp = cache
    prefix = list(range(48))
    a_slots = prefill(pool, alloc, 64)
    tree.insert(InsertParams(key=RadixKey(array("l", prefix + [1000 + i for i in range(16)])), value=a_slots))
    tree.drain(wait=True)
    calls_after_a = comp.calls
    # Request B reuses A's prefix slots (as the scheduler does after match_prefix) plus its own suffix.
    b_slots = torch.cat([a_slots[:48], prefill(pool, alloc, 32)])
    tree.insert(InsertParams(key=RadixKey(array("l", prefix + [2000 + i for i in range(32)])), value=b_slots))
    tree.drain(wait=True)
    assert calls_after_a == 3
    assert comp.calls == calls_after_a + 1  # only B's own first suffix segment is new
    node_slabs = [s for n in tree.root_node.children.values() for s in n.mosaic_slabs]
    assert len(node_slabs) == 3  # the shared node holds the three prefix segments


def test_evict_frees_compressed_bytes_and_tokens(cache):
    tree, pool, alloc, comp = cache
    before_tokens = alloc.available_size()
    slots = prefill(pool, alloc, 64)
    tree.insert(InsertParams(key=RadixKey(array("l", list(range(64)))), value=slots))
    tree.drain(wait=True)
    assert pool.arena.used_bytes > 0
    result = tree.evict(EvictParams(num_tokens=64))
    assert result.num_tokens_evicted == 64
    assert pool.arena.used_bytes == 0 and pool.arena.live_slabs == 0
    assert alloc.available_size() == before_tokens
    assert len(pool._free_dense) == pool.plan.dense_tail_tokens


def cache_finished_paths(tree, pool, alloc, count: int) -> list[list[int]]:
    """``count`` finished requests of 40 unique tokens cached as SGLang leaves them: the
    page-aligned 32 in the tree (segment 0 sealed, segment 1 in the window, dense), the
    last 8 freed."""
    keys = []
    for r in range(count):
        tokens = [1000 * (r + 1) + i for i in range(40)]
        slots = prefill(pool, alloc, 40)
        tree.insert(InsertParams(key=RadixKey(array("l", tokens[:32])), value=slots[:32]))
        alloc.free(slots[32:])
        keys.append(tokens[:32])
    tree.drain(wait=True)
    return keys


def test_cached_paths_that_fill_the_dense_rows_are_evicted_for_a_write(cache):
    """Cached paths keep their windows dense until the dense rows run short while the
    arena and the logical slots have room (SGLang's eviction would not start); a write
    that needs more dense rows than are free then evicts the least recently used path
    instead of failing."""
    tree, pool, alloc, comp = cache
    paths = (pool.plan.dense_tail_tokens - 40) // SEG + 1  # as many as fit, 16 dense rows each
    keys = cache_finished_paths(tree, pool, alloc, paths)
    assert pool.counters.dense_reclaims == 0 and pool.arena.free_slabs > 0
    free = pool.free_dense_tokens()
    assert free < 3 * SEG and alloc.available_size() > 3 * SEG
    for key in keys[1:]:  # the first path is now the least recently used
        tree.match_prefix(MatchPrefixParams(key=RadixKey(array("l", key))))
    prefill(pool, alloc, free + SEG)  # one segment's dense rows more than are free
    assert pool.counters.dense_reclaims == 1 and pool.counters.dense_full == 0
    cached = [len(tree.match_prefix(MatchPrefixParams(key=RadixKey(array("l", k)))).device_indices) for k in keys]
    assert cached[0] == 0 and all(n == 32 for n in cached[1:])


def test_a_write_with_nothing_evictable_is_refused_with_the_reason(cache):
    tree, pool, alloc, comp = cache
    cache_finished_paths(tree, pool, alloc, (pool.plan.dense_tail_tokens - 40) // SEG + 1)
    for node in list(tree.root_node.children.values()):  # running requests' paths are locked
        tree.inc_lock_ref(node)
    with pytest.raises(MemoryError, match="dense tail pool is full"):
        prefill(pool, alloc, pool.free_dense_tokens() + SEG)
    assert pool.counters.dense_full == 1 and pool.stats()["dense_full"] == 1


def test_split_keeps_segments_with_their_tokens(cache):
    tree, pool, alloc, comp = cache
    a = prefill(pool, alloc, 64)
    tree.insert(InsertParams(key=RadixKey(array("l", list(range(64)))), value=a))
    b = torch.cat([a[:32], prefill(pool, alloc, 32)])
    tree.insert(InsertParams(key=RadixKey(array("l", list(range(32)) + [900 + i for i in range(32)])), value=b))
    tree.drain(wait=True)
    shared = tree.root_node.children[next(iter(tree.root_node.children))]
    assert len(shared.value) == 32 and len(shared.mosaic_slabs) == 2
    assert all(len(c.mosaic_slabs) == len(c.value) // SEG for c in shared.children.values())
    tree.reset()
    assert pool.arena.live_slabs == 0
