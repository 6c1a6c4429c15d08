"""The per-block half of a plan, on the host, from the block table's host mirror.

A batch at a long context names millions of blocks (an 8B model's 24 requests of 32k
tokens: 32 layers x 8 KV heads x 1,024 segments each, 6.3 M), so a plan finds each
request's runs once and keeps them (:class:`RunCache`): a decode step finds runs only for
the requests that sealed a segment since the last. Those runs are found on the host, from
the pool's mirror of the table (written with it): found on the GPU, each was six reads
back to the host, and a read waits for the forward in flight (the eleventh run's sync
census counted 8,161 requests' runs in 1,024 decode steps at 240 requests, each read in
the step's plan). Only the blocks in run order go to the device, queued behind its work.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mosaickv.formats import SIDE_KINDS
from mosaickv.uploads import upload

NUM_KINDS = len(SIDE_KINDS)
KIND_PAIRS = NUM_KINDS * NUM_KINDS  # format pair: NUM_KINDS * k_kind + v_kind


def pair_kinds(pair: int) -> tuple[int, int]:
    """A format pair's key and value kinds."""
    return divmod(int(pair), NUM_KINDS)


@dataclass
class BlockRuns:
    """Blocks regrouped by (pair, key kind, value kind) and cut into runs of whole blocks.

    ``block_indices`` is on the device the kernels read it from; the rest is host numpy."""

    block_indices: torch.Tensor  # int64 [nnz], the table rows in run order
    pair: np.ndarray  # [runs] the run's (request, kv_head) pair
    lo: np.ndarray  # [runs] first position in ``block_indices``
    hi: np.ndarray  # [runs] one past its last
    kind: np.ndarray  # [runs] format pair, NUM_KINDS * k_kind + v_kind
    k_width_max: np.ndarray  # [KIND_PAIRS] widest key side among every block of each pair (0: none)
    v_width_max: np.ndarray  # [KIND_PAIRS] the same for values
    # Packed runs' tile starts (:func:`run_tile_starts`): run i's are rows tile_lo[i] ..
    # tile_hi[i] of ``tiles`` (int32 [T], on block_indices' device); ``tiles`` is None
    # for runs cut without them (tile_lo and tile_hi are then 0).
    tile_lo: np.ndarray
    tile_hi: np.ndarray
    tiles: torch.Tensor | None


def as_table(table: torch.Tensor | np.ndarray) -> torch.Tensor:
    return table if isinstance(table, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(table))


def host_array(a: torch.Tensor | np.ndarray) -> np.ndarray:
    """``a`` as host int64 numpy (a device tensor is read back: callers off the serving path)."""
    return (a.cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)).astype(np.int64, copy=False)


def pack_entries(table: np.ndarray) -> np.ndarray:
    """One int64 per block table row holding what runs are found from: kept tokens (bits
    0-15), format pair (16-23), key width (24-39), value width (40-55). A pool keeps
    these beside its table: one gather a block instead of one a column (a request's
    19,800 blocks found their runs in 0.40 ms from these against 0.91 from the table on
    a 2-core CPU, benchmarks/host/block_runs_host.py)."""
    table = np.asarray(table, dtype=np.int64)
    fields = table[:, [0, 2, 6]]
    if len(table) and (fields.min() < 0 or fields.max() >= 1 << 16):
        raise ValueError(f"kept tokens and widths are packed in 16 bits each: got values from {fields.min()} to "
                         f"{fields.max()}")
    return (table[:, 0] | (table[:, 1] * NUM_KINDS + table[:, 5]) << 16 | table[:, 2] << 24 | table[:, 6] << 40)


def entries(table: torch.Tensor | np.ndarray, block_indices: torch.Tensor | np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Kept tokens, format pairs, key and value widths of the named blocks, from a block
    table or its packed entries (:func:`pack_entries`, one dimension)."""
    table, indices = host_array(table), host_array(block_indices)
    packed = table[indices] if table.ndim == 1 else pack_entries(table[indices])
    return packed & 0xFFFF, packed >> 16 & 0xFF, packed >> 24 & 0xFFFF, packed >> 40 & 0xFFFF


def kind_tokens(table: torch.Tensor | np.ndarray, block_indices: torch.Tensor | np.ndarray) -> np.ndarray:
    """Kept tokens of the named blocks per format pair (``KIND_PAIRS`` entries)."""
    tokens, kind, _, _ = entries(table, block_indices)
    return np.bincount(kind, weights=tokens, minlength=KIND_PAIRS).astype(np.int64)


@dataclass
class GroupedBlocks:
    """One request's blocks ordered by (pair, format pair), segment order kept within each
    group: what its runs are cut from, at any run length. A plan keeps them (RunCache), so
    that a request that sealed one more segment is extended (each new block goes at the end
    of its group) instead of grouped again, and a new run length only cuts again. 16 bytes
    a block on the host. Blocks that keep no token (the 6x preset drops a third of its
    blocks whole) are left out: they add nothing to attention, and in a packed tile each
    would take one of the lanes that read its blocks' entries (:class:`TileShape`)."""

    key: np.ndarray  # int32 [nnz] pair * KIND_PAIRS + format pair, ascending
    rows: np.ndarray  # int64 [nnz] the table rows in that order
    tokens: np.ndarray  # int32 [nnz] their kept tokens
    kept: np.ndarray  # [KIND_PAIRS] kept tokens per format pair
    k_width_max: np.ndarray  # [KIND_PAIRS] widest key side among every block of each pair (0: none)
    v_width_max: np.ndarray  # [KIND_PAIRS] the same for values


def group_blocks(table: torch.Tensor | np.ndarray, block_indptr: np.ndarray,
                 block_indices: torch.Tensor | np.ndarray) -> GroupedBlocks:
    """Group the blocks (``block_indptr`` bounds each pair's in ``block_indices``) by format
    pair within their pair; softmax ignores key order, and segment order stays within a
    format pair. ``table``: the block table or its packed entries (:func:`pack_entries`)."""
    indices = host_array(block_indices)
    tokens, kind, k_width, v_width = entries(table, indices)
    counts = np.diff(np.asarray(block_indptr, dtype=np.int64))
    key = np.repeat(np.arange(len(counts), dtype=np.int64), counts) * KIND_PAIRS + kind
    # A stable sort of keys that fit 16 bits is numpy's radix sort, not a comparison sort.
    order = np.argsort(key.astype(np.uint16) if len(counts) * KIND_PAIRS <= 1 << 16 else key, kind="stable")
    widths = np.zeros((2, KIND_PAIRS), dtype=np.int64)
    np.maximum.at(widths[0], kind, k_width)
    np.maximum.at(widths[1], kind, v_width)
    order = order[tokens[order] > 0]  # blocks that keep no token add nothing (see GroupedBlocks)
    return GroupedBlocks(key[order].astype(np.int32), indices[order], tokens[order].astype(np.int32),
                         np.bincount(kind, weights=tokens, minlength=KIND_PAIRS).astype(np.int64), widths[0], widths[1])


def extend_blocks(blocks: GroupedBlocks, table: torch.Tensor | np.ndarray, pairs: np.ndarray,
                  new_rows: np.ndarray) -> GroupedBlocks:
    """``blocks`` with one more segment: ``new_rows`` are its blocks' table rows, one for each
    of ``pairs`` (ascending). Being the request's last segment, each block goes at the end
    of its (pair, format pair) group, where :func:`group_blocks` over every segment puts it."""
    pairs, new_rows = np.asarray(pairs, dtype=np.int64), host_array(new_rows)
    if len(pairs) != len(new_rows) or np.any(np.diff(pairs) <= 0):
        raise ValueError(f"extend_blocks needs one row for each pair, pairs ascending: got {len(pairs)} pairs and "
                         f"{len(new_rows)} rows")
    tokens, kind, k_width, v_width = entries(table, new_rows)
    key = pairs * KIND_PAIRS + kind
    widths = np.stack([blocks.k_width_max, blocks.v_width_max])
    np.maximum.at(widths[0], kind, k_width)
    np.maximum.at(widths[1], kind, v_width)
    some = tokens > 0  # as group_blocks: blocks that keep no token are left out
    key, new_rows, new_tokens = key[some], new_rows[some], tokens[some]
    at = np.searchsorted(blocks.key, key, side="right")  # ascending keys: equal places keep their order
    return GroupedBlocks(np.insert(blocks.key, at, key.astype(np.int32)), np.insert(blocks.rows, at, new_rows),
                         np.insert(blocks.tokens, at, new_tokens.astype(np.int32)),
                         blocks.kept + np.bincount(kind, weights=tokens, minlength=KIND_PAIRS).astype(np.int64),
                         widths[0], widths[1])


@dataclass(frozen=True)
class TileShape:
    """What a packed tile holds: ``widths[k]`` kept tokens for format pair ``k`` (0: not
    packed, ``KIND_PAIRS`` entries), from at most ``lanes`` consecutive blocks (0: as many
    as its tokens). The kernel reads a tile's block entries one a lane, so fewer lanes are
    less index work a tile; a tile that reaches its last lane ends there, fuller or not."""

    widths: np.ndarray
    lanes: int = 0


def run_tile_starts(tokens: np.ndarray, lo: np.ndarray, hi: np.ndarray, widths: np.ndarray, lanes: int = 0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each packed tile of each run starts, so that a kernel's tiles need not wait
    on the tile before to find theirs. ``tokens``: kept tokens of each block position;
    ``lo``/``hi``: each run's positions; ``widths``: its tile length in tokens, 0 for a run
    not packed; ``lanes``: block positions a tile reads at most (0: its width), so a tile
    ends after ``width`` tokens or ``lanes`` positions, whichever comes first. Returns each
    run's tiles as entries ``tile_lo`` .. ``tile_hi`` of ``tiles`` (int32 ``[T]``): the
    block a tile starts in, counted from the run's first (the first keeping a token past
    the tiles before), in the high 16 bits, and how many of its tokens earlier tiles took
    in the low 16 (4 bytes a tile: a graph's buffer holds the worst batch's, one a block).
    Relative to the run, a request's tiles hold wherever its blocks go in a batch."""
    starts = np.zeros(len(tokens) + 1, dtype=np.int64)
    np.cumsum(tokens, out=starts[1:])
    lo, hi, width = (np.asarray(a, dtype=np.int64) for a in (lo, hi, widths))
    cap = np.full_like(width, lanes) if lanes else width
    run, token = _even_tiles(starts, lo, hi, width)
    # Tiles of ``width`` tokens each, unless one spans more positions than it has lanes
    # (short or empty blocks): those runs' tiles are found a tile at a time.
    first = np.searchsorted(starts, token, side="right") - 1
    last = np.searchsorted(starts, np.minimum(token + width[run], starts[hi[run]]) - 1, side="right") - 1
    over = np.unique(run[last - first >= cap[run]])
    if len(over):
        keep = ~np.isin(run, over)
        more_run, more_token = _capped_tiles(starts, lo[over], hi[over], width[over], cap[over])
        run = np.concatenate([run[keep], over[more_run]])
        token = np.concatenate([token[keep], more_token])
        order = np.argsort(run, kind="stable")  # each run's tiles stay in order
        run, token = run[order], token[order]
    counts = np.bincount(run, minlength=len(lo))
    tile_hi = np.cumsum(counts)
    tile_lo = tile_hi - counts
    pos = np.searchsorted(starts, token, side="right") - 1
    block, taken = pos - lo[run], token - starts[pos]
    if len(run) and (block.max() >= 1 << 15 or taken.max() >= 1 << 16):
        raise ValueError(f"tile starts are packed in 15 and 16 bits: a run of {int(block.max()) + 1} blocks (at most "
                         f"{1 << 15}) or a block keeping {int(taken.max()) + 1} tokens (at most {1 << 16}); cut shorter runs")
    return tile_lo, tile_hi, (block << 16 | taken).astype(np.int32)


def _even_tiles(starts: np.ndarray, lo: np.ndarray, hi: np.ndarray, width: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Each run's tiles of ``width`` kept tokens, back to back: (run, first token) of each."""
    total = np.where(width > 0, starts[hi] - starts[lo], 0)
    counts = -(-total // np.maximum(width, 1))
    run = np.repeat(np.arange(len(lo)), counts)
    first = np.cumsum(counts) - counts
    return run, starts[lo[run]] + (np.arange(len(run)) - first[run]) * width[run]


def _capped_tiles(starts: np.ndarray, lo: np.ndarray, hi: np.ndarray, width: np.ndarray, cap: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_even_tiles` where a tile also ends at its ``cap``-th block position: one step
    a tile, every run at once."""
    token, end = starts[lo].copy(), starts[hi]
    runs, tokens = [], []
    live = np.flatnonzero(token < end)
    while len(live):
        at = token[live]
        pos = np.searchsorted(starts, at, side="right") - 1
        runs.append(live)
        tokens.append(at)
        token[live] = np.minimum(at + width[live], starts[np.minimum(pos + cap[live], hi[live])])
        live = live[token[live] < end[live]]
    if not runs:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    run, token = np.concatenate(runs), np.concatenate(tokens)
    order = np.argsort(run, kind="stable")
    return run[order], token[order]


def cut_runs(blocks: GroupedBlocks, chunk_tokens: int | np.ndarray, device: torch.device | str = "cpu",
             tile_shape: TileShape | None = None) -> BlockRuns:
    """Cut each group into runs of about ``chunk_tokens`` kept tokens (an int, or one per
    format pair: ``KIND_PAIRS`` entries); runs that keep no token are dropped. The blocks in
    run order go to ``device``. ``tile_shape``: packed tiles' tokens per format pair and
    lanes, to find the runs' tile starts too."""
    chunk_of = run_lengths(chunk_tokens)
    nnz = len(blocks.key)
    if nnz == 0:
        return _no_runs(torch.zeros(0, dtype=torch.int64, device=device), tile_shape is not None)
    key = blocks.key.astype(np.int64)
    key_new = np.ones(nnz, dtype=bool)
    key_new[1:] = key[1:] != key[:-1]
    starts = np.zeros(nnz + 1, dtype=np.int64)
    np.cumsum(blocks.tokens, out=starts[1:])
    group_start = np.flatnonzero(key_new)  # each (pair, format pair) group's first position
    since = starts[:-1] - np.repeat(starts[group_start], np.diff(np.append(group_start, nnz)))
    chunk = since // (chunk_of if isinstance(chunk_of, int) else chunk_of[key % KIND_PAIRS])
    new = key_new.copy()
    new[1:] |= chunk[1:] != chunk[:-1]
    lo = np.flatnonzero(new)
    hi = np.append(lo[1:], nnz)
    keep = starts[hi] > starts[lo]
    lo, hi = lo[keep], hi[keep]
    kind = key[lo] % KIND_PAIRS
    runs = BlockRuns(upload(blocks.rows, device), key[lo] // KIND_PAIRS, lo, hi, kind, blocks.k_width_max.copy(),
                     blocks.v_width_max.copy(), np.zeros_like(lo), np.zeros_like(lo), None)
    if tile_shape is not None:
        runs.tile_lo, runs.tile_hi, tiles = run_tile_starts(blocks.tokens, lo, hi, np.asarray(tile_shape.widths)[kind],
                                                            tile_shape.lanes)
        runs.tiles = upload(tiles, device)
    return runs


def block_runs(table: torch.Tensor | np.ndarray, block_indptr: np.ndarray, block_indices: torch.Tensor | np.ndarray,
               chunk_tokens: int | np.ndarray, device: torch.device | str | None = None,
               tile_shape: TileShape | None = None) -> BlockRuns:
    """Each pair's blocks grouped by format pair (:func:`group_blocks`) and cut into runs of
    about ``chunk_tokens`` kept tokens (:func:`cut_runs`, ``tile_shape`` as there). Found
    on the host; the blocks in run order go to ``device`` (default: ``block_indices``'
    device, the host for numpy)."""
    if device is None:
        device = block_indices.device if isinstance(block_indices, torch.Tensor) else "cpu"
    return cut_runs(group_blocks(table, block_indptr, block_indices), chunk_tokens, device, tile_shape)


def run_lengths(chunk_tokens: int | np.ndarray) -> int | np.ndarray:
    """Kept tokens per run: ``chunk_tokens`` (at least 1) if one for all, else one per
    format pair."""
    if np.ndim(chunk_tokens) == 0:
        return max(int(chunk_tokens), 1)
    chunks = np.asarray(chunk_tokens, dtype=np.int64)
    if chunks.shape != (KIND_PAIRS,):
        raise ValueError(f"chunk_tokens per format pair needs {KIND_PAIRS} entries, got shape {chunks.shape}")
    return np.maximum(chunks, 1)


def _no_runs(block_indices: torch.Tensor, with_tiles: bool = False) -> BlockRuns:
    empty, none = np.zeros(0, dtype=np.int64), np.zeros(KIND_PAIRS, dtype=np.int64)
    tiles = torch.zeros(0, dtype=torch.int32, device=block_indices.device) if with_tiles else None
    return BlockRuns(block_indices, empty, empty, empty, empty, none, none.copy(), empty, empty, tiles)


def batch_runs(parts: list[BlockRuns], num_kv_heads: int, tile_starts: bool = False) -> BlockRuns:
    """A batch's runs from each request's own (request ``b``'s pairs are ``layer * Hkv +
    head``): pairs become ``(layer * B + b) * Hkv + head``, layer-major as
    :func:`block_runs` orders a batch, and positions follow the requests' block indices
    (and tile starts) placed back to back. Each request's runs keep their order within a pair.
    ``tile_starts``: whether the runs were cut with tile starts (an empty batch has them too)."""
    hkv, bsz = num_kv_heads, len(parts)
    if not parts:
        return _no_runs(torch.zeros(0, dtype=torch.int64), tile_starts)
    if any((p.tiles is not None) != tile_starts for p in parts):
        raise ValueError(f"batch_runs(tile_starts={tile_starts}) got runs cut {'without' if tile_starts else 'with'} "
                         "tile starts: cut every request's runs alike")
    sizes = np.asarray([p.block_indices.numel() for p in parts], dtype=np.int64)
    offsets = np.cumsum(sizes) - sizes
    tile_sizes = np.asarray([0 if p.tiles is None else len(p.tiles) for p in parts], dtype=np.int64)
    tile_offsets = np.cumsum(tile_sizes) - tile_sizes
    pair = np.concatenate([(p.pair // hkv * bsz + b) * hkv + p.pair % hkv for b, p in enumerate(parts)])
    order = np.argsort(pair, kind="stable")

    def placed(field: str, at: np.ndarray) -> np.ndarray:
        return np.concatenate([getattr(p, field) + at[b] for b, p in enumerate(parts)])[order]

    kind = np.concatenate([p.kind for p in parts])[order]
    return BlockRuns(torch.cat([p.block_indices for p in parts]), pair[order], placed("lo", offsets),
                     placed("hi", offsets), kind, np.stack([p.k_width_max for p in parts]).max(0),
                     np.stack([p.v_width_max for p in parts]).max(0), placed("tile_lo", tile_offsets),
                     placed("tile_hi", tile_offsets), torch.cat([p.tiles for p in parts]) if tile_starts else None)


class RunCache:
    """Each request's grouped blocks (:class:`GroupedBlocks`, with its kept tokens) and block
    runs (:func:`cut_runs` of them), kept from one plan to the next. A decode step reads the
    same sealed segments as the step before, and grouping them reorders every block
    (2.1 M for 8 requests of 32k tokens on an 8B shape); a request seals a new segment
    only every ``segment_size`` tokens, and then its blocks before it are extended
    (``extends`` counts those). Keyed by the request's slabs, their generations (a slab
    sealed again holds another segment) and, for runs, the run length; entries no plan
    used in the last ``keep`` go, with their block indices (on the pool's device).

    It also keeps the last ``keep_plans`` batch plans (:meth:`plan`): a batch's next step
    reads the same blocks, and only its tails grew. Few, because each holds the batch's
    block indices on the device (8 bytes a block: 17 MB for 8 requests of 32k tokens on
    an 8B shape)."""

    def __init__(self, keep: int = 4, keep_plans: int = 2) -> None:
        self.keep, self.keep_plans = keep, keep_plans
        self.plans = 0
        self.hits = self.misses = self.extends = 0
        self.plan_hits = self.plan_misses = 0
        self._entries: dict[tuple, tuple[int, object]] = {}  # key -> (the last plan that used it, value)
        self._plans: OrderedDict[tuple, object] = OrderedDict()  # least recently used first

    def get(self, key: tuple, make: Callable[[], object]) -> object:
        held = self._entries.get(key)
        if held is None:
            self.misses += 1
            value = make()
        else:
            self.hits += 1
            value = held[1]
        self._entries[key] = (self.plans, value)
        return value

    def peek(self, key: tuple) -> object | None:
        """The value kept under ``key``, if any, without counting it as used (a request's
        blocks before its last segment, to be extended)."""
        held = self._entries.get(key)
        return None if held is None else held[1]

    def plan(self, key: tuple, make: Callable[[], object]) -> object:
        """The batch plan kept under ``key``, or ``make``'s, kept in place of the least
        recently used one. ``key`` names everything the plan depends on."""
        value = self._plans.get(key)
        if value is None:
            self.plan_misses += 1
            value = self._plans[key] = make()
            while len(self._plans) > self.keep_plans:
                self._plans.popitem(last=False)
        else:
            self.plan_hits += 1
            self._plans.move_to_end(key)
        return value

    def end_plan(self) -> None:
        self.plans += 1
        self._entries = {k: v for k, v in self._entries.items() if self.plans - v[0] <= self.keep}

    def drop_plans(self) -> None:
        """Forget the batch plans, not the requests' runs (a batch whose requests changed)."""
        self._plans.clear()

    def clear(self) -> None:
        self._entries.clear()
        self._plans.clear()
