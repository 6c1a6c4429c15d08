"""Host-side layout and plan for mixed-format attention (FlashInfer ``indptr``/``indices`` style).

Storage (:class:`Arena`) — every stored block of every request lives in three flat buffers:

* ``values``: bf16. Per block, in this order: key values (dense ``[m, d]``, sparse/mask
  ``[m, r]``, lowrank coefficients ``[m, r]``), the key lowrank basis ``[r, d]``, then the
  same for the values side.
* ``index``: uint8. Per block: key channel indices (sparse ``[m, r]``, mask ``[r]``) or
  fp8 key vectors (``[m, d]``, e4m3 bytes), then the value side's; fp8 values in groups of
  :data:`FP8_GROUP` tokens (:func:`group_fp8_values`).
* ``table``: int64 ``[num_blocks, 9]``, one row per block; columns are :data:`TABLE_FIELDS`.
  ``*_width`` is the row stride in ``values`` (``d`` for dense, ``r`` otherwise),
  ``*_values`` the element offset of the side's values in ``values``, ``*_aux`` the
  offset of its basis in ``values`` (lowrank) or of its indices in ``index`` (sparse and
  mask) or of its e4m3 vectors there (fp8, whose ``width`` is ``d`` and ``*_values`` 0),
  ``0`` for dense. A block that keeps no tokens stores nothing (offsets ``0``).

Exact byte accounting. Each tensor of a side starts at a multiple of ``align`` bytes
(``align=1`` packs them back to back); the gap before it is padding. Then::

    values.numel() * 2 + index.numel()
        == sum(block.nbytes() for block in blocks) - HEADER_BYTES * num_blocks + pad_bytes

i.e. the arenas hold exactly the tensors :class:`PackedBlock` holds, minus its 16-byte
int32 header, plus ``pad_bytes`` (0 when ``align == 1``; under ``16 * tensors`` with the
default 16). The header's information (kept tokens, key and value codes) is instead
carried by the block's ``table`` row, 72 bytes, which also holds the offsets.

:func:`place_blocks` computes that layout for a batch of formats (offsets, padding), for
:meth:`Arena.from_blocks` and for the Triton packer (:mod:`.pack`) alike.

Plan (:class:`AttentionPlan`) — for a batch of requests that each have ``Hkv`` block
lists (one per KV head, segment order) and a dense tail, ``block_indptr``/``block_indices``
name the blocks of ``(request, kv_head)`` (``block_indptr[b * Hkv + h]`` onwards). The
work is cut into *items*, each one ``(request, kv_head, block of query rows)`` and either
a run of whole blocks or a run of tail tokens; a kernel program computes one item's
partial softmax (output and log-sum-exp) and a merge kernel combines the items of each
``(request, kv_head, row block)`` *group*. Everything data-dependent is decided here, on
the host, so the run step only launches fixed grids over preallocated tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mosaickv.kernels.block_runs import KIND_PAIRS, BlockRuns, TileShape, as_table, block_runs, kind_tokens, pair_kinds
from mosaickv.formats import FP8_DTYPE, SIDE_KINDS, VALUE_DTYPE, WIDTHLESS, BlockFormat, PackedBlock, PackedSide, SideFormat, format_arrays
from mosaickv.reference import CompressedLayer
from mosaickv.uploads import upload

TABLE_FIELDS = ("tokens", "k_kind", "k_width", "k_values", "k_aux", "v_kind", "v_width", "v_values", "v_aux")
DENSE, SPARSE, MASK, LOWRANK, FP8 = (SIDE_KINDS.index(k) for k in ("dense", "sparse", "mask", "lowrank", "fp8"))
# The last two: a tail item's tail positions, a packed run's rows of the plan's tile
# starts (``AttentionPlan.tiles``; 0 and 0 without them).
ITEM_FIELDS = ("request", "kv_head", "row0", "block_lo", "block_hi", "tail_lo", "tail_hi")
REQUEST_FIELDS = ("qo_start", "qo_len", "tail_start", "tail_len")
GROUP_FIELDS = ("request", "kv_head", "row0")


def _side_sizes(kind: np.ndarray | int, m: np.ndarray | int, r: np.ndarray | int, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Elements in ``values`` for (values, basis) and bytes in ``index`` of one side,
    elementwise over arrays of sides (``r`` is ignored for dense and fp8)."""
    kind, m, r = np.asarray(kind, dtype=np.int64), np.asarray(m, dtype=np.int64), np.asarray(r, dtype=np.int64)
    on = m > 0
    values = np.where(on & (kind != FP8), m * np.where(kind == DENSE, d, r), 0)
    basis = np.where(on & (kind == LOWRANK), r * d, 0)
    index = np.where(on, np.select([kind == SPARSE, kind == MASK, kind == FP8], [m * r, r, m * d], 0), 0)
    return values, basis, index


def widthless(kinds: np.ndarray) -> np.ndarray:
    """Which side kinds keep every channel (the table's width is the head dim)."""
    return (kinds == DENSE) | (kinds == FP8)


def in_index(kinds: np.ndarray) -> np.ndarray:
    """Which side kinds keep bytes in ``index`` (their ``aux`` points there)."""
    return (kinds == SPARSE) | (kinds == MASK) | (kinds == FP8)


# Tokens of an fp8 value side stored channel by channel: a channel's group is one 8-byte run,
# the arena's alignment, so a tile's values travel in 8-byte copies (at 4 they took 4-byte
# ones, 8-9% slower; thirtieth run, docs/gpu_runs.md); the presets keep multiples of 8.
FP8_GROUP = 8


def group_fp8_values(rows: torch.Tensor) -> torch.Tensor:
    """An fp8 value side's bytes ``[m, d]`` as the arena stores them, flat: each whole group
    of ``G`` = :data:`FP8_GROUP` tokens channel by channel (token ``G·g + i``, channel ``c`` at
    ``G·d·g + G·c + i``), the last ``m % G`` tokens as rows at their row-major places. The
    values' product reduces over tokens, so a thread's operand is consecutive tokens of one
    channel: contiguous here, byte-wide loads from rows
    (``benchmarks/kernels/fp8_value_layout.py``). Keys reduce over channels and stay rows."""
    m, d = rows.shape
    full = m - m % FP8_GROUP
    head = rows[:full].reshape(full // FP8_GROUP, FP8_GROUP, d).transpose(1, 2).reshape(-1)
    return torch.cat([head, rows[full:].reshape(-1)])


def ungroup_fp8_values(flat: torch.Tensor, m: int, d: int) -> torch.Tensor:
    """:func:`group_fp8_values` undone: the side's ``[m, d]`` rows."""
    full = m - m % FP8_GROUP
    head = flat[: full * d].reshape(full // FP8_GROUP, d, FP8_GROUP).transpose(1, 2).reshape(full, d)
    return torch.cat([head, flat[full * d : m * d].reshape(m - full, d)])


def stored_tensors(side: PackedSide, value_side: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """A side's tensors by where the arena keeps them: values and basis in ``values`` (bf16),
    then the bytes in ``index`` (channel indices, or an fp8 side's e4m3 vectors, grouped by
    :data:`FP8_GROUP` tokens on the value side)."""
    if side.fmt.kind == "fp8":
        raw = side.values.view(torch.uint8)
        return None, None, group_fp8_values(raw) if value_side else raw
    return side.values, side.basis, side.index


def _place(sizes: np.ndarray, align: int, base: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row ``i`` of ``sizes`` ``[n, ...]``, its tensors (row-major order) stored back
    to back, each starting at a multiple of ``align`` (``base[i]`` is one): their starts,
    the end of the row's last non-empty one (``base[i]`` if none), and the gap after each
    up to the next non-empty one (0 after the last)."""
    n = sizes.shape[0]
    flat = sizes.reshape(n, -1)
    padded = -(-flat // align) * align
    start = base[:, None] + (np.cumsum(padded, axis=1) - padded)  # exclusive sums
    gap = padded - flat
    end = base.copy()
    used = flat > 0
    rows = np.flatnonzero(used.any(axis=1))
    if len(rows):
        last = flat.shape[1] - 1 - np.argmax(used[rows, ::-1], axis=1)
        end[rows] = start[rows, last] + flat[rows, last]
        gap[rows, last] = 0
    return start.reshape(sizes.shape), end, gap.reshape(sizes.shape)


@dataclass
class Placement:
    """Where a batch of blocks goes in the arenas (see the module docstring)."""

    table: np.ndarray  # int64 [num_blocks, 9] TABLE_FIELDS
    values_end: int  # bf16 elements of ``values`` up to the batch's last tensor
    index_end: int  # bytes of ``index`` up to the batch's last tensor
    value_starts: np.ndarray  # int64 [num_blocks, 4]: key values, key basis, value values, value basis
    value_gaps: np.ndarray  # int64 [num_blocks, 4] padding elements after each of those
    index_starts: np.ndarray  # int64 [num_blocks, 2]: key index, value index
    index_gaps: np.ndarray  # int64 [num_blocks, 2] padding bytes after each of those
    pad_bytes: int


@dataclass
class RegionPlacements:
    """Many regions laid out at once (:func:`place_regions`): row ``i`` of each array is
    region ``i``'s :class:`Placement`."""

    table: np.ndarray  # int64 [n, num_blocks, 9]
    values_end: np.ndarray  # int64 [n]
    index_end: np.ndarray  # int64 [n]
    value_starts: np.ndarray  # int64 [n, num_blocks, 4]
    value_gaps: np.ndarray
    index_starts: np.ndarray  # int64 [n, num_blocks, 2]
    index_gaps: np.ndarray
    pad_bytes: np.ndarray  # int64 [n]
    index_base: np.ndarray  # int64 [n]: where each region's index bytes start

    @property
    def end_bytes(self) -> np.ndarray:
        """Each region's end: after its index bytes, or after its values if it has none."""
        return np.where(self.index_end > self.index_base, self.index_end, 2 * self.values_end)

    def row(self, i: int) -> Placement:
        return Placement(self.table[i], int(self.values_end[i]), int(self.index_end[i]), self.value_starts[i],
                         self.value_gaps[i], self.index_starts[i], self.index_gaps[i], int(self.pad_bytes[i]))


def _place_rows(tokens: np.ndarray, kinds: np.ndarray, widths: np.ndarray, d: int, align: int,
                values_base: np.ndarray, index_base: np.ndarray | None) -> RegionPlacements:
    """Blocks ``[n, nb]`` laid out per row from ``values_base`` (elements) and ``index_base``
    (bytes; ``None``: from the first aligned byte after the row's values)."""
    if align < 1 or (align > 1 and align % 2):
        raise ValueError(f"align must be 1 or even (bf16 elements), got {align}")
    value_align = max(align // 2, 1)
    if (values_base % value_align).any() or (index_base is not None and (index_base % align).any()):
        raise ValueError(f"arena bases ({values_base.tolist()} elements, {None if index_base is None else index_base.tolist()} "
                         f"bytes) are not {align}-byte aligned")
    widths = np.where(widthless(kinds), d, widths)
    kv, kb, ki = _side_sizes(kinds[..., 0], tokens, widths[..., 0], d)
    vv, vb, vi = _side_sizes(kinds[..., 1], tokens, widths[..., 1], d)
    vsz, isz = np.stack([kv, kb, vv, vb], -1), np.stack([ki, vi], -1)
    vstart, vend, vgap = _place(vsz, value_align, values_base)
    if index_base is None:
        index_base = -(-2 * vend // align) * align
    istart, iend, igap = _place(isz, align, index_base)
    table = np.zeros((*tokens.shape, len(TABLE_FIELDS)), dtype=np.int64)
    table[..., 0] = tokens
    on = tokens > 0
    for s, col in enumerate((1, 5)):
        kind = kinds[..., s]
        table[..., col] = kind
        table[..., col + 1] = widths[..., s]
        table[..., col + 2] = np.where(on & (kind != FP8), vstart[..., 2 * s], 0)
        aux = np.where(kind == LOWRANK, vstart[..., 2 * s + 1], np.where(in_index(kind), istart[..., s], 0))
        table[..., col + 3] = np.where(on, aux, 0)
    pad = 2 * (vend - values_base - vsz.reshape(len(vsz), -1).sum(1)) + iend - index_base - isz.reshape(len(isz), -1).sum(1)
    return RegionPlacements(table, vend, iend, vstart, vgap, istart, igap, pad, index_base)


def place_blocks(
    tokens: np.ndarray, kinds: np.ndarray, widths: np.ndarray, d: int, align: int = 16, values_base: int = 0, index_base: int = 0
) -> Placement:
    """Lay out blocks (``tokens`` [nb], ``kinds``/``widths`` [nb, 2] for keys and values)
    in order from ``values_base`` (elements) and ``index_base`` (bytes), both aligned."""
    tokens = np.asarray(tokens, dtype=np.int64).reshape(1, -1)
    kinds = np.asarray(kinds, dtype=np.int64).reshape(1, -1, 2)
    widths = np.asarray(widths, dtype=np.int64).reshape(1, -1, 2)
    return _place_rows(tokens, kinds, widths, d, align, np.asarray([values_base]), np.asarray([index_base])).row(0)


@dataclass
class Arena:
    """Flat storage of many blocks; see the module docstring for the exact layout."""

    values: torch.Tensor  # bf16 [V]
    index: torch.Tensor  # uint8 [I]
    table: torch.Tensor  # int64 [num_blocks, 9]
    head_dim: int
    table_host: np.ndarray  # host copy of ``table``, for reading blocks back on the host
    has_sparse: bool  # some side is sparse: the kernel needs its scatter scratch
    widths_aligned: bool  # non-dense widths multiples of 8, fp8 values in whole FP8_GROUPs (vector loads)
    align: int  # bytes every tensor start is a multiple of
    pad_bytes: int

    @property
    def num_blocks(self) -> int:
        return int(self.table.shape[0])

    def nbytes(self) -> int:
        """Bytes of the value and index arenas (what attention reads, besides the table)."""
        return self.values.numel() * self.values.element_size() + self.index.numel()

    def to(self, device: torch.device | str) -> "Arena":
        return Arena(
            self.values.to(device), self.index.to(device), self.table.to(device), self.head_dim,
            self.table_host, self.has_sparse, self.widths_aligned, self.align, self.pad_bytes,
        )

    @staticmethod
    def from_table(values: torch.Tensor, index: torch.Tensor, table: np.ndarray, head_dim: int, align: int, pad_bytes: int) -> "Arena":
        """Wrap buffers already laid out per ``table`` (host int64 ``[num_blocks, 9]``)."""
        kinds = np.concatenate([table[:, 1], table[:, 5]])
        used = np.tile(table[:, 0], 2) > 0
        return Arena(
            values=values,
            index=index,
            table=upload(np.ascontiguousarray(table, dtype=np.int64), values.device),
            head_dim=head_dim,
            table_host=np.ascontiguousarray(table, dtype=np.int64),
            has_sparse=bool(((kinds == SPARSE) & used).any()),
            widths_aligned=align % 16 == 0 and widths_aligned(table),
            align=align,
            pad_bytes=pad_bytes,
        )

    @staticmethod
    def from_blocks(blocks: Sequence[PackedBlock], head_dim: int, align: int = 16) -> "Arena":
        """Copy packed blocks into one arena, in order (block ``i`` is table row ``i``)."""
        d = head_dim
        for i, blk in enumerate(blocks):
            if blk.d != d:
                raise ValueError(f"block {i} has head dim {blk.d}, arena has {d}")
        sides = [(blk.k, blk.v) for blk in blocks]
        kinds = np.asarray([[SIDE_KINDS.index(s.fmt.kind) for s in pair] for pair in sides], dtype=np.int64).reshape(-1, 2)
        widths = np.asarray([[s.fmt.width for s in pair] for pair in sides], dtype=np.int64).reshape(-1, 2)
        place = place_blocks(np.asarray([blk.fmt.tokens for blk in blocks], dtype=np.int64), kinds, widths, d, align)
        values = torch.zeros(place.values_end, dtype=torch.bfloat16)
        index = torch.zeros(place.index_end, dtype=torch.uint8)
        for i, (k, v) in enumerate(sides):
            if not blocks[i].fmt.tokens:
                continue
            for s, side in enumerate((k, v)):
                vals, basis, stored = stored_tensors(side, value_side=s == 1)
                parts = [(values, place.value_starts[i, 2 * s], vals), (values, place.value_starts[i, 2 * s + 1], basis),
                         (index, place.index_starts[i, s], stored)]
                for buf, start, t in parts:
                    if t is not None:
                        buf[int(start) : int(start) + t.numel()] = t.reshape(-1).to(buf.dtype)
        return Arena.from_table(values, index, place.table, d, align, place.pad_bytes)

    def block(self, i: int, n: int | None = None) -> PackedBlock:
        """Read block ``i`` back, on the host, as a :class:`PackedBlock` (``n`` defaults to
        its kept tokens)."""
        return read_block(self.values, self.index, self.table_host[i], self.head_dim, n, device="cpu")


def unaligned_blocks(table: np.ndarray) -> np.ndarray:
    """Per row of ``table``: a block that keeps tokens with a non-dense width that is not a
    multiple of 8, or fp8 values of a token count that is not a multiple of
    :data:`FP8_GROUP` (rows past its last whole group), whose rows the kernels cannot load
    as vectors (``ALIGNED``)."""
    kinds, widths = table[:, [1, 5]], table[:, [2, 6]]
    used = (table[:, 0] > 0)[:, None]
    ragged_fp8 = (table[:, 5] == FP8) & (table[:, 0] % FP8_GROUP != 0)
    return (~widthless(kinds) & used & (widths % 8 != 0)).any(axis=1) | ragged_fp8


def widths_aligned(table: np.ndarray) -> bool:
    """Every non-dense width of the blocks in ``table`` that keep tokens is a multiple of 8,
    and every fp8 value side keeps whole groups of :data:`FP8_GROUP` tokens."""
    return not unaligned_blocks(table).any()


def read_block(values: torch.Tensor, index: torch.Tensor, row: Sequence[int], head_dim: int, n: int | None = None,
               device: torch.device | str | None = None) -> PackedBlock:
    """The block that table ``row`` describes, its tensors read from ``values``/``index``
    (views there unless ``device`` asks for copies elsewhere)."""
    row = [int(x) for x in row]
    m, d = row[0], head_dim
    sides = []
    for col in (1, 5):
        kind, width, voff, aux = row[col : col + 4]
        fmt = SideFormat(SIDE_KINDS[kind], 0 if SIDE_KINDS[kind] in WIDTHLESS else width)
        nv, nb, ni = (int(x) for x in _side_sizes(kind, m, width, d))
        side = PackedSide(fmt)
        if m and kind == FP8:
            raw = index[aux : aux + ni]
            rows = ungroup_fp8_values(raw, m, d) if col == 5 else raw.reshape(m, d)
            side.values = rows.view(FP8_DTYPE).to(device)
        elif m:
            side.values = values[voff : voff + nv].reshape(m, -1).to(device)
            if kind == LOWRANK:
                side.basis = values[aux : aux + nb].reshape(width, d).to(device)
            elif kind == SPARSE:
                side.index = index[aux : aux + ni].reshape(m, width).to(device)
            elif kind == MASK:
                side.index = index[aux : aux + ni].to(device)
        sides.append(side)
    fmt = BlockFormat(m, sides[0].fmt, sides[1].fmt)
    header = fmt.header().to(values.device if device is None else device)  # unpack_block densifies where it is
    return PackedBlock(fmt=fmt, n=m if n is None else n, d=d, header=header, k=sides[0], v=sides[1])


def place_region(blocks: Sequence[PackedBlock], head_dim: int, base_bytes: int, align: int = 16) -> Placement:
    """Layout of ``blocks`` in one byte region from ``base_bytes`` (a multiple of
    ``align``) of a byte arena whose bf16 view is ``values`` and whose bytes are ``index``:
    every block's bf16 tensors first, then, from the next aligned byte, their indices. The
    table's offsets are absolute in that arena; ``index_end`` is the region's end."""
    return place_formats([b.fmt for b in blocks], head_dim, base_bytes, align)


def place_formats(fmts: Sequence[BlockFormat], head_dim: int, base_bytes: int, align: int = 16) -> Placement:
    """:func:`place_region` from the blocks' formats alone (what a packer lays out before
    any block exists)."""
    tokens, kinds, widths, _ = format_arrays(fmts)
    return place_regions(tokens[None], kinds[None], widths[None], head_dim, np.asarray([base_bytes]), align).row(0)


def place_regions(tokens: np.ndarray, kinds: np.ndarray, widths: np.ndarray, head_dim: int, base_bytes: np.ndarray,
                  align: int = 16) -> RegionPlacements:
    """:func:`place_formats` of many regions at once: region ``i``'s blocks are row ``i``
    of ``tokens`` ``[n, nb]`` and ``kinds``/``widths`` ``[n, nb, 2]`` (:func:`format_arrays`),
    laid out from ``base_bytes[i]``."""
    base_bytes = np.asarray(base_bytes, dtype=np.int64)
    if (base_bytes % align).any():
        raise ValueError(f"region bases {base_bytes.tolist()} are not all multiples of {align} bytes")
    return _place_rows(tokens, kinds, widths, head_dim, align, base_bytes // 2, None)


def region_bytes(blocks: Sequence[PackedBlock], place: Placement, base_bytes: int) -> torch.Tensor:
    """The bytes from ``base_bytes`` to ``place.index_end`` that :func:`place_region`
    lays out (padding zeroed), on the blocks' device, built in one concatenation."""
    pieces: list[torch.Tensor] = []
    cursor = base_bytes
    device = next((t.device for b in blocks for s in (b.k, b.v) for t in s.tensors()), torch.device("cpu"))
    zeros = torch.zeros(256, dtype=torch.uint8, device=device)  # padding: every gap is under the alignment

    def put(start: int, t: torch.Tensor) -> None:
        nonlocal cursor
        if start > cursor:
            pieces.append(zeros[: start - cursor])
        raw = t.contiguous().view(torch.uint8).reshape(-1)
        pieces.append(raw)
        cursor = start + raw.numel()

    for i, blk in enumerate(blocks):
        for s, side in enumerate((blk.k, blk.v)):
            for j, t in enumerate(stored_tensors(side, value_side=s == 1)[:2]):
                if blk.fmt.tokens and t is not None:
                    put(2 * int(place.value_starts[i, 2 * s + j]), t.to(VALUE_DTYPE))
    for i, blk in enumerate(blocks):
        for s, side in enumerate((blk.k, blk.v)):
            stored = stored_tensors(side, value_side=s == 1)[2]
            if blk.fmt.tokens and stored is not None:
                put(int(place.index_starts[i, s]), stored.to(torch.uint8))
    if not pieces:
        return zeros[:0]
    return torch.cat(pieces)


@dataclass
class Region:
    """A sealed segment as the arena stores it: its bytes from ``base_bytes`` (see
    :func:`place_region`) and one table row per block. Pickles as host arrays, so that
    a worker process can hand it back."""

    base_bytes: int  # where in the arena it was laid out for
    table: np.ndarray  # int64 [num_blocks, 9] TABLE_FIELDS, offsets absolute in the arena
    data: torch.Tensor  # uint8, the region's bytes

    def __reduce__(self):
        return _region_from_host, (self.base_bytes, self.table, self.data.cpu().numpy())


def _region_from_host(base_bytes: int, table: np.ndarray, data: np.ndarray) -> Region:
    return Region(base_bytes, table, torch.from_numpy(data))


def pack_region(blocks: Sequence[PackedBlock], head_dim: int, base_bytes: int) -> Region:
    """``blocks`` laid out as one region from ``base_bytes`` of an arena."""
    place = place_region(blocks, head_dim, base_bytes)
    return Region(base_bytes, place.table, region_bytes(blocks, place, base_bytes))


def pack_requests(layers: Sequence[CompressedLayer], num_kv_heads: int, head_dim: int, align: int = 16) -> tuple[Arena, np.ndarray, np.ndarray]:
    """Arena of every block of every request, plus ``block_indptr``/``block_indices``.

    Blocks are stored request-major, then KV head, then segment, so ``block_indices`` is
    the identity; a pool that stores blocks elsewhere just passes its own indices.
    """
    blocks: list[PackedBlock] = []
    indptr = [0]
    for layer in layers:
        for h in range(num_kv_heads):
            blocks.extend(seg[h] for seg in layer.blocks)
            indptr.append(len(blocks))
    arena = Arena.from_blocks(blocks, head_dim, align)
    return arena, np.asarray(indptr, dtype=np.int64), np.arange(len(blocks), dtype=np.int64)


def ragged_tails(tails: Sequence[torch.Tensor]) -> tuple[torch.Tensor, np.ndarray]:
    """Stack per-request tails ``[Hkv, t, d]`` token-major into ``[sum t, Hkv, d]`` + indptr."""
    indptr = np.zeros(len(tails) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([t.shape[1] for t in tails])
    return torch.cat([t.transpose(0, 1) for t in tails]).contiguous(), indptr


TAIL = -1  # launch kind of the dense-tail items


def r_max_for(sides: Sequence[tuple[int, int]]) -> int:
    """A launch's ``R_MAX`` for the widest (kind, width) of each side: the widest
    non-dense width as a power of two, at least 16."""
    r_max = 16
    for kind, width in sides:
        if kind in (SPARSE, MASK, LOWRANK):
            r_max = max(r_max, 1 << (width - 1).bit_length())
    return r_max


def launch_variants(sides: Sequence[SideFormat]) -> list[tuple[int, int, int]]:
    """Every ``(k_kind, v_kind, R_MAX)`` launch that blocks whose sides are among
    ``sides`` can lead to, plus the tail's: a launch's widths are those of one of its
    blocks, so pairs of candidates cover every batch."""
    kinds = [(SIDE_KINDS.index(s.kind), s.width) for s in sides]
    variants = {(k[0], v[0], r_max_for((k, v))) for k in kinds for v in kinds}
    return sorted(variants) + [(TAIL, TAIL, 16)]


@dataclass
class Launch:
    """One specialisation of the attention kernel and the items it computes."""

    k_kind: int  # DENSE..LOWRANK, or TAIL for the dense tail
    v_kind: int
    r_max: int  # widest non-dense width of its blocks, as a power of two >= 16
    items: torch.Tensor  # int32 [>= count] rows of ``AttentionPlan.items``
    count: torch.Tensor  # int32 [1]: how many of ``items`` the launch computes (read on the device)
    num_programs: int


@dataclass
class AttentionPlan:
    """Device tensors one run step reads; all shapes fixed at plan time."""

    requests: torch.Tensor  # int32 [B, 4] REQUEST_FIELDS
    items: torch.Tensor  # int32 [num_items, 7] ITEM_FIELDS
    groups: torch.Tensor  # int32 [num_groups, 3] GROUP_FIELDS (rows past ``num_groups[0]`` unused)
    merge_indptr: torch.Tensor  # int32 [num_groups + 1] items of each group
    num_groups: torch.Tensor  # int32 [1]: groups the merge reads (its grid may be larger)
    block_indices: torch.Tensor  # int32 [nnz] table rows, per (request, kv_head), by kind pair
    launches: list[Launch]
    o_part: torch.Tensor  # fp32 [num_items, block_m, d] partial outputs
    lse_part: torch.Tensor  # fp32 [num_items, block_m] partial log2-sum-exp
    scratch: torch.Tensor  # bf16 [max programs, 2, block_n, d] zeroed, sparse scatter space
    block_m: int
    block_n: int
    total_q: int
    # Packed tiles' starts (MixedAttention(tile_starts=True),
    # :func:`~mosaickv.kernels.block_runs.run_tile_starts`): a packed item's tiles are
    # entries tail_lo .. tail_hi of ``tiles`` (its ITEM_FIELDS 5 and 6), each the block
    # past the item's block_lo (high 16 bits) and tokens of it earlier tiles took (low 16);
    # None: packed tiles find their starts as they go.
    tiles: torch.Tensor | None = None  # int32 [num_tiles]
    # Query tokens of the plan's longest request (a bound for a graph's plans): whether an
    # item may hold query rows past a GQA group's.
    max_q: int = 1

    @property
    def num_items(self) -> int:
        return int(self.items.shape[0])


@dataclass
class HostLayer:
    """One layer's plan on the host: items, groups, merge pointers, and per launch
    ``(k_kind, v_kind, R_MAX, item ids)``."""

    items: np.ndarray
    groups: np.ndarray
    merge_indptr: np.ndarray
    launches: list[tuple[int, int, int, np.ndarray]]


@dataclass
class TailSlots:
    """A plan's dense-tail items and what their ends depend on: between two decode steps
    of one batch only the tails grow, so a plan is reused with these patched
    (:meth:`HostPlan.with_tails`) while every group keeps its number of tail items."""

    ids: np.ndarray  # rows of the plan's items, every layer's back to back
    request: np.ndarray  # each one's request
    start: np.ndarray  # its first tail position
    offset: np.ndarray  # it sees the tail up to tail_len + offset (its row block's last query)
    chunk: int  # tail tokens per item
    qo_lens: np.ndarray  # [B] the queries the plan was made for
    counts: np.ndarray  # tail items of each (request, row block), :func:`tail_items`


@dataclass
class HostPlan:
    """A batch's plan before upload (:func:`upload_plans`, or a graph's static buffers)."""

    requests: np.ndarray  # [B, 4] REQUEST_FIELDS
    block_indices: torch.Tensor  # int64, on the block table's device (block_runs)
    layers: list[HostLayer]
    block_m: int
    block_n: int
    items: np.ndarray | None = None  # every layer's items back to back (the layers' are views of it)
    tails: TailSlots | None = None  # what :meth:`with_tails` patches (plan_host sets both)
    tiles: torch.Tensor | None = None  # int32 [T] packed runs' tile starts, beside block_indices

    @property
    def total_q(self) -> int:
        return int(self.requests[:, 1].sum())

    @property
    def max_q(self) -> int:
        """Query tokens of the longest request (0 without requests)."""
        return int(self.requests[:, 1].max(initial=0))

    def with_tails(self, tail_lens: np.ndarray, group: int) -> "HostPlan":
        """This plan for tails of ``tail_lens`` tokens (same blocks, same queries): its tail
        items' ends rewritten in place to where a fresh :func:`plan_host` would end them,
        with a request table of its own. In place, not on a copy: a copy of the items is
        8.4 MB at 240 requests (SmolLM2, 30 layers) and cost a decode step more than the
        rest of the patch. So every plan sharing these items (this one, and those
        ``with_tails`` made from it) ends its tails at the latest ``tail_lens``: use (ship
        or upload) a plan before the next ``with_tails`` of its family."""
        tails = self.tails
        if tails is None or self.items is None:
            raise ValueError("this HostPlan has no tail slots (plan_host makes them): plan it again")
        tail_lens = np.asarray(tail_lens, dtype=np.int64)
        if len(tail_lens) != len(self.requests):
            raise ValueError(f"tail_lens has {len(tail_lens)} entries, the plan {len(self.requests)} requests")
        counts = tail_items(tails.qo_lens, tail_lens, group, self.block_m, tails.chunk)
        if not np.array_equal(counts, tails.counts):
            raise ValueError(f"tail_lens {tail_lens.tolist()} change the tail items per (request, row block) from "
                             f"{tails.counts.tolist()} to {counts.tolist()}: plan it again")
        self.items.flags.writeable = True
        self.items[tails.ids, 6] = np.minimum(tails.start + tails.chunk,
                                              np.maximum(0, tail_lens[tails.request] + tails.offset))
        self.items.flags.writeable = False
        requests = self.requests.copy()
        requests[:, 2] = np.cumsum(tail_lens) - tail_lens
        requests[:, 3] = tail_lens
        return HostPlan(requests, self.block_indices, self.layers, self.block_m, self.block_n, self.items, tails,
                        self.tiles)


def tail_chunk(chunk_tokens: int, block_n: int) -> int:
    """Tail tokens per item: ``chunk_tokens`` rounded up to whole ``block_n`` tiles."""
    return max(block_n, -(-chunk_tokens // block_n) * block_n)


def tail_items(qo_lens: np.ndarray, tail_lens: np.ndarray, group: int, block_m: int, chunk: int) -> np.ndarray:
    """Tail items of each (request, row block), request-major: the tail a row block's last
    query sees (query ``i`` of ``nq`` sits at tail position ``t - nq + i``), in ``chunk``s.
    A plan is reused for other ``tail_lens`` while these stay the same."""
    qo_lens, tail_lens = np.asarray(qo_lens, dtype=np.int64), np.asarray(tail_lens, dtype=np.int64)
    row_blocks = -(-qo_lens * group // block_m)
    req = np.repeat(np.arange(len(qo_lens)), row_blocks)
    row0 = (np.arange(len(req)) - np.repeat(np.cumsum(row_blocks) - row_blocks, row_blocks)) * block_m
    last_q = np.minimum(qo_lens[req] - 1, (row0 + block_m - 1) // group)
    visible = np.maximum(0, tail_lens[req] - qo_lens[req] + last_q + 1)
    return -(-visible // chunk)


def plan_work(
    table: torch.Tensor,
    block_indptr: np.ndarray,
    block_indices: torch.Tensor,
    qo_lens: np.ndarray,
    tail_lens: np.ndarray,
    num_kv_heads: int,
    group: int,
    block_m: int,
    block_n: int,
    chunk_tokens: int,
    runs: BlockRuns | None = None,
    kind_chunks: np.ndarray | None = None,
    tile_shape: TileShape | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, BlockRuns]:
    """Cut the batch into items; returns ``items``, ``item_kind``, ``groups``,
    ``merge_indptr`` (host) and the :class:`~mosaickv.kernels.block_runs.BlockRuns`
    whose reordered ``block_indices`` the items point into.

    Softmax does not care about key order, so the blocks of each ``(request, kv_head)``
    are regrouped by (key kind, value kind) and every item's blocks share one pair: the
    kernel is then specialised per pair at compile time (no format branches, half the
    registers). ``item_kind`` is the format pair (``NUM_KINDS * k_kind + v_kind``), or ``TAIL``. Blocks go into
    runs of about ``chunk_tokens`` kept tokens (whole blocks: a block's basis is folded in
    once, at its end), on the table's device (:func:`block_runs`); the tail into runs of
    ``chunk_tokens`` rounded up to ``block_n``, here; ``runs``: those block runs, already
    found (cut at ``chunk_tokens``, e.g. :func:`~mosaickv.kernels.block_runs.batch_runs`).
    ``kind_chunks``: block runs' kept tokens per format pair instead (``KIND_PAIRS``
    entries, :func:`kind_chunk_tokens`); tails still use ``chunk_tokens``. ``tile_shape``:
    packed tiles' tokens per format pair and lanes, to give packed runs' items
    their tile starts (ITEM_FIELDS 5 and 6) when the runs are found here.
    Runs with no kept token are dropped, as are tail runs no query row of the row block
    can see: query ``i`` of ``nq`` sits at tail position ``t - nq + i`` and sees the tail
    up to there (none if that is negative, e.g. a decode query with an empty tail).
    """
    bsz = len(qo_lens)
    hkv = num_kv_heads
    if len(block_indptr) != bsz * hkv + 1:
        raise ValueError(f"block_indptr has {len(block_indptr)} entries, expected {bsz * hkv + 1}")
    if runs is None:
        runs = block_runs(table, block_indptr, block_indices, chunk_tokens if kind_chunks is None else kind_chunks,
                          tile_shape=tile_shape)
    run_pair, run_lo, run_hi, run_kp = runs.pair, runs.lo, runs.hi, runs.kind
    run_ptr = np.searchsorted(run_pair, np.arange(bsz * hkv + 1))
    chunk = tail_chunk(chunk_tokens, block_n)

    # Groups: every (request, kv_head, row block), request-major.
    row_blocks = -(-qo_lens.astype(np.int64) * group // block_m)
    g_req = np.repeat(np.arange(bsz), row_blocks * hkv)
    g_first = np.repeat(np.cumsum(row_blocks * hkv) - row_blocks * hkv, row_blocks * hkv)
    g_local = np.arange(len(g_req)) - g_first
    g_head = g_local // np.maximum(row_blocks[g_req], 1)
    g_row0 = g_local % np.maximum(row_blocks[g_req], 1) * block_m
    g_pair = g_req * hkv + g_head
    nq, t = qo_lens[g_req].astype(np.int64), tail_lens[g_req].astype(np.int64)
    last_q = np.minimum(nq - 1, (g_row0 + block_m - 1) // group)
    visible = np.maximum(0, t - nq + last_q + 1)
    n_runs = run_ptr[g_pair + 1] - run_ptr[g_pair]
    n_items = n_runs + -(-visible // chunk)
    merge_indptr = np.concatenate([[0], np.cumsum(n_items)]).astype(np.int64)

    # Items: each group's block runs, then its tail runs.
    i_group = np.repeat(np.arange(len(g_req)), n_items)
    i_local = np.arange(len(i_group)) - merge_indptr[i_group]
    is_run = i_local < n_runs[i_group]
    run = np.where(is_run, run_ptr[g_pair[i_group]] + i_local, 0)
    tstart = (i_local - n_runs[i_group]) * chunk
    all_items = np.zeros((len(i_group), len(ITEM_FIELDS)), dtype=np.int64)
    all_items[:, 0], all_items[:, 1], all_items[:, 2] = g_req[i_group], g_head[i_group], g_row0[i_group]
    if len(run_lo):
        all_items[:, 3] = np.where(is_run, run_lo[run], 0)
        all_items[:, 4] = np.where(is_run, run_hi[run], 0)
        all_kinds = np.where(is_run, run_kp[run], TAIL)
    else:
        all_kinds = np.full(len(i_group), TAIL, dtype=np.int64)
    if len(run_lo):
        all_items[:, 5] = np.where(is_run, runs.tile_lo[run], tstart)
        all_items[:, 6] = np.where(is_run, runs.tile_hi[run], np.minimum(tstart + chunk, visible[i_group]))
    else:
        all_items[:, 5] = tstart
        all_items[:, 6] = np.minimum(tstart + chunk, visible[i_group])
    groups = np.stack([g_req, g_head, g_row0], axis=1).astype(np.int64).reshape(-1, 3)
    return all_items, all_kinds, groups, merge_indptr, runs


def build_plan(
    arena: Arena,
    block_indptr: np.ndarray,
    block_indices: np.ndarray,
    qo_lens: np.ndarray,
    tail_lens: np.ndarray,
    num_kv_heads: int,
    group: int,
    block_m: int,
    block_n: int,
    chunk_tokens: int | None = None,
    max_programs: int | None = None,
    chunk_by_kind: bool = False,
    tile_shape: TileShape | None = None,
) -> AttentionPlan:
    """Plan one batch on the host and upload it (the only host-to-device step).

    ``chunk_tokens`` defaults to splitting the work into about four items per program
    slot; ``max_programs`` (per launch) to eight programs per SM on a GPU. Launches are
    persistent: each program loops over items and owns one slice of the scatter scratch.
    ``chunk_by_kind``: each format pair's runs as long as its own work asks
    (:func:`kind_chunk_tokens`). ``tile_shape``: packed tiles' tokens per format pair and lanes, to
    plan their starts (:func:`plan_work`).
    """
    device = arena.values.device
    max_programs = default_max_programs(device) if max_programs is None else max_programs
    kind_chunks = None
    if chunk_by_kind:
        kind_chunks = kind_chunk_tokens(kind_tokens(arena.table, block_indices), int(np.sum(tail_lens)), 1,
                                        num_kv_heads, block_n, max_programs)
    host = plan_host(arena.table, block_indptr, block_indices, qo_lens, tail_lens, 1, num_kv_heads, group,
                     block_m, block_n, chunk_tokens, max_programs, kind_chunks=kind_chunks, tile_shape=tile_shape)
    return upload_plans(host, device, arena.head_dim, max_programs)[0]


def default_max_programs(device: torch.device) -> int:
    """Programs per launch: eight per SM on a GPU (four on the CPU interpreter)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return 8 * sms


def default_chunk_tokens(kept_tokens: int, tail_tokens: int, num_layers: int, num_kv_heads: int, block_n: int,
                         max_programs: int, max_items: int | None = None) -> int:
    """Kept tokens per block run: about four items per program slot over a layer's work
    (``kept_tokens`` of every layer's blocks, ``tail_tokens`` of the requests' tails),
    and long enough that the runs take at most half of ``max_items`` per layer."""
    work = kept_tokens // num_layers + tail_tokens * num_kv_heads
    chunk = max(4 * block_n, -(-work // (4 * max_programs)))
    if max_items:
        chunk = max(chunk, -(-2 * work // max_items))
    return chunk


def kind_chunk_tokens(kept_by_kind: np.ndarray, tail_tokens: int, num_layers: int, num_kv_heads: int, block_n: int,
                      max_programs: int, max_items: int | None = None) -> np.ndarray:
    """Kept tokens per block run of each format pair (``kept_by_kind``: every layer's
    kept tokens of each): about four items per program slot of that pair's own work.
    Each pair is a launch of its own, so one chunk for all (:func:`default_chunk_tokens`)
    left a pair with a small share of the tokens a few long items: in the eleventh run
    the per-vector sparse keys ran 256 items at 11% of DRAM bandwidth beside a dense
    launch of 1,056 at 48%. Cut per pair (twelfth run) they ran 1,056 and still read 12%:
    the 3x mix took 712 us against 708, the 6x 446 against 464. ``max_items`` bounds the
    runs together, as the batch's chunk does."""
    kept = np.asarray(kept_by_kind, dtype=np.int64)
    work = int(kept.sum()) // num_layers + tail_tokens * num_kv_heads
    chunks = np.maximum(4 * block_n, -(-(kept // num_layers) // (4 * max_programs)))
    if max_items:
        chunks = np.maximum(chunks, -(-2 * work // max_items))
    return chunks


def plan_host(
    table: torch.Tensor | np.ndarray,
    block_indptr: np.ndarray,
    block_indices: torch.Tensor | np.ndarray,
    qo_lens: np.ndarray,
    tail_lens: np.ndarray,
    num_layers: int,
    num_kv_heads: int,
    group: int,
    block_m: int,
    block_n: int,
    chunk_tokens: int | None,
    max_programs: int,
    max_items: int | None = None,
    runs: BlockRuns | None = None,
    kind_chunks: np.ndarray | None = None,
    tile_shape: TileShape | None = None,
) -> HostPlan:
    """Plan a batch whose requests read, at every layer, the same tokens but their own
    blocks: ``block_indptr`` has ``num_layers * B * Hkv + 1`` entries (layer-major),
    ``qo_lens``/``tail_lens`` are per request. One vectorised pass for every layer:
    the blocks on ``table``'s device, the items on the host. ``chunk_tokens`` defaults
    to about four items per program slot, and to runs long enough that their items take
    at most half of ``max_items`` per layer (a graph's capacity; the rest is for each
    group's format pairs and tail), see :func:`default_chunk_tokens`. ``runs``: the
    blocks' runs already found at the given ``chunk_tokens`` (a plan that keeps each
    request's runs from one step to the next). ``kind_chunks``: the block runs' length
    per format pair instead (:func:`kind_chunk_tokens`). ``tile_shape``: packed tiles'
    tokens per format pair and lanes, to plan their starts when the runs are found here (``runs``
    found in advance carry their own)."""
    table = as_table(table)
    block_indices = torch.as_tensor(block_indices, dtype=torch.int64).to(table.device)
    qo_lens = np.asarray(qo_lens, dtype=np.int64)
    tail_lens = np.asarray(tail_lens, dtype=np.int64)
    block_indptr = np.asarray(block_indptr, dtype=np.int64)
    bsz = len(qo_lens)
    if runs is not None and chunk_tokens is None:
        raise ValueError("runs found in advance need the chunk_tokens they were cut at")
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(int(kind_tokens(table, block_indices).sum()), int(tail_lens.sum()),
                                            num_layers, num_kv_heads, block_n, max_programs, max_items)
    items, kinds, groups, merge_indptr, runs = plan_work(
        table, block_indptr, block_indices, np.tile(qo_lens, num_layers), np.tile(tail_lens, num_layers),
        num_kv_heads, group, block_m, block_n, chunk_tokens, runs, kind_chunks, tile_shape,
    )
    item_layer = items[:, 0] // max(bsz, 1)
    items[:, 0] %= max(bsz, 1)
    group_layer = groups[:, 0] // max(bsz, 1)
    groups[:, 0] %= max(bsz, 1)
    item_bounds = np.searchsorted(item_layer, np.arange(num_layers + 1))
    group_bounds = np.searchsorted(group_layer, np.arange(num_layers + 1))

    # Widest r-space width per kind pair (over every block of that pair: a superset of
    # what the items read, so the launch's R_MAX covers them all).
    r_max_of = {TAIL: 16}
    for kind in np.flatnonzero(np.bincount(kinds + 1, minlength=KIND_PAIRS + 1)[1:]):
        k_kind, v_kind = pair_kinds(kind)
        r_max_of[int(kind)] = r_max_for(((k_kind, int(runs.k_width_max[kind])), (v_kind, int(runs.v_width_max[kind]))))

    requests = np.zeros((bsz, len(REQUEST_FIELDS)), dtype=np.int64)
    requests[:, 0] = np.concatenate([[0], np.cumsum(qo_lens)])[:-1]
    requests[:, 1] = qo_lens
    requests[:, 2] = np.concatenate([[0], np.cumsum(tail_lens)])[:-1]
    requests[:, 3] = tail_lens

    # Launches: each layer's item ids by kind (the tail's first, then the kind pairs in
    # order), from one stable sort of every layer's items by (layer, kind), not a pass
    # per layer (the key fits 16 bits at any model depth up to 1,927 layers: radix sort).
    key = item_layer * (KIND_PAIRS + 1) + kinds + 1
    order = np.argsort(key.astype(np.int16 if num_layers * (KIND_PAIRS + 1) < 2**15 else np.int64), kind="stable")
    ids = order - item_bounds[item_layer[order]]
    starts = np.flatnonzero(np.diff(key[order], prepend=-1))
    ends = np.append(starts[1:], len(order))
    launches: list[list[tuple[int, int, int, np.ndarray]]] = [[] for _ in range(num_layers)]
    for lo, hi, layer, kind in zip(starts.tolist(), ends.tolist(), item_layer[order[starts]].tolist(),
                                   kinds[order[starts]].tolist()):
        k_kind, v_kind = (TAIL, TAIL) if kind == TAIL else pair_kinds(kind)
        launches[layer].append((k_kind, v_kind, r_max_of[kind], ids[lo:hi]))
    for arr in (items, groups, merge_indptr, ids):
        arr.flags.writeable = False  # with_tails shares them between plans
    layers = [HostLayer(items[i0:i1], groups[g0:g1], merge_indptr[g0 : g1 + 1] - i0, launch)
              for i0, i1, g0, g1, launch in zip(item_bounds[:-1], item_bounds[1:], group_bounds[:-1],
                                                group_bounds[1:], launches)]
    for layer in layers:
        layer.merge_indptr.flags.writeable = False
    return HostPlan(requests, runs.block_indices, layers, block_m, block_n, items,
                    _tail_slots(items, kinds, qo_lens, tail_lens, group, block_m, tail_chunk(chunk_tokens, block_n)),
                    runs.tiles)


def _tail_slots(items: np.ndarray, kinds: np.ndarray, qo_lens: np.ndarray, tail_lens: np.ndarray, group: int,
                block_m: int, chunk: int) -> TailSlots:
    """Where :func:`plan_host`'s tail items are, for :meth:`HostPlan.with_tails`."""
    ids = np.flatnonzero(kinds == TAIL)
    req, row0 = items[ids, 0], items[ids, 2]
    nq = qo_lens[req]
    last_q = np.minimum(nq - 1, (row0 + block_m - 1) // group)
    return TailSlots(ids, req, items[ids, 5], last_q + 1 - nq, chunk, qo_lens.copy(),
                     tail_items(qo_lens, tail_lens, group, block_m, chunk))


def aligned_starts(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Where int32 pieces of these sizes start back to back, each 16-byte aligned (Triton
    specialises kernels on pointer alignment, and an unaligned view would compile another
    variant), and the total length."""
    padded = [-(-n // 4) * 4 for n in sizes]
    return np.concatenate([[0], np.cumsum(padded)[:-1]]).astype(np.int64).tolist(), sum(padded)


def pack_int32(pieces: Sequence[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """``pieces`` in one int32 array at :func:`aligned_starts`; returns it and the starts."""
    starts, total = aligned_starts([len(p) for p in pieces])
    flat = np.zeros(total, dtype=np.int32)
    for piece, start in zip(pieces, starts):
        flat[start : start + len(piece)] = piece
    return flat, starts


def aligned_counts(layer: HostLayer) -> np.ndarray:
    """Each launch's item count, then the layer's group count, one per 16 bytes (a
    kernel reads its count through a pointer, which must stay 16-byte aligned)."""
    counts = np.zeros(4 * (len(layer.launches) + 1), dtype=np.int64)
    counts[0::4] = [len(ids) for *_, ids in layer.launches] + [len(layer.groups)]
    return counts


def upload_plans(host: HostPlan, device: torch.device, head_dim: int, max_programs: int) -> list[AttentionPlan]:
    """The host plan in one int32 upload (requests, then per layer its items, groups,
    merge pointers, counts and every launch's item list) and the block indices, already
    on the device, in int32; the layers share the request table, the block indices and
    the partial-output buffers (they run one after the other)."""
    pieces: list[np.ndarray] = [host.requests.reshape(-1)]
    for layer in host.layers:
        pieces += [layer.items.reshape(-1), layer.groups.reshape(-1), layer.merge_indptr, aligned_counts(layer)]
        pieces += [ids for *_, ids in layer.launches]
    flat, starts = pack_int32(pieces)
    flat_dev = upload(flat, device)
    views = [flat_dev[start : start + len(p)] for p, start in zip(pieces, starts)]
    num_items = max((len(layer.items) for layer in host.layers), default=0)
    o_part = torch.empty(num_items, host.block_m, head_dim, dtype=torch.float32, device=device)
    lse_part = torch.empty(num_items, host.block_m, dtype=torch.float32, device=device)
    scratch_rows = max((min(len(ids), max_programs) for layer in host.layers for k, v, _, ids in layer.launches
                        if SPARSE in (k, v)), default=1)
    scratch = torch.zeros(scratch_rows, 2, host.block_n, head_dim, dtype=torch.bfloat16, device=device)
    block_indices = host.block_indices.to(device=device, dtype=torch.int32)
    tiles = None if host.tiles is None else host.tiles.to(device=device, dtype=torch.int32)
    plans, at = [], 1
    for layer in host.layers:
        items, groups, merge_indptr, counts = views[at : at + 4]
        lists = views[at + 4 : at + 4 + len(layer.launches)]
        at += 4 + len(layer.launches)
        plans.append(AttentionPlan(
            requests=views[0].view(-1, len(REQUEST_FIELDS)),
            items=items.view(-1, len(ITEM_FIELDS)),
            groups=groups.view(-1, len(GROUP_FIELDS)),
            merge_indptr=merge_indptr,
            num_groups=counts[-4:-3],
            block_indices=block_indices,
            launches=[Launch(k, v, r, ids_dev, counts[4 * i : 4 * i + 1], max(1, min(len(ids), max_programs)))
                      for i, ((k, v, r, ids), ids_dev) in enumerate(zip(layer.launches, lists))],
            o_part=o_part,
            lse_part=lse_part,
            scratch=scratch,
            block_m=host.block_m,
            block_n=host.block_n,
            total_q=host.total_q,
            tiles=tiles,
            max_q=host.max_q,
        ))
    return plans
