"""Pack kernel against ``formats.pack_block`` + ``Arena.from_blocks`` (Triton interpreter on the CPU)."""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import torch

if not torch.cuda.is_available():  # must precede the first import of the kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

from mosaickv.formats import FP8, FP8_DTYPE, FP8_MAX, SIDE_KINDS, WIDTHLESS, BlockFormat, FormatChoice, PackedBlock, SideFormat, format_arrays, lowrank_fit, pack_block, to_fp8, unpack_block
from mosaickv.kernels.layout import DENSE, LOWRANK, Arena, place_formats, place_regions
from mosaickv.kernels.pack import PackWrapper, SideInputs
from mosaickv.kernels.synthetic import random_format

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KINDS = SIDE_KINDS
POISON_VALUE = torch.tensor(-12345, dtype=torch.int16).view(torch.bfloat16)  # a finite bf16 no test writes
POISON_INDEX = 0xAB


@dataclass
class Batch:
    """Kernel inputs for a batch of blocks, and the reference blocks ``pack_block`` makes."""

    src_k: torch.Tensor
    src_v: torch.Tensor
    fmts: list[BlockFormat]
    heads: list[int]
    kept_rows: torch.Tensor
    k: SideInputs
    v: SideInputs
    ref: list[PackedBlock]  # selection ties broken as the kernel does (lower channel first)
    raw: list[PackedBlock]  # ``pack_block`` on the raw element scores (``torch.topk``'s ties)


def tie_free(score: torch.Tensor, kind: str, kept: torch.Tensor) -> torch.Tensor:
    """Scores whose ranking is ``score``'s with ties going to the lower channel: per row
    for sparse, over the kept rows' sum for mask (what ``_pack_sides`` ranks)."""
    d = score.shape[-1]
    desc = torch.arange(d, 0, -1, dtype=torch.float32)
    if kind == "sparse":
        order = torch.sort(score, dim=-1, descending=True, stable=True).indices
        return torch.empty_like(score).scatter_(1, order, desc.expand_as(score).contiguous())
    if kind == "mask":
        order = torch.sort(score[kept].sum(0), descending=True, stable=True).indices
        return torch.empty(d).scatter_(0, order, desc).expand_as(score).contiguous()
    return score


def side_inputs(x: torch.Tensor, s: torch.Tensor, kept: torch.Tensor, w: torch.Tensor, side: SideFormat) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Channel row, lowrank basis and projection for one side, as a policy would compute them."""
    if side.kind == "mask":
        return s[kept].sum(0), None, None
    if side.kind != "lowrank" or not len(kept):
        return w, None, None
    _, sv, vh, wl = (t[0] for t in lowrank_fit(x[kept][None].float(), s[kept][None]))  # as the sealers fit it
    r, r_eff = side.width, min(side.width, sv.numel())
    basis, proj = torch.zeros(r, x.shape[1]), torch.zeros(r, x.shape[1])
    basis[:r_eff] = vh[:r_eff] / wl
    proj[:r_eff] = vh[:r_eff] * wl
    return w, basis, proj


def make_batch(gen: torch.Generator, fmts: list[BlockFormat], n: int, d: int, hkv: int = 3, weighted: bool = True, ties: bool = False) -> Batch:
    """Block ``i`` is KV head ``i % hkv`` of segment ``i // hkv``, whose ``n`` tokens sit at
    scattered rows of shared ``[rows, hkv, d]`` sources (a pool); channel weights are random
    (a query-weighted scorer) or ones (energy); ``ties`` draws small integers, so that
    equal scores are everywhere."""
    rows = -(-len(fmts) // hkv) * n + 5
    if ties:
        src = torch.randint(-3, 4, (2, rows, hkv, d), generator=gen).float().bfloat16()
    else:
        src = torch.randn(2, rows, hkv, d, generator=gen).bfloat16()
    perm = torch.randperm(rows, generator=gen)
    heads, kept_rows, ref, raw = [], [], [], []
    per_side: list[list[list[torch.Tensor | None]]] = [[[], [], []], [[], [], []]]
    for i, fmt in enumerate(fmts):
        h, seg = i % hkv, i // hkv
        at = perm[seg * n : (seg + 1) * n]
        kept = torch.randperm(n, generator=gen)[: fmt.tokens].sort().values
        xs = [src[0, at, h], src[1, at, h]]
        ws = [torch.rand(d, generator=gen) + 0.05 if weighted else torch.ones(d) for _ in range(2)]
        scores = [(x.float() * w).pow(2) for x, w in zip(xs, ws)]
        for s, side in enumerate((fmt.k, fmt.v)):
            for j, t in enumerate(side_inputs(xs[s], scores[s], kept, ws[s], side)):
                per_side[s][j].append(t)
        heads.append(h)
        kept_rows.append(at[kept])
        ks, vs = (tie_free(sc, side.kind, kept) for sc, side in zip(scores, (fmt.k, fmt.v)))
        ref.append(pack_block(xs[0], xs[1], fmt, kept=kept, k_score=ks, v_score=vs))
        raw.append(pack_block(xs[0], xs[1], fmt, kept=kept, k_score=scores[0], v_score=scores[1]))

    def inputs(s: int) -> SideInputs:
        chan, basis, proj = per_side[s]
        mats = [b for b in basis if b is not None]
        return SideInputs(
            torch.stack(chan),
            torch.cat(mats) if mats else None,
            torch.cat([p for p in proj if p is not None]) if mats else None,
        )

    empty = torch.zeros(0, dtype=torch.long)
    return Batch(src[0], src[1], fmts, heads, torch.cat(kept_rows) if kept_rows else empty, inputs(0), inputs(1), ref, raw)


def run_pack(b: Batch, d: int, align: int = 16, block_t: int = 16, values_base: int = 0, index_base: int = 0, extra: int = 0) -> tuple[Arena, PackWrapper]:
    """Pack into poisoned arenas with room before (bases) and after (``extra``) the batch."""
    w = PackWrapper(block_t=block_t)
    p = w.plan(b.fmts, b.heads, b.kept_rows, d, DEVICE, k=b.k, v=b.v, align=align, values_base=values_base, index_base=index_base)
    values = torch.full((p.values_end + extra,), POISON_VALUE.item(), dtype=torch.bfloat16, device=DEVICE)
    index = torch.full((p.index_end + extra,), POISON_INDEX, dtype=torch.uint8, device=DEVICE)
    arena = w.run(b.src_k.to(DEVICE), b.src_v.to(DEVICE), values, index)
    return arena, w


def coef_mask(table: np.ndarray, size: int) -> torch.Tensor:
    """Elements of ``values`` that hold lowrank coefficients (compared within bf16 rounding)."""
    mask = torch.zeros(size, dtype=torch.bool)
    for m, *sides in table[:, [0, 1, 2, 3, 5, 6, 7]]:
        for kind, width, off in (sides[:3], sides[3:]):
            if kind == LOWRANK and m:
                mask[off : off + m * width] = True
    return mask


def check_against_reference(arena: Arena, b: Batch, d: int, align: int = 16) -> None:
    """Byte for byte ``Arena.from_blocks`` of the reference blocks (padding included),
    lowrank coefficients within bf16 rounding; every block decodes to the reference K/V."""
    ref = Arena.from_blocks(b.ref, d, align)
    assert np.array_equal(arena.table_host, ref.table_host)
    assert arena.pad_bytes == ref.pad_bytes
    values, index = arena.values.cpu(), arena.index.cpu()
    assert values.numel() == ref.values.numel() and index.numel() == ref.index.numel()
    assert torch.equal(index, ref.index), "index bytes differ (or left unwritten)"
    coef = coef_mask(ref.table_host, ref.values.numel())
    bits, ref_bits = values.view(torch.int16), ref.values.view(torch.int16)
    assert torch.equal(bits[~coef], ref_bits[~coef]), "value bytes differ (or left unwritten)"
    got, want = values[coef].float(), ref.values[coef].float()
    assert torch.isfinite(got).all()
    if coef.any():  # one bf16 rounding step apart at most, far below 1e-2 overall
        assert ((got - want).abs() <= 2**-7 * want.abs() + 1e-3 * want.abs().max()).all()
        assert (got - want).norm() <= 1e-2 * want.norm()
    for i, blk in enumerate(b.ref):
        for mine, theirs, side in zip(unpack_block(arena.block(i)), unpack_block(blk), (blk.fmt.k, blk.fmt.v)):
            if side.kind == "lowrank":
                assert (mine - theirs).norm() <= 1e-2 * theirs.norm().clamp_min(1e-6)
            else:
                assert torch.equal(mine, theirs)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("kind", KINDS)
def test_each_side_format_alone(kind: str, d: int) -> None:
    """Blocks keeping every token, some, one and none; widths narrow, wide and full; a
    lowrank width above the kept tokens (its extra coefficients and basis rows are zero)."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{kind}-{d}".encode()))
    widths = [0] if kind in WIDTHLESS else [13, 24, d]
    n = 24
    fmts = []
    for j, m in enumerate([n, 17, 0, 5, 1]):
        r = widths[j % len(widths)]
        fmts.append(BlockFormat(m, SideFormat(kind, r), SideFormat(kind, widths[(j + 1) % len(widths)])))
    b = make_batch(gen, fmts, n, d)
    arena, _ = run_pack(b, d)
    check_against_reference(arena, b, d)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("align", [16, 1])
def test_mixed_batch(align: int, d: int) -> None:
    """Random formats of every kind in one launch, ragged kept tokens, unaligned widths."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"mixed-{align}-{d}".encode()))
    n = 32
    fmts = [random_format(gen, n, d) for _ in range(10)]
    fmts += [BlockFormat(n, SideFormat("sparse", 9), SideFormat("lowrank", 20)), BlockFormat(0, SideFormat("mask", 5))]
    b = make_batch(gen, fmts, n, d)
    arena, _ = run_pack(b, d, align=align)
    check_against_reference(arena, b, d, align)


def raw_agreement(arena: Arena, b: Batch) -> tuple[int, int]:
    """Compare the kernel's channels with ``pack_block`` on the raw scores (``torch.topk``):
    asserts they agree wherever no tie straddles the r-th place, and returns how many
    (sparse rows + mask blocks) were compared and how many had such a tie."""
    compared = tied = 0
    for i, blk in enumerate(b.raw):
        m = blk.fmt.tokens
        if not m:
            continue
        mine = arena.block(i)
        for got, want, s in ((mine.k, blk.k, 0), (mine.v, blk.v, 1)):
            kind, r = want.fmt.kind, want.fmt.width
            if kind not in ("sparse", "mask") or r == blk.d:
                continue
            chan = (b.k, b.v)[s].channels[i]
            src = (b.src_k, b.src_v)[s]
            start = int(sum(f.tokens for f in b.fmts[:i]))
            x = src[b.kept_rows[start : start + m], b.heads[i]].float()
            score = (x * chan).pow(2) if kind == "sparse" else chan[None]
            top = score.sort(dim=-1, descending=True).values
            clean = top[:, r - 1] > top[:, r]
            idx_got, idx_want = got.index.reshape(-1, r), want.index.reshape(-1, r)
            assert torch.equal(idx_got[clean], idx_want[clean])
            compared += int(clean.sum())
            tied += int((~clean).sum())
    return compared, tied


def test_selection_matches_topk_where_untied() -> None:
    """Query-weighted scores: ``pack_block``'s own ``topk`` choice, row for row."""
    gen = torch.Generator().manual_seed(21)
    n, d = 16, 64
    fmts = [BlockFormat(n, SideFormat("sparse", r), SideFormat("mask", r)) for r in (1, 7, 32, 63)]
    b = make_batch(gen, fmts, n, d)
    arena, _ = run_pack(b, d)
    compared, _ = raw_agreement(arena, b)
    assert compared >= 4 * n


def test_ties_go_to_lower_channels() -> None:
    """Energy scores of small integers tie at the r-th place in most rows and blocks: the
    kernel keeps the lower channels (the reference's tie-free scores encode that), and
    the scores it keeps are the ones ``topk`` keeps."""
    gen = torch.Generator().manual_seed(22)
    n, d = 16, 64
    fmts = [BlockFormat(n, SideFormat("sparse", r), SideFormat("mask", r)) for r in (3, 20, 41)]
    fmts.append(BlockFormat(9, SideFormat("mask", 10), SideFormat("sparse", 30)))
    b = make_batch(gen, fmts, n, d, weighted=False, ties=True)
    arena, _ = run_pack(b, d)
    check_against_reference(arena, b, d)
    _, tied = raw_agreement(arena, b)
    assert tied >= n
    for i, blk in enumerate(b.raw):
        mine = arena.block(i)
        for got, want in ((mine.k, blk.k), (mine.v, blk.v)):
            if want.fmt.kind == "sparse":
                assert torch.equal(got.values.float().abs().sort(-1).values, want.values.float().abs().sort(-1).values)


def test_fp8_rounds_saturates_and_keeps_subnormals_as_torch_does() -> None:
    """The packer's e4m3 bytes equal ``torch``'s conversion (``formats.to_fp8``) over
    seven decades, exact halves between codes (ties to even), subnormals, signed zeros and
    values past the format's largest (saturated)."""
    d, n = 64, 32
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, n, 1, d, generator=gen) * torch.logspace(-4, 3, n * d).view(1, n, 1, d)
    codes = torch.arange(0, 126, dtype=torch.uint8).view(FP8_DTYPE).float()  # every finite positive code
    x[1, :4, 0] = torch.cat([(codes[1:] + codes[:-1]) / 2, codes, torch.tensor([0.0, -0.0, 500.0, -1e4, 449.0, -2**-10])])[: 4 * d].view(4, d)
    src = x.bfloat16()
    w = PackWrapper(block_t=16)
    w.plan([BlockFormat(n, FP8, FP8)], [0], torch.arange(n), d, DEVICE)
    arena = w.run(src[0].to(DEVICE), src[1].to(DEVICE))
    got = arena.block(0)
    for side, want in ((got.k, src[0, :, 0]), (got.v, src[1, :, 0])):
        assert torch.equal(side.values.view(torch.uint8).cpu(), to_fp8(want).view(torch.uint8))
    assert got.v.values.float().abs().max() == FP8_MAX


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fp8_rounding() -> None:
    """The packer's integer e4m3 rounding compiled for the GPU equals torch's conversion."""
    test_fp8_rounds_saturates_and_keeps_subnormals_as_torch_does()


def test_append_after_pool_contents() -> None:
    """Bases place the batch after what a pool holds; nothing outside it is touched."""
    gen = torch.Generator().manual_seed(23)
    n, d = 16, 64
    fmts = [BlockFormat(n, SideFormat("lowrank", 5), SideFormat("sparse", 7)), BlockFormat(3, SideFormat("mask", 9))]
    b = make_batch(gen, fmts, n, d)
    arena, w = run_pack(b, d, values_base=40, index_base=32, extra=8)
    ref = Arena.from_blocks(b.ref, d)
    table = ref.table_host.copy()
    on = table[:, 0] > 0
    for col in (3, 7):
        table[on, col] += 40
    for col, kcol in ((4, 1), (8, 5)):
        kind = table[on, kcol]
        table[on, col] += np.select([kind == LOWRANK, kind != DENSE], [40, 32], 0)
    assert np.array_equal(arena.table_host, table)
    values, index = arena.values.cpu(), arena.index.cpu()
    assert values.numel() == 40 + ref.values.numel() + 8 and index.numel() == 32 + ref.index.numel() + 8
    poison = values.view(torch.int16)[:40].tolist() + values.view(torch.int16)[-8:].tolist()
    assert set(poison) == {-12345} and set(index[:32].tolist() + index[-8:].tolist()) == {POISON_INDEX}
    assert torch.equal(index[32:-8], ref.index)
    exact = ~coef_mask(ref.table_host, ref.values.numel())
    assert torch.equal(values[40:-8].view(torch.int16)[exact], ref.values.view(torch.int16)[exact])
    assert w.plan_info.values_end == 40 + ref.values.numel()


def test_regions_placed_together_are_each_placed_alone() -> None:
    """``place_regions`` (one call for a seal_many batch) lays each region out as
    ``place_formats`` does alone: random formats, a region whose blocks drop every token,
    one with no index bytes, distinct bases."""
    gen = torch.Generator().manual_seed(5)
    d, nb = 64, 7
    regions = [[random_format(gen, 32, d) for _ in range(nb)] for _ in range(3)]
    regions.append([BlockFormat(0, SideFormat("sparse", 3))] * nb)
    regions.append([BlockFormat(5, SideFormat("lowrank", 4))] * nb)
    bases = np.asarray([0, 4096, 16, 64, 1 << 20])
    arrays = [np.stack(a) for a in zip(*(format_arrays(f) for f in regions))]
    together = place_regions(arrays[0], arrays[1], arrays[2], d, bases)
    for i, fmts in enumerate(regions):
        alone, row = place_formats(fmts, d, int(bases[i])), together.row(i)
        for field in ("table", "value_starts", "value_gaps", "index_starts", "index_gaps"):
            assert np.array_equal(getattr(row, field), getattr(alone, field)), (i, field)
        assert (row.values_end, row.index_end, row.pad_bytes) == (alone.values_end, alone.index_end, alone.pad_bytes)
    # A region ends after its index bytes, or after its values if it has none (low-rank
    # only), or where it starts if every token was dropped.
    assert together.end_bytes[4] == 2 * together.values_end[4] <= together.index_base[4] == together.index_end[4]
    assert together.end_bytes[3] == bases[3]
    assert all(together.end_bytes[i] == together.index_end[i] > together.index_base[i] for i in range(3)
               if together.index_end[i] > together.index_base[i])
    with pytest.raises(ValueError, match="multiples of 16"):
        place_regions(arrays[0], arrays[1], arrays[2], d, bases + 8)


def test_format_arrays_read_each_block() -> None:
    """Equal formats that are distinct objects, and one object repeated, read alike."""
    fmts = [BlockFormat(3, SideFormat("sparse", 5)), BlockFormat(0), BlockFormat(3, SideFormat("sparse", 5))]
    fmts.append(fmts[1])
    tokens, kinds, widths, nbytes = format_arrays(fmts, 64)
    assert tokens.tolist() == [3, 0, 3, 0]
    sparse, dense = SIDE_KINDS.index("sparse"), SIDE_KINDS.index("dense")
    assert kinds.tolist() == [[sparse, dense], [dense, dense], [sparse, dense], [dense, dense]]
    assert widths.tolist() == [[5, 0], [0, 0], [5, 0], [0, 0]]
    assert nbytes.tolist() == [f.nbytes(64) for f in fmts]


def test_format_arrays_of_a_menu_choice_read_the_menu() -> None:
    """A strategy's plan picked from a menu (FormatChoice) reads as the same formats
    listed block by block, and cannot be changed under its choice (a tuple)."""
    menu = [BlockFormat(32), BlockFormat(8, SideFormat("sparse", 16), SideFormat("lowrank", 4)), BlockFormat(0)]
    choice = np.random.default_rng(0).integers(0, len(menu), 50)
    picked = FormatChoice(menu, choice)
    assert list(picked) == [menu[i] for i in choice]
    for got, want in zip(format_arrays(picked, 64), format_arrays([menu[i] for i in choice], 64)):
        assert np.array_equal(got, want)
    with pytest.raises(TypeError):
        picked[0] = menu[1]  # type: ignore[index]


def test_plan_rejects_bad_inputs() -> None:
    w = PackWrapper(block_t=16)
    fmt = BlockFormat(2, SideFormat("mask", 4))
    with pytest.raises(ValueError, match="channel scores"):
        w.plan([fmt], [0], torch.arange(2), 64)
    with pytest.raises(ValueError, match="kept rows"):
        w.plan([BlockFormat(2)], [0], torch.arange(3), 64)
    with pytest.raises(ValueError, match="lowrank"):
        w.plan([BlockFormat(2, SideFormat("lowrank", 4))], [0], torch.arange(2), 64, k=SideInputs(basis=torch.zeros(3, 64)))
    with pytest.raises(ValueError, match="aligned"):
        w.plan([BlockFormat(2)], [0], torch.arange(2), 64, values_base=3)
    with pytest.raises(ValueError, match="sparse width 65 exceeds head dim 64"):
        w.plan([BlockFormat(2), BlockFormat(2, SideFormat("sparse", 65))], [0, 0], torch.arange(4), 64)
    with pytest.raises(ValueError, match="block_t"):
        PackWrapper(block_t=8)
    with pytest.raises(RuntimeError):
        w.run(torch.zeros(2, 1, 64), torch.zeros(2, 1, 64))


def test_nothing_kept_launches_nothing() -> None:
    """A batch whose blocks all drop every token stores nothing."""
    w = PackWrapper(block_t=16)
    p = w.plan([BlockFormat(0, SideFormat("sparse", 3)), BlockFormat(0)], [0, 1], torch.zeros(0, dtype=torch.long), 64, DEVICE)
    src = torch.zeros(4, 2, 64, dtype=torch.bfloat16, device=DEVICE)
    arena = w.run(src, src)
    assert p.num_items == 0 and arena.nbytes() == 0 and arena.num_blocks == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_32k_prefill_batch() -> None:
    """Every segment of a 32k-token prefill (256 segments of 128 tokens x 8 KV heads, d=128,
    random formats) in one launch; then a CUDA-graph replay on new source contents equals
    an eager run."""
    gen = torch.Generator().manual_seed(32768)
    n, d, hkv = 128, 128, 8
    fmts = [random_format(gen, n, d) for _ in range(256 * hkv)]
    b = make_batch(gen, fmts, n, d, hkv=hkv)
    arena, w = run_pack(b, d, block_t=32)
    check_against_reference(arena, b, d)
    src_k, src_v = b.src_k.cuda(), b.src_v.cuda()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w.run(src_k, src_v, arena.values, arena.index)
    src_k.copy_(torch.randn_like(src_k))
    src_v.copy_(torch.randn_like(src_v))
    graph.replay()
    eager = w.run(src_k, src_v)
    assert torch.equal(arena.values.view(torch.int16), eager.values.view(torch.int16)) and torch.equal(arena.index, eager.index)
