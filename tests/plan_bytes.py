"""Bytes a compressed cache spends per (layer, KV head): what head-wise policies are tested on."""

from __future__ import annotations

import torch

from mosaickv.compressor import Compressor
from mosaickv.formats import dense_block_bytes
from mosaickv.parts import Observation


def bytes_per_head(policy, obs: list[Observation], head_dim: int) -> tuple[torch.Tensor, float]:
    """[layers, KV heads] bytes of the planned segments (sinks left out), and their budget at the policy's ratio."""
    cache = Compressor(policy, head_dim).compress(obs, scope="segment")
    spent = torch.zeros(len(cache.layers), len(cache.layers[0].blocks[0]))
    blocks = 0
    for layer, compressed in enumerate(cache.layers):
        for segment in compressed.blocks[policy.sink_segments:]:
            for head, block in enumerate(segment):
                spent[layer, head] += block.nbytes()
                blocks += 1
    return spent, blocks * dense_block_bytes(policy.segment_size, head_dim) / policy.ratio
