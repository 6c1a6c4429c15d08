"""Question-after mode and the sharing rule, offline (no model needed): what each mode
compresses and feeds, and that a segment sealed as the server seals it keeps the same
bytes whatever follows it."""

from __future__ import annotations

import pytest
import torch

from mosaickv.compressor import Compressor
from mosaickv.config import load_policy
from mosaickv.parts import Observation
from mosaickv.retrieval import Prompt, view

HQ, HKV, D = 4, 2, 64


def observations(n: int, seed: int, layers: int = 2) -> list[Observation]:
    g = torch.Generator().manual_seed(seed)
    return [Observation(torch.randn(HKV, n, D, generator=g), torch.randn(HKV, n, D, generator=g),
                        torch.randn(HQ, n, D, generator=g) * torch.linspace(0.2, 3.0, D)) for _ in range(layers)]


def test_after_mode_compresses_only_what_precedes_the_question_and_feeds_the_question():
    prompt = Prompt(before=torch.arange(100), after=torch.arange(100, 120))
    obs = observations(119, seed=0)  # one prefill of prompt.ids[:-1]
    seen, fed = view(obs, prompt, "after")
    assert all(o.keys.shape[1] == 100 and o.queries.shape[1] == 100 for o in seen)
    assert torch.equal(fed, prompt.after)  # the question's tokens are fed, never compressed
    assert torch.equal(seen[0].keys, obs[0].keys[:, :100])
    seen, fed = view(obs, prompt, "inside")
    assert all(o.keys.shape[1] == 119 for o in seen) and torch.equal(fed, prompt.ids[-1:])
    with pytest.raises(ValueError, match="mode 'later'"):
        view(obs, prompt, "later")


def sealed_bytes(obs: list[Observation], policy) -> list[list[bytes]]:
    """Every sealed block's tensors as bytes, per layer, in segment order."""
    cache = Compressor(policy, D).compress(obs, scope="segment")
    return [[b"".join(t.contiguous().view(torch.uint8).numpy().tobytes()
                      for t in (blk.header, *blk.k.tensors(), *blk.v.tensors()))
             for seg in layer.blocks for blk in seg] for layer in cache.layers]


HEADWISE = {"name": "hw", "strategy": {"name": "headwise", "heads": [[0.9, 0.1], [0.2, 0.6]], "dense": 1,
                                       "inner": {"name": "dynamic"}}}  # fmt: skip


@pytest.mark.parametrize("preset", ["mosaic", "snapkv", "uniform2d", HEADWISE], ids=["mosaic", "snapkv", "uniform2d", "headwise"])
def test_segment_scope_seals_a_prefix_the_same_whatever_follows(preset):
    policy = load_policy(preset, min_context=160, ratio=2).bind(D)
    prefix = observations(256, seed=1)
    other = observations(256, seed=2)
    # The same first 160 tokens, then two different continuations (two requests' suffixes).
    a = [Observation(p.keys, p.values, p.queries) for p in prefix]
    b = [Observation(torch.cat([p.keys[:, :160], o.keys[:, 160:]], 1), torch.cat([p.values[:, :160], o.values[:, 160:]], 1),
                     torch.cat([p.queries[:, :160], o.queries[:, 160:]], 1)) for p, o in zip(prefix, other)]
    short = [p.upto(160) for p in prefix]  # the prefix alone, before any suffix exists
    ka, kb, ks = sealed_bytes(a, policy), sealed_bytes(b, policy), sealed_bytes(short, policy)
    # Segments 0..4 end by token 160: the sink plus what the short span sealed.
    common = len(ks[0])
    assert common >= 2 * HKV
    for la, lb, ls in zip(ka, kb, ks):
        assert la[:common] == lb[:common] == ls
    # The continuations do differ where they start: the test can fail.
    assert ka[0][common:] != kb[0][common:]
