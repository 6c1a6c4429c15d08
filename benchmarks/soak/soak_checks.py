"""The soak's invariants (issue 6), as pure functions of the run's record.

Each check is one named line with the figure it read, so a failed run says what broke
without reading logs; the client exits non-zero when any fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from soak_mix import EDGE_KINDS, EXPECTED_STATUS


@dataclass(frozen=True)
class Expect:
    """What this run must show beyond the common invariants."""

    kv_compress: bool = True  # the server runs --kv-compress mosaickv (kv_compress_info is reported)
    part_failure: Optional[str] = None  # the one part that must fail (fault run); None: no part may fail
    require_eviction: bool = True
    greedy_tolerance: float = 0.25  # share of in-mix probe sends allowed to differ from both alone sends


def leaked_bytes(start: dict, end: dict) -> int:
    """Pool bytes still held after the flush beyond the start: dense tail rows plus slabs."""
    dense = (end["dense_tail_tokens_in_use"] - start["dense_tail_tokens_in_use"]) * start["dense_bytes_per_token"]
    slab = start["arena_bytes"] // max(start["free_slabs"] + start["sealed_segments"], 1)
    return dense + (start["free_slabs"] - end["free_slabs"]) * slab


def _edge_mismatches(by_kind: dict) -> list[str]:
    out = []
    for kind in EDGE_KINDS:
        for key, count in by_kind.get(kind, {}).get("status", {}).items():
            endpoint, status = key.split(":")
            want = EXPECTED_STATUS[(kind, endpoint)]
            if status != str(want):
                out.append(f"{kind} on {endpoint}: {count} x {status}, expected {want}")
    return out


def _ordinary_unfinished(by_kind: dict) -> dict[str, int]:
    """Requests of the ordinary kinds (neither edge nor abort) that did not complete."""
    return {kind: v["sent"] - v["cut"] - v["completed"] for kind, v in by_kind.items()
            if kind not in EDGE_KINDS and kind != "abort" and v["sent"] - v["cut"] != v["completed"]}


def _part_failures_ok(failures: dict, expected: Optional[str]) -> bool:
    if expected is None:
        return not failures
    return set(failures) == {expected} and failures[expected] > 0


def run_checks(record: dict, expect: Expect) -> list[dict]:
    """Every invariant as ``{"name", "ok", "detail"}``; pool checks only for a MosaicKV server."""
    req, greedy, ev = record["requests"], record["greedy"], record["evictions"]
    by_kind = req["by_kind"]
    aborts = by_kind.get("abort", {"sent": 0, "aborted": 0, "cut": 0})
    checks: list[tuple[str, bool, object]] = [
        ("all_sent_and_finished", req["sent"] == req["target"] and req["cut_at_deadline"] == 0,
         f"{req['sent']} of {req['target']} sent, {req['cut_at_deadline']} cut at the deadline"),
        ("no_5xx", req["errors_5xx"] == 0, req["errors_5xx"]),
        ("no_transport_errors", req["transport_errors"] == 0,
         f"{req['transport_errors']} {req['transport_error_examples']}"),
        ("edge_statuses_as_sglang", not _edge_mismatches(by_kind), _edge_mismatches(by_kind)),
        ("ordinary_requests_completed", not _ordinary_unfinished(by_kind), _ordinary_unfinished(by_kind)),
        ("aborts_mid_stream", aborts["sent"] > 0 and aborts["aborted"] == aborts["sent"] - aborts["cut"],
         f"{aborts['aborted']} of {aborts['sent']} abort streams closed mid-stream"),
        ("finite_logprobs", req["outputs_nonfinite_logprobs"] == 0 and req["outputs_with_logprobs"] > 0,
         f"{req['outputs_nonfinite_logprobs']} non-finite of {req['outputs_with_logprobs']} with logprobs"),
        ("greedy_probes_completed", greedy["alone_completed"] == greedy["alone_sent"]
         and greedy["loaded_completed"] == greedy["loaded_sent"] > 0,
         f"alone {greedy['alone_completed']}/{greedy['alone_sent']}, loaded "
         f"{greedy['loaded_completed']}/{greedy['loaded_sent']}"),
        ("greedy_consistent", greedy["loaded_inconsistent"] <= expect.greedy_tolerance * greedy["loaded_completed"],
         f"{greedy['loaded_inconsistent']} of {greedy['loaded_completed']} differ from both alone sends "
         f"(tolerance {expect.greedy_tolerance:.0%})"),
        ("flush_ok", record["flush"]["status"] == 200, record["flush"]),
        ("server_alive_at_end", record["server_alive_at_end"], record["server_alive_at_end"]),
    ]
    if expect.require_eviction:
        checks.append(("eviction_seen", ev["seen"], ev))
    if expect.kv_compress:
        checks += _pool_checks(record["kv_compress_info"], expect)
    return [{"name": n, "ok": bool(ok), "detail": d} for n, ok, d in checks]


def _pool_checks(info: dict, expect: Expect) -> list[tuple[str, bool, object]]:
    start, end = info.get("start"), info.get("end")
    if start is None or end is None:
        return [("kv_compress_info_reported", False, "no kv_compress_info in /get_server_info")]

    def same(key: str) -> tuple[str, bool, object]:
        return f"{key}_back_after_flush", end[key] == start[key], f"start {start[key]}, end {end[key]}"

    return [
        ("sealing_settled", end["sealing_pending"] == 0, end["sealing_pending"]),
        ("sealed_segments_zero_after_flush", end["sealed_segments"] == 0, end["sealed_segments"]),
        ("arena_bytes_zero_after_flush", end["arena_bytes_written"] == 0, end["arena_bytes_written"]),
        same("free_slabs"),
        same("dense_tail_tokens_in_use"),
        ("no_bytes_leaked", leaked_bytes(start, end) == 0, leaked_bytes(start, end)),
        ("compression_ran", end["compression_calls"] > 0, end["compression_calls"]),
        ("no_worker_errors", end["worker_errors"] == 0, end["worker_errors"]),
        # Servers before dense reclaim do not report it: absent reads as none.
        ("no_dense_row_shortage", end.get("dense_full", 0) == 0, end.get("dense_full", 0)),
        ("sealing_not_stalled", not end.get("sealing_stalled", False), end.get("oldest_pending_s")),
        ("part_failures_as_expected", _part_failures_ok(end["part_failures"], expect.part_failure),
         f"{end['part_failures']} (expected {expect.part_failure or 'none'})"),
    ]


def passed(checks: list[dict]) -> bool:
    return all(c["ok"] for c in checks)
