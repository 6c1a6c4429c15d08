"""Token scorers that read a span's queries: what they compute, and where they cannot run.

A sealed segment keeps only its queries' statistics, so a scorer that reads the queries
themselves must be refused by name there (it used to return NaN scores, found only
minutes into a run), and still score whole spans offline.
"""

from __future__ import annotations

import math

import pytest
import torch

from mosaickv.compressor import Compressor
from mosaickv.config import load_policy
from mosaickv.errors import PolicyError
from mosaickv.parts import Observation, segment_observation
from mosaickv.policies.scorers import AccumulatedAttention, ExpectedAttention, KeyNorm, ObservedAttention

D = 64
READERS = [ExpectedAttention, AccumulatedAttention]


def _span(hkv: int, group: int, t: int, seed: int) -> Observation:
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(hkv, t, D, generator=g) for _ in range(2))
    return Observation(k, v, torch.randn(hkv * group, t, D, generator=g))


@pytest.mark.parametrize("group", [1, 4])
def test_expected_attention_is_the_softmax_of_the_gaussian_expectation(group):
    """Queries drawn from N(mu, diag var): the score is E[exp(q.k/sqrt d)] over tokens,
    normalised, averaged over the group; here against the average over the drawn queries."""
    g = torch.Generator().manual_seed(3)
    hkv, t, n = 2, 12, 200_000
    keys = 0.3 * torch.randn(hkv, t, D, generator=g)
    mu = 0.5 * torch.randn(hkv * group, 1, D, generator=g)
    std = 0.2 + torch.rand(hkv * group, 1, D, generator=g)
    queries = mu + std * torch.randn(hkv * group, n, D, generator=g)
    obs = Observation(keys, keys, queries)
    q = queries.view(hkv, group, n, D)
    sampled = torch.exp(torch.einsum("hgnd,htd->hgnt", q, keys) / math.sqrt(D)).mean(dim=2)
    expected = (sampled / sampled.sum(-1, keepdim=True)).mean(dim=1)
    torch.testing.assert_close(ExpectedAttention().score(obs), expected, rtol=2e-2, atol=0)


@pytest.mark.parametrize("scorer", READERS, ids=lambda c: c.__name__)
def test_query_readers_refuse_a_sealed_segment_by_name(scorer):
    obs = _span(2, 3, 64, seed=1)
    sealed = segment_observation(obs, 32, 64, window=32)
    assert sealed.queries.shape[1] == 0
    name = scorer.registered_name
    with pytest.raises(ValueError, match=f"{name} reads the span's queries"):
        scorer().score(sealed)
    scores = scorer().score(obs)
    assert scores.shape == (2, 64) and torch.isfinite(scores).all() and (scores >= 0).all()


@pytest.mark.parametrize("scorer", [ObservedAttention, KeyNorm], ids=lambda c: c.__name__)
def test_scorers_that_need_no_queries_score_a_sealed_segment(scorer):
    sealed = segment_observation(_span(2, 3, 64, seed=2), 32, 64, window=32)
    assert not scorer.reads_queries
    scores = scorer().score(sealed)
    assert scores.shape == (2, 32) and torch.isfinite(scores).all()


@pytest.mark.parametrize("name", ["expected_attention", "accumulated_attention"])
def test_segment_scope_refuses_a_query_reader_before_any_work(name):
    policy = load_policy({"name": "q", "ratio": 2, "min_context": 192, "token_scorer": name})
    layers = [_span(2, 2, 256, seed=s) for s in range(2)]
    compressor = Compressor(policy, D)
    with pytest.raises(PolicyError, match=f"token_scorer.*{name}.*sealed one at a time"):
        compressor.compress(layers, scope="segment")
    assert compressor.compress(layers, scope="group").nbytes() > 0
