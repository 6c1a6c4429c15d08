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
