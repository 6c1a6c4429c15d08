"""benchmarks/host/decode_step_host.py on a tiny pool: it builds sealed requests through
the real pool and backend and times every piece of a decode step's host work."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("sglang")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "host" / "decode_step_host.py"


def test_decode_step_host_times_every_piece(tmp_path):
    spec = importlib.util.spec_from_file_location("decode_step_host", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "host.json"
    assert bench.main(["--requests", "1", "3", "--segments", "2", "--layers", "2", "--kv-heads", "2",
                       "--head-dim", "64", "--repeat", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["requests"] for r in rows] == [1, 3]
    assert rows[1]["sealed_blocks"] == 3 * 2 * 2 * 2
    for row in rows:
        assert all(row[k] > 0 for k in ("locate_ms", "stat_inputs_ms", "host_plan_ms", "graph_prepare_ms"))
