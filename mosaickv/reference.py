"""Pure-PyTorch attention over a mixed-format cache: the oracle for every kernel.

One sequence, one layer: a list of sealed segments, each a block per KV head in its own
format, followed by a dense tail (tokens not yet sealed, including the queries' own).
Queries see every kept compressed token; inside the tail they are causal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mosaickv.formats import PackedBlock, unpack_block


@dataclass
class CompressedLayer:
    """Sealed segments of one layer of one sequence: ``blocks[segment][kv_head]``."""

    blocks: list[list[PackedBlock]] = field(default_factory=list)
    _cache: list[tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        """Tokens the sealed segments covered before compression."""
        return sum(seg[0].n for seg in self.blocks) if self.blocks else 0

    def nbytes(self) -> int:
        return sum(b.nbytes() for seg in self.blocks for b in seg)

    def append(self, segment: list[PackedBlock]) -> None:
        self.blocks.append(segment)
        self._cache = None

    def decompressed(self, num_kv_heads: int, head_dim: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per KV head, the kept keys and values of all segments, float32 ``[M_h, d]``."""
        if self._cache is None:
            per_head: list[tuple[torch.Tensor, torch.Tensor]] = []
            for h in range(num_kv_heads):
                ks, vs = [torch.zeros(0, head_dim)], [torch.zeros(0, head_dim)]
                for seg in self.blocks:
                    k, v = unpack_block(seg[h])
                    ks.append(k)
                    vs.append(v)
                per_head.append((torch.cat(ks), torch.cat(vs)))
            self._cache = per_head
        return self._cache


def attention(
    q: torch.Tensor,
    compressed: CompressedLayer,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` [Hq, nq, d] over ``compressed`` plus a dense tail [Hkv, t, d].

    The ``nq`` queries are the last ``nq`` tokens of the tail (``t >= nq``), causal within
    it; with no tail (``t == 0``) they read the compressed tokens alone, as the sealed part
    of a split extend does. GQA: query head ``h`` reads KV head ``h // (Hq // Hkv)``.
    Returns float32, and with ``return_lse`` each query's log-sum-exp of scaled logits
    [Hq, nq] too.
    """
    hq, nq, d = q.shape
    hkv, t, _ = tail_k.shape
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if 0 < t < nq:
        raise ValueError(f"tail of {t} tokens cannot hold the {nq} query tokens")
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    heads = compressed.decompressed(hkv, d)
    # Query i sits at tail position t - nq + i and sees tail positions <= that.
    causal = torch.arange(t)[None, :] <= (t - nq + torch.arange(nq))[:, None]
    out = torch.empty(hq, nq, d)
    lse = torch.empty(hq, nq)
    for h in range(hkv):
        ck, cv = heads[h]
        keys = torch.cat([ck, tail_k[h].float()])
        vals = torch.cat([cv, tail_v[h].float()])
        visible = torch.cat([torch.ones(nq, ck.shape[0], dtype=torch.bool), causal], dim=1)
        qh = q[h * group : (h + 1) * group].float()
        logits = (qh @ keys.T) * scale
        logits = logits.masked_fill(~visible, float("-inf"))
        out[h * group : (h + 1) * group] = torch.softmax(logits, dim=-1) @ vals
        lse[h * group : (h + 1) * group] = torch.logsumexp(logits, dim=-1)
    return (out, lse) if return_lse else out
