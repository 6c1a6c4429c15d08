"""Built-in selectors: which tokens to keep, and how reduced-width vectors pick channels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mosaickv.formats import SideFormat
from mosaickv.parts import ChannelSelector, TokenSelector
from mosaickv.registry import register_selector


@register_selector("topk")
@dataclass
class TopK(TokenSelector):
    """Keep the ``m`` highest-scoring tokens, in their original order."""

    def select(self, scores: torch.Tensor, m: int) -> torch.Tensor:
        return scores.float().topk(m, sorted=False).indices.sort().values

    def select_many(self, scores: torch.Tensor, m: int) -> torch.Tensor:
        return self.select(scores, m)  # topk and sort work row by row


@register_selector("per_vector")
@dataclass
class PerVector(ChannelSelector):
    """MosaicKV: every vector keeps its own top-r channels (uint8 index per element)."""

    def side_format(self, width: int) -> SideFormat:
        return SideFormat("sparse", width)

    def lost(self, scores: torch.Tensor, width: int) -> torch.Tensor:
        return scores.sum(-1) - scores.topk(width, dim=-1).values.sum(-1)

    def lost_many(self, scores: torch.Tensor, widths: list[int]) -> dict[int, torch.Tensor]:
        # One descending sort serves every width: its first w values are topk(w)'s, in the
        # same order, so the sums are the same to the bit; on a GPU, sorting rows of 64 or
        # 128 channels takes about half of topk's time (benchmarks/results/sealing_kernels_h200.json).
        # There one launch sorts tiles of vectors in registers instead and writes only the
        # losses (mosaickv.kernels.channel_pricing; float32 sums in another order).
        if not widths:
            return {}
        if scores.is_cuda:
            from mosaickv.kernels.channel_pricing import channel_losses, fits_channel_pricing

            if fits_channel_pricing(scores):
                losses = channel_losses(scores, widths)
                return {w: losses[..., i] for i, w in enumerate(widths)}
        top = scores.sort(dim=-1, descending=True).values
        total = scores.sum(-1)
        return {w: total - top[..., :w].contiguous().sum(-1) for w in widths}


@register_selector("global_mask")
@dataclass
class GlobalMask(ChannelSelector):
    """ThinK: one set of channels for every vector of a block (one index per channel)."""

    def side_format(self, width: int) -> SideFormat:
        return SideFormat("mask", width)

    def lost(self, scores: torch.Tensor, width: int) -> torch.Tensor:
        idx = scores.sum(-2).topk(width, dim=-1).indices
        kept = scores.gather(-1, idx[..., None, :].expand(*scores.shape[:-1], width)).sum(-1)
        return scores.sum(-1) - kept
