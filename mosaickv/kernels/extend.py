"""Extend (prefill of ``nq`` new tokens) over a compressed prefix plus a causal dense tail.

Same kernel and merge as decode (:mod:`.decode`): query rows are ``(token, head of the
GQA group)`` pairs tiled ``block_m`` at a time; every row sees every kept compressed
token, and query ``i`` of ``nq`` sees the tail up to its own position ``t - nq + i``.
The plan drops tail runs a row block cannot see, so the causal part costs about half
of a full square. Queries and outputs are ragged ``[sum nq, Hq, d]`` (``qo_indptr``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mosaickv.kernels.decode import MixedAttention
from mosaickv.reference import CompressedLayer


class MixedExtendWrapper(MixedAttention):
    """``plan(layers, tails_k, tails_v, qo_lens, ...)`` then ``run(q) -> out``.

    Request ``b``'s queries are the last ``qo_lens[b]`` tokens of its tail ``[Hkv, t, d]``.
    """

    def __init__(self, block_m: int = 32, block_n: int = 32, num_warps: int = 4, num_stages: int = 1,
                 pack_tokens: bool = False) -> None:
        super().__init__(block_m, block_n, num_warps, num_stages, keys_by_query=False, wide_block_n=block_n,
                         pack_tokens=pack_tokens)

    def plan(
        self,
        layers: Sequence[CompressedLayer],
        tails_k: Sequence[torch.Tensor],
        tails_v: Sequence[torch.Tensor],
        qo_lens: Sequence[int],
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        scale: float | None = None,
        chunk_tokens: int | None = None,
        max_programs: int | None = None,
    ) -> None:
        for b, (nq, tk) in enumerate(zip(qo_lens, tails_k)):
            if tk.shape[1] < nq:
                raise ValueError(f"request {b}: tail of {tk.shape[1]} tokens cannot hold its {nq} query tokens")
        self.plan_layers(
            layers, tails_k, tails_v, qo_lens, num_qo_heads, num_kv_heads, head_dim, device, scale, chunk_tokens,
            max_programs,
        )
