"""Segment formats: exact byte accounting and the reconstruction error each design implies."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mosaickv.formats import (
    DENSE,
    FP8,
    FP8_MAX,
    HEADER_BYTES,
    SIDE_KINDS,
    WIDTHLESS,
    BlockFormat,
    SideFormat,
    fp8_lost,
    pack_block,
    thin_svd,
    unpack_block,
)

KINDS = list(SIDE_KINDS)


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 48),
    d=st.sampled_from([16, 64, 128]),
    kind_k=st.sampled_from(KINDS),
    kind_v=st.sampled_from(KINDS),
    keep=st.floats(0, 1),
    width=st.floats(0.01, 1),
    seed=st.integers(0, 2**16),
)
def test_bytes_accounted_equal_bytes_allocated(n, d, kind_k, kind_v, keep, width, seed):
    torch.manual_seed(seed)
    r = max(1, int(width * d))
    fmt = BlockFormat(int(keep * n), SideFormat(kind_k, 0 if kind_k in WIDTHLESS else r),
                      SideFormat(kind_v, 0 if kind_v in WIDTHLESS else r))
    block = pack_block(torch.randn(n, d), torch.randn(n, d), fmt, token_score=torch.rand(n))
    assert block.nbytes() == fmt.nbytes(d)
    k, v = unpack_block(block)
    assert k.shape == v.shape == (fmt.tokens, d)
    assert BlockFormat.from_header(block.header) == fmt


def test_all_dropped_block_holds_only_its_header():
    block = pack_block(torch.randn(32, 64), torch.randn(32, 64), BlockFormat(0, SideFormat("lowrank", 8)))
    assert block.nbytes() == HEADER_BYTES
    assert unpack_block(block)[0].shape == (0, 64)


@pytest.mark.parametrize("d", [64, 128])
def test_dense_is_exact_to_bf16(d):
    k, v = torch.randn(32, d), torch.randn(32, d)
    rk, rv = unpack_block(pack_block(k, v, BlockFormat(32)))
    assert torch.equal(rk, bf16(k)) and torch.equal(rv, bf16(v))


@pytest.mark.parametrize("d", [64, 128])
def test_fp8_is_half_the_bytes_within_e4m3_rounding_and_saturates(d):
    k = torch.randn(32, d) * torch.logspace(-3, 2, d)
    k[0, :3] = torch.tensor([1000.0, -600.0, 448.0])
    block = pack_block(k, k, BlockFormat(32, FP8, FP8))
    assert block.nbytes() - HEADER_BYTES == 2 * 32 * d == BlockFormat(32).nbytes(d) // 2 - HEADER_BYTES // 2
    rk, rv = unpack_block(block)
    assert torch.equal(rk, rv)
    assert rk[0, :3].tolist() == [FP8_MAX, -FP8_MAX, FP8_MAX]
    normal = (k.abs() >= 2**-6) & (k.abs() <= FP8_MAX)  # e4m3 keeps 3 mantissa bits there: half an ulp is 1/16
    assert ((rk - bf16(k)).abs()[normal] <= bf16(k).abs()[normal] / 16).all()
    assert ((rk - bf16(k)).abs()[k.abs() < 2**-6] <= 2**-10).all()  # subnormal steps of 2^-9
    assert not ((rk - bf16(k))[normal] == 0).all()  # it does round


def test_fp8_lost_is_the_score_weighted_relative_rounding_error():
    x = torch.tensor([[1.0, 1.0625, 3.0, 0.0], [100.0, 0.01, 2.0, 1.03125]])
    score = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 1.0, 1.0, 8.0]])
    # 1.0625 lies between e4m3's 1.0 and 1.125 (a tie: to even, 1.0); 100 -> 96; 0.01 -> 5 * 2^-9;
    # 1.03125 -> 1.0 (a tie again); 1, 3, 2 and 0 are exact.
    want = torch.tensor([2.0 * (0.0625 / 1.0625) ** 2, 0.5 * (4 / 100) ** 2 + (0.01 - 5 * 2**-9) ** 2 / 0.01**2
                         + 8.0 * (0.03125 / 1.03125) ** 2])
    torch.testing.assert_close(fp8_lost(x, score), want, rtol=1e-3, atol=0)


@pytest.mark.parametrize("d,r", [(64, 8), (64, 32), (128, 16)])
def test_sparse_keeps_each_vectors_largest_channels(d, r):
    k = torch.randn(40, d)
    rk, _ = unpack_block(pack_block(k, k, BlockFormat(40, SideFormat("sparse", r), DENSE)))
    err = (rk - k).pow(2).sum(-1)
    # Error = energy of the d - r smallest channels (to bf16 rounding of the kept ones), and
    # so at most (d - r)/d of the vector's energy.
    smallest = k.pow(2).sort(dim=-1).values[:, : d - r].sum(-1)
    torch.testing.assert_close(err, smallest, rtol=2e-2, atol=1e-2)
    assert (err <= (d - r) / d * k.pow(2).sum(-1) * 1.01 + 1e-3).all()


@pytest.mark.parametrize("d,r", [(64, 16), (128, 64)])
def test_mask_error_bounded_by_dropped_share_of_block_energy(d, r):
    k = torch.randn(32, d) * torch.rand(d) * 3
    rk, _ = unpack_block(pack_block(k, k, BlockFormat(32, SideFormat("mask", r), DENSE)))
    err = (rk - k).pow(2).sum()
    col = k.pow(2).sum(0).sort().values
    torch.testing.assert_close(err, col[: d - r].sum(), rtol=2e-2, atol=1e-2)
    assert err <= (d - r) / d * k.pow(2).sum() * 1.01


@pytest.mark.parametrize("n,d,r", [(32, 64, 8), (32, 128, 16), (16, 64, 16)])
def test_lowrank_error_is_the_tail_of_the_spectrum(n, d, r):
    # Eckart-Young: the best rank-r error is the energy of the singular values past r.
    k = torch.randn(n, 4) @ torch.randn(4, d) * 2 + 0.1 * torch.randn(n, d)
    rk, _ = unpack_block(pack_block(k, k, BlockFormat(n, SideFormat("lowrank", r), DENSE)))
    tail = torch.linalg.svdvals(k)[r:].pow(2).sum()
    err = (rk - k).pow(2).sum()
    assert err <= tail + 2e-3 * k.pow(2).sum()  # plus bf16 rounding of coefficients and basis


def test_rank_above_the_segment_length_is_exact():
    k = torch.randn(8, 64)
    rk, _ = unpack_block(pack_block(k, k, BlockFormat(8, SideFormat("lowrank", 16), DENSE)))
    torch.testing.assert_close(rk, k, rtol=2e-2, atol=3e-2)


def test_token_drop_keeps_the_highest_scores_in_order():
    k = torch.arange(10.0)[:, None].expand(10, 16).contiguous()
    block = pack_block(k, k, BlockFormat(3), token_score=torch.tensor([0, 9, 1, 8, 2, 7, 3, 3, 3, 3.0]))
    assert block.kept.tolist() == [1, 3, 5]
    assert unpack_block(block)[0][:, 0].tolist() == [1.0, 3.0, 5.0]


@pytest.mark.parametrize("bad", [BlockFormat(40), BlockFormat(8, SideFormat("sparse", 80))])
def test_impossible_formats_are_refused(bad):
    with pytest.raises(ValueError):
        pack_block(torch.randn(32, 64), torch.randn(32, 64), bad)


def test_side_format_kinds_are_checked():
    with pytest.raises(ValueError, match="not one of"):
        SideFormat("zigzag", 4)
    with pytest.raises(ValueError, match="width"):
        SideFormat("sparse", 0)
    with pytest.raises(ValueError, match="'fp8' keeps every channel: width must be 0, got 8"):
        SideFormat("fp8", 8)


@pytest.mark.parametrize("m, d", [(32, 128), (8, 64), (1, 64), (100, 64)])
def test_thin_svd_equals_torchs_svd_on_full_rank_deficient_and_zero_blocks(m, d):
    g = torch.Generator().manual_seed(m * d)
    a = torch.randn(6, m, d, generator=g) * torch.linspace(0.1, 3.0, d)
    a[1] = 0.0
    a[2] = torch.randn(m, 2, generator=g) @ torch.randn(2, d, generator=g)  # rank 2 (1 when m = 1)
    u, sv, vh = thin_svd(a)
    want_u, want_sv, want_vh = torch.linalg.svd(a, full_matrices=False)
    k = min(m, d)
    assert u.shape == (6, m, k) and sv.shape == (6, k) and vh.shape == (6, k, d)
    torch.testing.assert_close(sv, want_sv, atol=1e-4 * want_sv.max().item(), rtol=1e-4)
    torch.testing.assert_close((u * sv[:, None, :]) @ vh, a, atol=1e-4, rtol=1e-4)
    assert not vh[1].any() or m > d  # a zero block has no direction to keep
    for block in (0, 3, 4, 5):  # the top-r subspace, whatever the signs
        r = min(4, k)
        mine, theirs = vh[block, :r].mT @ vh[block, :r], want_vh[block, :r].mT @ want_vh[block, :r]
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
