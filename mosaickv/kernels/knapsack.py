"""The sealing knapsack in one launch: a program per problem (a segment's blocks).

:func:`mosaickv.policies.strategies.knapsack` in PyTorch ops is about 320 launches a
sealing call, half of its ops, each waiting on the host (thirteenth run, H200: an 8B-shaped
call of 32 segments took 32.3 ms, 16.8 of it kernels, the rest the host launching and
waiting). Here the same search runs inside one program per problem: the many-way search
for the price of a byte, the cheapest plan where even the dearest price overspends, the
free plan where it fits, then the upgrade passes. In the fourteenth run (H200, the same
call) it took 6.8 ms of GPU time in one launch, a program per segment working alone, so a
round's ways are now searched by halves (4 plans of 16 ways, not 15) and only the last
price that fits is planned. A pass takes each row's most efficient
affordable upgrade in order of efficiency while bytes remain: the row's place in that
order is counted against every other row (ties by row), so no sort is needed.

Float64 throughout, as the PyTorch version: the values are losses that span many scales.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mosaickv.kernels._interpret import patch_interpreter
from mosaickv.uploads import upload

patch_interpreter()

# One compiled variant whatever the model and policy (rows and options are not specialized
# on): tiles of 16 rows by up to MAX_OPTIONS options, 8 float64 elements a thread at eight
# warps. The mosaic preset prices 73 options; a policy with more is solved by the PyTorch
# ops. On an H200 (fifteenth run, h200_2026-12-01c: bench_pricing_ops.py, an 8B call's 32 x
# 256 x 73) it took 1.94 ms against 2.78 at four warps and 1.85 with 32-row tiles at eight,
# every tile picking what the ops pick (4.35 ms). Compiled for sm_90: 202 registers, no stack
# (results/registers_sealing_sm90_triton36.json), 32x8 255 and 8 bytes of stack
# (results/registers_knapsack_tiles_sm90_triton36.json); Triton 3.9 spills 8 bytes of 16x8
# and none of 32x8 (..._triton39.json). Once per machine (Triton's disk cache).
MAX_OPTIONS = 128
BLOCK_ROWS = 16
NUM_WARPS = 8


@triton.jit
def _best(v, c, price, rmask, offs_o):
    """Each row's best option of a tile ``v`` (-inf past the options) at ``price``, and
    their bytes summed over the tile's rows."""
    best = tl.argmax(v - (price * c)[None, :], axis=1)
    spent = tl.sum(tl.where(rmask, tl.sum(tl.where(offs_o[None, :] == best[:, None], c[None, :], 0.0), axis=1), 0.0), axis=0)
    return best, spent


@triton.jit
def _pick(value, cost, out, price, rows, n_options, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr, STORE: tl.constexpr):
    """Each row's best option at ``price`` (stored to ``out`` with STORE); returns their bytes."""
    offs_o = tl.arange(0, BLOCK_O)
    omask = offs_o < n_options
    c = tl.load(cost + offs_o, mask=omask, other=0.0)
    total = tl.sum(tl.zeros([BLOCK_R], dtype=tl.float64), axis=0)
    for start in range(0, rows, BLOCK_R):
        offs_r = start + tl.arange(0, BLOCK_R)
        rmask = offs_r < rows
        v = tl.load(value + offs_r[:, None] * n_options + offs_o[None, :], mask=rmask[:, None] & omask[None, :],
                    other=float("-inf"))
        best, spent = _best(v, c, price, rmask, offs_o)
        total += spent
        if STORE:
            tl.store(out + offs_r, best.to(tl.int64), mask=rmask)
    return total


@triton.jit
def _first_fit(value, cost, choice, lo, hi, budget, rows, n_options, WAYS: tl.constexpr, STEPS: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
    """The first of the prices ``lo + (hi - lo) * w / WAYS`` (w = 1 .. WAYS - 1) whose plan
    fits ``budget``, or WAYS. A dearer price never picks a dearer option, so a binary search
    over w finds it in STEPS plans (4 of 16 ways), where the PyTorch ops price all 15."""
    zero = lo * 0.0
    first = (budget * 0.0).to(tl.int32) + 1
    last = first * 0 + WAYS
    for _ in range(STEPS):
        mid = (first + last) // 2
        price = lo + (hi - lo) * ((zero + mid) / WAYS)
        fits = _pick(value, cost, choice, price, rows, n_options, BLOCK_R, BLOCK_O, False) <= budget
        last = tl.where(fits, mid, last)
        first = tl.where(fits, first, mid + 1)
    return last


@triton.jit
def _spent(choice, cost, rows, n_options, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
    offs_o = tl.arange(0, BLOCK_O)
    c = tl.load(cost + offs_o, mask=offs_o < n_options, other=0.0)
    total = tl.sum(tl.zeros([BLOCK_R], dtype=tl.float64), axis=0)
    for start in range(0, rows, BLOCK_R):
        offs_r = start + tl.arange(0, BLOCK_R)
        rmask = offs_r < rows
        ch = tl.load(choice + offs_r, mask=rmask, other=-1)
        total += tl.sum(tl.sum(tl.where(offs_o[None, :] == ch[:, None], c[None, :], 0.0), axis=1), axis=0)
    return total


@triton.jit(do_not_specialize=["rows", "n_options", "floor_index"])
def _knapsack_kernel(value, cost, choice, eff_buf, col_buf, step_buf, rows, n_options, limits, floor_index,
                     ROUNDS: tl.constexpr, WAYS: tl.constexpr, STEPS: tl.constexpr, FILL_PASSES: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    budget = tl.load(limits)  # float64: a float argument would be float32
    hi_scale = tl.load(limits + 1)
    value += g * rows * n_options
    choice += g * rows
    eff_buf += g * rows
    col_buf += g * rows
    step_buf += g * rows
    offs_o = tl.arange(0, BLOCK_O)
    omask = offs_o < n_options
    c = tl.load(cost + offs_o, mask=omask, other=0.0)

    # The price search's bracket: [0, span / the smallest step up in bytes].
    vmax = tl.max(tl.full([BLOCK_R], float("-inf"), tl.float64), axis=0)
    vmin = tl.min(tl.full([BLOCK_R], float("inf"), tl.float64), axis=0)
    for start in range(0, rows, BLOCK_R):
        offs_r = start + tl.arange(0, BLOCK_R)
        m = (offs_r < rows)[:, None] & omask[None, :]
        v = tl.load(value + offs_r[:, None] * n_options + offs_o[None, :], mask=m, other=0.0)
        vmax = tl.maximum(vmax, tl.max(tl.max(tl.where(m, v, float("-inf")), axis=1), axis=0))
        vmin = tl.minimum(vmin, tl.min(tl.min(tl.where(m, v, float("inf")), axis=1), axis=0))
    zero = vmax * 0.0  # float64: the price's cuts are computed as the PyTorch version's
    lo = zero
    hi = ((vmax - vmin) + 1.0) / hi_scale
    # Only the last price that fits is planned (the PyTorch ops keep each round's plan and
    # end with the last); even the dearest overspending, the cheapest plan.
    found = _pick(value, cost, choice, hi, rows, n_options, BLOCK_R, BLOCK_O, False) <= budget
    fit = hi
    for _ in range(ROUNDS):
        first = _first_fit(value, cost, choice, lo, hi, budget, rows, n_options, WAYS, STEPS, BLOCK_R, BLOCK_O)
        hit = first < WAYS  # the cheapest price that fits bounds it above, the one below it below
        price = lo + (hi - lo) * ((zero + first) / WAYS)
        below = lo + (hi - lo) * ((zero + (first - 1)) / WAYS)
        fit = tl.where(hit, price, fit)
        found = found | hit
        lo = tl.where(hit, below, lo + (hi - lo) * ((WAYS - 1) / WAYS))
        hi = tl.where(hit, price, hi)
    if found:
        _pick(value, cost, choice, fit, rows, n_options, BLOCK_R, BLOCK_O, True)
    else:
        for start in range(0, rows, BLOCK_R):
            offs_r = start + tl.arange(0, BLOCK_R)
            tl.store(choice + offs_r, tl.zeros([BLOCK_R], tl.int64) + floor_index, mask=offs_r < rows)
    tl.debug_barrier()
    if _pick(value, cost, choice, zero, rows, n_options, BLOCK_R, BLOCK_O, False) <= budget:
        _pick(value, cost, choice, zero, rows, n_options, BLOCK_R, BLOCK_O, True)  # no loss at no price: the free plan
    tl.debug_barrier()

    for _ in range(FILL_PASSES):
        left = budget - _spent(choice, cost, rows, n_options, BLOCK_R, BLOCK_O)
        for start in range(0, rows, BLOCK_R):
            offs_r = start + tl.arange(0, BLOCK_R)
            rmask = offs_r < rows
            m = rmask[:, None] & omask[None, :]
            v = tl.load(value + offs_r[:, None] * n_options + offs_o[None, :], mask=m, other=0.0)
            ch = tl.load(choice + offs_r, mask=rmask, other=0)
            at = offs_o[None, :] == ch[:, None]
            gain = v - tl.sum(tl.where(at, v, 0.0), axis=1)[:, None]
            extra = c[None, :] - tl.sum(tl.where(at, c[None, :], 0.0), axis=1)[:, None]
            ok = m & (extra > 0) & (extra <= left) & (gain > 0)
            ratio = tl.where(ok, gain / tl.maximum(extra, 1e-9), -1.0)
            eff = tl.max(ratio, axis=1)
            col = tl.argmax(ratio, axis=1)
            step = tl.where(eff >= 0, tl.sum(tl.where(offs_o[None, :] == col[:, None], extra, 0.0), axis=1), 0.0)
            tl.store(eff_buf + offs_r, eff, mask=rmask)
            tl.store(col_buf + offs_r, col.to(tl.int64), mask=rmask)
            tl.store(step_buf + offs_r, step, mask=rmask)
        tl.debug_barrier()
        for start in range(0, rows, BLOCK_R):
            offs_r = start + tl.arange(0, BLOCK_R)
            rmask = offs_r < rows
            eff = tl.load(eff_buf + offs_r, mask=rmask, other=-1.0)
            ahead = tl.zeros([BLOCK_R], tl.float64)  # bytes of the upgrades taken before this row's, its own included
            for jstart in range(0, rows, BLOCK_J):
                offs_j = jstart + tl.arange(0, BLOCK_J)
                jmask = offs_j < rows
                eff_j = tl.load(eff_buf + offs_j, mask=jmask, other=-1.0)
                step_j = tl.load(step_buf + offs_j, mask=jmask, other=0.0)
                first_j = (eff_j[None, :] > eff[:, None]) | ((eff_j[None, :] == eff[:, None]) & (offs_j[None, :] <= offs_r[:, None]))
                ahead += tl.sum(tl.where(first_j & jmask[None, :], step_j[None, :], 0.0), axis=1)
            take = rmask & (eff >= 0) & (ahead <= left)
            col = tl.load(col_buf + offs_r, mask=rmask, other=0)
            tl.store(choice + offs_r, col, mask=take)
        tl.debug_barrier()


def knapsack_launch(value: torch.Tensor, price_of: torch.Tensor, budget: float, floor_index: int, hi_scale: float,
                    fill_passes: int, ways: int, rounds: int, block_rows: int = BLOCK_ROWS,
                    num_warps: int = NUM_WARPS) -> torch.Tensor:
    """One option per row for each of ``value``'s [G, R, O] problems (see
    :func:`mosaickv.policies.strategies.knapsack`, whose checks and bracket it takes):
    ``price_of`` [O] bytes, ``floor_index`` the cheapest option, ``hi_scale`` the
    smallest step up in bytes (at least 1). ``block_rows`` and ``num_warps``: another
    tile for a benchmark to time (a program works its rows one tile after another, so
    taller tiles over more warps mean fewer steps)."""
    groups, rows, options = value.shape
    value = value.to(torch.float64).contiguous()
    choice = torch.empty(groups, rows, dtype=torch.int64, device=value.device)
    eff = torch.empty(groups, rows, dtype=torch.float64, device=value.device)
    col = torch.empty(groups, rows, dtype=torch.int64, device=value.device)
    step = torch.empty(groups, rows, dtype=torch.float64, device=value.device)
    if options > MAX_OPTIONS:
        raise ValueError(f"the knapsack kernel prices at most {MAX_OPTIONS} options a row, not {options}")
    _knapsack_kernel[(groups,)](
        value, price_of.to(torch.float64).contiguous(), choice, eff, col, step, rows, options,
        upload([budget, hi_scale], value.device, torch.float64), floor_index, ROUNDS=rounds, WAYS=ways, STEPS=(ways - 1).bit_length(), FILL_PASSES=fill_passes, BLOCK_R=block_rows, BLOCK_O=MAX_OPTIONS,
        BLOCK_J=block_rows, num_warps=num_warps,
    )  # fmt: skip
    return choice


def warm_knapsack(device: torch.device | str) -> None:
    """Compile the kernel before a server's first sealing call needs it (seconds, once per
    machine): a one-row problem on ``device``, with the server's rounds and ways."""
    knapsack_launch(torch.zeros(1, 1, 2, dtype=torch.float64, device=device), upload([0.0, 1.0], device, torch.float64),
                    1.0, 0, 1.0, 4, 16, 8)

