"""Device sealing reads a node's slot values only once the device has written them.

SGLang's insert copies a request's slots into the tree on the scheduler's stream, which
after an extend's launch waits for the whole forward in flight; reading them then would
wait for that forward. A due segment whose node's copy has not passed waits and seals at
a later drain, through splits, and is forgotten if evicted. The copy's CUDA event cannot
run here: :class:`PendingCopy` stands in for it (the GPU test at the end
runs the real one)."""

from __future__ import annotations

from array import array

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixKey  # noqa: E402

from mosaickv.sglang_patch.pool import kv_compress_info  # noqa: E402
from seal_compressors import CountingCompressor  # noqa: E402
from test_sglang_radix import make_cache, prefill  # noqa: E402


class PendingCopy:
    """A CUDA event's two calls sealing makes: not passed until ``done``."""

    def __init__(self) -> None:
        self.done, self.waits = False, 0

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waits += 1
        self.done = True


def deferred_cache(monkeypatch):
    comp = CountingCompressor()
    tree, pool, alloc = make_cache(comp, on_device=True)
    copy = PendingCopy()
    monkeypatch.setattr(tree, "_values_copied", lambda value: copy)
    return tree, pool, alloc, comp, copy


def key(tokens) -> RadixKey:
    return RadixKey(array("l", list(tokens)))


def test_a_segment_whose_slots_are_not_written_seals_at_a_later_drain_to_the_same_bytes(monkeypatch):
    torch.manual_seed(0)
    tree, pool, alloc, comp, copy = deferred_cache(monkeypatch)
    tree.insert(InsertParams(key=key(range(64)), value=prefill(pool, alloc, 64)))
    assert pool.arena.live_slabs == 0 and len(tree._unwritten) == 3  # due, waiting for the copy
    # A client waiting for a sealed prefix (server_info.wait_sealed) sees them as pending.
    info = kv_compress_info(pool)
    assert info["sealing_pending"] == info["sealing_waiting_for_slots"] == 3
    tree.drain(wait=False)
    assert pool.arena.live_slabs == 0 and copy.waits == 0  # the scheduler did not wait
    copy.done = True
    tree.drain(wait=False)
    assert pool.arena.live_slabs == 3 and not tree._unwritten and comp.calls == 3 and copy.waits == 0
    assert kv_compress_info(pool)["sealing_pending"] == 0
    torch.manual_seed(0)
    now, pool_now, alloc_now = make_cache(CountingCompressor(), on_device=True)
    now.insert(InsertParams(key=key(range(64)), value=prefill(pool_now, alloc_now, 64)))
    assert torch.equal(pool.arena.data[: pool.arena.used_bytes], pool_now.arena.data[: pool_now.arena.used_bytes])


def test_waiting_segments_follow_a_split_and_seal_once(monkeypatch):
    tree, pool, alloc, comp, copy = deferred_cache(monkeypatch)
    first = prefill(pool, alloc, 64)
    tree.insert(InsertParams(key=key(range(64)), value=first))
    second = torch.cat([first[:32], prefill(pool, alloc, 32)])
    tree.insert(InsertParams(key=key(list(range(32)) + list(range(100, 132))), value=second))  # splits at 32
    assert pool.arena.live_slabs == 0 and len(tree._unwritten) == 4  # 0, 1 shared; each path's third
    waiting = sorted((int(node.value[j * 16]), j) for node, j in tree._unwritten.values())
    assert [slot for slot, _ in waiting] == sorted([int(first[0]), int(first[16]), int(first[32]), int(second[32])])
    copy.done = True
    tree.drain(wait=False)
    assert pool.arena.live_slabs == 4 and comp.calls == 4 and not tree._unwritten


def test_an_evicted_waiting_segment_is_forgotten(monkeypatch):
    tree, pool, alloc, comp, copy = deferred_cache(monkeypatch)
    tree.insert(InsertParams(key=key(range(64)), value=prefill(pool, alloc, 64)))
    assert tree.evict(EvictParams(num_tokens=64)).num_tokens_evicted == 64
    assert not tree._unwritten and kv_compress_info(pool)["sealing_pending"] == 0
    copy.done = True
    tree.drain(wait=False)
    assert comp.calls == 0 and pool.arena.live_slabs == 0


def test_drain_with_wait_waits_for_the_copy_and_seals(monkeypatch):
    tree, pool, alloc, comp, copy = deferred_cache(monkeypatch)
    tree.insert(InsertParams(key=key(range(64)), value=prefill(pool, alloc, 64)))
    tree.drain(wait=True)
    assert copy.waits == 1 and pool.arena.live_slabs == 3 and not tree._unwritten


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("on_device", [True, False], ids=["device sealing", "worker processes"])
def test_an_insert_behind_a_forward_in_flight_returns_without_waiting_for_it(on_device):
    """The real event: with the stream busy (the forward in flight) and the tree's copy of
    the slots queued behind it, as SGLang's insert makes it, insert returns while the
    stream is still busy, and the segments seal after it is done: inline, or in worker
    processes from a snapshot taken on the sealing stream (regions then come back on
    the host)."""
    tree, pool, alloc = make_cache(CountingCompressor(), on_device=on_device, background=not on_device,
                                   device="cuda")
    slots = prefill(pool, alloc, 64)
    torch.cuda.synchronize()
    stream = torch.cuda.current_stream()
    torch.cuda._sleep(500_000_000)  # the forward in flight
    tree.insert(InsertParams(key=key(range(64)), value=slots.to(torch.int64, copy=True)))
    assert not stream.query(), "insert waited for the stream"
    assert pool.arena.live_slabs == 0 and len(tree._unwritten) == 3
    torch.cuda.synchronize()
    tree.drain(wait=not on_device)
    assert pool.arena.live_slabs == 3 and not tree._unwritten


def test_a_prefix_match_does_not_seal_what_waits(monkeypatch):
    """The scheduler matches prefixes while building the next batch, before launching it:
    waiting segments seal at the next insert (results processed) or an idle drain, not
    there."""
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams

    tree, pool, alloc, comp, copy = deferred_cache(monkeypatch)
    tree.insert(InsertParams(key=key(range(64)), value=prefill(pool, alloc, 64)))
    copy.done = True
    tree.match_prefix(MatchPrefixParams(key=key(range(64))))
    assert comp.calls == 0 and len(tree._unwritten) == 3
    tree.insert(InsertParams(key=key(range(200, 232)), value=prefill(pool, alloc, 32)))  # another request's result
    assert comp.calls == 3 + 1 and not tree._unwritten  # the three waiting, and the new path's one due segment


def test_short_of_dense_rows_sealing_waits_for_the_slots_instead(monkeypatch):
    """With fewer dense rows free than the next chunk needs, a due segment does not wait
    for a later drain: sealing waits for its slots' copy and frees its rows now."""
    tree, pool, alloc, comp, copy = deferred_cache(monkeypatch)
    tree.defer_margin = pool.free_dense_tokens() + 1  # always short
    tree.insert(InsertParams(key=key(range(64)), value=prefill(pool, alloc, 64)))
    assert copy.waits == 1 and comp.calls == 3 and not tree._unwritten
