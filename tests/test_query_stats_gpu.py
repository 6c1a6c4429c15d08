"""The query statistics where a server computes them, on the GPU: an extend's sums equal the
per-position reference (energies bit for bit), and a decode step's statistics replay
under a CUDA graph as they compute eagerly. Imports no SGLang, so these run on a bare
GPU machine as well as a staged one."""

from __future__ import annotations

import pytest
import torch

from mosaickv.sglang_patch.query_stats import SegmentQueryStats
from stats_reference import D, HKV, HQ, LAYERS, SCALE, SEG, assert_equal_to, reference, sequence

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("window", [SEG, 5])
def test_extend_statistics_on_the_gpu_equal_a_per_position_loop(window):
    n = 100
    q, k, lse = sequence(n, seed=3)
    slots = torch.arange(700, 700 + n)
    stats = SegmentQueryStats(LAYERS, HKV, D, SEG, window=window, device="cuda")  # where a server keeps them
    sums: dict[int, list] = {}
    for lo, hi in [(0, 20), (20, 41), (41, 48), (48, 96), (96, 100)]:
        start = lo // SEG * SEG
        for layer in range(LAYERS):
            stats.observe(layer, q[layer, lo:hi].cuda(), slots[:hi], keys=k[layer, start:hi].cuda(),
                          lse=lse[layer, lo:hi].cuda(), scale=SCALE)
        reference(q, k, lse, lo, hi, window, sums)
    assert_equal_to(stats, {int(slots[seg * SEG]): acc for seg, acc in sums.items()})


def test_decode_statistics_replay_under_a_cuda_graph():
    """What a captured decode layer records (``query_energy``, ``paid_attention``) from
    static buffers: replayed on new inputs, the graph's outputs are the eager ones."""
    stats = SegmentQueryStats(LAYERS, HKV, D, SEG, window=SEG)
    bsz, dev = 6, torch.device("cuda")
    g = torch.Generator().manual_seed(5)

    def inputs() -> list[torch.Tensor]:
        q = torch.randn(bsz, HQ, D, generator=g).bfloat16()
        lse = torch.randn(bsz, HQ, generator=g) + 3.0
        keys = torch.randn(bsz, SEG, HKV, D, generator=g).bfloat16()
        pos = torch.randint(0, SEG, (bsz,), generator=g)
        return [t.to(dev) for t in (q, lse, keys, pos)]

    def record(q, lse, keys, pos):
        return (stats.query_energy(q),
                stats.paid_attention(q[:, None], lse[:, None], keys, pos[:, None], (pos >= 0)[:, None], SCALE))

    static = inputs()
    record(*static)  # warm-up outside the capture (allocator, kernel choice)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = record(*static)
    for _ in range(2):
        fresh = inputs()
        for buffer, value in zip(static, fresh):
            buffer.copy_(value)
        graph.replay()
        want = record(*fresh)
        torch.testing.assert_close(outs[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(outs[1], want[1], rtol=1e-6, atol=1e-9)
        assert outs[1].abs().sum() > 0


def test_reads_and_drops_do_not_wait_for_a_forward_in_flight():
    """As in a server: the scheduler's stream waits for the forward in flight (SGLang's
    barrier after an extend's launch), whose sums are still pending. Dropping sealed
    segments there and reading others on a third stream (sealing's) must not wait for that
    forward: the third stream's work finishes while the forward still runs. The ops run once
    before, as in a warmed-up server: CUDA loads a kernel lazily, and loading waits for the device."""
    stats = SegmentQueryStats(1, 1, 4, segment_size=8, device="cuda")
    forward, scheduler, sealing = (torch.cuda.Stream() for _ in range(3))

    def defer(key: int, value: float) -> None:
        stats.defer_decode(0, torch.full((1, 1, 4), value, dtype=torch.float64, device="cuda"), None, [key],
                           [False], group=1)

    for warm in (1, 2):  # loads the ops' kernels first: under CUDA's lazy loading, loading one waits for the device
        with torch.cuda.stream(forward):
            defer(warm, 1.0)
            stats.flush()
        with torch.cuda.stream(sealing):
            stats.rms_many([warm])[0].sum()
        with torch.cuda.stream(scheduler):
            stats.drop_many([warm])
    torch.cuda.synchronize()
    with torch.cuda.stream(forward):  # an earlier forward's sums, queued at the next one's first layer
        defer(3, 4.0)
        defer(5, 9.0)
        stats.flush()
    torch.cuda.synchronize()
    with torch.cuda.stream(forward):  # the forward in flight, its sums deferred
        torch.cuda._sleep(500_000_000)
        defer(6, 1.0)
    scheduler.wait_stream(forward)  # the barrier
    with torch.cuda.stream(scheduler):
        stats.drop_many([3])
    with torch.cuda.stream(sealing):
        rms, ok = stats.rms_many([5])
        value = rms.sum()
    sealing.synchronize()
    assert not forward.query(), "the read waited for the forward in flight"
    assert ok == [True] and value.item() == 3.0 * 4
    torch.cuda.synchronize()
    assert stats.rms(6).sum().item() == 4.0
