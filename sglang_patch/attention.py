"""Attention backend over sealed segments plus dense tokens, on the pool's device.

Two paths read the same pool, chosen by ``--kv-compress-attention``:

* ``triton`` (default): the mixed-format kernels of :mod:`mosaickv.kernels` read the
  arena's slabs through the pool's block table and the dense rows in place. Once per
  forward, where each request's tokens are (host page tables) becomes one plan for every
  layer (:func:`plan_forward`, one upload); each layer then launches one kernel per
  (key format, value format) pair present and a log-sum-exp merge.
  An extend sends its dense rows and new tokens to SGLang's own Triton extend kernel
  instead (the one ``--attention-backend triton`` runs) and merges its output with the
  sealed blocks' by log-sum-exp (:func:`extend_attention`).
* ``sdpa``: the PyTorch reference. Per request and layer it lays out the visible keys and
  values in token order (sealed segments densified without their dropped tokens, cached
  by :meth:`MosaicKVPool.segment_kv`; still-dense rows; the step's own tokens last) and
  makes the ``scaled_dot_product_attention`` call TorchNativeAttnBackend makes
  (:func:`sdpa`), so an all-dense request (the ``lossless`` policy) gets torch_native's
  output bit for bit. Where a sealed segment's KV heads kept different numbers of
  tokens, each KV head and its query heads get their own call.

Every query also feeds the pool's per-segment query statistics
(:mod:`mosaickv.sglang_patch.query_stats`, on the pool's device), with the step's log-sum-exp
when the policy reads attention.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd
from sglang.kernels.ops.attention.merge_state import merge_state_triton
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from torch.nn.functional import scaled_dot_product_attention

from mosaickv.formats import SideFormat
from mosaickv.kernels.decode import MixedAttention, compile_variants, run_plan
from mosaickv.kernels.layout import AttentionPlan, default_max_programs, launch_variants, upload_plans
from mosaickv.sglang_patch.decode_graph import DecodeGraph
from mosaickv.sglang_patch.forward_inputs import (
    WHOLE_RUNS,
    RequestKV,
    Run,
    StatInputs,
    host_plan,
    locate_rows,
    stat_inputs,
)
from mosaickv.sglang_patch.pool import MosaicKVPool, SegmentKV
from mosaickv.uploads import upload

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

logger = logging.getLogger(__name__)

LSE_CHUNK_BYTES = 256 << 20  # float32 logits held at once by logsumexp (a long prefill would not fit whole)

def _cat(tensors: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """``torch.cat`` without its copy of a lone tensor (a request with no sealed segment)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def _join(pieces: list[SegmentKV], heads: int) -> list[torch.Tensor]:
    if all(isinstance(p, torch.Tensor) for p in pieces):
        return [_cat(pieces)]
    return [torch.cat([p[h] if isinstance(p, list) else p[:, h] for p in pieces])[:, None] for h in range(heads)]


def visible_kv(pool: MosaicKVPool, layer_id: int, runs: list[Run]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keys and values of a request's tokens in token order: one ``[M, Hkv, d]`` each, or,
    when a sealed segment's KV heads kept different numbers of tokens, one ``[M_h, 1, d]``
    per KV head."""
    k_buf, v_buf = pool.get_key_buffer(layer_id), pool.get_value_buffer(layer_id)
    ks, vs = [], []
    for run in runs:
        k, v = pool.segment_kv(run, layer_id) if isinstance(run, int) else (k_buf[run], v_buf[run])
        ks.append(k)
        vs.append(v)
    return _join(ks, pool.head_num), _join(vs, pool.head_num)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, extend: bool) -> torch.Tensor:
    """TorchNativeAttnBackend's per-request call (``_run_sdpa_forward_extend`` /
    ``_run_sdpa_forward_decode``) with its dtype rule, layout, GQA flag and masking, so that
    dense keys give its output bit for bit. ``q`` [nq, Hq, d] are the last ``nq`` of the
    ``M`` tokens of ``k``, ``v`` [M, Hkv, d]; returns [nq, Hq, d]."""
    if not (q.dtype == k.dtype == v.dtype):
        k, v = k.to(q.dtype), v.to(q.dtype)
    query = q.movedim(0, 1)
    if extend:  # queries padded to the key length, causal over the square
        padded = query.new_empty((query.shape[0], k.shape[0], query.shape[2]))
        padded[:, k.shape[0] - q.shape[0] :] = query
        query = padded
    out = scaled_dot_product_attention(query.unsqueeze(0), k.movedim(0, 1).unsqueeze(0), v.movedim(0, 1).unsqueeze(0),
                                       enable_gqa=q.shape[1] != k.shape[1], scale=scale, is_causal=extend)
    return out.squeeze(0).movedim(1, 0)[-q.shape[0] :]


def logsumexp(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Float32 log-sum-exp [nq, Hq] of ``q k^T * scale`` over the keys each query sees
    (``q`` [nq, Hq, d] are the last ``nq`` of ``k``'s [M, Hkv, d] tokens, causal among
    themselves), a few query rows at a time within :data:`LSE_CHUNK_BYTES`."""
    nq, hq, d = q.shape
    m, hkv, _ = k.shape
    qg, kf = q.float().reshape(nq, hkv, hq // hkv, d), k.float()
    keys = torch.arange(m, device=k.device)
    step = max(1, LSE_CHUNK_BYTES // (4 * hq * m))
    out = []
    for lo in range(0, nq, step):
        hi = min(lo + step, nq)
        logits = torch.einsum("qhgd,mhd->qhgm", qg[lo:hi], kf) * scale
        hidden = keys[None, :] > (m - nq + torch.arange(lo, hi, device=k.device))[:, None]
        out.append(torch.logsumexp(logits.masked_fill(hidden[:, None, None], float("-inf")), dim=-1).reshape(-1, hq))
    return torch.cat(out)


def attend_request(pool: MosaicKVPool, layer_id: int, q: torch.Tensor, runs: list[Run], scale: float, extend: bool,
                   with_lse: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Attention of one request's queries ``q`` [nq, Hq, d] (its last ``nq`` tokens, already
    written) over its tokens ``runs`` (:func:`~mosaickv.sglang_patch.forward_inputs.locate`), on the pool's device. Returns
    [nq, Hq, d] in ``q``'s dtype and, with ``with_lse``, the log-sum-exp [nq, Hq]."""
    ks, vs = visible_kv(pool, layer_id, runs)
    groups = list(zip(q.chunk(len(ks), dim=1), ks, vs))
    out = _cat([sdpa(qg, k, v, scale, extend) for qg, k, v in groups], dim=1)
    lse = _cat([logsumexp(qg, k, scale) for qg, k, _ in groups], dim=1) if with_lse else None
    return out, lse


def record_queries(pool: MosaicKVPool, layer_id: int, q: torch.Tensor, reqs: list[RequestKV],
                   lse: Optional[torch.Tensor], scale: float, inputs: StatInputs) -> None:
    """Feed the step's queries ``q`` [sum nq, Hq, d] (and, with a window, their
    log-sum-exp ``lse`` [sum nq, Hq]) to the pool's per-segment statistics.
    A decode batch goes in one computation left on the device (:meth:`observe_decode`), and
    so does an extend batch, every request at once (:meth:`observe` through the forward's
    :class:`ExtendIndex`, found at its first layer), its keys read from the layer's buffer."""
    stats, local = pool.query_stats, layer_id - pool.start_layer
    k_buf = pool.get_key_buffer(layer_id)
    if inputs.decode:
        keys = None if inputs.rows is None else k_buf[inputs.rows]
        stats.observe_decode(local, q, inputs.firsts, inputs.positions, keys=keys, lse=lse, scale=scale,
                             device_positions=inputs.device_positions)
        return
    index = inputs.extend_index(stats, reqs, q.shape[1], q.device)
    stats.observe(local, q[: index.nq], keys=k_buf if stats.window else None,
                  lse=None if lse is None else lse[: index.nq], scale=scale, index=index)


# Tile shapes of the kernels (FlashInfer-like defaults): decode rows are one token's GQA
# group, extend rows many tokens' (too many for sparse keys read by query gathers). 64-row
# extend tiles took 29.3 ms per layer where 32 took 46.8 for an 8,192-token chunk over
# 24,576 sealed tokens on an H200 (benchmarks/results/h200x2_2026-11-30d/extend_h200.json).
# Dense blocks' kept tokens share tiles (``pack_tokens``) where segments are at most
# PACK_MAX_SEGMENT tokens: the presets keep 8 or 16 of most 32-token segments. On an H200
# (B=32, L=32k, 32/8 heads) the presets' real 3x mix decoded in 0.96 ms packed against 3.23
# one block per tile, and full dense blocks at 1,983 GB/s against 1,206 with 32-token
# segments (h200x2_2026-11-30g/summary.json). With 128-token segments packed tiles read 1,965
# GB/s where one per tile read 3,880 in an earlier run (kernels_bench_decode_h200_policy_mixes
# .json); side by side in the ninth run, dense 128-token blocks read 1,959 GB/s packed in
# 64-token tiles, 2,623 packed in 32-token ones and 2,291 one per tile
# (h200x2_2026-11-30i/kernels/diag_formats_segment128.json): packing longer segments is open.
PACK_MAX_SEGMENT = 32


# Packed decode tiles are 32 tokens, not 64: the packed dense launch took 252 registers a
# thread at 64 against 128 at 32 (sm_90, compiled offline: benchmarks/kernels/registers.py,
# within ten of ncu's counts), so half as many warps fit an SM to hide its loads (ncu:
# 12.5% occupancy, 33% of DRAM bandwidth, h200x2_2026-11-30i/kernels); on that H200,
# 32-token packed tiles read dense 128-token blocks at 2,623 GB/s against 1,959. At the
# presets' 32-token segments (tenth run, h200x2_2026-11-30j/kernels/diag_formats_segment32.json)
# the real 3x mix decoded in 912 us against 1,047 with 64-token tiles, dense in 1,698 against
# 2,152. One block per tile, 64-token tiles were the faster (README, "Kernels on the H200").
# Sparse keys beside dense values are packed too (pack_sparse_keys): side by side in the
# eleventh run (h200x2_2026-11-30k/kernels/diag_formats_segment32.json), the 3x mix decoded
# in 712 us against 840 and the 6x in 466 against 617, dense unchanged (1,522 against 1,521).
# In those tiles a GQA group's rows gather sparse keys in one unrolled step (unroll_group):
# side by side in the fourteenth run (h200_2026-12-01b/call8_kernels), the 6x mix decoded in
# 454 us against 465, the 3x in 710 against 711 and dense in 1,509 against 1,509, the same
# outputs bit for bit. Each format pair's blocks are cut into runs by that pair's own share
# of the work (chunk_by_kind): side by side in the fifteenth run
# (h200_2026-12-01c/call8_kernels/diag32), the 6x mix decoded in 428 us against 457, the 3x
# in 697 against 708 and dense in 1,517 against 1,521 (outputs within 8e-4 of the reference's).
# Each packed tile's start comes from the plan (tile_starts), found with each request's
# runs, so Triton pipelines the tile loop (dense keys' loads become async copies): side by
# side in the eighteenth run (h200_2026-12-02/call5_diag), the 3x mix decoded in 672 us
# against 704, the 6x in 425 against 433, dense in 1,413 against 1,521; 9 stages and eight
# warps were slower (722 and 1,107 us on 3x). A packed tile reads at most PACKED_TILE_BLOCKS
# blocks' entries, one a lane (tile_blocks), not one a token: side by side in the nineteenth
# run (h200_2026-12-02b/call5_diag_ncu), the 3x mix decoded in 645 us against 670, the 6x
# in 412 against 418, dense in 1,306 against 1,424; 8 lanes 654, 416 and 1,348; 64-token
# dense tiles of 8 lanes 649, 424 and 1,278.
PACKED_DECODE_TILE = 32
PACKED_TILE_BLOCKS = 4
# Twentieth run (diag setting 24, h200_2026-12-02c): at 7 stages the pipeliner gives a
# packed tile's keys and values two shared slots each (one at 3 to 6), at the same 128
# registers: 3x mix 598 us against 642, 6x 387 against 411, dense 1,209 against 1,303.
PACKED_PIPELINE_STAGES = 7
# Twenty-first run (diag settings 31-33, h200_2026-12-02d/call6_diag): packed sparse keys'
# tile loop pipelined at 3 stages (sparse_key_stages), dense-key tiles' row sums reduced
# once an item (defer_row_sums: 419 instructions and 15 barriers a pass against 439 and 18)
# at 128 registers held by maxnreg (left to the compiler: 143, slower). Side by side: 3x
# mix 582 us against 597, 6x 378 against 385, dense 1,177 against 1,209.
# Twenty-second run (diag settings 0 and 35, h200_2026-12-02e/call10_diag): launches of a
# block a tile (low rank, masks, sparse values) read each block as one tile, their block
# loop pipelined 7 deep (block_stages; segments here are at most a tile): low-rank blocks
# 2,314 us against 2,457, the synthetic 3x mix (mix3x) 4,086 against 4,250, sparse keys
# and values (sparse32) 5,260 against 5,629; the presets' dense-value mixes level (640
# against 640, 3x).
# Twenty-third run (diag settings 0 and 38, h200_2026-12-02f/summary.json): packed sparse
# keys' tile loop not pipelined (sparse_key_stages 1, so their channel loads are vectors
# into registers, not shared buffers), 1.6% faster on the presets' mixes: 3x 559 us against
# 568, 6x 363 against 369, dense level (1,148 against 1,150). Not yet timed as the server's.


def _tuning(extend: bool, pack: bool) -> MixedAttention:
    if extend:
        return MixedAttention(block_m=64, block_n=32, keys_by_query=False, wide_block_n=32, pack_tokens=pack)
    if pack:
        return MixedAttention(block_m=16, block_n=32, wide_block_n=PACKED_DECODE_TILE, pack_tokens=True,
                              pack_sparse_keys=True, unroll_group=True, chunk_by_kind=True, tile_starts=True,
                              tile_blocks=PACKED_TILE_BLOCKS, pipeline_stages=PACKED_PIPELINE_STAGES,
                              sparse_key_stages=1, defer_row_sums=True, max_registers=128,
                              block_stages=PACKED_PIPELINE_STAGES)
    return MixedAttention(block_m=16, block_n=32)


TUNINGS = {(extend, pack): _tuning(extend, pack) for extend in (False, True) for pack in (False, True)}
DECODE_TUNING, EXTEND_TUNING = TUNINGS[False, True], TUNINGS[True, True]


def tuning_for(extend: bool, segment_size: int) -> MixedAttention:
    """The kernels' tiles for an extend or a decode over segments of ``segment_size``."""
    return TUNINGS[extend, segment_size <= PACK_MAX_SEGMENT]


@dataclass
class ForwardState:
    """What every layer of one forward reads, found at its first layer: where each
    request's tokens are, the query statistics' inputs and (Triton path) the plan."""

    reqs: list[RequestKV]
    stats: StatInputs
    plan: Optional[ForwardPlan] = None


@dataclass
class DenseExtend:
    """An extend's dense part, for SGLang's Triton extend kernel (what ``--attention-backend
    triton`` runs for ``none``): per request, its dense rows before the step's tokens as
    the prefix, and the step's tokens (the last ``nq`` dense rows) causally."""

    qo_indptr: torch.Tensor  # int32 [B + 1]
    kv_indptr: torch.Tensor  # int32 [B + 1]: each request's prefix rows in kv_indices
    kv_indices: torch.Tensor  # int64 dense rows of the prefixes, back to back
    new_rows: torch.Tensor  # int64 dense rows of the step's tokens, back to back
    max_new: int

    @classmethod
    def of(cls, reqs: list[RequestKV], device: torch.device) -> "DenseExtend":
        prefix, new = [], []
        for req in reqs:
            rows = _cat([r for r in req.runs if not isinstance(r, int)] or [torch.zeros(0, dtype=torch.int64)])
            if len(rows) < req.nq:
                raise RuntimeError(f"a request extends by {req.nq} tokens but holds {len(rows)} dense rows")
            prefix.append(rows[: len(rows) - req.nq])
            new.append(rows[len(rows) - req.nq :])

        def indptr(parts: list[torch.Tensor]) -> torch.Tensor:
            return upload(np.cumsum([0] + [len(x) for x in parts]), device, torch.int32)

        return cls(indptr(new), indptr(prefix), upload(torch.cat(prefix), device), upload(torch.cat(new), device),
                   max((req.nq for req in reqs), default=0))


@dataclass
class ForwardPlan:
    """A forward's kernel work, planned once on the host for every layer. An extend's
    ``layers`` cover its sealed blocks alone (None if it reads none) and ``dense`` the rest."""

    layers: Optional[list[AttentionPlan]]
    tail_rows: torch.Tensor  # int32, each request's dense rows in token order, back to back
    tuning: MixedAttention
    group: int
    dense: Optional[DenseExtend] = None


def plan_forward(pool: MosaicKVPool, reqs: list[RequestKV], num_q_heads: int, extend: bool) -> ForwardPlan:
    """The forward's :func:`host_plan`, uploaded for every layer (:func:`upload_plans`).

    An extend plans its sealed blocks alone: its dense rows and its new tokens go to
    SGLang's own extend kernel (:class:`DenseExtend`), tuned for a long causal prefill,
    and the two are merged by log-sum-exp (:func:`extend_attention`)."""
    hkv = pool.head_num
    if num_q_heads % hkv:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {hkv} KV heads")
    group = num_q_heads // hkv
    tuning = tuning_for(extend, pool.plan.segment_size)
    device = torch.device(pool.device)
    max_programs = default_max_programs(device)
    dense = None
    if extend:
        dense = DenseExtend.of(reqs, device)
        reqs = [RequestKV(req.slots, [r for r in req.runs if isinstance(r, int)], req.nq) for req in reqs]
        if not any(req.runs for req in reqs):
            return ForwardPlan(None, torch.zeros(0, dtype=torch.int32, device=device), tuning, group, dense)
    # An extend's row blocks are its parallelism: each (row block, format pair) is one item,
    # or partial outputs (items x block_m x d floats) of an 8k-token chunk over a 32k
    # context outgrow the GPU (17 GiB on an 8B model, found on an H200).
    host, tail_rows = host_plan(pool, reqs, group, tuning, max_programs, WHOLE_RUNS if extend else None)
    plans = upload_plans(host, device, pool.head_dim, max_programs)
    return ForwardPlan(plans, upload(tail_rows, device, torch.int32), tuning, group, dense)


def extend_attention(pool: MosaicKVPool, plan: ForwardPlan, layer_id: int, q: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, scale: float) -> None:
    """One layer of an extend: the dense part by SGLang's Triton extend kernel, the sealed
    blocks by the mixed-format kernels, merged by log-sum-exp into ``out`` and ``lse``
    (natural log, [T, Hq] float32)."""
    dense = plan.dense
    k_buf, v_buf = pool.get_key_buffer(layer_id), pool.get_value_buffer(layer_id)
    alone = plan.layers is None  # no sealed block: the dense part is the whole answer
    o_dense = out if alone else torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse_dense = lse if alone else torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    q_dense = q if q.dtype == k_buf.dtype else q.to(k_buf.dtype)  # its dots take one dtype (a server's q is the pool's)
    extend_attention_fwd(q_dense, k_buf[dense.new_rows], v_buf[dense.new_rows], o_dense, k_buf, v_buf, dense.qo_indptr,
                         dense.kv_indptr, dense.kv_indices, None, True, None, dense.max_new, 1.0, 1.0,
                         sm_scale=scale, lse_extend=lse_dense)
    if alone:
        return
    o_sealed = torch.zeros_like(o_dense)  # rows of a request without sealed blocks stay empty
    lse_sealed = torch.full_like(lse_dense, float("-inf"))
    run_plan(plan.layers[layer_id - pool.start_layer], pool.arena.values, pool.arena.data, pool.block_table,
             pool.widths_aligned, k_buf, v_buf, plan.tail_rows, q, o_sealed, scale, plan.group, plan.tuning, lse_sealed)
    merge_state_triton(o_sealed, lse_sealed, o_dense, lse_dense, out, lse)


class MosaicAttnBackend(TorchNativeAttnBackend):
    """TorchNative's metadata and KV writes; reads go through the Triton kernels over the
    pool's slabs and dense rows (``--kv-compress-attention triton``, the default) or
    through :func:`attend_request` (``sdpa``, the PyTorch reference path); queries are
    recorded for sealing."""

    def __init__(self, model_runner) -> None:
        super().__init__(model_runner)
        if not isinstance(self.token_to_kv_pool, MosaicKVPool):
            raise TypeError(f"the mosaickv attention backend needs a MosaicKVPool, got "
                            f"{type(self.token_to_kv_pool).__name__}")
        server_args = getattr(model_runner, "server_args", None)
        self.kernels = getattr(server_args, "kv_compress_attention", "triton") == "triton"
        self._policy = getattr(server_args, "mosaic_policy", None)
        self._compiled = False
        self._menu: list[tuple[int, int, int]] = []
        self._menu_aligned = True
        self._forward: Optional[tuple[ForwardBatch, ForwardState]] = None
        self._model_config = getattr(model_runner, "model_config", None)
        self._graph: Optional[DecodeGraph] = None
        self._graph_step = False  # this forward is a decode graph's (capture, warmup or replay)

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        super().init_forward_metadata(forward_batch)
        self._forward = None  # sealing and freeing between forwards move tokens
        self._graph_step = False
        if not forward_batch.forward_mode.is_decode():
            self.token_to_kv_pool.decode_rows.discard()
        self.token_to_kv_pool.prepare_writes(forward_batch.out_cache_loc)

    def _requests(self, req_pool_indices: torch.Tensor, seq_lens: list[int], q_lens: list[int]) -> list[RequestKV]:
        """Each request's tokens as runs, from its ``req_to_token`` row: for a decode batch
        the rows copied when the scheduler prepared it (:mod:`.decode_rows`), else one host
        copy, which waits for the GPU."""
        if not seq_lens:
            return []
        rows = self.token_to_kv_pool.decode_rows.take(seq_lens) if all(n == 1 for n in q_lens) else None
        if rows is None:
            rows = self.req_to_token_pool.req_to_token[req_pool_indices, : max(seq_lens)].cpu()
        # Slots keep req_to_token's int32: the pool maps the few it reads (dense_rows), and
        # widening every row cost 6 ms a step at 240 requests of 8k tokens on a 2-core CPU.
        runs = locate_rows(self.token_to_kv_pool, rows, seq_lens)
        return [RequestKV(row[:n], r, nq) for row, n, r, nq in zip(rows, seq_lens, runs, q_lens)]

    def _state(self, forward_batch: ForwardBatch, q_lens: list[int]) -> ForwardState:
        """The forward's :class:`ForwardState`: built at the first layer, read by all of them."""
        if self._forward is None or self._forward[0] is not forward_batch:
            seq_lens = forward_batch.seq_lens if forward_batch.seq_lens_cpu is None else forward_batch.seq_lens_cpu
            reqs = self._requests(forward_batch.req_pool_indices, seq_lens.tolist(), q_lens)  # host: no sync
            self._forward = (forward_batch, ForwardState(reqs, stat_inputs(self.token_to_kv_pool, reqs)))
        return self._forward[1]

    # -- decode under CUDA graphs (decode_graph.py) ----------------------------------------
    def _num_q_heads(self) -> int:
        """Query heads per rank: the model's GQA ratio times this rank's KV heads."""
        cfg = self._model_config
        return self.token_to_kv_pool.head_num * cfg.num_attention_heads // cfg.get_total_num_kv_heads()

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        if not self.kernels:
            raise RuntimeError("decode CUDA graphs under --kv-compress mosaickv need --kv-compress-attention triton")
        heads = self._num_q_heads()
        if not self._compiled:
            self._compile(heads)
        self._graph = DecodeGraph(self.token_to_kv_pool, heads, max_bs, self._menu, self._menu_aligned,
                                  tuning_for(False, self.token_to_kv_pool.plan.segment_size),
                                  self._model_config.context_len)

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        return 1

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False) -> None:
        """Host work of a captured decode step: the batch's plan, write rows and statistics'
        inputs into the graph's buffers. Capture (and its warmup) gets an empty plan."""
        graph = self._graph
        if graph is None:
            raise RuntimeError("init_cuda_graph_state must run before a decode graph is captured or replayed")
        self._forward = None
        self._graph_step = True
        bs = forward_batch.batch_size
        if in_capture:
            graph.prepare([], bs)
            self.token_to_kv_pool.prepare_writes(forward_batch.out_cache_loc, graph.write_rows[:bs])
            return
        n = bs - getattr(forward_batch, "num_padding", 0)
        seq_lens = (forward_batch.seq_lens[:n].cpu() if forward_batch.seq_lens_cpu is None
                    else forward_batch.seq_lens_cpu[:n]).tolist()
        graph.prepare(self._requests(forward_batch.req_pool_indices[:n], seq_lens, [1] * n), bs)

    def _compile(self, num_q_heads: int) -> None:
        """Compile, before the first batch runs them, the kernels this policy's formats
        lead to (a kernel compiled mid-batch stalls the server for seconds each): its
        strategy's candidate side formats, dense, for decode and extend. Formats outside
        that menu (strategies that list none) compile when first met."""
        pool = self.token_to_kv_pool
        sides = self._policy_sides()
        variants = launch_variants(sides)
        aligned = all(s.width % 8 == 0 for s in sides if s.kind != "dense")
        self._menu, self._menu_aligned = variants, aligned
        start = time.perf_counter()
        for tuning in (tuning_for(False, pool.plan.segment_size), tuning_for(True, pool.plan.segment_size)):
            compile_variants(variants, tuning, num_q_heads // pool.head_num, pool.head_num, pool.head_dim, pool.dtype,
                             aligned, True, pool.query_stats.window > 0, pool.device)
        self._compiled = True
        logger.info("MosaicKV: %d attention kernel variants (decode and extend) ready in %.1f s",
                    2 * len(variants), time.perf_counter() - start)

    def _policy_sides(self) -> list[SideFormat]:
        """Side formats the policy's segments can have: dense and its strategy's candidates."""
        sides = [SideFormat("dense")]
        if self._policy is not None:
            bound = self._policy.bind(self.token_to_kv_pool.head_dim)
            sides += bound.strategy.candidates(self.token_to_kv_pool.head_dim, bound.channel_selector)
        return sides

    def _forward_plan(self, forward_batch: ForwardBatch, state: ForwardState, num_q_heads: int,
                      extend: bool) -> ForwardPlan:
        if state.plan is None:
            state.plan = plan_forward(self.token_to_kv_pool, state.reqs, num_q_heads, extend)
        return state.plan

    def _run(self, q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor], layer: RadixAttention,
             forward_batch: ForwardBatch, save_kv_cache: bool, extend: bool) -> torch.Tensor:
        if layer.is_cross_attention or layer.attn_type == AttentionType.ENCODER_ONLY:
            raise NotImplementedError("--kv-compress mosaickv attends causally over a decoder's own tokens only")
        pool = self.token_to_kv_pool
        if save_kv_cache and k is not None and v is not None:
            pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v)
        q_ = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        o = q.new_empty((q_.shape[0], layer.tp_q_head_num * layer.v_head_dim))
        o_ = o.view(-1, layer.tp_q_head_num, layer.v_head_dim)
        with_lse = pool.query_stats.window > 0
        lse = torch.empty(q_.shape[:2], dtype=torch.float32, device=q.device) if with_lse else None
        if self._graph_step:
            self._graph_layer(q_, o_, lse, layer, extend)
            return o
        q_lens = forward_batch.extend_seq_lens_cpu if extend else [1] * len(forward_batch.seq_lens)
        state = self._state(forward_batch, q_lens)
        reqs = state.reqs
        if self.kernels:
            if not self._compiled:
                self._compile(layer.tp_q_head_num)
            plan = self._forward_plan(forward_batch, state, layer.tp_q_head_num, extend)
            if extend:
                merged = lse if with_lse else torch.empty(q_.shape[:2], dtype=torch.float32, device=q.device)
                extend_attention(pool, plan, layer.layer_id, q_, o_, merged, layer.scaling)
            else:
                run_plan(plan.layers[layer.layer_id - pool.start_layer], pool.arena.values, pool.arena.data,
                         pool.block_table, pool.widths_aligned, pool.get_key_buffer(layer.layer_id),
                         pool.get_value_buffer(layer.layer_id), plan.tail_rows, q_, o_, layer.scaling, plan.group,
                         plan.tuning, lse)
        else:
            start = 0
            for req in reqs:
                out, lse_req = attend_request(pool, layer.layer_id, q_[start : start + req.nq],
                                              req.runs, layer.scaling, extend, with_lse)
                o_[start : start + req.nq] = out
                if with_lse:
                    lse[start : start + req.nq] = lse_req
                start += req.nq
        record_queries(pool, layer.layer_id, q_, reqs, lse, layer.scaling, state.stats)
        return o

    def _graph_layer(self, q: torch.Tensor, out: torch.Tensor, lse: Optional[torch.Tensor], layer: RadixAttention,
                     extend: bool) -> None:
        """A decode graph's layer: static plan, statistics into static buffers, no host work."""
        graph, pool = self._graph, self.token_to_kv_pool
        if extend or layer.tp_q_head_num != graph.group * pool.head_num:
            raise RuntimeError(f"a mosaickv decode graph serves decode with {graph.group * pool.head_num} query heads, "
                               f"got {'an extend' if extend else 'a decode'} with {layer.tp_q_head_num}")
        local, k_buf = layer.layer_id - pool.start_layer, pool.get_key_buffer(layer.layer_id)
        graph.attend(local, q, out, lse, k_buf, pool.get_value_buffer(layer.layer_id), layer.scaling)
        graph.record(local, q, lse, k_buf, layer.scaling)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        return self._run(q, k, v, layer, forward_batch, save_kv_cache, extend=True)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        return self._run(q, k, v, layer, forward_batch, save_kv_cache, extend=False)


def register_backend() -> None:
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    if "mosaickv" not in ATTENTION_BACKENDS:
        register_attention_backend("mosaickv")(MosaicAttnBackend)
    if "mosaickv" not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices(["mosaickv"])
