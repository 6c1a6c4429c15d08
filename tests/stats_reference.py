"""A per-position float64 reference for the query statistics (``SegmentQueryStats``), and
the check that a statistics object holds exactly its sums: shared by the CPU tests and the
GPU ones (which run where SGLang is not installed, so this imports none of it)."""

from __future__ import annotations

import torch

from mosaickv.sglang_patch.query_stats import SegmentQueryStats

LAYERS, HQ, HKV, D, SEG = 2, 4, 2, 16, 16
GROUP, SCALE = HQ // HKV, D ** -0.5


def sequence(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A request's q [L, n, Hq, d] and k [L, n, Hkv, d] in bf16, and each query's float32
    log-sum-exp [L, n, Hq] over the keys it sees (causal). Query entries under 2^-4 are
    zero, so float64 sums of their squares are exact in any order (the module's premise)."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(LAYERS, n, HQ, D, generator=g) * torch.linspace(0.2, 3.0, D)).bfloat16()
    q = torch.where(q.abs() < 2 ** -4, torch.zeros_like(q), q)
    k = torch.randn(LAYERS, n, HKV, D, generator=g).bfloat16()
    logits = torch.einsum("lphd,lthd->lpht", q.double(), k.double().repeat_interleave(GROUP, dim=2)) * SCALE
    causal = torch.arange(n)[None, :] <= torch.arange(n)[:, None]  # [p, t]
    lse = torch.logsumexp(logits.masked_fill(~causal[None, :, None, :], float("-inf")), dim=-1)
    return q, k, lse.float()


def reference(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, lo: int, hi: int, window: int,
              sums: dict[int, list]) -> None:
    """Add positions ``lo..hi-1``'s queries to ``sums[segment]`` = [energy [L, Hkv, d],
    count, attention [L, Hkv, S], attention count], one position at a time, in float64."""
    for p in range(lo, hi):
        seg = p // SEG
        acc = sums.setdefault(seg, [torch.zeros(LAYERS, HKV, D, dtype=torch.float64), 0,
                                    torch.zeros(LAYERS, HKV, SEG, dtype=torch.float64), 0])
        qp = q[:, p].double()  # [L, Hq, d]
        acc[0] += qp.pow(2).view(LAYERS, HKV, GROUP, D).sum(2)
        acc[1] += GROUP
        if p % SEG < SEG - window:
            continue
        acc[3] += GROUP
        seen = k[:, seg * SEG : p + 1].double().repeat_interleave(GROUP, dim=2)  # [L, T, Hq, d]
        probs = torch.exp(torch.einsum("lhd,lthd->lht", qp, seen) * SCALE - lse[:, p].double()[..., None])
        acc[2][:, :, : p + 1 - seg * SEG] += probs.view(LAYERS, HKV, GROUP, -1).sum(2)


def assert_equal_to(stats: SegmentQueryStats, want: dict[int, list]) -> None:
    """``stats`` hold exactly the reference's segments, ``want`` keyed by first slot."""
    stats.flush()
    assert set(stats._rows) == set(want)
    for key, (energy, count, attn, attn_count) in want.items():
        row = stats._rows[key]
        assert torch.equal(stats._sum[row].cpu(), energy), f"segment at slot {key}: energy sums differ"
        assert stats._count[row].tolist() == [count] * LAYERS
        assert stats._attn_count[row].tolist() == [attn_count] * LAYERS
        torch.testing.assert_close(stats._attn[row].cpu(), attn, rtol=1e-5, atol=1e-7)
