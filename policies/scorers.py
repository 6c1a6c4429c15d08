"""Built-in importance scorers: token scores [Hkv, T] and element scores [Hkv, T, d].

Every scorer reads only the span being compressed (its keys, values and its own
queries), so what it decides for a shared prefix cannot depend on a later request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mosaickv.errors import check
from mosaickv.parts import ElementScorer, Observation, TokenScorer
from mosaickv.registry import register_scorer


def _queries(obs: Observation, scorer: str) -> torch.Tensor:
    """[Hkv, G, Tq, d] the span's queries by KV head, refused where none were kept."""
    if obs.queries.shape[1] == 0:
        raise ValueError(f"{scorer} reads the span's queries and this span has none (a sealed segment keeps "
                         "only their statistics): use observed_attention, key_norm or recency there")
    return obs.queries.float().view(obs.num_kv_heads, obs.group, -1, obs.keys.shape[-1])


def _group_mean(x: torch.Tensor, obs: Observation) -> torch.Tensor:
    """[Hq, ...] -> [Hkv, ...]: one score per KV head, averaged over its query heads."""
    return x.view(obs.num_kv_heads, obs.group, *x.shape[1:]).mean(dim=1)


@register_scorer("key_norm")
@dataclass
class KeyNorm(TokenScorer):
    """Keys with a small norm draw more attention (Devoto et al., 2024).

    Importance is ``exp(-z)`` of the norm's z-score within the head, so it is positive and
    comparable across heads; ``temperature`` flattens (>1) or sharpens (<1) it.
    """

    temperature: float = 1.0

    def __post_init__(self) -> None:
        check(self.temperature > 0, "temperature", self.temperature, "a positive number")

    def score(self, obs: Observation) -> torch.Tensor:
        norm = obs.keys.float().norm(dim=-1)
        z = (norm - norm.mean(dim=-1, keepdim=True)) / (norm.std(dim=-1, keepdim=True) + 1e-6)
        return torch.exp(-z / self.temperature)


@register_scorer("observed_attention")
@dataclass
class ObservedAttention(TokenScorer):
    """SnapKV: attention that the last ``window`` queries pay each token, pooled.

    Query-aware: good when the question is inside the span, poor when it comes later.
    Sealed one segment at a time (a server, or the evaluator's segment scope) the window
    is the segment's own last queries, which no later request can change. ``floor``
    mixes in a uniform share (``floor`` times the mean score), so that a strategy pricing
    drops by this score does not treat any token as free to drop.
    """

    window: int = 32
    pool: int = 7
    floor: float = 0.0

    def __post_init__(self) -> None:
        check(self.window >= 1, "window", self.window, "an integer >= 1")
        check(self.pool >= 1 and self.pool % 2 == 1, "pool", self.pool, "an odd integer >= 1")
        check(self.floor >= 0, "floor", self.floor, "a number >= 0")

    @property
    def attention_window(self) -> int:
        return self.window

    def score(self, obs: Observation) -> torch.Tensor:
        attn = obs.received_attention(self.window)
        pooled = F.avg_pool1d(attn[:, None], self.pool, stride=1, padding=self.pool // 2, count_include_pad=False)[:, 0]
        return (pooled + self.floor * pooled.mean(-1, keepdim=True)) / (1 + self.floor)


@register_scorer("accumulated_attention")
@dataclass
class AccumulatedAttention(TokenScorer):
    """H2O: attention each token received from every later query of the span."""

    chunk: int = 512
    reads_queries = True

    def __post_init__(self) -> None:
        check(self.chunk >= 1, "chunk", self.chunk, "an integer >= 1")

    def score(self, obs: Observation) -> torch.Tensor:
        q = _queries(obs, "accumulated_attention")
        keys = obs.keys.float()
        hkv, t, d = keys.shape
        tq = q.shape[2]
        total = torch.zeros(hkv, t, device=keys.device)
        pos = torch.arange(t, device=keys.device)
        for start in range(0, tq, self.chunk):
            qc = q[:, :, start : start + self.chunk]
            rows = t - tq + start + torch.arange(qc.shape[2], device=keys.device)
            logits = torch.einsum("hgqd,htd->hgqt", qc, keys) / math.sqrt(d)
            logits = logits.masked_fill(pos[None, :] > rows[:, None], float("-inf"))
            total += torch.softmax(logits, dim=-1).sum(dim=(1, 2))
        return total / (obs.group * tq)


@register_scorer("expected_attention")
@dataclass
class ExpectedAttention(TokenScorer):
    """Query-agnostic: attention expected from a query drawn from the span's own queries.

    Models queries as Gaussian with the span's per-channel mean and variance, so
    ``E[exp(q.k/sqrt d)] = exp(mu.k/sqrt d + k^2.var/(2d))``; no later request is needed.
    """

    reads_queries = True

    def score(self, obs: Observation) -> torch.Tensor:
        q = _queries(obs, "expected_attention")
        keys = obs.keys.float()
        d = keys.shape[-1]
        mu, var = q.mean(dim=2), q.var(dim=2, unbiased=False)
        logits = torch.einsum("hgd,htd->hgt", mu, keys) / math.sqrt(d)
        logits = logits + 0.5 * torch.einsum("hgd,htd->hgt", var, keys.pow(2)) / d
        return torch.softmax(logits, dim=-1).mean(dim=1)


@register_scorer("recency")
@dataclass
class Recency(TokenScorer):
    """StreamingLLM: the later the token, the more it matters (sinks are protected anyway)."""

    def score(self, obs: Observation) -> torch.Tensor:
        hkv, t, _ = obs.keys.shape
        return torch.arange(1, t + 1, dtype=torch.float32, device=obs.keys.device).expand(hkv, t) / t


@register_scorer("query_weighted")
@dataclass
class QueryWeighted(ElementScorer):
    """Key channel c of token i matters as ``(|q_c| k_ic)^2 / d``.

    That is the expected squared contribution of the channel to the attention logit
    ``q.k/sqrt(d)``, so dropping channels costs the sum of their scores in squared logit
    error. ``|q_c|`` is the rotary-pair RMS of the span's own queries (see
    Observation.query_rms), so the score holds for a future query at any position.
    """

    sides = ("k",)
    squared_form = True  # w_c = |q_c| / sqrt(d)

    def score(self, obs: Observation, side: str) -> torch.Tensor:
        check(side == "k", "side", side, "'k' (query_weighted scores keys; use magnitude for values)")
        return (obs.query_rms[:, None, :] * obs.keys.float()).pow(2) / obs.keys.shape[-1]


@register_scorer("magnitude")
@dataclass
class Magnitude(ElementScorer):
    """Channel c of vector i matters as its energy ``x_ic^2``: for values, the squared
    error its loss adds to the output (for keys it is uncalibrated: prefer query_weighted)."""

    squared_form = True  # w_c = 1

    def score(self, obs: Observation, side: str) -> torch.Tensor:
        x = obs.keys if side == "k" else obs.values
        return x.float().pow(2)
