"""benchmarks/kernels/bench_extend.py in its CPU smoke mode: both extend kernels run on
the same chunk, agree, and are timed into the JSON; our kernel over a sealed prefix with
each tile matches the reference."""

from __future__ import annotations

import json
import os

import torch

if not torch.cuda.is_available():  # must precede the first import of the kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from script_loader import load_script


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke mode is the CPU interpreter's")
def test_smoke_run_checks_both_kernels_and_writes_their_times(tmp_path):
    bench = load_script("benchmarks/kernels/bench_extend.py")
    out = tmp_path / "extend.json"
    assert bench.main(["--smoke", "--heads", "6/2", "--head-dim", "64", "--tiles", "32x32", "16x16",
                       "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["prefix"] for r in result["rows"]] == [0, 101]
    assert [(r["sealed_prefix"], r["tile"], r["packed"]) for r in result["sealed_rows"]] == [
        (101, "32x32", False), (101, "32x32", True), (101, "16x16", False), (101, "16x16", True)]
    assert all(r["ours_ms"] > 0 for r in result["sealed_rows"])
    for r in result["rows"]:
        assert r["max_abs_diff"] < 2e-2 and r["ours_ms"] > 0 and r["sglang_ms"] > 0
        assert abs(r["sglang_speedup"] - r["ours_ms"] / r["sglang_ms"]) < 0.05


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke mode is the CPU interpreter's")
def test_a_tile_that_misses_the_reference_is_recorded_untimed_and_fails_the_run(tmp_path, monkeypatch):
    bench = load_script("benchmarks/kernels/bench_extend.py")
    monkeypatch.setattr(bench, "attention", lambda *a, **k: torch.full_like(a[0], 7.0, dtype=torch.float32))  # a wrong reference
    out = tmp_path / "extend.json"
    assert bench.main(["--smoke", "--heads", "6/2", "--head-dim", "64", "--prefix", "101", "--tiles", "16x16",
                       "--json", str(out)]) == 1
    rows = json.loads(out.read_text())["sealed_rows"]
    assert [row["packed"] for row in rows] == [False, True]
    for row in rows:
        assert row["tile"] == "16x16" and "ours_ms" not in row and row["mismatched"] > 0.5 and row["nan"] is False
