"""Attention backend over sealed segments plus dense tokens, through the reference math.

Correct, not fast: one request and one layer at a time through
``mosaickv.reference.attention`` (the oracle the Triton kernels in ``mosaickv.kernels``
are checked against). Every token before the step's queries is visible to all of them,
so sealed segments and the dense prefix go in the "compressed" part (dense tokens as a
dense-format block, exact in bf16) and only the step's own tokens form the causal tail.

Every query it computes also feeds the pool's per-segment query statistics
(:mod:`mosaickv.sglang_patch.query_stats`, with the step's log-sum-exp for the attention
a segment's own queries pay it), which sealing hands to the compressor.
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from mosaickv.formats import BlockFormat, pack_block
from mosaickv.reference import CompressedLayer, attention
from mosaickv.sglang_patch.pool import UNMAPPED, MosaicKVPool


def attend_request(pool: MosaicKVPool, layer_id: int, q: torch.Tensor, slots: torch.Tensor,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` [nq, Hq, d] for one request whose slots are ``slots`` (the last
    ``nq`` are the queries' own, already written). Returns [nq, Hq, d] float32 and the
    log-sum-exp [nq, Hq], on the host (the reference math runs there)."""
    q = q.cpu()
    nq = q.shape[0]
    local = layer_id - pool.start_layer
    slots = slots.cpu().long()
    prefix, own = slots[: len(slots) - nq], slots[len(slots) - nq :]
    pages = prefix // pool.page_size
    sealed = pool.page_to_slab[pages]
    layer = CompressedLayer()
    for slab in dict.fromkeys(sealed[sealed != UNMAPPED].tolist()):
        layer.append(pool.read_segment(slab)[local])
    dense = prefix[sealed == UNMAPPED]
    if len(dense):
        rows = pool.dense_rows(dense)
        k, v = pool.k_buffer[local][rows].cpu(), pool.v_buffer[local][rows].cpu()
        layer.append([pack_block(k[:, h], v[:, h], BlockFormat(len(dense))) for h in range(pool.head_num)])
    rows = pool.dense_rows(own)
    tail_k = pool.k_buffer[local][rows].transpose(0, 1).cpu()
    tail_v = pool.v_buffer[local][rows].transpose(0, 1).cpu()
    out, lse = attention(q.transpose(0, 1), layer, tail_k, tail_v, scale=scale, return_lse=True)
    return out.transpose(0, 1), lse.transpose(0, 1)


def record_queries(pool: MosaicKVPool, layer_id: int, q: torch.Tensor, slots: torch.Tensor, lse: torch.Tensor,
                   scale: float) -> None:
    """Feed the step's queries to the pool's per-segment statistics (with the keys of the
    still-dense segments they fall in, when the policy reads attention)."""
    local = layer_id - pool.start_layer
    stats = pool.query_stats
    keys = None
    if stats.window:
        start = (len(slots) - q.shape[0]) // stats.segment_size * stats.segment_size
        keys = pool.k_buffer[local][pool.dense_rows(slots[start:].cpu().long())].cpu()
    stats.observe(local, q.cpu(), slots.cpu(), keys=keys, lse=lse, scale=scale)


class MosaicAttnBackend(TorchNativeAttnBackend):
    """TorchNative's metadata and KV writes; reads go through :func:`attend_request`;
    queries are recorded for sealing."""

    def __init__(self, model_runner) -> None:
        super().__init__(model_runner)
        if not isinstance(self.token_to_kv_pool, MosaicKVPool):
            raise TypeError(f"the mosaickv attention backend needs a MosaicKVPool, got "
                            f"{type(self.token_to_kv_pool).__name__}")

    def _run(self, q, k, v, layer, forward_batch, save_kv_cache: bool, q_lens: list[int]):
        if layer.is_cross_attention:
            raise NotImplementedError("cross attention is refused at startup with --kv-compress mosaickv")
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v)
        q_ = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        o = q.new_empty((q_.shape[0], layer.tp_q_head_num * layer.v_head_dim))
        o_ = o.view(-1, layer.tp_q_head_num, layer.v_head_dim)
        pool = self.token_to_kv_pool
        req_to_token = self.req_to_token_pool.req_to_token
        start = 0
        for i, nq in enumerate(q_lens):
            seq_len = int(forward_batch.seq_lens[i])
            slots = req_to_token[int(forward_batch.req_pool_indices[i]), :seq_len]
            q_req = q_[start : start + nq]
            out, lse = attend_request(pool, layer.layer_id, q_req, slots, layer.scaling)
            record_queries(pool, layer.layer_id, q_req, slots, lse, layer.scaling)
            o_[start : start + nq] = out.to(o.device, o.dtype)
            start += nq
        return o

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        return self._run(q, k, v, layer, forward_batch, save_kv_cache, forward_batch.extend_seq_lens_cpu)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        return self._run(q, k, v, layer, forward_batch, save_kv_cache, [1] * len(forward_batch.seq_lens))


def register_backend() -> None:
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    if "mosaickv" not in ATTENTION_BACKENDS:
        register_attention_backend("mosaickv")(MosaicAttnBackend)
    if "mosaickv" not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices(["mosaickv"])
