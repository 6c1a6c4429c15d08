"""Triton attention over mixed-format segments plus a dense tail, and the decode wrapper.

One kernel serves decode and extend. A program takes *items* (see :mod:`.layout`): one
``(request, kv_head, block of query rows)`` and a run of whole blocks or of tail tokens.
Rows are ``(query token, query head of the GQA group)`` pairs, so one pass over a KV
head's bytes serves every query head that reads it. The plan gives every item blocks of
one (key format, value format) pair and launches the kernel once per pair present,
compiled for that pair (runtime format branches doubled the register count). Each
format reduces to the same tile product:

* dense: keys/values ``[m, d]`` are the tiles;
* sparse: each ``[m, r]`` tile is densified by its per-row uint8 channel indices
  (``sparse_densify``). ``"scan"`` (default): each row's indices become a bitmask (64
  channels per int64 word, a sum of distinct powers of two), every channel's bit is
  tested, a prefix sum over the channels gives its slot, and one ``tl.gather`` fetches
  the value: integer work in registers and a single gather. ``"search"``: a branchless
  binary search over each row's sorted indices, ``log2 r`` gathers of the whole tile.
  ``"scatter"``: through a zeroed per-program global scratch tile, read back and cleaned
  (on an H100 4x slower than ``"search"``: barriers and L2 round trips).
  Sparse *keys* need no dense tile at all when rows are few (``keys_by_query``, the
  default; extend turns it off): each query row gathers its channels at the keys' indices
  (:func:`_sparse_scores`);
* mask and lowrank: both are ``coef [m, r] @ basis [r, d]`` (a mask's basis is the
  one-hot rows of its channels), so keys use ``q @ basisᵀ`` once per block (for a mask:
  q's kept channels, gathered) and tile ``coef``; values accumulate ``p @ coef`` in
  ``r``-space and fold ``@ basis`` into the output once at the block's end (rescaled with
  the online softmax like the output); both r-space products are bf16 dots of a hi and
  a lo half, as accurate as fp32 operands would be. ``r``-space tiles (and sparse rows) are ``R_MAX``
  wide, the launch's largest such width rounded up to a power of two: fewer registers.

Each item writes its normalised partial output and log2-sum-exp; :func:`_merge_kernel`
combines the items of a group, whichever launch computed them. Launches are persistent
(program counts from the plan) so the scatter scratch is per program, not per item.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from mosaickv.kernels._interpret import patch_interpreter
from mosaickv.kernels.block_runs import KIND_PAIRS, NUM_KINDS, TileShape, pair_kinds
from mosaickv.kernels.fp8_values import FP8_GROUP_TOKENS, value_offsets, whole_group_offsets
from mosaickv.kernels.layout import (
    DENSE,
    FP8,
    SPARSE,
    Arena,
    AttentionPlan,
    Launch,
    build_plan,
    pack_requests,
    ragged_tails,
)
from mosaickv.reference import CompressedLayer

patch_interpreter()

LOG2E = 1.4426950408889634
SPARSE_MODES = ("scan", "search", "scatter")  # how a sparse tile is densified (see above)


@triton.jit
def _basis(values_ptr, index_ptr, width, aux, jr, cols, KIND: tl.constexpr, HEAD_DIM: tl.constexpr, ALIGNED: tl.constexpr):
    """Rows ``j < width`` of a side's basis, bf16 ``[R_MAX, HEAD_DIM]`` (rest zero): the
    lowrank basis, or for a channel mask the one-hot rows of its channels."""
    row_ok = jr < width
    if ALIGNED:
        aux = tl.multiple_of(aux, 8)
    if KIND == 3:
        basis = tl.load(values_ptr + aux + jr[:, None] * HEAD_DIM + cols[None, :], mask=row_ok[:, None], other=0.0)
    else:
        ch = tl.load(index_ptr + aux + jr, mask=row_ok, other=0).to(tl.int32)
        basis = tl.where((ch[:, None] == cols[None, :]) & row_ok[:, None], 1.0, 0.0).to(tl.bfloat16)
    return basis


@triton.jit
def _tile(values_ptr, index_ptr, off, width, aux, tok, tok_ok, kept, toks, cols, jr, scr,
          KIND: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, R_MAX: tl.constexpr,
          R_LOG2: tl.constexpr, SPARSE_MODE: tl.constexpr, VALUE_SIDE: tl.constexpr, ALIGNED: tl.constexpr):
    """One side's tile of ``BLOCK_N`` tokens: ``[BLOCK_N, HEAD_DIM]`` for dense, fp8 (as
    fp16, which holds every e4m3 value) and sparse (its ``[BLOCK_N, R_MAX]`` values scattered
    through the zeroed scratch), ``[BLOCK_N, R_MAX]`` r-space coefficients for mask and
    lowrank. ``kept``: the block's tokens (where an fp8 value side's whole groups end;
    ``ALIGNED``: they all are whole, and tiles start at multiples of ``BLOCK_N``)."""
    if KIND == 0:
        tile = tl.load(values_ptr + off + tok[:, None] * HEAD_DIM + cols[None, :], mask=tok_ok[:, None], other=0.0)
    elif KIND == 1:
        mask = tok_ok[:, None] & (jr[None, :] < width)
        raw = tl.load(values_ptr + off + tok[:, None] * width + jr[None, :], mask=mask, other=0.0)
        if SPARSE_MODE == 0:
            # Rows hold distinct sorted channels (padding: HEAD_DIM, in no word): bitmask,
            # bit test per channel, prefix count = the channel's slot.
            ix = tl.load(index_ptr + aux + tok[:, None] * width + jr[None, :], mask=mask, other=HEAD_DIM).to(tl.int64)
            word = cols[None, :] >> 6
            bits = tl.zeros([BLOCK_N, HEAD_DIM], tl.int64)
            for w in tl.static_range(HEAD_DIM // 64):
                row_bits = tl.sum(tl.where((ix >> 6) == w, tl.full([1, 1], 1, tl.int64) << (ix & 63), 0), 1)
                bits = tl.where(word == w, row_bits[:, None], bits)
            hit = ((bits >> (cols[None, :] & 63).to(tl.int64)) & 1).to(tl.int32)
            pos = tl.maximum(tl.cumsum(hit, 1) - 1, 0)
            tile = tl.where(hit != 0, tl.gather(raw, pos, axis=1), 0.0).to(tl.bfloat16)
        elif SPARSE_MODE == 1:
            # Rows hold sorted channels (padded past ``width`` with HEAD_DIM): a branchless
            # binary search finds, for every channel c, the slot that would hold it.
            ix = tl.load(index_ptr + aux + tok[:, None] * width + jr[None, :], mask=mask, other=HEAD_DIM).to(tl.int32)
            pos = tl.zeros([BLOCK_N, HEAD_DIM], tl.int32)
            for lvl in tl.static_range(R_LOG2):
                probe = tl.gather(ix, pos + ((R_MAX >> (lvl + 1)) - 1), axis=1)
                pos = tl.where(probe < cols[None, :], pos + (R_MAX >> (lvl + 1)), pos)
            hit = tl.gather(ix, pos, axis=1) == cols[None, :]
            tile = tl.where(hit, tl.gather(raw, pos, axis=1), 0.0).to(tl.bfloat16)
        else:
            ix = tl.load(index_ptr + aux + tok[:, None] * width + jr[None, :], mask=mask, other=0).to(tl.int32)
            tl.store(scr + toks[:, None] * HEAD_DIM + ix, raw, mask=mask)
            tl.debug_barrier()
            tile = tl.load(scr + toks[:, None] * HEAD_DIM + cols[None, :])
            tl.debug_barrier()
            tl.store(scr + toks[:, None] * HEAD_DIM + ix, tl.zeros_like(raw), mask=mask)
            tl.debug_barrier()
    elif KIND == 4:
        # fp8: e4m3 bytes in the index arena, every channel kept.
        if VALUE_SIDE and ALIGNED and (BLOCK_N // FP8_GROUP_TOKENS * FP8_GROUP_TOKENS == BLOCK_N):
            at = whole_group_offsets(tok, cols, HEAD_DIM)
        elif VALUE_SIDE:
            at = value_offsets(tok, cols, kept, HEAD_DIM)
        else:
            at = tok[:, None] * HEAD_DIM + cols[None, :]
        raw8 = tl.load(index_ptr + aux + at, mask=tok_ok[:, None], other=0)
        tile = raw8.to(tl.float8e4nv, bitcast=True).to(tl.float16)
    else:
        tile = tl.load(values_ptr + off + tok[:, None] * width + jr[None, :], mask=tok_ok[:, None] & (jr[None, :] < width), other=0.0)
    return tile


@triton.jit
def _sparse_scores(q_ptr, q_rows, n_rows, values_ptr, index_ptr, val_row, ix_row, width, tok_ok, rows, jr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr):
    """Logits ``[BLOCK_M, BLOCK_N]`` against per-vector sparse keys without densifying
    them: each live query row gathers its own channels at the keys' indices (a row of q is
    a few hundred bytes, cache-resident) and dots them with the kept values. Costs
    ``rows x BLOCK_N x width`` loads instead of a ``BLOCK_N x HEAD_DIM`` search per tile,
    which wins when rows are few (decode: one query token's GQA group). Token ``t``'s kept
    values start at ``val_row[t]``, its indices at ``ix_row[t]``, ``width[t]`` of each
    (per token, so that a packed tile's tokens may come from blocks of several widths)."""
    ix, raw, mask = _sparse_keys(values_ptr, index_ptr, val_row, ix_row, width, tok_ok, jr)
    return _sparse_logits(q_ptr, q_rows, n_rows, ix, raw, mask, rows, BLOCK_M, BLOCK_N, UNROLL, True)


@triton.jit
def _sparse_keys(values_ptr, index_ptr, val_row, ix_row, width, tok_ok, jr):
    """Sparse keys' channel indices, kept values (fp32) and which of them are live,
    ``[BLOCK_N, R_MAX]`` each: the loads of :func:`_sparse_scores`."""
    mask = tok_ok[:, None] & (jr[None, :] < width[:, None])
    ix = tl.load(index_ptr + ix_row[:, None] + jr[None, :], mask=mask, other=0).to(tl.int32)
    raw = tl.load(values_ptr + val_row[:, None] + jr[None, :], mask=mask, other=0.0).to(tl.float32)
    return ix, raw, mask


@triton.jit
def _sparse_logits(q_ptr, q_rows, n_rows, ix, raw, mask, rows, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   UNROLL: tl.constexpr, ROWS_PAST_UNROLL: tl.constexpr):
    """:func:`_sparse_scores` from its loads. The first ``UNROLL`` rows (a GQA group) are
    unrolled, so their gathers are in flight together; rows past them (several query
    tokens) follow one at a time, a loop compiled only with ``ROWS_PAST_UNROLL`` (the plan
    may have such rows): inside a tile loop it makes that loop not innermost, which
    Triton's pipeliner then leaves alone. Without them every item's unrolled rows are
    live (one query token a request), and a dead key's index is 0, a channel of its row:
    the gathers need no mask."""
    s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for g in tl.static_range(UNROLL):
        s = _sparse_row(s, g, q_ptr, q_rows, rows, ix, raw, mask & (ix * 0 + g < n_rows), ROWS_PAST_UNROLL)
    if ROWS_PAST_UNROLL:
        for g in range(UNROLL, n_rows):
            s = _sparse_row(s, g, q_ptr, q_rows, rows, ix, raw, mask, True)
    return s


@triton.jit
def _sparse_row(s, g, q_ptr, q_rows, rows, ix, raw, mask, MASKED: tl.constexpr):
    """``s`` with query row ``g``'s logits: its channels gathered at the keys' indices
    (``MASKED`` False: row ``g`` is live and dead keys' indices are 0)."""
    q_row = tl.sum(tl.where(rows == g, q_rows, 0))
    if MASKED:
        qg = tl.load(q_ptr + q_row + ix, mask=mask, other=0.0).to(tl.float32)
    else:
        qg = tl.load(q_ptr + q_row + ix).to(tl.float32)
    return tl.where(rows[:, None] == g, tl.sum(qg * raw, 1)[None, :], s)


@triton.jit
def _tile_step(q, qk, qk_lo, q_ptr, q_rows, n_rows, values_ptr, index_ptr, k_off, k_w, k_aux, v_off, v_w, v_aux,
               tok, kept, toks, cols, jr, rows, scr_k, scr_v, qk_scale, m_i, l_i, acc, blk_acc,
               K_KIND: tl.constexpr, V_KIND: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, R_MAX: tl.constexpr, R_LOG2: tl.constexpr,
               SPARSE_MODE: tl.constexpr, KEYS_BY_QUERY: tl.constexpr, ALIGNED: tl.constexpr):
    """One online-softmax step over a tile of one block's compressed tokens ``tok`` (of its ``kept``).
    ``qk``/``qk_lo``: the query as projected keys read it;
    r-space values (mask, lowrank) accumulate into ``blk_acc``, the rest into ``acc``.
    Returns (m_i, l_i, acc, blk_acc)."""
    tok_ok = tok < kept
    vt = _tile(values_ptr, index_ptr, v_off, v_w, v_aux, tok, tok_ok, kept, toks, cols, jr, scr_v, V_KIND, HEAD_DIM,
               BLOCK_N, R_MAX, R_LOG2, SPARSE_MODE, True, ALIGNED)
    if K_KIND == 1 and KEYS_BY_QUERY:
        s = _sparse_scores(q_ptr, q_rows, n_rows, values_ptr, index_ptr, k_off + tok * k_w, k_aux + tok * k_w,
                           tok * 0 + k_w, tok_ok, rows, jr, BLOCK_M, BLOCK_N, 0)
    else:
        kt = _tile(values_ptr, index_ptr, k_off, k_w, k_aux, tok, tok_ok, kept, toks, cols, jr, scr_k, K_KIND,
                   HEAD_DIM, BLOCK_N, R_MAX, R_LOG2, SPARSE_MODE, False, ALIGNED)
        s = tl.dot(qk, tl.trans(kt))
        if K_KIND == 3:
            s += tl.dot(qk_lo, tl.trans(kt))
    s = tl.where(tok_ok[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    pv = tl.dot(p.to(vt.dtype), vt)
    if (V_KIND == 2) or (V_KIND == 3):
        blk_acc = blk_acc * alpha[:, None] + pv
    else:
        acc += pv
    return m_new, l_i, acc, blk_acc


@triton.jit
def _tile_entries(table_ptr, block_idx_ptr, j0, blk_hi, lanes, SPARSE_KEYS: tl.constexpr, K_FP8: tl.constexpr,
                  V_FP8: tl.constexpr):
    """What a packed tile reads of blocks ``j0 ..`` (one a lane, those past ``blk_hi``
    keep nothing): kept tokens, key and value offsets (an fp8 side's in the index arena,
    its ``aux``), and for sparse keys their widths and index offsets (else zeros)."""
    b_ok = j0 + lanes < blk_hi
    ent = table_ptr + tl.load(block_idx_ptr + j0 + lanes, mask=b_ok, other=0).to(tl.int64) * 9
    kept = tl.load(ent, mask=b_ok, other=0).to(tl.int32)
    if K_FP8:
        k_off = tl.load(ent + 4, mask=b_ok, other=0)
    else:
        k_off = tl.load(ent + 3, mask=b_ok, other=0)
    if V_FP8:
        v_off = tl.load(ent + 8, mask=b_ok, other=0)
    else:
        v_off = tl.load(ent + 7, mask=b_ok, other=0)
    if SPARSE_KEYS:
        k_w = tl.load(ent + 2, mask=b_ok, other=0).to(tl.int32)
        k_aux = tl.load(ent + 4, mask=b_ok, other=0)
    else:
        k_w = kept * 0
        k_aux = k_off * 0
    return kept, k_off, v_off, k_w, k_aux


@triton.jit
def _packed_tile(table_ptr, block_idx_ptr, values_ptr, index_ptr, j0, done, blk_hi, toks, cols, jr,
                 K_KIND: tl.constexpr, V_KIND: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                 ALIGNED: tl.constexpr, TILE_BLOCKS: tl.constexpr, VECTOR_KEYS: tl.constexpr):
    """The loads of the packed tile that starts ``done`` tokens into block ``j0``: kept
    tokens of the next ``TILE_BLOCKS`` blocks back to back, ``BLOCK_N`` at most (row r is
    in the block whose kept tokens end first past r). Returns which rows hold a token, the
    keys (dense: the tile ``[BLOCK_N, d]``; sparse: kept values ``[BLOCK_N, R_MAX]``, their
    channel indices and which are live, read by query gathers; dense passes the rows' mask
    for those two), the values tile, and where the next tile starts (block, tokens of it
    done). Past ``blk_hi`` every row is empty and nothing is read. ``VECTOR_KEYS``: sparse
    keys' widths are marked multiples of 8 (aligned arenas), so their index and value loads
    are vectors; only where the tile loop is not pipelined: pipelined, Triton 3.6 stores
    those tiles unswizzled in shared memory and the query gathers read them a token a lane,
    16- and 32-way bank conflicts (twenty-second run: the launch 204 µs against 115)."""
    lanes = tl.arange(0, TILE_BLOCKS)
    kept, koff_b, voff_b, kw_b, kaux_b = _tile_entries(table_ptr, block_idx_ptr, j0, blk_hi, lanes, K_KIND == 1,
                                                       K_KIND == 4, V_KIND == 4)
    end = tl.cumsum(kept, 0) - done
    start = end - kept
    sel = tl.sum((end[None, :] <= toks[:, None]).to(tl.int32), 1)
    tok_ok = sel < TILE_BLOCKS
    sel = tl.minimum(sel, TILE_BLOCKS - 1)
    n_full = tl.sum((end <= BLOCK_N).to(tl.int32), 0)
    next_done = tl.where(n_full < TILE_BLOCKS, BLOCK_N - tl.sum(tl.where(lanes == n_full, start, 0), 0), 0)
    # Row r is token r - start of its block: each lane's offsets moved back by its start,
    # so a row's address is one gathered base plus r times its width (one gather fewer).
    v_base = tl.gather(voff_b - start * HEAD_DIM, sel, 0)
    whole_groups: tl.constexpr = ALIGNED and (V_KIND == 4) and (BLOCK_N // FP8_GROUP_TOKENS * FP8_GROUP_TOKENS == BLOCK_N)
    if ALIGNED:
        v_base = tl.multiple_of(v_base, 8)
    if whole_groups:
        # fp8 values keep whole groups (the arena's ALIGNED) and tiles start at multiples
        # of the group, so each run of a group's rows is one block's: one base, one mask.
        # Hints take where a value is made (on a called function's argument they are lost).
        v_base = tl.max_constancy(v_base, FP8_GROUP_TOKENS)
        tok_ok = tl.max_constancy(tok_ok, FP8_GROUP_TOKENS)
    if V_KIND == 4:
        vt = _fp8_values(index_ptr, v_base, start, kept, sel, toks, cols, tok_ok, HEAD_DIM, whole_groups)
    else:
        vt = _packed_rows(values_ptr, index_ptr, v_base, toks, cols, tok_ok, V_KIND, HEAD_DIM)
    if K_KIND == 1:
        # Sparse keys, each token at its own block's width.
        k_w = tl.gather(kw_b, sel, 0)
        val_row = tl.gather(koff_b - start * kw_b, sel, 0) + toks * k_w
        ix_row = tl.gather(kaux_b - start * kw_b, sel, 0) + toks * k_w
        if ALIGNED:
            val_row = tl.multiple_of(val_row, 8)
            ix_row = tl.multiple_of(ix_row, 8)
        if ALIGNED and VECTOR_KEYS:
            k_w = tl.multiple_of(k_w, 8)  # the masks hold over runs of 8 channels: vector loads
        k_ix, kt, k_live = _sparse_keys(values_ptr, index_ptr, val_row, ix_row, k_w, tok_ok, jr)
    else:
        k_base = tl.gather(koff_b - start * HEAD_DIM, sel, 0)
        if ALIGNED:
            k_base = tl.multiple_of(k_base, 8)
        kt = _packed_rows(values_ptr, index_ptr, k_base, toks, cols, tok_ok, K_KIND, HEAD_DIM)
        k_ix = tok_ok
        k_live = tok_ok
    return tok_ok, kt, k_ix, k_live, vt, j0 + n_full, next_done


@triton.jit
def _fp8_values(index_ptr, base, start, kept, sel, toks, cols, tok_ok, HEAD_DIM: tl.constexpr,
                WHOLE_GROUPS: tl.constexpr):
    """A packed tile's fp8 values widened to fp16, read in their groups of tokens
    (:mod:`.fp8_values`); ``base``: each row's block's offset less its ``start`` rows.
    ``WHOLE_GROUPS``: every block keeps whole groups and every tile starts at a multiple of
    the group, so a channel's tokens of a group are one contiguous run (the caller's hints
    say so)."""
    if WHOLE_GROUPS:
        at = base[:, None] + whole_group_offsets(toks, cols, HEAD_DIM)
    else:
        first = tl.gather(start, sel, 0)
        at = (base + first * HEAD_DIM)[:, None] + value_offsets(toks - first, cols, tl.gather(kept, sel, 0), HEAD_DIM)
    return tl.load(index_ptr + at, mask=tok_ok[:, None], other=0).to(tl.float8e4nv, bitcast=True).to(tl.float16)


@triton.jit
def _packed_rows(values_ptr, index_ptr, base, toks, cols, tok_ok, KIND: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A packed tile's whole rows of one side: bf16 (dense) or e4m3 bytes (fp8, widened to
    fp16, which holds every e4m3 value exactly)."""
    rows = base[:, None] + toks[:, None] * HEAD_DIM + cols[None, :]
    if KIND == 4:
        tile = tl.load(index_ptr + rows, mask=tok_ok[:, None], other=0).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    else:
        tile = tl.load(values_ptr + rows, mask=tok_ok[:, None], other=0.0)
    return tile  # one return: Triton refuses returns of different types (fp16 here, bf16 there)


@triton.jit
def _fp16_query(q):
    """The query as fp8 keys read it: fp8 rows widen to fp16 exactly, in one conversion a
    pair (bf16 takes more: 512 against 413 instructions a tile loop, sm_90, registers.py
    --loop), so the query is read in fp16, saturated to its range."""
    return tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)


@triton.jit
def _packed_step(q, q_ptr, q_rows, n_rows, rows, tok_ok, kt, k_ix, k_live, vt, qk_scale, m_i, l_i, acc,
                 K_KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr,
                 ROWS_PAST_UNROLL: tl.constexpr, DEFER_ROW_SUMS: tl.constexpr):
    """One online-softmax step over a packed tile's loads (:func:`_packed_tile`)."""
    if K_KIND == 1:
        s = _sparse_logits(q_ptr, q_rows, n_rows, k_ix, kt, k_live, rows, BLOCK_M, BLOCK_N, UNROLL, ROWS_PAST_UNROLL)
    elif K_KIND == 4:
        s = tl.dot(_fp16_query(q), tl.trans(kt))
    else:
        s = tl.dot(q, tl.trans(kt.to(tl.bfloat16)))
    return _dense_values_step(s, vt, tok_ok[None, :], qk_scale, m_i, l_i, acc, DEFER_ROW_SUMS)


@triton.jit
def _entry(table_ptr, block_idx_ptr, j, ok):
    """Block ``j``'s table entry: kept tokens, key width, offset and aux, value width,
    offset and aux (``ok`` False: row 0's, never used)."""
    ent = table_ptr + tl.load(block_idx_ptr + j, mask=ok, other=0).to(tl.int64) * 9
    return (tl.load(ent).to(tl.int32), tl.load(ent + 2).to(tl.int32), tl.load(ent + 3), tl.load(ent + 4),
            tl.load(ent + 6).to(tl.int32), tl.load(ent + 7), tl.load(ent + 8))


@triton.jit
def _dense_step(q, kt, vt, visible, qk_scale, m_i, l_i, acc, DEFER_ROW_SUMS: tl.constexpr):
    """One online-softmax step over dense key and value rows ``kt``/``vt`` [BLOCK_N, d];
    ``visible`` [BLOCK_M or 1, BLOCK_N] masks the logits. Returns (m_i, l_i, acc)."""
    return _dense_values_step(tl.dot(q, tl.trans(kt.to(tl.bfloat16))), vt, visible, qk_scale, m_i, l_i, acc,
                              DEFER_ROW_SUMS)


@triton.jit
def _dense_values_step(s, vt, visible, qk_scale, m_i, l_i, acc, DEFER_ROW_SUMS: tl.constexpr):
    """:func:`_dense_step` from the tile's unscaled logits ``s`` [BLOCK_M, BLOCK_N].
    ``DEFER_ROW_SUMS``: ``l_i`` is [BLOCK_M, BLOCK_N], the probabilities summed per lane
    and reduced over the lanes once, at the item's end: a tile's lanes lie across the
    warps, so its row sum is a reduction through shared memory and barriers a tile."""
    s = s * qk_scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    if DEFER_ROW_SUMS:
        l_i = l_i * alpha[:, None] + p
    else:
        l_i = l_i * alpha + tl.sum(p, 1)
    if vt.dtype == tl.float16:
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), vt)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16), vt.to(tl.bfloat16))
    return m_new, l_i, acc


@triton.jit
def _mixed_attn_kernel(
    q_ptr, stride_qt, stride_qh,
    values_ptr, index_ptr, table_ptr, block_idx_ptr,
    tail_k_ptr, tail_v_ptr, stride_kt, stride_kh, stride_vt, stride_vh, tail_rows_ptr,
    req_ptr, items_ptr, item_list_ptr, count_ptr, o_part_ptr, lse_part_ptr, scratch_ptr, tiles_ptr,
    qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    K_KIND: tl.constexpr, V_KIND: tl.constexpr, R_MAX: tl.constexpr, R_LOG2: tl.constexpr,
    ALIGNED: tl.constexpr, SPARSE_MODE: tl.constexpr, TAIL_INDEXED: tl.constexpr, KEYS_BY_QUERY: tl.constexpr,
    PACK_TOKENS: tl.constexpr, PREFETCH: tl.constexpr, UNROLL: tl.constexpr, SPAN: tl.constexpr,
    STAGES: tl.constexpr, TILE_STARTS: tl.constexpr, TILE_BLOCKS: tl.constexpr, ROWS_PAST_UNROLL: tl.constexpr,
    DEFER_ROW_SUMS: tl.constexpr, BLOCK_STAGES: tl.constexpr,
):
    """Partial attention of the first ``count`` items in ``item_list`` (the count is read
    here, so a captured launch serves every later plan); ``K_KIND``/``V_KIND`` are the
    formats of all their blocks (0 dense, 1 sparse, 2 mask, 3 lowrank, 4 fp8), -1 for tail items.
    With ``TAIL_INDEXED`` a request's tail token ``i`` is row ``tail_rows[tail_start + i]``
    of the tail buffers (a paged pool's rows, read in place), else row ``tail_start + i``.
    ``PREFETCH`` loads the next block's table entry one block ahead (launches of a block
    per tile). ``SPAN`` > 0 (dense pairs): a tile is ``BLOCK_N // SPAN``
    whole blocks of at most ``SPAN`` kept tokens, read through a loop of ``STAGES``
    software-pipelined stages. ``TILE_STARTS`` (packed launches): each tile's start is
    read from the plan (entries ``tail_lo`` .. ``tail_hi`` of ``tiles``: block past
    ``block_lo`` << 16 | tokens of it taken), not found from the tile before, so the tile
    loop is pipelined ``STAGES`` deep too. A packed tile reads the entries of
    ``TILE_BLOCKS`` blocks at most (one a lane) and ends at the last. ``ROWS_PAST_UNROLL``
    False (packed sparse keys): no item has query rows past the ``UNROLL`` ones.
    ``DEFER_ROW_SUMS``: dense-key tiles sum their probabilities per lane (``l_t``), reduced
    once an item (:func:`_dense_values_step`). ``BLOCK_STAGES`` > 0 (launches of a block a
    tile): every block keeps at most ``BLOCK_N`` tokens, so a block is one tile, its loop
    over tiles has one pass (folded away), and the block loop, innermost then, is
    pipelined that many stages deep."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    toks = tl.arange(0, BLOCK_N)
    jr = tl.arange(0, R_MAX)
    scr_k = scratch_ptr + pid.to(tl.int64) * (2 * BLOCK_N * HEAD_DIM)
    scr_v = scr_k + BLOCK_N * HEAD_DIM
    for li in range(pid, tl.load(count_ptr), nprog):
        it = tl.load(item_list_ptr + li)
        item = items_ptr + it * 7
        b = tl.load(item)
        h = tl.load(item + 1)
        row0 = tl.load(item + 2)
        qo_start = tl.load(req_ptr + b * 4)
        nq = tl.load(req_ptr + b * 4 + 1)

        r = row0 + rows
        qi = r // GROUP
        row_ok = qi < nq
        q_rows = (qo_start + qi).to(tl.int64) * stride_qt + (h * GROUP + r % GROUP) * stride_qh
        q = tl.load(q_ptr + q_rows[:, None] + cols[None, :], mask=row_ok[:, None], other=0.0).to(tl.bfloat16)
        n_rows = tl.minimum(nq * GROUP - row0, BLOCK_M)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        if DEFER_ROW_SUMS:
            l_t = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        else:
            l_t = tl.zeros([BLOCK_M], tl.float32)

        if K_KIND < 0:
            # Dense tail, causal: query qi sees tail positions <= tail_len - nq + qi.
            tail_lo = tl.load(item + 5)
            tail_hi = tl.load(item + 6)
            tail_start = tl.load(req_ptr + b * 4 + 2).to(tl.int64)
            vis = tl.load(req_ptr + b * 4 + 3) - nq + qi
            for t0 in range(tail_lo, tail_hi, BLOCK_N):
                pos = t0 + toks
                pos_ok = pos < tail_hi
                tk = tail_start + pos
                if TAIL_INDEXED:
                    tk = tl.load(tail_rows_ptr + tk, mask=pos_ok, other=0).to(tl.int64)
                kt = tl.load(tail_k_ptr + tk[:, None] * stride_kt + h * stride_kh + cols[None, :], mask=pos_ok[:, None], other=0.0)
                vt = tl.load(tail_v_ptr + tk[:, None] * stride_vt + h * stride_vh + cols[None, :], mask=pos_ok[:, None], other=0.0)
                m_i, l_t, acc = _dense_step(q, kt, vt, pos_ok[None, :] & (pos[None, :] <= vis[:, None]), qk_scale,
                                            m_i, l_t, acc, DEFER_ROW_SUMS)
        elif SPAN > 0:
            # Each block in its own SPAN lanes, its dropped tokens' lanes masked: a tile's
            # addresses (block indices, entries, keys, values) follow from the loop index
            # alone, not from the tile before as packed tiles' do, so Triton's pipeliner
            # keeps STAGES tiles' loads in flight (shared memory, not registers).
            blk_lo = tl.load(item + 3)
            blk_hi = tl.load(item + 4)
            lane_tok = toks % SPAN
            for j0 in tl.range(blk_lo, blk_hi, BLOCK_N // SPAN, num_stages=STAGES):
                # Its own entry loads, not _tile_entries': through that helper with the lanes'
                # blocks as a vector, this launch took 206 registers against 110 and the
                # packed one 154 against 128 (sm_90, Triton 3.6, registers.py).
                j = j0 + toks // SPAN
                b_ok = j < blk_hi
                ent = table_ptr + tl.load(block_idx_ptr + j, mask=b_ok, other=0).to(tl.int64) * 9
                tok_ok = lane_tok < tl.load(ent, mask=b_ok, other=0)
                k_off = tl.load(ent + 3, mask=b_ok, other=0)
                v_off = tl.load(ent + 7, mask=b_ok, other=0)
                if ALIGNED:
                    k_off = tl.multiple_of(k_off, 8)
                    v_off = tl.multiple_of(v_off, 8)
                rows_k = k_off[:, None] + lane_tok[:, None] * HEAD_DIM + cols[None, :]
                rows_v = v_off[:, None] + lane_tok[:, None] * HEAD_DIM + cols[None, :]
                kt = tl.load(values_ptr + rows_k, mask=tok_ok[:, None], other=0.0)
                vt = tl.load(values_ptr + rows_v, mask=tok_ok[:, None], other=0.0)
                m_i, l_t, acc = _dense_step(q, kt, vt, tok_ok[None, :], qk_scale, m_i, l_t, acc, DEFER_ROW_SUMS)
        elif PACK_TOKENS:
            # Dense blocks' kept tokens back to back, BLOCK_N to a tile whatever each block
            # keeps (the presets keep 0-32 of a 32-token segment, mostly 8 or 16): one chain
            # of dependent loads per tile instead of per block (:func:`_packed_tile`).
            blk_hi = tl.load(item + 4)
            j0 = tl.load(item + 3)
            if TILE_STARTS:
                for t in tl.range(tl.load(item + 5), tl.load(item + 6), num_stages=STAGES):
                    start = tl.load(tiles_ptr + t)
                    tok_ok, kt, k_ix, k_live, vt, _, _ = _packed_tile(
                        table_ptr, block_idx_ptr, values_ptr, index_ptr, j0 + (start >> 16),
                        start & 0xFFFF, blk_hi, toks, cols, jr, K_KIND, V_KIND, HEAD_DIM, BLOCK_N, ALIGNED, TILE_BLOCKS,
                        STAGES == 1 or ROWS_PAST_UNROLL)
                    m_i, l_t, acc = _packed_step(q, q_ptr, q_rows, n_rows, rows, tok_ok, kt, k_ix, k_live, vt, qk_scale,
                                                 m_i, l_t, acc, K_KIND, BLOCK_M, BLOCK_N, UNROLL, ROWS_PAST_UNROLL,
                                                 DEFER_ROW_SUMS)
            else:
                done = j0 * 0
                while j0 < blk_hi:
                    tok_ok, kt, k_ix, k_live, vt, j0, done = _packed_tile(
                        table_ptr, block_idx_ptr, values_ptr, index_ptr, j0, done, blk_hi, toks, cols, jr, K_KIND,
                        V_KIND, HEAD_DIM, BLOCK_N, ALIGNED, TILE_BLOCKS, True)
                    m_i, l_t, acc = _packed_step(q, q_ptr, q_rows, n_rows, rows, tok_ok, kt, k_ix, k_live, vt, qk_scale,
                                                 m_i, l_t, acc, K_KIND, BLOCK_M, BLOCK_N, UNROLL, ROWS_PAST_UNROLL,
                                                 DEFER_ROW_SUMS)
        else:
            blk_lo = tl.load(item + 3)
            blk_hi = tl.load(item + 4)
            # With PREFETCH the next block's table entry is loaded before this block's tiles
            # are read: its two dependent loads (block index, entry) then wait behind this
            # block's work instead of in front of the next one's.
            n_m, n_kw, n_koff, n_kaux, n_vw, n_voff, n_vaux = _entry(table_ptr, block_idx_ptr, blk_lo, blk_lo < blk_hi)
            for j in tl.range(blk_lo, blk_hi, num_stages=max(BLOCK_STAGES, 1)):
                if PREFETCH:
                    m, k_w, k_off, k_aux, v_w, v_off, v_aux = n_m, n_kw, n_koff, n_kaux, n_vw, n_voff, n_vaux
                    n_m, n_kw, n_koff, n_kaux, n_vw, n_voff, n_vaux = _entry(table_ptr, block_idx_ptr, j + 1,
                                                                             j + 1 < blk_hi)
                else:
                    m, k_w, k_off, k_aux, v_w, v_off, v_aux = _entry(table_ptr, block_idx_ptr, j, True)
                if ALIGNED:
                    k_off = tl.multiple_of(k_off, 8)
                    v_off = tl.multiple_of(v_off, 8)
                    k_w = tl.multiple_of(k_w, 8)
                    v_w = tl.multiple_of(v_w, 8)
                    if (K_KIND == 1) or (K_KIND == 4):
                        k_aux = tl.multiple_of(k_aux, 16)
                    if (V_KIND == 1) or (V_KIND == 4):
                        v_aux = tl.multiple_of(v_aux, 16)
                # Projected keys: logits = (q @ basisᵀ) @ coefᵀ; a mask's basis is one-hot,
                # so q @ basisᵀ is q's kept channels, gathered.
                qk = q
                qk_lo = q  # low half of a projected query (lowrank): bf16 hi + lo keeps fp32 accuracy
                if K_KIND == 4:
                    qk = _fp16_query(q)
                elif K_KIND == 2:
                    ch = tl.load(index_ptr + k_aux + jr, mask=jr < k_w, other=0).to(tl.int32)
                    qk = tl.load(q_ptr + q_rows[:, None] + ch[None, :], mask=row_ok[:, None] & (jr < k_w)[None, :], other=0.0)
                    qk = qk.to(tl.bfloat16)
                elif K_KIND == 3:
                    kb = _basis(values_ptr, index_ptr, k_w, k_aux, jr, cols, K_KIND, HEAD_DIM, ALIGNED)
                    qk32 = tl.dot(q, tl.trans(kb))
                    qk = qk32.to(tl.bfloat16)
                    qk_lo = (qk32 - qk.to(tl.float32)).to(tl.bfloat16)
                blk_acc = tl.zeros([BLOCK_M, R_MAX], tl.float32)  # the block's r-space values (mask, lowrank)
                if BLOCK_STAGES > 0:
                    t_hi = BLOCK_N  # a constant one-pass loop, which Triton folds away
                else:
                    t_hi = m
                for t0 in range(0, t_hi, BLOCK_N):
                    tok = t0 + toks
                    m_i, l_i, acc, blk_acc = _tile_step(
                        q, qk, qk_lo, q_ptr, q_rows, n_rows, values_ptr, index_ptr, k_off, k_w, k_aux, v_off, v_w, v_aux,
                        tok, m, toks, cols, jr, rows, scr_k, scr_v, qk_scale, m_i, l_i, acc, blk_acc, K_KIND, V_KIND,
                        HEAD_DIM, BLOCK_M, BLOCK_N, R_MAX, R_LOG2, SPARSE_MODE, KEYS_BY_QUERY, ALIGNED)
                if (V_KIND == 2) or (V_KIND == 3):  # fold the block's r-space values back: acc += blk_acc @ basis
                    vb = _basis(values_ptr, index_ptr, v_w, v_aux, jr, cols, V_KIND, HEAD_DIM, ALIGNED)
                    acc_hi = blk_acc.to(tl.bfloat16)
                    acc += tl.dot(acc_hi, vb) + tl.dot((blk_acc - acc_hi.to(tl.float32)).to(tl.bfloat16), vb)

        if DEFER_ROW_SUMS:
            l_i += tl.sum(l_t, 1)
        else:
            l_i += l_t
        has = l_i > 0
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        out_rows = (it * BLOCK_M + rows).to(tl.int64)
        tl.store(o_part_ptr + out_rows[:, None] * HEAD_DIM + cols[None, :], o)
        tl.store(lse_part_ptr + out_rows, lse)


@triton.jit
def _merge_kernel(
    o_part_ptr, lse_part_ptr, groups_ptr, merge_indptr_ptr, num_groups_ptr, req_ptr, out_ptr, stride_ot, stride_oh,
    lse_out_ptr, stride_lt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    """Log-sum-exp merge of a group's items; a row with no visible key gets zeros. With
    ``WRITE_LSE`` also each row's natural log-sum-exp of its scaled logits (-inf if none).
    Programs past ``num_groups`` (a captured grid sized for the largest batch) exit."""
    gid = tl.program_id(0)
    if gid >= tl.load(num_groups_ptr):
        return
    b = tl.load(groups_ptr + gid * 3)
    h = tl.load(groups_ptr + gid * 3 + 1)
    row0 = tl.load(groups_ptr + gid * 3 + 2)
    lo = tl.load(merge_indptr_ptr + gid)
    hi = tl.load(merge_indptr_ptr + gid + 1)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for it in range(lo, hi):
        part = (it * BLOCK_M + rows).to(tl.int64)
        lse = tl.load(lse_part_ptr + part)
        o = tl.load(o_part_ptr + part[:, None] * HEAD_DIM + cols[None, :])
        m_new = tl.maximum(m, lse)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp2(m - m_ref)
        w = tl.exp2(lse - m_ref)
        acc = acc * a[:, None] + o * w[:, None]
        l = l * a + w
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    qo_start = tl.load(req_ptr + b * 4)
    nq = tl.load(req_ptr + b * 4 + 1)
    r = row0 + rows
    qi = r // GROUP
    dst = (qo_start + qi).to(tl.int64) * stride_ot + (h * GROUP + r % GROUP) * stride_oh
    tl.store(out_ptr + dst[:, None] + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=(qi < nq)[:, None])
    if WRITE_LSE:
        lse_row = tl.where(l > 0, (m + tl.log2(tl.where(l > 0, l, 1.0))) / 1.4426950408889634, float("-inf"))
        dst_lse = (qo_start + qi).to(tl.int64) * stride_lt + h * GROUP + r % GROUP
        tl.store(lse_out_ptr + dst_lse, lse_row, mask=qi < nq)


class MixedAttention:
    """Plan/run engine shared by the decode and extend wrappers (FlashInfer calling style).

    ``plan`` takes host-side metadata and uploads it once per batch; ``run`` takes only
    tensors and launches two fixed grids, so it can be captured in a CUDA graph (replay
    reads whatever ``q``, the arena and the tail buffers hold at replay time).
    """

    def __init__(
        self,
        block_m: int = 16,
        block_n: int = 32,
        num_warps: int = 4,
        num_stages: int = 1,
        sparse_densify: str = "scan",
        keys_by_query: bool = True,
        wide_block_n: int = 64,
        pack_tokens: bool = False,
        prefetch_entries: bool = False,
        pack_sparse_keys: bool = False,
        chunk_by_kind: bool = False,
        unroll_group: bool = False,
        block_span: int = 0,
        pipeline_stages: int = 3,
        tile_starts: bool = False,
        tile_blocks: int = 0,
        dense_num_warps: int = 0,
        sparse_key_stages: int = 0,
        defer_row_sums: bool = False,
        max_registers: int = 0,
        block_stages: int = 0,
        fp8_block_n: int = 0,
    ) -> None:
        """``block_n``: tokens per tile of launches with a sparse side (whose densify grows
        with the tile); ``wide_block_n``: of the others (dense, mask, low-rank, tails),
        where a longer tile keeps more bytes in flight, one block per tile (packed tiles
        are better at 32: see ``sglang_patch.attention``). ``pack_tokens``: tiles of dense
        launches hold kept tokens of consecutive blocks back to back (blocks that dropped
        most tokens fill a tile together). ``prefetch_entries``: launches of one block per
        tile load each block's table entry one block ahead (``benchmarks/kernels/diag_formats.py``
        compares both).
        ``pack_sparse_keys``: with ``pack_tokens``, blocks of per-vector sparse keys and
        dense values share tiles too (their keys read by query gathers): in the tenth
        run's ncu profile their launch, one block per tile, moved 5% of DRAM's bandwidth.
        ``chunk_by_kind``: cut each format pair's blocks into runs by that pair's own work
        (:func:`~mosaickv.kernels.layout.kind_chunk_tokens`), so a launch of a pair with
        few tokens still has an item per program slot. ``unroll_group``: in packed tiles
        (``pack_sparse_keys``), sparse keys read by query gathers gather for a GQA group's
        rows in one unrolled step, not one row after another (in the twelfth run's ncu
        profile that launch read 12% of DRAM's bandwidth, latency-bound at 17% occupancy;
        one block a tile, unrolled, it would take 240 registers against 148).
        ``block_span`` > 0: launches of dense keys and values (instead of packing) take
        tiles of ``wide_block_n // block_span`` whole blocks, each in ``block_span`` lanes
        (blocks must keep at most that many tokens: the plan checks), through a loop that
        Triton pipelines ``pipeline_stages`` deep: a packed tile's addresses wait on the
        tile before, these on the loop index alone. ``tile_starts``: the plan finds where
        each packed tile starts (:func:`~mosaickv.kernels.block_runs.run_tile_starts`, with
        each request's runs), so packed launches pipeline their tile loop
        ``pipeline_stages`` deep as well. ``tile_blocks`` (with ``tile_starts``; a power of
        two, 0: as many as the tile's tokens): blocks a packed tile reads at most, one table
        entry a lane, so less index work a tile; a tile reaching its last lane ends there,
        and the plan's tile starts say so (:class:`~mosaickv.kernels.block_runs.TileShape`).
        ``dense_num_warps`` (0: ``num_warps``): warps of the launches of dense keys and values
        (one warp keeps a tile's softmax reductions inside it; the packed sparse-key launch
        takes 255 registers on one). ``sparse_key_stages`` > 0 (with ``tile_starts``): packed
        sparse-key launches whose plan has one query token a request (decode) pipeline their
        tile loop that many stages deep, compiled without the loop over query rows past the
        GQA group, which kept Triton from pipelining it (their own stages: at 7, the dense
        pairs' best, they take 229 registers against 128 at 3; registers.py
        --sparse-key-stages). ``defer_row_sums``: launches of dense keys keep each row's
        probability sums per lane and reduce them once an item, not once a tile (the
        tile's lanes lie across the warps: a reduction through shared memory and barriers).
        ``max_registers`` > 0: packed launches are compiled to at most that many registers a
        thread (Triton's ``maxnreg``; 0: as the compiler chooses), to keep occupancy where
        a change adds a few. ``block_stages`` > 0: launches of a block a tile (neither
        packed nor spanned: masks, low rank, sparse values) read each block as one tile and
        pipeline their block loop that many stages deep; a block's loop over its tiles had
        kept that loop from being innermost, which Triton's pipeliner needs. The plan then
        refuses blocks of those launches keeping more than a tile's tokens (the server's
        32-token segments fit its 32-token tiles). ``fp8_block_n`` > 0: tokens a packed tile
        of whole rows holds where a side is fp8 (0: ``wide_block_n``): such a tile carries
        half a dense tile's bytes for more instructions a token (each is widened to fp16), so
        a longer one moves as many bytes a pass; timed (``benchmarks/kernels/diag_formats.py``
        settings 39 and 40, thirtieth run), 64 and 128 rows were slower than 32: off by default."""
        if sparse_densify not in SPARSE_MODES:
            raise ValueError(f"sparse_densify={sparse_densify!r} is not one of {', '.join(SPARSE_MODES)}")
        if pack_sparse_keys and not (pack_tokens and keys_by_query):
            raise ValueError("pack_sparse_keys=True packs sparse keys read by query gathers into packed tiles: it "
                             f"needs pack_tokens=True and keys_by_query=True, got {pack_tokens} and {keys_by_query}")
        if block_span and (block_span & (block_span - 1) or wide_block_n % block_span):
            raise ValueError(f"block_span={block_span} must be a power of two dividing wide_block_n={wide_block_n}")
        if pipeline_stages < 1:
            raise ValueError(f"pipeline_stages={pipeline_stages} must be at least 1")
        if tile_blocks and (tile_blocks & (tile_blocks - 1) or not tile_starts):
            raise ValueError(f"tile_blocks={tile_blocks} must be 0 or a power of two, and needs tile_starts=True "
                             f"(got {tile_starts}): the plan's tile starts are where capped tiles end")
        if sparse_key_stages < 0 or (sparse_key_stages and not (tile_starts and pack_sparse_keys and unroll_group)):
            raise ValueError(f"sparse_key_stages={sparse_key_stages} pipelines packed sparse-key tiles by their planned "
                             f"starts: it needs tile_starts, pack_sparse_keys and unroll_group, got {tile_starts}, "
                             f"{pack_sparse_keys} and {unroll_group}")
        if block_stages < 0:
            raise ValueError(f"block_stages={block_stages} must be 0 (a block's tiles in a loop of their own) or more")
        if max_registers and not 24 <= max_registers <= 255:
            raise ValueError(f"max_registers={max_registers} must be 0 (the compiler's choice) or from 24 to 255")
        if fp8_block_n and (fp8_block_n & (fp8_block_n - 1) or not 16 <= fp8_block_n <= 128):
            raise ValueError(f"fp8_block_n={fp8_block_n} must be 0 (wide_block_n) or a power of two from 16 to 128")
        if dense_num_warps & (dense_num_warps - 1) or dense_num_warps > 8:
            raise ValueError(f"dense_num_warps={dense_num_warps} must be 0 (num_warps) or a power of two up to 8")
        self.tile_blocks, self.dense_num_warps, self.sparse_key_stages = tile_blocks, dense_num_warps, sparse_key_stages
        self.defer_row_sums, self.max_registers, self.block_stages = defer_row_sums, max_registers, block_stages
        self.fp8_block_n = fp8_block_n
        self.block_span, self.pipeline_stages, self.tile_starts = block_span, pipeline_stages, tile_starts
        self.block_m, self.block_n, self.wide_block_n = block_m, block_n, wide_block_n
        self.pack_tokens, self.pack_sparse_keys = pack_tokens, pack_sparse_keys
        self.prefetch_entries, self.chunk_by_kind = prefetch_entries, chunk_by_kind
        self.unroll_group = unroll_group
        self.sparse_densify, self.keys_by_query = sparse_densify, keys_by_query
        self.num_warps, self.num_stages = num_warps, num_stages
        self._plan: AttentionPlan | None = None
        self._tile_shape = self._find_tile_shape()  # fixed with the tuning; read by every decode step's plan

    def settings(self) -> dict[str, object]:
        """The constructor's arguments: ``MixedDecodeWrapper(**tuning.settings())`` runs as
        ``tuning`` does (a benchmark timing the server's tuning)."""
        return {name: getattr(self, name) for name in inspect.signature(MixedAttention.__init__).parameters
                if name != "self"}

    def plan_arena(
        self,
        arena: Arena,
        block_indptr: np.ndarray,
        block_indices: np.ndarray,
        tail_k: torch.Tensor,
        tail_v: torch.Tensor,
        tail_indptr: np.ndarray,
        qo_lens: np.ndarray,
        num_qo_heads: int,
        num_kv_heads: int,
        scale: float | None = None,
        chunk_tokens: int | None = None,
        max_programs: int | None = None,
    ) -> None:
        """Plan over blocks already in ``arena``; tails are ragged ``[sum t, Hkv, d]``."""
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"{num_qo_heads} query heads are not a multiple of {num_kv_heads} KV heads")
        d = arena.head_dim
        if tail_k.shape[1:] != (num_kv_heads, d) or tail_v.shape != tail_k.shape:
            raise ValueError(f"tails must be [tokens, {num_kv_heads}, {d}], got {tuple(tail_k.shape)}")
        group = num_qo_heads // num_kv_heads
        block_m = max(self.block_m, triton.next_power_of_2(group))
        tail_lens = np.diff(np.asarray(tail_indptr, dtype=np.int64))
        self._check_block_tokens(arena, block_indices)
        self._plan = build_plan(
            arena, block_indptr, block_indices, qo_lens, tail_lens, num_kv_heads, group, block_m, self.block_n,
            chunk_tokens, max_programs, self.chunk_by_kind, self.tile_shape(),
        )
        self._arena, self._tail_k, self._tail_v = arena, tail_k, tail_v
        self._group, self._hq = group, num_qo_heads
        self._scale = 1.0 / math.sqrt(d) if scale is None else scale

    def plan_layers(
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
        """Pack ``layers`` (one layer per request) into an arena on ``device`` and plan."""
        arena, indptr, indices = pack_requests(layers, num_kv_heads, head_dim)
        tail_k, tail_indptr = ragged_tails(tails_k)
        tail_v, _ = ragged_tails(tails_v)
        dev = torch.device(device)
        self.plan_arena(
            arena.to(dev), indptr, indices, tail_k.to(dev, torch.bfloat16), tail_v.to(dev, torch.bfloat16), tail_indptr,
            np.asarray(qo_lens), num_qo_heads, num_kv_heads, scale, chunk_tokens, max_programs,
        )

    def tile_shape(self) -> TileShape | None:
        """Each format pair's packed tile length, 0 where not packed (``KIND_PAIRS``
        entries, ``NUM_KINDS * k_kind + v_kind``), and ``tile_blocks``: what a plan finds tile
        starts for; None without ``tile_starts``."""
        return self._tile_shape

    def _find_tile_shape(self) -> TileShape | None:
        if not self.tile_starts:
            return None
        pairs = [pair_kinds(kind) for kind in range(KIND_PAIRS)]
        widths = np.asarray([self.tile_n(k, v) if self.packs(k, v) else 0 for k, v in pairs], dtype=np.int64)
        return TileShape(widths, self.tile_blocks)

    def warps(self, k_kind: int, v_kind: int) -> int:
        """Warps of a launch of this format pair."""
        return self.dense_num_warps or self.num_warps if (k_kind, v_kind) == (DENSE, DENSE) else self.num_warps

    def stages(self, k_kind: int, v_kind: int) -> int:
        """Pipeline stages of a launch of this format pair's tile loop: packed sparse keys'
        own with ``sparse_key_stages``."""
        if k_kind == SPARSE and self.sparse_key_stages and self.packs(k_kind, v_kind):
            return self.sparse_key_stages
        return self.pipeline_stages

    def rows_past_unroll(self, k_kind: int, v_kind: int, rows: int, group: int) -> bool:
        """Whether a launch of this format pair is compiled for items with query rows past
        the unrolled GQA group (``rows``: the plan's most an item holds); only packed
        sparse keys with ``sparse_key_stages`` leave them out."""
        packed_sparse = k_kind == SPARSE and self.packs(k_kind, v_kind) and self.sparse_key_stages > 0
        return not (packed_sparse and rows <= (group if self.unroll_group else 0))

    def tile_lanes(self, k_kind: int, v_kind: int) -> int:
        """Block entries a packed tile of this format pair reads (the kernel's ``TILE_BLOCKS``)."""
        return self.tile_blocks or self.tile_n(k_kind, v_kind)

    def tile_n(self, k_kind: int, v_kind: int) -> int:
        """Tokens per tile of a launch of this format pair."""
        if SPARSE in (k_kind, v_kind):
            return self.block_n
        if self.fp8_block_n and FP8 in (k_kind, v_kind) and self.packs(k_kind, v_kind):
            return self.fp8_block_n
        return self.wide_block_n

    def packs(self, k_kind: int, v_kind: int) -> bool:
        """Whether a launch of this format pair packs tokens of several blocks per tile:
        pairs of whole rows (dense or fp8), and with ``pack_sparse_keys`` sparse keys beside
        whole values (a mask's or low-rank basis is per block, and a sparse tile's densify
        is per block)."""
        if not self.pack_tokens or v_kind not in (DENSE, FP8) or self.span(k_kind, v_kind):
            return False
        return k_kind in (DENSE, FP8) or (k_kind == SPARSE and self.pack_sparse_keys)

    def span(self, k_kind: int, v_kind: int) -> int:
        """Lanes a block takes in a launch of this format pair (0: not spanned)."""
        return self.block_span if (k_kind, v_kind) == (DENSE, DENSE) else 0

    def block_loop_stages(self, k_kind: int, v_kind: int) -> int:
        """Pipeline stages of a launch's block loop (the kernel's ``BLOCK_STAGES``): 0 but
        for launches of a block a tile with ``block_stages``."""
        if k_kind < 0 or self.packs(k_kind, v_kind) or self.span(k_kind, v_kind):
            return 0
        return self.block_stages

    def _check_block_tokens(self, arena: Arena, block_indices: np.ndarray) -> None:
        """Refuse blocks keeping more tokens than their launch reads of a block: a spanned
        launch ``block_span``, a launch of a block a tile with ``block_stages`` one tile."""
        pairs = [pair_kinds(kind) for kind in range(KIND_PAIRS)]
        limits = np.asarray([self.span(k, v) or (self.tile_n(k, v) if self.block_loop_stages(k, v) else 0)
                             for k, v in pairs], dtype=np.int64)
        if not limits.any():
            return
        entries = arena.table_host[np.asarray(block_indices, dtype=np.int64)]
        kinds = NUM_KINDS * entries[:, 1] + entries[:, 5]
        over = entries[:, 0] > np.where(limits[kinds] > 0, limits[kinds], np.iinfo(np.int64).max)
        if not over.any():
            return
        k_kind, v_kind = pair_kinds(kinds[over][0])
        kept = int(entries[over & (kinds == kinds[over][0]), 0].max())
        if self.span(k_kind, v_kind):
            raise ValueError(f"block_span={self.block_span} but a dense block keeps {kept} tokens: "
                             "block_span must be at least every dense block's kept tokens")
        raise ValueError(f"block_stages={self.block_stages} reads a block as one tile of {self.tile_n(k_kind, v_kind)} "
                         f"tokens, but a block of key kind {k_kind} and value kind {v_kind} keeps {kept}: "
                         "use segments of at most a tile")

    def compile_options(self, k_kind: int, v_kind: int) -> dict[str, int]:
        """Triton compile options of a launch of this format pair beside warps and stages:
        ``max_registers`` holds packed launches only; on the others the bound made ptxas
        take more registers than it does unbounded (low rank 120 against 92, sm_90)."""
        return {"maxnreg": self.max_registers} if self.max_registers and self.packs(k_kind, v_kind) else {}

    def prefetches(self, k_kind: int, v_kind: int) -> bool:
        """Whether a launch of this format pair loads each block's table entry one block
        ahead: ``prefetch_entries``, in launches of a block per tile."""
        return self.prefetch_entries and not self.packs(k_kind, v_kind) and not self.span(k_kind, v_kind)

    @property
    def plan_info(self) -> AttentionPlan:
        if self._plan is None:
            raise RuntimeError("call plan before run")
        return self._plan

    def run(self, q: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of ``q`` ``[total_q, Hq, d]`` (ragged over requests) -> ``out`` like ``q``."""
        p = self.plan_info
        a = self._arena
        if q.shape != (p.total_q, self._hq, a.head_dim) or q.stride(-1) != 1:
            raise ValueError(f"q must be [{p.total_q}, {self._hq}, {a.head_dim}] with unit last stride, got {tuple(q.shape)}")
        out = torch.empty_like(q) if out is None else out
        run_plan(p, a.values, a.index, a.table, a.widths_aligned, self._tail_k, self._tail_v, None, q, out,
                 self._scale, self._group, self)
        return out


def compile_variants(
    variants: Sequence[tuple[int, int, int]],
    tuning: MixedAttention,
    group: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    aligned: bool,
    tail_indexed: bool,
    with_lse: bool,
    device: torch.device | str,
) -> None:
    """Compile the kernels a server will launch before its first batch needs them: each
    ``(k_kind, v_kind, R_MAX)`` of :func:`~mosaickv.kernels.layout.launch_variants` and the
    merge, launched over no items on buffers of the real dtypes and stride classes (Triton
    specialises on those, on 16-byte pointer alignment and on constants only)."""
    dev = torch.device(device)
    hq = group * num_kv_heads
    block_m = max(tuning.block_m, triton.next_power_of_2(group))
    i32 = torch.zeros(16, dtype=torch.int32, device=dev)
    q = torch.zeros(1, hq, head_dim, dtype=dtype, device=dev)
    tail = torch.zeros(1, num_kv_heads, head_dim, dtype=dtype, device=dev)
    plan = AttentionPlan(
        requests=i32[:4].view(1, 4), items=i32[:7].view(1, 7), groups=i32[:3].view(1, 3), merge_indptr=i32[4:6],
        num_groups=i32[12:13], block_indices=i32[8:12],
        launches=[Launch(k, v, r, i32[12:12], i32[12:13], 1) for k, v, r in variants],
        o_part=torch.zeros(1, block_m, head_dim, dtype=torch.float32, device=dev),
        lse_part=torch.zeros(1, block_m, dtype=torch.float32, device=dev),
        scratch=torch.zeros(1, 2, tuning.block_n, head_dim, dtype=torch.bfloat16, device=dev),
        block_m=block_m, block_n=tuning.block_n, total_q=1, tiles=i32[:1] if tuning.tile_starts else None,
    )
    lse = torch.zeros(1, hq, dtype=torch.float32, device=dev) if with_lse else None
    run_plan(plan, torch.zeros(16, dtype=torch.bfloat16, device=dev), torch.zeros(16, dtype=torch.uint8, device=dev),
             torch.zeros(1, 9, dtype=torch.int64, device=dev), aligned, tail, tail, i32[:4] if tail_indexed else None,
             q, torch.zeros_like(q), 1.0, group, tuning, lse)


def run_plan(
    p: AttentionPlan,
    values: torch.Tensor,
    index: torch.Tensor,
    table: torch.Tensor,
    aligned: bool,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    tail_rows: torch.Tensor | None,
    q: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    group: int,
    tuning: MixedAttention,
    lse_out: torch.Tensor | None = None,
) -> None:
    """Launch one plan: a kernel per (key, value) format pair, then the merge into ``out``
    ``[total_q, Hq, d]`` (and ``lse_out`` ``[total_q, Hq]`` float32 when given). Tails are
    ``[rows, Hkv, d]``; ``tail_rows`` (int32) maps each request's tail tokens to rows,
    else they are stored back to back. ``tuning`` supplies tile sizes and warps."""
    d = q.shape[-1]
    rows = p.requests if tail_rows is None else tail_rows
    if tuning.tile_starts and p.tiles is None:
        raise ValueError("tile_starts=True reads packed tiles' starts from the plan, and this plan has none: plan it "
                         "with tile_shape=tuning.tile_shape() (MixedAttention.plan_arena and plan_layers do)")
    tiles = p.items if p.tiles is None or not len(p.tiles) else p.tiles
    for ln in p.launches:
        _mixed_attn_kernel[(ln.num_programs,)](
            q, q.stride(0), q.stride(1),
            values, index, table, p.block_indices,
            tail_k, tail_v, tail_k.stride(0), tail_k.stride(1), tail_v.stride(0), tail_v.stride(1), rows,
            p.requests, p.items, ln.items, ln.count, p.o_part, p.lse_part, p.scratch, tiles,
            scale * LOG2E,
            GROUP=group, HEAD_DIM=d, BLOCK_M=p.block_m, BLOCK_N=tuning.tile_n(ln.k_kind, ln.v_kind),
            K_KIND=ln.k_kind, V_KIND=ln.v_kind, R_MAX=ln.r_max, R_LOG2=ln.r_max.bit_length() - 1,
            ALIGNED=aligned, SPARSE_MODE=SPARSE_MODES.index(tuning.sparse_densify), TAIL_INDEXED=tail_rows is not None,
            KEYS_BY_QUERY=tuning.keys_by_query, PACK_TOKENS=tuning.packs(ln.k_kind, ln.v_kind),
            PREFETCH=tuning.prefetches(ln.k_kind, ln.v_kind),
            UNROLL=group if tuning.unroll_group else 0, SPAN=tuning.span(ln.k_kind, ln.v_kind),
            STAGES=tuning.stages(ln.k_kind, ln.v_kind),
            TILE_STARTS=tuning.tile_starts and tuning.packs(ln.k_kind, ln.v_kind),
            TILE_BLOCKS=tuning.tile_lanes(ln.k_kind, ln.v_kind),
            ROWS_PAST_UNROLL=tuning.rows_past_unroll(ln.k_kind, ln.v_kind, min(p.block_m, p.max_q * group), group),
            DEFER_ROW_SUMS=tuning.defer_row_sums,
            BLOCK_STAGES=tuning.block_loop_stages(ln.k_kind, ln.v_kind),
            num_warps=tuning.warps(ln.k_kind, ln.v_kind), num_stages=tuning.num_stages, **tuning.compile_options(ln.k_kind, ln.v_kind),
        )
    if p.groups.shape[0]:
        lse = out if lse_out is None else lse_out
        _merge_kernel[(p.groups.shape[0],)](
            p.o_part, p.lse_part, p.groups, p.merge_indptr, p.num_groups, p.requests, out, out.stride(0), out.stride(1),
            lse, lse.stride(0), GROUP=group, HEAD_DIM=d, BLOCK_M=p.block_m, WRITE_LSE=lse_out is not None,
            num_warps=4,
        )


class MixedDecodeWrapper(MixedAttention):
    """Batch decode (one query token per request) over mixed-format segments + dense tail.

    ``plan(layers, tails_k, tails_v, ...)`` then ``run(q [B, Hq, d]) -> [B, Hq, d]``; the
    query is the last token of its tail (if the tail is empty it sees only the segments).
    """

    def plan(
        self,
        layers: Sequence[CompressedLayer],
        tails_k: Sequence[torch.Tensor],
        tails_v: Sequence[torch.Tensor],
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        scale: float | None = None,
        chunk_tokens: int | None = None,
        max_programs: int | None = None,
    ) -> None:
        self.plan_layers(
            layers, tails_k, tails_v, [1] * len(layers), num_qo_heads, num_kv_heads, head_dim, device, scale,
            chunk_tokens, max_programs,
        )
