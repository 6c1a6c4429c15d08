"""A part's bad output fails by the part's name, whichever layer it appears in: scores
are checked once per role over every layer together (one host sync on a GPU)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from mosaickv.compressor import PartFailure, compress_segment
from mosaickv.config import load_policy
from mosaickv.parts import ElementScorer

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
            x[0, 0, 0] = {"nan": float("nan"), "inf": float("inf"), "negative": -1.0}[self.how]
        return x if self.how != "shape" else x[:, :, :1]


@pytest.mark.parametrize("how, message", [("nan", "NaN or infinite"), ("inf", "NaN or infinite"),
                                          ("negative", "negative scores"), ("shape", "expected a tensor of shape")])
def test_a_spoiled_layer_fails_the_part_by_name(how, message):
    policy = replace(load_policy("mosaic"), value_scorer=Spoiled(how))
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(LAYERS, HKV, 32, D, generator=g).bfloat16() for _ in range(2))
    budget = int(LAYERS * HKV * (32 * 2 * D * 2 / 3 + 16))
    with pytest.raises(PartFailure, match=message) as err:
        compress_segment(policy, k, v, budget, torch.rand(LAYERS, HKV, D, generator=g) + 0.1,
                         torch.softmax(torch.randn(LAYERS, HKV, 32, generator=g), -1))
    assert err.value.role == "value_scorer"
