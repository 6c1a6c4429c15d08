"""Reads and drops of the query statistics queue only the pending sums of the segments
they touch: a forward still in flight keeps its sums pending (queuing them would order
the read behind that whole forward), and nothing of a freed segment survives it."""

from __future__ import annotations

import torch

from mosaickv.sglang_patch.query_stats import SegmentQueryStats

LAYERS, HKV, D, SEG = 2, 2, 4, 8


def _decode(stats: SegmentQueryStats, keys: list[int], value: float) -> None:
    """One decode forward's sums (every layer), deferred as the backend defers them."""
    energy = torch.full((len(keys), HKV, D), value, dtype=torch.float64)
    for layer in range(LAYERS):
        stats.defer_decode(layer, energy, None, keys, [False] * len(keys), group=1)


def test_reading_sealed_segments_leaves_the_forward_in_flight_pending():
    stats = SegmentQueryStats(LAYERS, HKV, D, SEG)
    _decode(stats, [10, 20], 4.0)
    stats.flush()  # the next forward's first layer queues these
    _decode(stats, [30], 9.0)  # the forward in flight: segment 30 only
    rms, ok = stats.rms_many([10])
    assert ok == [True] and torch.equal(rms[0], torch.full((LAYERS, HKV, D), 2.0))
    assert [p.keys for p in stats._pending] == [(30,)] * LAYERS
    stats.drop_many([10, 20])
    assert [p.keys for p in stats._pending] == [(30,)] * LAYERS and set(stats._rows) == set()
    assert len(stats) == 1 and stats.rms(30)[0, 0, 0].item() == 3.0  # __len__ queues everything


def test_a_read_queues_the_pending_sums_of_the_segments_it_reads():
    stats = SegmentQueryStats(LAYERS, HKV, D, SEG)
    _decode(stats, [10, 30], 1.0)
    _decode(stats, [50], 16.0)
    rms, ok = stats.rms_many([30])
    assert ok == [True] and rms[0, 0, 0, 0].item() == 1.0
    assert [p.keys for p in stats._pending] == [(50,)] * LAYERS  # the other forward's
    assert 10 in stats._rows  # its forward's other segment came along


def test_a_freed_segment_whose_sums_were_only_pending_leaves_nothing_behind():
    stats = SegmentQueryStats(LAYERS, HKV, D, SEG)
    _decode(stats, [40], 25.0)  # pending: no row yet
    stats.release(torch.tensor([40, 41, 42]))
    assert not stats._pending and 40 not in stats._rows
    _decode(stats, [40], 1.0)  # a new segment starting at the reused slot
    assert stats.rms(40)[0, 0, 0].item() == 1.0


def test_dropping_what_nothing_holds_changes_nothing():
    stats = SegmentQueryStats(LAYERS, HKV, D, SEG)
    _decode(stats, [10], 4.0)
    stats.release(torch.tensor([99]))
    assert [p.keys for p in stats._pending] == [(10,)] * LAYERS
    assert stats.rms(10)[0, 0, 0].item() == 2.0
