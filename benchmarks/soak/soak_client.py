"""Soak a running SGLang server with the issue-6 mix, flush it, check the invariants.

    python benchmarks/soak/soak_client.py --port 30001 --out soak.json [--requests 2000]

Phases: flush and read ``kv_compress_info`` (start); greedy probes sent alone, cold then
warm (once their seals are applied); the mix at ``--concurrency`` with a poller watching
sealing and eviction; then seals settled, ``POST /flush_cache``, ``kv_compress_info``
again (end), and the checks of ``soak_checks``. Standard library only (http.client and
threads): it runs on the GPU machine, which has no network. Exit status 1 when a check
fails, 2 when the server never answered; the JSON says which and why.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import itertools
import json
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from soak_checks import Expect, leaked_bytes, passed, run_checks
from soak_mix import PROBE_REPEATS, MixConfig, Req, build_mix, kind_counts, probe_body, probe_prompts
from soak_results import Collected, Outcome, evictions, summarize_greedy, summarize_requests

MONITOR_KEYS = ("sealed_segments", "free_slabs", "dense_tail_tokens_in_use", "sealing_pending", "oldest_pending_s",
                "compression_calls", "arena_full", "worker_errors")
TAIL_S = 35  # of the deadline, kept for cutting late requests, settling, flushing and the last reads
GRACE_S = 10  # requests still open this long after sending stopped are cut
FAILURES_BEFORE_HEALTH_CHECK = 8


class Server:
    """Small JSON calls (health, info, flush), never past the client's deadline."""

    def __init__(self, host: str, port: int, end: float) -> None:
        self.host, self.port, self.end = host, port, end

    def call(self, method: str, path: str, body: Optional[dict] = None, timeout: float = 30.0):
        """(status, parsed JSON or text); status None when no answer came."""
        timeout = max(1.0, min(timeout, self.end - time.monotonic()))
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read().decode(errors="replace")
            try:
                return resp.status, json.loads(raw)
            except ValueError:
                return resp.status, raw
        except (OSError, http.client.HTTPException) as exc:
            return None, f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()

    def healthy(self, generate: bool = False) -> bool:
        """``/health`` answers while the HTTP server is up; ``/health_generate`` only once
        the scheduler has generated a token (a hung scheduler fails it)."""
        return self.call("GET", "/health_generate" if generate else "/health", timeout=30 if generate else 10)[0] == 200

    def info(self) -> Optional[dict]:
        status, data = self.call("GET", "/get_server_info")
        return data if status == 200 and isinstance(data, dict) else None

    def kv_info(self) -> Optional[dict]:
        return kv_of(self.info())


def kv_of(info: Optional[dict]) -> Optional[dict]:
    states = (info or {}).get("internal_states") or [{}]
    return states[0].get("kv_compress_info")


class Driver:
    """Sends requests, each on its own connection; remembers the open ones so that the
    deadline can cut them, and stops sending once the server is gone."""

    def __init__(self, server: Server, timeout: float) -> None:
        self.server, self.timeout = server, timeout
        self.stop_at = server.end
        self.cutting, self.dead = threading.Event(), threading.Event()
        self._open: dict[int, http.client.HTTPConnection] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._failures_in_row = 0

    def send(self, req: Req) -> Outcome:
        out = Outcome(req.index, req.kind, req.endpoint, req.stream, probe=req.probe)
        if self.dead.is_set() or self.cutting.is_set() or time.monotonic() > self.stop_at:
            return out
        conn = http.client.HTTPConnection(self.server.host, self.server.port, timeout=self.timeout)
        key = next(self._ids)
        with self._lock:
            self._open[key] = conn
        out.sent, start = True, time.monotonic()
        try:
            conn.request("POST", req.path, body=json.dumps(req.body), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            out.status = resp.status
            if resp.status != 200:
                out.error = error_message(resp.read())
            elif req.stream:
                read_stream(resp, req, out)
            else:
                got = Collected()
                got.add(json.loads(resp.read()))
                got.fill(out)
            self._note(ok=True)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            out.status = None
            if self.cutting.is_set():
                out.cut = True
            else:
                out.error = f"{type(exc).__name__}: {exc}"
                self._note(ok=False)
        finally:
            with self._lock:
                self._open.pop(key, None)
            conn.close()
            out.seconds = round(time.monotonic() - start, 3)
        return out

    def _note(self, ok: bool) -> None:
        """After several transport failures in a row, one health check decides whether
        the server is gone (then nothing more is sent)."""
        with self._lock:
            self._failures_in_row = 0 if ok else self._failures_in_row + 1
            check = self._failures_in_row == FAILURES_BEFORE_HEALTH_CHECK
        if check and not self.server.healthy():
            self.dead.set()

    def cut_all(self) -> None:
        """Close every open request's socket (the deadline has come)."""
        self.cutting.set()
        with self._lock:
            conns = list(self._open.values())
        for conn in conns:
            try:
                if conn.sock is not None:
                    conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def error_message(raw: bytes) -> str:
    try:
        data = json.loads(raw)
        return str(data.get("message") or (data.get("error") or {}).get("message") or data)[:300]
    except (ValueError, AttributeError):
        return raw[:300].decode(errors="replace")


def read_stream(resp: http.client.HTTPResponse, req: Req, out: Outcome) -> None:
    """Server-sent events up to [DONE]; an abort request closes after ``abort_after`` events."""
    got, events, done = Collected(), 0, False
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            break
        got.add(json.loads(data))
        events += 1
        if req.abort_after and events >= req.abort_after:
            out.aborted = True
            break
    if not (done or out.aborted):
        raise ConnectionError("the stream ended before [DONE]")
    got.fill(out, done)


def monitor(server: Server, every: float, stop: threading.Event, series: list[dict]) -> None:
    """Poll kv_compress_info during the mix: sealed segments falling means eviction."""
    t0 = time.monotonic()
    while not stop.wait(every):
        kv = server.kv_info()
        row = {"t": round(time.monotonic() - t0, 1)}
        if kv is None:
            row["unreachable"] = True
        else:
            row.update({k: kv.get(k) for k in MONITOR_KEYS})
            row["part_failures"] = sum((kv.get("part_failures") or {}).values())
        series.append(row)


def settle(server: Server, until: float) -> Optional[dict]:
    """kv_compress_info once no seal is pending (or at ``until``); an idle mosaickv server
    applies finished seals itself (the plugin's hook on Scheduler.on_idle)."""
    while True:
        kv = server.kv_info()
        if kv is None or kv.get("sealing_pending", 0) == 0 or time.monotonic() > until:
            return kv
        time.sleep(0.5)


def flush(server: Server, until: float) -> dict:
    """POST /flush_cache until it is done (SGLang refuses while requests are in flight)."""
    attempts = 0
    while True:
        attempts += 1
        status, text = server.call("POST", "/flush_cache")
        if status == 200 or time.monotonic() > until or status is None:
            return {"status": status, "attempts": attempts, "answer": str(text)[:200]}
        time.sleep(2)


def run_mix(driver: Driver, reqs: list[Req], concurrency: int) -> list[Outcome]:
    """Send ``reqs`` in order from ``concurrency`` threads (until ``driver.stop_at``)."""
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(driver.send, reqs))


def send_probes(driver: Driver, cfg: MixConfig) -> list[Outcome]:
    """Each probe once, alone (one after the other)."""
    return [driver.send(Req(-1 - j, "probe", "completions", probe_body(p, cfg), probe=j))
            for j, p in enumerate(probe_prompts(cfg))]


def soak(args: argparse.Namespace) -> tuple[dict, int]:
    t0 = time.monotonic()
    end = t0 + args.deadline_s
    server = Server(args.host, args.port, end)
    cfg = MixConfig(requests=args.requests, seed=args.seed)
    reqs = build_mix(cfg)
    record: dict = {"command": sys.argv, "config": {**dataclasses.asdict(cfg), "concurrency": args.concurrency,
                                                    "deadline_s": args.deadline_s, "timeout_s": args.timeout_s},
                    "mix_counts": kind_counts(cfg.requests, cfg.probes * PROBE_REPEATS)}
    while not server.healthy():
        if time.monotonic() > t0 + 30:
            record["error"] = "server not healthy"
            return record, 2
        time.sleep(1)
    initial = server.info()
    record["server"] = {k: (initial or {}).get(k) for k in (
        "kv_compress", "kv_compress_config", "max_total_num_tokens", "max_running_requests", "mem_fraction_static",
        "max_total_tokens", "page_size", "attention_backend", "context_length", "version")}
    record["server"]["effective_max_running_requests"] = ((initial or {}).get("internal_states") or [{}])[0].get(
        "effective_max_running_requests_per_dp")
    info = {"initial": kv_of(initial)}
    record["flush_at_start"] = flush(server, time.monotonic() + 30)
    info["start"] = server.kv_info()

    driver = Driver(server, args.timeout_s)
    driver.stop_at = end - TAIL_S
    # A hung server must not hold the run: what is still open GRACE_S after sending stops is cut.
    cutter = threading.Timer(max(0.0, driver.stop_at + GRACE_S - time.monotonic()), driver.cut_all)
    cutter.start()
    cold = send_probes(driver, cfg)
    settle(server, time.monotonic() + 20)
    warm = send_probes(driver, cfg)

    series: list[dict] = []
    stop = threading.Event()
    poller = threading.Thread(target=monitor, args=(server, args.poll_s, stop, series), daemon=True)
    poller.start()
    t_mix = time.monotonic()
    outcomes = run_mix(driver, reqs, args.concurrency)
    record["mix_seconds"] = round(time.monotonic() - t_mix, 1)
    cutter.cancel()
    stop.set()
    poller.join(timeout=35)

    info["before_flush"] = settle(server, min(end - 18, time.monotonic() + 8))
    record["flush"] = flush(server, end - 8)
    info["end"] = settle(server, end - 3)
    record["server_alive_at_end"] = server.healthy(generate=True)
    record["server_gone_during_mix"] = driver.dead.is_set()

    record["requests"] = summarize_requests(outcomes, len(reqs))
    record["greedy"] = summarize_greedy(cold, warm, [o for o in outcomes if o.kind == "probe" and o.sent])
    record["evictions"] = evictions(series, record["greedy"])
    record["kv_compress_info"] = info
    if info["start"] and info["end"]:
        record["bytes_leaked"] = leaked_bytes(info["start"], info["end"])
    expect = Expect(kv_compress=not args.baseline, part_failure=args.expect_part_failure,
                    require_eviction=not args.no_require_eviction, greedy_tolerance=args.greedy_tolerance)
    record["checks"] = run_checks(record, expect)
    record["ok"] = passed(record["checks"])
    record["figures"] = figures(record)
    record["duration_s"] = round(time.monotonic() - t0, 1)
    record["monitor"] = series
    record["outcomes"] = [o.row() for o in cold + warm + outcomes if o.sent]
    return record, 0 if record["ok"] else 1


def figures(record: dict) -> dict:
    """The numbers issue 6 asks to commit."""
    req, end = record["requests"], record["kv_compress_info"].get("end") or {}
    return {"requests_sent": req["sent"], "completed": req["completed"], "aborted": req["aborted"],
            "errors_5xx": req["errors_5xx"], "transport_errors": req["transport_errors"],
            "outputs_nonfinite_logprobs": req["outputs_nonfinite_logprobs"],
            "sealed_segments_evicted": record["evictions"]["sealed_segments_dropped"],
            "probe_cache_losses": record["evictions"]["probe_cache_losses"],
            "compression_calls": end.get("compression_calls"), "faults": end.get("part_failures"),
            "worker_errors": end.get("worker_errors"), "bytes_leaked": record.get("bytes_leaked"),
            "dense_full": end.get("dense_full"), "dense_reclaims": end.get("dense_reclaims"),
            "prefill_throttled": end.get("prefill_throttled"), "decode_inserts": end.get("decode_inserts"),
            "greedy_inconsistent": f"{record['greedy']['loaded_inconsistent']}/{record['greedy']['loaded_completed']}",
            "checks_failed": [c["name"] for c in record["checks"] if not c["ok"]]}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True, help="JSON record of the run")
    p.add_argument("--requests", type=int, default=2000, help="requests in the loaded mix (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline-s", type=float, default=300.0,
                   help=f"the whole run, flush and checks included; sending stops {TAIL_S} s before it")
    p.add_argument("--timeout-s", type=float, default=120.0, help="socket timeout of one request")
    p.add_argument("--poll-s", type=float, default=5.0, help="kv_compress_info polling interval during the mix")
    p.add_argument("--greedy-tolerance", type=float, default=0.25,
                   help="share of in-mix probe sends allowed to differ from both alone sends")
    p.add_argument("--expect-part-failure", metavar="PART",
                   help="fault run: this part, and only it, must show in part_failures")
    p.add_argument("--baseline", action="store_true",
                   help="the server runs --kv-compress none: no kv_compress_info, no pool checks")
    p.add_argument("--no-require-eviction", action="store_true")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    record, status = soak(args)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    for check in record.get("checks", []):
        print(("ok  " if check["ok"] else "FAIL"), check["name"], json.dumps(check["detail"])[:200])
    print(json.dumps(record.get("figures", record.get("error")), indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
