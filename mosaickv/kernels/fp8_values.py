"""Where an fp8 value side's bytes lie in the index arena, for the kernels that write and
read them (the host's side is :func:`mosaickv.kernels.layout.group_fp8_values`)."""

from __future__ import annotations

import triton
import triton.language as tl

from mosaickv.kernels.layout import FP8_GROUP

FP8_GROUP_TOKENS = tl.constexpr(FP8_GROUP)


@triton.jit
def whole_group_offsets(tok, cols, HEAD_DIM: tl.constexpr):
    """:func:`value_offsets` of a block with whole groups only (the arena's ``ALIGNED``), in
    the form the compiler reads as runs of a group's contiguous bytes a channel."""
    g = FP8_GROUP_TOKENS
    return (tok[:, None] // g) * (g * HEAD_DIM) + cols[None, :] * g + tok[:, None] % g


@triton.jit
def value_offsets(tok, cols, kept, HEAD_DIM: tl.constexpr):
    """Byte offsets ``[len(tok), HEAD_DIM]`` of tokens ``tok`` of an fp8 value side keeping
    ``kept`` (scalar, or one per token): in its whole groups of ``G`` tokens, token ``G·g + i``,
    channel ``c`` at ``G·d·g + G·c + i``; past them at their row-major places."""
    full = kept - kept % FP8_GROUP_TOKENS
    grouped = whole_group_offsets(tok, cols, HEAD_DIM)
    return tl.where((tok < full)[:, None], grouped, tok[:, None] * HEAD_DIM + cols[None, :])
