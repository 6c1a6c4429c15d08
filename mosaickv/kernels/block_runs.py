"""The per-block half of a plan, on the block table's device.

A batch at a long context names millions of blocks (an 8B model's 24 requests of 32k
tokens: 32 layers x 8 KV heads x 1,024 segments each, 6.3 M), and a decode step plans
them all. Sorting and cutting them with numpy took the host 68 ms for 8 requests of 8k
tokens (``benchmarks/host/decode_step_host.py``), so this half runs as torch ops where the
table lives: the blocks never leave the device, and only their runs (a few per request,
KV head and format pair) come back for the host to cut into kernel items.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

KIND_PAIRS = 16  # 4 * k_kind + v_kind, both in SIDE_KINDS' four kinds


@dataclass
class BlockRuns:
    """Blocks regrouped by (pair, key kind, value kind) and cut into runs of whole blocks.

    ``block_indices`` stays on the table's device; the rest is host numpy."""

    block_indices: torch.Tensor  # int64 [nnz], the table rows in run order
    pair: np.ndarray  # [runs] the run's (request, kv_head) pair
    lo: np.ndarray  # [runs] first position in ``block_indices``
    hi: np.ndarray  # [runs] one past its last
    kind: np.ndarray  # [runs] 4 * k_kind + v_kind
    k_width_max: np.ndarray  # [KIND_PAIRS] widest key side among every block of each pair (0: none)
    v_width_max: np.ndarray  # [KIND_PAIRS] the same for values


def as_table(table: torch.Tensor | np.ndarray) -> torch.Tensor:
    return table if isinstance(table, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(table))


def block_tokens(table: torch.Tensor, block_indices: torch.Tensor) -> int:
    """Kept tokens of every named block together (one sync)."""
    return int(table[block_indices, 0].sum()) if block_indices.numel() else 0


def block_runs(table: torch.Tensor, block_indptr: np.ndarray, block_indices: torch.Tensor,
               chunk_tokens: int) -> BlockRuns:
    """Regroup each pair's blocks by format pair (softmax ignores key order; segment order
    is kept within a format pair) and cut them into runs of about ``chunk_tokens`` kept
    tokens; runs that keep no token are dropped. ``block_indptr`` (host) bounds each
    pair's blocks in ``block_indices`` (on ``table``'s device)."""
    dev = table.device
    nnz = int(block_indices.numel())
    if nnz == 0:
        return _no_runs(block_indices.to(torch.int64))
    counts = torch.from_numpy(np.diff(np.asarray(block_indptr, dtype=np.int64))).to(dev)
    pair = torch.repeat_interleave(torch.arange(len(counts), device=dev), counts, output_size=nnz)
    kind = table[block_indices, 1] * 4 + table[block_indices, 5]
    key, order = torch.sort(pair * KIND_PAIRS + kind, stable=True)
    rows = block_indices[order]
    tok = table[rows, 0]
    key_new = torch.ones(nnz, dtype=torch.bool, device=dev)
    key_new[1:] = key[1:] != key[:-1]
    positions = torch.arange(nnz, device=dev)
    key_start = torch.cummax(torch.where(key_new, positions, 0), 0).values
    starts = torch.zeros(nnz + 1, dtype=torch.int64, device=dev)
    starts[1:] = torch.cumsum(tok, 0)
    chunk = torch.div(starts[:-1] - starts[key_start], max(chunk_tokens, 1), rounding_mode="floor")
    new = key_new.clone()
    new[1:] |= chunk[1:] != chunk[:-1]
    lo = torch.nonzero(new).squeeze(1)
    hi = torch.cat([lo[1:], lo.new_full((1,), nnz)])
    keep = starts[hi] > starts[lo]
    lo, hi = lo[keep], hi[keep]
    widths = torch.zeros(2, KIND_PAIRS, dtype=torch.int64, device=dev)
    widths[0].scatter_reduce_(0, kind, table[block_indices, 2], "amax")
    widths[1].scatter_reduce_(0, kind, table[block_indices, 6], "amax")
    runs = torch.stack([key[lo] // KIND_PAIRS, lo, hi, key[lo] % KIND_PAIRS]).cpu().numpy()
    small = widths.reshape(-1).cpu().numpy()
    return BlockRuns(rows, runs[0], runs[1], runs[2], runs[3], small[:KIND_PAIRS], small[KIND_PAIRS:])


def _no_runs(block_indices: torch.Tensor) -> BlockRuns:
    empty, none = np.zeros(0, dtype=np.int64), np.zeros(KIND_PAIRS, dtype=np.int64)
    return BlockRuns(block_indices, empty, empty, empty, empty, none, none.copy())


def batch_runs(parts: list[BlockRuns], num_kv_heads: int) -> BlockRuns:
    """A batch's runs from each request's own (request ``b``'s pairs are ``layer * Hkv +
    head``): pairs become ``(layer * B + b) * Hkv + head``, layer-major as
    :func:`block_runs` orders a batch, and positions follow the requests' block indices
    placed back to back. Each request's runs keep their order within a pair."""
    hkv, bsz = num_kv_heads, len(parts)
    if not parts:
        return _no_runs(torch.zeros(0, dtype=torch.int64))
    sizes = np.asarray([p.block_indices.numel() for p in parts], dtype=np.int64)
    offsets = np.cumsum(sizes) - sizes
    pair = np.concatenate([(p.pair // hkv * bsz + b) * hkv + p.pair % hkv for b, p in enumerate(parts)])
    order = np.argsort(pair, kind="stable")
    lo = np.concatenate([p.lo + offsets[b] for b, p in enumerate(parts)])[order]
    hi = np.concatenate([p.hi + offsets[b] for b, p in enumerate(parts)])[order]
    kind = np.concatenate([p.kind for p in parts])[order]
    return BlockRuns(torch.cat([p.block_indices for p in parts]), pair[order], lo, hi, kind,
                     np.stack([p.k_width_max for p in parts]).max(0), np.stack([p.v_width_max for p in parts]).max(0))


class RunCache:
    """Each request's block runs (:func:`~mosaickv.kernels.block_runs.block_runs` over its
    own blocks) and kept tokens, kept from one plan to the next. A decode step reads the
    same sealed segments as the step before, and finding their runs reorders every block
    (2.1 M for 8 requests of 32k tokens on an 8B shape); a request seals a new segment
    only every ``segment_size`` tokens. Keyed by the request's slabs, their generations
    (a slab sealed again holds another segment) and the run length; entries no plan used
    in the last ``keep`` go, with their block indices (on the pool's device).

    It also keeps the last ``keep_plans`` batch plans (:meth:`plan`): a batch's next step
    reads the same blocks, and only its tails grew. Few, because each holds the batch's
    block indices on the device (8 bytes a block: 17 MB for 8 requests of 32k tokens on
    an 8B shape)."""

    def __init__(self, keep: int = 4, keep_plans: int = 2) -> None:
        self.keep, self.keep_plans = keep, keep_plans
        self.plans = 0
        self.hits = self.misses = 0
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
