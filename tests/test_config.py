"""Policies load from presets, YAML, JSON and dicts; every bad field is refused by name."""

import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mosaickv.config import load_policy, preset_names
from mosaickv.errors import PolicyError

PRESETS = ["keynorm", "lossless", "mosaic", "mosaic_heads", "mosaic_heads_fp8", "snapkv", "streaming", "think", "uniform2d"]


def test_every_preset_ships_and_loads():
    assert preset_names() == PRESETS
    for name in PRESETS:
        policy = load_policy(name).bind(64).bind(128)
        assert policy.name == name


def test_yaml_json_and_dict_declare_the_same_policy(tmp_path):
    spec = {"name": "mine", "ratio": 4, "token_scorer": {"name": "observed_attention", "window": 16}, "strategy": {"name": "dynamic", "widths": [8, 0.5]}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "p.json").write_text(json.dumps(spec))
    loaded = [load_policy(spec), load_policy(tmp_path / "p.yaml"), load_policy(str(tmp_path / "p.json"))]
    for policy in loaded:
        assert (policy.name, policy.ratio, policy.token_scorer.window, policy.strategy.widths) == ("mine", 4, 16, [8, 0.5])


def refused(source, field, **kw):
    with pytest.raises(PolicyError) as info:
        policy = load_policy(source, **kw)
        policy.bind(kw.pop("head_dim", 64))
    assert info.value.field == field, str(info.value)
    assert f"'{field}'" in str(info.value)
    return str(info.value)


def test_unknown_part_is_refused_with_the_known_ones():
    msg = refused({"token_scorer": "telepathy"}, "token_scorer.name")
    assert "key_norm" in msg and "telepathy" in msg


def test_part_of_the_wrong_kind_is_refused():
    refused({"token_scorer": "magnitude"}, "token_scorer.name")  # an element scorer


@pytest.mark.parametrize("ratio", [0.5, 0, -2, 100, "three", True])
def test_bad_ratio_is_refused(ratio):
    msg = refused({"ratio": ratio}, "ratio")
    assert "from 1" in msg


def test_width_that_does_not_divide_the_head_dim_is_refused():
    msg = refused({"strategy": {"name": "dynamic", "widths": [24]}}, "strategy.widths")
    assert "divides head dim 64" in msg
    refused({"strategy": {"name": "dynamic", "ranks": [0.3]}}, "strategy.ranks")
    refused({"ratio": 1.2, "strategy": {"name": "fixed", "k": "channels:48"}}, "strategy.k")


def test_budget_below_the_protected_regions_is_refused():
    msg = refused({"ratio": 8, "sinks": 64, "window": 128, "min_context": 1024}, "ratio")
    assert "protected" in msg and "min_context" in msg


def test_nothing_protected_is_allowed():
    """No sinks and no window: no protected region to check against the budget (this
    divided by zero while building the refusal it did not need)."""
    policy = load_policy({"sinks": 0, "window": 0, "ratio": 64})
    assert policy.protected_tokens == 0 and policy.ratio == 64


def test_fixed_format_that_cannot_reach_the_ratio_is_refused():
    refused("think", "ratio", ratio=3)
    refused("lossless", "ratio", ratio=2)


def test_malformed_files_are_refused(tmp_path):
    (tmp_path / "bad.yaml").write_text("ratio: [3\n  strategy: {")
    assert "well-formed" in refused(tmp_path / "bad.yaml", "policy")
    (tmp_path / "bad.json").write_text('{"ratio": 3,}')
    refused(tmp_path / "bad.json", "policy")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    refused(tmp_path / "list.yaml", "policy")
    refused(tmp_path / "missing.yaml", "policy")


def test_unknown_fields_and_parameters_are_refused():
    assert "policy fields" in refused({"ratoi": 3}, "ratoi")
    assert "parameter of observed_attention" in refused({"token_scorer": {"name": "observed_attention", "widow": 3}}, "token_scorer.widow")


def test_wrong_types_are_refused():
    refused({"segment_size": "big"}, "segment_size")
    refused({"token_scorer": {"name": "observed_attention", "window": "wide"}}, "token_scorer.window")
    refused({"strategy": {"name": "dynamic", "token_fractions": [0.5, "half"]}}, "strategy.token_fractions")
    refused({"strategy": {"name": "dynamic", "token_fractions": [1.5]}}, "strategy.token_fractions")
    refused({"token_scorer": {"window": 3}}, "token_scorer")


def test_overrides_replace_fields():
    assert load_policy("mosaic", ratio=6).ratio == 6


json_values = st.recursive(
    st.none() | st.booleans() | st.sampled_from([0, 1, 8, 32]) | st.integers(-5, 300) | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
fields = st.sampled_from(["name", "ratio", "segment_size", "sinks", "window", "min_context", "token_scorer", "key_scorer", "value_scorer", "token_selector", "channel_selector", "strategy", "bogus"])
parts = st.fixed_dictionaries({"name": st.sampled_from(["dynamic", "fixed", "key_norm", "topk", "per_vector", "x"])}, optional={"widths": json_values, "tokens": json_values, "k": json_values, "window": json_values, "ranks": json_values, "value_widths": json_values})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(fields, json_values | parts, max_size=6), st.sampled_from([64, 128, 96]))
def test_fuzzed_policies_load_or_raise_policy_error(spec, head_dim):
    try:
        load_policy(spec).bind(head_dim)
    except PolicyError as err:
        assert err.field and str(err).startswith("policy field")


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_fuzzed_yaml_text_loads_or_raises_policy_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "p.yaml"
    path.write_text(text)
    try:
        load_policy(path).bind(64)
    except PolicyError:
        pass


def test_a_policy_built_on_a_preset_changes_only_what_it_says(tmp_path):
    variant = tmp_path / "heads6.yaml"
    variant.write_text("base: mosaic_heads\nname: heads6\nratio: 6\n")
    got, preset = load_policy(variant), load_policy("mosaic_heads")
    assert (got.name, got.ratio) == ("heads6", 6)
    assert got.strategy == preset.strategy and got.token_scorer == preset.token_scorer
    assert (got.segment_size, got.sinks, got.window) == (preset.segment_size, preset.sinks, preset.window)


def test_a_variant_changes_fields_of_its_bases_part_and_replaces_a_part_it_renames():
    preset = load_policy("mosaic_heads")
    more = load_policy({"base": "mosaic_heads", "name": "heads14", "strategy": {"dense": 14}})
    assert more.strategy.dense == 14 and more.strategy.heads == preset.strategy.heads
    assert more.strategy.inner == preset.strategy.inner
    nested = load_policy({"base": "mosaic_heads", "strategy": {"inner": {"widths": [0.25]}}})
    assert nested.strategy.inner == {**preset.strategy.inner, "widths": [0.25]}
    fixed = load_policy({"base": "mosaic", "strategy": {"name": "fixed", "tokens": "auto"}})  # another part: no
    assert (fixed.strategy.tokens, fixed.strategy.k) == ("auto", "dense")  # dynamic's fields carried over
    floor = load_policy({"base": "mosaic", "token_scorer": {"floor": 0.5}})
    assert floor.token_scorer.floor == 0.5 and floor.token_scorer.window == load_policy("mosaic").token_scorer.window


def test_a_base_file_is_found_beside_its_variant_and_chains(tmp_path):
    (tmp_path / "a.yaml").write_text("base: snapkv\nname: a\nwindow: 64\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nname: b\nratio: 2\n")
    got = load_policy(tmp_path / "b.yaml")
    assert (got.name, got.ratio, got.window) == ("b", 2, 64)
    assert got.strategy == load_policy("snapkv").strategy


def test_a_cycle_of_bases_or_a_bad_base_is_refused_by_name(tmp_path):
    (tmp_path / "x.yaml").write_text("base: y.yaml\n")
    (tmp_path / "y.yaml").write_text("base: x.yaml\n")
    with pytest.raises(PolicyError, match="'base'.*cycle"):
        load_policy(tmp_path / "x.yaml")
    with pytest.raises(PolicyError, match="'base' = 3"):
        load_policy({"base": 3})
    with pytest.raises(PolicyError, match="'policy' = 'no_such_preset'"):
        load_policy({"base": "no_such_preset"})
