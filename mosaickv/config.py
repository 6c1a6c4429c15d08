"""Policies declared in YAML, JSON or a dict, validated when loaded.

A policy names one part per role and sets the budget::

    name: my-policy
    ratio: 3            # how many times fewer bytes than dense bf16
    segment_size: 32    # tokens per segment (the unit a format is chosen for)
    sinks: 4            # first tokens kept dense (rounded up to whole segments)
    window: 32          # last tokens kept dense (the tail that is still filling)
    token_scorer: key_norm
    key_scorer: {name: query_weighted}
    strategy: {name: dynamic, widths: [0.25, 0.5]}

Every error is a :class:`PolicyError` that names the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Mapping

import yaml

from mosaickv.errors import PolicyError, check
from mosaickv.parts import ChannelSelector, ElementScorer, SegmentStrategy, TokenScorer, TokenSelector
from mosaickv.registry import SCORERS, SELECTORS, STRATEGIES, Registry


# role -> (registry, base class the part must derive from)
ROLES: dict[str, tuple[Registry, type]] = {
    "token_scorer": (SCORERS, TokenScorer),
    "key_scorer": (SCORERS, ElementScorer),
    "value_scorer": (SCORERS, ElementScorer),
    "token_selector": (SELECTORS, TokenSelector),
    "channel_selector": (SELECTORS, ChannelSelector),
    "strategy": (STRATEGIES, SegmentStrategy),
}
DEFAULT_PARTS = {
    "token_scorer": "key_norm",
    "key_scorer": "query_weighted",
    "value_scorer": "magnitude",
    "token_selector": "topk",
    "channel_selector": "per_vector",
    "strategy": "dynamic",
}


@dataclass
class Policy:
    """A validated policy: budget settings plus one instantiated part per role."""

    name: str
    ratio: float
    segment_size: int
    sinks: int
    window: int
    min_context: int
    token_scorer: TokenScorer
    key_scorer: ElementScorer
    value_scorer: ElementScorer
    token_selector: TokenSelector
    channel_selector: ChannelSelector
    strategy: SegmentStrategy
    source: dict = field(default_factory=dict, repr=False)

    @property
    def sink_segments(self) -> int:
        return math.ceil(self.sinks / self.segment_size)

    @property
    def protected_tokens(self) -> int:
        """Tokens kept dense whatever the budget: sink segments plus the recent window."""
        return self.sink_segments * self.segment_size + self.window

    def bind(self, head_dim: int) -> "Policy":
        """Check the parts against a model's head dim (widths must divide it)."""
        check(head_dim % 2 == 0 and 0 < head_dim <= 256, "head_dim", head_dim, "an even head dim up to 256")
        for role in ROLES:
            part = getattr(self, role)
            if hasattr(part, "bind"):
                try:
                    part.bind(head_dim)
                except PolicyError as err:
                    raise err.within(role) from None
        return self

    def check_sealable(self) -> None:
        """Refuse a token scorer that reads queries where segments are sealed one at a
        time (a server, the evaluator's segment scope): only their statistics are kept."""
        scorer = self.token_scorer
        name = getattr(scorer, "registered_name", type(scorer).__name__)
        check(not scorer.reads_queries, "token_scorer", name,
              "a scorer that needs no kept queries where segments are sealed one at a time "
              "(observed_attention, key_norm, recency); this one compresses whole spans offline only")

    def to_dict(self) -> dict:
        return dict(self.source)


def _preset_dir() -> Path:
    return Path(str(files("mosaickv.policies") / "presets"))


def _preset_path(name: str) -> Path | None:
    path = _preset_dir() / f"{name}.yaml"
    return path if name and "/" not in name and path.is_file() else None


def preset_names() -> list[str]:
    return sorted(p.stem for p in _preset_dir().glob("*.yaml"))


MAX_BASE_DEPTH = 8  # policies built on policies: deeper than this is a cycle or a mistake


def read_policy_source(source: str | os.PathLike | Mapping[str, Any], _depth: int = 0) -> dict:
    """A policy's fields as written (preset name, file or mapping), before validation.

    A ``base`` field names a preset or file whose fields this one starts from, so that a
    variant says only what it changes (``{base: mosaic_heads, ratio: 6}``). A part given
    as a mapping changes only the fields it names while it keeps its base's part
    (``{base: mosaic_heads, strategy: {dense: 14}}``); naming another part replaces it."""
    data = _read_one(source)
    if "base" not in data:
        return data
    base = data.pop("base")
    check(isinstance(base, str), "base", base, "a preset name or a policy file's path")
    check(_depth < MAX_BASE_DEPTH, "base", base, f"a chain of at most {MAX_BASE_DEPTH} bases (is it a cycle?)")
    if not isinstance(source, Mapping) and _preset_path(base) is None and not Path(base).is_absolute():
        base = str(Path(str(source)).parent / base)  # a file's base is found beside it
    return _overlay(read_policy_source(base, _depth + 1), data)


def _overlay(base: dict, changes: Mapping[str, Any]) -> dict:
    """``base`` with ``changes``: a mapping over a mapping of the same part (its ``name``
    unchanged or not given) changes that part's fields; anything else replaces."""
    out = dict(base)
    for key, value in changes.items():
        old = out.get(key)
        same_part = isinstance(old, Mapping) and isinstance(value, Mapping) and value.get("name", old.get("name")) == old.get("name")
        out[key] = _overlay(dict(old), value) if same_part else value
    return out


def _read_one(source: str | os.PathLike | Mapping[str, Any]) -> dict:
    if isinstance(source, Mapping):
        return dict(source)
    text_source = str(source)
    preset = _preset_path(text_source)
    if preset is not None:
        path = preset
    else:
        path = Path(text_source)
        if not path.is_file():
            raise PolicyError(
                "policy", text_source, f"a preset name ({', '.join(preset_names())}) or a .yaml/.yml/.json file that exists"
            )
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PolicyError("policy", str(path), f"well-formed {path.suffix.lstrip('.') or 'YAML'} ({reason})") from None
    check(isinstance(data, dict), "policy", data, "a mapping of fields at the top level")
    data.setdefault("name", path.stem)
    return data


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if origin in (list, tuple):
        args = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value) if args else True
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def build_part(role: str, spec: Any) -> Any:
    """Instantiate the part a policy names for ``role`` (a name or ``{name: ..., params}``)."""
    registry, base = ROLES[role]
    if isinstance(spec, str):
        spec = {"name": spec}
    check(isinstance(spec, Mapping) and isinstance(spec.get("name"), str), role, spec, "a part name or a mapping with 'name'")
    params = {k: v for k, v in spec.items() if k != "name"}
    cls = registry.get(spec["name"])
    fitting = [n for n in registry.names() if issubclass(registry.get(n), base)]
    check(cls is not None and issubclass(cls, base), f"{role}.name", spec["name"], f"one of {fitting}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init} if dataclasses.is_dataclass(cls) else {}
    for key, value in params.items():
        check(key in fields, f"{role}.{key}", value, f"a parameter of {spec['name']} ({', '.join(fields) or 'none'})")
        hint = hints.get(key, Any)
        check(_type_ok(value, hint), f"{role}.{key}", value, f"a value of type {_hint_name(hint)}")
    try:
        return cls(**params)
    except PolicyError as err:
        raise err.within(role) from None


def load_policy(source: str | os.PathLike | Mapping[str, Any] = "mosaic", **overrides: Any) -> Policy:
    """Load a preset name, a YAML/JSON file or a dict; ``overrides`` replace top-level fields."""
    data = read_policy_source(source)
    data.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(Policy) if f.name != "source"}
    for key in data:
        check(key in known, key, data[key], f"one of the policy fields {sorted(known)}")
    values = {
        "name": data.get("name", "policy"),
        "ratio": data.get("ratio", 3.0),
        "segment_size": data.get("segment_size", 32),
        "sinks": data.get("sinks", 4),
        "window": data.get("window", 32),
        "min_context": data.get("min_context", 1024),
    }
    check(isinstance(values["name"], str), "name", values["name"], "a string")
    ratio = values["ratio"]
    check(_type_ok(ratio, float) and 1.0 <= ratio <= 64.0, "ratio", ratio, "a number from 1 (dense) to 64")
    for key, low in (("segment_size", 8), ("sinks", 0), ("window", 0), ("min_context", 1)):
        check(_type_ok(values[key], int) and values[key] >= low, key, values[key], f"an integer >= {low}")
    check(values["segment_size"] <= 256, "segment_size", values["segment_size"], "at most 256 tokens")
    parts = {role: build_part(role, data.get(role, DEFAULT_PARTS[role])) for role in ROLES}
    policy = Policy(**values, **parts, source=data)
    if policy.protected_tokens * ratio >= policy.min_context:  # (never with nothing protected)
        raise PolicyError(
            "ratio",
            ratio,
            f"below {policy.min_context / policy.protected_tokens:.2f}: the protected {policy.protected_tokens} tokens "
            f"(sinks {policy.sinks} rounded up to segments of {policy.segment_size}, window {policy.window}) alone use "
            f"the whole budget of a {policy.min_context}-token context (min_context); lower the ratio, the sinks or "
            "the window, or raise min_context",
        )
    if hasattr(policy.strategy, "check_ratio"):
        policy.strategy.check_ratio(ratio)
    return policy
