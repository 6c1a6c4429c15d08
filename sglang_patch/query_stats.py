"""Per-segment query statistics, gathered by the attention backend for sealing.

A server cannot keep every query, so the backend accumulates, per segment, layer and KV
head, what the policy's parts read from the segment's **own** queries, exactly as
``mosaickv.parts.segment_observation`` derives it offline:

- the per-channel sum of ``q^2`` (``query_weighted`` scores key channels by the
  rotary-pair RMS of the queries that will meet them, ``Observation.query_rms``);
- if the token scorer reads attention (``observed_attention``), the attention that the
  segment's last ``window`` queries pay each of its tokens, from the step's log-sum-exp
  (``Observation.received_attention``): one ``q.k`` per (query, own-segment token).

Why the segment's own tokens: a token's query depends only on the tokens up to it
(causal attention), so these statistics are a function of the prefix up to the
segment's end. What a shared segment keeps can then never depend on any request's
suffix, nor on how the prefix was split into chunked-prefill or decode steps (sums
accumulate across forwards). A segment is keyed by the slot of its first token: the
radix tree shares slots, not copies, so every request that reuses a cached segment
also reuses its statistics, and a freed slot drops them (its key may be reused).

Sums are float64: squares of bf16 queries are exact there and so are their sums, so the
statistics (and the sealed bytes) do not change with the order tokens arrived in.
The attention sums are float64 too, but each probability comes from the step's
log-sum-exp, so they match across chunkings to rounding, not bit for bit. Both live in
host memory, ``L x Hkv x (d + S) x 8`` bytes per unsealed segment, never in the KV budget.
"""

from __future__ import annotations

import torch


class SegmentQueryStats:
    """Running sums per (segment, layer, KV head) until the segment seals.

    ``window``: how many of a segment's last queries record the attention they pay its
    tokens (the token scorer's ``attention_window``; 0 records none).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, segment_size: int, window: int = 0) -> None:
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        self.head_dim, self.segment_size = head_dim, segment_size
        self.window = min(window, segment_size)
        self._sum: dict[int, torch.Tensor] = {}  # first slot -> [L, Hkv, d] float64
        self._count: dict[int, torch.Tensor] = {}  # first slot -> [L] query-head token count
        self._attn: dict[int, torch.Tensor] = {}  # first slot -> [L, Hkv, S] float64
        self._attn_count: dict[int, torch.Tensor] = {}  # first slot -> [L] query-head count

    def __len__(self) -> int:
        return len(self._sum)

    def observe(self, layer: int, q: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor | None = None,
                lse: torch.Tensor | None = None, scale: float | None = None) -> None:
        """Add the queries ``q`` [nq, Hq, d] of a request's last ``nq`` tokens.

        ``slots`` are the request's slots so far (its ``req_to_token`` row up to the
        sequence length, the step's own tokens last); position ``p`` belongs to segment
        ``p // segment_size``, keyed by that segment's first slot. With a window, also
        ``keys`` [n, Hkv, d] of the positions from the first query's segment start on,
        ``lse`` [nq, Hq] of the step's scaled logits, and that ``scale``.
        """
        nq, hq, d = q.shape
        if nq == 0:
            return
        if d != self.head_dim or hq % self.num_kv_heads:
            raise ValueError(f"queries of shape {tuple(q.shape)} do not fit {self.num_kv_heads} KV heads "
                             f"of head dim {self.head_dim}")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is not in [0, {self.num_layers})")
        if self.window and (keys is None or lse is None or scale is None):
            raise ValueError(f"a window of {self.window} queries records attention: keys, lse and scale are needed")
        s, group, hkv, n = self.segment_size, hq // self.num_kv_heads, self.num_kv_heads, len(slots)
        first = len(slots) - nq
        seg0, nseg = first // s, (n - 1) // s - first // s + 1
        # Per-segment sums where the queries are, one copy to the host.
        seg_of = (torch.arange(first, n, device=q.device) // s - seg0)
        energy = q.detach().double().pow(2).view(nq, hkv, group, d).sum(2)
        sums = torch.zeros(nseg, hkv, d, dtype=torch.float64, device=q.device).index_add_(0, seg_of, energy).cpu()
        attn = counts = None
        if self.window:
            attn, counts = self._window_attention(q, keys, lse, scale, first, n, seg0, nseg)
        for j in range(nseg):
            seg = seg0 + j
            key = int(slots[seg * s])
            self._add(key, layer, sums[j], (min((seg + 1) * s, n) - max(seg * s, first)) * group)
            if attn is not None and counts[j]:
                self._attn[key][layer] += attn[j]
                self._attn_count[key][layer] += int(counts[j]) * group

    def _window_attention(self, q: torch.Tensor, keys: torch.Tensor, lse: torch.Tensor, scale: float, first: int,
                          n: int, seg0: int, nseg: int) -> tuple[torch.Tensor, list[int]]:
        """Attention each touched segment's last ``window`` queries (those among this
        step's) pay its tokens, all segments at once where the queries are: ``[nseg,
        Hkv, S]`` float64 on the host, and how many window queries each segment had."""
        s, w, hkv = self.segment_size, self.window, self.num_kv_heads
        nq, hq, d = q.shape
        group = hq // hkv
        dev = q.device
        segs = torch.arange(seg0, seg0 + nseg, device=dev)
        q_pos = ((segs + 1) * s - w)[:, None] + torch.arange(w, device=dev)[None, :]  # [nseg, W]
        q_ok = (q_pos >= first) & (q_pos < n)
        k_pos = segs[:, None] * s + torch.arange(s, device=dev)[None, :]  # [nseg, S]
        k_ok = k_pos < n
        qw = q.float()[(q_pos - first).clamp(0, nq - 1)].view(nseg, w, hkv, group, d)
        lw = lse.float()[(q_pos - first).clamp(0, nq - 1)].view(nseg, w, hkv, group)
        kw = keys.float()[(k_pos - seg0 * s).clamp(0, keys.shape[0] - 1)]  # [nseg, S, Hkv, d]
        logits = torch.einsum("swhgd,sthd->swhgt", qw, kw) * scale - lw[..., None]
        visible = q_ok[:, :, None] & k_ok[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])  # [nseg, W, S]
        probs = torch.exp(logits).masked_fill(~visible[:, :, None, None, :], 0.0)
        return probs.sum(dim=(1, 3)).double().cpu(), q_ok.sum(1).tolist()

    def observe_decode(self, layer: int, q: torch.Tensor, first_slots: list[int], positions: torch.Tensor,
                       keys: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                       scale: float | None = None) -> None:
        """:meth:`observe` for a batch of one query per request, computed together where
        ``q`` is and copied to the host once: request ``b``'s query ``q[b]`` [Hq, d] sits at
        ``positions[b]`` (host) of its segment, whose first slot is ``first_slots[b]``.
        With a window, ``keys`` [B, S, Hkv, d] hold each segment's tokens so far (the rest
        is ignored), ``lse`` [B, Hq] the step's log-sum-exp."""
        bsz, hq, d = q.shape
        if bsz == 0:
            return
        group = hq // self.num_kv_heads
        energy = q.detach().double().pow(2).view(bsz, self.num_kv_heads, group, d).sum(2).cpu()
        probs = None
        in_window = positions >= self.segment_size - self.window
        if self.window and bool(in_window.any()):
            logits = torch.einsum("bhgd,bnhd->bhgn", q.float().view(bsz, self.num_kv_heads, group, d), keys.float())
            logits = logits * scale - lse.float().view(bsz, self.num_kv_heads, group, 1)
            visible = torch.arange(self.segment_size)[None, :] <= positions[:, None]
            probs = torch.exp(logits).sum(2).masked_fill(~visible[:, None, :].to(q.device), 0.0).double().cpu()
        for b, key in enumerate(first_slots):
            self._add(key, layer, energy[b], group)
            if probs is not None and bool(in_window[b]):
                self._attn[key][layer] += probs[b]
                self._attn_count[key][layer] += group

    def _add(self, key: int, layer: int, energy: torch.Tensor, count: int) -> None:
        if key not in self._sum:
            self._sum[key] = torch.zeros(self.num_layers, self.num_kv_heads, self.head_dim, dtype=torch.float64)
            self._count[key] = torch.zeros(self.num_layers, dtype=torch.int64)
            self._attn[key] = torch.zeros(self.num_layers, self.num_kv_heads, self.segment_size, dtype=torch.float64)
            self._attn_count[key] = torch.zeros(self.num_layers, dtype=torch.int64)
        self._sum[key][layer] += energy
        self._count[key][layer] += count

    def rms(self, first_slot: int) -> torch.Tensor | None:
        """[L, Hkv, d] rotary-pair RMS of the segment's queries (``Observation.query_rms``),
        or None if a layer saw none of them."""
        count = self._count.get(first_slot)
        if count is None or not bool((count > 0).all()):
            return None
        energy = self._sum[first_slot] / count[:, None, None]
        return (0.5 * (energy + energy.roll(self.head_dim // 2, dims=-1))).sqrt().float()

    def attention(self, first_slot: int) -> torch.Tensor | None:
        """[L, Hkv, S] mean attention the segment's last ``window`` queries paid its tokens
        (``Observation.received_attention``), or None if not recorded for every layer."""
        count = self._attn_count.get(first_slot)
        if count is None or not bool((count > 0).all()):
            return None
        return (self._attn[first_slot] / count[:, None, None]).float()

    def drop(self, first_slot: int) -> None:
        for table in (self._sum, self._count, self._attn, self._attn_count):
            table.pop(first_slot, None)

    def release(self, slots: torch.Tensor) -> None:
        """Freed slots: drop the segments they started (the slot ids will be reused)."""
        if not self._sum:
            return
        for key in self._sum.keys() & set(slots.cpu().tolist()):
            self.drop(key)
