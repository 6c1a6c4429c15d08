"""benchmarks/sealing/count_ops.py on a small shape: segments sealed together launch
fewer ops each than a segment sealed alone, the knapsack's included: it solves the
segments of a call together."""

from __future__ import annotations

import json

from script_loader import load_script


def test_sealing_together_shares_the_policys_ops(tmp_path):
    bench = load_script("benchmarks/sealing/count_ops.py")
    out = tmp_path / "ops.json"
    assert bench.main(["--layers", "4", "--kv-heads", "2", "--head-dim", "64", "--batches", "1", "4",
                       "--json", str(out)]) == 0
    alone, together = json.loads(out.read_text())["rows"]
    assert 0 < alone["knapsack_ops_per_segment"] < alone["ops_per_segment"]
    assert together["knapsack_ops_per_segment"] < alone["knapsack_ops_per_segment"] / 3
    assert together["ops_per_segment"] < alone["ops_per_segment"] / 2


def test_bytes_by_site_counts_a_calls_passes_by_the_line_that_made_them(tmp_path):
    bench = load_script("benchmarks/sealing/bytes_by_site.py")
    out = tmp_path / "bytes.json"
    assert bench.main(["--layers", "2", "--kv-heads", "2", "--head-dim", "64", "--segments", "2", "--top", "100",
                       "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    sites = report["sites"]
    assert [s["mb"] for s in sites] == sorted((s["mb"] for s in sites), reverse=True)
    assert report["ops"] == sum(s["ops"] for s in sites) and report["total_mb"] > 0
    # the channel weights of every side are a pass over its keys or values: a line of formats.py
    assert any(s["site"].startswith("mosaickv/formats.py:") and s["mb"] > 0 for s in sites)
