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
log-sum-exp, so they match across chunkings to rounding, not bit for bit. The sums live
where the queries are (the pool's device), ``L x Hkv x (d + S) x 8`` bytes per unsealed
segment (8B shape: 320 KiB) in rows of tables that grow when full and, past KEEP_ROWS,
shrink when three quarters are free; that is outside the KV budget. A forward's sums are
added there on its own stream, so no step waits for them and none is copied to the host
(a decode step of 240 SmolLM2 requests spent 9 ms adding them on the host, H200
machine). Counts are known on the host when a forward is recorded and stay there, so
that no reader waits on the device to learn which segments were observed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from mosaickv.uploads import upload

# Rows the statistics tables keep when they shrink: a 32k-token prompt's segments, so a
# server taking one prompt after another does not regrow them (8B shape: 320 KiB a row, 320 MiB kept).
KEEP_ROWS = 1024


@dataclass
class _Pending:
    """One layer's sums of one forward, not yet added (:meth:`SegmentQueryStats.stage`):
    row ``j`` adds to the segment starting at slot ``keys[j]``. ``stream``: the stream of
    the forward that fills them, so their add is queued behind it."""

    layer: int
    energy: torch.Tensor  # [N, Hkv, d] float64
    attn: torch.Tensor | None  # [N, Hkv, S] float64
    keys: tuple[int, ...]
    counts: tuple[int, ...]  # query-head tokens each row's energy sums
    attn_counts: tuple[int, ...]  # query heads each row's attention sums (0: it adds none)
    stream: torch.cuda.Stream | None = None


def _read_here(t: torch.Tensor) -> torch.Tensor:
    """``t``, marked as read by the current stream before it is replaced: a table may have
    been allocated on another stream (grown by a forward's add, compacted by a drop), whose
    next allocation could otherwise reuse its memory before this stream's read has run."""
    if t.is_cuda:
        t.record_stream(torch.cuda.current_stream(t.device))
    return t


def _resized(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t``'s rows first, then zero rows up to ``rows``."""
    out = t.new_zeros((rows, *t.shape[1:]))
    out[: len(t)] = _read_here(t)
    return out


def _float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as contiguous float32 in one copy, or as it is if it already is (a batched
    matmul's operand: a cast and a layout change cost one launch, not two)."""
    if t.dtype != torch.float32:
        return t.to(torch.float32, memory_format=torch.contiguous_format)
    return t.contiguous()


@dataclass(frozen=True, eq=False)
class ExtendIndex:
    """Where an extend's queries fall among segments (:meth:`SegmentQueryStats.extend_index`):
    it depends on each request's length and query count, not on the layer, so a forward
    finds it once and every layer's :meth:`SegmentQueryStats.observe` reads it, instead of
    building index tensors and host lists again per layer and request. Rows ``j`` are the
    ``N`` touched segments, request after request; its tensors are on the queries' device."""

    nq: int  # queries, every request's back to back
    q_heads: int
    window: int
    keys: tuple[int, ...]  # [N] first slot of each segment
    counts: tuple[int, ...]  # query-head tokens each segment's energy sums
    attn_counts: tuple[int, ...]  # query heads each segment's attention sums (0: it adds none)
    seg_of: torch.Tensor | None  # [nq] int64 each query's segment; None: the queries are the N segments whole
    heads: torch.Tensor | None  # window: [N, Hkv, W, G] rows of q.view(-1, d) and lse.view(-1) (clamped)
    key_rows: torch.Tensor | None  # window: [N, Hkv, S] rows of keys.view(-1, d) (past a request's end: its last)
    hidden: torch.Tensor | None  # window: [N, 1, W, 1, S] bool, (query, token) pairs that add nothing


class SegmentQueryStats:
    """Running sums per (segment, layer, KV head) until the segment seals.

    ``window``: how many of a segment's last queries record the attention they pay its
    tokens (the token scorer's ``attention_window``; 0 records none). ``device``: where
    the sums live, the queries' device.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, segment_size: int, window: int = 0,
                 device: torch.device | str = "cpu") -> None:
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        self.head_dim, self.segment_size = head_dim, segment_size
        self.window = min(window, segment_size)
        # One row per unsealed segment in each table, so a forward's sums are added in a few
        # ops (a decode step of 240 requests made 960 adds, 12 ms on a 2-core CPU).
        self._rows: dict[int, int] = {}  # first slot -> its row
        self._free: list[int] = []  # rows no segment holds
        self.device = torch.device(device)
        self._sum = torch.zeros(0, num_layers, num_kv_heads, head_dim, dtype=torch.float64, device=self.device)
        self._attn = torch.zeros(0, num_layers, num_kv_heads, segment_size, dtype=torch.float64, device=self.device)
        self._count = torch.zeros(0, num_layers, dtype=torch.int64)  # query-head tokens (host)
        self._attn_count = torch.zeros(0, num_layers, dtype=torch.int64)  # query heads (host)
        self._pending: list[_Pending] = []  # sums not added yet
        self._last: torch.cuda.Event | None = None  # after the last op on the device tables, on any stream
        self._side: torch.cuda.Stream | None = None  # reads, drops and compaction (see _ordered)

    def __len__(self) -> int:
        self.flush()
        return len(self._rows)

    def observe(self, layer: int, q: torch.Tensor, slots: torch.Tensor | None = None, keys: torch.Tensor | None = None,
                lse: torch.Tensor | None = None, scale: float | None = None, index: ExtendIndex | None = None) -> None:
        """Add the queries ``q`` [nq, Hq, d] of a request's last ``nq`` tokens.

        ``slots`` are the request's slots so far (its ``req_to_token`` row up to the
        sequence length, the step's own tokens last); position ``p`` belongs to segment
        ``p // segment_size``, keyed by that segment's first slot. With a window, also
        ``keys`` [n, Hkv, d] of the positions from the first query's segment start on,
        ``lse`` [nq, Hq] of the step's scaled logits, and that ``scale``.

        Or, instead of ``slots``, the forward's ``index`` (:meth:`extend_index`, found once
        for every layer): ``q`` and ``lse`` then hold its requests' queries back to back and
        ``keys`` are what its key rows name (a layer's whole key buffer). The sums are
        added at the next flush: a few ops per layer, not per request.
        """
        nq, hq, d = q.shape
        if nq == 0:
            return
        if layer == 0:
            self.flush()  # the earlier forwards' sums
        if d != self.head_dim or hq % self.num_kv_heads:
            raise ValueError(f"queries of shape {tuple(q.shape)} do not fit {self.num_kv_heads} KV heads "
                             f"of head dim {self.head_dim}")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is not in [0, {self.num_layers})")
        if self.window and (keys is None or lse is None or scale is None):
            raise ValueError(f"a window of {self.window} queries records attention: keys, lse and scale are needed")
        if (slots is None) == (index is None):
            raise ValueError("observe takes a request's slots or a forward's extend_index: exactly one, got slots="
                             f"{'none' if slots is None else len(slots)}, index={'none' if index is None else 'one'}")
        if index is None:
            index = self.extend_index([slots], [nq], hq, q.device, [np.arange(len(keys))] if self.window else None)
        elif (index.nq, index.q_heads, index.window) != (nq, hq, self.window):
            raise ValueError(f"an index of {index.nq} queries of {index.q_heads} heads (window {index.window}) cannot "
                             f"place {nq} queries of {hq} heads (window {self.window})")
        hkv, segments = self.num_kv_heads, len(index.keys)
        if index.seg_of is None:  # whole segments: one sum over each one's tokens and GQA group
            sums = q.detach().double().pow(2).reshape(segments, self.segment_size, hkv, hq // hkv, d).sum((1, 3))
        else:
            sums = torch.zeros(segments, hkv, d, dtype=torch.float64, device=q.device).index_add_(
                0, index.seg_of, self.query_energy(q))
        attn = None
        if self.window:
            if keys.shape[1:] != (hkv, d):
                raise ValueError(f"keys of shape {tuple(keys.shape)} are not [rows, {hkv}, {d}]")
            attn = self._paid(q.reshape(-1, d)[index.heads], lse.reshape(-1)[index.heads],
                              keys.reshape(-1, d)[index.key_rows], index.hidden, scale)
        self.defer(layer, sums, attn, index.keys, index.counts, index.attn_counts)

    def extend_index(self, slots: list[torch.Tensor], nqs: list[int], q_heads: int, device: torch.device | str,
                     key_rows: list[torch.Tensor | np.ndarray] | None = None) -> ExtendIndex:
        """Where an extend's queries fall, for :meth:`observe` at every layer of its forward:
        request ``i`` holds ``slots[i]`` (its tokens so far) and queries the last ``nqs[i]``
        of them, every request's queries back to back in this order. With a window,
        ``key_rows[i]`` maps request ``i``'s positions from its first query's segment start
        on to rows of the keys :meth:`observe` will get. Found on the host in numpy (no
        launches) and uploaded to ``device`` once."""
        hkv, s, w = self.num_kv_heads, self.segment_size, self.window
        if q_heads <= 0 or q_heads % hkv:
            raise ValueError(f"q_heads {q_heads} is not a multiple of {hkv} KV heads")
        if len(nqs) != len(slots):
            raise ValueError(f"nqs has {len(nqs)} query counts for {len(slots)} requests")
        if w and (key_rows is None or len(key_rows) != len(slots)):
            raise ValueError(f"a window of {w} queries reads keys: key_rows needs one entry per request "
                             f"({len(slots)}), got {'none' if key_rows is None else len(key_rows)}")
        group = q_heads // hkv
        n = np.asarray([len(x) for x in slots], dtype=np.int64)
        nq = np.asarray(nqs, dtype=np.int64)
        bad = np.flatnonzero((nq < 0) | (nq > n))
        if len(bad):
            raise ValueError(f"request {bad[0]} queries its last {nq[bad[0]]} tokens but holds {n[bad[0]]}")
        live = np.flatnonzero(nq > 0)  # a request without queries adds nothing
        n, nq = n[live], nq[live]
        first = n - nq
        seg0 = first // s
        nseg = (n - 1) // s - seg0 + 1
        base, seg_base = np.cumsum(nq) - nq, np.cumsum(nseg) - nseg  # each request's first query, first segment
        req = np.repeat(np.arange(len(live)), nseg)  # each touched segment's request
        start = (seg0[req] + np.arange(len(req)) - seg_base[req]) * s  # its first position
        counts = (np.minimum(start + s, n[req]) - np.maximum(start, first[req])) * group
        keys = [key for i, lo, hi in zip(live.tolist(), (seg0 * s).tolist(), n.tolist())
                for key in slots[i][lo:hi:s].tolist()]
        seg_of = None
        if (first % s).any() or (n % s).any():
            rq = np.repeat(np.arange(len(live)), nq)
            seg_of = upload((first[rq] + np.arange(len(rq)) - base[rq]) // s - seg0[rq] + seg_base[rq], device)
        attn_counts, heads, token_rows, hidden = np.zeros(len(req), dtype=np.int64), None, None, None
        if w:
            at = start[:, None] + (s - w) + np.arange(w)  # [N, W] each segment's last W positions
            ok = (at >= first[req][:, None]) & (at < n[req][:, None])  # those that are this step's queries
            attn_counts = ok.sum(1) * group
            row = base[req][:, None] + np.clip(at - first[req][:, None], 0, nq[req][:, None] - 1)
            head = np.arange(hkv)[:, None, None] * group + np.arange(group)  # [Hkv, 1, G]
            heads = upload(row[:, None, :, None] * q_heads + head, device)
            hidden = ~ok[:, :, None] | (np.arange(s) > (s - w + np.arange(w))[:, None])  # a token after the query
            hidden = upload(hidden[:, None, :, None, :], device)
            rows = [np.asarray(key_rows[i], dtype=np.int64) for i in live.tolist()]
            lens = np.asarray([len(r) for r in rows], dtype=np.int64)
            span = n - seg0 * s  # the positions each request's key rows cover
            short = np.flatnonzero(lens < span)
            if len(short):
                j = short[0]
                raise ValueError(f"key_rows[{live[j]}] has {lens[j]} rows for the request's {span[j]} tokens "
                                 "from its first query's segment on")
            offset = np.cumsum(lens) - lens
            local = np.minimum(start[:, None] - (seg0 * s)[req][:, None] + np.arange(s), span[req][:, None] - 1)
            per_token = np.concatenate(rows + [np.zeros(0, dtype=np.int64)])[offset[req][:, None] + local]  # [N, S]
            token_rows = upload(per_token[:, None, :] * hkv + np.arange(hkv)[:, None], device)
        return ExtendIndex(int(nq.sum()), q_heads, w, tuple(keys), tuple(counts.tolist()), tuple(attn_counts.tolist()),
                           seg_of, heads, token_rows, hidden)

    def observe_decode(self, layer: int, q: torch.Tensor, first_slots: list[int], positions: torch.Tensor,
                       keys: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                       scale: float | None = None, device_positions: torch.Tensor | None = None) -> None:
        """:meth:`observe` for a batch of one query per request, computed together where
        ``q`` is and left there: request ``b``'s query ``q[b]`` [Hq, d] sits at
        ``positions[b]`` (host) of its segment, whose first slot is ``first_slots[b]``.
        With a window, ``keys`` [B, S, Hkv, d] hold each segment's tokens so far (the rest
        is ignored), ``lse`` [B, Hq] the step's log-sum-exp, and ``device_positions`` may
        give ``positions`` where ``q`` is (copied once per forward, not once per layer). The
        sums of all layers are added together at the next step's first layer or when read
        (:meth:`flush`)."""
        bsz, hq, d = q.shape
        if bsz == 0:
            return
        if layer == 0:
            self.flush()  # the earlier steps' sums
        in_window = positions >= self.segment_size - self.window
        attn = None
        if self.window and bool(in_window.any()):
            pos = positions.to(q.device) if device_positions is None else device_positions
            attn = self.paid_attention(q[:, None], lse[:, None], keys, pos[:, None],
                                       (pos >= self.segment_size - self.window)[:, None], scale)
        self.defer_decode(layer, self.query_energy(q), attn, first_slots, in_window.tolist(), hq // self.num_kv_heads)

    def query_energy(self, q: torch.Tensor) -> torch.Tensor:
        """Per-KV-head channel sums of ``q^2`` over the GQA group, [B, Hkv, d] float64."""
        bsz, hq, d = q.shape
        return q.detach().double().pow(2).view(bsz, self.num_kv_heads, hq // self.num_kv_heads, d).sum(2)

    def defer_decode(self, layer: int, energy: torch.Tensor, attn: torch.Tensor | None, first_slots: list[int],
                     in_window: list[bool], group: int) -> None:
        """Sums of one layer's decode queries, still on the device: request ``b`` adds
        ``energy[b]`` (and ``attn[b]`` if ``in_window[b]``) to the segment starting at
        ``first_slots[b]``. A CUDA graph's buffers can be deferred before the replay that
        fills them, on its stream: their add is queued behind it (:meth:`stage`)."""
        self.defer(layer, energy, attn, first_slots, [group] * len(first_slots),
                   [group if ok and attn is not None else 0 for ok in in_window])

    def defer(self, layer: int, energy: torch.Tensor, attn: torch.Tensor | None, keys: list[int],
              counts: list[int], attn_counts: list[int]) -> None:
        """Row ``j`` of one layer's sums, counting ``counts[j]`` query-head tokens (and
        ``attn_counts[j]`` query heads' attention), goes to the segment starting at slot
        ``keys[j]`` at the next :meth:`stage`. Call it on the stream of the forward that
        fills ``energy`` and ``attn``: their add is queued there."""
        stream = torch.cuda.current_stream(energy.device) if energy.device.type == "cuda" else None
        self._pending.append(_Pending(layer, energy, attn, tuple(keys), tuple(counts), tuple(attn_counts), stream))

    def stage(self, keys: set[int] | None = None) -> None:
        """Queue the add of every pending sum, one per forward, on the stream of the forward
        that fills it: behind that forward, and ahead of any later forward on that stream
        (a CUDA graph's next replay overwrites its buffers). Nothing waits. With ``keys``,
        only the forwards that add to one of those segments: a reader or a drop of sealed
        segments does not queue the forward in flight's sums, which would put its own ops
        (and every later one on the tables) behind that whole forward."""
        if keys is None:
            pending, self._pending = self._pending, []
        else:
            pending = [p for p in self._pending if not keys.isdisjoint(p.keys)]
            self._pending = [p for p in self._pending if keys.isdisjoint(p.keys)]
        if not pending:
            return
        batches: dict[tuple, list[_Pending]] = {}  # one forward's layers share their rows
        for p in pending:
            batches.setdefault((p.keys, p.counts, p.attn_counts, p.stream), []).append(p)
        for (keys, counts, attn_counts, stream), layers in batches.items():
            with self._ordered(stream):
                self._add(keys, counts, attn_counts, layers)

    def flush(self) -> None:
        """Queue every pending sum's add (:meth:`stage`): a read after it sees them. A
        forward's statistics cost a few ops in all (:meth:`_add`), not a few per segment and
        layer (32 layers x 256 segments of an 8k-token chunk: 8,192 adds)."""
        self.stage()

    @contextlib.contextmanager
    def _ordered(self, stream: torch.cuda.Stream | None = None) -> Iterator[None]:
        """Run the body's ops on the tables on ``stream`` (default: the tables' own side
        stream), after the previous op on them whichever stream queued it. Forwards add on
        theirs; reads, drops and compaction go on the side stream. Without the wait a
        drop's zeroing could pass a queued add, and a row freed and given to another
        segment would keep the old one's sums. The wait is on an event recorded right
        after that op, not on its stream: SGLang's scheduler stream waits for the whole
        forward in flight after an extend's launch, so an op queued there (or a wait for
        all of a forward's stream) would make the next reader wait for that forward too."""
        if self.device.type != "cuda":
            yield
            return
        if stream is None:
            if self._side is None:
                self._side = torch.cuda.Stream(self.device)
            stream = self._side
        if self._last is not None:
            stream.wait_event(self._last)
        with torch.cuda.stream(stream):
            yield
        self._last = torch.cuda.Event()
        self._last.record(stream)

    def _add(self, keys: tuple[int, ...], counts: tuple[int, ...], attn_counts: tuple[int, ...],
             layers: list[_Pending]) -> None:
        """One forward's sums into the tables: (row, layer) pairs flattened, one add per
        table (counts on the host, sums where they are)."""
        rows = self._rows_of(keys)
        at = torch.tensor([p.layer for p in layers])
        pairs = (rows[None, :] * self.num_layers + at[:, None]).reshape(-1)  # [layers x N], as stacked below
        self._count.view(-1).index_add_(0, pairs, torch.tensor(counts, dtype=torch.int64).repeat(len(at)))
        energies = torch.stack([p.energy for p in layers]).to(self.device)
        self._sum.view(-1, self.num_kv_heads, self.head_dim).index_add_(
            0, upload(pairs, self.device), energies.reshape(-1, self.num_kv_heads, self.head_dim))
        with_attn = [i for i, p in enumerate(layers) if p.attn is not None]
        attn_counts_t = torch.tensor(attn_counts, dtype=torch.int64)
        some = attn_counts_t > 0
        if not with_attn or not bool(some.any()):
            return
        attn_at = at[with_attn]
        pairs = (rows[some][None, :] * self.num_layers + attn_at[:, None]).reshape(-1)
        self._attn_count.view(-1).index_add_(0, pairs, attn_counts_t[some].repeat(len(attn_at)))
        # Rows by index, not by a device mask: a mask's nonzero waits for the forward (the
        # tenth run's 8B prefill profile: 39% of the scheduler's time at 8k, 61% at 32k).
        picked = upload(torch.nonzero(some).flatten(), self.device)
        attns = torch.stack([layers[i].attn for i in with_attn]).to(self.device).index_select(1, picked)
        self._attn.view(-1, self.num_kv_heads, self.segment_size).index_add_(
            0, upload(pairs, self.device), attns.reshape(-1, self.num_kv_heads, self.segment_size))

    def paid_attention(self, q: torch.Tensor, lse: torch.Tensor, keys: torch.Tensor, q_pos: torch.Tensor,
                        q_ok: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention ``N`` segments' chosen queries pay their own segment's tokens, summed
        over queries and the GQA group: ``q`` [N, W, Hq, d] at positions ``q_pos`` [N, W]
        within their segment (``q_ok`` marks real ones), ``lse`` [N, W, Hq], ``keys`` [N, S,
        Hkv, d]. A query sees the tokens up to its own position. [N, Hkv, S] float64 where q is."""
        n, w, hq, d = q.shape
        hkv = self.num_kv_heads
        hidden = ~q_ok[:, :, None] | (torch.arange(self.segment_size, device=q.device) > q_pos[:, :, None])
        return self._paid(q.reshape(n, w, hkv, hq // hkv, d).transpose(1, 2),
                          lse.reshape(n, w, hkv, hq // hkv).transpose(1, 2), keys.transpose(1, 2),
                          hidden[:, None, :, None, :], scale)

    def _paid(self, q: torch.Tensor, lse: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor,
              scale: float) -> torch.Tensor:
        """:meth:`paid_attention` laid out per (segment, KV head): ``q`` [N, Hkv, W, G, d],
        ``lse`` [N, Hkv, W, G], ``keys`` [N, Hkv, S, d], ``hidden`` [N, 1, W, 1, S] the
        pairs that add nothing. One float32 batched matmul subtracts the log-sum-exp as it
        scales (no separate ops for either), and the sum over queries and group is float64."""
        n, hkv, w, g, d = q.shape
        logits = torch.baddbmm(_float32(lse).view(n * hkv, w * g, 1), _float32(q).view(n * hkv, w * g, d),
                               _float32(keys).view(n * hkv, -1, d).transpose(1, 2), beta=-1.0, alpha=scale)
        probs = logits.exp_().view(n, hkv, w, g, -1).masked_fill_(hidden, 0.0)
        return probs.sum((2, 3), dtype=torch.float64)

    def _rows_of(self, keys: tuple[int, ...]) -> torch.Tensor:
        """Each key's row, a free (zero) one for a segment that has none; the tables grow
        once, if they lack free rows (so only inside :meth:`_ordered`)."""
        missing = sum(key not in self._rows for key in set(keys)) - len(self._free)
        if missing > 0:
            old = len(self._count)
            new = max(64, 2 * old, old + missing)
            self._sum, self._count, self._attn, self._attn_count = (
                _resized(t, new) for t in (self._sum, self._count, self._attn, self._attn_count))
            self._free += range(new - 1, old - 1, -1)
        for key in keys:
            if key not in self._rows:
                self._rows[key] = self._free.pop()
        return torch.tensor([self._rows[key] for key in keys], dtype=torch.int64)

    def rms(self, first_slot: int) -> torch.Tensor | None:
        """[L, Hkv, d] rotary-pair RMS of the segment's queries (``Observation.query_rms``),
        or None if a layer saw none of them."""
        values, ok = self.rms_many([first_slot])
        return values[0] if ok[0] else None

    def rms_many(self, first_slots: list[int]) -> tuple[torch.Tensor, list[bool]]:
        """:meth:`rms` of many segments in a few ops (a sealing call takes up to 256): [n, L,
        Hkv, d], and whether each segment has one (one that has not is zeros)."""
        energy, ok = self._means(first_slots, attention=False)
        return (0.5 * (energy + energy.roll(self.head_dim // 2, dims=-1))).sqrt().float(), ok

    def attention(self, first_slot: int) -> torch.Tensor | None:
        """[L, Hkv, S] mean attention the segment's last ``window`` queries paid its tokens
        (``Observation.received_attention``), or None if not recorded for every layer."""
        values, ok = self.attention_many([first_slot])
        return values[0] if ok[0] else None

    def attention_many(self, first_slots: list[int]) -> tuple[torch.Tensor, list[bool]]:
        """:meth:`attention` of many segments in a few ops: [n, L, Hkv, S] and whether each
        was recorded for every layer (one that was not is zeros)."""
        mean, ok = self._means(first_slots, attention=True)
        return mean.float(), ok

    def _means(self, first_slots: list[int], attention: bool) -> tuple[torch.Tensor, list[bool]]:
        """Each segment's sums over its counts (float64, one gather for all), zero for a
        segment without a row or with a layer that counted none, and which are not."""
        self.stage(set(first_slots))  # may grow the tables: read them after
        sums, counts = (self._attn, self._attn_count) if attention else (self._sum, self._count)
        rows = [self._rows.get(first) for first in first_slots]
        if all(row is None for row in rows):
            return sums.new_zeros((len(rows), *sums.shape[1:])), [False] * len(rows)
        at = torch.tensor([0 if row is None else row for row in rows], dtype=torch.int64)
        count = counts[at]
        ok = torch.tensor([row is not None for row in rows]) & (count > 0).all(dim=1)
        # A segment without a row or with an unobserved layer divides by 1 and is zeroed.
        scale = torch.where(ok[:, None], 1.0 / count.clamp_min(1), 0.0).to(torch.float64)
        with self._ordered():
            mean = sums[upload(at, self.device)] * upload(scale, self.device)[:, :, None, None]
        return self._handed_over(mean), ok.tolist()

    def _handed_over(self, t: torch.Tensor) -> torch.Tensor:
        """``t``, read on the side stream, made safe to use on the caller's stream: it
        waits for the read (on the device) and the allocator keeps ``t`` until it is done."""
        if t.is_cuda:
            here = torch.cuda.current_stream(t.device)
            here.wait_event(self._last)
            t.record_stream(here)
        return t

    def drop(self, first_slot: int) -> None:
        self.drop_many([first_slot])

    def drop_many(self, first_slots: list[int]) -> None:
        """Forget sealed (or freed) segments: their rows zeroed in one op per table and
        freed; past KEEP_ROWS the tables shrink when three quarters are free. Sums still
        pending for them are added first (their forwards' other segments with them)."""
        self.stage(set(first_slots))
        rows = [row for row in (self._rows.pop(first, None) for first in first_slots) if row is not None]
        if not rows:
            return
        at = torch.tensor(rows, dtype=torch.int64)
        self._count[at] = 0
        self._attn_count[at] = 0
        with self._ordered():
            on_device = upload(at, self.device)
            self._sum.index_fill_(0, on_device, 0)  # a scalar, not a value tensor copied from the host
            self._attn.index_fill_(0, on_device, 0)
        self._free += rows
        if len(self._count) > KEEP_ROWS and 4 * len(self._rows) <= len(self._count):
            self._compact()

    def _compact(self) -> None:
        """Move the held rows to the front of tables twice their number (at least
        KEEP_ROWS): after several long prompts seal, most of their rows go back."""
        held = list(self._rows.items())
        rows = torch.tensor([row for _, row in held], dtype=torch.int64)
        size = max(KEEP_ROWS, 2 * len(held))
        self._count, self._attn_count = (_resized(t[rows], size) for t in (self._count, self._attn_count))
        with self._ordered():
            on_device = upload(rows, self.device)
            self._sum, self._attn = (_resized(_read_here(t)[on_device], size) for t in (self._sum, self._attn))
        self._rows = {key: i for i, (key, _) in enumerate(held)}
        self._free = list(range(size - 1, len(held) - 1, -1))

    def release(self, slots: torch.Tensor) -> None:
        """Freed slots: drop the segments they started (the slot ids will be reused), rows
        and sums still pending alike."""
        if not self._rows and not self._pending:
            return
        self.drop_many(slots.cpu().tolist())  # a slot freed twice: its row is popped once
