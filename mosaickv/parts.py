"""The interfaces a policy part implements, and what every part gets to look at.

Parts are small dataclasses with one method (as kvpress presses are); a policy composes
them rather than inheriting from them. Every part sees only an :class:`Observation` of the
tokens being compressed and of queries the model already computed for those tokens, never
a later request's: that is what makes a compressed prefix safe to share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from mosaickv.errors import check
from mosaickv.formats import BlockFormat, SideFormat


@dataclass
class Observation:
    """One layer of the span being compressed.

    keys, values: [Hkv, T, d] (post-RoPE, as cached). queries: [Hq, Tq, d], the queries of
    the last ``Tq`` tokens of the span (Tq may equal T, or 0 where a server kept only
    statistics), also post-RoPE. What a server keeps instead of queries (accumulated
    during the forward pass, see :func:`segment_observation`): query_stats [Hkv, d], a
    precomputed ``query_rms``; attention [Hkv, T], a precomputed ``received_attention``.
    """

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    query_stats: torch.Tensor | None = None
    attention: torch.Tensor | None = None

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[0]

    @property
    def group(self) -> int:
        return self.queries.shape[0] // self.keys.shape[0]

    def upto(self, end: int) -> "Observation":
        """The span cut at token ``end``: what was known when that token was sealed."""
        t = self.keys.shape[1]
        tq = self.queries.shape[1]
        return Observation(self.keys[:, :end], self.values[:, :end], self.queries[:, : max(0, tq - (t - end))])

    @cached_property
    def query_rms(self) -> torch.Tensor:
        """[Hkv, d] typical query magnitude per channel, invariant to the rotary angle.

        RoPE (rotate-half layout) turns channel c with its partner c +- d/2, so a future
        query's channel c has the energy of the pair, not of c alone, on average.
        """
        if self.query_stats is not None:
            return self.query_stats.float()
        if self.queries.shape[1] == 0:
            raise ValueError("no queries were observed for this span and no query_stats were given")
        q = self.queries.float()
        hq, _, d = q.shape
        energy = q.pow(2).mean(dim=1)
        pair = 0.5 * (energy + energy.roll(d // 2, dims=-1))
        return pair.view(self.num_kv_heads, self.group, d).mean(dim=1).sqrt()

    def received_attention(self, window: int) -> torch.Tensor:
        """[Hkv, T] attention each token gets from the span's last ``window`` queries,
        averaged over them and the KV head's query group (softmax over each query's
        visible tokens). Without queries, the server's recorded ``attention``."""
        if self.queries.shape[1] == 0:
            if self.attention is None:
                raise ValueError("no queries were observed for this span and no attention was recorded")
            return self.attention.float()
        keys = self.keys.float()
        hkv, t, d = keys.shape
        q = self.queries[:, -window:].float()
        w = q.shape[1]
        logits = torch.einsum("hgwd,htd->hgwt", q.view(hkv, self.group, w, d), keys) / math.sqrt(d)
        tokens, queries = torch.arange(t, device=keys.device), torch.arange(w, device=keys.device)
        logits = logits.masked_fill(tokens[None, :] > (t - w + queries)[:, None], float("-inf"))
        return torch.softmax(logits, dim=-1).mean(dim=(1, 2))


def segment_observation(obs: Observation, start: int, end: int, window: int) -> Observation:
    """Tokens ``[start, end)`` of a fully observed span, as a server sees them at sealing.

    A server keeps no queries, only what the attention backend accumulates over the
    segment's **own** tokens (:mod:`mosaickv.sglang_patch.query_stats`): the rotary-pair
    RMS of their queries, and the attention that the last ``min(window, end - start)``
    of them (none for a window of 0) pay the segment's tokens (softmax over everything they see). Both depend on
    the prefix up to ``end`` only, so a shared segment keeps the same bytes whatever
    follows. The offline evaluator's segment scope seals through this, so it measures
    exactly what serving stores.
    """
    if obs.queries.shape[1] != obs.keys.shape[1]:
        raise ValueError(f"segment observations need every token's query: {obs.queries.shape[1]} queries "
                         f"for {obs.keys.shape[1]} tokens")
    rows = slice(start, end)
    own = Observation(obs.keys[:, rows], obs.values[:, rows], obs.queries[:, rows])
    w = min(window, end - start)
    attention = obs.upto(end).received_attention(w)[:, rows] if w > 0 else None
    return Observation(own.keys, own.values, obs.queries[:, :0], query_stats=own.query_rms, attention=attention)


class TokenScorer:
    """Importance of each token: ``score(obs) -> [Hkv, T]``, non-negative.

    ``attention_window``: how many of a span's last queries' attention the scorer reads
    through :meth:`Observation.received_attention` (0: none), so that a server records it.
    ``reads_queries``: whether it reads ``obs.queries`` themselves. A server keeps only
    their statistics, so such a scorer can compress a whole span offline but cannot seal
    a segment (serving, or the evaluator's segment scope); both refuse it up front.
    """

    kind = "token"
    attention_window = 0
    reads_queries = False

    def score(self, obs: Observation) -> torch.Tensor:
        raise NotImplementedError


class ElementScorer:
    """Importance of each element of each vector: ``score(obs, side) -> [Hkv, T, d]``.

    ``side`` is "k" or "v"; a scorer may serve one side or both. ``squared_form``: its
    scores are ``(w_c x_c)^2`` for one weight per channel of a block, the rule the device
    sealer ranks channels by. A scorer that says so by construction is taken at its word;
    any other is checked on every sealing call, which reads the device back.
    """

    kind = "element"
    sides: tuple[str, ...] = ("k", "v")
    squared_form: bool = False

    def score(self, obs: Observation, side: str) -> torch.Tensor:
        raise NotImplementedError


class TokenSelector:
    """Which ``m`` of a block's tokens to keep: ``select(scores [n], m) -> indices``."""

    kind = "token"

    def select(self, scores: torch.Tensor, m: int) -> torch.Tensor:
        raise NotImplementedError

    def select_many(self, scores: torch.Tensor, m: int) -> torch.Tensor:
        """``select`` for each row of ``scores`` [G, n]: [G, m]. Override it where one
        batched call does the same (on a GPU, a row at a time is a launch each)."""
        return torch.stack([self.select(row, m).reshape(m) for row in scores]) if len(scores) else \
            torch.zeros(0, m, dtype=torch.long, device=scores.device)


class ChannelSelector:
    """How reduced-width vectors choose their channels, and what that loses.

    ``side_format(width)`` names the stored layout; ``lost(scores [..., m, d], width)``
    sums, per vector, the element scores of the channels that layout drops, so a strategy
    can price a width before anything is packed.
    """

    kind = "channel"

    def side_format(self, width: int) -> SideFormat:
        raise NotImplementedError

    def lost(self, scores: torch.Tensor, width: int) -> torch.Tensor:
        raise NotImplementedError

    def lost_many(self, scores: torch.Tensor, widths: list[int]) -> dict[int, torch.Tensor]:
        """``lost`` at each of ``widths``; override it where the widths share work."""
        return {w: self.lost(scores, w) for w in widths}


@dataclass
class BlockStats:
    """What a strategy needs to price formats for ``B`` blocks of ``n`` tokens, head dim ``d``.

    Costs estimate the squared error a block adds to its head's attention output, with
    every token in decreasing order of its attention share (the order it is kept in):

    - ``weight`` [B, n]: the token's squared attention share ``p^2``;
    - ``spread`` [B, n]: ``|v - o|^2``, how far its value sits from the head's mean output,
      so that dropping it costs ``weight * spread`` (= ``drop_cost``);
    - ``k_lost`` {side format: [B, n]}: expected squared logit error of the stored key;
    - ``v_lost`` {side format: [B, n]}: squared error of the stored value.
    """

    n: int
    d: int
    weight: torch.Tensor
    spread: torch.Tensor
    k_lost: dict[SideFormat, torch.Tensor]
    v_lost: dict[SideFormat, torch.Tensor]

    @property
    def drop_cost(self) -> torch.Tensor:
        return self.weight * self.spread

    def scaled(self, factor: torch.Tensor) -> "BlockStats":
        """Every cost of block b times ``factor[b]``: each is ``weight`` times something."""
        return BlockStats(n=self.n, d=self.d, weight=self.weight * factor[:, None].to(self.weight.dtype),
                          spread=self.spread, k_lost=self.k_lost, v_lost=self.v_lost)

    def rows(self, idx: torch.Tensor) -> "BlockStats":
        """The statistics of blocks ``idx`` alone."""
        return BlockStats(n=self.n, d=self.d, weight=self.weight[idx], spread=self.spread[idx],
                          k_lost={f: x[idx] for f, x in self.k_lost.items()},
                          v_lost={f: x[idx] for f, x in self.v_lost.items()})


class SegmentStrategy:
    """Chooses each block's format so that the group fits ``budget`` bytes.

    ``candidates(d, channels)`` lists the side formats it may use, so that their retained
    importance is measured before ``plan(stats, budget, channels)`` returns one
    :class:`BlockFormat` per block. ``bind(head_dim)`` (optional) checks widths. A
    strategy whose formats are fixed whatever the budget sets ``follows_budget`` False.
    """

    follows_budget = True

    def candidates(self, d: int, channels: ChannelSelector) -> list[SideFormat]:
        raise NotImplementedError

    def side_candidates(self, d: int, channels: ChannelSelector) -> tuple[list[SideFormat], list[SideFormat]]:
        """The side formats ``plan`` may give keys, and those it may give values: the
        statistics measure ``k_lost`` and ``v_lost`` for these alone (a sort of every
        vector's channels per role). Both are ``candidates`` unless a strategy says more."""
        sides = self.candidates(d, channels)
        return sides, sides

    def plan(self, stats: BlockStats, budget: int, channels: ChannelSelector) -> list[BlockFormat]:
        raise NotImplementedError

    def plan_groups(self, stats: BlockStats, groups: int, budget: int, channels: ChannelSelector) -> list[BlockFormat]:
        """``plan`` for ``groups`` independent spans interleaved in ``stats`` (row ``b`` is
        span ``b % groups``'s), each within ``budget``: many segments sealed at once.
        Override it where one batched call does the same."""
        if groups == 1:
            return self.plan(stats, budget, channels)
        blocks = stats.weight.shape[0]
        formats: list[BlockFormat] = [None] * blocks  # type: ignore[list-item]
        for g in range(groups):
            rows = torch.arange(g, blocks, groups, device=stats.weight.device)
            planned = list(self.plan(stats.rows(rows), budget, channels))
            check(len(planned) == len(rows), "strategy", type(self).__name__,
                  f"a plan() that returns one format per block ({len(planned)} for {len(rows)} blocks)")
            for b, fmt in zip(rows.tolist(), planned):
                formats[b] = fmt
        return formats
