"""Device sealing on a thread beside the scheduler (--kv-compress-sealing device-thread):
the scheduler gets its futures at once and goes on; the thread seals batches in order;
failures and cancellations reach each segment; the radix cache installs the thread's
regions at a later drain, the bytes inline sealing writes."""

from __future__ import annotations

import threading
from array import array
from concurrent.futures import Future

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.mem_cache.base_prefix_cache import InsertParams  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixKey  # noqa: E402

from mosaickv.sglang_patch.pool import SealingCounters  # noqa: E402
from mosaickv.sglang_patch.radix import PENDING  # noqa: E402
from mosaickv.sglang_patch.seal_thread import SealThread  # noqa: E402
from seal_compressors import SEG, CountingCompressor  # noqa: E402
from test_sglang_radix import ManySealer, make_cache, prefill  # noqa: E402


def finished(value=None, error: BaseException | None = None) -> Future:
    future: Future = Future()
    future.set_exception(error) if error is not None else future.set_result(value)
    return future


class Gate:
    """A seal function that waits for ``open`` and records the thread and batches it ran."""

    def __init__(self) -> None:
        self.open, self.threads, self.batches = threading.Event(), [], []

    def __call__(self, batch: list) -> list[Future]:
        assert self.open.wait(10)
        self.threads.append(threading.current_thread().name)
        self.batches.append(list(batch))
        return [finished(x * 10) for x in batch]


def test_the_caller_gets_futures_at_once_and_batches_seal_in_order_on_the_thread():
    counters, gate = SealingCounters(), Gate()
    thread = SealThread("cpu", counters)
    first, second = thread.submit(gate, [1, 2]), thread.submit(gate, [3])
    assert not any(f.done() for f in first + second)  # the caller did not wait for sealing
    gate.open.set()
    assert [f.result(10) for f in first + second] == [10, 20, 30]
    assert gate.batches == [[1, 2], [3]]
    assert all(name.startswith("mosaickv-seal") for name in gate.threads)
    assert counters.thread_seal_seconds > 0
    thread.shutdown()


def test_each_segment_gets_its_own_failure_or_the_batch_s():
    thread = SealThread("cpu", SealingCounters())
    own = thread.submit(lambda batch: [finished(1), finished(error=ValueError("segment 1"))], ["a", "b"])
    assert own[0].result(10) == 1
    with pytest.raises(ValueError, match="segment 1"):
        own[1].result(10)

    def broken(batch):
        raise RuntimeError("the whole call")

    for future in thread.submit(broken, ["a", "b"]):
        with pytest.raises(RuntimeError, match="the whole call"):
            future.result(10)
    thread.shutdown()


def test_a_segment_cancelled_before_the_thread_reaches_it_is_skipped():
    gate = Gate()
    thread = SealThread("cpu", SealingCounters())
    blocking = thread.submit(gate, [1])
    later = thread.submit(gate, [2, 3])
    assert later[0].cancel()  # its node left the tree while it waited
    gate.open.set()
    assert blocking[0].result(10) == 10 and later[1].result(10) == 30 and later[0].cancelled()
    thread.shutdown()


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_the_radix_cache_installs_the_thread_s_regions_at_a_later_drain(device):
    """Insert returns with the segments in flight (PENDING, dense rows still held); a
    drain after the thread finishes installs them: the same arena bytes as inline (on
    the GPU: sealed on the thread's stream, installed on the scheduler's)."""
    arenas = []
    for seal_thread in (False, True):
        sealer = ManySealer()
        tree, pool, alloc = make_cache(CountingCompressor(), on_device=True, seal_inline=sealer,
                                       seal_thread=seal_thread, device=device)
        torch.manual_seed(0)
        slots = prefill(pool, alloc, 64)
        if seal_thread:
            gate = threading.Event()
            many = sealer.seal_many
            sealer.seal_many = lambda batch: (gate.wait(10), many(batch))[1]
        dense_free = pool.free_dense_tokens()
        tree.insert(InsertParams(key=RadixKey(array("l", list(range(64)))), value=slots))
        if seal_thread:
            node = tree.root_node.children[next(iter(tree.root_node.children))]
            assert node.mosaic_slabs[:3] == [PENDING] * 3 and pool.stats()["sealing_pending"] == 3
            assert pool.free_dense_tokens() == dense_free  # nothing installed: the dense rows are held
            gate.set()
        tree.drain(wait=True)
        assert pool.free_dense_tokens() == dense_free + 3 * SEG and sealer.calls == [3]
        assert (pool.counters.thread_seal_seconds > 0) == seal_thread
        assert (pool.counters.inline_seal_seconds > 0) == (not seal_thread)
        arenas.append(pool.arena.data[: pool.arena.used_bytes].cpu())
    assert torch.equal(*arenas)


def test_a_sealing_thread_needs_sealing_on_the_device():
    with pytest.raises(ValueError, match="seal_thread=True .* needs on_device=True"):
        make_cache(CountingCompressor(), seal_thread=True)
