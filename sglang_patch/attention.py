"""Attention backend over sealed segments plus dense tokens, on the pool's device.

Per request and layer it lays out the request's visible keys and values in token order,
on the pool's device and in its dtype: sealed segments densified with their dropped
tokens left out (cached by the pool, :meth:`MosaicKVPool.segment_kv`), still-dense pages
straight from the dense pool, the step's own tokens last. It then makes the
``scaled_dot_product_attention`` call TorchNativeAttnBackend makes for the forward mode
(:func:`sdpa`), so a request whose tokens are all stored dense (the ``lossless`` policy)
gets torch_native's output bit for bit. Where a sealed segment's KV heads kept different
numbers of tokens, each KV head and its query heads get their own call. Where a
request's tokens sit in the page tables (host tensors) is looked up once per forward,
not per layer.

Every query also feeds the pool's per-segment query statistics
(:mod:`mosaickv.sglang_patch.query_stats`, host memory); when the policy reads attention,
with the step's log-sum-exp computed on the device from the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from torch.nn.functional import scaled_dot_product_attention

from mosaickv.sglang_patch.pool import UNMAPPED, MosaicKVPool, SegmentKV

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

LSE_CHUNK_BYTES = 256 << 20  # float32 logits held at once by logsumexp (a long prefill would not fit whole)

Run = int | torch.Tensor
"""Consecutive tokens of a request: a sealed segment's slab, or the dense-pool rows (on
the pool's device) of still-dense tokens."""


def locate(pool: MosaicKVPool, slots: torch.Tensor) -> list[Run]:
    """A request's tokens (host ``slots``, in token order) as runs, from the page tables."""
    sealed = pool.page_to_slab[slots // pool.page_size]
    bounds = [0, *((sealed[1:] != sealed[:-1]).nonzero().flatten() + 1).tolist(), len(slots)]
    runs: list[Run] = []
    for lo, hi in zip(bounds, bounds[1:]):
        slab = int(sealed[lo])
        if slab == UNMAPPED:
            runs.append(pool.dense_rows(slots[lo:hi]).to(pool.device))
        elif hi - lo != pool.plan.segment_size:  # which tokens a part would see is not stored
            raise ValueError(f"a request reads {hi - lo} tokens of sealed segment {slab}; segments are read whole")
        else:
            runs.append(slab)
    return runs


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
    written) over its tokens ``runs`` (:func:`locate`), on the pool's device. Returns
    [nq, Hq, d] in ``q``'s dtype and, with ``with_lse``, the log-sum-exp [nq, Hq]."""
    ks, vs = visible_kv(pool, layer_id, runs)
    groups = list(zip(q.chunk(len(ks), dim=1), ks, vs))
    out = _cat([sdpa(qg, k, v, scale, extend) for qg, k, v in groups], dim=1)
    lse = _cat([logsumexp(qg, k, scale) for qg, k, _ in groups], dim=1) if with_lse else None
    return out, lse


def record_queries(pool: MosaicKVPool, layer_id: int, q: torch.Tensor, slots: torch.Tensor,
                   lse: Optional[torch.Tensor], scale: float) -> None:
    """Feed the step's queries to the pool's per-segment statistics. They live on the host:
    with a window, the queries, the keys of the still-dense segments they fall in and the
    log-sum-exp are copied there."""
    stats = pool.query_stats
    keys = None
    if stats.window:
        start = (len(slots) - q.shape[0]) // stats.segment_size * stats.segment_size
        keys = pool.get_key_buffer(layer_id)[pool.dense_rows(slots[start:]).to(pool.device)].cpu()
        q, lse = q.cpu(), lse.cpu()
    stats.observe(layer_id - pool.start_layer, q, slots, keys=keys, lse=lse, scale=scale)


@dataclass
class RequestKV:
    """One request of a forward: its host ``slots`` (the step's ``nq`` own last) as runs."""

    slots: torch.Tensor
    runs: list[Run]
    nq: int


class MosaicAttnBackend(TorchNativeAttnBackend):
    """TorchNative's metadata and KV writes; reads go through :func:`attend_request`;
    queries are recorded for sealing."""

    def __init__(self, model_runner) -> None:
        super().__init__(model_runner)
        if not isinstance(self.token_to_kv_pool, MosaicKVPool):
            raise TypeError(f"the mosaickv attention backend needs a MosaicKVPool, got "
                            f"{type(self.token_to_kv_pool).__name__}")
        self._located: Optional[tuple[ForwardBatch, list[RequestKV]]] = None

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        super().init_forward_metadata(forward_batch)
        self._located = None  # sealing and freeing between forwards move tokens

    def _requests(self, forward_batch: ForwardBatch, q_lens: list[int]) -> list[RequestKV]:
        """Where each request's tokens are: found at the first layer, read by all of them."""
        if self._located is None or self._located[0] is not forward_batch:
            seq_lens = forward_batch.seq_lens.tolist()
            req_to_token = self.req_to_token_pool.req_to_token
            rows = req_to_token[forward_batch.req_pool_indices, : max(seq_lens)].cpu().long()
            reqs = [RequestKV(row[:n], locate(self.token_to_kv_pool, row[:n]), nq)
                    for row, n, nq in zip(rows, seq_lens, q_lens)]
            self._located = (forward_batch, reqs)
        return self._located[1]

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
        q_lens = forward_batch.extend_seq_lens_cpu if extend else [1] * len(forward_batch.seq_lens)
        start = 0
        for req in self._requests(forward_batch, q_lens):
            q_req = q_[start : start + req.nq]
            out, lse = attend_request(pool, layer.layer_id, q_req, req.runs, layer.scaling, extend,
                                      with_lse=pool.query_stats.window > 0)
            record_queries(pool, layer.layer_id, q_req, req.slots, lse, layer.scaling)
            o_[start : start + req.nq] = out
            start += req.nq
        return o

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
