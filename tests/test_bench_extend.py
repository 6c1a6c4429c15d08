"""benchmarks/kernels/bench_extend.py in its CPU smoke mode: both extend kernels run on
the same chunk, agree, and are timed into the JSON."""

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
    assert bench.main(["--smoke", "--heads", "6/2", "--head-dim", "64", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["prefix"] for r in result["rows"]] == [0, 37]
    for r in result["rows"]:
        assert r["max_abs_diff"] < 2e-2 and r["ours_ms"] > 0 and r["sglang_ms"] > 0
        assert abs(r["sglang_speedup"] - r["ours_ms"] / r["sglang_ms"]) < 0.05
