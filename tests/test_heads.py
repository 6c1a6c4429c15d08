"""Retrieval-head profiles and the headwise strategy that keeps those heads whole."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mosaickv.compressor import Compressor
from mosaickv.config import load_policy
from mosaickv.errors import PolicyError
from mosaickv.formats import FP8, BlockFormat, dense_block_bytes
from mosaickv.heads import needle_mass, needle_span
from mosaickv.parts import Observation
from plan_bytes import bytes_per_head

D, S = 32, 32


def test_needle_span_is_the_shortest_run_holding_the_answer() -> None:
    pieces = ["The", " pass", " key", " is", " 71", "432", ".", " 71432"]
    assert needle_span(pieces, "71432") == [7]
    assert needle_span(pieces[:7], "71432") == [4, 5]
    with pytest.raises(ValueError, match="not found"):
        needle_span(pieces, "99999")


def test_needle_mass_finds_the_head_that_reads_the_needle() -> None:
    g = torch.Generator().manual_seed(0)
    layers, hkv, group, prompt, answer = 2, 2, 3, 40, 3
    t = prompt + answer
    needle = [17, 18]
    obs = []
    for layer in range(layers):
        keys = torch.randn(hkv, t, D, generator=g)
        queries = torch.randn(hkv * group, t, D, generator=g) * 0.1
        if layer == 1:  # query head 4 (KV head 1) looks straight at the needle while answering
            queries[4, prompt - 1 : t - 1] = 40 * keys[1, needle].mean(0)
        obs.append(Observation(keys, torch.randn(hkv, t, D, generator=g), queries))
    mass = needle_mass(obs, prompt, needle)
    assert mass.shape == (layers, hkv)
    assert mass[1, 1] > 0.9
    assert mass.flatten().argmax() == 3


def headwise(ratio: float = 3.0, dense: float = 1, heads=((0.9, 0.1), (0.2, 0.8), (0.0, 0.3)), min_context: int = 256):
    return load_policy({
        "name": "hw", "ratio": ratio, "min_context": min_context, "sinks": 1, "window": 32,
        "token_scorer": "key_norm",
        "strategy": {"name": "headwise", "heads": [list(r) for r in heads], "dense": dense,
                     "inner": {"name": "fixed", "tokens": "auto"}},
    })  # fmt: skip


def observations(layers: int, hkv: int = 2, t: int = 512) -> list[Observation]:
    g = torch.Generator().manual_seed(layers)
    return [Observation(torch.randn(hkv, t, D, generator=g), torch.randn(hkv, t, D, generator=g),
                        torch.randn(2 * hkv, t, D, generator=g)) for _ in range(layers)]


@pytest.mark.parametrize("scope", ["segment", "group"])
def test_protected_heads_keep_every_token_dense_and_the_budget_holds(scope: str) -> None:
    policy = headwise()
    cache = Compressor(policy, D).compress(observations(3), scope=scope)
    protected = {(0, 0)}  # the highest score of the profile
    planned = [seg for layer in cache.layers for seg in layer.blocks[policy.sink_segments:]]
    spent = sum(block.nbytes() for seg in planned for block in seg)
    assert spent <= len(planned) * len(planned[0]) * dense_block_bytes(S, D) / 3.0
    for layer, compressed in enumerate(cache.layers):
        for segment in compressed.blocks[policy.sink_segments:]:
            for head, block in enumerate(segment):
                whole = block.fmt == BlockFormat(S)
                assert whole == ((layer, head) in protected), (layer, head, block.fmt)


PROFILE = ((0.9, 0.1, 0.5, 0.05), (0.2, 0.8, 0.01, 0.3), (0.0, 0.6, 0.4, 0.02))  # 12 heads, 3 layers of 4


@pytest.mark.parametrize("ratio, count", [(2.0, 3), (3.0, 2), (4.0, 1), (6.0, 1), (13.0, 0)])
def test_dense_share_keeps_as_many_top_heads_as_its_share_of_the_budget_buys(ratio: float, count: int) -> None:
    """Half the budget a segment on whole heads: 12 heads at 3x are 4 heads' bytes, so 2."""
    policy = headwise(ratio=ratio, dense=0.5, heads=PROFILE, min_context=1024)
    assert policy.strategy.whole_heads(ratio) == count
    cache = Compressor(policy, D).compress(observations(3, hkv=4, t=1024), scope="segment")
    top = torch.tensor(PROFILE).flatten().argsort(descending=True)[:count].tolist()
    protected = {(i // 4, i % 4) for i in top}
    planned = [seg for layer in cache.layers for seg in layer.blocks[policy.sink_segments:]]
    spent = sum(block.nbytes() for seg in planned for block in seg)
    assert spent <= len(planned) * len(planned[0]) * dense_block_bytes(S, D) / ratio
    for layer, compressed in enumerate(cache.layers):
        for segment in compressed.blocks[policy.sink_segments:]:
            whole = {(layer, head) for head, block in enumerate(segment) if block.fmt == BlockFormat(S)}
            assert whole & {(layer, h) for h in range(4)} == {p for p in protected if p[0] == layer}


@pytest.mark.parametrize("ratio, count", [(3.0, 4), (6.0, 2)])
def test_fp8_whole_heads_are_twice_as_many_for_the_same_share(ratio: float, count: int) -> None:
    """``whole: fp8``: a whole head costs half, so half the budget keeps twice the heads of
    the dense test above whole, every token in e4m3, within the budget."""
    policy = load_policy({**headwise(ratio=ratio, dense=0.5, heads=PROFILE, min_context=1024).source,
                          "strategy": {**headwise(heads=PROFILE).source["strategy"], "dense": 0.5, "whole": "fp8"}})
    assert policy.strategy.whole_heads(ratio) == count == 2 * headwise(ratio=ratio, dense=0.5, heads=PROFILE,
                                                                       min_context=1024).strategy.whole_heads(ratio)
    spent, budget = bytes_per_head(policy, observations(3, hkv=4, t=1024), D)
    assert spent.sum() <= budget
    cache = Compressor(policy, D).compress(observations(3, hkv=4, t=1024), scope="segment")
    top = torch.tensor(PROFILE).flatten().argsort(descending=True)[:count].tolist()
    for layer, compressed in enumerate(cache.layers):
        for segment in compressed.blocks[policy.sink_segments:]:
            whole = {head for head, block in enumerate(segment) if block.fmt == BlockFormat(S, FP8, FP8)}
            assert whole == {i % 4 for i in top if i // 4 == layer}


def test_whole_heads_are_dense_or_fp8() -> None:
    with pytest.raises(PolicyError, match="strategy.whole.*one of dense, fp8"):
        load_policy({**headwise().source, "strategy": {**headwise().source["strategy"], "whole": "sparse"}})


@pytest.mark.parametrize("dense", [12, 2.5, 1.5, -1, -0.1])
def test_whole_heads_are_a_count_below_the_heads_or_a_share_below_one(dense: float) -> None:
    with pytest.raises(PolicyError, match="strategy.dense.*a head count from 0 to 11, or a fraction below 1"):
        headwise(heads=PROFILE, dense=dense)


def test_ratio_the_dense_heads_alone_exceed_is_refused() -> None:
    with pytest.raises(PolicyError, match="ratio"):
        headwise(ratio=3.0, dense=2)  # 2 of 6 heads dense is a third of the bytes: the whole budget


def test_profile_of_another_model_is_refused_by_name() -> None:
    policy = headwise()
    with pytest.raises(PolicyError, match="heads"):
        Compressor(policy, D).compress(observations(4), scope="segment")


@pytest.mark.parametrize("bad", [[], [[0.1, 0.2], [0.3]]])
def test_malformed_profile_is_refused(bad) -> None:
    with pytest.raises(PolicyError, match="heads"):
        headwise(heads=bad)


@pytest.mark.parametrize("whole", ["dense", "fp8"])
def test_cli_measures_the_shipped_model_and_writes_a_policy_that_loads(whole: str, tmp_path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "heads.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "mosaickv.cli", "heads", "--samples", "1", "--tokens", "512", "--dense", "4", "--quiet",
         "--output", str(out), *(["--whole", whole] if whole != "dense" else [])], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    policy = load_policy(out, min_context=256)
    profile = torch.tensor(policy.strategy.heads)
    assert policy.strategy.dense == 4 and profile.shape == (30, 3)  # SmolLM2-135M: 30 layers, 3 KV heads
    assert profile.max() > 0.3  # some head pays the needle a large share while the answer is produced
    assert policy.strategy.whole == whole
    assert policy.strategy.inner.get("fp8", False) == (whole == "fp8")  # as mosaic_heads_fp8, or as mosaic_heads
    kept = "kept whole.\n" if whole == "dense" else "kept whole in fp8.\n"
    assert out.read_text().startswith("# mosaic with the 4 KV heads") and kept in out.read_text().splitlines(True)[0]


def graded_headwise(graded: float | None, ratio: float = 6.0):
    strategy = {"name": "headwise", "heads": [list(r) for r in PROFILE], "dense": 1,
                "inner": {"name": "dynamic", "token_fractions": [1.0, 0.5, 0.25], "widths": [0.25, 0.5], "ranks": []}}
    if graded is not None:
        strategy["graded"] = graded
    return load_policy({"name": "hw_graded", "ratio": ratio, "min_context": 1024, "sinks": 1, "window": 32,
                        "token_scorer": "key_norm", "strategy": strategy})


def same_heads(layers: int, hkv: int, t: int) -> list[Observation]:
    """Every KV head of a layer sees the same keys, values and queries: only the profile tells them apart."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(layers):
        k, v, q = (torch.randn(1, t, D, generator=g) for _ in range(3))
        out.append(Observation(k.expand(hkv, t, D).clone(), v.expand(hkv, t, D).clone(), q.expand(2 * hkv, t, D).clone()))
    return out


def test_graded_profile_spends_more_on_heads_it_saw_retrieve_within_the_budget() -> None:
    obs = same_heads(3, 4, 1024)
    (flat, budget), (graded, _) = bytes_per_head(graded_headwise(0.0), obs, D), bytes_per_head(graded_headwise(8.0), obs, D)
    assert graded.sum() <= budget and flat.sum() <= budget
    scores = torch.tensor(PROFILE)
    whole = int(scores.flatten().argmax())
    assert graded.flatten()[whole] == flat.flatten()[whole]  # the whole head is the same either way
    rest = [i for i in range(scores.numel()) if i != whole]
    order = sorted(rest, key=lambda i: -float(scores.flatten()[i]))
    top, bottom = order[: len(order) // 2], order[len(order) // 2 :]
    gain = graded.flatten() - flat.flatten()
    assert gain[top].sum() > 0 > gain[bottom].sum()
    # Within a layer the heads are identical but for the profile: more score, never fewer bytes.
    for layer in range(3):
        heads = sorted((h for h in range(4) if layer * 4 + h != whole), key=lambda h: float(scores[layer, h]))
        spent = [float(graded[layer, h]) for h in heads]
        assert spent == sorted(spent), (layer, heads, spent)


def test_graded_zero_plans_as_without_it_and_negative_is_refused() -> None:
    obs = observations(3, hkv=4, t=1024)
    assert torch.equal(bytes_per_head(graded_headwise(None), obs, D)[0], bytes_per_head(graded_headwise(0.0), obs, D)[0])
    with pytest.raises(PolicyError, match="strategy.graded.*>= 0"):
        graded_headwise(-1.0)
