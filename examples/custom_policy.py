"""Write a scorer and a segment strategy in a few lines, register them, evaluate them.

    python examples/custom_policy.py            # about two minutes on a laptop CPU

The new parts are registered by importing this file; a package would instead declare
them under the entry-point group ``mosaickv.policies`` so every process finds them.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from mosaickv import cli
from mosaickv.errors import PolicyError
from mosaickv.formats import BlockFormat, SideFormat
from mosaickv.parts import BlockStats, ChannelSelector, Observation, SegmentStrategy, TokenScorer
from mosaickv.registry import register_scorer, register_strategy


@register_scorer("value_norm")
@dataclass
class ValueNorm(TokenScorer):
    """Tokens whose values are large move the output most when attended."""

    power: float = 1.0

    def score(self, obs: Observation) -> torch.Tensor:
        return obs.values.float().norm(dim=-1).pow(self.power)


@register_strategy("lowrank_fit")
@dataclass
class LowRankFit(SegmentStrategy):
    """Every block low rank, at the highest rank the budget affords; all tokens kept."""

    def candidates(self, d: int, channels: ChannelSelector) -> list[SideFormat]:
        return []

    def plan(self, stats: BlockStats, budget: int, channels: ChannelSelector) -> list[BlockFormat]:
        blocks = stats.weight.shape[0]
        for rank in range(stats.n, 0, -1):
            fmt = BlockFormat(stats.n, SideFormat("lowrank", rank), SideFormat("lowrank", rank))
            if fmt.nbytes(stats.d) * blocks <= budget:
                return [fmt] * blocks
        raise PolicyError("budget", budget, "enough bytes for rank-1 blocks")


POLICY = """\
name: lowrank-by-value
ratio: 3
token_scorer: {name: value_norm, power: 2.0}
strategy: lowrank_fit
"""

if __name__ == "__main__":
    path = Path(tempfile.mkdtemp()) / "lowrank-by-value.yaml"
    path.write_text(POLICY)
    tokens = sys.argv[1] if len(sys.argv) > 1 else "2048"
    sys.exit(cli.main(["eval", "--policy", str(path), "mosaic", "--ratio", "3", "--tokens", tokens]))
