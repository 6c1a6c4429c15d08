"""Sealing in one packer launch (``PackedSealer``) against the host path it replaces
on the GPU (``seal_segment`` over ``compress_segment``): the same region, byte for byte
but the low-rank coefficients (bf16 rounding of a different product order). Triton's
interpreter on the CPU; the ``cuda`` cases run on the device."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

if not torch.cuda.is_available():  # must precede the first import of the kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mosaickv.compressor import PartFailure  # noqa: E402
from mosaickv.config import load_policy  # noqa: E402
from mosaickv.formats import SIDE_KINDS, unpack_block  # noqa: E402
from mosaickv.kernels.layout import LOWRANK, Region, read_block  # noqa: E402
from mosaickv.packed_sealing import PackedSealer  # noqa: E402
from mosaickv.parts import ElementScorer, TokenSelector  # noqa: E402
from mosaickv.sealer import PolicyCompressor, SegmentInputs, seal_segment  # noqa: E402

POLICIES = ["mosaic", "snapkv", "think", "uniform2d", "keynorm", "streaming", "lossless"]
BASE = 4096  # a slab's start in the arena (bytes, 16-aligned)
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                   reason="needs CUDA")])]


def inputs(policy, layers: int, hkv: int, d: int, seed: int, device: str, ratio: float | None = None) -> SegmentInputs:
    g = torch.Generator().manual_seed(seed)
    s = policy.segment_size
    k, v = (distinct_magnitudes(g, (layers, hkv, s, d)) for _ in range(2))
    stats = torch.rand(layers, hkv, d, generator=g) + 0.1
    attn = torch.softmax(3 * torch.randn(layers, hkv, s, generator=g), -1)
    budget = int(layers * hkv * (s * 2 * d * 2 / float(ratio or policy.ratio) + 16))
    return SegmentInputs(k.bfloat16().to(device), v.bfloat16().to(device), budget, stats.to(device), attn.to(device), BASE)


def distinct_magnitudes(g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Random signs and a random order of magnitudes distinct even in bf16, per vector: the
    kernel breaks ties in channel scores towards the lower channel and ``torch.topk`` in no
    set order, so tied channels would differ for no fault (tests/test_kernels_pack.py
    checks the tie rule itself)."""
    d = shape[-1]
    # Magnitudes 4.5% apart (bf16 keeps 0.8%), most of a vector's energy in a few channels;
    # vectors prefer the same channels, as real keys do, so every reduced kind pays somewhere.
    order = (torch.rand(*shape, generator=g) + torch.linspace(0, 1, d)).argsort(-1).argsort(-1)
    sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
    return torch.logspace(-1.5, 0.6, d)[order] * sign


def blocks_of(region: Region, d: int):
    """The region's blocks, read back through its absolute table as the arena would."""
    buf = torch.zeros(region.base_bytes + region.data.numel() + 2, dtype=torch.uint8)
    buf[region.base_bytes : region.base_bytes + region.data.numel()] = region.data.cpu()
    buf = buf[: buf.numel() // 2 * 2]
    return [read_block(buf.view(torch.bfloat16), buf, row, d) for row in region.table]


def assert_same_region(got: Region, ref: Region, d: int) -> None:
    assert got.base_bytes == ref.base_bytes
    np.testing.assert_array_equal(got.table, ref.table)
    assert got.data.numel() == ref.data.numel()
    lowrank = np.isin(got.table[:, [1, 5]], [LOWRANK]).any(1) & (got.table[:, 0] > 0)
    if not lowrank.any():
        assert torch.equal(got.data.cpu(), ref.data.cpu())
    for row, a, b in zip(got.table, blocks_of(got, d), blocks_of(ref, d)):
        for x, y in zip(unpack_block(a), unpack_block(b)):
            if row[0] and LOWRANK in (row[1], row[5]):
                torch.testing.assert_close(x, y, atol=3e-2 * float(y.abs().max().clamp_min(1)), rtol=3e-2)
            else:
                assert torch.equal(x, y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("layers, hkv, d", [(2, 2, 64), (1, 3, 128)])
def test_one_launch_seals_what_the_per_block_path_seals(name, layers, hkv, d, device):
    policy = load_policy(name)
    x = inputs(policy, layers, hkv, d, seed=sum(map(ord, name)) + d, device=device)
    ref = seal_segment(PolicyCompressor(policy, d), x)
    got = PackedSealer(policy, d)(x)
    assert got.data.device.type == device
    assert_same_region(got, ref, d)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["mosaic", "think", "uniform2d", "mosaic_heads", "mosaic_heads_fp8"])
def test_segments_sealed_together_are_each_what_the_per_block_path_seals(name, device):
    """seal_many folds the segments into one span per layer: each still gets its own plan
    within its own slab budget, its own region at its own slab's start."""
    policy = load_policy(name)
    d = 64
    layers, hkv = (30, 3) if "heads" in str(name) else (2, 2)  # mosaic_heads: SmolLM2's heads
    batch = [replace(inputs(policy, layers, hkv, d, seed=seed, device=device), base_bytes=BASE * (seed + 1))
             for seed in range(3)]
    batch[1] = replace(batch[1], attention=None)  # a segment whose last queries' attention was not recorded
    sealer = PackedSealer(policy, d)
    try:
        refs = [seal_segment(PolicyCompressor(policy, d), x) for x in batch]
    except PartFailure:  # the policy needs what was not recorded: the batch fails as that segment would
        with pytest.raises(PartFailure):
            sealer.seal_many(batch)
        batch.pop(1)
        refs = [seal_segment(PolicyCompressor(policy, d), x) for x in batch]
    got = sealer.seal_many(batch)
    assert len(got) == len(batch)
    for region, x, ref in zip(got, batch, refs):
        assert region.base_bytes == x.base_bytes
        assert_same_region(region, ref, d)


def fixed(tokens, k: str, v: str) -> dict:
    return {"name": f"fixed-{tokens}-{k}-{v}", "ratio": 1.0, "segment_size": 32, "sinks": 0, "window": 0,
            "strategy": {"name": "fixed", "tokens": tokens, "k": k, "v": v}}


EVERY_KIND = [  # (policy, ratio): every stored kind, kept-token counts from none to all
    ("mosaic", 6.0),
    ("think", None),
    (fixed(0.5, "lowrank:0.25", "lowrank:0.125"), None),
    (fixed(0.75, "channels:0.25", "lowrank:0.5"), None),
    (fixed(0.0, "dense", "dense"), None),  # a segment with every token dropped
    (fixed(0.75, "fp8", "fp8"), None),
]


@pytest.mark.parametrize("device", DEVICES)
def test_every_format_and_dropped_blocks_go_through_the_launch(device):
    kinds, counts = set(), set()
    for source, ratio in EVERY_KIND:
        policy = load_policy(source, ratio=ratio)
        for seed in range(2):
            x = inputs(policy, 2, 2, 64, seed, device, ratio)
            got = PackedSealer(policy, 64)(x)
            assert_same_region(got, seal_segment(PolicyCompressor(policy, 64), x), 64)
            on = got.table[:, 0] > 0
            kinds |= {SIDE_KINDS[k] for k in np.concatenate([got.table[on, 1], got.table[on, 5]])}
            counts |= set(got.table[:, 0].tolist())
    assert kinds == set(SIDE_KINDS)
    assert 0 in counts and 32 in counts and len(counts) >= 4


@dataclass
class AbsoluteScorer(ElementScorer):
    """|x|: ranks channels as energy does, but is not (w x)^2."""

    def score(self, obs, side):
        return (obs.keys if side == "k" else obs.values).float().abs()


def test_a_scorer_the_packer_cannot_follow_fails_by_name():
    mosaic = load_policy("mosaic")  # with per-vector value channels: the form check is a sparse side's
    policy = replace(mosaic, value_scorer=AbsoluteScorer(), strategy=replace(mosaic.strategy, value_widths=None))
    x = inputs(policy, 2, 2, 64, seed=3, device="cpu")
    blocks = PolicyCompressor(policy, 64)(x.k, x.v, x.budget_bytes, x.query_stats, x.attention)
    assert any(b.v.fmt.kind == "sparse" for layer in blocks for b in layer)  # the case is reached
    with pytest.raises(PartFailure, match="value_scorer.*not \\(w_c \\* x_c\\)\\^2"):
        PackedSealer(policy, 64)(x)


@pytest.mark.parametrize("name", ["query_weighted", "magnitude"])
def test_a_scorer_that_declares_the_packers_form_has_it(name):
    # The sealer takes these at their word and skips the check: the check must pass on them.
    from mosaickv.packed_sealing import _misfit
    from mosaickv.formats import channel_weights
    from mosaickv.parts import Observation
    from mosaickv.registry import SCORERS

    scorer = SCORERS.get(name)()
    assert scorer.squared_form
    g = torch.Generator().manual_seed(11)
    x = distinct_magnitudes(g, (4, 32, 64)).bfloat16()
    obs = Observation(x, x, x.new_zeros(4, 0, 64), torch.rand(4, 64, generator=g) * 10 ** torch.linspace(-4, 0, 64))
    score = scorer.score(obs, "k").float()
    mask = torch.rand(4, 32, generator=g) < 0.6
    m = mask[..., None]
    w = channel_weights(x.float() * m, score * m)
    assert not _misfit(score, x.float(), w, mask)


def test_a_declared_form_is_not_checked_and_reads_nothing_back(monkeypatch):
    import mosaickv.packed_sealing as packed

    mosaic = load_policy("mosaic")  # per-vector value channels by magnitude: sparse values, declared
    policy = replace(mosaic, strategy=replace(mosaic.strategy, value_widths=None))
    monkeypatch.setattr(packed, "_misfit", lambda *a: pytest.fail("a declared form was checked"))
    x = inputs(policy, 2, 2, 64, seed=3, device="cpu")
    blocks = PolicyCompressor(policy, 64)(x.k, x.v, x.budget_bytes, x.query_stats, x.attention)
    assert any(b.v.fmt.kind == "sparse" for layer in blocks for b in layer)
    assert any(b.k.fmt.kind == "sparse" for layer in blocks for b in layer)
    assert_same_region(PackedSealer(policy, 64)(x), seal_segment(PolicyCompressor(policy, 64), x), 64)


@dataclass
class FirstTokens(TokenSelector):
    """Keeps the first m tokens, with no batched select_many of its own."""

    def select(self, scores, m):
        return torch.arange(m)


def test_a_selector_without_a_batched_select_is_called_row_by_row():
    policy = replace(load_policy("mosaic", ratio=6.0), token_selector=FirstTokens())
    x = inputs(policy, 2, 2, 64, seed=5, device="cpu", ratio=6.0)
    got = PackedSealer(policy, 64)(x)
    assert_same_region(got, seal_segment(PolicyCompressor(policy, 64), x), 64)
    kept = got.table[:, 0]
    assert ((kept > 0) & (kept < policy.segment_size)).any()  # some block kept a prefix only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["mosaic", "mosaic_heads"])
def test_on_a_gpu_the_knapsack_kernel_seals_what_the_knapsack_ops_seal(name, monkeypatch):
    """The server's sealing with the one-launch knapsack (the default on a GPU) against the
    PyTorch ops it replaced (MOSAICKV_KNAPSACK=ops), on a batch of SmolLM2-shaped segments."""
    policy, d = load_policy(name), 64
    batch = [replace(inputs(policy, 30, 3, d, seed=seed, device="cuda"), base_bytes=BASE * (seed + 1)) for seed in range(4)]
    got = PackedSealer(policy, d).seal_many(batch)
    monkeypatch.setenv("MOSAICKV_KNAPSACK", "ops")
    for region, ref in zip(got, PackedSealer(policy, d).seal_many(batch)):
        assert_same_region(region, ref, d)
