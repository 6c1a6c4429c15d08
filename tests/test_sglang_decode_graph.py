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
    """A Twin whose kernel backend runs its decode steps as a captured graph: really
    captured on a GPU (``real``), or, on the CPU, its Python run again over the same
    static buffers (what a replay reads is then what the hooks wrote)."""

    def __init__(self, group: int, d: int, device: str = "cpu") -> None:
        super().__init__(group, d, device)
        self.attention = "triton"
        self.mosaic = FormatsBackend(self.runner(self.pool))
        self.real = device == "cuda"

    def runner(self, pool):
        runner = super().runner(pool)
        runner.device = self.device
        runner.model_config = SimpleNamespace(num_attention_heads=HKV * self.group, get_total_num_kv_heads=lambda: HKV,
                                              context_len=256)
        return runner

    def step(self, new, mode, seed):
        self.mosaic._graph_step = False  # what init_forward_metadata does before an eager forward
        return super().step(new, mode, seed)

    def capture(self) -> ForwardBatch:
        """The runner's capture of batch size MAX_BS: static buffers, an empty plan, a
        warmup forward, then (on a GPU) the captured one."""
        dev = self.device
        static = ForwardBatch(forward_mode=ForwardMode.DECODE, batch_size=MAX_BS,
                              input_ids=torch.zeros(MAX_BS, dtype=torch.int64, device=dev),
                              req_pool_indices=torch.zeros(MAX_BS, dtype=torch.int64),  # as Twin's req_to_token: host
                              seq_lens=torch.ones(MAX_BS, dtype=torch.int64, device=dev),
                              out_cache_loc=torch.zeros(MAX_BS, dtype=torch.int64, device=dev), seq_lens_sum=MAX_BS)
        self.mosaic.init_forward_metadata_out_graph(static, in_capture=True)
        self.q = torch.randn(LAYERS, MAX_BS, HKV * self.group * self.d, device=dev).bfloat16()
        self.k, self.v = (t.to(dev) for t in kv(MAX_BS, self.d, seed=99))
        self.forward(static)  # warmup: compiles, its output is not read
        if self.real:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outs = self.forward(static)
        return static

    def forward(self, static: ForwardBatch) -> list[torch.Tensor]:
        return [self.mosaic.forward_decode(self.q[i], self.k[i], self.v[i], layer, static)
                for i, layer in enumerate(self.layers)]

    def replay(self, static: ForwardBatch, seed: int, prefetch: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One decode step of both requests: the runner's buffer fill and the replay hook,
        then the captured forward, against the reference backend's eager step. With
        ``prefetch`` the scheduler's hook has copied the batch's rows first (decode_rows)."""
        loc = []
        for i in range(2):
            self.req_pool.req_to_token[i, self.lens[i]] = self.next_slot
            loc.append(self.next_slot)
            self.lens[i] += 1
            self.next_slot += 1
        loc = torch.tensor(loc, device=self.device)
        static.out_cache_loc[:2] = loc  # padding row: slot 0
        static.req_pool_indices[:2] = torch.arange(2)
        k, v = kv(MAX_BS, self.d, seed)
        q = torch.randn(LAYERS, MAX_BS, HKV * self.group * self.d, generator=torch.Generator().manual_seed(seed + 1))
        for dst, src in ((self.q, q.bfloat16()), (self.k, k), (self.v, v)):
            dst.copy_(src)
        view = SimpleNamespace(batch_size=MAX_BS, num_padding=MAX_BS - 2, req_pool_indices=static.req_pool_indices,
                               seq_lens=torch.tensor(self.lens + [1]), seq_lens_cpu=torch.tensor(self.lens + [1]),
                               out_cache_loc=loc)
        if prefetch:
            self.pool.decode_rows.prefetch(self.req_pool.req_to_token, static.req_pool_indices[:2], self.lens)
        self.mosaic.init_forward_metadata_out_graph(view)
        if self.real:
            self.graph.replay()
            outs = self.outs
        else:
            with HostWork() as host:
                outs = self.forward(static)
            assert host.calls == [], f"the captured forward did host work: {host.calls}"
        eager = ForwardBatch(forward_mode=ForwardMode.DECODE, batch_size=2, input_ids=torch.zeros(2, dtype=torch.int64),
                             req_pool_indices=torch.arange(2), seq_lens=torch.tensor(self.lens), out_cache_loc=loc,
                             seq_lens_sum=sum(self.lens))
        return [(outs[i][:2], self.native.forward_decode(self.q[i, :2], self.k[i, :2], self.v[i, :2], layer, eager))
                for i, layer in enumerate(self.layers)]


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


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("group,d,prefetch", [(1, 64, False), (3, 64, True), (4, 128, False), (4, 128, True)])
def test_replayed_decode_steps_equal_the_reference_path(group, d, prefetch, device):
    """Prefill (eager), capture, then decode steps as replays while segments fill up and
    get sealed mid-way (every format): each step equals the reference, writes land where
    the reference's do, and the statistics the graph deferred equal the reference's. With
    the rows prefetched by the scheduler's hook, every replay plans from them."""
    if device == "cpu" and torch.cuda.is_available():
        pytest.skip("the kernels are compiled for the GPU here; the cuda case runs them")
    twin = GraphTwin(group, d, device)
    twin.mosaic.init_cuda_graph_state(MAX_BS, MAX_BS)
    for kernel, ref in twin.step([2 * SEG + SEG - 3, SEG - 2], ForwardMode.EXTEND, seed=0):
        torch.testing.assert_close(kernel.float(), ref.float(), atol=2e-2, rtol=2e-2)
    twin.seal(0, 0)
    twin.seal(0, 1)
    static = twin.capture()
    for seed in range(1, 8):
        for kernel, ref in twin.replay(static, seed, prefetch):
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
    rows = twin.pool.decode_rows
    assert (rows.prefetched, rows.read_in_forward) == ((7, 0) if prefetch else (0, 7))


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
