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
:meth:`PackedSealer.seal_many` does this for many segments at once (a prefill's): every
layer's KV heads of every segment folded into one span, every segment's region laid out
in one buffer (:func:`~mosaickv.kernels.layout.place_regions`) and written by one
launch. An 8B segment's policy work is 783 small ops alone and 24.5 each in batches of
32 (counted on the CPU by ``benchmarks/sealing/count_ops.py``,
benchmarks/results/sealing_ops_per_segment_cpu_one_span.json; 1,704 and 68.8 before the
one launch, the one span and the knapsack's many-way search).

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
from mosaickv.formats import channel_weights, format_arrays, lowrank_fit
from mosaickv.kernels.layout import LOWRANK, MASK, SPARSE, Placement, Region, place_regions
from mosaickv.kernels.pack import PackWrapper, SideInputs
from mosaickv.sealer import SegmentInputs
from mosaickv.uploads import upload

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
        """Seal segments of one pool (same shape) together: every layer's KV heads of every
        segment folded into the heads of one span, so the policy's scorers (which score
        each KV head alone) and statistics run once for all of them
        (:meth:`Compressor.plan_segments` with ``groups``), each segment planned within its
        own budget and packed into its own slab's region. Blocks keep the order
        (layer, KV head, segment)."""
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

        def fold(ts: list[torch.Tensor | None]) -> torch.Tensor | None:  # [L, Hkv, ...] each -> [1, L * Hkv * n, ...]
            if ts[0] is None:
                return None
            x = torch.stack(ts, dim=2)
            return x.reshape(1, x.shape[0] * x.shape[1] * n, *x.shape[3:])

        budgets = {x.budget_bytes for x in batch}
        if len(budgets) != 1:
            raise ValueError(f"segments sealed together share one slab budget, got {sorted(budgets)}")
        obs = segment_observations(self.policy, fold([x.k for x in batch]), fold([x.v for x in batch]),
                                   fold([x.query_stats for x in batch]), fold([x.attention for x in batch]))
        plan = self.compressor.plan_segments(obs, 0, 1, batch[0].budget_bytes, groups=n)
        tokens, kinds, widths, nbytes = format_arrays(plan.formats, self.head_dim)
        kept = self.compressor.kept_tokens(plan)
        mask, rows = _kept_rows(kept, plan.keep.shape, plan.keep.device)
        sides, misfits = zip(*(self._side_inputs(plan, side, x, score, mask, kept, tokens, kinds[:, side], widths[:, side])
                               for side, x, score in ((0, plan.keys, plan.k_score), (1, plan.values, plan.v_score))))
        # The check reads the device back: after the packer's launch is queued, so that the
        # host lays out the regions while the device still runs the plan's kernels. Regions
        # of a failed check are dropped before anything is installed.
        regions = self._pack(batch, plan, rows, list(sides), tokens, kinds, widths, nbytes)
        self._check_forms(misfits)
        return regions

    def _pack(self, batch: list[SegmentInputs], plan: SegmentPlan, rows: torch.Tensor, sides: list[SideInputs],
              tokens: np.ndarray, kinds: np.ndarray, widths: np.ndarray, nbytes: np.ndarray) -> list[Region]:
        """Every segment's bytes in one packer launch, into one buffer where each segment's
        region lies as its slab will hold it; segment ``g`` of ``n`` is every ``n``-th block
        of ``plan`` (in (layer, KV head) order)."""
        n, d = len(batch), self.head_dim
        used = nbytes.reshape(-1, n).sum(0)
        over = np.flatnonzero(used > batch[0].budget_bytes)
        if len(over):
            raise PartFailure("strategy", self.policy.strategy, f"planned {used[over[0]]} bytes, over the {batch[0].budget_bytes}-byte slab")
        bases = np.asarray([x.base_bytes for x in batch], dtype=np.int64)
        per_segment = [_by_segment(a, n) for a in (tokens, kinds, widths)]
        regions = place_regions(*per_segment, d, bases, ALIGN)
        sizes = regions.end_bytes - bases
        padded = -(-sizes // ALIGN) * ALIGN
        starts = np.cumsum(padded) - padded  # each region's place in one buffer
        buffer = place_regions(*per_segment, d, starts, ALIGN)
        total = int(starts[-1] + sizes[-1])
        place = Placement(_folded(buffer.table), -(-total // 2), total, _folded(buffer.value_starts),
                          _folded(buffer.value_gaps), _folded(buffer.index_starts), _folded(buffer.index_gaps),
                          int(buffer.pad_bytes.sum()))
        self.packer.plan_placed(place, np.zeros(len(tokens), dtype=np.int64), rows, d, plan.keys.device,
                                sides[0], sides[1], ALIGN)
        data = torch.zeros(-(-total // 2) * 2, dtype=torch.uint8, device=plan.keys.device)
        src_k, src_v = (x.to(torch.bfloat16).reshape(-1, 1, d) for x in (plan.keys, plan.values))  # row b * s + t
        self.packer.run(src_k, src_v, data.view(torch.bfloat16), data)
        return [Region(int(bases[g]), regions.table[g], data[starts[g]: starts[g] + sizes[g]]) for g in range(n)]

    def _side_inputs(self, plan: SegmentPlan, side: int, x: torch.Tensor, score: torch.Tensor, mask: torch.Tensor,
                     kept: Kept, tokens: np.ndarray, kinds: np.ndarray,
                     widths: np.ndarray) -> tuple[SideInputs, torch.Tensor | None]:
        """Per block: the channel weights (sparse), the block's channel score over its kept
        tokens (mask), and the low-rank basis and projection of the blocks whose ``side``
        is low rank (stacked in block order), as ``formats._pack_sides`` computes them from
        the kept vectors; ``tokens``, ``kinds``, ``widths``: :func:`format_arrays`. Also,
        on the device, whether a sparse block's scores are not of the packer's form
        (None where the side's scorer declares that form: nothing to read back)."""
        on = tokens > 0
        x, score = x.float(), score.float()
        m = mask[..., None]
        w = channel_weights(x * m, score * m)  # [B, d]: sums over kept vectors only
        channels = torch.ones_like(w)
        sparse = np.flatnonzero((kinds == SPARSE) & on)
        misfit = None
        if len(sparse):
            rows = upload(sparse, x.device)
            if not (self.policy.key_scorer if side == 0 else self.policy.value_scorer).squared_form:
                misfit = _misfit(score[rows], x[rows], w[rows], mask[rows])
            channels[rows] = w[rows]
        masked = np.flatnonzero((kinds == MASK) & on)
        if len(masked):
            rows = upload(masked, x.device)
            channels[rows] = (score[rows] * m[rows]).sum(1)
        lowrank = np.flatnonzero((kinds == LOWRANK) & on)
        if not len(lowrank):
            return SideInputs(channels), misfit
        ranks = widths[lowrank]
        r_top = int(ranks.max())
        bases, projs = (x.new_zeros(len(lowrank), r_top, x.shape[-1]) for _ in range(2))  # rows past a rank stay 0
        for count in np.unique(tokens[lowrank]).tolist():
            at = np.flatnonzero(tokens[lowrank] == count)  # their slots among the low-rank blocks
            idx = upload(lowrank[at], x.device)
            kept_rows, picked = kept[count]
            row_of = {b: i for i, b in enumerate(kept_rows.tolist())}  # host indices: no read back
            pos = picked[upload([row_of[b] for b in lowrank[at].tolist()], picked.device, torch.int64)]
            xk = x[idx].gather(1, pos[..., None].expand(-1, -1, x.shape[-1]))
            sk = score[idx].gather(1, pos[..., None].expand(-1, -1, x.shape[-1]))
            _, _, vh, wl = lowrank_fit(xk, sk)  # vh [G, min(count, d), d], wl [G, 1, d]
            top = min(r_top, vh.shape[1])
            slots = upload(at, x.device)
            bases[slots, :top] = vh[:, :top] / wl
            projs[slots, :top] = vh[:, :top] * wl
        # Each block's r rows, in block order, by index: a device mask's nonzero would wait for the device.
        own = upload(np.flatnonzero(np.arange(r_top)[None, :] < ranks[:, None]), x.device)
        d = x.shape[-1]
        return SideInputs(channels, bases.view(-1, d)[own], projs.view(-1, d)[own]), misfit

    def _check_forms(self, misfits: tuple[torch.Tensor | None, ...]) -> None:
        """The packer ranks by ``(w x)^2``; a scorer whose scores are not of that form
        would be packed by another rule than it asked for. Both sides in one read back."""
        real = [m for m in misfits if m is not None]
        if not real:
            return
        none = torch.zeros((), dtype=torch.bool, device=real[0].device)
        for side, bad in enumerate(torch.stack([none if m is None else m for m in misfits]).tolist()):
            if bad:
                role = "key_scorer" if side == 0 else "value_scorer"
                raise PartFailure(role, getattr(self.policy, role), "its element scores are not (w_c * x_c)^2 for one "
                                  "weight per channel, which the device sealer ranks by; seal with --kv-compress-sealing "
                                  "processes")


Kept = dict[int, tuple[torch.Tensor, torch.Tensor]]  # Compressor.kept_tokens: count -> (host rows, [G, m] tokens)


def _kept_rows(kept: Kept, shape: torch.Size, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, s] True where a block keeps the token, and the kept ``block * s + token`` in
    block-major order (what ``pack_block`` keeps), both from the selector's picks: a
    ``nonzero`` of the mask would wait for the device."""
    flat = [(upload(rows, device)[:, None] * shape[1] + picked).flatten()
            for rows, picked in kept.values() if picked.shape[1]]
    rows = torch.cat(flat).sort().values if flat else torch.zeros(0, dtype=torch.int64, device=device)
    # index_fill_ takes the scalar as it is; a set by advanced index synchronized here
    # (the eleventh run's sync census: once per sealing call).
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    mask.view(-1).index_fill_(0, rows, True)
    return mask, rows


def _misfit(score: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Whether any block's kept scores differ from ``(w x)^2`` by more than the tolerance
    (a device bool)."""
    err = ((score - (w[:, None, :] * x).pow(2)).abs() * mask[..., None]).amax(dim=(1, 2))
    scale = (score * mask[..., None]).amax(dim=(1, 2)).clamp_min(1e-30)
    return (err > FORM_TOLERANCE * scale).any()


def _by_segment(a: np.ndarray, n: int) -> np.ndarray:
    """Folded blocks ``[nb * n, ...]`` (segment ``g`` is every ``n``-th) as ``[n, nb, ...]``."""
    return a.reshape(-1, n, *a.shape[1:]).swapaxes(0, 1)


def _folded(a: np.ndarray) -> np.ndarray:
    """``[n, nb, ...]`` back to the folded block order ``[nb * n, ...]``."""
    return a.swapaxes(0, 1).reshape(-1, *a.shape[2:])
