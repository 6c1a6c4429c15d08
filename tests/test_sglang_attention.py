"""The mosaickv attention backend on SGLang's real classes (CPU): all-dense requests equal
TorchNativeAttnBackend bit for bit, compressed segments match the reference oracle, and
the device cache of densified segments keeps its byte bound."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.plugins import load_plugins  # noqa: E402

load_plugins()

from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS  # noqa: E402
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend  # noqa: E402
from sglang.srt.layers.radix_attention import RadixAttention  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode  # noqa: E402
from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES  # noqa: E402

from mosaickv.formats import BlockFormat, SideFormat, pack_block  # noqa: E402
from mosaickv.reference import CompressedLayer, attention  # noqa: E402
from mosaickv.sglang_patch.attention import MosaicAttnBackend, attend_request  # noqa: E402
from mosaickv.kernels.layout import pack_region, plan_host  # noqa: E402
from mosaickv.sglang_patch.attention import DECODE_TUNING, PACK_MAX_SEGMENT, tuning_for  # noqa: E402
from mosaickv.sglang_patch.forward_inputs import host_plan, locate  # noqa: E402
from mosaickv.sglang_patch.pool import MosaicKVPool  # noqa: E402
from mosaickv.sglang_patch.sizing import KVShape, plan_capacity  # noqa: E402

SEG, HKV, LAYERS = 16, 2, 2
SHAPES = [(1, 32), (3, 64), (3, 32), (1, 64)]  # (query heads per KV head, head dim)


def test_backend_is_registered_with_sglang():
    assert ATTENTION_BACKENDS["mosaickv"] is MosaicAttnBackend
    assert "mosaickv" in ATTENTION_BACKEND_CHOICES


def make_pool(d: int, device: str = "cpu", **kw) -> MosaicKVPool:
    shape = KVShape(num_layers=LAYERS, num_kv_heads=HKV, head_dim=d, v_head_dim=d)
    plan = plan_capacity(shape, 1 << 22, segment_size=SEG, ratio=1.0, sinks=0, window=SEG, max_running_requests=2)
    return MosaicKVPool(plan.max_total_num_tokens, page_size=1, dtype=torch.bfloat16, head_num=HKV, head_dim=d,
                        layer_num=LAYERS, device=device, enable_memory_saver=False, plan=plan, enable_alt_stream=False,
                        **kw)


def kv(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [L, n, Hkv, d] in bf16, as a server writes them."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(LAYERS, n, HKV, d, generator=g).bfloat16(),
            torch.randn(LAYERS, n, HKV, d, generator=g).bfloat16())


def lossless(k: torch.Tensor, v: torch.Tensor) -> list[list]:
    """A segment [L, SEG, Hkv, d] packed in the dense format, as the lossless policy seals it."""
    return [[pack_block(k[i, :, h].float(), v[i, :, h].float(), BlockFormat(SEG)) for h in range(HKV)]
            for i in range(LAYERS)]


# -- all dense: bit for bit what torch_native computes -------------------------------------
class Pair:
    """A MosaicKV pool and backend beside a plain MHA pool and TorchNativeAttnBackend that
    hold the same tokens at the same slots, sharing one req-to-token pool."""

    device = "cpu"

    def __init__(self, group: int, d: int, attention: str = "sdpa") -> None:
        self.group, self.d, self.attention = group, d, attention
        self.pool = make_pool(d)
        self.plain = MHATokenToKVPool(self.pool.size, page_size=1, dtype=torch.bfloat16, head_num=HKV, head_dim=d,
                                      layer_num=LAYERS, device="cpu", enable_memory_saver=False,
                                      enable_alt_stream=False)
        self.req_pool = ReqToTokenPool(2, 256, "cpu", False)
        self.mosaic = MosaicAttnBackend(self.runner(self.pool))
        self.native = TorchNativeAttnBackend(self.runner(self.plain))
        self.layers = [RadixAttention(HKV * group, d, 1 / math.sqrt(d), HKV, layer_id=i) for i in range(LAYERS)]
        self.lens = [0, 0]
        self.next_slot = 1

    def runner(self, pool):
        return SimpleNamespace(device="cpu", req_to_token_pool=self.req_pool, token_to_kv_pool=pool,
                               server_args=SimpleNamespace(kv_compress_attention=self.attention))

    def step(self, new: list[int], mode: ForwardMode, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One forward bringing request ``i`` ``new[i]`` tokens further: (mosaic, native) per layer."""
        slots = []
        for i, nq in enumerate(new):
            s = torch.arange(self.next_slot, self.next_slot + nq)
            self.req_pool.req_to_token[i, self.lens[i] : self.lens[i] + nq] = s.int()
            self.lens[i] += nq
            self.next_slot += nq
            slots.append(s)
        loc = torch.cat(slots)
        n = len(loc)
        batch = ForwardBatch(forward_mode=mode, batch_size=len(new), input_ids=torch.zeros(n, dtype=torch.int64),
                             req_pool_indices=torch.arange(len(new)), seq_lens=torch.tensor(self.lens),
                             out_cache_loc=loc, seq_lens_sum=sum(self.lens), extend_seq_lens_cpu=new,
                             extend_seq_lens=torch.tensor(new),
                             extend_prefix_lens=torch.tensor([t - q for t, q in zip(self.lens, new)]))
        k, v = kv(n, self.d, seed)
        q = torch.randn(LAYERS, n, HKV * self.group * self.d, generator=torch.Generator().manual_seed(seed + 1))
        k, v, q, batch.out_cache_loc = (t.to(self.device) for t in (k, v, q, loc))
        out = []
        for i, layer in enumerate(self.layers):
            run = [b.forward_extend if mode.is_extend() else b.forward_decode for b in (self.mosaic, self.native)]
            out.append(tuple(r(q[i].bfloat16(), k[i], v[i], layer, batch) for r in run))
        return out

    def seal(self, req: int, segment: int) -> None:
        slots = self.req_pool.req_to_token[req, segment * SEG : (segment + 1) * SEG].long()
        k = torch.stack([self.plain.k_buffer[i][slots] for i in range(LAYERS)])
        v = torch.stack([self.plain.v_buffer[i][slots] for i in range(LAYERS)])
        self.pool.seal(slots.tolist(), lossless(k, v))


@pytest.mark.parametrize("group,d", SHAPES)
def test_all_dense_request_equals_torch_native_bit_for_bit(group, d):
    pair = Pair(group, d)
    assert all(torch.equal(a, b) for a, b in pair.step([2 * SEG + 3, 5], ForwardMode.EXTEND, seed=0))
    pair.seal(0, 1)  # request 0: dense sink, a lossless sealed segment, dense tail
    pair.seal(0, 0)  # ... then the sink too: two slabs in a row
    for seed, (new, mode) in enumerate([([6, 2 * SEG], ForwardMode.EXTEND), ([1, 1], ForwardMode.DECODE),
                                         ([1, 1], ForwardMode.DECODE), ([SEG, 3], ForwardMode.EXTEND)]):
        for mosaic, native in pair.step(new, mode, seed=10 + seed):
            assert mosaic.dtype == torch.bfloat16 and torch.equal(mosaic, native)
    info = pair.pool.stats()
    assert info["sealed_segments"] == 2 and info["segment_cache_hits"] > 0  # the slabs were read, not dense rows


# -- compressed segments: the reference oracle, to bf16 rounding -----------------------------
def compressed_request(group: int, d: int, ragged: bool, nq: int, **pool_kw):
    """A pool holding one request: dense segment 0, segment 1 sealed with sparse keys and
    low-rank values, segment 2 with masked keys and dropped tokens (per KV head apart when
    ``ragged``), segment 3 with every token dropped, then a dense tail ending in the ``nq``
    queries' own tokens. Returns the pool, its slots, the queries, the reference's layer
    and dense tail per layer."""
    pool = make_pool(d, **pool_kw)
    n = 4 * SEG + 5 + nq
    k, v = kv(n, d, seed=group + d)
    slots = torch.arange(1, n + 1)
    for i in range(LAYERS):
        pool._store_kv_layer(i, slots, k[i], v[i])
    g = torch.Generator().manual_seed(7)
    formats = {1: [BlockFormat(SEG, SideFormat("sparse", 8), SideFormat("lowrank", 4))] * HKV,
               2: [BlockFormat(SEG - 5 - (3 * h if ragged else 0), SideFormat("mask", d // 2)) for h in range(HKV)],
               3: [BlockFormat(0)] * HKV}
    layers = [CompressedLayer() for _ in range(LAYERS)]
    for i in range(LAYERS):
        layers[i].append([pack_block(k[i, :SEG, h].float(), v[i, :SEG, h].float(), BlockFormat(SEG))
                          for h in range(HKV)])
    for seg, fmts in formats.items():
        rows = slice(seg * SEG, (seg + 1) * SEG)
        blocks = [[pack_block(k[i, rows, h].float(), v[i, rows, h].float(), fmts[h],
                              token_score=torch.rand(SEG, generator=g)) for h in range(HKV)] for i in range(LAYERS)]
        pool.seal(slots[rows].tolist(), blocks)
        for i in range(LAYERS):
            layers[i].append(blocks[i])
    q = torch.randn(nq, HKV * group, d, generator=g).bfloat16()
    tails = [(k[i, 4 * SEG :].transpose(0, 1), v[i, 4 * SEG :].transpose(0, 1)) for i in range(LAYERS)]
    return pool, slots, q, layers, tails


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("nq", [1, 6])
@pytest.mark.parametrize("group,d", SHAPES)
def test_compressed_segments_match_the_reference(group, d, ragged, nq):
    pool, slots, q, layers, tails = compressed_request(group, d, ragged, nq)
    scale = 1 / math.sqrt(d)
    for i in range(LAYERS):
        out, lse = attend_request(pool, i, q, locate(pool, slots), scale, extend=nq > 1, with_lse=True)
        want, want_lse = attention(q.float().transpose(0, 1), layers[i], *tails[i], scale=scale, return_lse=True)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), want.transpose(0, 1), atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(lse, want_lse.transpose(0, 1), atol=1e-3, rtol=1e-3)


def test_lse_of_dense_tokens_equals_the_reference():
    pool, d, n, nq = make_pool(64), 64, 2 * SEG + 9, 9
    k, v = kv(n, d, seed=3)
    slots = torch.arange(1, n + 1)
    for i in range(LAYERS):
        pool._store_kv_layer(i, slots, k[i], v[i])
    pool.seal(slots[:SEG].tolist(), lossless(k[:, :SEG], v[:, :SEG]))
    q = torch.randn(nq, 2 * HKV, d).bfloat16()
    _, lse = attend_request(pool, 1, q, locate(pool, slots), 0.125, extend=True, with_lse=True)
    _, want = attention(q.float().transpose(0, 1), CompressedLayer(), k[1].transpose(0, 1), v[1].transpose(0, 1),
                        scale=0.125, return_lse=True)
    torch.testing.assert_close(lse, want.transpose(0, 1), atol=1e-5, rtol=1e-5)


# -- the device cache of densified segments ---------------------------------------------------
def test_segment_cache_keeps_its_byte_bound_and_free_slab_clears_it():
    entry = 2 * SEG * HKV * 32 * 2  # one layer of a segment that kept every token: keys and values in bf16
    outs = {}
    for limit in (1 << 30, entry, 0):
        pool, slots, q, _, _ = compressed_request(3, 32, False, 4, segment_cache_bytes=limit)
        for _ in range(2):  # the second pass finds what the first densified, if it fitted
            outs[limit] = [attend_request(pool, i, q, locate(pool, slots), 0.2, extend=True, with_lse=False)[0]
                           for i in range(LAYERS)]
            assert pool.stats()["segment_cache_bytes_in_use"] <= limit
        assert torch.equal(torch.stack(outs[limit]), torch.stack(outs[1 << 30]))  # evicted or not: same output
    info = pool.stats()  # limit 0: nothing with bytes is kept
    assert info["segment_cache_bytes_in_use"] == 0 and info["segment_cache_limit_bytes"] == 0
    pool, slots, q, _, _ = compressed_request(3, 32, False, 4)
    slabs = [r for r in locate(pool, slots) if isinstance(r, int)]
    for _ in range(2):
        for i in range(LAYERS):
            attend_request(pool, i, q, locate(pool, slots), 0.2, extend=True, with_lse=False)
    info = pool.stats()
    assert info["segment_cache_limit_bytes"] == 1 << 30
    assert info["segment_cache_entries"] == LAYERS * len(slabs)
    assert info["segment_cache_misses"] == info["segment_cache_hits"] == LAYERS * len(slabs)
    pool.free_slab(slabs[0])  # segment 1 kept every token
    after = pool.stats()
    assert after["segment_cache_entries"] == LAYERS * (len(slabs) - 1)
    assert after["segment_cache_bytes_in_use"] == info["segment_cache_bytes_in_use"] - LAYERS * entry


# -- the Triton path: the same pool read by the kernels and by the reference path ----------
FORMATS = [  # one per sealed segment and KV head: every kind, ragged token counts, all dropped
    [BlockFormat(SEG, SideFormat("sparse", 8), SideFormat("lowrank", 4)), BlockFormat(SEG - 3, SideFormat("mask", 16))],
    [BlockFormat(0), BlockFormat(0)],
    [BlockFormat(SEG), BlockFormat(SEG // 2, SideFormat("lowrank", 8), SideFormat("sparse", 16))],
]


class Twin(Pair):
    """Two MosaicKV pools holding the same tokens and the same sealed segments, one read
    through the Triton kernels, the other through the PyTorch reference path."""

    def __init__(self, group: int, d: int, device: str = "cpu") -> None:
        self.group, self.d, self.device = group, d, device
        self.req_pool = ReqToTokenPool(2, 256, "cpu", False)
        self.pool, self.ref_pool = (make_pool(d, attention_window=SEG, device=device) for _ in range(2))
        self.attention = "triton"
        self.mosaic = MosaicAttnBackend(self.runner(self.pool))
        self.attention = "sdpa"
        self.native = MosaicAttnBackend(self.runner(self.ref_pool))
        self.layers = [RadixAttention(HKV * group, d, 1 / math.sqrt(d), HKV, layer_id=i) for i in range(LAYERS)]
        self.lens = [0, 0]
        self.next_slot = 1
        self.sealed = 0

    def seal(self, req: int, segment: int) -> None:
        """Seal one segment in both pools with the next formats of :data:`FORMATS`."""
        slots = self.req_pool.req_to_token[req, segment * SEG : (segment + 1) * SEG].long()
        rows = self.pool.dense_rows(slots)
        g = torch.Generator().manual_seed(self.sealed)
        fmts = FORMATS[self.sealed % len(FORMATS)]
        blocks = [[pack_block(self.pool.k_buffer[i][rows, h].float().cpu(), self.pool.v_buffer[i][rows, h].float().cpu(), fmts[h],
                              token_score=torch.rand(SEG, generator=g)) for h in range(HKV)] for i in range(LAYERS)]
        self.sealed += 1
        for pool in (self.pool, self.ref_pool):
            pool.seal(slots.tolist(), blocks)


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("group,d", [(1, 64), (3, 64), (4, 128), (8, 64)])
def test_kernel_path_matches_the_reference_path(group, d, device):
    """Chunked prefill, sealing in between (every format, ragged heads, a segment with every
    token dropped), decode and a second prefill over sealed prefixes: the kernels' output
    and the query statistics they record (from their log-sum-exp) match the reference."""
    if device == "cpu" and torch.cuda.is_available():
        pytest.skip("the kernels are compiled for the GPU here; the cuda case runs them")
    twin = Twin(group, d, device)
    assert twin.mosaic.kernels and not twin.native.kernels
    schedule = [([2 * SEG + 3, 5], ForwardMode.EXTEND, [(0, 0), (0, 1)]),
                ([1, 1], ForwardMode.DECODE, []),
                ([SEG + 2, 2 * SEG], ForwardMode.EXTEND, [(0, 2), (1, 0)]),
                ([1, 1], ForwardMode.DECODE, []),
                ([1, 1], ForwardMode.DECODE, []),
                ([6, 1], ForwardMode.EXTEND, [])]
    for seed, (new, mode, seals) in enumerate(schedule):
        for kernel, ref in twin.step(new, mode, seed=seed):
            assert kernel.dtype == torch.bfloat16 and torch.isfinite(kernel).all()
            torch.testing.assert_close(kernel.float(), ref.float(), atol=2e-2, rtol=2e-2)
        for req, segment in seals:
            twin.seal(req, segment)
    assert twin.pool.stats()["sealed_segments"] == 4
    assert_same_stats(twin.pool.query_stats, twin.ref_pool.query_stats)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_an_extend_reads_dense_rows_between_sealed_segments_and_requests_without_any(device):
    """The dense part of an extend (SGLang's extend kernel) takes a request's dense rows
    whatever their place among its sealed segments (a dense sink first, a dense segment
    between two sealed ones), beside a request with no sealed segment and one whose only
    new token is its first: the merged output matches the reference."""
    if device == "cpu" and torch.cuda.is_available():
        pytest.skip("the kernels are compiled for the GPU here; the cuda case runs them")
    twin = Twin(4, 64, device)
    twin.step([4 * SEG + 3, 1], ForwardMode.EXTEND, seed=0)
    twin.seal(0, 1)
    twin.seal(0, 3)  # request 0: dense, sealed, dense, sealed, dense tail
    for seed, new in enumerate(([5, 7], [1, 1], [SEG, 2])):
        for kernel, ref in twin.step(new, ForwardMode.EXTEND, seed=seed + 1):
            assert torch.isfinite(kernel).all()
            torch.testing.assert_close(kernel.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert_same_stats(twin.pool.query_stats, twin.ref_pool.query_stats)


def assert_same_stats(a, b) -> None:
    """Two pools' query statistics hold the same segments with close sums, equal counts."""
    a.flush(), b.flush()
    assert a._rows.keys() == b._rows.keys() and len(a) > 0
    for key in a._rows:
        i, j = a._rows[key], b._rows[key]
        torch.testing.assert_close(a._sum[i], b._sum[j], atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(a._attn[i], b._attn[j], atol=2e-3, rtol=2e-2)
        assert torch.equal(a._count[i], b._count[j]) and torch.equal(a._attn_count[i], b._attn_count[j])


def test_the_decode_tuning_reads_every_block_it_takes_as_one_tile_whole():
    """With block_stages a launch of a block a tile reads BLOCK_N tokens of each block and
    no more; the server's planner does not look at kept tokens, so the tiles must hold the
    longest segment the tuning is chosen for (blocks keep at most their segment's tokens)."""
    assert tuning_for(False, PACK_MAX_SEGMENT) is DECODE_TUNING and DECODE_TUNING.block_stages > 0
    read_whole = [DECODE_TUNING.tile_n(k, v) for k in range(4) for v in range(4) if DECODE_TUNING.block_loop_stages(k, v)]
    assert read_whole and min(read_whole) >= PACK_MAX_SEGMENT, read_whole


def test_kernel_path_plans_once_per_forward():
    twin = Twin(3, 64)
    twin.step([SEG + 4, 3], ForwardMode.EXTEND, seed=0)
    twin.seal(0, 0)
    batch_plans = []
    original = MosaicAttnBackend._forward_plan

    def counting(self, forward_batch, *args):
        plan = original(self, forward_batch, *args)
        batch_plans.append(id(plan))
        return plan

    MosaicAttnBackend._forward_plan = counting
    try:
        twin.step([1, 1], ForwardMode.DECODE, seed=1)
    finally:
        MosaicAttnBackend._forward_plan = original
    assert len(batch_plans) == LAYERS and len(set(batch_plans)) == 1  # every layer reads the one plan


def compiled_kernels() -> int:
    """Variants of the attention kernel compiled so far (Triton's per-device caches)."""
    from mosaickv.kernels.decode import _mixed_attn_kernel

    return sum(len(cache[0]) for cache in _mixed_attn_kernel.device_caches.values())


@pytest.mark.parametrize("value_channels", [False, True])
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_compiled_variants_cover_every_launch_of_the_policys_segments(device, value_channels):
    """The kernels compiled before the first batch (the policy's candidate formats) are
    all that batches of segments the policy really sealed launch; on the GPU, running
    those batches compiles nothing more. The ``mosaic`` preset, and the same with
    per-vector value channels (``value_widths`` as the keys')."""
    from dataclasses import replace

    from mosaickv.compressor import compress_segment
    from mosaickv.config import load_policy
    from mosaickv.kernels.decode import run_plan
    from mosaickv.kernels.layout import launch_variants
    from mosaickv.sglang_patch.attention import RequestKV, plan_forward
    from mosaickv.sglang_patch.sizing import segment_budget_bytes

    if device == "cpu" and torch.cuda.is_available():
        pytest.skip("the kernels are compiled for the GPU here; the cuda case runs them")
    d, group = 64, 3
    policy = load_policy("mosaic", segment_size=SEG, window=SEG)
    if value_channels:
        policy = replace(policy, strategy=replace(policy.strategy, value_widths=None))
    policy = policy.bind(d)
    twin = Twin(group, d, device)
    twin.mosaic._policy = policy
    twin.mosaic._compile(HKV * group)  # in the interpreter on the CPU: every variant launches
    compiled = compiled_kernels() if device == "cuda" else 0
    sides = [SideFormat("dense"), *policy.strategy.candidates(d, policy.channel_selector)]
    variants = set(launch_variants(sides))
    budget = segment_budget_bytes(KVShape(LAYERS, HKV, d, d), SEG, 3.0)
    g = torch.Generator().manual_seed(0)
    slabs = []
    for seg in range(6):
        k, v = (torch.randn(LAYERS, HKV, SEG, d, generator=g) * (1 + seg) for _ in range(2))
        blocks = compress_segment(policy, k, v, budget, query_stats=torch.rand(LAYERS, HKV, d, generator=g) + 0.1,
                                  attention=torch.softmax(torch.randn(LAYERS, HKV, SEG, generator=g) * 3, -1))
        slabs.append(twin.pool.seal(list(range(1 + seg * SEG, 1 + (seg + 1) * SEG)), blocks))
    launched = set()
    for nq, extend in ((1, False), (5, True), (1, False), (40, True)):
        req = RequestKV(torch.arange(1, 6 * SEG + nq + 1), [*slabs, torch.arange(1, nq + 1)], nq)
        plan = plan_forward(twin.pool, [req, req], HKV * group, extend)
        launched |= {(ln.k_kind, ln.v_kind, ln.r_max) for layer in plan.layers for ln in layer.launches}
        if device == "cuda":
            q = torch.randn(2 * nq, HKV * group, d, device=device).bfloat16()
            lse = torch.empty(2 * nq, HKV * group, device=device)
            for i, layer_plan in enumerate(plan.layers):
                run_plan(layer_plan, twin.pool.arena.values, twin.pool.arena.data, twin.pool.block_table,
                         twin.pool.widths_aligned, twin.pool.k_buffer[i], twin.pool.v_buffer[i], plan.tail_rows, q,
                         torch.empty_like(q), 0.125, plan.group, plan.tuning, lse)
    assert len(launched) >= (4 if value_channels else 3) and launched <= variants
    if device == "cuda":
        torch.cuda.synchronize()
        assert compiled_kernels() == compiled, "a batch compiled a kernel variant the warm-up did not"


def runs_by_layer(host) -> list[list[tuple]]:
    """Each layer's items as (request, head, row0, kind, the blocks they read, tail range
    or packed tiles' starts): what two plans must agree on, wherever their block indices
    (and tile starts) put those blocks."""
    rows = host.block_indices.cpu().numpy()
    tiles = np.zeros(0, dtype=np.int32) if host.tiles is None else host.tiles.cpu().numpy()
    out = []
    for layer in host.layers:
        kinds = np.zeros(len(layer.items), dtype=np.int64)
        for k, v, _, ids in layer.launches:
            kinds[ids] = k * 8 + v
        out.append(sorted((int(it[0]), int(it[1]), int(it[2]), int(kind), tuple(rows[it[3]:it[4]].tolist()),
                           (int(it[5]), int(it[6])) if kind < 0 else tuple(tiles[it[5]:it[6]].tolist()))
                          for it, kind in zip(layer.items, kinds)))
    return out


def test_a_plan_reuses_each_requests_runs_until_a_slab_holds_another_segment():
    """host_plan finds a request's block runs once (RunCache): a second plan of the same
    batch finds none, and both equal plan_host over the whole batch. A slab sealed again
    (another segment's formats in its table rows) is found again."""
    twin = Twin(3, 64)
    twin.step([3 * SEG + 2, 2 * SEG + 1], ForwardMode.EXTEND, seed=0)
    for req, segment in ((0, 0), (0, 1), (1, 0)):
        twin.seal(req, segment)
    pool, backend = twin.pool, twin.mosaic
    reqs = backend._requests(torch.arange(2), twin.lens, [1, 1])
    cache = pool.run_cache

    def whole_batch(chunk):  # plan_host finding the batch's runs itself
        from mosaickv.sglang_patch.forward_inputs import block_rows

        slabs = [np.asarray([r for r in req.runs if isinstance(r, int)], dtype=np.int64) for req in reqs]
        counts = np.asarray([len(s) for s in slabs])
        indptr = np.concatenate([[0], np.cumsum(np.tile(np.repeat(counts, HKV), LAYERS))])
        tails = [sum(len(r) for r in req.runs if not isinstance(r, int)) for req in reqs]
        return plan_host(pool.block_table, indptr, block_rows(np.concatenate(slabs), counts, LAYERS, HKV),
                         [1, 1], tails, LAYERS, HKV, 3, DECODE_TUNING.block_m, DECODE_TUNING.block_n, chunk, 8,
                         tile_shape=DECODE_TUNING.tile_shape())

    first, _ = host_plan(pool, reqs, 3, DECODE_TUNING, 8, chunk_tokens=64)
    misses = cache.misses
    second, _ = host_plan(pool, reqs, 3, DECODE_TUNING, 8, chunk_tokens=64)
    assert misses > 0 and cache.misses == misses  # nothing found again
    assert runs_by_layer(first) == runs_by_layer(second) == runs_by_layer(whole_batch(64))

    slab = next(r for r in reqs[1].runs if isinstance(r, int))
    before = pool.block_table_host[pool.table_row(slab, 0)].copy()
    pages = pool._slab_pages[slab]
    other = [[pack_block(torch.randn(SEG, 64), torch.randn(SEG, 64), BlockFormat(SEG // 2, SideFormat("sparse", 4)))
              for _ in range(HKV)] for _ in range(LAYERS)]
    pool.install(slab, pages, pack_region([b for layer in other for b in layer], 64, pool.arena.base(slab)))
    assert not np.array_equal(pool.block_table_host[pool.table_row(slab, 0)], before)
    third, _ = host_plan(pool, reqs, 3, DECODE_TUNING, 8, chunk_tokens=64)
    assert cache.misses > misses
    assert runs_by_layer(third) == runs_by_layer(whole_batch(64)) != runs_by_layer(first)


def test_a_request_that_sealed_one_more_segment_extends_its_kept_blocks():
    """A decode step after a request sealed a segment extends the blocks a plan kept for
    it (RunCache.extends) instead of grouping them all again, and plans as the whole batch
    does; the other request's runs are reused."""
    twin = Twin(3, 64)
    twin.step([3 * SEG + 2, 2 * SEG + 1], ForwardMode.EXTEND, seed=0)
    for req, segment in ((0, 0), (1, 0)):
        twin.seal(req, segment)
    pool, backend, cache = twin.pool, twin.mosaic, twin.pool.run_cache
    reqs = backend._requests(torch.arange(2), twin.lens, [1, 1])
    host_plan(pool, reqs, 3, DECODE_TUNING, 8, chunk_tokens=64)
    assert cache.extends == 0
    twin.seal(0, 1)
    reqs = backend._requests(torch.arange(2), twin.lens, [1, 1])
    hits, misses = cache.hits, cache.misses
    extended, _ = host_plan(pool, reqs, 3, DECODE_TUNING, 8, chunk_tokens=64)
    assert cache.extends == 1 and cache.misses - misses == 2  # request 0's blocks (extended) and runs
    assert cache.hits - hits == 2  # request 1's blocks and runs
    cache.clear()
    whole, _ = host_plan(pool, reqs, 3, DECODE_TUNING, 8, chunk_tokens=64)
    assert cache.extends == 1  # found whole this time
    assert runs_by_layer(extended) == runs_by_layer(whole)


def test_dense_tokens_share_tiles_only_where_segments_are_short() -> None:
    """Packing won on an H200 with 32-token segments; with 128-token ones one block per
    tile read more (in an earlier run, not side by side)."""
    from mosaickv.sglang_patch.attention import PACK_MAX_SEGMENT, tuning_for

    for extend in (False, True):
        assert tuning_for(extend, 32).pack_tokens and tuning_for(extend, 8).pack_tokens
        assert not tuning_for(extend, 128).pack_tokens and not tuning_for(extend, PACK_MAX_SEGMENT + 1).pack_tokens
        assert tuning_for(extend, 32).block_m == tuning_for(extend, 128).block_m == (64 if extend else 16)
