"""Strategies meet their byte budget; the dynamic one spends it where it removes the most error."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mosaickv.compressor import Compressor
from mosaickv.config import load_policy
from mosaickv.errors import PolicyError
from mosaickv.formats import BlockFormat
from mosaickv.parts import BlockStats, Observation, SegmentStrategy
from mosaickv.policies.strategies import knapsack


def observations(layers=2, hkv=2, group=3, t=640, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Keys with uneven channels and a few heavy tokens, as real keys have.
    scale = torch.rand(hkv, 1, d, generator=g) * 3
    out = []
    for _ in range(layers):
        k = torch.randn(hkv, t, d, generator=g) * scale
        k[:, :: 37] *= 0.2
        out.append(Observation(k, torch.randn(hkv, t, d, generator=g), torch.randn(hkv * group, t, d, generator=g)))
    return out


# Up to 7x: on this 640-token span the protected 64 tokens take a tenth of the bytes, so
# near 10x nothing is left even for the other blocks' headers (the policy check cannot
# know a span's headers; the compressor refuses such a ratio in one sentence). At 8x the
# other 72 blocks share 16,320 bytes and a kept block costs 1,232 or more: whole options
# can leave more than 1% unspent (ratio 8, seed 1, d 64 left 832 bytes, 8.08x, with no
# improving upgrade under 1,216 bytes), which the knapsack's fill cannot place. Forty
# random draws from 4x to 8x (the ratio drawn below 8) left at most 0.33%.
@settings(max_examples=12, deadline=None)
@given(ratio=st.floats(1.2, 7), seed=st.integers(0, 1000), d=st.sampled_from([64, 128]))
def test_dynamic_meets_the_budget_within_one_percent(ratio, seed, d):
    obs = observations(d=d, seed=seed)
    policy = load_policy("mosaic", ratio=ratio, min_context=640)
    cache = Compressor(policy, d).compress(obs)
    achieved = cache.dense_nbytes() / cache.nbytes()
    assert ratio <= achieved <= ratio * 1.01, achieved


def test_value_widths_empty_keeps_values_dense_or_low_rank():
    """``value_widths: []``: values never take per-vector channels (the decode kernel's
    slow tile), keys still may; the budget still holds; the kernel menu lists both."""
    obs = observations()
    policy = load_policy("mosaic", ratio=4, min_context=640)
    policy.strategy.value_widths = []
    policy.bind(64)
    cache = Compressor(policy, 64).compress(obs)
    fmts = [b.fmt for layer in cache.layers for seg in layer.blocks for b in seg]
    assert {f.v.kind for f in fmts if f.tokens} <= {"dense", "lowrank"}
    assert any(f.k.kind == "sparse" for f in fmts)
    assert 4 <= cache.dense_nbytes() / cache.nbytes() <= 4 * 1.01
    kinds = {s.kind for s in policy.strategy.candidates(64, policy.channel_selector)}
    assert {"dense", "sparse", "lowrank"} <= kinds


def test_fp8_is_offered_to_both_sides_and_kept_where_it_costs_least():
    """``fp8: true``: at 2x a block keeps all its tokens in fp8 for less error than any drop
    or reduction, so nearly all do (the protected sinks and window, dense, leave the rest a
    little under 2x), within the budget; without it, 2x costs every block tokens or channels.
    The kernel menu lists fp8 only when offered."""
    obs = observations(t=2560)
    plain, with_fp8 = (load_policy({"base": "mosaic", "strategy": {"fp8": fp8}}, ratio=2, min_context=640)
                       for fp8 in (False, True))
    fmts = {}
    for name, policy in (("plain", plain), ("fp8", with_fp8)):
        cache = Compressor(policy, 64).compress(obs)
        assert 2 <= cache.dense_nbytes() / cache.nbytes() <= 2 * 1.01
        fmts[name] = [b.fmt for layer in cache.layers for seg in layer.blocks[policy.sink_segments:] for b in seg]
    kept = [f for f in fmts["fp8"] if f.tokens]
    assert {(f.k.kind, f.v.kind) for f in kept} == {("fp8", "fp8")}
    assert sum(f.tokens == 32 for f in kept) >= 0.75 * len(fmts["fp8"])
    assert not any("fp8" in str(f) for f in fmts["plain"])
    assert all(f.tokens < 32 or f.k.kind != "dense" or f.v.kind != "dense" for f in fmts["plain"])
    for policy, offered in ((plain, False), (with_fp8, True)):
        keys, values = policy.strategy.side_candidates(64, policy.channel_selector)
        assert (any(s.kind == "fp8" for s in keys), any(s.kind == "fp8" for s in values)) == (offered, offered)


FIXED_FP8 = {"name": "fp8_only", "ratio": 1.0, "sinks": 0, "window": 0,
             "strategy": {"name": "fixed", "tokens": 1.0, "k": "fp8", "v": "fp8"}}


def test_fixed_sides_take_fp8_and_a_wrong_spec_names_what_is_allowed():
    cache = Compressor(load_policy(FIXED_FP8, min_context=512), 64).compress(observations())
    assert cache.dense_nbytes() / cache.nbytes() == pytest.approx(2.0, rel=0.02)
    with pytest.raises(PolicyError, match=r"strategy.k.*'dense', 'fp8', 'channels:W' or 'lowrank:W'"):
        load_policy({**FIXED_FP8, "strategy": {"name": "fixed", "k": "fp8:4"}})


def test_value_widths_are_checked():
    from mosaickv.errors import PolicyError

    with pytest.raises(PolicyError, match="value_widths"):
        load_policy({"strategy": {"name": "dynamic", "value_widths": [-1]}})


@pytest.mark.parametrize("preset,ratio", [("snapkv", 3), ("streaming", 6), ("uniform2d", 3), ("think", 1.5)])
def test_fixed_presets_meet_the_budget(preset, ratio):
    cache = Compressor(load_policy(preset, ratio=ratio, min_context=512), 64).compress(observations())
    achieved = cache.dense_nbytes() / cache.nbytes()
    assert ratio <= achieved <= ratio * 1.02, achieved


def test_knapsack_matches_brute_force_on_small_instances():
    g = torch.Generator().manual_seed(3)
    cost = [16.0, 40, 64, 100, 130]
    for _ in range(20):
        rows, options = 4, 5
        value = torch.rand(1, rows, options, generator=g, dtype=torch.float64)
        budget = float(torch.randint(100, 400, (1,), generator=g))
        choice = knapsack(value, cost, budget)[0]
        got = value[0].gather(1, choice[:, None]).sum().item()
        assert sum(cost[c] for c in choice.tolist()) <= budget
        best = max(
            sum(value[0, r, c].item() for r, c in enumerate(combo))
            for combo in itertools.product(range(options), repeat=rows)
            if sum(cost[c] for c in combo) <= budget
        )
        # Greedy on the convex hull is near-optimal; on 4 rows it may miss by one item.
        assert got >= best - value.max().item()


def bisected_price(value: torch.Tensor, cost: list[float], budget: float) -> torch.Tensor:
    """The Lagrangian choice by plain bisection on the price of a byte (60 halvings), per
    problem: what knapsack's many-way search must find before its upgrade passes."""
    price_of = torch.tensor(cost, dtype=value.dtype)
    pick = lambda price: (value - price[:, None, None] * price_of).argmax(dim=-1)  # noqa: E731
    dearer = [c - min(cost) for c in cost if c > min(cost)]
    lo = value.new_zeros(len(value))
    hi = ((value.amax(dim=(1, 2)) - value.amin(dim=(1, 2))) + 1.0) / max(min(dearer, default=1.0), 1.0)
    top = pick(hi)
    choice = torch.where((price_of[top].sum(-1) <= budget)[:, None], top, torch.full_like(top, cost.index(min(cost))))
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        trial = pick(mid)
        fits = price_of[trial].sum(-1) <= budget
        hi, lo = torch.where(fits, mid, hi), torch.where(fits, lo, mid)
        choice = torch.where(fits[:, None], trial, choice)
    free = pick(value.new_zeros(len(value)))
    return torch.where((price_of[free].sum(-1) <= budget)[:, None], free, choice)


@pytest.mark.parametrize("seed", range(40))
def test_knapsacks_many_way_price_search_finds_what_bisection_finds(seed):
    g = torch.Generator().manual_seed(40 + seed)
    groups, rows = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 300, (1,), generator=g))
    options = int(torch.randint(2, 9 if seed % 2 else 80, (1,), generator=g))  # a sealing call prices up to 72
    cost = sorted(set(float(c) for c in torch.randint(0, 200 if seed % 2 else 9000, (options,), generator=g)))
    value = -torch.rand(groups, rows, len(cost), generator=g, dtype=torch.float64).cumsum(-1).flip(-1)
    value *= 10 ** torch.randint(-3, 4, (groups, 1, 1), generator=g).double()  # each problem its own scale
    budget = float(rows * cost[0] + torch.randint(0, int(rows * (cost[-1] - cost[0])) + 1, (1,), generator=g))
    assert torch.equal(knapsack(value, cost, budget, fill_passes=0), bisected_price(value, cost, budget))


def test_knapsack_solves_each_problem_of_a_batch_as_alone():
    # Sealing many segments at once must not change any segment's plan.
    g = torch.Generator().manual_seed(4)
    cost = [0.0, 8.0, 20.0, 33.0, 64.0, 90.0]
    value = -torch.rand(9, 40, len(cost), generator=g, dtype=torch.float64).cumsum(-1).flip(-1)
    value[3] = 0.0  # a problem whose every option is free of loss: its cheapest plan is kept
    value[5, :, :] *= 1e6  # and one on another scale: each problem its own price
    budget = 40 * 30.0
    batched = knapsack(value, cost, budget)
    for i in range(len(value)):
        assert torch.equal(batched[i], knapsack(value[i:i + 1], cost, budget)[0]), i
        assert sum(cost[c] for c in batched[i].tolist()) <= budget


def test_knapsack_refuses_a_budget_below_the_cheapest_plan_and_plans_no_rows_as_none():
    with pytest.raises(PolicyError, match="budget"):
        knapsack(torch.zeros(2, 10, 3, dtype=torch.float64), [5.0, 9.0, 12.0], 49.0)
    assert knapsack(torch.zeros(3, 0, 3, dtype=torch.float64), [5.0, 9.0, 12.0], 0.0).shape == (3, 0)


def random_stats(blocks: int, n: int = 8, d: int = 64, seed: int = 0) -> BlockStats:
    g = torch.Generator().manual_seed(seed)
    policy = load_policy("mosaic")
    policy.strategy.bind(d)
    sides = policy.strategy.candidates(d, policy.channel_selector)
    lost = {side: torch.rand(blocks, n, generator=g) * (side.kind != "dense") for side in sides}
    return BlockStats(n, d, torch.rand(blocks, n, generator=g), torch.rand(blocks, n, generator=g), lost, dict(lost))


@pytest.mark.parametrize("preset", ["mosaic", "mosaic_heads"])
def test_planning_spans_together_gives_each_span_its_plan_alone(preset):
    # Interleaved spans (row b is span b % groups's), as seal_many folds segments.
    policy = load_policy(preset)
    strategy, channels = policy.strategy, policy.channel_selector
    strategy.bind(64)
    groups, per_span = 5, 30 * 3
    stats = random_stats(groups * per_span)
    budget = per_span * BlockFormat(8).nbytes(64) // 3
    together = strategy.plan_groups(stats, groups, budget, channels)
    for g in range(groups):
        rows = torch.arange(g, groups * per_span, groups)
        assert together[g::groups] == strategy.plan(stats.rows(rows), budget, channels), g
        assert sum(f.nbytes(64) for f in together[g::groups]) <= budget


def test_a_strategy_with_only_plan_is_planned_span_by_span_and_a_wrong_count_is_named():
    class FirstHalf(SegmentStrategy):  # a researcher's strategy: plan() alone
        def candidates(self, d, channels):
            return []

        def plan(self, stats, budget, channels):
            return [BlockFormat(stats.n if b < stats.weight.shape[0] // 2 else 0) for b in range(stats.weight.shape[0])]

    stats = random_stats(12)
    planned = FirstHalf().plan_groups(stats, 3, 10**9, None)
    assert [f.tokens for f in planned] == [8] * 6 + [0] * 6  # each span's first half (rows 0-1 of 4) keeps all

    class Short(FirstHalf):
        def plan(self, stats, budget, channels):
            return [BlockFormat(0)]

    with pytest.raises(PolicyError, match="strategy.*1 for 4 blocks"):
        Short().plan_groups(stats, 3, 10**9, None)


def test_dynamic_finds_the_format_that_compresses_a_head_without_loss():
    obs = observations(layers=1, hkv=2)
    g = torch.Generator().manual_seed(1)
    # Head 1 holds rank-2 keys and values: a rank-8 basis stores them without error.
    obs[0].keys[1] = torch.randn(640, 2, generator=g) @ torch.randn(2, 64, generator=g)
    obs[0].values[1] = torch.randn(640, 2, generator=g) @ torch.randn(2, 64, generator=g)
    cache = Compressor(load_policy("mosaic", ratio=3, min_context=512), 64).compress(obs)
    sealed = cache.layers[0].blocks[1:]  # past the dense sink segment
    lossless = [seg[1].fmt.tokens == 32 and seg[1].fmt.k.kind == seg[1].fmt.v.kind == "lowrank" for seg in sealed]
    assert sum(lossless) >= 0.8 * len(sealed)  # a block the queries ignore may still be dropped
    assert not any(seg[0].fmt.k.kind == "lowrank" for seg in sealed)  # random keys gain nothing from it


def test_segment_scope_does_not_depend_on_what_follows():
    # A shared prefix must compress the same whatever suffix a request brings.
    a = observations(layers=2, t=768, seed=5)
    b = observations(layers=2, t=768, seed=6)
    cut = 512
    for x, y in zip(a, b):  # same first 512 tokens, different suffixes
        y.keys[:, :cut], y.values[:, :cut], y.queries[:, :cut] = x.keys[:, :cut], x.values[:, :cut], x.queries[:, :cut]
    comp = Compressor(load_policy("mosaic", ratio=4, min_context=320), 64)
    ca, cb = comp.compress(a, scope="segment"), comp.compress(b, scope="segment")
    sealed_in_prefix = cut // 32
    for la, lb in zip(ca.layers, cb.layers):
        for seg in range(sealed_in_prefix):
            for ba, bb in zip(la.blocks[seg], lb.blocks[seg]):
                assert ba.fmt == bb.fmt
                for sa, sb in ((ba.k, bb.k), (ba.v, bb.v)):
                    assert all(torch.equal(x, y) for x, y in zip(sa.tensors(), sb.tensors()))
        assert any(sa[0].fmt != sb[0].fmt or not torch.equal(sa[0].k.values, sb[0].k.values) for sa, sb in zip(la.blocks[sealed_in_prefix:], lb.blocks[sealed_in_prefix:]))


def test_short_spans_stay_dense():
    cache = Compressor(load_policy("mosaic"), 64).compress(observations(t=200))
    assert cache.formats() == {} and cache.nbytes() == cache.dense_nbytes()


@pytest.mark.parametrize("selector", ["per_vector", "global_mask"])
@pytest.mark.parametrize("shape", [(256, 32, 128), (7, 5, 64), (3, 0, 64)])
def test_lost_many_is_lost_at_every_width_to_the_bit(selector, shape):
    """The compressor prices every width with one lost_many call (per_vector: one sort serves
    every width); the strategy's choices must not move by a rounding."""
    from mosaickv.registry import SELECTORS, load_builtin_and_plugins

    load_builtin_and_plugins()
    part = SELECTORS.get(selector)()
    scores = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    widths = [8, 16, 32, shape[-1] // 2]
    many = part.lost_many(scores, widths)
    assert many.keys() == set(widths)
    for w in widths:
        assert torch.equal(many[w], part.lost(scores, w))
