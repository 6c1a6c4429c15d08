"""The one-launch per-vector channel pricing against the PyTorch ops it replaces on a GPU.

On the CPU the kernel runs under ``TRITON_INTERPRET=1``; on either, its losses must equal
the ops' (a descending sort, each width's prefix summed) within float32 rounding of the
vector's total score, every output written, whatever the tile's raggedness.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of the kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from mosaickv.kernels.channel_pricing import BLOCK_ROWS, channel_losses, fits_channel_pricing, warm_channel_pricing
from mosaickv.policies.selectors import PerVector

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def ops_losses(scores: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """The PyTorch ops' losses (``PerVector.lost_many`` off the GPU), stacked."""
    top = scores.sort(dim=-1, descending=True).values
    return torch.stack([scores.sum(-1) - top[..., :w].sum(-1) for w in widths], -1)


def scores_for(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Non-negative scores on many scales, some vectors all zero, some with ties."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(shape, generator=g).pow(3) * 10.0 ** torch.randint(-3, 4, (*shape[:-1], 1), generator=g)
    flat = s.view(-1, shape[-1])
    flat[:: 7] = 0.0  # a block whose vectors carry nothing
    flat[3 % len(flat)] = 1.0  # every channel tied
    return s.to(DEVICE)


def assert_losses(got: torch.Tensor, scores: torch.Tensor, widths: list[int]) -> None:
    expected = ops_losses(scores, widths)
    scale = scores.sum(-1, keepdim=True).clamp_min(1e-30)
    assert got.shape == expected.shape and not got.isnan().any()
    assert ((got - expected).abs() <= 2e-6 * scale).all(), ((got - expected).abs() / scale).max()


# The interpreter takes seconds a program (tl.sort): a ragged pair of tiles at d=64, one
# ragged tile at 128.
@pytest.mark.parametrize(("d", "rows"), [(64, BLOCK_ROWS + 5), (128, 3), (64, 1)])
def test_the_kernel_prices_what_the_sort_prices(d, rows):
    scores = scores_for(d + rows, (rows, d))
    widths = [d // 8, d // 4, d // 2, d - 1, 1]
    assert_losses(channel_losses(scores, widths), scores, widths)


def test_blocks_of_vectors_keep_their_shape_and_every_output_is_written():
    # [blocks, tokens, d] as the compressor prices them; the output poisoned first.
    scores = scores_for(5, (9, 7, 64))
    widths = [8, 16, 32]
    out = torch.full((9, 7, 3), float("nan"), device=DEVICE)
    assert channel_losses(scores, widths, out=out) is out
    assert_losses(out, scores, widths)


def test_nothing_to_price_launches_nothing():
    scores = scores_for(1, (4, 64))
    assert channel_losses(scores, []).shape == (4, 0)
    assert channel_losses(scores[:0], [8]).shape == (0, 1)


def test_widths_outside_the_head_dim_and_a_wrong_out_are_refused():
    scores = scores_for(2, (4, 64))
    with pytest.raises(ValueError, match=r"widths must be channel counts in \[1, 64\], got \[0, 65\]"):
        channel_losses(scores, [8, 0, 65])
    with pytest.raises(ValueError, match=r"out must be a contiguous float32 tensor of shape \(4, 1\)"):
        channel_losses(scores, [8], out=torch.empty(4, 2, device=DEVICE))


def test_the_warm_up_skips_what_the_launch_does_not_take(monkeypatch):
    import mosaickv.kernels.channel_pricing as pricing

    monkeypatch.setattr(pricing, "channel_losses", lambda *a: pytest.fail("the CPU prices with the ops: nothing to compile"))
    pricing.warm_channel_pricing("cpu", 64)


def test_only_float32_power_of_two_rows_on_a_gpu_take_the_launch():
    assert not fits_channel_pricing(torch.zeros(2, 64))  # the CPU: the ops
    if torch.cuda.is_available():
        assert fits_channel_pricing(torch.zeros(2, 128, device="cuda"))
        assert not fits_channel_pricing(torch.zeros(2, 96, device="cuda"))
        assert not fits_channel_pricing(torch.zeros(2, 64, device="cuda", dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_the_warm_up_compiles_the_launch_for_the_head_dim():
    warm_channel_pricing("cuda", 128)
    from mosaickv.kernels.channel_pricing import _channel_losses_kernel

    assert any(len(caches[0]) for caches in _channel_losses_kernel.device_caches.values())  # compiled, not skipped


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_per_vector_pricing_takes_the_launch_and_prices_as_the_sort():
    # An 8B-shaped slice of a sealing call: 256 blocks of 32 key vectors, the mosaic widths.
    scores = scores_for(3, (256, 32, 128))
    widths = [16, 32, 64]
    assert fits_channel_pricing(scores)  # what lost_many dispatches on
    priced = PerVector().lost_many(scores, widths)
    assert_losses(torch.stack([priced[w] for w in widths], -1), scores, widths)
