"""Triton packer: gather, select and store a batch of sealed blocks into an arena.

Sealing a segment turns its dense bf16 keys and values (in the KV pool) into the stored
formats of :mod:`mosaickv.formats`, written straight into the arena layout of
:mod:`.layout` that the attention kernel reads. The policy decides everything that needs
the whole segment or an SVD: the block formats, which tokens stay (``kept_rows``), the
channel weights or scores, the lowrank bases. The kernel does the per-token work, one
program per (block, tile of ``block_t`` kept tokens), all blocks of the batch in one launch:

* dense: copy the kept rows; fp8: the same rows as e4m3 bytes in the index arena;
* sparse: per vector, the ``r`` channels of largest ``(w_c · x_c)²`` for the block's
  per-channel weight ``w``, computed in fp32 as the scorers compute their element scores
  (ones: energy, ``formats._pack_sides``'s default; the query rms: the ``QueryWeighted``
  scorer, whose extra ``/ d`` is exact), stored in channel order, bf16 values and uint8
  indices. The r-th largest score is found exactly by a binary
  search over its fp32 bit pattern (31 counting passes, no sort);
* mask: the ``r`` channels of largest block score (the element scores summed over the
  kept tokens, as ``_pack_sides`` sums them), the same for every vector;
* lowrank: ``coef = x @ projᵀ`` (fp32 accumulate from a bf16 hi/lo split of ``proj``,
  bf16 store) and the basis. ``_pack_sides`` fits in a channel metric ``w``: with
  ``x·w = U S Vᵀ`` its basis is ``Vᵀ/w`` and its coefficients ``x @ (Vᵀ·w)ᵀ``, so ``proj``
  is ``Vᵀ·w`` (it equals the basis when ``w`` is ones).

Ties: where equal scores straddle the r-th place, the lower channels win (a stable
descending sort's first ``r``). ``torch.topk`` leaves that order unspecified (on the CPU
it does not pick the lower ones), so where ``formats.pack_block`` meets such a tie the two
may keep different, equally scored channels; everywhere else they agree exactly.

Every byte from the batch's first tensor to its last is written, the alignment padding
between tensors as zeros, so the result equals :meth:`Arena.from_blocks` of the blocks
``formats.pack_block`` makes (lowrank coefficients up to bf16 rounding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from mosaickv.formats import FP8_MAX, MAX_HEAD_DIM, SIDE_KINDS, BlockFormat
from mosaickv.kernels._interpret import patch_interpreter
from mosaickv.formats import format_arrays
from mosaickv.kernels.fp8_values import value_offsets
from mosaickv.kernels.layout import DENSE, FP8, LOWRANK, MASK, SPARSE, Arena, Placement, place_blocks
from mosaickv.uploads import upload

patch_interpreter()

PACK_FIELDS = ("head", "tok_start", "k_mat", "k_vgap", "k_agap", "v_mat", "v_vgap", "v_agap")
# jit code reads constexpr globals
_SPARSE, _MASK, _LOWRANK, _FP8 = tl.constexpr(SPARSE), tl.constexpr(MASK), tl.constexpr(LOWRANK), tl.constexpr(FP8)
_FP8_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def _top_r(key, r, ROWS: tl.constexpr):
    """Mask of the ``r`` largest entries of each row of ``key`` (fp32 >= 0, ``[ROWS, D]``);
    equal entries at the r-th place go to the lower columns."""
    bits = key.to(tl.int32, bitcast=True)  # non-negative floats order as their bits
    thr = tl.zeros([ROWS], tl.int32)
    for i in tl.static_range(31):  # largest t with #(bits >= t) >= r, i.e. the r-th largest
        cand = thr | (1 << (30 - i))
        cnt = tl.sum((bits >= cand[:, None]).to(tl.int32), 1)
        thr = tl.where(cnt >= r, cand, thr)
    above = bits > thr[:, None]
    tie = bits == thr[:, None]
    need = r - tl.sum(above.to(tl.int32), 1)
    return above | (tie & (tl.cumsum(tie.to(tl.int32), 1) <= need[:, None]))


@triton.jit
def _e4m3_bytes(x):
    """``x`` as float8 e4m3 bytes, saturated at ``FP8_MAX``, rounded to nearest even: the
    bits worked out in integers, so that the interpreter (whose own conversion rounds
    halves up) and the GPU store what ``torch``'s conversion does."""
    x = tl.minimum(tl.maximum(x.to(tl.float32), -_FP8_MAX), _FP8_MAX)
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF
    r = a + 0x7FFFF + ((a >> 20) & 1)  # round fp32's 23 mantissa bits to 3, ties to even
    normal = (((r >> 23) - 120) << 3) | ((r >> 20) & 7)  # exponent bias 127 -> 7
    y = tl.abs(x) * 512.0  # below 2^-6: subnormal, a count of 2^-9 (8 is the least normal)
    sub = ((y + 8388608.0) - 8388608.0).to(tl.int32)  # 2^23: fp32 addition rounds y to an integer, ties to even
    return (tl.where(tl.abs(x) < 0.015625, sub, normal) | sign).to(tl.uint8)


@triton.jit
def _store_side(x, tok, tok_ok, first, m, ent, vgap, agap, mat, chan_ptr, values_ptr, index_ptr, proj_ptr, basis_ptr,
                HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, R_MAX: tl.constexpr, GAP: tl.constexpr,
                VALUE_SIDE: tl.constexpr):
    """Store one side's tile ``x`` [BLOCK_T, HEAD_DIM] of a block whose table row starts at
    ``ent`` (kind, width, values offset, aux offset); the ``first`` tile also stores the
    block-wide parts (mask channels, lowrank basis) and zeroes the padding after them.
    ``VALUE_SIDE``: fp8 bytes go in groups of tokens (:mod:`.fp8_values`)."""
    cols = tl.arange(0, HEAD_DIM)
    jr = tl.arange(0, R_MAX)
    gj = tl.arange(0, GAP)
    kind = tl.load(ent)
    width = tl.load(ent + 1)
    voff = tl.load(ent + 2)
    aux = tl.load(ent + 3)
    x = x.to(values_ptr.dtype.element_ty)
    if kind == _LOWRANK:
        r_ok = jr < width
        p = tl.load(proj_ptr + (mat + jr[:, None]) * HEAD_DIM + cols[None, :], mask=r_ok[:, None], other=0.0)
        p_hi = p.to(tl.bfloat16)
        p_lo = (p - p_hi.to(tl.float32)).to(tl.bfloat16)
        coef = tl.dot(x, tl.trans(p_hi)) + tl.dot(x, tl.trans(p_lo))
        tl.store(values_ptr + voff + tok[:, None] * width + jr[None, :], coef.to(values_ptr.dtype.element_ty),
                 mask=tok_ok[:, None] & r_ok[None, :])
        if first:
            b = tl.load(basis_ptr + (mat + jr[:, None]) * HEAD_DIM + cols[None, :], mask=r_ok[:, None])
            tl.store(values_ptr + aux + jr[:, None] * HEAD_DIM + cols[None, :], b, mask=r_ok[:, None])
            tl.store(values_ptr + aux + width * HEAD_DIM + gj, tl.zeros([GAP], tl.bfloat16), mask=gj < agap)
    elif (kind == _SPARSE) | (kind == _MASK):
        chan = tl.load(chan_ptr + cols)  # sparse: channel weights; mask: channel scores
        if kind == _SPARSE:
            xw = x.to(tl.float32) * chan[None, :]
            sel = _top_r(xw * xw, width, BLOCK_T)
            idx_end = aux + m * width
        else:
            sel = tl.broadcast_to(_top_r(chan[None, :], width, 1), (BLOCK_T, HEAD_DIM))
            idx_end = aux + width
        slot = tl.cumsum(sel.to(tl.int32), 1) - 1  # kept channels in channel order
        ch = tl.broadcast_to(cols[None, :], (BLOCK_T, HEAD_DIM)).to(tl.uint8)
        dst = tok[:, None] * width + slot
        keep = sel & tok_ok[:, None]
        tl.store(values_ptr + voff + dst, x, mask=keep)
        if kind == _SPARSE:
            tl.store(index_ptr + aux + dst, ch, mask=keep)
        if first:
            if kind == _MASK:
                tl.store(index_ptr + aux + slot, ch, mask=sel & (tok == 0)[:, None])
            tl.store(index_ptr + idx_end + gj, tl.zeros([GAP], tl.uint8), mask=gj < agap)
    elif kind == _FP8:
        if VALUE_SIDE:
            at = value_offsets(tok, cols, m, HEAD_DIM)
        else:
            at = tok[:, None] * HEAD_DIM + cols[None, :]
        tl.store(index_ptr + aux + at, _e4m3_bytes(x), mask=tok_ok[:, None])
        if first:
            tl.store(index_ptr + aux + m * HEAD_DIM + gj, tl.zeros([GAP], tl.uint8), mask=gj < agap)
    else:
        tl.store(values_ptr + voff + tok[:, None] * HEAD_DIM + cols[None, :], x, mask=tok_ok[:, None])
    if first:
        tl.store(values_ptr + voff + m * width + gj, tl.zeros([GAP], tl.bfloat16), mask=gj < vgap)


@triton.jit
def _pack_kernel(
    src_k_ptr, src_v_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
    values_ptr, index_ptr, table_ptr, desc_ptr, items_ptr, rows_ptr, chan_ptr, proj_ptr, basis_ptr, num_blocks,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, R_MAX: tl.constexpr, GAP: tl.constexpr,
):
    """One (block, token tile) item: gather the tile's kept rows of the block's KV head
    from the sources and store both sides."""
    it = tl.program_id(0)
    blk = tl.load(items_ptr + it * 2).to(tl.int64)
    t0 = tl.load(items_ptr + it * 2 + 1)
    ent = table_ptr + blk * 9
    de = desc_ptr + blk * 8
    m = tl.load(ent)
    head = tl.load(de)
    tok = t0 + tl.arange(0, BLOCK_T)
    tok_ok = tok < m
    row = tl.load(rows_ptr + tl.load(de + 1) + tok, mask=tok_ok, other=0)
    cols = tl.arange(0, HEAD_DIM)
    first = t0 == 0
    xk = tl.load(src_k_ptr + (row * stride_kt + head * stride_kh)[:, None] + cols[None, :], mask=tok_ok[:, None], other=0.0)
    _store_side(xk, tok, tok_ok, first, m, ent + 1, tl.load(de + 3), tl.load(de + 4), tl.load(de + 2), chan_ptr + blk * HEAD_DIM,
                values_ptr, index_ptr, proj_ptr, basis_ptr, HEAD_DIM, BLOCK_T, R_MAX, GAP, False)
    xv = tl.load(src_v_ptr + (row * stride_vt + head * stride_vh)[:, None] + cols[None, :], mask=tok_ok[:, None], other=0.0)
    _store_side(xv, tok, tok_ok, first, m, ent + 5, tl.load(de + 6), tl.load(de + 7), tl.load(de + 5),
                chan_ptr + (num_blocks + blk) * HEAD_DIM, values_ptr, index_ptr, proj_ptr, basis_ptr, HEAD_DIM, BLOCK_T, R_MAX, GAP,
                True)


@dataclass
class SideInputs:
    """What the policy decides for one side (keys or values) of every block of a batch.

    ``channels`` fp32 ``[num_blocks, d]``: for sparse sides the per-channel weight ``w``
    (vectors keep the channels of largest ``(w·x)²``; ``None``: ones, i.e. energy), for mask
    sides the block's channel score (required), ignored for the rest. ``basis`` and
    ``proj`` ``[sum r, d]``: the ``[r, d]`` lowrank basis and projection of each lowrank
    side that keeps tokens, stacked in block order; ``proj`` defaults to ``basis``.
    """

    channels: torch.Tensor | None = None
    basis: torch.Tensor | None = None
    proj: torch.Tensor | None = None


@dataclass
class PackPlan:
    """Device tensors one run reads; everything data-dependent is fixed here."""

    arena: Arena  # the batch's table; its values/index are placeholders until run
    desc: torch.Tensor  # int64 [num_blocks, 8] PACK_FIELDS
    items: torch.Tensor  # int32 [num_items, 2] (block, first token of the tile)
    kept_rows: torch.Tensor  # int64 [sum m] source rows, block-major
    channels: torch.Tensor  # fp32 [2, num_blocks, d] keys', values' channel weights/scores
    proj: torch.Tensor  # fp32 [rows, d] lowrank projections (keys' then values')
    basis: torch.Tensor  # bf16 [rows, d] lowrank bases, same rows
    values_end: int
    index_end: int
    r_max: int
    gap: int

    @property
    def num_items(self) -> int:
        return int(self.items.shape[0])


class PackWrapper:
    """Plan/run packer (FlashInfer calling style): ``plan`` lays a batch out on the host
    and uploads its metadata; ``run`` is one launch over preallocated tensors, so it can
    be captured in a CUDA graph (replay reads whatever the sources hold then)."""

    def __init__(self, block_t: int = 32, num_warps: int = 4) -> None:
        if block_t < 16 or block_t & (block_t - 1):
            raise ValueError(f"block_t must be a power of two >= 16 (tl.dot), got {block_t}")
        self.block_t, self.num_warps = block_t, num_warps
        self._plan: PackPlan | None = None

    def plan(
        self,
        fmts: Sequence[BlockFormat],
        heads: np.ndarray | Sequence[int],
        kept_rows: torch.Tensor | np.ndarray,
        head_dim: int,
        device: torch.device | str = "cpu",
        k: SideInputs = SideInputs(),
        v: SideInputs = SideInputs(),
        align: int = 16,
        values_base: int = 0,
        index_base: int = 0,
    ) -> PackPlan:
        """Plan packing block ``i`` (format ``fmts[i]``) from KV head ``heads[i]`` of the
        sources; its kept tokens are source rows ``kept_rows[sum m_<i : sum m_<=i]``, in
        token order (``pack_block`` sorts kept tokens). Blocks go to the arenas in order
        from ``values_base``/``index_base`` (aligned; a pool appends after what it holds)."""
        tokens, kinds, widths, _ = format_arrays(fmts)
        place = place_blocks(tokens, kinds, widths, head_dim, align, values_base, index_base)
        return self.plan_placed(place, heads, kept_rows, head_dim, device, k, v, align)

    def plan_placed(
        self,
        place: Placement,
        heads: np.ndarray | Sequence[int],
        kept_rows: torch.Tensor | np.ndarray,
        head_dim: int,
        device: torch.device | str = "cpu",
        k: SideInputs = SideInputs(),
        v: SideInputs = SideInputs(),
        align: int = 16,
    ) -> PackPlan:
        """:meth:`plan` for blocks the caller laid out (``place``: its table gives each
        block's format and offsets), e.g. many regions' blocks in one buffer."""
        d = head_dim
        if d > MAX_HEAD_DIM or d & (d - 1):
            raise ValueError(f"head dim must be a power of two <= {MAX_HEAD_DIM}, got {d}")
        nb = len(place.table)
        heads = np.asarray(heads, dtype=np.int64)
        if heads.shape != (nb,):
            raise ValueError(f"{heads.shape} heads for {nb} blocks")
        tokens, kinds, widths = place.table[:, 0], place.table[:, [1, 5]], place.table[:, [2, 6]]
        wide = (kinds != DENSE) & (widths > d)
        if wide.any():
            b, s = (int(x[0]) for x in np.nonzero(wide))
            raise ValueError(f"{SIDE_KINDS[kinds[b, s]]} width {widths[b, s]} exceeds head dim {d}")
        if len(kept_rows) != tokens.sum():
            raise ValueError(f"{len(kept_rows)} kept rows for formats that keep {tokens.sum()} tokens")
        dev = torch.device(device)

        desc = np.zeros((nb, len(PACK_FIELDS)), dtype=np.int64)
        desc[:, 0] = heads
        desc[:, 1] = np.concatenate([[0], np.cumsum(tokens)[:-1]]) if nb else 0
        channels = torch.ones(2, nb, d, dtype=torch.float32, device=dev)
        projs: list[torch.Tensor] = []
        bases: list[torch.Tensor] = []
        mat_row = 0
        for s, side in enumerate((k, v)):
            used = (tokens > 0) & (kinds[:, s] != 0)
            lowrank = used & (kinds[:, s] == LOWRANK)
            if (used & (kinds[:, s] == MASK)).any() and side.channels is None:
                raise ValueError(f"mask {'kv'[s]} sides need their channel scores")
            if side.channels is not None:
                if side.channels.shape != (nb, d):
                    raise ValueError(f"{'kv'[s]} channels must be [{nb}, {d}], got {tuple(side.channels.shape)}")
                channels[s] = side.channels.to(dev, torch.float32)
            r = np.where(lowrank, widths[:, s], 0)
            rows = int(r.sum())
            basis = side.basis if side.basis is not None else torch.zeros(0, d)
            proj = side.proj if side.proj is not None else basis
            if basis.shape != (rows, d) or proj.shape != (rows, d):
                raise ValueError(f"{'kv'[s]} lowrank basis and proj must be [{rows}, {d}], got {tuple(basis.shape)}, {tuple(proj.shape)}")
            bases.append(basis.to(dev, torch.bfloat16))
            projs.append(proj.to(dev, torch.float32))
            desc[:, 2 + 3 * s] = mat_row + np.concatenate([[0], np.cumsum(r)[:-1]]) if nb else 0
            desc[:, 3 + 3 * s] = place.value_gaps[:, 2 * s]
            desc[:, 4 + 3 * s] = np.where(kinds[:, s] == LOWRANK, place.value_gaps[:, 2 * s + 1], place.index_gaps[:, s])
            mat_row += rows
        lowrank_widths = widths[(kinds == LOWRANK) & (tokens[:, None] > 0)]
        r_max = max(16, triton.next_power_of_2(int(lowrank_widths.max()))) if len(lowrank_widths) else 16
        gaps = np.concatenate([place.value_gaps.reshape(-1), place.index_gaps.reshape(-1), [1]])
        tiles = -(-tokens // self.block_t)
        item_blk = np.repeat(np.arange(nb), tiles)
        item_t0 = (np.arange(len(item_blk)) - np.repeat(np.cumsum(tiles) - tiles, tiles)) * self.block_t
        empty = torch.empty(0, device=dev)
        self._plan = PackPlan(
            arena=Arena.from_table(empty.bfloat16(), empty.to(torch.uint8), place.table, d, align, place.pad_bytes),
            desc=upload(desc, dev),
            items=upload(np.stack([item_blk, item_t0], 1).astype(np.int32), dev),
            kept_rows=upload(kept_rows, dev, torch.int64),
            channels=channels,
            proj=torch.cat(projs).contiguous(),
            basis=torch.cat(bases).contiguous(),
            values_end=place.values_end,
            index_end=place.index_end,
            r_max=r_max,
            gap=triton.next_power_of_2(int(gaps.max())),
        )
        return self._plan

    @property
    def plan_info(self) -> PackPlan:
        if self._plan is None:
            raise RuntimeError("call plan before run")
        return self._plan

    def run(
        self, src_k: torch.Tensor, src_v: torch.Tensor, values: torch.Tensor | None = None, index: torch.Tensor | None = None
    ) -> Arena:
        """Pack from ``src_k``/``src_v`` ``[rows, Hkv, d]`` into ``values`` (bf16) and ``index``
        (uint8), allocated to the batch's end if not given. Returns the batch's arena view
        (its table rows are the batch's blocks, offsets absolute in the buffers)."""
        p = self.plan_info
        d = p.arena.head_dim
        dev = p.desc.device
        for name, src in (("src_k", src_k), ("src_v", src_v)):
            if src.dim() != 3 or src.shape[2] != d or src.stride(2) != 1 or src.device != dev:
                raise ValueError(f"{name} must be [rows, Hkv, {d}] on {dev} with unit last stride, got {tuple(src.shape)}")
        if values is None:
            values = torch.empty(p.values_end, dtype=torch.bfloat16, device=dev)
        if index is None:
            index = torch.empty(p.index_end, dtype=torch.uint8, device=dev)
        if values.dtype != torch.bfloat16 or values.numel() < p.values_end or index.dtype != torch.uint8 or index.numel() < p.index_end:
            raise ValueError(f"arenas must be bf16 >= {p.values_end} and uint8 >= {p.index_end} elements")
        if p.num_items:
            _pack_kernel[(p.num_items,)](
                src_k, src_v, src_k.stride(0), src_k.stride(1), src_v.stride(0), src_v.stride(1),
                values, index, p.arena.table, p.desc, p.items, p.kept_rows, p.channels, p.proj, p.basis, p.desc.shape[0],
                HEAD_DIM=d, BLOCK_T=self.block_t, R_MAX=p.r_max, GAP=p.gap, num_warps=self.num_warps,
            )
        return dataclasses.replace(p.arena, values=values, index=index)
