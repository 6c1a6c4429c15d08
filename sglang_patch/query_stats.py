"""Per-segment query statistics, gathered by the attention backend for sealing.

``query_weighted`` scores a key channel by the typical magnitude of the queries that
will meet it (``Observation.query_rms``). A server cannot keep every query, so the
backend accumulates, per segment, layer and KV head, the per-channel sum of ``q^2``
over the segment's **own** tokens; sealing turns it into the rotary-pair RMS exactly as
``Observation.query_rms`` does.

Why the segment's own tokens: a token's query depends only on the tokens up to it
(causal attention), so these statistics are a function of the prefix up to the
segment's end. What a shared segment keeps can then never depend on any request's
suffix, nor on how the prefix was split into chunked-prefill or decode steps (sums
accumulate across forwards). A segment is keyed by the slot of its first token: the
radix tree shares slots, not copies, so every request that reuses a cached segment
also reuses its statistics, and a freed slot drops them (its key may be reused).

Sums are float64: squares of bf16 queries are exact there and so are their sums, so the
statistics (and the sealed bytes) do not change with the order tokens arrived in.
They live in host memory, ``L x Hkv x d x 8`` bytes per unsealed segment, never in the
KV budget.
"""

from __future__ import annotations

import torch


class SegmentQueryStats:
    """Running ``sum q^2`` per (segment, layer, KV head, channel) until the segment seals."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, segment_size: int) -> None:
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        self.head_dim, self.segment_size = head_dim, segment_size
        self._sum: dict[int, torch.Tensor] = {}  # first slot -> [L, Hkv, d] float64
        self._count: dict[int, torch.Tensor] = {}  # first slot -> [L] query-head token count

    def __len__(self) -> int:
        return len(self._sum)

    def observe(self, layer: int, q: torch.Tensor, slots: torch.Tensor) -> None:
        """Add the queries ``q`` [nq, Hq, d] of a request's last ``nq`` tokens.

        ``slots`` are the request's slots so far (its ``req_to_token`` row up to the
        sequence length, the step's own tokens last); position ``p`` belongs to segment
        ``p // segment_size``, keyed by that segment's first slot.
        """
        nq, hq, d = q.shape
        if nq == 0:
            return
        if d != self.head_dim or hq % self.num_kv_heads:
            raise ValueError(f"queries of shape {tuple(q.shape)} do not fit {self.num_kv_heads} KV heads "
                             f"of head dim {self.head_dim}")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is not in [0, {self.num_layers})")
        s = self.segment_size
        first = len(slots) - nq
        energy = q.detach().double().pow(2).view(nq, self.num_kv_heads, hq // self.num_kv_heads, d).sum(2)
        group = hq // self.num_kv_heads
        for seg in range(first // s, (len(slots) - 1) // s + 1):
            lo, hi = max(seg * s, first), min((seg + 1) * s, len(slots))
            key = int(slots[seg * s])
            if key not in self._sum:
                self._sum[key] = torch.zeros(self.num_layers, self.num_kv_heads, d, dtype=torch.float64)
                self._count[key] = torch.zeros(self.num_layers, dtype=torch.int64)
            self._sum[key][layer] += energy[lo - first : hi - first].sum(0).cpu()
            self._count[key][layer] += (hi - lo) * group

    def rms(self, first_slot: int) -> torch.Tensor | None:
        """[L, Hkv, d] rotary-pair RMS of the segment's queries (``Observation.query_rms``),
        or None if a layer saw none of them."""
        count = self._count.get(first_slot)
        if count is None or not bool((count > 0).all()):
            return None
        energy = self._sum[first_slot] / count[:, None, None]
        return (0.5 * (energy + energy.roll(self.head_dim // 2, dims=-1))).sqrt().float()

    def drop(self, first_slot: int) -> None:
        self._sum.pop(first_slot, None)
        self._count.pop(first_slot, None)

    def release(self, slots: torch.Tensor) -> None:
        """Freed slots: drop the segments they started (the slot ids will be reused)."""
        if not self._sum:
            return
        for key in self._sum.keys() & set(slots.cpu().tolist()):
            self.drop(key)
