"""benchmarks/serving/profile_summary.py on profiles whose answer is known: self and
inclusive time of a py-spy speedscope file, and per-category sums of a chrome trace."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "serving" / "profile_summary.py"
spec = importlib.util.spec_from_file_location("profile_summary", SCRIPT)
summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(summary)


def test_speedscope_self_and_inclusive_weights(tmp_path):
    frames = [{"name": "main", "file": "/x/run.py", "line": 1}, {"name": "step", "file": "/x/sched.py", "line": 9},
              {"name": "plan", "file": "/x/plan.py", "line": 3}, {"name": "recurse", "file": "/x/r.py", "line": 2}]
    doc = {"shared": {"frames": frames}, "profiles": [
        {"type": "sampled", "name": "t1", "unit": "seconds", "samples": [[0, 1, 2], [0, 1], [0, 1, 2], [0, 3, 3]],
         "weights": [0.5, 0.25, 0.5, 0.75]},
        {"type": "sampled", "name": "t2", "unit": "seconds", "samples": [[0]], "weights": [1.0]}]}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    out = summary.summarize(path, top=10)
    assert out["total_weight"] == 3.0 and [t["weight"] for t in out["threads"]] == [2.0, 1.0]
    self_w = {r["function"]: r["weight"] for r in out["top_self"]}
    assert self_w == {"plan (plan.py:3)": 1.0, "step (sched.py:9)": 0.25, "recurse (r.py:2)": 0.75, "main (run.py:1)": 1.0}
    incl = {r["function"]: r["weight"] for r in out["top_inclusive"]}
    # A frame twice on one stack (recursion) counts its sample once.
    assert incl["main (run.py:1)"] == 3.0 and incl["step (sched.py:9)"] == 1.25 and incl["recurse (r.py:2)"] == 0.75
    assert out["top_inclusive"][0]["share"] == pytest.approx(1.0)


def test_chrome_trace_sums_complete_events_by_category(tmp_path):
    events = [{"ph": "X", "cat": "kernel", "name": "_mixed_attn_kernel", "dur": 30.0},
              {"ph": "X", "cat": "kernel", "name": "_mixed_attn_kernel", "dur": 12.5},
              {"ph": "X", "cat": "kernel", "name": "gemm", "dur": 100.0},
              {"ph": "X", "cat": "python_function", "name": "host_plan", "dur": 900.0},
              {"ph": "B", "cat": "kernel", "name": "ignored"}, {"ph": "X", "cat": "cpu_op", "name": "aten::cat"}]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    out = summary.summarize(path, top=10)
    kernels = out["categories"]["kernel"]
    assert [r["name"] for r in kernels] == ["gemm", "_mixed_attn_kernel"]
    assert kernels[1] == {"name": "_mixed_attn_kernel", "total_us": 42.5, "calls": 2}
    assert out["categories"]["python_function"] == [{"name": "host_plan", "total_us": 900.0, "calls": 1}]
    assert "cpu_op" not in out["categories"]  # an event without a duration is not counted


def test_anything_else_is_refused_by_name(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(SystemExit, match="neither a speedscope file nor a chrome trace"):
        summary.summarize(path, top=5)
