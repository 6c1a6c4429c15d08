"""The one-launch knapsack kernel against the PyTorch knapsack it replaces on a GPU.

On the CPU the kernel runs under ``TRITON_INTERPRET=1`` and must pick exactly what
:func:`knapsack` picks (float64 both, the same cuts of the price bracket); on a GPU,
where Triton may fuse a multiply and an add, it must pick plans as good and within budget.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of the kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from mosaickv.kernels.knapsack import knapsack_launch
from mosaickv.policies.strategies import knapsack


def launch(value: torch.Tensor, cost: list[float], budget: float, fill_passes: int = 4, ways: int = 16,
           **tile) -> torch.Tensor:
    """The kernel with the bracket :func:`knapsack` gives it."""
    floor = min(cost)
    dearer = [c - floor for c in cost if c > floor]
    price_of = torch.tensor(cost, dtype=torch.float64, device=value.device)
    return knapsack_launch(value, price_of, budget, cost.index(floor), max(min(dearer, default=1.0), 1.0), fill_passes, ways, 8,
                           **tile)


def problem(seed: int, max_rows: int = 60, max_options: int = 20) -> tuple[torch.Tensor, list[float], float]:
    """Losses that fall as bytes rise, each problem on its own scale, a budget anywhere from
    the cheapest plan to the dearest."""
    g = torch.Generator().manual_seed(seed)
    groups, rows = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, max_rows, (1,), generator=g))
    options = int(torch.randint(2, max_options, (1,), generator=g))
    cost = sorted(set(float(c) for c in torch.randint(0, 900, (options,), generator=g)))
    value = -torch.rand(groups, rows, len(cost), generator=g, dtype=torch.float64).cumsum(-1).flip(-1)
    value *= 10 ** torch.randint(-3, 4, (groups, 1, 1), generator=g).double()
    budget = float(rows * cost[0] + torch.randint(0, int(rows * (cost[-1] - cost[0])) + 1, (1,), generator=g))
    return value, cost, budget


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fill_passes", [0, 4])
def test_the_kernel_picks_what_the_pytorch_knapsack_picks(seed, fill_passes):
    value, cost, budget = problem(100 + seed)
    assert torch.equal(launch(value, cost, budget, fill_passes), knapsack(value, cost, budget, fill_passes=fill_passes))


@pytest.mark.parametrize("ways", [2, 5, 10])
def test_a_binary_search_over_the_ways_finds_the_price_pricing_every_way_finds(ways):
    # The kernel searches a round's ways in (ways - 1).bit_length() plans, the ops price
    # them all: the first that fits must be the same whether the count is a power of two
    # or not.
    value, cost, budget = problem(300 + ways)
    expected = knapsack(value, cost, budget, fill_passes=0, ways=ways)
    assert torch.equal(launch(value, cost, budget, fill_passes=0, ways=ways), expected)


@pytest.mark.parametrize("block_rows", [8, 32])
def test_another_tile_picks_the_same(block_rows):
    # bench_pricing_ops.py times taller tiles over more warps: their picks must not change.
    value, cost, budget = problem(400 + block_rows)
    assert torch.equal(launch(value, cost, budget, block_rows=block_rows, num_warps=8), knapsack(value, cost, budget))


def test_rows_in_several_tiles_and_the_edge_budgets():
    # 37 rows in tiles of 16 (the last one ragged); budgets that afford only the cheapest
    # plan, some upgrades and everything; a problem whose losses are all 0, one at 1e6.
    g = torch.Generator().manual_seed(5)
    cost = [0.0, 8.0, 20.0, 33.0, 64.0, 90.0]
    value = -torch.rand(4, 37, len(cost), generator=g, dtype=torch.float64).cumsum(-1).flip(-1)
    value[2] = 0.0
    value[3] *= 1e6
    for budget in (0.0, 37 * 20.0, 37 * 90.0):
        expected = knapsack(value, cost, budget)
        assert torch.equal(launch(value, cost, budget), expected), budget
        assert (torch.tensor(cost, dtype=torch.float64)[expected].sum(-1) <= budget).all()
    assert torch.equal(launch(value, cost, 0.0), torch.zeros(4, 37, dtype=torch.int64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("seed", range(20))
def test_on_a_gpu_the_kernel_plans_as_well_within_budget(seed):
    value, cost, budget = problem(200 + seed, max_rows=300, max_options=80)
    value = value.cuda()
    price_of = torch.tensor(cost, dtype=torch.float64, device="cuda")
    got = knapsack(value, cost, budget)  # on the GPU: the kernel
    assert (price_of[got].sum(-1) <= budget).all()
    reference = knapsack(value.cpu(), cost, budget).cuda()  # the PyTorch ops
    mine, theirs = value.gather(-1, got[..., None]).sum((1, 2)), value.gather(-1, reference[..., None]).sum((1, 2))
    assert torch.allclose(mine, theirs, rtol=1e-9, atol=0.0) or (mine >= theirs).all()


def test_more_options_than_the_kernel_tiles_are_refused_and_left_to_the_ops():
    value, cost, budget = problem(7)
    wide = torch.cat([value, value[..., -1:].expand(-1, -1, 130)], -1)
    with pytest.raises(ValueError, match="at most 128 options a row, not 1"):
        launch(wide, cost + [cost[-1] + 1 + i for i in range(130)], budget)


def test_the_gpu_mode_comes_from_the_environment_and_a_wrong_one_is_refused(monkeypatch):
    from mosaickv.policies.strategies import knapsack_on_gpu

    monkeypatch.delenv("MOSAICKV_KNAPSACK", raising=False)
    assert knapsack_on_gpu() == "kernel"
    monkeypatch.setenv("MOSAICKV_KNAPSACK", "ops")
    assert knapsack_on_gpu() == "ops"
    monkeypatch.setenv("MOSAICKV_KNAPSACK", "fast")
    with pytest.raises(ValueError, match="MOSAICKV_KNAPSACK='fast' is not one of kernel, ops"):
        knapsack_on_gpu()
