"""Sealing end to end on SGLang's real classes (CPU): queries recorded by the attention
backend reach ``compress_segment``, failing policy parts leave segments dense, and a full
arena leaves segments dense until eviction frees slabs."""

from __future__ import annotations

import logging
import math
from array import array
from dataclasses import dataclass, replace
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.plugins import load_plugins  # noqa: E402

load_plugins()

from sglang.srt.layers.radix_attention import RadixAttention  # noqa: E402
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams  # noqa: E402
from sglang.srt.mem_cache.cache_init_params import CacheInitParams  # noqa: E402
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixKey  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode  # noqa: E402

from mosaickv.config import load_policy  # noqa: E402
from mosaickv.formats import BlockFormat, pack_block  # noqa: E402
from mosaickv.parts import ElementScorer, Observation, segment_observation  # noqa: E402
from mosaickv.registry import register_scorer  # noqa: E402
from mosaickv.sglang_patch.attention import MosaicAttnBackend  # noqa: E402
from mosaickv.sglang_patch.pool import UNMAPPED, MosaicKVPool, kv_compress_info  # noqa: E402
from mosaickv.sglang_patch.query_stats import SegmentQueryStats  # noqa: E402
from mosaickv.sealer import PolicyCompressor  # noqa: E402
from mosaickv.sglang_patch.radix import LEFT_DENSE, MosaicRadixCache  # noqa: E402
from mosaickv.sglang_patch.sizing import KVShape, plan_capacity  # noqa: E402

HQ, HKV, D, LAYERS = 4, 2, 64, 2
SHAPE = KVShape(num_layers=LAYERS, num_kv_heads=HKV, head_dim=D, v_head_dim=D)
MOSAIC = load_policy("mosaic")  # segment 32, one sink segment, window 32, ratio 3
SEG = MOSAIC.segment_size
RADIX_LOGGER = "mosaickv.sglang_patch.radix"


class Stack:
    """Pool, allocator, req-to-token pool, radix cache and attention backend, as a scheduler wires them."""

    def __init__(self, policy=MOSAIC, num_slabs: int | None = None, compress=None, background: bool = False) -> None:
        plan = plan_capacity(SHAPE, 4 << 20, segment_size=policy.segment_size, ratio=float(policy.ratio),
                             sinks=policy.sinks, window=policy.window, max_running_requests=4)
        if num_slabs is not None:
            plan = replace(plan, num_slabs=num_slabs,
                           max_total_num_tokens=plan.dense_tail_tokens + num_slabs * policy.segment_size)
        self.pool = MosaicKVPool(plan.max_total_num_tokens, page_size=1, dtype=torch.bfloat16, head_num=HKV,
                                 head_dim=D, layer_num=LAYERS, device="cpu", enable_memory_saver=False, plan=plan,
                                 attention_window=policy.token_scorer.attention_window, enable_alt_stream=False)
        self.alloc = TokenToKVPoolAllocator(plan.max_total_num_tokens, torch.bfloat16, "cpu", self.pool,
                                            need_sort=False)
        self.req_pool = ReqToTokenPool(4, 1024, "cpu", False)
        params = CacheInitParams(disable=False, req_to_token_pool=self.req_pool,
                                 token_to_kv_pool_allocator=self.alloc, page_size=1)
        self.tree = MosaicRadixCache(params, compress=compress or PolicyCompressor(policy, D),
                                     segment_size=policy.segment_size, sink_segments=policy.sink_segments,
                                     window=policy.window, background=background)
        runner = SimpleNamespace(device="cpu", req_to_token_pool=self.req_pool, token_to_kv_pool=self.pool)
        self.backend = MosaicAttnBackend(runner)
        self.layers = [RadixAttention(HQ, D, 1 / math.sqrt(D), HKV, layer_id=i) for i in range(LAYERS)]

    def forward(self, req: int, length: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                decode: bool = False) -> list[torch.Tensor]:
        """One step of request ``req`` that brings it to ``length`` tokens: the step's
        q [L, nq, Hq, d], k, v [L, nq, Hkv, d]. Returns each layer's attention output."""
        nq = q.shape[1]
        slots = self.alloc.alloc(nq)
        self.req_pool.req_to_token[req, length - nq : length] = slots.int()
        batch = ForwardBatch(forward_mode=ForwardMode.DECODE if decode else ForwardMode.EXTEND, batch_size=1,
                             input_ids=torch.zeros(nq, dtype=torch.int64), req_pool_indices=torch.tensor([req]),
                             seq_lens=torch.tensor([length]), out_cache_loc=slots, seq_lens_sum=length,
                             extend_seq_lens_cpu=[nq])
        run = self.backend.forward_decode if decode else self.backend.forward_extend
        return [run(q[i].reshape(nq, HQ * D), k[i], v[i], layer, batch).view(nq, HQ, D)
                for i, layer in enumerate(self.layers)]

    def insert(self, req: int, tokens: list[int]) -> None:
        slots = self.req_pool.req_to_token[req, : len(tokens)].long()
        self.tree.insert(InsertParams(key=RadixKey(array("l", tokens)), value=slots))

    def slabs(self) -> list[int]:
        out, stack = [], [self.tree.root_node]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            out += getattr(node, "mosaic_slabs", [])
        return out


def sequence(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [L, n, Hq, d], k, v [L, n, Hkv, d], bf16 values as a server computes them; queries
    have uneven channel magnitudes, as real ones do."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.2, 3.0, D)
    q = (torch.randn(LAYERS, n, HQ, D, generator=g) * scale).bfloat16().float()
    k = torch.randn(LAYERS, n, HKV, D, generator=g).bfloat16()
    v = torch.randn(LAYERS, n, HKV, D, generator=g).bfloat16()
    return q, k, v


def prefill(stack: Stack, req: int, q, k, v, chunks: list[int]) -> None:
    """Run the request's tokens through the backend in the given chunk sizes (1 = decode step)."""
    done = 0
    for size in chunks:
        sl = slice(done, done + size)
        stack.forward(req, done + size, q[:, sl], k[:, sl], v[:, sl], decode=size == 1)
        done += size


def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: bool = False):
    """Plain attention of the last nq tokens over all n, GQA, float32: [nq, Hq, d] (and
    the log-sum-exp [nq, Hq] with ``lse``)."""
    nq, n = q.shape[0], k.shape[0]
    kk = k.float().repeat_interleave(HQ // HKV, dim=1).transpose(0, 1)
    vv = v.float().repeat_interleave(HQ // HKV, dim=1).transpose(0, 1)
    logits = q.float().transpose(0, 1) @ kk.transpose(1, 2) / math.sqrt(D)
    mask = torch.arange(n)[None, :] <= (n - nq + torch.arange(nq))[:, None]
    logits = logits.masked_fill(~mask, float("-inf"))
    out = (torch.softmax(logits, -1) @ vv).transpose(0, 1)
    return (out, torch.logsumexp(logits, -1).transpose(0, 1)) if lse else out


# -- 1. query statistics ------------------------------------------------------------------
def observed(q, k, v, seg: int, window: int = MOSAIC.token_scorer.attention_window) -> list[Observation]:
    """Offline, what sealing segment ``seg`` of each layer should see: ``segment_observation``."""
    return [segment_observation(Observation(k[i].transpose(0, 1), v[i].transpose(0, 1), q[i].transpose(0, 1)),
                                seg * SEG, (seg + 1) * SEG, window) for i in range(LAYERS)]


@pytest.mark.parametrize("window", [32, 8])
def test_segment_stats_equal_the_offline_segment_observation_across_chunks(window):
    q, k, v = sequence(80, seed=1)
    slots = torch.arange(100, 180)
    stats = SegmentQueryStats(LAYERS, HKV, D, SEG, window=window)
    for lo, hi in [(0, 20), (20, 70), (70, 71), (71, 80)]:  # chunked prefill, then decode steps
        for layer in range(LAYERS):
            out = causal(q[layer, lo:hi], k[layer, :hi], v[layer, :hi], lse=True)[1]
            stats.observe(layer, q[layer, lo:hi], slots[:hi], keys=k[layer, lo // SEG * SEG : hi], lse=out,
                          scale=1 / math.sqrt(D))
    for seg in (0, 1):
        want = observed(q, k, v, seg, window)
        torch.testing.assert_close(stats.rms(int(slots[seg * SEG])), torch.stack([o.query_stats for o in want]))
        got = stats.attention(int(slots[seg * SEG]))
        torch.testing.assert_close(got, torch.stack([o.attention for o in want]), atol=1e-6, rtol=1e-5)
        assert got.sum(-1).min() > 0.05  # a segment's own queries pay it real attention
    # Segment 2 holds positions 0..15 of 32: with a window of 8 none of its queries counts yet.
    assert (stats.attention(int(slots[2 * SEG])) is None) == (window == 8)
    # A sealing call reads many segments at once, an unknown one among them (zeros).
    keys = [int(slots[0]), int(slots[SEG]), int(slots[2 * SEG]), 9999]
    rms, rms_ok = stats.rms_many(keys)
    attn, attn_ok = stats.attention_many(keys)
    assert rms_ok == [True, True, True, False] and attn_ok == [True, True, window != 8, False]
    for seg in (0, 1):
        want = observed(q, k, v, seg, window)
        torch.testing.assert_close(rms[seg], torch.stack([o.query_stats for o in want]))
        torch.testing.assert_close(attn[seg], torch.stack([o.attention for o in want]), atol=1e-6, rtol=1e-5)
    assert not rms[3].any() and not attn[3].any() and (window != 8 or not attn[2].any())
    stats.release(slots[SEG : SEG + 1])  # freeing a segment's first slot drops its statistics
    assert stats.rms(int(slots[SEG])) is None and stats.attention(int(slots[SEG])) is None
    assert stats.rms(int(slots[0])) is not None


def test_decode_batches_add_the_same_statistics_as_one_request_at_a_time():
    """Two requests decoding together (observe_decode: sums left on the device, one copy
    per step) end with the statistics that observe adds request by request, including
    when they are read between two layers of a step."""
    seqs = [sequence(70, seed=2), sequence(70, seed=3)]
    slots = [torch.arange(100, 170), torch.arange(300, 370)]
    batched, alone = (SegmentQueryStats(LAYERS, HKV, D, SEG, window=8) for _ in range(2))
    scale = 1 / math.sqrt(D)
    for (q, k, v), sl in zip(seqs, slots):  # the prefill of both, request by request
        for stats in (batched, alone):
            for layer in range(LAYERS):
                stats.observe(layer, q[layer, :40], sl[:40], keys=k[layer, :40],
                              lse=causal(q[layer, :40], k[layer, :40], v[layer, :40], lse=True)[1], scale=scale)
    for p in range(40, 70):
        seg0 = p // SEG * SEG
        for layer in range(LAYERS):
            lses = [causal(q[layer, p : p + 1], k[layer, : p + 1], v[layer, : p + 1], lse=True)[1] for q, k, v in seqs]
            for (q, k, _), sl, lse in zip(seqs, slots, lses):
                alone.observe(layer, q[layer, p : p + 1], sl[: p + 1], keys=k[layer, seg0 : p + 1], lse=lse, scale=scale)
            keys = torch.stack([torch.cat([k[layer, seg0 : p + 1], k[layer, : SEG - (p + 1 - seg0)]]) for _, k, _ in seqs])
            batched.observe_decode(layer, torch.stack([q[layer, p] for q, _, _ in seqs]),
                                   [int(sl[seg0]) for sl in slots], torch.tensor([p - seg0, p - seg0]),
                                   keys=keys, lse=torch.cat(lses), scale=scale)
            if p == 50 and layer == 0:  # a read between two layers of a step sees what is done
                assert torch.equal(batched.rms(int(slots[0][0])), alone.rms(int(slots[0][0])))
    for sl in slots:
        for seg in range(70 // SEG + 1):
            key = int(sl[seg * SEG])
            torch.testing.assert_close(batched.rms(key), alone.rms(key), rtol=0, atol=0)
            a, b = batched.attention(key), alone.attention(key)
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert len(batched) == len(alone) == 2 * (70 // SEG + 1)


def test_the_mosaic_policy_seals_the_same_bytes_in_a_worker_process_as_inline():
    """The server's path: the policy pickled to a sealing process, the segment and its
    query statistics sent there, the region sent back."""
    sealed = []
    for background in (False, True):
        stack = Stack(background=background)
        q, k, v = sequence(128, seed=4)
        prefill(stack, 0, q, k, v, [64, 63, 1])
        stack.insert(0, list(range(128)))
        stack.tree.drain(wait=True)
        pool = stack.pool
        assert kv_compress_info(pool)["worker_errors"] == 0 and kv_compress_info(pool)["part_failures"] == {}
        sealed.append({tuple(pool._slab_pages[slab]): (pool.arena.view(slab).clone(),
                                                       pool.block_table_host[pool.table_row(slab, 0)].copy())
                       for slab in pool._slab_pages})
    inline, worker = sealed
    assert len(inline) == 2 and inline.keys() == worker.keys()
    for pages in inline:
        assert torch.equal(inline[pages][0], worker[pages][0]) and (inline[pages][1] == worker[pages][1]).all()


def test_sealing_with_mosaic_preset_gets_the_backend_query_stats_and_fits_the_slab():
    seen = []
    real = PolicyCompressor(MOSAIC, D)

    def spy(k, v, budget, query_stats, attention):
        seen.append((query_stats, attention))
        return real(k, v, budget, query_stats, attention)

    stack = Stack(compress=spy)
    q, k, v = sequence(128, seed=2)
    prefill(stack, 0, q, k, v, [50, 46, 1, 1, 30])
    stack.insert(0, list(range(128)))
    stack.tree.drain(wait=True)
    pool = stack.pool
    # Segment 0 is the sink, segment 3 lies in the window: segments 1 and 2 are sealed.
    assert [s >= 0 for s in stack.slabs()] == [False, True, True, False]
    info = kv_compress_info(pool)
    assert info["compression_calls"] == 2 and info["part_failures"] == {} and info["sealed_segments"] == 2
    for seg, (stats, attention) in zip((1, 2), seen):
        want = observed(q, k, v, seg)
        torch.testing.assert_close(stats, torch.stack([o.query_stats for o in want]))
        torch.testing.assert_close(attention, torch.stack([o.attention for o in want]), atol=1e-6, rtol=1e-4)
    for slab in (s for s in stack.slabs() if s >= 0):
        assert pool.arena._written[slab] <= pool.plan.slab_bytes
    assert info["achieved_ratio"] >= 2.9
    assert len(pool.query_stats) == 2  # sealed segments dropped theirs; sink and window keep them
    # The request goes on: a decode step reads the sealed segments (random KV does not
    # compress well, so fidelity is the evaluator's business, not this test's).
    q1, k1, v1 = sequence(129, seed=3)
    out = stack.forward(0, 129, q1[:, -1:], k1[:, -1:], v1[:, -1:], decode=True)
    assert all(o.shape == (1, HQ, D) and torch.isfinite(o).all() for o in out)


def test_shared_segment_does_not_depend_on_the_suffix_or_the_chunking():
    q, k, v = sequence(128, seed=4)
    payloads = []
    for seed, chunks in [(5, [128]), (6, [40, 40, 16, 1, 1, 30])]:
        stack = Stack()
        qs, ks, vs = sequence(128, seed=seed)
        suffix = slice(96, 128)  # a different request suffix after the same 96-token prefix
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        q2[:, suffix], k2[:, suffix], v2[:, suffix] = qs[:, suffix], ks[:, suffix], vs[:, suffix]
        prefill(stack, 0, q2, k2, v2, chunks)
        stack.insert(0, list(range(96)) + [1000 * seed + i for i in range(32)])
        stack.tree.drain(wait=True)
        payloads.append([stack.pool.arena.view(s).clone() for s in stack.slabs() if s >= 0])
    assert len(payloads[0]) == len(payloads[1]) == 2
    assert all(torch.equal(a, b) for a, b in zip(*payloads))


# -- 2. the fault path (project issue 6) ----------------------------------------------------
@register_scorer("test_sglang_sealing_raises")
@dataclass
class Raises(ElementScorer):
    def score(self, obs, side):
        raise RuntimeError("deliberately broken")


@register_scorer("test_sglang_sealing_nan")
@dataclass
class ReturnsNaN(ElementScorer):
    def score(self, obs, side):
        return torch.full(obs.keys.shape, float("nan"))


@register_scorer("test_sglang_sealing_bad_shape")
@dataclass
class WrongShape(ElementScorer):
    def score(self, obs, side):
        return torch.ones(obs.keys.shape[:-1])


def broken(name: str):
    return load_policy({"name": name, "ratio": 3, "segment_size": SEG, "sinks": 4, "window": 32,
                        "key_scorer": name})


@pytest.mark.parametrize("name", ["test_sglang_sealing_raises", "test_sglang_sealing_nan",
                                  "test_sglang_sealing_bad_shape"])
def test_failing_part_leaves_segments_dense_logs_once_and_counts(name, caplog):
    stack = Stack(policy=broken(name))
    q, k, v = sequence(192, seed=7)
    with caplog.at_level(logging.ERROR, logger=RADIX_LOGGER):
        prefill(stack, 0, q[:, :160], k[:, :160], v[:, :160], [160])
        stack.insert(0, list(range(160)))
        prefill_step = slice(160, 192)
        out = stack.forward(0, 192, q[:, prefill_step], k[:, prefill_step], v[:, prefill_step])
        stack.insert(0, list(range(192)))
        stack.tree.drain(wait=True)
    # Segments 1..4 were due for sealing; each failed once and is never retried.
    assert stack.slabs() == [UNMAPPED, LEFT_DENSE, LEFT_DENSE, LEFT_DENSE, LEFT_DENSE, UNMAPPED]
    info = kv_compress_info(stack.pool)
    assert info["part_failures"] == {name: 4} and info["compression_calls"] == 4
    assert info["sealed_segments"] == 0 and stack.pool.arena.used_bytes == 0
    records = [r for r in caplog.records if name in r.getMessage()]
    assert len(records) == 1 and "key_scorer" in records[0].getMessage()
    # The request is unaffected: every token is still dense, attention is exact.
    for layer in range(LAYERS):
        torch.testing.assert_close(out[layer].float(), causal(q[layer, 160:], k[layer], v[layer]),
                                   atol=2e-2, rtol=2e-2)


class DenseOnCall:
    """The mosaic policy's compressor, except that call ``bad`` returns its segment whole
    (dense: over the slab), a region the pool refuses to install."""

    def __init__(self, bad: int) -> None:
        self.bad, self.calls, self.policy = bad, 0, PolicyCompressor(MOSAIC, D)

    def __call__(self, k, v, budget_bytes, query_stats, attention):
        self.calls += 1
        if self.calls == self.bad:
            return [[pack_block(k[layer, h].float(), v[layer, h].float(), BlockFormat(SEG)) for h in range(HKV)]
                    for layer in range(LAYERS)]
        return self.policy(k, v, budget_bytes, query_stats, attention)


def test_a_region_the_pool_refuses_leaves_only_its_segment_dense(caplog):
    """Finished segments are installed together; when the pool refuses one of them, the
    rest are installed and only that one stays dense, counted as a worker error."""
    stack = Stack(compress=DenseOnCall(bad=2))
    q, k, v = sequence(192, seed=7)
    with caplog.at_level(logging.ERROR, logger=RADIX_LOGGER):
        prefill(stack, 0, q, k, v, [192])
        stack.insert(0, list(range(192)))
        stack.tree.drain(wait=True)
    slabs = stack.slabs()
    assert slabs[0] == UNMAPPED and slabs[2] == LEFT_DENSE and slabs[5] == UNMAPPED
    assert all(s not in (UNMAPPED, LEFT_DENSE) for s in (slabs[1], slabs[3], slabs[4]))
    info = kv_compress_info(stack.pool)
    assert info["worker_errors"] == 1 and info["sealed_segments"] == 3
    assert stack.pool.arena.live_slabs == 3
    assert any("exceeds the slab size" in r.getMessage() or r.exc_info for r in caplog.records)


def test_parts_that_read_unobserved_queries_are_part_failures_not_a_crash():
    stack = Stack()
    q, k, v = sequence(128, seed=8)
    slots = stack.alloc.alloc(128)
    for layer in range(LAYERS):  # KV written straight to the pool: no forward saw the queries
        stack.pool._store_kv_layer(layer, slots, k[layer], v[layer])
    stack.req_pool.req_to_token[0, :128] = slots.int()
    stack.insert(0, list(range(128)))
    stack.tree.drain(wait=True)
    # The token scorer is the first part to need what no forward recorded.
    assert kv_compress_info(stack.pool)["part_failures"] == {"observed_attention": 2}


# -- 5. memory pressure ---------------------------------------------------------------------
def test_full_arena_leaves_segments_dense_until_eviction_frees_a_slab(caplog):
    stack = Stack(num_slabs=1)
    pool, alloc = stack.pool, stack.alloc
    q, k, v = sequence(128, seed=9)
    with caplog.at_level(logging.WARNING, logger=RADIX_LOGGER):
        prefill(stack, 0, q, k, v, [128])
        stack.insert(0, list(range(128)))
        stack.tree.drain(wait=True)
    assert stack.slabs() == [UNMAPPED, 0, UNMAPPED, UNMAPPED]  # segment 2 found no slab
    assert pool.arena.live_slabs == 1 and pool.arena.used_bytes <= pool.arena.data.numel()
    assert pool.counters.arena_full == 1 and "arena is full" in caplog.text
    # Nothing over-allocated: what the allocator may still hand out fits in free dense rows.
    assert alloc.available_size() <= len(pool._free_dense)
    # A second request cannot seal either; evicting the first (SGLang's LRU) frees the slab.
    q2, k2, v2 = sequence(128, seed=10)
    prefill(stack, 1, q2, k2, v2, [128])
    stack.insert(1, [5000 + i for i in range(128)])
    assert pool.counters.arena_full == 3 and pool.arena.live_slabs == 1
    stack.tree.evict(EvictParams(num_tokens=128))
    assert pool.arena.live_slabs == 0
    stack.insert(1, [5000 + i for i in range(128)])  # the next insert on its path retries
    stack.tree.drain(wait=True)
    assert pool.arena.live_slabs == 1 and kv_compress_info(pool)["part_failures"] == {}


def test_statistics_rows_are_reused_zeroed_and_given_back(monkeypatch):
    """Segments' sums live in rows of shared tables: 300 segments grow them, dropping all
    but a few compacts them (past KEEP_ROWS, here 64) with the survivors' sums intact, and
    a segment that takes a freed row starts from zero."""
    from mosaickv.sglang_patch import query_stats

    monkeypatch.setattr(query_stats, "KEEP_ROWS", 64)
    stats = SegmentQueryStats(LAYERS, HKV, D, SEG)
    g = torch.Generator().manual_seed(4)
    slots = torch.arange(1000, 1000 + 300 * SEG)
    q = torch.randn(LAYERS, 300 * SEG, HKV * 2, D, generator=g)
    for layer in range(LAYERS):  # one 300-segment prompt
        stats.observe(layer, q[layer], slots)
    keys = [int(slots[i * SEG]) for i in range(300)]
    want = {key: stats.rms(key) for key in keys[:3]}
    assert len(stats) == 300 and stats._count.shape[0] >= 300
    stats.release(slots[3 * SEG :: SEG])
    assert len(stats) == 3 and stats._count.shape[0] == 64  # compacted
    for key, rms in want.items():
        assert torch.equal(stats.rms(key), rms)
    stats.release(slots[2 * SEG : 2 * SEG + 1])  # its row, full of sums, is the next one taken
    assert len(stats) == 2 and stats._count.shape[0] == 64
    fresh = slots[3 * SEG : 4 * SEG]  # a freed segment's slots reused by a new one-token query
    for layer in range(LAYERS):
        stats.observe(layer, q[layer, :1], fresh[:1])
    energy = q[:, 0].double().pow(2).view(LAYERS, HKV, 2, D).sum(2) / 2
    torch.testing.assert_close(stats.rms(int(fresh[0])),
                               (0.5 * (energy + energy.roll(D // 2, dims=-1))).sqrt().float())
