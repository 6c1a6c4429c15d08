"""Prefill back-pressure from the dense rows (admission.py) on SGLang's real
PrefillAdder, radix cache, pool and allocator (CPU): a round may write only the dense
rows that are free, after evicting cached paths for them, less a page per running
request; with none, no new request is admitted and an ongoing chunked prefill still
advances a page."""

from __future__ import annotations

from array import array

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.managers.schedule_batch import Req  # noqa: E402
from sglang.srt.managers.schedule_policy import AddReqResult, PrefillAdder  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixKey  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402

from seal_compressors import SEG, CountingCompressor  # noqa: E402
from test_sglang_radix import cache_finished_paths, make_cache, prefill  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _published_server_args():
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import ServerArgs

    publish(ServerArgs(model_path="dummy"), role="test")


class Running:
    """What PrefillAdder reads of the running batch: its requests (real Reqs)."""

    def __init__(self, count: int) -> None:
        self.reqs = [Req(f"r{i}", "", array("q", range(8)), SamplingParams(max_new_tokens=16)) for i in range(count)]

    def batch_size(self) -> int:
        return len(self.reqs)


def adder(tree, alloc, running=None, rem_input=4096, rem_chunk=2048) -> PrefillAdder:
    return PrefillAdder(1, tree, alloc, running, 0.5, rem_input, rem_chunk)


def test_a_round_keeps_its_budget_while_dense_rows_are_free():
    tree, pool, alloc = make_cache(CountingCompressor())
    a = adder(tree, alloc, rem_input=64, rem_chunk=48)
    assert pool.free_dense_tokens() > 64
    assert (a.rem_input_tokens, a.rem_chunk_tokens) == (64, 48)
    assert pool.counters.prefill_throttled == 0


def test_a_round_is_cut_to_the_free_dense_rows_less_a_page_per_running_request():
    tree, pool, alloc = make_cache(CountingCompressor())
    held = prefill(pool, alloc, pool.free_dense_tokens() - 40)  # a prompt whose rows wait for sealing
    assert pool.free_dense_tokens() == 40
    a = adder(tree, alloc, Running(3))
    assert a.rem_input_tokens == a.rem_chunk_tokens == 40 - 3  # page_size 1: one row per running request
    assert pool.counters.prefill_throttled == 1 and pool.stats()["prefill_throttled"] == 1
    alloc.free(held)  # its rows are back: a round that fits them keeps its budget
    assert adder(tree, alloc, Running(3), rem_input=100, rem_chunk=100).rem_chunk_tokens == 100


def test_with_no_dense_row_free_no_request_is_admitted_but_a_chunked_prefill_advances():
    tree, pool, alloc = make_cache(CountingCompressor())
    prefill(pool, alloc, pool.free_dense_tokens())
    a = adder(tree, alloc)
    assert a.rem_input_tokens == a.rem_chunk_tokens == 0 and a.budget_state() == AddReqResult.OTHER
    chunked = Req("c", "", array("q", range(100)), SamplingParams(max_new_tokens=16))
    chunked.prefix_indices = torch.empty(0, dtype=torch.int64)
    chunked._refresh_fill_ids()
    assert a.add_chunked_req(chunked) is chunked  # still unfinished: it stays the chunked request
    assert chunked.extend_range.length == pool.page_size  # a page, not an empty extend
    assert a.rem_chunk_tokens == 0 and a.budget_state() == AddReqResult.OTHER  # nothing left for new ones


def test_cached_paths_holding_the_dense_rows_are_evicted_for_the_round():
    """Windows of finished, cached requests fill the dense rows while the logical slots
    have room; the round evicts the least recently used of them instead of stalling."""
    tree, pool, alloc = make_cache(CountingCompressor())
    keys = cache_finished_paths(tree, pool, alloc, (pool.plan.dense_tail_tokens - 40) // SEG + 1)
    free = pool.free_dense_tokens()
    assert free < 3 * SEG and alloc.available_size() > 3 * SEG
    for key in keys[1:]:  # the first path is now the least recently used
        tree.match_prefix(MatchPrefixParams(key=RadixKey(array("l", key))))
    a = adder(tree, alloc, rem_input=free + SEG, rem_chunk=free + SEG)
    assert (a.rem_input_tokens, a.rem_chunk_tokens) == (free + SEG, free + SEG)
    assert pool.counters.dense_reclaims == 1 and pool.counters.prefill_throttled == 0
    assert len(tree.match_prefix(MatchPrefixParams(key=RadixKey(array("l", keys[0])))).device_indices) == 0


def test_without_kv_compress_the_budget_is_sglangs():
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    pool = MHATokenToKVPool(64, page_size=1, dtype=torch.bfloat16, head_num=2, head_dim=32, layer_num=2, device="cpu",
                            enable_memory_saver=False, enable_alt_stream=False)
    alloc = TokenToKVPoolAllocator(64, torch.bfloat16, "cpu", pool, need_sort=False)
    tree, _, _ = make_cache(CountingCompressor())
    a = adder(tree, alloc, rem_input=4096, rem_chunk=2048)
    assert (a.rem_input_tokens, a.rem_chunk_tokens) == (4096, 2048)


def test_cached_paths_holding_every_slab_are_evicted_for_the_rounds_segments():
    """A cached prompt holds the arena's only slab while dense rows are free, so SGLang's
    eviction would not start and the next prompt's segments would stay dense (the
    fourteenth GPU run's accuracy servers). A prefill round evicts the least recently used
    path for its segments first: the next prompt then seals into the freed slab."""
    from test_sglang_sealing import Stack, prefill as run_prefill, sequence

    from mosaickv.sglang_patch.pool import UNMAPPED

    stack = Stack(num_slabs=1)
    pool, alloc, tree = stack.pool, stack.alloc, stack.tree
    q, k, v = sequence(128, seed=9)
    run_prefill(stack, 0, q, k, v, [128])
    stack.insert(0, list(range(128)))
    tree.drain(wait=True)
    assert pool.arena.free_slabs == 0 and pool.free_dense_tokens() > 64 and alloc.available_size() > 128
    full = pool.counters.arena_full
    adder(tree, alloc, rem_input=128, rem_chunk=128)
    assert pool.arena.free_slabs == 1 and pool.counters.slab_reclaims == 1
    q2, k2, v2 = sequence(128, seed=10)
    run_prefill(stack, 1, q2, k2, v2, [128])
    stack.insert(1, [5000 + i for i in range(128)])
    tree.drain(wait=True)
    assert pool.arena.live_slabs == 1 and stack.slabs()[1] != UNMAPPED  # the new prompt's first segment sealed
    assert pool.counters.arena_full == full + 1  # its second still found no slab: counted, as before
    adder(tree, alloc, rem_input=0, rem_chunk=0)  # a round that wants nothing evicts nothing
    assert pool.counters.slab_reclaims == 1 and pool.arena.live_slabs == 1
