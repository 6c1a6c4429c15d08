"""Turn one method's run (server log, /server_info, bench_serving's JSONL) into a record,
and a comparison's records into the one JSON a device call brings back.

Admitted concurrency comes from the server's own log (``#running-req`` of its prefill and
decode batch lines), not from the client: it is what the scheduler let in, and it is
known even when bench_serving does not finish inside the call.

    collect.py method STATE METHOD --status ok ...   (as run_comparison.sh calls it)
    collect.py done STATE METHOD                      exit 0 if STATE holds an "ok" record
    collect.py merge STATE OUT_JSON --model M --workload W --call-command C
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefill_pace import prefill_pace  # noqa: E402

SCHEMA = 1
GIB = 1 << 30  # SGLang's "GB" in its KV allocation line is 1024**3 bytes

RUNNING = re.compile(r"#running-req: (\d+)")
QUEUE = re.compile(r"#queue-req: (\d+)")
USAGE = re.compile(r"token usage: ([0-9.]+)")
DECODE = re.compile(r"Decode batch.*?#running-req: (\d+).*?gen throughput \(token/s\): ([0-9.]+)")
KV_ALLOC = re.compile(r"KV Cache is allocated\. dtype: (\S+), #tokens: (\d+), K size: ([0-9.]+) GB, V size: ([0-9.]+) GB")
SCHED = re.compile(r"max_total_num_tokens=(\d+), chunked_prefill_size=(-?\d+), max_prefill_tokens=(\d+), "
                   r"max_running_requests=(\d+), context_len=(\d+), available_gpu_mem=([0-9.]+) GB")

# bench_serving's result line: the figures the tables use, and what identifies the run.
BENCH_KEYS = (
    "dataset_name", "random_input_len", "random_output_len", "max_concurrency", "completed", "duration",
    "total_input_tokens", "total_output_tokens", "request_throughput", "output_throughput",
    "max_output_tokens_per_s", "max_concurrent_requests", "concurrency",
    "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
    "median_itl_ms", "p99_itl_ms", "median_e2e_latency_ms",
)
SERVER_KEYS = (
    "max_total_num_tokens", "max_running_requests", "context_length", "kv_cache_dtype", "page_size",
    "attention_backend", "chunked_prefill_size", "mem_fraction_static", "kv_compress", "kv_compress_config",
)


def parse_server_log(text: str) -> dict[str, Any]:
    """What the scheduler logged: peak running and queued requests, pool use, decode rate,
    seconds of prefill per prompt (:func:`prefill_pace`; None where no prompt finished its
    prefill between decode lines), KV layout."""
    running = [int(m) for m in RUNNING.findall(text)]
    queued = [int(m) for m in QUEUE.findall(text)]
    usage = [float(m) for m in USAGE.findall(text)]
    gen = [float(tput) for n, tput in DECODE.findall(text) if int(n) > 0]
    out: dict[str, Any] = {
        "max_running_req": max(running, default=None),
        "max_queue_req": max(queued, default=None),
        "max_token_usage": max(usage, default=None),
        "decode_log_lines": len(gen),
        "gen_throughput_median": statistics.median(gen) if gen else None,
        "prefill_s_per_prompt": _pace(text),
        "kv_allocated": None,
        "scheduler": None,
    }
    if m := KV_ALLOC.search(text):
        tokens, k_gb, v_gb = int(m[2]), float(m[3]), float(m[4])
        out["kv_allocated"] = {"dtype": m[1], "tokens": tokens, "bytes": (k_gb + v_gb) * GIB,
                               "bytes_per_token": (k_gb + v_gb) * GIB / tokens if tokens else None}
    if m := SCHED.search(text):
        keys = ("max_total_num_tokens", "chunked_prefill_size", "max_prefill_tokens", "max_running_requests", "context_len")
        out["scheduler"] = {**dict(zip(keys, map(int, m.groups()[:5]))), "available_gpu_mem_gb": float(m[6])}
    return out


def _pace(text: str) -> float | None:
    try:
        return prefill_pace(text.splitlines())["seconds_per_prompt"]
    except ValueError:
        return None


def read_bench(path: Path) -> dict[str, Any] | None:
    """The last line bench_serving appended to ``--output-file`` (it appends one per run)."""
    if not path.is_file():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        return None
    result = json.loads(lines[-1])
    return {k: result.get(k) for k in BENCH_KEYS}


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def server_summary(info: dict[str, Any] | None) -> dict[str, Any] | None:
    """The launch settings that decide capacity, and MosaicKV's kv_compress_info (rank 0)."""
    if info is None:
        return None
    out = {k: info.get(k) for k in SERVER_KEYS}
    states = info.get("internal_states") or [{}]
    out["kv_compress_info"] = states[0].get("kv_compress_info")
    return out


def kv_figures(log: dict[str, Any], info: dict[str, Any] | None, mosaic: bool) -> dict[str, Any]:
    """KV bytes per token: MosaicKV's planned figure (tails, headers, page tables included),
    else the dense pool's allocation over its tokens; MosaicKV's achieved ratio after the run.
    A MosaicKV server's allocation line covers its dense tail only, so it is never used for one."""
    kv = (info or {}).get("kv_compress_info")
    if kv:
        return {
            "bytes_per_token": kv.get("planned_bytes_per_token"),
            "source": "kv_compress_info.planned_bytes_per_token",
            "dense_bytes_per_token": kv.get("dense_bytes_per_token"),
            "achieved_ratio": kv.get("achieved_ratio"),
            "capacity_gain": kv.get("capacity_gain"),
        }
    alloc = {} if mosaic else log.get("kv_allocated") or {}
    return {"bytes_per_token": alloc.get("bytes_per_token"), "source": None if mosaic else "server log: KV Cache is allocated",
            "dense_bytes_per_token": None, "achieved_ratio": None, "capacity_gain": None}


def method_record(state: Path, method: str, status: str, reason: str, meta: dict[str, Any]) -> dict[str, Any]:
    log_path = state / f"server_{method}.log"
    log = parse_server_log(log_path.read_text(errors="replace")) if log_path.is_file() else parse_server_log("")
    start = server_summary(read_json(state / f"info_{method}_start.json"))
    end = server_summary(read_json(state / f"info_{method}_end.json"))
    cmd_path = state / f"cmd_{method}.txt"
    cmd = cmd_path.read_text().strip() if cmd_path.is_file() else None
    info = end if end and end.get("kv_compress_info") else start or end
    return {
        "method": method,
        "status": status,
        "reason": reason,
        **meta,
        "server_command": cmd,
        "server": end or start,
        "log": log,
        "kv": kv_figures(log, info, "--kv-compress mosaickv" in (cmd or "")),
        "bench": read_bench(state / f"bench_{method}.jsonl"),
    }


def merge(state: Path, model: str, workload: str, call_command: str) -> dict[str, Any]:
    """Every record of this (model, workload, settings) the machine holds, earlier calls' included."""
    methods = {}
    for path in sorted(state.glob("method_*.json")):
        record = json.loads(path.read_text())
        methods[record["method"]] = record
    devices = sorted({r["device"] for r in methods.values() if r.get("device")})
    return {
        "schema": SCHEMA,
        "model": model,
        "workload": workload,
        "device": ", ".join(devices) or None,
        "date": dt.date.today().isoformat(),
        "call_command": call_command,
        "methods": methods,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="records of the serving suite (see run_comparison.sh)")
    sub = p.add_subparsers(dest="cmd", required=True)
    done = sub.add_parser("done", help="exit 0 if STATE holds an 'ok' record for METHOD")
    done.add_argument("state", type=Path)
    done.add_argument("method")
    rec = sub.add_parser("method", help="write STATE/method_METHOD.json from the run's files")
    rec.add_argument("state", type=Path)
    rec.add_argument("method")
    for name in ("status", "reason", "device", "started", "bench-command", "call-command"):
        rec.add_argument(f"--{name}", default="")
    for name in ("num-prompts", "input-len", "output-len"):
        rec.add_argument(f"--{name}", type=int, required=True)
    rec.add_argument("--max-concurrency", type=int)
    rec.add_argument("--start-s", type=int)
    mer = sub.add_parser("merge", help="one JSON of every record in STATE")
    mer.add_argument("state", type=Path)
    mer.add_argument("out", type=Path)
    for name in ("model", "workload", "call-command"):
        mer.add_argument(f"--{name}", required=True)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    if a.cmd == "done":
        record = read_json(a.state / f"method_{a.method}.json")
        return 0 if record and record.get("status") == "ok" else 1
    if a.cmd == "merge":
        a.out.write_text(json.dumps(merge(a.state, a.model, a.workload, a.call_command), indent=1))
        return 0
    meta = {
        "device": a.device or None,
        "date": a.started[:10],
        "started_at": a.started,
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "server_start_s": a.start_s,
        "num_prompts": a.num_prompts,
        "max_concurrency": a.max_concurrency,
        "input_len": a.input_len,
        "output_len": a.output_len,
        "bench_command": a.bench_command,
        "call_command": a.call_command,
    }
    record = method_record(a.state, a.method, a.status, a.reason, meta)
    (a.state / f"method_{a.method}.json").write_text(json.dumps(record, indent=1))
    b, lg = record["bench"] or {}, record["log"]
    print(f"{a.method}: {a.status}{f' ({a.reason})' if a.reason else ''}; admitted {lg['max_running_req']}, out tok/s {b.get('output_throughput')}, "
          f"TPOT p50 {b.get('median_tpot_ms')} ms, KV B/token {record['kv']['bytes_per_token']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
