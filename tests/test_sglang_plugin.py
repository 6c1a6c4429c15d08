"""The plugin through SGLang's own loader: flags, inert default, startup refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest

pytest.importorskip("sglang")

from sglang.srt.plugins import GENERAL_PLUGINS_GROUP, load_plugins, load_plugins_by_group  # noqa: E402

load_plugins()

import sglang.srt.server_args as server_args_mod  # noqa: E402

from mosaickv.sglang_patch import register  # noqa: E402
from mosaickv.sglang_patch.args import KVCompressError, MosaicServerArgs  # noqa: E402

ORIGINAL = MosaicServerArgs.__bases__[0]  # SGLang's own ServerArgs, before the plugin


def write_model(path, **config):
    path.mkdir()
    base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
            "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "num_hidden_layers": 2, "vocab_size": 1000, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16"}
    base.update(config)
    (path / "config.json").write_text(json.dumps(base))
    return str(path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("m") / "llama")


def make(model, **kw):
    return server_args_mod.ServerArgs(model_path=model, device="cpu", random_seed=1, **kw)


def test_sglang_loader_finds_and_runs_our_entry_point():
    found = load_plugins_by_group(GENERAL_PLUGINS_GROUP)
    assert found["mosaickv"][0] is register
    assert found["mosaickv"][1] == "mosaickv"
    assert server_args_mod.ServerArgs is MosaicServerArgs
    from sglang.srt.entrypoints.engine import Engine

    assert Engine.server_args_class is MosaicServerArgs


def test_none_leaves_server_args_exactly_as_without_plugin(llama):
    plain = ORIGINAL(model_path=llama, device="cpu", random_seed=1)
    ours = make(llama)
    assert ours.kv_compress == "none" and ours.kv_compress_config is None
    for field in dataclasses.fields(ORIGINAL):
        assert getattr(ours, field.name) == getattr(plain, field.name), field.name


def test_help_lists_both_flags(capsys):
    with pytest.raises(SystemExit):
        server_args_mod.prepare_server_args(["--help"])
    out = capsys.readouterr().out
    assert "--kv-compress {none,mosaickv}" in out
    assert "--kv-compress-config KV_COMPRESS_CONFIG" in out
    for flag in ("--kv-compress-workers KV_COMPRESS_WORKERS", "--kv-compress-attention {triton,sdpa}",
                 "--kv-compress-sealing {processes,device,device-thread}", "--kv-compress-seal-batch KV_COMPRESS_SEAL_BATCH",
                 "--kv-compress-cuda-graph"):
        assert flag in out


def test_cli_parses_flags(llama):
    args = server_args_mod.prepare_server_args(
        ["--model-path", llama, "--device", "cpu", "--kv-compress", "mosaickv", "--kv-compress-config", "snapkv"])
    assert args.kv_compress == "mosaickv" and args.mosaic_policy.name == "snapkv"
    assert args.attention_backend == "mosaickv" and args.radix_cache_backend == "mosaickv"


def test_mosaickv_turns_cuda_graphs_off_that_none_keeps(llama):
    from sglang.srt.model_executor.cuda_graph_config import Backend

    assert make(llama).cuda_graph_config.decode.backend != Backend.DISABLED
    graph = make(llama, kv_compress="mosaickv").cuda_graph_config
    assert graph.decode.backend == graph.prefill.backend == Backend.DISABLED
    # A dummy model path leaves SGLang's graph config unresolved (None): nothing to turn off.
    assert server_args_mod.prepare_server_args(["--model-path", "dummy", "--kv-compress", "mosaickv"]).kv_compress == "mosaickv"


def test_kv_compress_cuda_graph_keeps_decode_graphs_only(llama):
    from sglang.srt.model_executor.cuda_graph_config import Backend

    graph = make(llama, kv_compress="mosaickv", kv_compress_cuda_graph=True).cuda_graph_config
    assert graph.decode.backend != Backend.DISABLED and graph.prefill.backend == Backend.DISABLED
    args = server_args_mod.prepare_server_args(["--model-path", llama, "--device", "cpu", "--kv-compress", "mosaickv",
                                                "--kv-compress-cuda-graph"])
    assert args.kv_compress_cuda_graph and args.cuda_graph_config.decode.backend != Backend.DISABLED


def test_policy_file_is_validated_by_the_lead_loader(llama, tmp_path):
    good = tmp_path / "p.yaml"
    good.write_text("name: mine\nratio: 2\nsegment_size: 16\nsinks: 0\nwindow: 16\n")
    assert make(llama, kv_compress="mosaickv", kv_compress_config=str(good)).mosaic_policy.segment_size == 16
    bad = tmp_path / "bad.yaml"
    bad.write_text("ratio: 0.5\n")
    with pytest.raises(KVCompressError, match="ratio"):
        make(llama, kv_compress="mosaickv", kv_compress_config=str(bad))


@pytest.mark.parametrize("config, warned", [(None, True), ("snapkv", True), ("lossless", False)])
def test_a_policy_without_a_heads_profile_warns_at_startup(llama, caplog, config, warned):
    """Sealed alike in every head, needles asked for later are mostly lost: the log says
    so and how to measure a profile; a dense policy loses nothing and says nothing."""
    with caplog.at_level("WARNING", logger="mosaickv.sglang_patch.args"):
        make(llama, kv_compress="mosaickv", kv_compress_config=config)
    said = [r.getMessage() for r in caplog.records if "keeps no retrieval heads" in r.getMessage()]
    assert bool(said) == warned
    if warned:
        assert "LlamaForCausalLM" in said[0] and "mosaickv heads --model PATH" in said[0]


def test_a_token_scorer_that_reads_queries_is_refused_at_startup(llama, tmp_path):
    """A server seals segments from their queries' statistics only: expected_attention
    would score NaN at the first sealing, so the flag is refused before any worker starts."""
    reader = tmp_path / "reader.yaml"
    reader.write_text("base: mosaic\ntoken_scorer: expected_attention\n")
    with pytest.raises(KVCompressError, match="--kv-compress-config: .*token_scorer.*expected_attention.*sealed one at a time"):
        make(llama, kv_compress="mosaickv", kv_compress_config=str(reader))


@pytest.mark.parametrize("kw, words", [
    (dict(speculative_algorithm="EAGLE"), "--speculative-algorithm"),
    (dict(kv_cache_dtype="fp8_e4m3"), "--kv-cache-dtype fp8_e4m3"),
    (dict(page_size=3), "--page-size 3"),
    (dict(attention_backend="triton"), "--attention-backend"),
    (dict(radix_cache_backend="flexkv"), "--radix-cache-backend"),
    (dict(pp_size=2), "--pp-size 2"),
    (dict(enable_hierarchical_cache=True), "--enable-hierarchical-cache"),
    (dict(kv_compress_config="no-such-preset"), "--kv-compress-config"),
    (dict(kv_compress_config="mosaic_heads"), "30 layers x 3 KV heads"),  # SmolLM2's profile on a 2 x 2 model
    (dict(kv_compress_config="mosaic_heads_fp8"), "30 layers x 3 KV heads"),  # and its FP8 composition's
    (dict(kv_compress_workers=0), "--kv-compress-workers 0"),
    (dict(kv_compress_attention="flash"), "--kv-compress-attention 'flash'"),
    (dict(kv_compress_attention="sdpa", kv_compress_cuda_graph=True), "--kv-compress-cuda-graph needs"),
    (dict(kv_compress_sealing="gpu"), "--kv-compress-sealing 'gpu'"),
    (dict(kv_compress_sealing="device", kv_compress_workers=2), "--kv-compress-workers sets sealing processes"),
    (dict(kv_compress_sealing="device-thread", kv_compress_workers=2), "--kv-compress-workers sets sealing processes"),
    (dict(kv_compress_seal_batch=64), "--kv-compress-seal-batch sets segments per device sealing call"),
    (dict(kv_compress_sealing="device", kv_compress_seal_batch=0), "--kv-compress-seal-batch 0 must be at least 1"),
])
def test_refusals_name_the_flag_in_one_sentence(llama, kw, words):
    with pytest.raises(KVCompressError) as info:
        make(llama, kv_compress="mosaickv", **kw)
    message = str(info.value)
    assert words in message and "\n" not in message


@pytest.mark.parametrize("kw, flag", [(dict(kv_compress_config="mosaic"), "--kv-compress-config"),
                                      (dict(kv_compress_workers=2), "--kv-compress-workers"),
                                      (dict(kv_compress_attention="sdpa"), "--kv-compress-attention"),
                                      (dict(kv_compress_cuda_graph=True), "--kv-compress-cuda-graph"),
                                      (dict(kv_compress_sealing="device"), "--kv-compress-sealing"),
                                      (dict(kv_compress_seal_batch=64), "--kv-compress-seal-batch")])
def test_mosaickv_flags_without_mosaickv_are_refused(llama, kw, flag):
    with pytest.raises(KVCompressError, match=f"{flag} needs --kv-compress mosaickv"):
        make(llama, **kw)


@pytest.mark.parametrize("cpus, workers", [(128, 4), (16, 4), (8, 2), (2, 1)])
def test_sealing_processes_default_to_a_quarter_of_the_cpus_from_one_to_four(llama, monkeypatch, cpus, workers):
    monkeypatch.setattr("os.cpu_count", lambda: cpus)
    assert make(llama, kv_compress="mosaickv").kv_compress_workers == workers
    assert make(llama, kv_compress="mosaickv", kv_compress_workers=2).kv_compress_workers == 2


def test_sealing_defaults_to_processes(llama):
    assert make(llama, kv_compress="mosaickv").kv_compress_sealing == "processes"
    assert make(llama, kv_compress="mosaickv", kv_compress_sealing="device").kv_compress_sealing == "device"
    threaded = make(llama, kv_compress="mosaickv", kv_compress_sealing="device-thread", kv_compress_seal_batch=64)
    assert (threaded.kv_compress_sealing, threaded.kv_compress_seal_batch) == ("device-thread", 64)


def test_attention_path_defaults_to_the_kernels(llama):
    assert make(llama, kv_compress="mosaickv").kv_compress_attention == "triton"
    assert make(llama, kv_compress="mosaickv", kv_compress_attention="sdpa").kv_compress_attention == "sdpa"


def test_cli_refusal_is_one_line_and_exit(llama):
    with pytest.raises(SystemExit) as info:
        server_args_mod.prepare_server_args(
            ["--model-path", llama, "--device", "cpu", "--kv-compress", "mosaickv", "--kv-cache-dtype", "fp8_e5m2"])
    assert str(info.value).startswith("error: --kv-cache-dtype fp8_e5m2")


@pytest.mark.parametrize("config, words", [
    (dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", kv_lora_rank=64, q_lora_rank=None,
          qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=4, num_experts_per_tok=2,
          moe_intermediate_size=64, first_k_dense_replace=2, n_shared_experts=1), "multi-head latent attention"),
    (dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=64), "sliding-window"),
    (dict(torch_dtype="float16"), "--kv-cache-dtype auto resolves to torch.float16"),
])
def test_model_refusals(tmp_path, config, words):
    model = write_model(tmp_path / "model", **config)
    with pytest.raises(KVCompressError, match=words):
        make(model, kv_compress="mosaickv")
