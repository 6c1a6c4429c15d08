"""The sync census: the env switch, call-site attribution, and (GPU) PyTorch's own warnings."""

from __future__ import annotations

import traceback

import pytest
import torch

from mosaickv.sglang_patch.sync_census import ENV, MESSAGE, SyncCensus, census_from_env


def _stack_here() -> list[traceback.FrameSummary]:
    return traceback.extract_stack()


def test_the_switch_is_off_unless_set_to_one(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert census_from_env() is None
    monkeypatch.setenv(ENV, "0")
    assert census_from_env() is None


def test_a_value_other_than_0_or_1_names_the_variable(monkeypatch):
    monkeypatch.setenv(ENV, "yes")
    with pytest.raises(ValueError, match=f"{ENV}='yes'.*use 1"):
        census_from_env()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for a process without CUDA")
def test_asking_for_a_census_without_cuda_fails_loudly(monkeypatch):
    monkeypatch.setenv(ENV, "1")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        census_from_env()


def test_a_site_is_the_innermost_project_frames_innermost_first():
    census = SyncCensus(frames=2)
    for _ in range(3):
        site = census.record(_stack_here())
    inner, outer = site.split(" <- ")
    assert inner.startswith("tests/test_sync_census.py:") and inner.endswith(" _stack_here")
    assert outer.endswith(" test_a_site_is_the_innermost_project_frames_innermost_first")
    assert census.top() == {site: 3}


def test_top_lists_the_most_frequent_sites_first():
    census = SyncCensus(frames=1)
    once = census.record(_stack_here())
    twice = [census.record(traceback.extract_stack()) for _ in range(2)][0]
    assert list(census.top()) == [twice, once]
    assert census.top(1) == {twice: 2}


def test_other_warnings_pass_on_to_the_handler_before():
    census = SyncCensus()
    seen = []
    census._previous = lambda message, *args, **kwargs: seen.append(str(message))
    census._show(UserWarning("something else"), UserWarning, __file__, 1)
    census._show(UserWarning(f"{MESSAGE} (Triggered internally)"), UserWarning, __file__, 1)
    assert seen == ["something else"]
    assert sum(census.sites.values()) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pytorch_s_synchronizing_ops_are_counted_where_they_are_called():
    x = torch.arange(8, device="cuda")
    index = torch.tensor([1, 2], device="cuda")  # built before: a copy from pageable memory waits too
    census = SyncCensus(frames=1)
    census.install()
    try:
        x[x > 3]  # a device mask: nonzero waits for the device
        x[index]  # an index tensor already there: no wait
    finally:
        census.uninstall()
    sites = census.top()
    assert len(sites) == 1 and sum(sites.values()) >= 1
    (site,) = sites
    assert site.startswith("tests/test_sync_census.py:") and site.endswith(
        "test_pytorch_s_synchronizing_ops_are_counted_where_they_are_called")
    assert torch.cuda.get_sync_debug_mode() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_decode_plan_of_sealed_requests_does_not_wait_for_the_gpu():
    """A decode step's plan with every request's runs still to find (the step after each
    sealed a segment) and the plan's upload queue behind the stream's work: the eleventh
    run's census counted six reads back per request's runs, in the step's plan."""
    pytest.importorskip("sglang")
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from mosaickv.sglang_patch.attention import plan_forward
    from test_sglang_attention import HKV, SEG, Twin

    twin = Twin(3, 64, "cuda")
    twin.step([3 * SEG + 2, 2 * SEG + 1], ForwardMode.EXTEND, seed=0)
    for req, segment in ((0, 0), (0, 1), (1, 0)):
        twin.seal(req, segment)
    twin.pool.run_cache.clear()
    reqs = twin.mosaic._requests(torch.tensor([0, 1]), twin.lens[:2], [1, 1])
    torch.cuda.synchronize()
    census = SyncCensus()
    census.install()
    try:
        plan = plan_forward(twin.pool, reqs, 3 * HKV, extend=False)
    finally:
        census.uninstall()
    assert plan.layers is not None and plan.layers[0].block_indices.is_cuda
    assert census.top() == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_sealing_call_reads_back_only_what_its_plan_needs():
    """The eleventh run's census found a sealing call synchronizing where nothing was read:
    the knapsack's cost rows indexed by a host list (copied from pageable memory) and the
    kept-token mask set by advanced index. What remains is the plan's own reads (scores
    checked, choices, kept tokens) and cuSOLVER's."""
    from dataclasses import replace

    from mosaickv.config import load_policy
    from mosaickv.packed_sealing import PackedSealer
    from test_packed_sealing import BASE, inputs

    policy = load_policy("mosaic")
    batch = [replace(inputs(policy, 2, 2, 64, seed=seed, device="cuda"), base_bytes=BASE * (seed + 1))
             for seed in range(3)]
    sealer = PackedSealer(policy, 64)
    sealer.seal_many(batch)  # warm: first calls allocate and load
    torch.cuda.synchronize()
    census = SyncCensus(frames=1)
    census.install()
    try:
        sealer.seal_many(batch)
    finally:
        census.uninstall()
    sites = " ".join(census.top())
    assert "_kept_rows" not in sites and "kept_cost" not in sites and "_options" not in sites
