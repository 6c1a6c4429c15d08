"""Prefill statistics through a forward's ExtendIndex (found once, read by every layer)
equal a plain per-position loop: energy sums bit for bit (float64 sums of bf16 squares),
attention sums to float rounding, counts exactly; for ragged chunks (starting or ending
mid-segment, a single token, whole segments) and several requests in one extend, with and
without a window."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from script_loader import load_script

from mosaickv.sglang_patch.attention import record_queries
from mosaickv.sglang_patch.forward_inputs import RequestKV, stat_inputs
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
        assert torch.equal(stats._sum[row], energy), f"segment at slot {key}: energy sums differ"
        assert stats._count[row].tolist() == [count] * LAYERS
        assert stats._attn_count[row].tolist() == [attn_count] * LAYERS
        torch.testing.assert_close(stats._attn[row], attn, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("window", [SEG, 5, 0])
def test_ragged_chunks_of_one_request_equal_a_per_position_loop(window):
    """observe's own index (slots given) over chunks that start and end mid-segment, a
    single token, whole segments."""
    n = 100
    q, k, lse = sequence(n, seed=1)
    slots = torch.arange(500, 500 + n)
    stats = SegmentQueryStats(LAYERS, HKV, D, SEG, window=window)
    sums: dict[int, list] = {}
    for lo, hi in [(0, 20), (20, 40), (40, 41), (41, 48), (48, 80), (80, 100)]:
        seg0 = lo // SEG * SEG
        for layer in range(LAYERS):
            stats.observe(layer, q[layer, lo:hi], slots[:hi], keys=k[layer, seg0:hi], lse=lse[layer, lo:hi],
                          scale=SCALE)
        reference(q, k, lse, lo, hi, window, sums)
        assert_equal_to(stats, {500 + seg * SEG: acc for seg, acc in sums.items()})


# (tokens before the step, step's tokens): mid to mid, whole segments, one token, none, start to mid
REQUESTS = [(40, 30), (0, 64), (63, 1), (10, 0), (0, 17)]


@pytest.mark.parametrize("window", [SEG, 5, 0])
@pytest.mark.parametrize("requests", [REQUESTS, [(0, 64), (16, 32)]], ids=["ragged", "whole"])
def test_an_extend_of_several_requests_equals_a_per_position_loop(window, requests):
    """The backend's path: stat_inputs for the batch, then record_queries at every layer
    (one observe for all requests through one ExtendIndex, built at the first layer), keys
    read from a shared buffer whose rows are not in token order."""
    stats = SegmentQueryStats(LAYERS, HKV, D, SEG, window=window)
    rows_total = sum(before + nq for before, nq in requests)
    order = torch.randperm(rows_total, generator=torch.Generator().manual_seed(9))
    k_buf = torch.zeros(LAYERS, rows_total, HKV, D, dtype=torch.bfloat16)
    reqs, seqs = [], []
    taken = 0
    for i, (before, nq) in enumerate(requests):
        n = before + nq
        q, k, lse = sequence(n, seed=10 + i)
        rows = order[taken : taken + n]
        taken += n
        k_buf[:, rows] = k
        slots = torch.arange(1000 * (i + 1), 1000 * (i + 1) + n, dtype=torch.int32)
        reqs.append(RequestKV(slots, [rows], nq))
        seqs.append((q, k, lse, before, n))
    pool = SimpleNamespace(query_stats=stats, device="cpu", start_layer=0, get_key_buffer=lambda layer: k_buf[layer])
    inputs = stat_inputs(pool, reqs)
    assert not inputs.decode
    q_all = torch.cat([q[:, before:n] for q, _, _, before, n in seqs], dim=1)
    lse_all = torch.cat([lse[:, before:n] for _, _, lse, before, n in seqs], dim=1)
    for layer in range(LAYERS):
        record_queries(pool, layer, q_all[layer], reqs, lse_all[layer] if window else None, SCALE, inputs)
        if layer == 0:
            index = inputs.index
    assert inputs.index is index and index.nq == sum(nq for _, nq in requests)
    assert (index.seg_of is None) == all(before % SEG == 0 and nq % SEG == 0 for before, nq in requests)
    want = {}
    for i, (q, k, lse, before, n) in enumerate(seqs):
        sums: dict[int, list] = {}
        reference(q, k, lse, before, n, window, sums)
        want.update({1000 * (i + 1) + seg * SEG: acc for seg, acc in sums.items()})
    assert_equal_to(stats, want)


def test_observe_takes_slots_or_an_index_that_fits():
    stats = SegmentQueryStats(LAYERS, HKV, D, SEG)
    q = torch.ones(8, HQ, D)
    slots = torch.arange(8)
    index = stats.extend_index([slots], [8], HQ, "cpu")
    with pytest.raises(ValueError, match="exactly one"):
        stats.observe(0, q, slots, index=index)
    with pytest.raises(ValueError, match="exactly one"):
        stats.observe(0, q)
    with pytest.raises(ValueError, match="cannot place 4 queries"):
        stats.observe(0, q[:4], index=index)
    with pytest.raises(ValueError, match="queries its last 9 tokens but holds 8"):
        stats.extend_index([slots], [9], HQ, "cpu")
    windowed = SegmentQueryStats(LAYERS, HKV, D, SEG, window=4)
    with pytest.raises(ValueError, match=r"key_rows\[0\] has 7 rows for the request's 8 tokens"):
        windowed.extend_index([slots], [8], HQ, "cpu", [torch.arange(7)])


def test_prefill_stats_host_counts_this_tree_beside_another_file(tmp_path):
    """benchmarks/host/prefill_stats_host.py counts another query_stats.py beside this
    tree's (here this tree's file again: the same count)."""
    pytest.importorskip("sglang")
    bench = load_script("benchmarks/host/prefill_stats_host.py")
    out = tmp_path / "ops.json"
    other = Path(__file__).parents[1] / "sglang_patch" / "query_stats.py"
    assert bench.main(["--chunk", "40", "--prefix", "7", "--layers", "2", "--q-heads", "4", "--kv-heads", "2",
                       "--head-dim", "8", "--segment", "16", "--window", "4", "--module", str(other),
                       "--json", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["segments_touched"] == 3 and row["ops_per_forward"] > 0
    assert row["module"]["path"] == str(other) and row["module"]["ops_per_forward"] == row["ops_per_forward"]
