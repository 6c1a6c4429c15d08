"""The host benchmarks (benchmarks/host) on tiny shapes: they build through the real pool
and backend, check another version against this tree where they compare two, and time or
count every piece they name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("sglang")

from script_loader import load_script  # noqa: E402

PATCH = Path(__file__).parents[1] / "sglang_patch"  # this tree's files, compared with themselves


def test_decode_step_host_times_every_piece(tmp_path):
    bench = load_script("benchmarks/host/decode_step_host.py")
    out = tmp_path / "host.json"
    assert bench.main(["--requests", "1", "3", "--segments", "2", "--layers", "2", "--kv-heads", "2",
                       "--head-dim", "64", "--repeat", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["requests"] for r in rows] == [1, 3]
    assert rows[1]["sealed_blocks"] == 3 * 2 * 2 * 2
    for row in rows:
        assert all(row[k] > 0 for k in ("locate_ms", "rows_to_host_ms", "stat_inputs_ms", "host_plan_ms",
                                        "graph_prepare_ms", "eager_plan_ms"))


def test_stats_flush_times_both_versions_side_by_side(tmp_path):
    """benchmarks/host/stats_flush.py times this tree's statistics and another file's in
    alternating rounds (here the same file twice, so both must run the same code)."""
    bench = load_script("benchmarks/host/stats_flush.py")
    out = tmp_path / "flush.json"
    other = PATCH / "query_stats.py"
    assert bench.main(["--layers", "2", "--kv-heads", "2", "--head-dim", "8", "--group", "2", "--requests", "5",
                       "--chunk", "96", "--steps", "4", "--rounds", "2", "--module", str(other),
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"this tree", str(other)}
    for row in rows.values():
        assert len(row["decode_ms"]) == len(row["prefill_chunk_ms"]) == 2
        assert all(t > 0 for t in row["decode_ms"] + row["prefill_chunk_ms"])


def test_locate_host_checks_and_times_both_versions(tmp_path):
    """benchmarks/host/locate_host.py runs another file's locating (or stat_inputs) beside
    this tree's, after checking both return the same: here this tree's file against
    itself, and a copy without ``locate_rows``, located with its ``locate_many`` over
    each request's slots as older backends did."""
    bench = load_script("benchmarks/host/locate_host.py")
    out = tmp_path / "locate.json"
    other = PATCH / "forward_inputs.py"
    older = tmp_path / "forward_inputs_older.py"
    older.write_text(other.read_text().replace("def locate_rows(", "def locate_rows_not_timed("))
    for against in (other, older):
        assert bench.main(["--requests", "3", "--segments", "2", "--layers", "2", "--kv-heads", "2", "--head-dim",
                           "64", "--rounds", "2", "--calls", "2", "--against", str(against), "--json", str(out)]) == 0
        times = json.loads(out.read_text())["locate_ms"]
        assert set(times) == {"this tree", str(against)} and all(len(t) == 2 and min(t) > 0 for t in times.values())
    assert bench.main(["--function", "stat_inputs", "--requests", "3", "--segments", "2", "--layers", "2",
                       "--kv-heads", "2", "--head-dim", "64", "--rounds", "2", "--calls", "2", "--against", str(other),
                       "--json", str(out)]) == 0
    times = json.loads(out.read_text())["stat_inputs_ms"]
    assert set(times) == {"this tree", str(other)} and all(len(t) == 2 and min(t) > 0 for t in times.values())


def test_seal_bookkeeping_checks_and_times_both_ways(tmp_path):
    """benchmarks/host/seal_bookkeeping.py installs segments one at a time (here with this
    tree's files as the other version) and all at once, checks both leave the same
    statistics, bytes and table rows, and times both."""
    bench = load_script("benchmarks/host/seal_bookkeeping.py")
    out = tmp_path / "bookkeeping.json"
    assert bench.main(["--segments", "4", "--layers", "2", "--kv-heads", "2", "--head-dim", "64", "--group", "2",
                       "--rounds", "2", "--stats-module", str(PATCH / "query_stats.py"),
                       "--pool-module", str(PATCH / "pool.py"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())["result"]
    assert set(result) == {"one_at_a_time", "all_at_once"}
    assert all(r["median_ms"] > 0 and r["torch_ops"] > 0 for r in result.values())
    assert result["all_at_once"]["torch_ops"] < result["one_at_a_time"]["torch_ops"]


def test_prefill_stats_host_counts_this_tree_beside_another_file(tmp_path):
    """benchmarks/host/prefill_stats_host.py counts another query_stats.py beside this
    tree's (here this tree's file again: the same count)."""
    bench = load_script("benchmarks/host/prefill_stats_host.py")
    out = tmp_path / "ops.json"
    other = PATCH / "query_stats.py"
    assert bench.main(["--chunk", "40", "--prefix", "7", "--layers", "2", "--q-heads", "4", "--kv-heads", "2",
                       "--head-dim", "8", "--segment", "16", "--window", "4", "--module", str(other),
                       "--json", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["segments_touched"] == 3 and row["ops_per_forward"] > 0
    assert row["module"]["path"] == str(other) and row["module"]["ops_per_forward"] == row["ops_per_forward"]


def test_decode_hook_host_times_the_hook_with_its_inserts_and_seals(tmp_path):
    """benchmarks/host/decode_hook_host.py: shared-prefix requests decode until they close
    segments; the hook's inserts and seals happen and are counted inside its time."""
    bench = load_script("benchmarks/host/decode_hook_host.py")
    out = tmp_path / "hook.json"
    assert bench.main(["--groups", "2", "--requests-per-group", "2", "--prefix", "64", "--question", "32",
                       "--steps", "40", "--decode-batch", "1", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["requests"] == 4 and got["decode_batch"] == 1
    assert got["inserts_per_step_mean"] * got["steps"] == 4  # each request closed one segment (written 128)
    assert got["steps_that_sealed"] >= 1 and 0 < got["seal_ms_mean"] <= got["hook_ms"]["mean"]


def test_block_runs_host_checks_both_sources_and_times_them(tmp_path):
    """benchmarks/host/block_runs_host.py: the packed entries and the table give the same
    runs, and both are timed."""
    bench = load_script("benchmarks/host/block_runs_host.py")
    out = tmp_path / "runs.json"
    assert bench.main(["--layers", "2", "--kv-heads", "3", "--segments", "5", "--slabs", "40", "--chunk", "16",
                       "--repeat", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["blocks"] == 2 * 3 * 5 and result["packed_entries_ms"] > 0 and result["table_ms"] > 0
