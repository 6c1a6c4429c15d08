"""Background sealing on SGLang's real RadixCache and allocator (CPU), in worker
processes: insert never waits for the compressor, results are swapped in at step
boundaries, and evictions, splits, worker errors and a worker that dies while a segment is
pending leave the tree and the arena consistent."""

from __future__ import annotations

import logging
import subprocess
import sys
from array import array
from pathlib import Path

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixKey  # noqa: E402
from seal_compressors import (  # noqa: E402
    WAIT_S, BlockingCompressor, Broken, CountingCompressor, ExitOnce, FailingPart, TogetherCompressor,
)
from test_sglang_radix import SEG, make_cache, prefill  # noqa: E402

from mosaickv.sglang_patch.pool import SEALING_STALL_S, UNMAPPED, kv_compress_info  # noqa: E402
from mosaickv.sglang_patch.radix import LEFT_DENSE, PENDING  # noqa: E402

def insert(tree, tokens: list[int], slots: torch.Tensor) -> None:
    tree.insert(InsertParams(key=RadixKey(array("l", tokens)), value=slots))


def only_child(node):
    (child,) = node.children.values()
    return child


def test_insert_returns_before_a_slow_compressor_and_the_segment_stays_dense():
    comp = BlockingCompressor()
    tree, pool, alloc = make_cache(comp, background=True)
    slots = prefill(pool, alloc, 64)
    insert(tree, list(range(64)), slots)  # returns although no compression can finish
    node = only_child(tree.root_node)
    assert node.mosaic_slabs == [PENDING, PENDING, PENDING, UNMAPPED]
    assert (pool.page_to_slab[slots] == UNMAPPED).all() and (pool.page_to_dense[slots] != UNMAPPED).all()
    info = kv_compress_info(pool)
    assert info["sealing_pending"] == 3 and info["oldest_pending_s"] >= 0 and info["compression_calls"] == 3
    assert not info["sealing_stalled"]
    first = min(pool.counters.pending_since)  # as if that job had waited past the stall limit
    pool.counters.pending_since[first] -= SEALING_STALL_S + 1
    assert kv_compress_info(pool)["sealing_stalled"]
    match = tree.match_prefix(MatchPrefixParams(key=RadixKey(array("l", list(range(64))))))
    assert torch.equal(match.device_indices, slots)  # a step boundary: nothing finished, nothing applied
    comp.release.set()
    tree.drain(wait=True)
    assert all(slab >= 0 for slab in node.mosaic_slabs[:3]) and pool.arena.live_slabs == 3
    assert (pool.page_to_slab[slots[: 3 * SEG]] != UNMAPPED).all()
    info = kv_compress_info(pool)
    assert info["sealing_pending"] == 0 and info["oldest_pending_s"] == 0.0 and not info["sealing_stalled"]


def test_an_idle_scheduler_swaps_in_finished_sealing():
    """SGLang's real Scheduler.on_idle, as patched by the plugin, on a scheduler that is
    not fully idle (so the original returns at once after the plugin's drain)."""
    from types import SimpleNamespace

    from sglang.srt.managers.scheduler import Scheduler

    comp = BlockingCompressor()
    tree, pool, alloc = make_cache(comp, background=True, workers=3)
    insert(tree, list(range(64)), prefill(pool, alloc, 64))
    scheduler = SimpleNamespace(tree_cache=tree, maybe_send_health_check_signal=lambda: None,
                                is_fully_idle=lambda: False)
    Scheduler.on_idle(scheduler)
    assert kv_compress_info(pool)["sealing_pending"] == 3  # nothing finished yet
    comp.release.set()
    for job in list(tree._jobs.values()):
        job.future.result(timeout=WAIT_S)
    Scheduler.on_idle(scheduler)
    assert kv_compress_info(pool)["sealing_pending"] == 0 and pool.arena.live_slabs == 3


def test_evicted_while_pending_discards_the_late_result_and_leaks_nothing():
    comp = BlockingCompressor()
    tree, pool, alloc = make_cache(comp, background=True)
    before_tokens = alloc.available_size()
    insert(tree, list(range(64)), prefill(pool, alloc, 64))
    assert comp.started.wait(WAIT_S)  # the worker has taken the first job
    assert tree.evict(EvictParams(num_tokens=64)).num_tokens_evicted == 64
    assert kv_compress_info(pool)["sealing_pending"] == 0
    comp.release.set()
    assert comp.returned.wait(WAIT_S)  # the job already running finishes late
    tree.drain(wait=True)
    assert pool.arena.used_bytes == 0 and pool.arena.live_slabs == 0
    assert alloc.available_size() == before_tokens
    assert len(pool._free_dense) == pool.plan.dense_tail_tokens


def test_split_while_pending_lands_each_slab_on_the_node_holding_its_tokens():
    comp = BlockingCompressor()
    tree, pool, alloc = make_cache(comp, background=True)
    a = prefill(pool, alloc, 64)
    insert(tree, list(range(64)), a)
    b = torch.cat([a[:32], prefill(pool, alloc, 32)])
    insert(tree, list(range(32)) + [900 + i for i in range(32)], b)  # splits A's pending node at 32
    shared = only_child(tree.root_node)
    assert shared.mosaic_slabs == [PENDING, PENDING]
    comp.release.set()
    tree.drain(wait=True)
    nodes = [shared, *shared.children.values()]
    sealed = [(node, j) for node in nodes for j, slab in enumerate(node.mosaic_slabs) if slab >= 0]
    assert len(sealed) == 4  # A's segments 0..2 and B's own segment 2
    for node, j in sealed:
        assert pool._slab_pages[node.mosaic_slabs[j]] == node.value[j * SEG : (j + 1) * SEG].tolist()


def test_a_worker_error_leaves_segments_dense_logs_once_and_counts(caplog):
    tree, pool, alloc = make_cache(Broken(), background=True)
    with caplog.at_level(logging.ERROR, logger="mosaickv.sglang_patch.radix"):
        insert(tree, list(range(64)), prefill(pool, alloc, 64))
        tree.drain(wait=True)
    assert only_child(tree.root_node).mosaic_slabs == [LEFT_DENSE, LEFT_DENSE, LEFT_DENSE, UNMAPPED]
    info = kv_compress_info(pool)
    assert info["worker_errors"] == 3 and info["part_failures"] == {} and info["sealing_pending"] == 0
    assert pool.arena.used_bytes == 0 and pool.arena.live_slabs == 0
    messages = [r.getMessage() + str(r.exc_info[1]) for r in caplog.records if "compressor raised" in r.getMessage()]
    assert len(messages) == 1 and "compressor bug" in messages[0]


def test_a_part_failure_in_a_worker_process_is_counted_by_the_parts_name():
    tree, pool, alloc = make_cache(FailingPart(), background=True)
    insert(tree, list(range(64)), prefill(pool, alloc, 64))
    tree.drain(wait=True)
    info = kv_compress_info(pool)
    assert info["part_failures"] == {"flaky_scorer": 3} and info["worker_errors"] == 0
    assert pool.arena.live_slabs == 0


def test_a_worker_process_that_dies_leaves_its_segment_dense_and_is_replaced(caplog):
    tree, pool, alloc = make_cache(ExitOnce(), background=True)
    with caplog.at_level(logging.ERROR, logger="mosaickv.sealer"):
        insert(tree, list(range(64)), prefill(pool, alloc, 64))
        tree.drain(wait=True)
    slabs = only_child(tree.root_node).mosaic_slabs
    assert slabs[0] == LEFT_DENSE  # its process died with it in hand (the other two were queued to it)
    assert kv_compress_info(pool)["worker_errors"] == slabs.count(LEFT_DENSE) and tree._workers.crashes == 1
    assert any("exited with code 3" in r.getMessage() for r in caplog.records)
    parent = only_child(tree.root_node)
    insert(tree, list(range(96)), torch.cat([parent.value, prefill(pool, alloc, 32)]))
    tree.drain(wait=True)  # segments 3 and 4 leave the window: the replacement process seals them
    (child,) = parent.children.values()
    assert parent.mosaic_slabs[:3] == slabs[:3] and parent.mosaic_slabs[3] >= 0 and child.mosaic_slabs[0] >= 0
    assert pool.arena.live_slabs == 2 + sum(slab >= 0 for slab in slabs[:3])


@pytest.mark.parametrize("workers", [1, 3])
def test_background_seals_the_same_bytes_as_inline(workers: int):
    sealed = []
    for background in (False, True):
        torch.manual_seed(0)
        tree, pool, alloc = make_cache(CountingCompressor(), background=background, workers=workers)
        a = prefill(pool, alloc, 64)
        insert(tree, list(range(64)), a)
        if not background:  # inline: sealed before insert returns
            assert only_child(tree.root_node).mosaic_slabs[:3] == [0, 1, 2]
        insert(tree, list(range(32)) + [900 + i for i in range(32)], torch.cat([a[:32], prefill(pool, alloc, 32)]))
        tree.drain(wait=True)
        sealed.append({tuple(pool._slab_pages[slab]): pool.arena.view(slab).clone() for slab in pool._slab_pages})
    inline, background = sealed
    assert len(inline) == 4 and inline.keys() == background.keys()
    assert all(torch.equal(inline[pages], background[pages]) for pages in inline)


def test_workers_compress_segments_at_the_same_time():
    """Three segments, three processes: every call waits until all three are running,
    which one worker (or a serialising queue) could never reach."""
    tree, pool, alloc = make_cache(TogetherCompressor(3), background=True, workers=3)
    insert(tree, list(range(64)), prefill(pool, alloc, 64))
    tree.drain(wait=True)
    assert all(slab >= 0 for slab in only_child(tree.root_node).mosaic_slabs[:3])
    assert kv_compress_info(pool)["worker_errors"] == 0


def test_a_hung_compressor_does_not_hold_the_process_at_exit():
    code = ("import torch; from seal_compressors import Hang; from mosaickv.sealer import SealWorkers, SegmentInputs; "
            "w = SealWorkers(Hang(), 1); z = torch.zeros(1, 1, 16, 8, dtype=torch.bfloat16); "
            "w.submit(SegmentInputs(z, z, 1024, None, None, 0)); print('submitted')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent)
    assert proc.returncode == 0 and "submitted" in proc.stdout, proc.stderr[-2000:]


def test_sealing_workers_start_inside_a_spawned_process():
    """SGLang's scheduler is itself a spawned process: its sealing processes are grandchildren."""
    code = ("import multiprocessing as mp; from seal_compressors import seal_from_a_spawned_process as f; "
            "p = mp.get_context('spawn').Process(target=f); p.start(); p.join(); raise SystemExit(p.exitcode)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT_S * 2,
                          cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
