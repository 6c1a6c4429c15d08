"""A decode batch's token slots on the host, read without waiting for the GPU.

The backend plans a decode step from each request's ``req_to_token`` row. Read inside
the forward, on the forward stream, that copy waits for the previous step's forward to
finish (17 ms of a 58 ms step on an H200: 8 requests of 32k tokens, 8B shape), and the
step's host planning then runs while the GPU idles. The rows are final once the
scheduler has allocated the step's slots (``ScheduleBatch.prepare_for_decode``), on the
scheduler's stream, which does not wait for the forward: so they are copied there, into
pinned memory, and the forward waits for that copy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class _Prefetch:
    seq_lens: tuple[int, ...]
    rows: torch.Tensor  # [B, max seq len] host
    done: torch.cuda.Event | None


class DecodeRows:
    """The rows of the decode batch the scheduler prepared last, for its forward only."""

    def __init__(self) -> None:
        self._next: _Prefetch | None = None
        self.prefetched = 0  # forwards that found their rows already copied
        self.read_in_forward = 0  # forwards that read them themselves (waiting for the GPU)

    def prefetch(self, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: list[int]) -> None:
        """Queue the copy of the batch's rows (up to its longest sequence) on the current
        stream, behind the allocation that wrote them."""
        if not seq_lens:
            self._next = None
            return
        rows = req_to_token[req_pool_indices, : max(seq_lens)]
        done = None
        if rows.device.type == "cuda":
            host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            rows = host.copy_(rows, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        self._next = _Prefetch(tuple(seq_lens), rows, done)

    def take(self, seq_lens: list[int]) -> torch.Tensor | None:
        """The prefetched rows if they are this forward's (the batch of the same sequence
        lengths the scheduler prepared last; taken once), else None."""
        nxt, self._next = self._next, None
        if nxt is None or nxt.seq_lens != tuple(seq_lens):
            self.read_in_forward += 1
            return None
        if nxt.done is not None:
            nxt.done.synchronize()
        self.prefetched += 1
        return nxt.rows

    def discard(self) -> None:
        """A forward that is not the prepared decode batch's: the rows are stale after it."""
        self._next = None
