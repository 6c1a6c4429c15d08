"""Mixed-format extend (prefill over a compressed prefix + causal dense tail) vs the reference."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of the kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from mosaickv.formats import BlockFormat, SideFormat
from mosaickv.kernels.extend import MixedExtendWrapper
from mosaickv.kernels.synthetic import random_layer
from mosaickv.reference import CompressedLayer, attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_extend(
    gen: torch.Generator,
    layers: list[CompressedLayer],
    tail_lens: list[int],
    qo_lens: list[int],
    hkv: int,
    group: int,
    d: int,
    block_m: int = 16,
    pack_tokens: bool = False,
    **plan_kw: int,
) -> None:
    hq = hkv * group
    tk = [torch.randn(hkv, t, d, generator=gen).bfloat16() for t in tail_lens]
    tv = [torch.randn(hkv, t, d, generator=gen).bfloat16() for t in tail_lens]
    qs = [torch.randn(nq, hq, d, generator=gen).bfloat16() for nq in qo_lens]
    w = MixedExtendWrapper(block_m=block_m, block_n=16, pack_tokens=pack_tokens)
    w.plan(layers, tk, tv, qo_lens, hq, hkv, d, device=DEVICE, **plan_kw)
    q = torch.cat(qs).to(DEVICE)
    out = torch.full_like(q, float("nan"))
    w.run(q, out=out)
    out = out.float().cpu()
    assert torch.isfinite(out).all(), "output has NaN/inf (unwritten or bad merge)"
    start = 0
    for b, nq in enumerate(qo_lens):
        ref = attention(qs[b].transpose(0, 1), layers[b], tk[b], tv[b]).transpose(0, 1)
        got = out[start : start + nq]
        assert (got - ref).norm() <= 1e-2 * ref.norm(), f"request {b}: rel err {(got - ref).norm() / ref.norm():.3e}"
        assert (got - ref).abs().max() <= 3e-2 * ref.abs().max()
        start += nq


@pytest.mark.parametrize("pack_tokens", [False, True])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_extend_mixed_gqa_ragged(group: int, d: int, pack_tokens: bool) -> None:
    """Ragged prefixes (one empty), ragged new-token counts, tails longer than the new
    tokens; rows span several row blocks and the tail several causal chunks; dense blocks
    one to a tile or packed."""
    gen = torch.Generator().manual_seed(31 * group + d)
    hkv = 2
    layers = [random_layer(gen, s, 16, hkv, d) for s in (2, 0, 1)]
    layers.append(random_layer(gen, 6, 16, hkv, d, kinds=("dense",)))
    run_extend(gen, layers, [7, 21, 3, 4], [5, 18, 3, 2], hkv=hkv, group=group, d=d, chunk_tokens=16, max_programs=5,
               pack_tokens=pack_tokens)


def test_extend_single_token_is_decode() -> None:
    gen = torch.Generator().manual_seed(2)
    layers = [random_layer(gen, 2, 16, 1, 64), CompressedLayer()]
    run_extend(gen, layers, [1, 4], [1, 1], hkv=1, group=4, d=64)


def test_extend_dropped_prefix_and_wide_rows() -> None:
    """Every prefix token dropped in some segments; a 32-row block of queries."""
    gen = torch.Generator().manual_seed(9)
    fmts = [BlockFormat(0, SideFormat("mask", 5)), BlockFormat(16, SideFormat("sparse", 6), SideFormat("lowrank", 4))]
    layers = [random_layer(gen, 2, 16, 2, 64, fmt=f) for f in fmts]
    run_extend(gen, layers, [12, 40], [12, 33], hkv=2, group=2, d=64, block_m=32)


def test_extend_with_no_compressed_segment_in_the_batch() -> None:
    """A prompt's first chunk: no request holds a sealed segment, so the arena is empty."""
    gen = torch.Generator().manual_seed(11)
    run_extend(gen, [CompressedLayer(), CompressedLayer()], [9, 20], [9, 6], hkv=2, group=3, d=64)


def test_extend_rejects_short_tail() -> None:
    w = MixedExtendWrapper()
    with pytest.raises(ValueError):
        w.plan([CompressedLayer()], [torch.zeros(1, 2, 64)], [torch.zeros(1, 2, 64)], [3], 1, 1, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (9, 3, 64)])
def test_extend_gpu_sized(hq: int, hkv: int, d: int) -> None:
    gen = torch.Generator().manual_seed(hq)
    layers = [random_layer(gen, s, 64, hkv, d) for s in (12, 0, 5)]
    run_extend(gen, layers, [300, 129, 64], [256, 129, 1], hkv=hkv, group=hq // hkv, d=d, block_m=32)
