"""The reference attention over mixed formats: dense equals SDPA; drops equal SDPA on what is kept."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mosaickv.formats import BlockFormat, SideFormat, pack_block, unpack_block
from mosaickv.reference import CompressedLayer, attention


def bf16(x):
    return x.to(torch.bfloat16).float()


def sdpa(q, k, v, nq, t_tail):
    """Plain attention: queries are the last nq of the tail; all earlier tokens visible."""
    total = k.shape[1]
    visible = torch.ones(nq, total, dtype=torch.bool)
    visible[:, total - t_tail :] = torch.arange(t_tail)[None, :] <= (t_tail - nq + torch.arange(nq))[:, None]
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=visible, enable_gqa=True)[0]


def build(segments_k, segments_v, fmt_for):
    layer = CompressedLayer()
    for s, (k, v) in enumerate(zip(segments_k, segments_v)):
        layer.append([pack_block(k[h], v[h], fmt_for(s, h), token_score=torch.rand(k.shape[1])) for h in range(k.shape[0])])
    return layer


@settings(max_examples=40, deadline=None)
@given(
    hkv=st.sampled_from([1, 2, 3]),
    group=st.sampled_from([1, 3, 4, 8]),
    d=st.sampled_from([64, 128]),
    nseg=st.integers(0, 4),
    seg=st.sampled_from([8, 32]),
    tail=st.integers(1, 20),
    nq=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_dense_segments_equal_sdpa(hkv, group, d, nseg, seg, tail, nq, seed):
    torch.manual_seed(seed)
    nq = min(nq, tail)
    ks = [torch.randn(hkv, seg, d) for _ in range(nseg)]
    vs = [torch.randn(hkv, seg, d) for _ in range(nseg)]
    layer = build(ks, vs, lambda s, h: BlockFormat(seg))
    tk, tv = bf16(torch.randn(hkv, tail, d)), bf16(torch.randn(hkv, tail, d))
    q = torch.randn(hkv * group, nq, d)
    out = attention(q, layer, tk, tv)
    k = torch.cat([bf16(x) for x in ks] + [tk], dim=1)
    v = torch.cat([bf16(x) for x in vs] + [tv], dim=1)
    torch.testing.assert_close(out, sdpa(q, k, v, nq, tail), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("group", [1, 3])
def test_mixed_formats_equal_sdpa_over_the_reconstruction(group):
    torch.manual_seed(0)
    hkv, d, seg = 2, 64, 16
    kinds = [SideFormat("sparse", 16), SideFormat("mask", 32), SideFormat("lowrank", 4), SideFormat("dense")]
    fmts = [BlockFormat(12, kinds[0], kinds[1]), BlockFormat(0), BlockFormat(16, kinds[2], kinds[3]), BlockFormat(5, kinds[1], kinds[2])]
    ks = [torch.randn(hkv, seg, d) for _ in fmts]
    vs = [torch.randn(hkv, seg, d) for _ in fmts]
    layer = build(ks, vs, lambda s, h: fmts[(s + h) % len(fmts)])
    tk, tv = torch.randn(hkv, 6, d), torch.randn(hkv, 6, d)
    q = torch.randn(hkv * group, 3, d)
    out = attention(q, layer, tk, tv)
    for h in range(hkv):
        rec = [unpack_block(seg_blocks[h]) for seg_blocks in layer.blocks]
        k = torch.cat([r[0] for r in rec] + [tk[h]])[None]
        v = torch.cat([r[1] for r in rec] + [tv[h]])[None]
        ref = sdpa(q[h * group : (h + 1) * group], k.expand(group, -1, -1), v.expand(group, -1, -1), 3, 6)
        torch.testing.assert_close(out[h * group : (h + 1) * group], ref, rtol=1e-4, atol=1e-5)


def test_every_token_dropped_leaves_only_the_tail():
    torch.manual_seed(1)
    layer = build([torch.randn(2, 8, 64)], [torch.randn(2, 8, 64)], lambda s, h: BlockFormat(0))
    tk, tv = torch.randn(2, 4, 64), torch.randn(2, 4, 64)
    q = torch.randn(2, 2, 64)
    torch.testing.assert_close(attention(q, layer, tk, tv), sdpa(q, tk, tv, 2, 4), rtol=1e-4, atol=1e-5)


def test_no_tail_reads_the_compressed_tokens_alone():
    # The sealed part of a split extend: every query sees every kept token, nothing else.
    torch.manual_seed(2)
    layer = build([torch.randn(2, 8, 64)] * 2, [torch.randn(2, 8, 64)] * 2, lambda s, h: BlockFormat(8 - 3 * s))
    q = torch.randn(4, 5, 64)
    empty = torch.zeros(2, 0, 64)
    out = attention(q, layer, empty, empty)
    for h in range(2):
        rec = [unpack_block(seg_blocks[h]) for seg_blocks in layer.blocks]
        k, v = torch.cat([r[0] for r in rec]), torch.cat([r[1] for r in rec])
        ref = torch.softmax(q[2 * h : 2 * h + 2] @ k.T / 8.0, dim=-1) @ v
        torch.testing.assert_close(out[2 * h : 2 * h + 2], ref, rtol=1e-4, atol=1e-5)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple"):
        attention(torch.randn(5, 1, 64), CompressedLayer(), torch.randn(2, 3, 64), torch.randn(2, 3, 64))
    with pytest.raises(ValueError, match="tail"):
        attention(torch.randn(2, 4, 64), CompressedLayer(), torch.randn(2, 3, 64), torch.randn(2, 3, 64))
