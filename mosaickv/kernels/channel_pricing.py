"""Per-vector channel pricing in one launch: for each vector's channel scores, what keeping
only its top ``w`` channels loses, for every width a policy may give it.

:meth:`policies.selectors.PerVector.lost_many` in PyTorch ops sorts every vector's scores
(a radix sort over all of a sealing call's key vectors: 1.4 ms of an 8B-shaped call of 32
segments on an H200, fourteenth run) and sums each width's prefix in ops of its own, each
a pass over a copy. Here a program sorts a tile of vectors in registers (``tl.sort``),
takes their prefix sums once and writes only the losses: the scores are read once and
nothing their size is written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mosaickv.kernels._interpret import patch_interpreter
from mosaickv.uploads import upload

patch_interpreter()

# Vectors a program: a [32, 128] float32 tile is 32 elements a thread at four warps.
# Compiled for sm_90: 128 registers at d=128, 96 at 64, no stack
# (results/registers_channel_pricing_sm90_triton36.json).
BLOCK_ROWS = 32


@triton.jit(do_not_specialize=["rows", "n_widths"])
def _channel_losses_kernel(scores, widths, out, rows, n_widths, D: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = offs_r < rows
    offs_c = tl.arange(0, D)
    v = tl.load(scores + offs_r[:, None] * D + offs_c[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    total = tl.sum(v, axis=1)
    kept = tl.cumsum(tl.sort(v, 1, descending=True), 1)  # kept[:, j]: the j + 1 largest, summed
    for i in range(n_widths):
        w = tl.load(widths + i)
        lost = total - tl.sum(tl.where(offs_c[None, :] == w - 1, kept, 0.0), axis=1)
        tl.store(out + offs_r * n_widths + i, lost, mask=rmask)


def fits_channel_pricing(scores: torch.Tensor) -> bool:
    """Whether the launch takes these scores: float32 on a GPU, a power-of-two head dim
    (``tl.sort`` sorts power-of-two rows); otherwise the PyTorch ops price them."""
    d = scores.shape[-1]
    return scores.is_cuda and scores.dtype == torch.float32 and d >= 2 and d & (d - 1) == 0


def channel_losses(scores: torch.Tensor, widths: list[int], out: torch.Tensor | None = None) -> torch.Tensor:
    """``scores`` [..., d] (non-negative channel importances of each vector), ``widths``
    channel counts in [1, d]: returns [..., len(widths)] float32, each vector's score
    outside its top ``w`` channels (``out`` if given: written whole)."""
    d = scores.shape[-1]
    bad = [w for w in widths if not 1 <= w <= d]
    if bad:
        raise ValueError(f"widths must be channel counts in [1, {d}], got {bad}")
    flat = scores.reshape(-1, d).contiguous()
    rows = flat.shape[0]
    shape = (*scores.shape[:-1], len(widths))
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=scores.device)
    elif tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape {shape}, got {out.dtype} {tuple(out.shape)}")
    if rows and widths:
        _channel_losses_kernel[(triton.cdiv(rows, BLOCK_ROWS),)](flat, upload(widths, scores.device, torch.int32), out, rows, len(widths), D=d,
                                                                  BLOCK_R=BLOCK_ROWS, num_warps=4)
    return out


def warm_channel_pricing(device: torch.device | str, head_dim: int) -> None:
    """Compile the launch for ``head_dim`` before a server's first sealing call needs it
    (seconds, once per machine): one vector of zeros on ``device``."""
    scores = torch.zeros(1, head_dim, device=device)
    if fits_channel_pricing(scores):
        channel_losses(scores, [1])
