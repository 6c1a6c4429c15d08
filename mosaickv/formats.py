"""Segment formats: how one block (one layer, one KV head, one segment) is stored.

A block keeps ``tokens`` of its ``n`` tokens; the kept keys and values are each stored
in one *side format*. Every format stores exactly the bytes :meth:`BlockFormat.nbytes`
accounts for, so the byte budget the strategies spend is the memory the pool allocates.

Side formats, for ``m`` kept vectors of head dim ``d`` and width ``r``:

========  ================================================  =====================
kind      tensors                                           bytes
========  ================================================  =====================
dense     values bf16 [m, d]                                2·m·d
sparse    values bf16 [m, r], index uint8 [m, r] (per row)  3·m·r
mask      values bf16 [m, r], index uint8 [r] (per block)   2·m·r + r
lowrank   coef bf16 [m, r], basis bf16 [r, d]               2·(m·r + r·d)
fp8       values e4m3 [m, d]                                m·d
========  ================================================  =====================

``sparse`` is MosaicKV's per-vector channel selection; ``mask`` is a ThinK-style channel
mask shared by every vector of the block; ``lowrank`` is a per-segment basis; ``fp8`` is
the dense vectors in float8 e4m3 at scale 1, clamped to its range, as SGLang's
``--kv-cache-dtype fp8_e4m3`` stores them (which ``--kv-compress mosaickv`` cannot be
combined with: this kind is that composition, per block). A header
of four int32 (kept tokens, key code, value code, reserved) rides with every block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

SIDE_KINDS = ("dense", "sparse", "mask", "lowrank", "fp8")
WIDTHLESS = ("dense", "fp8")  # kinds that keep every channel (width 0)
HEADER_BYTES = 16
VALUE_DTYPE = torch.bfloat16
INDEX_DTYPE = torch.uint8
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value: the GPU's conversion saturates there, so the reference does too
MAX_HEAD_DIM = 256  # channel indices are uint8


@dataclass(frozen=True)
class SideFormat:
    """How the kept keys (or values) of one block are stored."""

    kind: str = "dense"
    width: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SIDE_KINDS:
            raise ValueError(f"side format kind {self.kind!r} is not one of {SIDE_KINDS}")
        if self.kind in WIDTHLESS and self.width != 0:
            raise ValueError(f"side format {self.kind!r} keeps every channel: width must be 0, got {self.width}")
        if self.kind not in WIDTHLESS and self.width < 1:
            raise ValueError(f"side format {self.kind!r} needs width >= 1, got {self.width}")

    def check(self, head_dim: int) -> None:
        if self.kind not in WIDTHLESS and self.width > head_dim:
            raise ValueError(f"{self.kind} width {self.width} exceeds head dim {head_dim}")

    def nbytes(self, m: int, d: int) -> int:
        if m == 0:
            return 0
        r = self.width
        if self.kind == "dense":
            return 2 * m * d
        if self.kind == "fp8":
            return m * d
        if self.kind == "sparse":
            return 3 * m * r
        if self.kind == "mask":
            return 2 * m * r + r
        return 2 * (m * r + r * d)

    @property
    def code(self) -> int:
        return (SIDE_KINDS.index(self.kind) << 16) | self.width

    @staticmethod
    def from_code(code: int) -> "SideFormat":
        return SideFormat(SIDE_KINDS[code >> 16], code & 0xFFFF)

    def __str__(self) -> str:
        return self.kind if self.kind in WIDTHLESS else f"{self.kind}:{self.width}"


DENSE = SideFormat("dense")
FP8 = SideFormat("fp8")


@dataclass(frozen=True)
class BlockFormat:
    """Kept tokens plus the side formats of their keys and values."""

    tokens: int
    k: SideFormat = DENSE
    v: SideFormat = DENSE

    def nbytes(self, d: int) -> int:
        return HEADER_BYTES + self.k.nbytes(self.tokens, d) + self.v.nbytes(self.tokens, d)

    def header(self) -> torch.Tensor:
        return torch.tensor([self.tokens, self.k.code, self.v.code, 0], dtype=torch.int32)

    @staticmethod
    def from_header(header: torch.Tensor) -> "BlockFormat":
        tokens, kc, vc, _ = (int(x) for x in header.tolist())
        return BlockFormat(tokens, SideFormat.from_code(kc), SideFormat.from_code(vc))

    def __str__(self) -> str:
        return f"t{self.tokens}/k={self.k}/v={self.v}"


class FormatChoice(tuple):
    """Blocks' formats picked from one menu (block ``i`` is ``menu[choice[i]]``), as the
    built-in strategies plan them: :func:`format_arrays` then reads the menu, not every
    block (a sealing call plans 16,380 SmolLM2 blocks). A tuple, so that no item can
    change under its choice."""

    menu: list[BlockFormat]
    choice: np.ndarray

    def __new__(cls, menu: Sequence[BlockFormat], choice: np.ndarray) -> "FormatChoice":
        menu, choice = list(menu), np.asarray(choice, dtype=np.int64)
        picked = super().__new__(cls, map(menu.__getitem__, choice.tolist()))
        picked.menu, picked.choice = menu, choice
        return picked


def format_arrays(fmts: Sequence[BlockFormat], d: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Kept tokens ``[nb]``, side kinds (``SIDE_KINDS`` codes) and widths ``[nb, 2]`` (keys,
    values) and, for head dim ``d``, bytes (``nbytes``) of blocks' formats: a batch of
    thousands holds few distinct format objects, so each is read once."""
    if isinstance(fmts, FormatChoice):
        objects, which = fmts.menu, fmts.choice
    else:
        distinct: dict[int, int] = {}
        objects = []
        which = np.empty(len(fmts), dtype=np.int64)
        for i, f in enumerate(fmts):
            j = distinct.get(id(f))
            if j is None:
                j = distinct[id(f)] = len(objects)
                objects.append(f)
            which[i] = j
    tokens = np.asarray([f.tokens for f in objects], dtype=np.int64)
    kinds = np.asarray([[SIDE_KINDS.index(f.k.kind), SIDE_KINDS.index(f.v.kind)] for f in objects], dtype=np.int64)
    widths = np.asarray([[f.k.width, f.v.width] for f in objects], dtype=np.int64)
    nbytes = np.asarray([f.nbytes(d) for f in objects], dtype=np.int64)
    return tokens[which], kinds.reshape(-1, 2)[which], widths.reshape(-1, 2)[which], nbytes[which]


def dense_block_bytes(n: int, d: int) -> int:
    """Bytes of ``n`` tokens of one head stored dense in bf16 (keys and values), no header."""
    return 4 * n * d


@dataclass
class PackedSide:
    """The tensors of one side; which ones are set depends on the kind."""

    fmt: SideFormat
    values: torch.Tensor | None = None  # dense/sparse/mask values, lowrank coefficients
    index: torch.Tensor | None = None  # sparse [m, r] or mask [r] uint8 channel indices
    basis: torch.Tensor | None = None  # lowrank [r, d]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.values, self.index, self.basis) if t is not None]


@dataclass
class PackedBlock:
    """One stored block. ``n`` is how many tokens the segment had before dropping."""

    fmt: BlockFormat
    n: int
    d: int
    header: torch.Tensor
    k: PackedSide
    v: PackedSide
    kept: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    def nbytes(self) -> int:
        """Bytes of the tensors actually held (``kept`` is bookkeeping, not stored)."""
        return sum(t.numel() * t.element_size() for t in [self.header, *self.k.tensors(), *self.v.tensors()])


def channel_weights(x: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Per-channel weight ``sqrt(sum score / sum x^2)`` over a block's vectors ([..., d]).

    Ones for energy scores; for query-weighted key scores, the query magnitude. Clamped
    so that the basis, divided by it, stays finite.
    """
    w = (score.sum(-2) / x.pow(2).sum(-2).clamp_min(1e-12)).sqrt()
    return w.clamp_min(w.amax(-1, keepdim=True).clamp_min(1e-12) * 1e-3)


def lowrank_fit(x: torch.Tensor, score: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """SVD of each block's vectors ``x`` [G, m, d] in its score's channel metric: ``u, sv,
    vh`` of ``x * w`` and ``w`` [G, 1, d]. Truncated, it is the best rank-r fit there
    (Eckart-Young); a basis ``vh / w`` maps back to plain channels."""
    w = channel_weights(x.float(), score.float())[:, None, :]
    u, sv, vh = thin_svd(x.float() * w)
    return u, sv, vh, w


def thin_svd(a: torch.Tensor, rel_tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(a, full_matrices=False)`` for a batch [G, m, d] of small blocks,
    from the eigenvectors of the smaller Gram matrix (float64). On a GPU, cuSOLVER's
    batched SVD takes only matrices up to 32 x 32, and torch loops over a batch of 32 x 128
    blocks one matrix at a time, while the 32 x 32 Gram matrices go to the batched
    eigensolver. Directions whose singular value is below ``rel_tol`` of the block's
    largest come back as zero rows of ``vh`` (zero columns of ``u`` when m > d): they
    carry nothing a rank-r fit keeps."""
    ad = a.double()
    m, d = ad.shape[-2:]
    evals, evecs = torch.linalg.eigh(smaller_gram(ad))  # ascending
    sv = evals.flip(-1).clamp_min(0).sqrt()
    vecs = evecs.flip(-1)
    inv = torch.where(sv > rel_tol * sv[..., :1], 1.0 / sv.clamp_min(1e-300), 0.0)
    if m <= d:
        u, vh = vecs, (vecs.mT @ ad) * inv[..., :, None]
    else:
        u, vh = (ad @ vecs) * inv[..., None, :], vecs.mT
    return u.to(a.dtype), sv.to(a.dtype), vh.to(a.dtype)


def smaller_gram(x: torch.Tensor) -> torch.Tensor:
    """``x x^T`` or ``x^T x`` of each ``[m, d]`` matrix, whichever is smaller, in float64:
    its eigenvalues are the squared singular values (its eigenvectors the singular
    vectors of that side), far cheaper to find for a segment's 32 x 128 blocks."""
    xd = x.double()
    return xd @ xd.mT if x.shape[-2] <= x.shape[-1] else xd.mT @ xd


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """``x`` stored as the ``fp8`` kind: rounded to bf16 first (what the pool holds, and
    what the packer kernel reads), then to e4m3, saturated."""
    return x.to(VALUE_DTYPE).float().clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fp8_lost(x: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Importance the ``fp8`` kind loses per vector of ``x`` [..., d]: each channel's score
    times its squared relative rounding error. The scores weigh ``x_c^2`` (times a channel
    weight), so this is the error measured as dropping a channel's is (its whole score)."""
    xf = x.float()
    rel = torch.where(xf != 0, (xf - to_fp8(xf).float()) / xf, 0.0)
    return (score.float() * rel.pow(2)).sum(-1)


def _pack_sides(x: torch.Tensor, fmt: SideFormat, score: torch.Tensor | None) -> list[PackedSide]:
    """Store each of ``x`` [G, m, d] (one block's kept vectors each, all in ``fmt``);
    ``score`` [G, m, d] ranks channels (default: energy ``x**2``). One batched op per
    step for the G blocks: sealing a segment packs hundreds of blocks in a few formats."""
    g, m, d = x.shape
    if m == 0:
        return [PackedSide(fmt) for _ in range(g)]
    if fmt.kind == "dense":
        values = x.to(VALUE_DTYPE)
        return [PackedSide(fmt, values=values[i].contiguous()) for i in range(g)]
    if fmt.kind == "fp8":
        values = to_fp8(x)
        return [PackedSide(fmt, values=values[i].contiguous()) for i in range(g)]
    r = fmt.width
    s = x.float().pow(2) if score is None else score.float()
    if fmt.kind == "sparse":
        idx = s.topk(r, dim=-1).indices.sort(dim=-1).values  # [G, m, r]
        values, index = x.gather(2, idx).to(VALUE_DTYPE), idx.to(INDEX_DTYPE)
        return [PackedSide(fmt, values=values[i], index=index[i]) for i in range(g)]
    if fmt.kind == "mask":
        idx = s.sum(1).topk(r, dim=-1).indices.sort(dim=-1).values  # [G, r]
        values, index = x.gather(2, idx[:, None, :].expand(g, m, r)).to(VALUE_DTYPE), idx.to(INDEX_DTYPE)
        return [PackedSide(fmt, values=values[i], index=index[i]) for i in range(g)]
    u, sv, vh, w = lowrank_fit(x, s)
    r_eff = min(r, sv.shape[-1])
    coef = torch.zeros(g, m, r, dtype=torch.float32, device=x.device)
    basis = torch.zeros(g, r, d, dtype=torch.float32, device=x.device)
    coef[:, :, :r_eff] = u[:, :, :r_eff] * sv[:, None, :r_eff]
    basis[:, :r_eff] = vh[:, :r_eff] / w
    coef, basis = coef.to(VALUE_DTYPE), basis.to(VALUE_DTYPE)
    return [PackedSide(fmt, values=coef[i], basis=basis[i]) for i in range(g)]


def _unpack_side(side: PackedSide, m: int, d: int, device: torch.device) -> torch.Tensor:
    """Reconstruct [m, d] float32 on ``device``; dropped channels read as zero."""
    if m == 0:
        return torch.zeros(0, d, device=device)
    kind = side.fmt.kind
    vals = side.values.float()
    if kind in WIDTHLESS:
        return vals
    if kind == "lowrank":
        return vals @ side.basis.float()
    out = torch.zeros(m, d, device=device)
    idx = side.index.long()
    if kind == "sparse":
        return out.scatter_(1, idx, vals)
    out[:, idx] = vals
    return out


def pack_block(
    k: torch.Tensor,
    v: torch.Tensor,
    fmt: BlockFormat,
    token_score: torch.Tensor | None = None,
    k_score: torch.Tensor | None = None,
    v_score: torch.Tensor | None = None,
    kept: torch.Tensor | None = None,
) -> PackedBlock:
    """Store keys and values ``[n, d]`` of one block in ``fmt``.

    The kept tokens are ``kept`` if given, else the ``fmt.tokens`` highest of
    ``token_score`` [n], else the first ones. ``k_score``/``v_score`` [n, d] rank channels
    (higher is kept) for the sparse and mask kinds.
    """
    n = k.shape[0]
    if kept is not None:
        if kept.numel() != fmt.tokens:
            raise ValueError(f"{kept.numel()} kept token indices for a format that keeps {fmt.tokens}")
    elif fmt.tokens == n or token_score is None or not 0 <= fmt.tokens <= n:
        kept = torch.arange(max(fmt.tokens, 0), device=k.device)  # pack_blocks refuses a bad count
    else:
        kept = token_score.float().topk(fmt.tokens, sorted=False).indices

    def one(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[None]

    return pack_blocks(k[None], v[None], fmt, kept.reshape(1, -1), one(k_score), one(v_score))[0]


def pack_blocks(
    k: torch.Tensor,
    v: torch.Tensor,
    fmt: BlockFormat,
    kept: torch.Tensor,
    k_score: torch.Tensor | None = None,
    v_score: torch.Tensor | None = None,
) -> list[PackedBlock]:
    """:func:`pack_block` for G blocks in one format: keys and values ``[G, n, d]``, the
    kept token indices ``[G, fmt.tokens]`` (any order), scores ``[G, n, d]``."""
    g, n, d = k.shape
    if not 0 <= fmt.tokens <= n:
        raise ValueError(f"block format keeps {fmt.tokens} tokens but the block has {n}")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} exceeds {MAX_HEAD_DIM} (channel indices are uint8)")
    fmt.k.check(d)
    fmt.v.check(d)
    if tuple(kept.shape) != (g, fmt.tokens):
        raise ValueError(f"kept token indices of shape {tuple(kept.shape)} for {g} blocks keeping {fmt.tokens}")
    kept = kept.long().to(k.device).sort(dim=-1).values

    def pick(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.gather(1, kept[..., None].expand(-1, -1, x.shape[-1]))

    ks, vs = _pack_sides(pick(k), fmt.k, pick(k_score)), _pack_sides(pick(v), fmt.v, pick(v_score))
    return [PackedBlock(fmt=fmt, n=n, d=d, header=fmt.header(), k=ks[i], v=vs[i], kept=kept[i]) for i in range(g)]


def unpack_block(block: PackedBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept keys and values as float32 ``[tokens, d]`` each, in token order, on the device of
    its stored values (a block sealed on the GPU keeps its header on the host). The dense
    format returns its stored values exactly."""
    m, d = block.fmt.tokens, block.d
    stored = block.k.tensors() + block.v.tensors()
    device = stored[0].device if stored else block.header.device
    return _unpack_side(block.k, m, d, device), _unpack_side(block.v, m, d, device)
