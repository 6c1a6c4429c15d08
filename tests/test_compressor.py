"""The compressor's batched steps against their one-block-at-a-time meaning: a part's
bad output fails by the part's name whichever layer it appears in (scores are checked
once per role over every layer), and blocks packed a format group at a time equal
``pack_block`` of each block with the tokens the selector chose."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from mosaickv.compressor import Compressor, PartFailure, compress_segment, segment_observations
from mosaickv.config import load_policy
from mosaickv.formats import pack_block, unpack_block
from mosaickv.parts import ElementScorer, TokenSelector

LAYERS, HKV, D = 3, 2, 64


@dataclass
class Spoiled(ElementScorer):
    """Energy scores, spoiled in one element of the last layer seen (``how``)."""

    how: str = "nan"
    calls: int = 0

    def score(self, obs, side):
        self.calls += 1
        x = (obs.keys if side == "k" else obs.values).float().pow(2)
        if self.calls == LAYERS:  # the last layer only
            x[0, 0, 0] = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "negative": -1.0,
                          "nan_and_negative": -1.0}[self.how]
            if self.how == "nan_and_negative":
                x[0, 0, 1] = float("nan")
        return x if self.how != "shape" else x[:, :, :1]


@pytest.mark.parametrize("how, message", [("nan", "NaN or infinite"), ("inf", "NaN or infinite"), ("-inf", "NaN or infinite"),
                                          ("nan_and_negative", "NaN or infinite"), ("negative", "negative scores"),
                                          ("shape", "expected a tensor of shape")])
def test_a_spoiled_layer_fails_the_part_by_name(how, message):
    policy = replace(load_policy("mosaic"), value_scorer=Spoiled(how))
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(LAYERS, HKV, 32, D, generator=g).bfloat16() for _ in range(2))
    budget = int(LAYERS * HKV * (32 * 2 * D * 2 / 3 + 16))
    with pytest.raises(PartFailure, match=message) as err:
        compress_segment(policy, k, v, budget, torch.rand(LAYERS, HKV, D, generator=g) + 0.1,
                         torch.softmax(torch.randn(LAYERS, HKV, 32, generator=g), -1))
    assert err.value.role == "value_scorer"


@dataclass
class Stray(TokenSelector):
    """Top-m tokens, with one block of the kept counts it is called for spoiled (``how``)."""

    how: str = "outside"
    spoil_call: int = 1
    calls: int = 0

    def select_many(self, scores, m):
        self.calls += 1
        picked = scores.float().topk(m).indices.sort(dim=-1).values
        if self.calls == self.spoil_call and m > 1:
            picked[-1, -1] = 32 if self.how == "outside" else picked[-1, 0]
        return picked


@pytest.mark.parametrize("how", ["outside", "repeated"])
def test_a_token_selector_out_of_range_or_repeating_fails_by_name(how):
    """Its picks for every kept count are checked at once, whichever count went wrong."""
    g = torch.Generator().manual_seed(1)
    k, v = (torch.randn(LAYERS, HKV, 32, D, generator=g).bfloat16() for _ in range(2))
    stats, attn = torch.rand(LAYERS, HKV, D, generator=g) + 0.1, torch.softmax(torch.randn(LAYERS, HKV, 32, generator=g), -1)
    budget = int(LAYERS * HKV * (32 * 2 * D * 2 / 3 + 16))
    clean = Compressor(replace(load_policy("mosaic", ratio=3.0), token_selector=Stray(spoil_call=0)), D)
    plan = clean.plan_segments(segment_observations(clean.policy, k, v, stats, attn), 0, 1, budget)
    counts = sorted({f.tokens for f in plan.formats} - {0, 32})
    assert len(counts) >= 2, counts  # more than one count: the spoiled call need not be the first
    for call in (1, len(counts)):
        selector = Stray(how, spoil_call=call)
        compressor = Compressor(replace(clean.policy, token_selector=selector), D)
        with pytest.raises(PartFailure, match="outside \\[0, 32\\) or repeated") as err:
            compressor.kept_tokens(plan)
        assert err.value.role == "token_selector" and selector.calls == len(counts)


@pytest.mark.parametrize("name, ratio", [("mosaic", 3.0), ("mosaic", 8.0), ("think", None), ("uniform2d", None),
                                         ("snapkv", None), ("lossless", None)])
def test_blocks_packed_by_format_group_equal_pack_block_of_each(name, ratio):
    policy = load_policy(name, ratio=ratio)
    g = torch.Generator().manual_seed(len(name))
    k = (torch.randn(LAYERS, HKV, 32, D, generator=g) * torch.linspace(0.2, 3.0, D)).bfloat16()
    v = torch.randn(LAYERS, HKV, 32, D, generator=g).bfloat16()
    stats, attn = torch.rand(LAYERS, HKV, D, generator=g) + 0.1, torch.softmax(torch.randn(LAYERS, HKV, 32, generator=g), -1)
    budget = int(LAYERS * HKV * (32 * 2 * D * 2 / float(ratio or policy.ratio) + 16))
    compressor = Compressor(policy, D)
    obs = segment_observations(compressor.policy, k, v, stats, attn)
    plan = compressor.plan_segments(obs, 0, 1, budget)
    blocks = [b for layer in compressor.compress_segments(obs, 0, 1, budget) for b in layer[0]]
    assert len({b.fmt for b in blocks}) >= 1 and len(blocks) == LAYERS * HKV
    for i, (block, fmt) in enumerate(zip(blocks, plan.formats)):
        chosen = (torch.arange(fmt.tokens) if fmt.tokens in (0, 32) else
                  compressor.policy.token_selector.select(plan.keep[i], fmt.tokens))  # the selector, one block
        one = pack_block(plan.keys[i], plan.values[i], fmt, kept=chosen, k_score=plan.k_score[i],
                         v_score=plan.v_score[i])
        assert block.fmt == fmt and torch.equal(block.kept, one.kept)
        for got, want in zip(unpack_block(block), unpack_block(one)):
            if "lowrank" in (fmt.k.kind, fmt.v.kind):
                torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
            else:
                assert torch.equal(got, want)


@pytest.mark.parametrize("shape", [(256, 32, 128), (5, 16, 64), (3, 64, 32), (2, 1, 64)])
def test_squared_singular_values_equal_svdvals_squared(shape):
    from mosaickv.compressor import squared_singular_values

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1])) * torch.linspace(0.1, 3, shape[-1])
    got, want = squared_singular_values(x), torch.linalg.svdvals(x).pow(2)
    assert got.shape == want.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, want, atol=1e-5 * float(want.max()), rtol=1e-4)
    assert bool((got[..., :-1] >= got[..., 1:]).all())  # descending, as svdvals


@dataclass
class BothRoles:
    """A strategy pricing every candidate side for keys and values alike (the default)."""

    inner: object

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def side_candidates(self, d, channels):
        sides = self.inner.candidates(d, channels)
        return sides, sides


@pytest.mark.parametrize("value_widths", [[], None])
def test_each_role_is_priced_on_its_own_sides_and_plans_as_before(value_widths):
    """mosaic's values are dense or low rank: their statistics hold no channel widths (no
    per-vector sort of the values), and the plan equals the one priced on every side."""
    policy = replace(load_policy("mosaic"), strategy=replace(load_policy("mosaic").strategy, value_widths=value_widths))
    g = torch.Generator().manual_seed(7)
    k = (torch.randn(LAYERS, HKV, 32, D, generator=g) * torch.linspace(0.2, 3.0, D)).bfloat16()
    v = torch.randn(LAYERS, HKV, 32, D, generator=g).bfloat16()
    stats, attn = torch.rand(LAYERS, HKV, D, generator=g) + 0.1, torch.softmax(torch.randn(LAYERS, HKV, 32, generator=g), -1)
    budget = int(LAYERS * HKV * (32 * 2 * D * 2 / 3 + 16))
    plans = {}
    for name, strategy in (("own", policy.strategy), ("both", BothRoles(policy.strategy))):
        compressor = Compressor(replace(policy, strategy=strategy), D)
        plan = compressor.plan_segments(segment_observations(compressor.policy, k, v, stats, attn), 0, 1, budget)
        # The plan's keep order is the token shares _stats derives from the token scores.
        observed, _ = compressor._stats(plan.keys.float(), plan.values.float(), plan.keep, plan.k_score, plan.v_score, 1)
        plans[name] = (list(plan.formats), observed)
    own, both = plans["own"][1], plans["both"][1]
    value_kinds = {side.kind for side in own.v_lost}
    assert value_kinds == ({"dense", "lowrank"} if value_widths == [] else {"dense", "lowrank", "sparse"})
    assert set(own.k_lost) == set(both.k_lost) and set(own.v_lost) <= set(both.v_lost)
    for side in own.v_lost:
        assert torch.equal(own.v_lost[side], both.v_lost[side])
    assert plans["own"][0] == plans["both"][0]
