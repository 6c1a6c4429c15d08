"""The per-block half of a plan, on the block table's device.

A batch at a long context names millions of blocks (an 8B model's 24 requests of 32k
tokens: 32 layers x 8 KV heads x 1,024 segments each, 6.3 M), and a decode step plans
them all. Sorting and cutting them with numpy took the host 68 ms for 8 requests of 8k
tokens (``benchmarks/host/decode_step_host.py``), so this half runs as torch ops where the
table lives: the blocks never leave the device, and only their runs (a few per request,
KV head and format pair) come back for the host to cut into kernel items.
"""

from __future__ import annotations

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
    max_tokens: int  # most kept tokens of any block


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
    empty = np.zeros(0, dtype=np.int64)
    if nnz == 0:
        none = np.zeros(KIND_PAIRS, dtype=np.int64)
        return BlockRuns(block_indices.to(torch.int64), empty, empty, empty, empty, none, none.copy(), 0)
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
    small = torch.cat([widths.reshape(-1), tok.max().reshape(1)]).cpu().numpy()
    return BlockRuns(rows, runs[0], runs[1], runs[2], runs[3], small[:KIND_PAIRS], small[KIND_PAIRS:-1],
                     int(small[-1]))
