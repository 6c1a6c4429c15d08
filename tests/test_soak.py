"""The soak and fault-injection harness of issue 6 (benchmarks/soak) on the CPU: the mix,
the response bookkeeping, every invariant check, the failing part, and the client end to
end against a small fake of SGLang's HTTP API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak"
PLUGIN = SOAK / "plugin"
sys.path.insert(0, str(SOAK))

import soak_client  # noqa: E402
from soak_checks import Expect, leaked_bytes, run_checks  # noqa: E402
from soak_mix import EDGE_KINDS, EXPECTED_STATUS, MixConfig, build_mix, kind_counts, probe_prompts  # noqa: E402
from soak_results import (Collected, Outcome, evictions, first_divergence, summarize_greedy,  # noqa: E402
                          summarize_requests)

sys.path.insert(0, str(PLUGIN))
import mosaickv_soak_faults as faults  # noqa: E402

sys.path.remove(str(PLUGIN))  # the entry point stays out of this process's plugin scan

from mosaickv.compressor import PartFailure, compress_segment  # noqa: E402
from mosaickv.config import load_policy  # noqa: E402


# -- the mix -------------------------------------------------------------------------------
def test_mix_is_deterministic_in_its_seed():
    assert build_mix(MixConfig(requests=300, seed=3)) == build_mix(MixConfig(requests=300, seed=3))
    assert build_mix(MixConfig(requests=300, seed=3)) != build_mix(MixConfig(requests=300, seed=4))


def test_mix_has_every_kind_in_its_share():
    cfg = MixConfig(requests=2000)
    mix = build_mix(cfg)
    kinds = [r.kind for r in mix]
    assert len(mix) == 2000 and {k: kinds.count(k) for k in set(kinds)} == kind_counts(2000, cfg.probes * 2)
    assert kinds.count("abort") == 200 and kinds.count("shared") == 720 and kinds.count("unique") == 400
    for kind in EDGE_KINDS:  # both endpoints, half each
        assert [r.endpoint for r in mix if r.kind == kind].count("chat") == 20
    assert [r.probe for r in mix if r.kind == "probe"].count(0) == 2 and kinds.count("probe") == 2 * cfg.probes
    ordinary = [r for r in mix if r.kind in ("shared", "unique", "short")]
    assert 0.35 < sum(r.stream for r in ordinary) / len(ordinary) < 0.45
    assert 0.25 < sum("logprobs" in r.body for r in ordinary) / len(ordinary) < 0.35
    assert 10 < sum(r.body.get("n") == 2 and not r.stream for r in ordinary) < 100
    assert {r.endpoint for r in ordinary} == {"completions", "chat"}
    aborts = [r for r in mix if r.kind == "abort"]
    assert all(r.stream and r.body["ignore_eos"] and 1 <= r.abort_after < r.body["max_tokens"] for r in aborts)


def test_mix_prompts_have_the_sizes_that_matter():
    mix = build_mix(MixConfig(requests=600))

    def text(r):
        return r.body["prompt"] if "prompt" in r.body else " ".join(m["content"] for m in r.body["messages"])

    # Beyond SmolLM2's 8192-token context: every vocabulary word is at least one token.
    assert all(len(text(r).split()) > 10_000 for r in mix if r.kind == "over_context")
    assert all(text(r) == "" for r in mix if r.kind == "empty")
    assert all(r.body["max_tokens"] == 0 for r in mix if r.kind == "max_tokens_0")
    unique = [text(r)[:40] for r in mix if r.kind == "unique"]
    assert len(set(unique)) == len(unique)
    groups: dict[int, set] = {}
    for r in mix:
        if r.kind == "shared":
            groups.setdefault(r.group, set()).add(text(r).split("Question")[0].split("\n\n")[0])
    assert len(groups) > 1 and all(len(systems) <= 2 for systems in groups.values())  # chat and completion forms
    short, long = probe_prompts(MixConfig())[:2]
    assert len(short.split()) < 25 < 500 < len(long.split())


# -- response bookkeeping ------------------------------------------------------------------
def test_collected_reads_both_layouts_and_flags_nonfinite_logprobs():
    chat = {"choices": [{"index": 0, "finish_reason": "stop", "logprobs": {"content": [
        {"token": "a", "logprob": -0.1, "top_logprobs": [{"token": "a", "logprob": -0.1}]},
        {"token": "b", "logprob": None, "top_logprobs": []}]}}], "usage": {"prompt_tokens": 9,
                                                                        "prompt_tokens_details": {"cached_tokens": 4}}}
    got = Collected()
    got.add(chat)
    out = got.fill(Outcome(0, "short", "chat", False))
    assert out.completed and out.logprob_values == 3 and out.nonfinite_choices == 1 and out.cached_tokens == 4

    got = Collected()
    for chunk in ({"choices": [{"index": 0, "logprobs": {"tokens": ["x"], "token_logprobs": [-1.0],
                                                          "top_logprobs": [{"x": -1.0}]}}]},
                  {"choices": [{"index": 0, "finish_reason": "length"}]}):
        got.add(chunk)
    out = got.fill(Outcome(1, "probe", "completions", True, probe=2), done=True)
    assert out.completed and out.nonfinite_choices == 0 and out.tokens == ["x"]
    assert not got.fill(Outcome(1, "short", "completions", True), done=False).completed

    got = Collected()
    got.add({"error": {"code": 503, "message": "overloaded"}})
    out = got.fill(Outcome(2, "short", "completions", True))
    out.sent, out.status = True, 200
    assert not out.completed and summarize_requests([out], 1)["errors_5xx"] == 1


def test_first_divergence():
    assert first_divergence(["a", "b"], ["a", "b"]) is None
    assert first_divergence(["a", "b"], ["a", "c"]) == 1
    assert first_divergence(["a"], ["a", "b"]) == 1


def _probe(probe: int, tokens: list[str], cached: int | None = None) -> Outcome:
    return Outcome(0, "probe", "completions", False, probe=probe, sent=True, status=200, completed=True,
                   tokens=tokens, cached_tokens=cached)


def test_greedy_summary_accepts_cold_or_warm_and_reports_divergence():
    cold = [_probe(0, ["a", "b"]), _probe(1, ["x", "y"])]
    warm = [_probe(0, ["a", "c"], cached=64), _probe(1, ["x", "y"], cached=0)]
    loaded = [_probe(0, ["a", "b"], cached=0), _probe(0, ["a", "c"], cached=64), _probe(1, ["z", "y"])]
    g = summarize_greedy(cold, warm, loaded)
    counts = ("cold_equal_warm", "loaded_equal_warm", "loaded_equal_cold", "loaded_inconsistent")
    assert [g[k] for k in counts] == [1, 1, 1, 1]
    assert g["loaded"][2]["first_divergence_from_warm"] == 0
    assert g["cold_vs_warm_first_divergence"] == {"0": 1, "1": None}
    ev = evictions([{"sealed_segments": 3}, {"sealed_segments": 5}, {"sealed_segments": 2}, {"unreachable": True}], g)
    assert ev == {"sealed_drops": 1, "sealed_segments_dropped": 3, "probe_cache_losses": 1, "seen": True}
    assert not evictions([{"sealed_segments": 1}, {"sealed_segments": 2}], summarize_greedy(cold, warm, []))["seen"]


# -- invariant checks ------------------------------------------------------------------------
KV = {"sealed_segments": 0, "free_slabs": 100, "dense_tail_tokens_in_use": 32, "arena_bytes_written": 0,
      "sealing_pending": 0, "compression_calls": 0, "worker_errors": 0, "part_failures": {},
      "dense_bytes_per_token": 1000, "arena_bytes": 100 * 500}


def clean_record() -> dict:
    by_kind = {
        "shared": {"sent": 10, "completed": 10, "aborted": 0, "cut": 0, "status": {"chat:200": 10}},
        "abort": {"sent": 4, "completed": 0, "aborted": 4, "cut": 0, "status": {"completions:200": 4}},
        **{k: {"sent": 2, "completed": 0, "aborted": 0, "cut": 0,
               "status": {f"{e}:{EXPECTED_STATUS[(k, e)]}": 1 for e in ("chat", "completions")}} for k in EDGE_KINDS},
    }
    return {
        "requests": {"target": 20, "sent": 20, "cut_at_deadline": 0, "errors_5xx": 0, "transport_errors": 0,
                     "transport_error_examples": [], "outputs_nonfinite_logprobs": 0, "outputs_with_logprobs": 5,
                     "by_kind": by_kind},
        "greedy": {"alone_completed": 4, "alone_sent": 4, "loaded_sent": 4, "loaded_completed": 4,
                   "loaded_inconsistent": 1},
        "evictions": {"seen": True},
        "flush": {"status": 200},
        "server_alive_at_end": True,
        "kv_compress_info": {"start": dict(KV), "end": {**KV, "compression_calls": 50}},
    }


def failed(record: dict, expect: Expect = Expect()) -> set[str]:
    return {c["name"] for c in run_checks(record, expect) if not c["ok"]}


def test_a_clean_record_passes_every_check():
    assert failed(clean_record()) == set()
    assert failed(clean_record(), Expect(kv_compress=False)) == set()


def _set(path: str, value):
    def mutate(record: dict) -> None:
        *keys, last = path.split(".")
        node = record
        for key in keys:
            node = node[key]
        node[last] = value
    return mutate


VIOLATIONS = [
    (_set("requests.sent", 19), {"all_sent_and_finished"}),
    (_set("requests.cut_at_deadline", 1), {"all_sent_and_finished"}),
    (_set("requests.errors_5xx", 1), {"no_5xx"}),
    (_set("requests.transport_errors", 2), {"no_transport_errors"}),
    (_set("requests.by_kind.over_context.status", {"chat:200": 1, "completions:400": 1}), {"edge_statuses_as_sglang"}),
    (_set("requests.by_kind.shared.completed", 9), {"ordinary_requests_completed"}),
    (_set("requests.by_kind.abort.aborted", 3), {"aborts_mid_stream"}),
    (_set("requests.outputs_nonfinite_logprobs", 1), {"finite_logprobs"}),
    (_set("requests.outputs_with_logprobs", 0), {"finite_logprobs"}),
    (_set("greedy.loaded_inconsistent", 2), {"greedy_consistent"}),
    (_set("greedy.alone_completed", 3), {"greedy_probes_completed"}),
    (_set("flush", {"status": 400}), {"flush_ok"}),
    (_set("server_alive_at_end", False), {"server_alive_at_end"}),
    (_set("evictions.seen", False), {"eviction_seen"}),
    (_set("kv_compress_info.end.sealing_pending", 2), {"sealing_settled"}),
    (_set("kv_compress_info.end.sealed_segments", 1), {"sealed_segments_zero_after_flush"}),
    (_set("kv_compress_info.end.arena_bytes_written", 512), {"arena_bytes_zero_after_flush"}),
    (_set("kv_compress_info.end.free_slabs", 99), {"free_slabs_back_after_flush", "no_bytes_leaked"}),
    (_set("kv_compress_info.end.dense_tail_tokens_in_use", 64), {"dense_tail_tokens_in_use_back_after_flush",
                                                                 "no_bytes_leaked"}),
    (_set("kv_compress_info.end.compression_calls", 0), {"compression_ran"}),
    (_set("kv_compress_info.end.worker_errors", 1), {"no_worker_errors"}),
    (_set("kv_compress_info.end.dense_full", 1), {"no_dense_row_shortage"}),
    (_set("kv_compress_info.end.sealing_stalled", True), {"sealing_not_stalled"}),
    (_set("kv_compress_info.end.part_failures", {"key_norm": 2}), {"part_failures_as_expected"}),
    (_set("kv_compress_info.end", None), {"kv_compress_info_reported"}),
]


@pytest.mark.parametrize("mutate, expected", VIOLATIONS,
                         ids=[f"{sorted(e)[0]}-{i}" for i, (_, e) in enumerate(VIOLATIONS)])
def test_each_violation_fails_its_check(mutate, expected):
    record = clean_record()
    mutate(record)
    assert failed(record) == expected


def test_fault_run_needs_its_part_and_only_it():
    record = clean_record()
    fault = Expect(part_failure="fault_injector", require_eviction=False)
    assert failed(record, fault) == {"part_failures_as_expected"}
    record["kv_compress_info"]["end"]["part_failures"] = {"fault_injector": 7}
    assert failed(record, fault) == set()
    record["kv_compress_info"]["end"]["part_failures"] = {"fault_injector": 7, "magnitude": 1}
    assert failed(record, fault) == {"part_failures_as_expected"}
    record["evictions"]["seen"] = False
    assert failed(record, fault) == {"part_failures_as_expected"}


def test_leaked_bytes_counts_dense_rows_and_slabs():
    end = {**KV, "dense_tail_tokens_in_use": 96, "free_slabs": 98}
    assert leaked_bytes(KV, end) == 64 * 1000 + 2 * 500
    assert leaked_bytes(KV, KV) == 0


# -- the failing part ----------------------------------------------------------------------
def test_fault_cycle_raises_then_nan_then_shape():
    seq = [faults.fault_at(call, 4) for call in range(16)]
    assert seq == [None, None, None, "raise"] + [None] * 3 + ["nan"] + [None] * 3 + ["shape"] + [None] * 3 + ["raise"]


def test_fault_part_makes_sealing_fail_by_name_for_each_fault():
    policy = load_policy({"token_scorer": {"name": "fault_injector", "every": 2}}).bind(64)
    k = torch.randn(1, 2, 32, 64, dtype=torch.bfloat16)  # one layer: one score call per segment
    rms = torch.rand(1, 2, 64) + 0.1  # the query statistics the server records
    reasons = []
    for _ in range(3):
        assert compress_segment(policy, k, k, 1 << 20, query_stats=rms)  # even calls seal
        with pytest.raises(PartFailure) as err:
            compress_segment(policy, k, k, 1 << 20, query_stats=rms)
        assert err.value.part_name == "fault_injector" and err.value.role == "token_scorer"
        reasons.append(str(err.value))
    assert "RuntimeError: injected fault" in reasons[0]
    assert "NaN" in reasons[1]
    assert "expected a tensor of shape (2, 32)" in reasons[2]


def test_fault_policy_loads_through_its_entry_point_on_pythonpath():
    """What the server's launcher does: the part comes from the entry point alone."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGIN), os.environ.get("PYTHONPATH", "")])}
    code = ("from mosaickv.config import load_policy; import sys; "
            "p = load_policy(sys.argv[1]); print(type(p.token_scorer).__module__, p.token_scorer.every)")
    done = subprocess.run([sys.executable, "-c", code, str(SOAK / "fault_policy.yaml")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["mosaickv_soak_faults", "64"]


# -- the client against a fake server ----------------------------------------------------------
class FakeSGLang(BaseHTTPRequestHandler):
    """Just enough of SGLang's HTTP API for the client: greedy outputs derived from the
    prompt, SGLang's refusals, a pool whose sealed segments grow, get evicted and flush, and
    a cache that holds a prompt for its second send only (so the in-mix probes lost it)."""

    kv: dict = {}
    sends: dict = {}
    fail_status = 0  # answer every 5th ordinary completion with this status (0: never)
    count = 0
    lock = threading.Lock()

    def log_message(self, *args) -> None:
        pass

    def _json(self, status: int, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path in ("/health", "/health_generate"):
            return self._json(200, {})
        with self.lock:
            state = {"kv_compress_info": dict(self.kv)}
            return self._json(200, {"max_total_num_tokens": 1000, "internal_states": [state]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        if self.path == "/flush_cache":
            with self.lock:
                self.kv.update(sealed_segments=0, free_slabs=100)
            return self._json(200, {})
        chat = "messages" in body
        text = " ".join(m["content"] for m in body["messages"]) if chat else body["prompt"]
        if len(text.split()) > 8000:
            return self._json(400, {"object": "error", "message": "longer than the context", "code": 400})
        if not chat and (not text or body["max_tokens"] <= 0):
            return self._json(400, {"object": "error", "message": "bad request", "code": 400})
        with self.lock:
            type(self).count += 1
            self.sends[text] = self.sends.get(text, 0) + 1
            cached = 32 if self.sends[text] == 2 else 0
            fail = self.fail_status and self.count % 5 == 0
            grow = 1 if self.count % 4 else -3  # sealing, and now and then an eviction
            sealed = max(0, self.kv["sealed_segments"] + grow)
            self.kv.update(sealed_segments=sealed, free_slabs=100 - sealed, compression_calls=self.count)
        if fail:
            return self._json(self.fail_status, {"object": "error", "message": "boom", "code": self.fail_status})
        tokens = [str(len(text) % (7 + i)) for i in range(body["max_tokens"])]
        logprobs = None
        if body.get("logprobs"):
            logprobs = ({"content": [{"token": t, "logprob": -0.5, "top_logprobs": []} for t in tokens]} if chat
                        else {"tokens": tokens, "token_logprobs": [-0.5] * len(tokens), "top_logprobs": []})
        usage = {"prompt_tokens": len(text.split()), "prompt_tokens_details": {"cached_tokens": cached}}
        if not body.get("stream"):
            choices = [{"index": i, "text": "".join(tokens), "finish_reason": "length", "logprobs": logprobs}
                       for i in range(body.get("n", 1))]
            return self._json(200, {"choices": choices, "usage": usage})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        try:
            for i, t in enumerate(tokens):
                last = i == len(tokens) - 1
                chunk = {"index": 0, "text": t, "finish_reason": "length" if last else None}
                self.wfile.write(f"data: {json.dumps({'choices': [chunk]})}\n\n".encode())
            self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
        except OSError:  # the client closed an aborted stream
            pass


class _Server(ThreadingHTTPServer):
    request_queue_size = 64  # the default 5 drops connections at concurrency 8 (1 s SYN retries)


@pytest.fixture
def fake_server():
    FakeSGLang.kv = {**KV, "dense_tail_tokens_in_use": 0}
    FakeSGLang.count, FakeSGLang.fail_status, FakeSGLang.sends = 0, 0, {}
    server = _Server(("127.0.0.1", 0), FakeSGLang)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server
    server.shutdown()


def _run_client(server, tmp_path, *extra) -> tuple[int, dict]:
    out = tmp_path / "soak.json"
    argv = ["--port", str(server.server_address[1]), "--out", str(out), "--requests", "60", "--concurrency", "8",
            "--deadline-s", "60", "--poll-s", "0.05", *extra]
    rc = soak_client.main(argv)
    return rc, json.loads(out.read_text())


def test_client_passes_a_well_behaved_server(fake_server, tmp_path):
    rc, record = _run_client(fake_server, tmp_path)
    assert [c["name"] for c in record["checks"] if not c["ok"]] == [] and rc == 0
    req = record["requests"]
    assert req["sent"] == 60 and req["aborted"] == 6 and req["errors_5xx"] == 0
    assert record["greedy"]["loaded_equal_warm"] == record["greedy"]["loaded_sent"] > 0
    assert record["figures"]["probe_cache_losses"] == record["greedy"]["loaded_sent"] and record["bytes_leaked"] == 0


def test_client_fails_on_5xx_and_on_a_missing_fault(fake_server, tmp_path):
    FakeSGLang.fail_status = 500
    rc, record = _run_client(fake_server, tmp_path, "--expect-part-failure", "fault_injector")
    failures = {c["name"] for c in record["checks"] if not c["ok"]}
    assert rc == 1 and {"no_5xx", "ordinary_requests_completed", "part_failures_as_expected"} <= failures
    assert record["figures"]["errors_5xx"] > 0
