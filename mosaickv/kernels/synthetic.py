"""Random mixed-format inputs for kernel tests and benchmarks.

:func:`random_layer` goes through :func:`mosaickv.formats.pack_block` (exact, slow: one
Python call per block), for correctness checks. :func:`synthetic_arena` writes an arena
directly on the device in the layout of :mod:`.layout` from a repeating pattern of block
formats (vectorised; for 128k-token benchmarks), with valid contents: sorted distinct
channel indices per sparse row and per mask block, random bf16 values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mosaickv.formats import FP8_DTYPE, SIDE_KINDS, WIDTHLESS, BlockFormat, SideFormat, pack_block
from mosaickv.kernels.layout import FP8, LOWRANK, MASK, SPARSE, Arena
from mosaickv.reference import CompressedLayer


def random_format(gen: torch.Generator, n: int, d: int, kinds: Sequence[str] = SIDE_KINDS, drop: bool = True) -> BlockFormat:
    """A block format with random kinds from ``kinds``, widths in ``[1, d]`` and kept tokens."""

    def side() -> SideFormat:
        kind = kinds[int(torch.randint(len(kinds), (1,), generator=gen))]
        return SideFormat(kind, 0 if kind in WIDTHLESS else int(torch.randint(1, d + 1, (1,), generator=gen)))

    tokens = int(torch.randint(0, n + 1, (1,), generator=gen)) if drop else n
    return BlockFormat(tokens, side(), side())


def random_layer(
    gen: torch.Generator,
    num_segments: int,
    n: int,
    num_kv_heads: int,
    d: int,
    kinds: Sequence[str] = SIDE_KINDS,
    drop: bool = True,
    fmt: BlockFormat | None = None,
) -> CompressedLayer:
    """Segments of ``n`` random tokens per KV head, packed in ``fmt`` or random formats."""
    layer = CompressedLayer()
    for _ in range(num_segments):
        seg = []
        for _ in range(num_kv_heads):
            k = torch.randn(n, d, generator=gen)
            v = torch.randn(n, d, generator=gen)
            f = fmt if fmt is not None else random_format(gen, n, d, kinds, drop)
            seg.append(pack_block(k, v, f, token_score=torch.rand(n, generator=gen)))
        layer.append(seg)
    return layer


@dataclass(frozen=True)
class Recipe:
    """A block format for ``synthetic_arena``: kept tokens and per-side (kind, width)."""

    tokens: int
    k: tuple[str, int]
    v: tuple[str, int]

    def side_bytes(self, kind: str, r: int, d: int) -> int:
        m = self.tokens
        if m == 0:
            return 0
        return {"dense": 2 * m * d, "sparse": 3 * m * r, "mask": 2 * m * r + r, "lowrank": 2 * (m * r + r * d),
                "fp8": m * d}[kind]

    def nbytes(self, d: int) -> int:
        """Payload bytes (what formats.py counts, without the 16-byte header)."""
        return self.side_bytes(*self.k, d) + self.side_bytes(*self.v, d)


def _align(x: np.ndarray, a: int) -> np.ndarray:
    return (x + a - 1) // a * a


def pattern_table(num_pairs: int, blocks_per_pair: int, pattern: Sequence[Recipe], d: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Which recipe each block of ``num_pairs`` pairs of ``blocks_per_pair`` uses (block
    ``i`` of pair ``p``: ``pattern[(p + i) % len(pattern)]``) and the block table's format
    columns for them (kept tokens, kinds, widths; offsets left zero)."""
    nb = num_pairs * blocks_per_pair
    rec = (np.arange(nb) // blocks_per_pair + np.arange(nb) % blocks_per_pair) % len(pattern)
    cols = np.zeros((len(pattern), 9), dtype=np.int64)
    for j, r in enumerate(pattern):
        cols[j, 0] = r.tokens
        cols[j, 1], cols[j, 2] = SIDE_KINDS.index(r.k[0]), d if r.k[0] in WIDTHLESS else r.k[1]
        cols[j, 5], cols[j, 6] = SIDE_KINDS.index(r.v[0]), d if r.v[0] in WIDTHLESS else r.v[1]
    return rec, cols[rec]


def synthetic_arena(
    num_pairs: int,
    blocks_per_pair: int,
    pattern: Sequence[Recipe],
    d: int,
    device: torch.device | str,
    seed: int = 0,
) -> tuple[Arena, np.ndarray, np.ndarray]:
    """Arena of ``num_pairs`` (request, kv_head) pairs of ``blocks_per_pair`` blocks each.

    Block ``i`` of a pair uses ``pattern[(pair + i) % len(pattern)]``. All tensors start
    at 16-byte boundaries (``align=16``); ``pad_bytes`` counts the gaps exactly.
    Returns the arena, ``block_indptr`` and ``block_indices`` (identity).
    """
    nb = num_pairs * blocks_per_pair
    rec, table = pattern_table(num_pairs, blocks_per_pair, pattern, d)
    sizes = []  # per recipe: (kv, kb, ki, vv, vb, vi) elements/bytes
    for r in pattern:
        m = r.tokens
        row = []
        for kind, w in (r.k, r.v):
            width = d if kind == "dense" else w
            nv = m * width if m and kind != "fp8" else 0
            nbas = w * d if (kind == "lowrank" and m) else 0
            nidx = (m * w if kind == "sparse" else w if kind == "mask" else m * d if kind == "fp8" else 0) if m else 0
            row += [nv, nbas, nidx]
        sizes.append(row)
    sz = np.asarray(sizes, dtype=np.int64)[rec]  # [nb, 6]
    # Each value tensor rounded up to 8 elements, each index tensor to 16 bytes.
    vsz = _align(sz[:, [0, 1, 3, 4]], 8)
    isz = _align(sz[:, [2, 5]], 16)
    vstart = np.concatenate([[0], np.cumsum(vsz.sum(1))])
    istart = np.concatenate([[0], np.cumsum(isz.sum(1))])
    voffs = vstart[:-1, None] + np.concatenate([np.zeros((nb, 1), np.int64), np.cumsum(vsz, 1)[:, :-1]], 1)
    ioffs = istart[:-1, None] + np.concatenate([np.zeros((nb, 1), np.int64), isz[:, :1]], 1)
    for col, s in ((1, 0), (5, 1)):
        table[:, col + 2] = np.where(table[:, col] == FP8, 0, voffs[:, 2 * s])
        table[:, col + 3] = np.where(table[:, col] == LOWRANK, voffs[:, 2 * s + 1],
                                     np.where(np.isin(table[:, col], [SPARSE, MASK, FP8]), ioffs[:, s], 0))
    empty = table[:, 0] == 0
    table[empty, 3:5] = 0
    table[empty, 7:9] = 0
    pad = int((vsz - sz[:, [0, 1, 3, 4]]).sum() * 2 + (isz - sz[:, [2, 5]]).sum())
    gen = torch.Generator(device=device).manual_seed(seed)
    values = torch.empty(int(vstart[-1]), dtype=torch.bfloat16, device=device)
    values.normal_(generator=gen)
    index = torch.empty(int(istart[-1]), dtype=torch.uint8, device=device)
    # Valid indices: within each index tensor, entry e of a row of width w is channel
    # e * (d // w) + (row % (d // w)), sorted and distinct; fill per recipe slot.
    index.zero_()
    fp8 = ((table[:, 1] == FP8) | (table[:, 5] == FP8)).any()
    if fp8:  # fp8 sides' bytes: e4m3 of random normals (a random byte may be NaN)
        index.copy_(torch.randn(index.numel(), generator=gen, device=device).to(FP8_DTYPE).view(torch.uint8))
    dev_table = torch.from_numpy(table).to(device)
    for j, r in enumerate(pattern):
        sel = torch.from_numpy(np.flatnonzero(rec == j)).to(device)
        if r.tokens == 0 or sel.numel() == 0:
            continue
        for col, (kind, w) in ((4, r.k), (8, r.v)):
            if kind not in ("sparse", "mask"):
                continue
            rows = r.tokens if kind == "sparse" else 1
            stride = d // w
            e = torch.arange(rows * w, device=device)
            ch = (e % w) * stride + (e // w) % stride
            step = max(1, (1 << 24) // e.numel())  # bound the temporary index tensor
            for c0 in range(0, sel.numel(), step):
                starts = dev_table[sel[c0 : c0 + step], col]
                index[(starts[:, None] + e[None, :]).reshape(-1)] = ch.to(torch.uint8).repeat(starts.numel())
    arena = Arena.from_table(values, index, table, d, align=16, pad_bytes=pad)
    indptr = np.arange(num_pairs + 1, dtype=np.int64) * blocks_per_pair
    return arena, indptr, np.arange(nb, dtype=np.int64)
