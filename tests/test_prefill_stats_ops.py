"""Prefill statistics through a forward's ExtendIndex (found once, read by every layer)
equal a plain per-position loop: energy sums bit for bit (float64 sums of bf16 squares),
attention sums to float rounding, counts exactly; for ragged chunks (starting or ending
mid-segment, a single token, whole segments) and several requests in one extend, with and
without a window."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mosaickv.sglang_patch.attention import record_queries
from mosaickv.sglang_patch.forward_inputs import RequestKV, stat_inputs
from mosaickv.sglang_patch.query_stats import SegmentQueryStats
from stats_reference import D, HKV, HQ, LAYERS, SCALE, SEG, assert_equal_to, reference, sequence


@pytest.mark.parametrize("window", [SEG, 5, 0])
def test_ragged_chunks_of_one_request_equal_a_per_position_loop(window):
    """observe's own index (slots given) over chunks that start and end mid-segment, a
    single token, whole segments."""
    n = 100
    q, k, lse = sequence(n, seed=1)
    slots = torch.arange(500, 500 + n)
    stats = SegmentQueryStats(LAYERS, HKV, D, SEG, window=window)
    sums: dict[int, list] = {}
    for lo, hi in [(0, 20), (20, 40), (40, 41), (41, 48), (48, 80), (80, 100)]:
        seg0 = lo // SEG * SEG
        for layer in range(LAYERS):
            stats.observe(layer, q[layer, lo:hi], slots[:hi], keys=k[layer, seg0:hi], lse=lse[layer, lo:hi],
                          scale=SCALE)
        reference(q, k, lse, lo, hi, window, sums)
        assert_equal_to(stats, {500 + seg * SEG: acc for seg, acc in sums.items()})


# (tokens before the step, step's tokens): mid to mid, whole segments, one token, none, start to mid
REQUESTS = [(40, 30), (0, 64), (63, 1), (10, 0), (0, 17)]


@pytest.mark.parametrize("window", [SEG, 5, 0])
@pytest.mark.parametrize("requests", [REQUESTS, [(0, 64), (16, 32)]], ids=["ragged", "whole"])
def test_an_extend_of_several_requests_equals_a_per_position_loop(window, requests):
    """The backend's path: stat_inputs for the batch, then record_queries at every layer
    (one observe for all requests through one ExtendIndex, built at the first layer), keys
    read from a shared buffer whose rows are not in token order."""
    stats = SegmentQueryStats(LAYERS, HKV, D, SEG, window=window)
    rows_total = sum(before + nq for before, nq in requests)
    order = torch.randperm(rows_total, generator=torch.Generator().manual_seed(9))
    k_buf = torch.zeros(LAYERS, rows_total, HKV, D, dtype=torch.bfloat16)
    reqs, seqs = [], []
    taken = 0
    for i, (before, nq) in enumerate(requests):
        n = before + nq
        q, k, lse = sequence(n, seed=10 + i)
        rows = order[taken : taken + n]
        taken += n
        k_buf[:, rows] = k
        slots = torch.arange(1000 * (i + 1), 1000 * (i + 1) + n, dtype=torch.int32)
        reqs.append(RequestKV(slots, [rows], nq))
        seqs.append((q, k, lse, before, n))
    pool = SimpleNamespace(query_stats=stats, device="cpu", start_layer=0, get_key_buffer=lambda layer: k_buf[layer])
    inputs = stat_inputs(pool, reqs)
    assert not inputs.decode
    q_all = torch.cat([q[:, before:n] for q, _, _, before, n in seqs], dim=1)
    lse_all = torch.cat([lse[:, before:n] for _, _, lse, before, n in seqs], dim=1)
    for layer in range(LAYERS):
        record_queries(pool, layer, q_all[layer], reqs, lse_all[layer] if window else None, SCALE, inputs)
        if layer == 0:
            index = inputs.index
    assert inputs.index is index and index.nq == sum(nq for _, nq in requests)
    assert (index.seg_of is None) == all(before % SEG == 0 and nq % SEG == 0 for before, nq in requests)
    want = {}
    for i, (q, k, lse, before, n) in enumerate(seqs):
        sums: dict[int, list] = {}
        reference(q, k, lse, before, n, window, sums)
        want.update({1000 * (i + 1) + seg * SEG: acc for seg, acc in sums.items()})
    assert_equal_to(stats, want)


@pytest.mark.parametrize("window", [SEG, 5, 0])
def test_a_decode_step_of_several_requests_equals_a_per_position_loop(window):
    """The backend's decode path: stat_inputs for the batch (each query's position in its
    segment, the segment's first slot and, with a window, the key rows of the segment so
    far, taken from each request's last dense run), then record_queries at every layer.
    Queries sit at every kind of position: a segment's first and last token, inside and
    outside the window; the key rows are shuffled in a shared buffer."""
    lengths = [1, 17, SEG, 45, 2 * SEG, 30]
    stats = SegmentQueryStats(LAYERS, HKV, D, SEG, window=window)
    order = torch.randperm(sum(lengths), generator=torch.Generator().manual_seed(11))
    k_buf = torch.zeros(LAYERS, sum(lengths), HKV, D, dtype=torch.bfloat16)
    reqs, seqs, taken = [], [], 0
    for i, n in enumerate(lengths):
        q, k, lse = sequence(n, seed=20 + i)
        rows = order[taken : taken + n]
        taken += n
        k_buf[:, rows] = k
        slots = torch.arange(1000 * (i + 1), 1000 * (i + 1) + n, dtype=torch.int32)
        reqs.append(RequestKV(slots, [rows], 1))
        seqs.append((q, k, lse, n))
    pool = SimpleNamespace(query_stats=stats, device="cpu", start_layer=0, get_key_buffer=lambda layer: k_buf[layer])
    inputs = stat_inputs(pool, reqs)
    assert inputs.decode and inputs.positions.tolist() == [(n - 1) % SEG for n in lengths]
    q_all = torch.stack([q[:, n - 1] for q, _, _, n in seqs], dim=1)
    lse_all = torch.stack([lse[:, n - 1] for _, _, lse, n in seqs], dim=1)
    for layer in range(LAYERS):
        record_queries(pool, layer, q_all[layer], reqs, lse_all[layer] if window else None, SCALE, inputs)
    want = {}
    for i, (q, k, lse, n) in enumerate(seqs):
        sums: dict[int, list] = {}
        reference(q, k, lse, n - 1, n, window, sums)
        want.update({1000 * (i + 1) + seg * SEG: acc for seg, acc in sums.items()})
    assert_equal_to(stats, want)


def test_observe_takes_slots_or_an_index_that_fits():
    stats = SegmentQueryStats(LAYERS, HKV, D, SEG)
    q = torch.ones(8, HQ, D)
    slots = torch.arange(8)
    index = stats.extend_index([slots], [8], HQ, "cpu")
    with pytest.raises(ValueError, match="exactly one"):
        stats.observe(0, q, slots, index=index)
    with pytest.raises(ValueError, match="exactly one"):
        stats.observe(0, q)
    with pytest.raises(ValueError, match="cannot place 4 queries"):
        stats.observe(0, q[:4], index=index)
    with pytest.raises(ValueError, match="queries its last 9 tokens but holds 8"):
        stats.extend_index([slots], [9], HQ, "cpu")
    windowed = SegmentQueryStats(LAYERS, HKV, D, SEG, window=4)
    with pytest.raises(ValueError, match=r"key_rows\[0\] has 7 rows for the request's 8 tokens"):
        windowed.extend_index([slots], [8], HQ, "cpu", [torch.arange(7)])
