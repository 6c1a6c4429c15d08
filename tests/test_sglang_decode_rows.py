"""A decode batch's token rows copied beside the scheduler's allocation (decode_rows), and
query statistics copied to the host behind the forward that fills them (query_stats):
the two things a decode step used to wait for the GPU for."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.managers.schedule_batch import ScheduleBatch  # noqa: E402

from mosaickv.sglang_patch.decode_rows import DecodeRows  # noqa: E402
from mosaickv.sglang_patch.pool import decode_prefetch_hook  # noqa: E402
from mosaickv.sglang_patch.query_stats import SegmentQueryStats  # noqa: E402

from test_sglang_attention import Twin  # noqa: E402


def _table(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)


def test_prefetched_rows_are_the_batch_rows_and_are_taken_once():
    table, rows = _table(), DecodeRows()
    rows.prefetch(table, torch.tensor([2, 0]), [40, 17])
    got = rows.take([40, 17])
    assert torch.equal(got, table[[2, 0], :40])
    assert rows.take([40, 17]) is None  # once
    assert (rows.prefetched, rows.read_in_forward) == (1, 1)


def test_rows_prepared_for_another_batch_are_not_taken():
    table, rows = _table(), DecodeRows()
    rows.prefetch(table, torch.tensor([1]), [30])
    assert rows.take([31]) is None
    rows.prefetch(table, torch.tensor([1]), [30])
    rows.discard()  # an extend forward ran in between
    assert rows.take([30]) is None
    assert (rows.prefetched, rows.read_in_forward) == (0, 2)


def test_the_hook_reads_fields_schedule_batch_has():
    names = {f.name for f in dataclasses.fields(ScheduleBatch)}
    assert {"token_to_kv_pool_allocator", "req_to_token_pool", "req_pool_indices", "seq_lens_cpu",
            "spec_algorithm"} <= names


@pytest.mark.parametrize("speculative", [False, True])
def test_the_hook_prefetches_plain_decode_batches_only(speculative):
    twin = Twin(2, 64)
    table = twin.req_pool.req_to_token
    table[0, :5] = torch.arange(1, 6)
    twin.pool.decode_rows.prefetch(table, torch.tensor([1]), [3])  # an older batch's, replaced either way
    batch = SimpleNamespace(token_to_kv_pool_allocator=SimpleNamespace(get_kvcache=lambda: twin.pool),
                            req_to_token_pool=twin.req_pool, req_pool_indices=torch.tensor([0]),
                            seq_lens_cpu=torch.tensor([5]),
                            spec_algorithm=SimpleNamespace(is_none=lambda: not speculative))
    assert decode_prefetch_hook("result", batch) == "result"
    got = twin.pool.decode_rows.take([5])
    if speculative:
        assert got is None
    else:
        assert torch.equal(got, table[:1, :5])


def test_a_staged_graph_buffer_keeps_the_values_of_its_forward():
    """A graph's statistics buffers are overwritten by its next replay: staging copies them
    first, so the sums flushed later are the staged forward's."""
    stats = SegmentQueryStats(2, 2, 4, segment_size=8)
    energy = torch.rand(2, 3, 2, 4, dtype=torch.float64)  # [layers, requests, Hkv, d], a graph's buffer
    first = energy.clone()
    for layer in range(2):
        stats.defer_decode(layer, energy[layer], None, [10, 20, 30], [False] * 3, group=2)
    stats.stage()
    energy.add_(100.0)  # the next replay
    stats.flush()
    for j, key in enumerate((10, 20, 30)):
        assert torch.equal(stats._sum[stats._rows[key]], first[:, j])
        assert stats._count[stats._rows[key]].tolist() == [2, 2]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@CUDA
def test_a_step_does_not_wait_for_statistics_still_on_the_gpu():
    """flush queues a forward's adds on its busy stream and returns; a reader on another
    stream sees them, and a drop there cannot pass them: the row it frees, given to the
    next segment, holds only that segment's sums."""
    stats = SegmentQueryStats(1, 1, 4, segment_size=8, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        # First tables and pinned index buffers: allocating them may synchronize the device,
        # as a server's first step does; later steps reuse them.
        stats.defer_decode(0, torch.zeros(1, 1, 4, dtype=torch.float64, device="cuda"), None, [3], [False], group=1)
        stats.flush()
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # keeps the stream busy for a while
        stats.defer_decode(0, torch.ones(1, 1, 4, dtype=torch.float64, device="cuda"), None, [7], [False], group=1)
        stats.flush()
    assert not stream.query()  # flush returned with the stream still busy: it did not wait
    first = stats._rows[7]
    rms, ok = stats.rms_many([7])  # on the default stream
    assert ok == [True] and rms.tolist() == [[[[1.0] * 4]]]
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)
        stats.defer_decode(0, torch.full((1, 1, 4), 5.0, dtype=torch.float64, device="cuda"), None, [7], [False],
                           group=1)
        stats.flush()
    stats.drop_many([7])  # on the default stream, while 7's second add still waits on the busy one
    with torch.cuda.stream(stream):
        stats.defer_decode(0, torch.full((1, 1, 4), 4.0, dtype=torch.float64, device="cuda"), None, [9], [False],
                           group=1)
        stats.flush()
    assert stats._rows[9] == first  # 7's row, reused
    rms, ok = stats.rms_many([9])
    assert ok == [True] and rms.tolist() == [[[[2.0] * 4]]]


@pytest.mark.gpu
@CUDA
def test_prefetched_rows_come_back_from_the_gpu():
    table, rows = _table().cuda(), DecodeRows()
    rows.prefetch(table, torch.tensor([3, 1], device="cuda"), [64, 9])
    got = rows.take([64, 9])
    assert got.device.type == "cpu" and torch.equal(got, table[[3, 1], :64].cpu())


def test_every_hook_the_plugin_registers_names_something_sglang_has():
    """A hook on a renamed SGLang function would never run: each target must resolve."""
    import importlib

    from sglang.srt.plugins.hook_registry import HookRegistry

    import mosaickv.sglang_patch as plugin

    saved, was = {k: list(v) for k, v in HookRegistry._hooks.items()}, plugin._registered
    HookRegistry._hooks.clear()
    plugin._registered = False
    try:
        plugin.register()
        targets = list(HookRegistry._hooks)
    finally:
        HookRegistry._hooks.clear()
        HookRegistry._hooks.update(saved)
        plugin._registered = was
    assert "sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_decode" in targets
    for target in targets:
        parts = target.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for name in parts[cut:]:
                obj = getattr(obj, name)  # AttributeError names the missing part
            break
        else:
            pytest.fail(f"no module in {target}")
