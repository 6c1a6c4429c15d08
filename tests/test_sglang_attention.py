"""The mosaickv attention backend's reference path over sealed segments plus dense tokens."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.plugins import load_plugins  # noqa: E402

load_plugins()

from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS  # noqa: E402
from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES  # noqa: E402

from mosaickv.formats import BlockFormat, pack_block  # noqa: E402
from mosaickv.sglang_patch.attention import MosaicAttnBackend, attend_request  # noqa: E402
from mosaickv.sglang_patch.pool import MosaicKVPool  # noqa: E402
from mosaickv.sglang_patch.sizing import KVShape, plan_capacity  # noqa: E402

SEG, HQ, HKV, D, LAYERS = 16, 4, 2, 32, 2


def test_backend_is_registered_with_sglang():
    assert ATTENTION_BACKENDS["mosaickv"] is MosaicAttnBackend
    assert "mosaickv" in ATTENTION_BACKEND_CHOICES


def causal_reference(q, k, v, scale):
    """Plain attention of the last nq tokens over all n tokens, GQA, float32."""
    nq, n = q.shape[0], k.shape[0]
    group = HQ // HKV
    kk = k.float().repeat_interleave(group, dim=1).transpose(0, 1)
    vv = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    logits = q.float().transpose(0, 1) @ kk.transpose(1, 2) * scale
    mask = torch.arange(n)[None, :] <= (n - nq + torch.arange(nq))[:, None]
    out = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1) @ vv
    return out.transpose(0, 1)


@pytest.mark.parametrize("nq", [1, 5])
def test_lossless_sealed_segment_equals_plain_attention(nq):
    shape = KVShape(num_layers=LAYERS, num_kv_heads=HKV, head_dim=D, v_head_dim=D)
    plan = plan_capacity(shape, 1 << 20, segment_size=SEG, ratio=1.0, sinks=0, window=SEG, max_running_requests=2)
    pool = MosaicKVPool(plan.max_total_num_tokens, page_size=1, dtype=torch.bfloat16, head_num=HKV, head_dim=D,
                        layer_num=LAYERS, device="cpu", enable_memory_saver=False, plan=plan, enable_alt_stream=False)
    n = 2 * SEG + 7 + nq
    slots = torch.arange(1, n + 1)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(n, HKV, D, generator=g).bfloat16()
    v = torch.randn(n, HKV, D, generator=g).bfloat16()
    for layer in range(LAYERS):
        pool._store_kv_layer(layer, slots, k, v)
    # Seal the second segment (tokens 16..31) in the dense format: lossless.
    sealed = slice(SEG, 2 * SEG)
    blocks = [[pack_block(k[sealed, h].float(), v[sealed, h].float(), BlockFormat(SEG)) for h in range(HKV)]
              for _ in range(LAYERS)]
    pool.seal(slots[sealed].tolist(), blocks)
    q = torch.randn(nq, HQ, D, generator=g)
    scale = 1 / math.sqrt(D)
    out, _ = attend_request(pool, 1, q, slots, scale)
    torch.testing.assert_close(out, causal_reference(q, k, v, scale), atol=1e-4, rtol=1e-4)
