"""CPU tests of the serving suite (benchmarks/suite): log and bench_serving parsing, the
per-method records, the report's merging, ratios and goal verdicts, the README block,
the workload table, the random-model builder at a tiny size, and run_comparison.sh
against a stand-in SGLang (a server that logs like it and a bench_serving that writes
its result line)."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from script_loader import load_script

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "suite"


def _load(name: str):
    return load_script(f"benchmarks/suite/{name}.py", f"bench_suite_{name}")


collect = _load("collect")
report = _load("report")
workloads = _load("workloads")

# Lines as SGLang 0.5.17 writes them (metrics_reporter.py, scheduler.py, memory_pool.py).
LOG = """\
[2026-11-24 10:00:00] server_args=ServerArgs(model_path='/tmp/m', ...)
[2026-11-24 10:00:05 TP0] KV Cache is allocated. dtype: torch.bfloat16, #tokens: 393216, K size: 24.00 GB, V size: 24.00 GB
[2026-11-24 10:00:07 TP0] max_total_num_tokens=393216, chunked_prefill_size=8192, max_prefill_tokens=16384, max_running_requests=2048, context_len=33088, available_gpu_mem=11.52 GB
[2026-11-24 10:01:00 TP0] Prefill batch, #new-seq: 1, #new-token: 8192, #cached-token: 0, token usage: 0.02, #running-req: 0, #queue-req: 47, #pending-token: 0, cuda graph: False, input throughput (token/s): 0.00
[2026-11-24 10:01:40 TP0] Prefill batch, #new-seq: 1, #new-token: 8192, #cached-token: 0, token usage: 0.97, #running-req: 11, #queue-req: 36, #pending-token: 0, cuda graph: False, input throughput (token/s): 9000.00
[2026-11-24 10:01:41 TP0] Decode batch, #running-req: 12, #token: 396000, token usage: 0.99, cuda graph: True, gen throughput (token/s): 480.00, #queue-req: 36
[2026-11-24 10:01:43 TP0] Decode batch, #running-req: 12, #token: 396500, token usage: 0.99, cuda graph: True, gen throughput (token/s): 500.00, #queue-req: 36
[2026-11-24 10:09:00 TP0] Decode batch, #running-req: 0, #token: 0, token usage: 0.00, cuda graph: True, gen throughput (token/s): 1.00, #queue-req: 0
"""

# One line of bench_serving 0.5.17's --output-file (benchmark/serving.py, `result`), trimmed.
BENCH_LINE = {
    "tag": None, "backend": "sglang", "dataset_name": "random-ids", "request_rate": "inf", "max_concurrency": None,
    "random_input_len": 32768, "random_output_len": 256, "random_range_ratio": 1.0, "server_info": {"big": 1},
    "duration": 120.0, "completed": 48, "total_input_tokens": 1572864, "total_output_tokens": 12288,
    "request_throughput": 0.4, "output_throughput": 102.4, "max_output_tokens_per_s": 600.0,
    "max_concurrent_requests": 48, "concurrency": 20.0, "mean_ttft_ms": 50000.0, "median_ttft_ms": 48000.0,
    "p99_ttft_ms": 110000.0, "mean_tpot_ms": 30.0, "median_tpot_ms": 28.0, "p99_tpot_ms": 90.0,
    "median_itl_ms": 25.0, "p99_itl_ms": 400.0, "median_e2e_latency_ms": 56000.0,
}


# ---- parsing ---------------------------------------------------------------------------

def test_server_log_gives_peaks_kv_layout_and_scheduler_limits():
    got = collect.parse_server_log(LOG)
    assert got["max_running_req"] == 12
    assert got["max_queue_req"] == 47
    assert got["max_token_usage"] == 0.99
    assert got["decode_log_lines"] == 2  # the idle line (0 running) is not a decode rate
    assert got["gen_throughput_median"] == 490.0
    assert got["prefill_s_per_prompt"] == pytest.approx(40 / 11, abs=1e-3)  # 11 prompts prefilled in 40 s, no decode between
    assert got["kv_allocated"]["tokens"] == 393216
    assert got["kv_allocated"]["bytes_per_token"] == pytest.approx(48 * 2**30 / 393216)  # 131072: 8B bf16
    assert got["scheduler"] == {"max_total_num_tokens": 393216, "chunked_prefill_size": 8192, "max_prefill_tokens": 16384,
                                "max_running_requests": 2048, "context_len": 33088, "available_gpu_mem_gb": 11.52}


def test_server_log_without_batches_gives_nothing():
    got = collect.parse_server_log("[2026-11-24 10:00:00] starting\n")
    assert got["max_running_req"] is None and got["kv_allocated"] is None and got["scheduler"] is None
    assert got["gen_throughput_median"] is None and got["prefill_s_per_prompt"] is None


def test_bench_jsonl_last_appended_line_wins_and_server_info_is_dropped(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps({**BENCH_LINE, "completed": 1}) + "\n" + json.dumps(BENCH_LINE) + "\n")
    got = collect.read_bench(path)
    assert got["completed"] == 48 and got["median_tpot_ms"] == 28.0 and got["p99_ttft_ms"] == 110000.0
    assert "server_info" not in got and set(got) == set(collect.BENCH_KEYS)
    assert collect.read_bench(tmp_path / "missing.jsonl") is None


def _sglang_file(*parts: str) -> Path:
    spec = importlib.util.find_spec("sglang")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("sglang not installed")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def test_bench_keys_are_fields_bench_serving_writes():
    source = _sglang_file("benchmark", "serving.py").read_text()
    written = source[source.index("result = {"): source.index("if args.cache_report:", source.index("result = {"))]
    missing = [k for k in collect.BENCH_KEYS if f'"{k}":' not in written]
    assert not missing


def test_log_patterns_match_sglang_format_strings():
    """The regexes follow 0.5.17's f-strings; a renamed field there must fail here."""
    reporter = _sglang_file("srt", "managers", "scheduler_components", "metrics_reporter.py").read_text()
    scheduler = _sglang_file("srt", "managers", "scheduler.py").read_text()
    pool = _sglang_file("srt", "mem_cache", "memory_pool.py").read_text()
    assert 'f"#running-req: {prefill_stats.num_running_reqs.total}, "' in reporter
    assert 'f"Decode batch{iter_msg}, #running-req: {num_running_reqs}, {token_usage_msg}"' in reporter
    assert 'f"gen throughput (token/s): {self.last_gen_throughput:.2f}, "' in reporter
    assert 'f"#queue-req: {len(self.scheduler.waiting_queue)}"' in reporter
    assert 'f"max_total_num_tokens={self.max_total_num_tokens}, "' in scheduler
    assert 'f"{cache_name} is allocated. dtype: {self.dtype}, "' in pool
    assert 'f"#tokens: {num_tokens}, K size: {k_size_GB:.2f} GB, "' in pool


# ---- records ---------------------------------------------------------------------------

KV_INFO = {"planned_bytes_per_token": 44000.0, "dense_bytes_per_token": 131072, "achieved_ratio": 2.98,
           "capacity_gain": 2.78}


def _write_run(state: Path, method: str, mosaic: bool) -> None:
    state.mkdir(parents=True, exist_ok=True)
    (state / f"server_{method}.log").write_text(LOG)
    flags = "--kv-compress mosaickv --kv-compress-config mosaic" if mosaic else "--attention-backend triton"
    (state / f"cmd_{method}.txt").write_text(f"python3 -m sglang.launch_server --port 30000 {flags}\n")
    internal = [{"kv_compress_info": KV_INFO}] if mosaic else [{}]
    info = {"max_total_num_tokens": 393216, "mem_fraction_static": 0.85, "internal_states": internal}
    (state / f"info_{method}_end.json").write_text(json.dumps(info))
    (state / f"bench_{method}.jsonl").write_text(json.dumps(BENCH_LINE) + "\n")


def _record_args(state: Path, method: str, status: str = "ok") -> list[str]:
    return ["method", str(state), method, "--status", status, "--device", "H100", "--started", "2026-11-24T10:00:00Z",
            "--bench-command", "bench", "--call-command", "call", "--num-prompts", "48", "--input-len", "32768",
            "--output-len", "256", "--start-s", "90"]


def test_method_record_takes_kv_bytes_from_mosaic_info_else_from_the_allocation_line(tmp_path):
    _write_run(tmp_path, "mosaic3", mosaic=True)
    _write_run(tmp_path, "none", mosaic=False)
    assert collect.main(_record_args(tmp_path, "mosaic3")) == 0
    assert collect.main(_record_args(tmp_path, "none")) == 0
    mosaic = json.loads((tmp_path / "method_mosaic3.json").read_text())
    none = json.loads((tmp_path / "method_none.json").read_text())
    assert mosaic["kv"]["bytes_per_token"] == 44000.0 and mosaic["kv"]["achieved_ratio"] == 2.98
    assert none["kv"]["bytes_per_token"] == pytest.approx(131072.0) and none["kv"]["achieved_ratio"] is None
    assert none["log"]["max_running_req"] == 12 and none["bench"]["output_throughput"] == 102.4
    assert none["date"] == "2026-11-24" and none["device"] == "H100" and none["server_start_s"] == 90
    assert none["server_command"].startswith("python3 -m sglang.launch_server")
    (tmp_path / "info_mosaic3_end.json").unlink()  # no server info: the dense-tail allocation line must not stand in
    collect.main(_record_args(tmp_path, "mosaic3", status="bench_timed_out"))
    assert json.loads((tmp_path / "method_mosaic3.json").read_text())["kv"]["bytes_per_token"] is None


def test_done_needs_an_ok_record_and_merge_holds_every_method(tmp_path):
    _write_run(tmp_path, "none", mosaic=False)
    assert collect.main(["done", str(tmp_path), "none"]) == 1
    collect.main(_record_args(tmp_path, "none"))
    collect.main(_record_args(tmp_path, "fp8", status="server_failed"))
    assert collect.main(["done", str(tmp_path), "none"]) == 0
    assert collect.main(["done", str(tmp_path), "fp8"]) == 1
    out = tmp_path / "call.json"
    collect.main(["merge", str(tmp_path), str(out), "--model", "llama8b-random", "--workload", "random32k",
                  "--call-command", "c"])
    merged = json.loads(out.read_text())
    assert set(merged["methods"]) == {"none", "fp8"} and merged["device"] == "H100"
    assert merged["methods"]["fp8"]["bench"] is None  # a failed start reads no bench file


# ---- report ----------------------------------------------------------------------------

def rec(method: str, admitted: int | None, tput: float | None = None, tpot: float | None = None, *,
        status: str = "ok", n: int = 48, max_conc: int | None = None, usage: float = 0.99,
        device: str = "NVIDIA H100 80GB HBM3", finished: str = "2026-11-24T10:00:00+00:00") -> dict:
    bench = None if tput is None else {"output_throughput": tput, "median_tpot_ms": tpot, "p99_tpot_ms": tpot and tpot * 2,
                                       "median_itl_ms": tpot and tpot / 2,
                                       "median_ttft_ms": 1000.0, "p99_ttft_ms": 2000.0, "completed": n}
    return {"method": method, "status": status, "reason": "", "device": device, "date": finished[:10],
            "finished_at": finished, "num_prompts": n, "max_concurrency": max_conc, "input_len": 32768,
            "output_len": 256, "server": {"mem_fraction_static": 0.85},
            "log": {"max_running_req": admitted, "max_token_usage": usage},
            "kv": {"bytes_per_token": 131072.0, "achieved_ratio": None}, "bench": bench,
            "server_command": f"launch {method}", "bench_command": "bench", "call_command": "call"}


def _call(path: Path, workload: str, *records: dict, model: str = "llama8b-random") -> Path:
    path.write_text(json.dumps({"schema": 1, "model": model, "workload": workload, "call_command": "c",
                                "methods": {r["method"]: r for r in records}}))
    return path


def test_merge_prefers_a_finished_run_then_the_latest(tmp_path):
    a = _call(tmp_path / "suite_a.json", "random32k", rec("none", 12, 100.0, 30.0, finished="2026-11-24T10:00:00+00:00"),
              rec("fp8", 20, 150.0, 25.0, finished="2026-11-24T10:00:00+00:00"))
    b = _call(tmp_path / "suite_b.json", "random32k", rec("none", None, status="server_failed", finished="2026-11-25T10:00:00+00:00"),
              rec("fp8", 24, 160.0, 25.0, finished="2026-11-25T10:00:00+00:00"))
    groups = report.load_results([b, a])
    none, fp8 = groups[("llama8b-random", "random32k")]["none"], groups[("llama8b-random", "random32k")]["fp8"]
    assert none["status"] == "ok" and none["source"] == "suite_a.json"
    assert fp8["log"]["max_running_req"] == 24 and fp8["source"] == "suite_b.json"


def test_ratios_bounds_and_mismatches():
    none = rec("none", 12, 100.0, 30.0)
    assert report.ratio(rec("m", 36, 250.0), none, "admitted").value == pytest.approx(3.0)
    assert report.ratio(rec("m", 36, 250.0), none, "output_throughput").value == pytest.approx(2.5)
    capped = report.ratio(rec("m", 48), none, "admitted")  # every prompt in: a lower bound
    assert capped.value == pytest.approx(4.0) and capped.lower_bound and capped.text() == "≥4.00x"
    timed_out = report.ratio(rec("m", 20, status="bench_timed_out", usage=0.4), none, "admitted")
    assert timed_out.lower_bound and timed_out.value == pytest.approx(20 / 12)
    full = report.ratio(rec("m", 20, status="bench_timed_out", usage=0.95), none, "admitted")
    assert not full.lower_bound  # the pool filled: memory bounded it
    assert report.ratio(rec("m", 36), rec("none", 48), "admitted").value is None  # baseline not memory-bound
    assert "devices" in report.ratio(rec("m", 36, device="H200"), none, "admitted").why
    assert "settings" in report.ratio(rec("m", 36, n=64), none, "admitted").why
    assert report.ratio(rec("m", 36, status="bench_timed_out"), none, "output_throughput").value is None
    assert report.ratio(rec("m", None, status="server_failed"), none, "admitted").value is None


def _goal_groups(**eq: dict) -> report.Groups:
    runs = {"none": rec("none", 12, 100.0, 30.0), "fp8": rec("fp8", 24, 150.0, 28.0),
            "mosaic3": rec("mosaic3", 33, 320.0, 20.0), "mosaic6": rec("mosaic6", 48, 200.0, 40.0)}
    return {(report.GOAL_MODEL, report.GOAL_WORKLOAD): runs, (report.GOAL_MODEL, report.GOAL_EQ_WORKLOAD): eq}


def test_goal_verdicts_state_met_missed_open_with_numbers():
    eq = {"none": rec("none", 8, 60.0, 40.0, n=16, max_conc=8), "mosaic3": rec("mosaic3", 8, 70.0, 18.0, n=16, max_conc=8),
          "mosaic6": rec("mosaic6", 8, 50.0, 25.0, n=16, max_conc=8)}
    lines = report.goal_lines(_goal_groups(**eq))
    text = "\n".join(lines)
    assert "- mosaic3, admitted concurrency vs none at 32k (≥3x): **missed**, 2.75x" in text
    assert "- mosaic3, output tok/s vs none at 32k (≥3x): **met**, 3.20x" in text
    assert "- mosaic3, admitted concurrency vs fp8 at 32k (≥1.5x): **missed**, 1.38x" in text
    assert "- mosaic6, admitted concurrency vs none at 32k (≥3x): **met**, ≥4.00x" in text
    assert "- mosaic6, admitted concurrency vs fp8 at 32k (≥1.5x): **met**, ≥2.00x" in text
    assert "- mosaic6, output tok/s vs none at 32k (≥3x): **missed**, 2.00x" in text
    assert "- mosaic3, TPOT p50 at equal batch vs none at 32k (≤0.5x): **met**, 18.0 vs 40.0 ms at batch 8, 0.45x" in text
    assert "- mosaic6, TPOT p50 at equal batch vs none at 32k (≤0.5x): **missed**, 25.0 vs 40.0 ms at batch 8, 0.62x" in text
    assert len(lines) == 10


def test_goal_verdicts_without_data_or_at_unequal_batch_are_not_judged():
    lines = report.goal_lines({})
    assert len(lines) == 10 and all("not measured" in line for line in lines)
    eq = {"none": rec("none", 6, 60.0, 40.0, n=16, max_conc=8), "mosaic3": rec("mosaic3", 8, 70.0, 18.0, n=16, max_conc=8)}
    text = "\n".join(report.goal_lines(_goal_groups(**eq)))
    assert "mosaic3, TPOT p50 at equal batch vs none at 32k (≤0.5x): not comparable: batches 8 vs 6" in text
    groups = _goal_groups()
    groups[(report.GOAL_MODEL, report.GOAL_WORKLOAD)]["mosaic3"] = rec("mosaic3", 30, status="bench_timed_out", usage=0.5)
    text = "\n".join(report.goal_lines(groups))
    assert "mosaic3, admitted concurrency vs none at 32k (≥3x): open, ≥2.50x" in text
    assert "mosaic3, output tok/s vs none at 32k (≥3x): not measured (output_throughput not measured)" in text


def test_a_variant_of_mosaic_is_judged_against_the_goals_only_where_it_ran():
    assert not any("mosaic3_nolr" in line for line in report.goal_lines(_goal_groups()))
    groups = _goal_groups()
    groups[(report.GOAL_MODEL, report.GOAL_WORKLOAD)]["mosaic3_nolr"] = rec("mosaic3_nolr", 36, 330.0, 19.0)
    text = "\n".join(report.goal_lines(groups))
    assert "- mosaic3_nolr, admitted concurrency vs none at 32k (≥3x): **met**, 3.00x" in text
    assert "- mosaic3_nolr, output tok/s vs fp8 at 32k (≥1.5x): **met**, 2.20x" in text
    assert "- mosaic3_nolr, TPOT p50 at equal batch vs none at 32k (≤0.5x): not measured" in text


def test_prefill_ceiling_is_output_over_the_pace_of_random_prompts_only():
    r = rec("none", 26, 83.1, 165.5)
    assert report.prefill_ceiling(r) is None  # no pace measured
    r["log"]["prefill_s_per_prompt"], r["bench_command"] = 2.56, "bench_serving --dataset-name random-ids"
    assert report.prefill_ceiling(r) == pytest.approx(100.0)
    r["bench_command"] = "bench_serving --dataset-name generated-shared-prefix"  # cached prompts skip prefill
    assert report.prefill_ceiling(r) is None


def test_a_missed_throughput_goal_states_the_cap_of_the_methods_prefill_pace():
    groups = _goal_groups()
    m3 = groups[(report.GOAL_MODEL, report.GOAL_WORKLOAD)]["mosaic6"]
    m3["log"]["prefill_s_per_prompt"], m3["bench_command"] = 1.28, "random-ids"
    text = "\n".join(report.goal_lines(groups))
    assert ("- mosaic6, output tok/s vs none at 32k (≥3x): **missed**, 2.00x; its prefill pace (1.28 s a prompt) "
            "alone caps it at 200.0 tok/s, 2.00x") in text
    assert "- mosaic6, admitted concurrency vs none at 32k (≥3x): **met**, ≥4.00x\n" in text + "\n"  # no cap on admission
    m3["device"] = "H200"  # rows that cannot be compared get no cap either
    assert "caps it" not in "\n".join(report.goal_lines(groups))


def test_render_tables_carry_command_device_date_and_plot(tmp_path):
    groups = _goal_groups()
    for r in groups[(report.GOAL_MODEL, report.GOAL_WORKLOAD)].values():
        r["source"] = "suite_x.json"
    del groups[(report.GOAL_MODEL, report.GOAL_EQ_WORKLOAD)]
    block = report.render(groups, tmp_path / "plots", tmp_path)
    assert "| mosaic3 | ok | 33 | 320.0 | 20.0 / 40.0 | 10.0 | 1,000.0 / 2,000.0 | — | — | 131,072 | — | 2.75x | 3.20x | 1.38x | 2.13x " \
           "| NVIDIA H100 80GB HBM3 | 2026-11-24 | [3] |" in block
    assert "| mosaic6 | ok | ≥48 (all prompts) |" in block
    assert "[3] mosaic3: server `launch mosaic3`; bench `bench`; call `call`; file `suite_x.json`" in block
    assert "](plots/suite_llama8b-random_random32k.png)" in block
    assert (tmp_path / "plots" / "suite_llama8b-random_random32k.png").stat().st_size > 1000


def test_render_without_results_says_no_runs_were_made(tmp_path):
    block = report.render({}, tmp_path, tmp_path)
    assert "No serving-suite runs have been made yet" in block
    assert "|" not in block and "met" not in block and ".png" not in block


def test_readme_block_is_replaced_between_markers_only():
    text = f"head\n{report.BEGIN}\nold\n{report.END}\ntail\n"
    once = report.replace_block(text, "new")
    assert once == f"head\n{report.BEGIN}\nnew\n{report.END}\ntail\n"
    assert report.replace_block(once, "new") == once
    with pytest.raises(SystemExit):
        report.replace_block("no markers", "new")


def test_committed_readme_is_what_report_writes_for_the_committed_results():
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    block = readme[readme.index(report.BEGIN) + len(report.BEGIN): readme.index(report.END)].strip()
    groups = report.load_results((ROOT / "benchmarks" / "results").glob("suite_*.json"))
    if not groups:
        assert block == report.render({}, Path("."), Path("."))
    else:  # regenerated after the last results were committed
        sources = {r["source"] for methods in groups.values() for r in methods.values()}
        assert all(f"`{s}`" in block for s in sources)


# ---- workload table, policy, model builder ---------------------------------------------

def _plan(*args: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in (shlex.split(workloads.plan(*args), posix=True)))


def test_goal_workloads_exist_and_fit_the_8b_context():
    for name in (report.GOAL_WORKLOAD, report.GOAL_EQ_WORKLOAD):
        assert report.GOAL_MODEL in workloads.WORKLOADS[name].prompts
    plan = _plan(report.GOAL_MODEL, report.GOAL_WORKLOAD)
    assert "--context-length 33088" in plan["BASE"] and "--random-input-len 32768" in plan["BENCH_ARGS"]
    assert "--max-concurrency" not in plan["BENCH_ARGS"]
    eq = _plan(report.GOAL_MODEL, report.GOAL_EQ_WORKLOAD)
    assert "--max-concurrency 8" in eq["BENCH_ARGS"] and eq["TAG"] != plan["TAG"]


def test_smollm2_prompts_fill_but_do_not_exceed_its_context():
    plan = _plan("smollm2", "random8k")
    assert plan["INPUT_LEN"] == "7936" and "--context-length" not in plan["BASE"]
    assert "--dataset-name random-ids --tokenize-prompt" in plan["BENCH_ARGS"]
    with pytest.raises(SystemExit):
        workloads.plan("smollm2", "random32k")
    overridden = _plan("smollm2", "random8k", "16", "0.3", "--cuda-graph-max-bs 16")
    assert "--num-prompts 16" in overridden["BENCH_ARGS"] and overridden["BASE"].endswith("--cuda-graph-max-bs 16")
    assert "--mem-fraction-static 0.3" in overridden["BASE"] and overridden["TAG"] != plan["TAG"]


def test_gsp_decode_batches_stay_within_the_largest_cuda_graph():
    """512 requests decode at once: every method captures graphs that large, none runs eager."""
    for model in ("smollm2", "llama8b-random"):
        plan = _plan(model, "gsp")
        assert f"--cuda-graph-max-bs {plan['NUM_PROMPTS']}" in plan["BASE"]
    assert "--cuda-graph-max-bs" not in _plan("smollm2", "random8k")["BASE"]


def test_methods_differ_only_in_compression_flags():
    assert workloads.METHODS["fp8"] == workloads.METHODS["none"] + ["--kv-cache-dtype", "fp8_e4m3"]
    for m in ("mosaic3", "mosaic6"):  # the plugin refuses other attention backends and KV dtypes
        assert "--attention-backend" not in workloads.METHODS[m] and "--kv-cache-dtype" not in workloads.METHODS[m]


def test_mosaic_flags_go_to_the_mosaic_methods_alone_and_into_the_settings_tag():
    extra = "--kv-compress-sealing device --kv-compress-cuda-graph"
    assert workloads.method_flags("none", extra) == workloads.METHODS["none"]
    assert workloads.method_flags("fp8", extra) == workloads.METHODS["fp8"]
    assert workloads.method_flags("mosaic3", extra) == workloads.METHODS["mosaic3"] + extra.split()
    plain, with_extra = _plan("smollm2", "random8k"), _plan("smollm2", "random8k", "", "", "", extra)
    assert plain["BASE"] == with_extra["BASE"] and plain["TAG"] != with_extra["TAG"]  # kept records never mix
    with pytest.raises(SystemExit):
        workloads.method_flags("mosaic4")


def test_the_6x_variant_is_its_preset_at_6x():
    from mosaickv.config import read_policy_source

    ours = read_policy_source(SUITE / "mosaic6.yaml")
    theirs = read_policy_source("mosaic")
    assert {k: v for k, v in ours.items() if k not in ("name", "ratio")} == \
           {k: v for k, v in theirs.items() if k not in ("name", "ratio")}
    assert ours["ratio"] == 6 and ours["name"] == "mosaic6"


def accuracy_flags(method: str, out: Path) -> subprocess.CompletedProcess:
    """``flags_of`` of benchmarks/suite/accuracy_gpu.sh, alone."""
    script = f"OUT={shlex.quote(str(out))}; eval \"$(sed -n '/^flags_of() {{/,/^}}/p' {SUITE}/accuracy_gpu.sh)\"; flags_of {method}"
    return subprocess.run(["bash", "-c", script], cwd=SUITE.parents[1], capture_output=True, text=True)


@pytest.mark.parametrize("method, preset, ratio", [("uniform2d6", "uniform2d", 6), ("mosaic_heads3", "mosaic_heads", 3),
                                                   ("think1.5", "think", 1.5),
                                                   ("mosaic_heads14_6", str(SUITE / "mosaic_heads14.yaml"), 6),
                                                   ("mosaic_heads_nolr3", str(SUITE / "mosaic_heads_nolr.yaml"), 3)])
def test_an_accuracy_method_is_its_preset_at_its_ratio(method, preset, ratio, tmp_path):
    from mosaickv.config import load_policy

    run = accuracy_flags(method, tmp_path)
    assert run.returncode == 0, run.stderr
    path = tmp_path / "policies" / f"{method}.yaml"
    assert run.stdout.split() == ["--kv-compress", "mosaickv", "--kv-compress-config", str(path)]
    ours, theirs = load_policy(str(path)), load_policy(preset)
    assert ours.ratio == ratio and ours.name == method
    assert ours.strategy == theirs.strategy and ours.token_scorer == theirs.token_scorer


@pytest.mark.parametrize("method", ["uniform2d", "bogus3", "mosaic"])
def test_an_accuracy_method_without_a_preset_and_ratio_is_refused_by_name(method, tmp_path):
    run = accuracy_flags(method, tmp_path)
    assert run.returncode == 2 and f"unknown method {method}:" in run.stderr


def test_random_model_is_deterministic_with_the_tokenizer_folder_vocab(tmp_path):
    builder = _load("make_random_model")
    from safetensors.torch import load_file

    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "config.json").write_text(json.dumps({"vocab_size": 96, "bos_token_id": 1, "eos_token_id": 2}))
    (tok / "tokenizer.json").write_text("{}")
    (tok / "model.safetensors").write_text("not a tokenizer file")
    tiny = ["--tokenizer-from", str(tok), "--device", "cpu", "--layers", "2", "--hidden", "32", "--intermediate", "64",
            "--heads", "4", "--kv-heads", "2", "--head-dim", "8", "--shard-gb", "0.00001"]
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        builder.main(["--out", str(tmp_path / name), "--seed", seed, *tiny])

    def weights(name: str) -> dict:
        index = json.loads((tmp_path / name / "model.safetensors.index.json").read_text())
        out = {}
        for f in set(index["weight_map"].values()):
            out.update(load_file(str(tmp_path / name / f)))
        return out

    a, b, c = weights("a"), weights("b"), weights("c")
    assert all(a[k].equal(b[k]) for k in a) and not a["lm_head.weight"].equal(c["lm_head.weight"])
    assert a["model.embed_tokens.weight"].shape == (96, 32) and a["model.layers.1.self_attn.k_proj.weight"].shape == (16, 32)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["vocab_size"] == 96 and config["num_key_value_heads"] == 2 and config["rope_parameters"]["rope_theta"] == 500000.0
    assert sorted(p.name for p in (tmp_path / "a").iterdir() if not p.name.startswith("model")) == ["config.json", "tokenizer.json"]
    assert not (tmp_path / "a.partial").exists()


# ---- run_comparison.sh against a stand-in SGLang ---------------------------------------

STUB_SERVER = '''
import json, sys, threading, time
from http.server import BaseHTTPRequestHandler, HTTPServer
port = int(sys.argv[sys.argv.index("--port") + 1])
print("[2026-11-24 10:00:00 TP0] KV Cache is allocated. dtype: torch.bfloat16, #tokens: 1000, K size: 0.01 GB, V size: 0.01 GB", flush=True)
print("[2026-11-24 10:00:01 TP0] Decode batch, #running-req: 7, #token: 900, token usage: 0.95, cuda graph: True, "
      "gen throughput (token/s): 10.00, #queue-req: 3", flush=True)
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        self.send_response(200); self.end_headers()
        self.wfile.write(json.dumps({"max_total_num_tokens": 1000, "internal_states": [{}]}).encode())
HTTPServer(("127.0.0.1", port), H).serve_forever()
'''
STUB_BENCH = f'''
import json, sys
out = sys.argv[sys.argv.index("--output-file") + 1]
open(out, "a").write(json.dumps({BENCH_LINE!r}) + "\\n")
'''


def test_run_comparison_records_resumes_and_returns_two_files(tmp_path):
    if not (shutil.which("curl") and shutil.which("setsid")):
        pytest.skip("needs curl and setsid")
    site = tmp_path / "site"
    for name, text in (("sglang/__init__.py", ""), ("sglang/launch_server.py", STUB_SERVER),
                       ("sglang/bench_serving.py", STUB_BENCH), ("pip/__init__.py", ""), ("pip/__main__.py", "")):
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(text)
    (tmp_path / "models" / "smollm2-135m-instruct").mkdir(parents=True)
    (tmp_path / "models" / "smollm2-135m-instruct" / "config.json").write_text("{}")
    env = {**os.environ, "SITE": str(site), "STATE_ROOT": str(tmp_path / "state"), "MKV_MODELS": str(tmp_path / "models"),
           "MODEL": "smollm2", "WORKLOAD": "random8k", "N": "8", "METHODS": "none", "BUDGET_S": "120", "MIN_METHOD_S": "30"}
    script = ["bash", str(SUITE / "run_comparison.sh")]
    first = subprocess.run(script, cwd=ROOT, env={**env, "OUT": str(tmp_path / "out1")}, capture_output=True, text=True,
                           timeout=100)
    assert first.returncode == 0, first.stdout + first.stderr
    outs = sorted(p.name for p in (tmp_path / "out1").iterdir())
    assert len(outs) == 2 and outs[0].endswith(".json") and outs[1].endswith("_logs.tgz")
    call = json.loads((tmp_path / "out1" / outs[0]).read_text())
    none = call["methods"]["none"]
    assert none["status"] == "ok" and none["log"]["max_running_req"] == 7 and none["bench"]["completed"] == 48
    assert "--attention-backend triton" in none["server_command"] and "--num-prompts 8" in none["bench_command"]
    second = subprocess.run(script, cwd=ROOT, env={**env, "OUT": str(tmp_path / "out2"), "METHODS": "none fp8",
                                                  "BUDGET_S": "40"}, capture_output=True, text=True, timeout=100)
    assert "none: kept from an earlier call" in second.stdout
    call = json.loads(next((tmp_path / "out2").glob("*.json")).read_text())
    assert call["methods"]["none"]["finished_at"] == none["finished_at"] and call["methods"]["fp8"]["status"] == "skipped"


@pytest.mark.parametrize("variant", ["heads_uniform2d", "heads_snapkv", "heads_nodrop16"])
def test_an_inner_strategy_variant_keeps_mosaic_heads_whole_heads_and_changes_only_the_rest(variant):
    from mosaickv.config import load_policy

    ours, theirs = load_policy(str(SUITE / f"{variant}.yaml")), load_policy("mosaic_heads")
    assert (ours.strategy.heads, ours.strategy.dense) == (theirs.strategy.heads, theirs.strategy.dense)
    assert ours.strategy.inner != theirs.strategy.inner
    assert ours.token_scorer == theirs.token_scorer and ours.segment_size == theirs.segment_size


def smollm2_shaped(policy, seed: int) -> list:
    """Random observations of SmolLM2's shape (30 layers of 3 KV heads, 9 query heads, d=64)."""
    import torch

    from mosaickv.parts import Observation

    g = torch.Generator().manual_seed(seed)
    t = policy.min_context
    return [Observation(torch.randn(3, t, 64, generator=g), torch.randn(3, t, 64, generator=g),
                        torch.randn(9, t, 64, generator=g)) for _ in range(30)]


def test_heads_graded_is_mosaic_heads_with_the_profile_weighing_the_other_heads():
    from mosaickv.config import load_policy

    ours, theirs = load_policy(str(SUITE / "heads_graded.yaml")), load_policy("mosaic_heads")
    assert (ours.strategy.heads, ours.strategy.dense, ours.strategy.inner) == \
        (theirs.strategy.heads, theirs.strategy.dense, theirs.strategy.inner)
    assert ours.strategy.graded > 0 == theirs.strategy.graded


def test_heads_graded_moves_bytes_to_the_heads_the_profile_ranks_next_within_the_budget(tmp_path):
    """At 6x the 10 top heads stay whole; the next ten by score get more of the rest than ungraded."""
    import torch

    from mosaickv.config import load_policy
    from plan_bytes import bytes_per_head

    spent = {}
    for name in ("mosaic_heads", str(SUITE / "heads_graded.yaml")):
        path = tmp_path / "p.yaml"
        path.write_text(f"base: {name}\nname: p\nratio: 6\n")
        policy = load_policy(str(path))
        per_head, budget = bytes_per_head(policy, smollm2_shaped(policy, 6), 64)
        assert per_head.sum() <= budget
        spent[name] = per_head.flatten()
    order = torch.tensor(load_policy("mosaic_heads").strategy.heads).flatten().argsort(descending=True)
    ungraded, graded = spent["mosaic_heads"], spent[str(SUITE / "heads_graded.yaml")]
    assert torch.equal(graded[order[:10]], ungraded[order[:10]])  # the whole heads
    assert graded[order[10:20]].sum() > 1.5 * ungraded[order[10:20]].sum()
    assert graded[order[40:]].sum() < ungraded[order[40:]].sum()


@pytest.mark.parametrize("ratio", [3.0, 6.0])
def test_heads_nodrop16_keeps_tokens_of_every_block_within_the_budget(ratio, tmp_path):
    """At SmolLM2's shape (30 layers of 3 KV heads, d=64) on random observations."""
    from mosaickv.compressor import Compressor
    from mosaickv.config import load_policy
    from mosaickv.formats import BlockFormat, dense_block_bytes

    path = tmp_path / "p.yaml"
    path.write_text(f"base: {SUITE / 'heads_nodrop16.yaml'}\nname: nodrop\nratio: {ratio}\n")
    policy = load_policy(str(path))
    cache = Compressor(policy, 64).compress(smollm2_shaped(policy, int(ratio)), scope="segment")
    planned = [seg for layer in cache.layers for seg in layer.blocks[policy.sink_segments:]]
    blocks = [block for seg in planned for block in seg]
    size = policy.segment_size
    assert len(blocks) >= 30 * 3 * 20
    assert sum(b.nbytes() for b in blocks) <= len(blocks) * dense_block_bytes(size, 64) / ratio
    assert all(b.fmt.tokens > 0 for b in blocks)
    assert any(b.fmt != BlockFormat(size) for b in blocks)


def test_heads_fp8_and_its_baselines_keep_twice_the_heads_whole_in_fp8_within_the_budget(tmp_path):
    """At SmolLM2's shape: heads_fp8 and its FP8 baselines keep the same top heads whole,
    every token in e4m3 (twice mosaic_heads' count: 40 at 3x, 20 at 6x), spend at most the
    budget at 6x, and differ on the other heads only: heads_fp8 stores some of them in fp8,
    the uniform 2-D baseline none."""
    from mosaickv.compressor import Compressor
    from mosaickv.config import load_policy
    from mosaickv.formats import FP8, BlockFormat, dense_block_bytes

    ratio, whole = 6.0, 20
    top = set(load_policy("mosaic_heads").strategy._order[:whole].tolist())
    kinds = {}
    for name in ("heads_fp8", "heads_uniform2d_fp8", "heads_snapkv_fp8"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"base: {SUITE / (name + '.yaml')}\nname: {name}\nratio: {ratio}\n")
        policy = load_policy(str(path))
        for r, count in ((3.0, 40), (6.0, whole)):
            assert policy.strategy.whole_heads(r) == count == 2 * load_policy("mosaic_heads").strategy.whole_heads(r)
        cache = Compressor(policy, 64).compress(smollm2_shaped(policy, int(ratio)), scope="segment")
        blocks = [(layer * 3 + head, block) for layer, compressed in enumerate(cache.layers)
                  for seg in compressed.blocks[policy.sink_segments:] for head, block in enumerate(seg)]
        size = policy.segment_size
        assert sum(b.nbytes() for _, b in blocks) <= len(blocks) * dense_block_bytes(size, 64) / ratio
        assert {h for h, b in blocks if b.fmt == BlockFormat(size, FP8, FP8)} >= top
        assert all(b.fmt == BlockFormat(size, FP8, FP8) for h, b in blocks if h in top)
        kinds[name] = {(b.fmt.k.kind, b.fmt.v.kind) for h, b in blocks if h not in top and b.fmt.tokens}
    assert any("fp8" in pair for pair in kinds["heads_fp8"])
    assert not any("fp8" in pair for pair in kinds["heads_uniform2d_fp8"])
    assert kinds["heads_snapkv_fp8"] == {("fp8", "fp8")}
