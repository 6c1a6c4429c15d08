"""Decode under CUDA graphs on SGLang's real classes (CPU): the backend's capture-time and
replay-time hooks, with the graph's replays emulated by running the captured forward's
Python again over the same static buffers. What a replay reads (plan, write rows,
statistics' inputs) must be what the replay hook wrote, and the captured forward must do
no host work: it equals the reference path step after step, through sealing."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode  # noqa: E402

from mosaickv.formats import SideFormat  # noqa: E402
from mosaickv.sglang_patch.attention import MosaicAttnBackend  # noqa: E402
from mosaickv.sglang_patch.pool import MosaicKVPool  # noqa: E402
from mosaickv.sglang_patch.query_stats import SegmentQueryStats  # noqa: E402

from test_sglang_attention import HKV, LAYERS, SEG, Twin, assert_same_stats, kv  # noqa: E402

MAX_BS = 3  # captured batch size: the two requests plus one padding row


class FormatsBackend(MosaicAttnBackend):
    """The kernel backend with the formats Twin seals (every kind, widths up to 16) as
    its policy's menu: a graph launches only its menu's variants."""

    def _policy_sides(self):
        return [SideFormat("dense"), *(SideFormat(kind, 16) for kind in ("sparse", "mask", "lowrank"))]


class GraphTwin(Twin):
    """A Twin whose kernel backend runs its decode steps as a captured graph would."""

    def __init__(self, group: int, d: int) -> None:
        super().__init__(group, d)
        self.attention = "triton"
        self.mosaic = FormatsBackend(self.runner(self.pool))

    def runner(self, pool):
        runner = super().runner(pool)
        runner.model_config = SimpleNamespace(num_attention_heads=HKV * self.group, get_total_num_kv_heads=lambda: HKV,
                                              context_len=256)
        return runner

    def step(self, new, mode, seed):
        self.mosaic._graph_step = False  # what init_forward_metadata does before an eager forward
        return super().step(new, mode, seed)

    def capture(self) -> ForwardBatch:
        """The runner's capture of batch size MAX_BS: static buffers, an empty plan."""
        static = ForwardBatch(forward_mode=ForwardMode.DECODE, batch_size=MAX_BS,
                              input_ids=torch.zeros(MAX_BS, dtype=torch.int64),
                              req_pool_indices=torch.zeros(MAX_BS, dtype=torch.int64),
                              seq_lens=torch.ones(MAX_BS, dtype=torch.int64),
                              out_cache_loc=torch.zeros(MAX_BS, dtype=torch.int64), seq_lens_sum=MAX_BS)
        self.mosaic.init_forward_metadata_out_graph(static, in_capture=True)
        q = torch.randn(LAYERS, MAX_BS, HKV * self.group * self.d)
        k, v = kv(MAX_BS, self.d, seed=99)
        for i, layer in enumerate(self.layers):  # warmup/capture: its output is not read
            self.mosaic.forward_decode(q[i].bfloat16(), k[i], v[i], layer, static)
        return static

    def replay(self, static: ForwardBatch, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One decode step of both requests: the replay hook, then the captured forward
        (static batch), against the reference backend's eager step."""
        loc = []
        for i in range(2):
            self.req_pool.req_to_token[i, self.lens[i]] = self.next_slot
            loc.append(self.next_slot)
            self.lens[i] += 1
            self.next_slot += 1
        loc = torch.tensor(loc)
        static.out_cache_loc[:2] = loc  # the runner's buffer fill (padding row: slot 0)
        static.req_pool_indices[:2] = torch.arange(2)
        view = SimpleNamespace(batch_size=MAX_BS, num_padding=MAX_BS - 2, req_pool_indices=static.req_pool_indices,
                               seq_lens=torch.tensor(self.lens + [1]), seq_lens_cpu=torch.tensor(self.lens + [1]),
                               out_cache_loc=loc)
        self.mosaic.init_forward_metadata_out_graph(view)
        eager = ForwardBatch(forward_mode=ForwardMode.DECODE, batch_size=2, input_ids=torch.zeros(2, dtype=torch.int64),
                             req_pool_indices=torch.arange(2), seq_lens=torch.tensor(self.lens), out_cache_loc=loc,
                             seq_lens_sum=sum(self.lens))
        k, v = kv(MAX_BS, self.d, seed)
        q = torch.randn(LAYERS, MAX_BS, HKV * self.group * self.d, generator=torch.Generator().manual_seed(seed + 1))
        out = []
        with HostWork() as host:
            graph = [self.mosaic.forward_decode(q[i].bfloat16(), k[i], v[i], layer, static)
                     for i, layer in enumerate(self.layers)]
        assert host.calls == [], f"the captured forward did host work: {host.calls}"
        for i, layer in enumerate(self.layers):
            ref = self.native.forward_decode(q[i, :2].bfloat16(), k[i, :2], v[i, :2], layer, eager)
            out.append((graph[i][:2], ref))
        return out


class HostWork:
    """Records calls that a captured forward must not make: page-table lookups, request
    mapping, planning, statistics flushes."""

    WATCHED = [(MosaicKVPool, "dense_rows"), (MosaicKVPool, "map_pages"), (MosaicAttnBackend, "_requests"),
               (MosaicAttnBackend, "_forward_plan"), (SegmentQueryStats, "flush"), (SegmentQueryStats, "observe_decode")]

    def __enter__(self) -> HostWork:
        self.calls: list[str] = []
        self._saved = [(cls, name, getattr(cls, name)) for cls, name in self.WATCHED]
        for cls, name, fn in self._saved:
            setattr(cls, name, self._wrap(f"{cls.__name__}.{name}", fn))
        return self

    def _wrap(self, label, fn):
        def wrapped(*args, **kwargs):
            self.calls.append(label)
            return fn(*args, **kwargs)

        return wrapped

    def __exit__(self, *exc) -> None:
        for cls, name, fn in self._saved:
            setattr(cls, name, fn)


@pytest.mark.parametrize("group,d", [(1, 64), (3, 64), (4, 128)])
def test_replayed_decode_steps_equal_the_reference_path(group, d):
    """Prefill (eager), capture, then decode steps as replays while segments fill up and
    get sealed mid-way (every format): each step equals the reference, writes land where
    the reference's do, and the statistics the graph deferred equal the reference's."""
    twin = GraphTwin(group, d)
    twin.mosaic.init_cuda_graph_state(MAX_BS, MAX_BS)
    for kernel, ref in twin.step([2 * SEG + SEG - 3, SEG - 2], ForwardMode.EXTEND, seed=0):
        torch.testing.assert_close(kernel.float(), ref.float(), atol=2e-2, rtol=2e-2)
    twin.seal(0, 0)
    twin.seal(0, 1)
    static = twin.capture()
    for seed in range(1, 8):
        for kernel, ref in twin.replay(static, seed):
            assert torch.isfinite(kernel).all()
            torch.testing.assert_close(kernel.float(), ref.float(), atol=2e-2, rtol=2e-2)
        if seed == 4:  # request 1's first segment is complete, request 0's third too
            twin.seal(1, 0)
            twin.seal(0, 2)
    slots = twin.req_pool.req_to_token[:2, : max(twin.lens)].long()
    for i, n in enumerate(twin.lens):  # the last two tokens' keys, written by replays
        assert torch.equal(twin.pool.k_buffer[0][twin.pool.dense_rows(slots[i, n - 2 : n])],
                           twin.ref_pool.k_buffer[0][twin.ref_pool.dense_rows(slots[i, n - 2 : n])])
    assert_same_stats(twin.pool.query_stats, twin.ref_pool.query_stats)


def test_graph_hooks_need_the_kernel_path_and_the_state():
    twin = GraphTwin(2, 64)
    with pytest.raises(RuntimeError, match="init_cuda_graph_state must run before"):
        twin.mosaic.init_forward_metadata_out_graph(SimpleNamespace(batch_size=1), in_capture=True)
    with pytest.raises(RuntimeError, match="need --kv-compress-attention triton"):
        twin.native.init_cuda_graph_state(2, 2)
    assert twin.mosaic.get_cuda_graph_seq_len_fill_value() == 1


def test_padding_rows_write_to_the_padding_row_only():
    """Capture writes every row of the static batch through row 0 (the pool's padding
    page), so capture and padded replays never touch a real request's rows."""
    twin = GraphTwin(2, 64)
    twin.mosaic.init_cuda_graph_state(MAX_BS, MAX_BS)
    before = [buf.clone() for buf in twin.pool.k_buffer]
    twin.capture()
    for before_layer, after in zip(before, twin.pool.k_buffer):
        assert torch.equal(before_layer[1:], after[1:])
    assert math.isfinite(float(twin.pool.k_buffer[0][0].float().abs().sum()))
