"""The sizing hooks through SGLang's real KVCacheConfigurator, and kv_compress_info through
the real Scheduler.get_internal_state (what /server_info and Engine.get_server_info list
under ``internal_states``)."""

from __future__ import annotations

import contextlib
import json
import logging
from types import SimpleNamespace

import msgspec
import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.plugins import load_plugins  # noqa: E402

load_plugins()

import sglang.srt.server_args as server_args_mod  # noqa: E402
from sglang.srt.distributed.parallel_state_wrapper import ParallelState  # noqa: E402
from sglang.srt.managers.io_struct import GetInternalStateReq  # noqa: E402
from sglang.srt.managers.scheduler import Scheduler  # noqa: E402
from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator  # noqa: E402
from sglang.srt.model_executor.model_runner_components.layer_setup import ModelLayerInfo  # noqa: E402
from sglang.srt.runtime_context import get_context, get_parallel  # noqa: E402
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm  # noqa: E402

from mosaickv.sglang_patch.pool import MosaicKVPool  # noqa: E402

LLAMA8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_hidden_layers=32)
SMOLLM2 = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64, num_hidden_layers=30)
TINY = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_hidden_layers=2)
INFO_KEYS = {"planned_bytes_per_token", "achieved_ratio", "sealed_segments", "compression_calls", "part_failures"}


def write_model(path, shape: dict) -> str:
    path.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "intermediate_size": 256,
              "vocab_size": 1000, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
              "torch_dtype": "bfloat16", **shape}
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@contextlib.contextmanager
def configurator(model: str, budget_bytes: int, monkeypatch, **flags):
    """A KVCacheConfigurator as ModelRunner builds it, on one rank, with ``budget_bytes``
    standing in for the GPU memory profile (the one thing a CPU cannot measure)."""
    args = server_args_mod.ServerArgs(model_path=model, device="cpu", random_seed=1, **flags)
    monkeypatch.setattr(KVCacheConfigurator, "_profile_available_bytes", lambda self, pre: budget_bytes)
    layers = args.get_model_config().num_hidden_layers
    with get_context().preserve_config(), get_parallel().override(attn_tp_size=1):
        get_context().set_server_args(args)
        yield KVCacheConfigurator(
            device="cpu", gpu_id=0, ps=ParallelState.trivial(), pp_group=None, model=None,
            model_config=args.get_model_config(), server_args=args, kv_cache_dtype=torch.bfloat16,
            model_dtype=torch.bfloat16, page_size=args.page_size, sliding_window_size=None,
            spec_algorithm=SpeculativeAlgorithm.NONE, is_draft_worker=False, post_capture_kv_active=False,
            spec_aux_config=None, is_hybrid_swa=False, is_hybrid_swa_compress=False, use_mla_backend=False,
            layer_info=ModelLayerInfo(start_layer=0, end_layer=layers, num_effective_layers=layers),
            forward_stream=None, req_to_token_pool=None, token_to_kv_pool_allocator=None, memory_pool_config=None,
        )


@pytest.mark.parametrize("shape, budget_gib", [(LLAMA8B, 20), (LLAMA8B, 4), (SMOLLM2, 2)],
                         ids=["llama8b-20GiB", "llama8b-4GiB", "smollm2-2GiB"])
def test_scheduler_capacity_grows_at_least_2_5x_at_a_3x_budget(tmp_path, monkeypatch, shape, budget_gib):
    model = write_model(tmp_path / "m", shape)
    sizes = {}
    for mode in ("none", "mosaickv"):
        with configurator(model, budget_gib << 30, monkeypatch, kv_compress=mode) as kvc:
            sizes[mode] = kvc._resolve_memory_pool_config(pre_model_load_memory=0)
    dense, ours = sizes["none"], sizes["mosaickv"]
    cell = shape["num_hidden_layers"] * shape["num_key_value_heads"] * shape["head_dim"] * 2 * 2
    assert dense.max_total_num_tokens == (budget_gib << 30) // cell  # SGLang's own sizing, untouched
    assert ours.max_total_num_tokens >= 2.5 * dense.max_total_num_tokens
    assert 1 <= ours.max_running_requests <= dense.max_running_requests  # capped to the dense tails


def test_user_max_total_tokens_still_caps_the_capacity(tmp_path, monkeypatch):
    model = write_model(tmp_path / "m", SMOLLM2)
    with configurator(model, 2 << 30, monkeypatch, kv_compress="mosaickv", max_total_tokens=50_000) as kvc:
        # SGLang rounds the cap down to whole pages; a page is one 32-token segment.
        assert kvc.server_args.page_size == 32
        assert kvc._resolve_memory_pool_config(pre_model_load_memory=0).max_total_num_tokens == 50_000 // 32 * 32


def test_a_cap_the_dense_tails_fill_is_refused_before_any_worker_starts(tmp_path):
    from mosaickv.sglang_patch.args import KVCompressError

    model = write_model(tmp_path / "m", SMOLLM2)
    # 256 tails of 128 tokens and a 16k prefill batch are 49,152 dense rows: a 40,960 cap
    # would leave no slab, and the server would run with nothing ever compressed.
    with pytest.raises(KVCompressError, match=r"--max-total-tokens 40960 .* at least 49184 tokens.* at most 191"):
        server_args_mod.ServerArgs(model_path=model, device="cpu", kv_compress="mosaickv", max_total_tokens=40960,
                                   max_running_requests=256, chunked_prefill_size=16384)


@pytest.mark.parametrize("running, slabs", [(128, 640), (None, None)], ids=["running-given", "running-unset"])
def test_a_cap_keeps_sealed_segments_and_its_bytes_per_token(tmp_path, monkeypatch, running, slabs):
    model = write_model(tmp_path / "m", SMOLLM2)
    with configurator(model, 2 << 30, monkeypatch, kv_compress="mosaickv", max_total_tokens=40960,
                      max_running_requests=running, chunked_prefill_size=4096) as kvc:
        result = kvc.configure(pre_model_load_memory=0)
    plan = result.token_to_kv_pool.plan
    assert plan.num_slabs == (slabs if slabs is not None else (40960 - plan.dense_tail_tokens) // 32) > 0
    assert result.max_total_num_tokens == plan.max_total_num_tokens == plan.dense_tail_tokens + 32 * plan.num_slabs
    assert result.max_running_requests <= plan.max_running_requests
    if running is None:  # the tails take a tenth of the cap, not what the 2 GiB budget would hold
        assert plan.max_running_requests * plan.tail_tokens_per_request <= 4096
    # What the capped pool spends per token: below dense, as the slabs are 3x smaller.
    assert plan.bytes_per_token < plan.dense_bytes_per_token


def test_the_dense_rows_hold_the_servers_prefill_chunk(tmp_path, monkeypatch):
    from mosaickv.sglang_patch.pool import _PLANS

    model = write_model(tmp_path / "m", SMOLLM2)
    rows = {}
    for chunk in (2048, 6144):
        with configurator(model, 2 << 30, monkeypatch, kv_compress="mosaickv", chunked_prefill_size=chunk,
                          max_running_requests=8) as kvc:
            kvc._resolve_memory_pool_config(pre_model_load_memory=0)
            rows[chunk] = _PLANS[id(kvc)].dense_tail_tokens
    assert rows[6144] - rows[2048] == 4096


def fake_scheduler(result) -> Scheduler:
    """A Scheduler carrying only what get_internal_state reads; the pools are the real ones."""
    sched = Scheduler.__new__(Scheduler)
    sched.token_to_kv_pool_allocator = result.token_to_kv_pool_allocator
    sched.max_total_num_tokens = result.max_total_num_tokens
    sched.max_running_requests = result.max_running_requests
    sched.metrics_reporter = SimpleNamespace(last_gen_throughput=0.0, spec_total_num_forward_ct=0)
    sched.tp_worker = SimpleNamespace(model_runner=SimpleNamespace(weight_load_mem_usage=0.0), graph_memory_usage={})
    sched.draft_worker, sched.swa_tokens_per_layer, sched.spec_algorithm = None, None, SpeculativeAlgorithm.NONE
    sched.startup_available_gpu_memory_gb, sched.startup_time = 1.0, 0.0
    return sched


def test_configure_builds_our_pool_logs_once_and_server_info_reports_it(tmp_path, monkeypatch, caplog):
    model = write_model(tmp_path / "m", TINY)
    with configurator(model, 8 << 20, monkeypatch, kv_compress="mosaickv") as kvc:
        with caplog.at_level(logging.INFO, logger="mosaickv.sglang_patch.pool"):
            result = kvc.configure(pre_model_load_memory=0)
        pool = result.token_to_kv_pool
        assert isinstance(pool, MosaicKVPool) and result.token_to_kv_pool_allocator.get_kvcache() is pool
        assert result.max_total_num_tokens == pool.size == pool.plan.max_total_num_tokens
        assert result.max_running_requests <= pool.plan.max_running_requests
        startup = [r.getMessage() for r in caplog.records if r.name == "mosaickv.sglang_patch.pool"]
        assert len(startup) == 1 and "bytes/token" in startup[0] and "'mosaic'" in startup[0]

        state = fake_scheduler(result).get_internal_state(GetInternalStateReq()).internal_state
    assert state["kv_compress"] == "mosaickv"  # the flag, as SGLang reports every flag
    info = state["kv_compress_info"]
    assert INFO_KEYS <= info.keys() and info["kv_compress"] == "mosaickv"
    assert info["planned_bytes_per_token"] == pytest.approx(pool.plan.bytes_per_token)
    assert info["max_total_num_tokens"] == state["memory_usage"]["token_capacity"]
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(info)) == info  # crosses the scheduler's channel


def test_server_info_is_unchanged_without_kv_compress(tmp_path, monkeypatch):
    model = write_model(tmp_path / "m", TINY)
    with configurator(model, 8 << 20, monkeypatch) as kvc:
        result = kvc.configure(pre_model_load_memory=0)
        assert not isinstance(result.token_to_kv_pool, MosaicKVPool)
        state = fake_scheduler(result).get_internal_state(GetInternalStateReq()).internal_state
    assert state["kv_compress"] == "none" and "kv_compress_info" not in state
