"""The plan's per-block half (block_runs), against a plain-Python loop over the blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mosaickv.kernels.block_runs import KIND_PAIRS, block_runs
from mosaickv.kernels.layout import TABLE_FIELDS


def loop_runs(table: np.ndarray, indptr: np.ndarray, indices: np.ndarray, chunk: int):
    """Each pair's blocks, stably grouped by kind pair, cut where the kept tokens since the
    group's start cross a multiple of ``chunk``; runs keeping no token dropped."""
    order, runs = [], []
    for pair in range(len(indptr) - 1):
        blocks = list(indices[indptr[pair] : indptr[pair + 1]])
        for kind in range(KIND_PAIRS):
            group = [b for b in blocks if table[b, 1] * 4 + table[b, 5] == kind]
            # A block starts a new run where its first kept token enters another chunk.
            cuts, seen = [], 0
            for b in group:
                cuts.append(seen // chunk)
                seen += table[b, 0]
            start = len(order)
            order.extend(group)
            i = 0
            while i < len(group):
                j = i + 1
                while j < len(group) and cuts[j] == cuts[i]:
                    j += 1
                if sum(table[b, 0] for b in group[i:j]):
                    runs.append((pair, start + i, start + j, kind))
                i = j
    return np.asarray(order, dtype=np.int64), runs


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                  reason="needs a CUDA device")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(40))
def test_block_runs_match_a_loop_over_blocks(seed: int, device: str) -> None:
    rng = np.random.default_rng(seed)
    nblocks = int(rng.integers(1, 80))
    table = np.zeros((nblocks, len(TABLE_FIELDS)), dtype=np.int64)
    table[:, 0] = rng.integers(0, 33, nblocks) * (rng.random(nblocks) > 0.2)  # some blocks keep no token
    table[:, 1], table[:, 5] = rng.integers(0, 4, nblocks), rng.integers(0, 4, nblocks)
    table[:, 2], table[:, 6] = rng.integers(1, 129, nblocks), rng.integers(1, 129, nblocks)
    counts = rng.integers(0, 7, int(rng.integers(0, 9)))  # empty pairs and empty batches too
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    indices = rng.integers(0, nblocks, int(indptr[-1]))
    chunk = int(rng.choice([1, 16, 40, 1000]))
    got = block_runs(torch.from_numpy(table).to(device), indptr, torch.from_numpy(indices).to(device), chunk)
    order, runs = loop_runs(table, indptr, indices, chunk)
    assert got.block_indices.device.type == device
    assert np.array_equal(got.block_indices.cpu().numpy(), order)
    assert list(zip(got.pair, got.lo, got.hi, got.kind)) == runs
    kinds = table[indices, 1] * 4 + table[indices, 5]
    for kind in range(KIND_PAIRS):
        rows = indices[kinds == kind]
        assert got.k_width_max[kind] == (table[rows, 2].max() if len(rows) else 0)
        assert got.v_width_max[kind] == (table[rows, 6].max() if len(rows) else 0)
    assert got.max_tokens == (int(table[indices, 0].max()) if len(indices) else 0)
