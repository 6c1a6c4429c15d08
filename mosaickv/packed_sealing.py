"""Sealing where the KV lives (the GPU): a segment of every layer in one packer launch.

The host path (:func:`~mosaickv.compressor.compress_segment`, then
:func:`~mosaickv.kernels.layout.pack_region`) loops over a segment's layers x KV heads
blocks in Python. Moved to a GPU as it is, each block pays several small launches and host
syncs: 1.68 segments/s for an 8B shape on an H200, slower than one host process
(benchmarks/results/h200x2_2026-11-30). Here the policy's decisions stay batched tensors
(:meth:`~mosaickv.compressor.Compressor.plan_segments`: scores, statistics, the
strategy's formats), the kept tokens and every side's channel weights, block scores and
low-rank bases are computed for all blocks at once, and
:class:`~mosaickv.kernels.pack.PackWrapper` writes the region's bytes in one launch.
:meth:`PackedSealer.seal_many` does this for many segments at once (a prefill's), their
KV heads folded into one span per layer: an 8B segment's policy work is 1,704 small ops
alone and 68.8 each in batches of 32 (counted on the CPU by
``benchmarks/sealing/count_ops.py``, benchmarks/results/sealing_ops_per_segment_cpu.json).

The packer ranks a sparse side's channels by ``(w_c x_c)^2`` with one weight per channel
and block. ``w`` is recovered from the scorer's element scores as
:func:`~mosaickv.formats.channel_weights` does for low-rank sides; the built-in element
scorers (energy, query-weighted) are of that form, and a scorer that is not fails by name
instead of being packed by a different rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mosaickv.compressor import Compressor, PartFailure, SegmentPlan, segment_observations
from mosaickv.config import Policy
from mosaickv.formats import SIDE_KINDS, BlockFormat, channel_weights, lowrank_fit
from mosaickv.kernels.layout import Region, place_formats
from mosaickv.kernels.pack import PackWrapper, SideInputs
from mosaickv.sealer import SegmentInputs

ALIGN = 16  # the arena's alignment (pack_region's)
FORM_TOLERANCE = 1e-3  # |score - (w x)^2| allowed, relative to the block's largest score


@dataclass
class PackedSealer:
    """``SegmentInputs -> Region`` under one policy, on the inputs' device."""

    policy: Policy
    head_dim: int
    block_t: int = 32
    compressor: Compressor = field(init=False)
    packer: PackWrapper = field(init=False)

    def __post_init__(self) -> None:
        self.compressor = Compressor(self.policy, self.head_dim)
        self.policy = self.compressor.policy
        self.packer = PackWrapper(block_t=self.block_t)

    def __call__(self, inputs: SegmentInputs) -> Region:
        return self.seal_many([inputs])[0]

    def seal_many(self, batch: list[SegmentInputs]) -> list[Region]:
        """Seal segments of one pool (same shape) together: their KV heads folded into one
        span per layer, so the policy's scorers and statistics run once for all of them
        (:meth:`Compressor.plan_segments` with ``groups``), each planned within its own
        budget and packed into its own slab's region."""
        if not batch:
            return []
        kinds: dict[tuple[bool, bool], list[int]] = {}  # segments whose queries were or were not recorded
        for i, x in enumerate(batch):
            kinds.setdefault((x.query_stats is None, x.attention is None), []).append(i)
        if len(kinds) > 1:  # folded spans share what was observed: seal each kind together
            regions: list[Region] = [None] * len(batch)  # type: ignore[list-item]
            for rows in kinds.values():
                for i, region in zip(rows, self.seal_many([batch[i] for i in rows])):
                    regions[i] = region
            return regions
        n = len(batch)

        def fold(ts: list[torch.Tensor | None]) -> torch.Tensor | None:  # [L, Hkv, ...] each -> [L, Hkv * n, ...]
            if ts[0] is None:
                return None
            x = torch.stack(ts, dim=2)
            return x.reshape(x.shape[0], x.shape[1] * n, *x.shape[3:])

        budgets = {x.budget_bytes for x in batch}
        if len(budgets) != 1:
            raise ValueError(f"segments sealed together share one slab budget, got {sorted(budgets)}")
        obs = segment_observations(self.policy, fold([x.k for x in batch]), fold([x.v for x in batch]),
                                   fold([x.query_stats for x in batch]), fold([x.attention for x in batch]))
        plan = self.compressor.plan_segments(obs, 0, 1, batch[0].budget_bytes, groups=n)
        mask = self._kept_mask(plan)
        lowrank = [_lowrank_blocks(plan.formats, side) for side in (0, 1)]
        sides = [self._side_inputs(plan, side, x, score, mask, lowrank[side])
                 for side, x, score in ((0, plan.keys, plan.k_score), (1, plan.values, plan.v_score))]
        return [self._pack(inputs, plan, mask, sides, lowrank, g, n) for g, inputs in enumerate(batch)]

    def _pack(self, inputs: SegmentInputs, plan: SegmentPlan, mask: torch.Tensor, sides: list[SideInputs],
              lowrank: list[tuple[np.ndarray, np.ndarray]], g: int, n: int) -> Region:
        """Segment ``g`` of ``n`` folded into ``plan`` (its blocks are every ``n``-th, in
        (layer, KV head) order): their bytes in one packer launch."""
        k, v = inputs.k, inputs.v
        layers, hkv, s, d = k.shape
        formats = plan.formats[g::n]
        used = sum(f.nbytes(d) for f in formats)
        if used > inputs.budget_bytes:
            raise PartFailure("strategy", self.policy.strategy, f"planned {used} bytes, over the {inputs.budget_bytes}-byte slab")
        block, token = mask[g::n].nonzero(as_tuple=True)  # block-major, tokens in order: what pack_block keeps
        kept_rows = (block // hkv) * s + token  # rows of the [layers * s, hkv, d] sources below
        rel = place_formats(formats, d, 0, ALIGN)
        index_base = -(-2 * rel.values_end // ALIGN) * ALIGN
        end = rel.index_end if rel.index_end > index_base else 2 * rel.values_end
        heads = np.tile(np.arange(hkv), layers)
        mine = [_side_rows(side, *lowrank[which], g, n) for which, side in enumerate(sides)]
        self.packer.plan(formats, heads, kept_rows, d, k.device, mine[0], mine[1], ALIGN, 0, index_base)
        data = torch.zeros(-(-max(end, rel.index_end) // 2) * 2, dtype=torch.uint8, device=k.device)
        src_k, src_v = (x.to(torch.bfloat16).permute(0, 2, 1, 3).reshape(layers * s, hkv, d) for x in (k, v))
        self.packer.run(src_k, src_v, data.view(torch.bfloat16), data)
        table = place_formats(formats, d, inputs.base_bytes, ALIGN).table
        return Region(inputs.base_bytes, table, data[:end])

    def _kept_mask(self, plan: SegmentPlan) -> torch.Tensor:
        """[B, s] True where a block keeps the token (:meth:`Compressor.kept_tokens`)."""
        mask = torch.zeros(plan.keep.shape, dtype=torch.bool, device=plan.keep.device)
        for rows, picked in self.compressor.kept_tokens(plan).values():
            if picked.shape[1]:
                mask[rows.to(mask.device)[:, None], picked] = True
        return mask

    def _side_inputs(self, plan: SegmentPlan, side: int, x: torch.Tensor, score: torch.Tensor,
                     mask: torch.Tensor, lowrank_blocks: tuple[np.ndarray, np.ndarray]) -> SideInputs:
        """Per block: the channel weights (sparse), the block's channel score over its kept
        tokens (mask), and the low-rank basis and projection (``lowrank_blocks``: which
        blocks, their ranks), as ``formats._pack_sides`` computes them from the kept vectors."""
        fmts = [f.k if side == 0 else f.v for f in plan.formats]
        kinds = np.asarray([SIDE_KINDS.index(f.kind) for f in fmts])
        on = torch.as_tensor([f.tokens > 0 for f in plan.formats])
        x, score = x.float(), score.float()
        m = mask[..., None]
        w = channel_weights(x * m, score * m)  # [B, d]: sums over kept vectors only
        channels = torch.ones_like(w)
        sparse = torch.as_tensor(kinds == SIDE_KINDS.index("sparse")) & on
        if sparse.any():
            rows = sparse.nonzero().flatten().to(x.device)
            self._check_form(side, score[rows], x[rows], w[rows], mask[rows])
            channels[rows] = w[rows]
        masked = torch.as_tensor(kinds == SIDE_KINDS.index("mask")) & on
        if masked.any():
            rows = masked.nonzero().flatten().to(x.device)
            channels[rows] = (score[rows] * m[rows]).sum(1)
        lowrank = lowrank_blocks[0].tolist()
        if not lowrank:
            return SideInputs(channels)
        widths = torch.from_numpy(lowrank_blocks[1])
        r_top = int(widths.max())
        bases, projs = (x.new_zeros(len(lowrank), r_top, x.shape[-1]) for _ in range(2))  # rows past a rank stay 0
        slot = {b: i for i, b in enumerate(lowrank)}
        by_count: dict[int, list[int]] = {}
        for b in lowrank:
            by_count.setdefault(plan.formats[b].tokens, []).append(b)
        for count, group in by_count.items():
            idx = torch.as_tensor(group, device=x.device)
            pos = mask[idx].nonzero(as_tuple=True)[1].view(len(group), count)
            xk = x[idx].gather(1, pos[..., None].expand(-1, -1, x.shape[-1]))
            sk = score[idx].gather(1, pos[..., None].expand(-1, -1, x.shape[-1]))
            _, _, vh, wl = lowrank_fit(xk, sk)  # vh [G, min(count, d), d], wl [G, 1, d]
            top = min(r_top, vh.shape[1])
            at = torch.as_tensor([slot[b] for b in group], device=x.device)
            bases[at, :top] = vh[:, :top] / wl
            projs[at, :top] = vh[:, :top] * wl
        own = (torch.arange(r_top)[None, :] < widths[:, None]).to(x.device)  # each block's r rows, in block order
        return SideInputs(channels, bases[own], projs[own])

    def _check_form(self, side: int, score: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor) -> None:
        """The packer ranks by ``(w x)^2``; a scorer whose scores are not of that form
        would be packed by another rule than it asked for."""
        role = "key_scorer" if side == 0 else "value_scorer"
        err = ((score - (w[:, None, :] * x).pow(2)).abs() * mask[..., None]).amax(dim=(1, 2))
        scale = (score * mask[..., None]).amax(dim=(1, 2)).clamp_min(1e-30)
        if bool((err > FORM_TOLERANCE * scale).any()):
            part = getattr(self.policy, role)
            raise PartFailure(role, part, "its element scores are not (w_c * x_c)^2 for one weight per channel, which "
                              "the device sealer ranks by; seal with --kv-compress-sealing processes")


def _lowrank_blocks(formats: list[BlockFormat], side: int) -> tuple[np.ndarray, np.ndarray]:
    """The blocks whose ``side`` (keys 0, values 1) is stored low rank (in order, as their
    bases are stacked) and their ranks."""
    ranked = [(b, (f.k if side == 0 else f.v).width) for b, f in enumerate(formats)
              if (f.k if side == 0 else f.v).kind == "lowrank" and f.tokens > 0]
    blocks, widths = zip(*ranked) if ranked else ((), ())
    return np.asarray(blocks, dtype=np.int64), np.asarray(widths, dtype=np.int64)


def _side_rows(side: SideInputs, blocks: np.ndarray, widths: np.ndarray, g: int, n: int) -> SideInputs:
    """``side`` of segment ``g`` of ``n`` folded together alone: its blocks' channel rows
    and, of the low-rank bases stacked in block order (``blocks``, of ranks ``widths``), theirs."""
    channels = side.channels[g::n]
    mine = blocks % n == g
    if side.basis is None or not mine.any():
        return SideInputs(channels)
    starts = (np.cumsum(widths) - widths)[mine]
    counts = widths[mine]
    idx = np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(counts.sum())
    idx = torch.from_numpy(idx).to(side.basis.device)
    return SideInputs(channels, side.basis[idx], side.proj[idx])
