"""benchmarks/serving/step_timeline.py on a trace whose answer is known: a step's wall
time, the GPU's busy time inside it (overlapping kernels counted once), the GPU work of
the step, and the host spans it lists."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "serving" / "step_timeline.py"
spec = importlib.util.spec_from_file_location("step_timeline", SCRIPT)
step_timeline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(step_timeline)


def _x(name, cat, ts_ms, dur_ms):
    return {"ph": "X", "name": name, "cat": cat, "ts": ts_ms * 1e3, "dur": dur_ms * 1e3}


def test_a_host_bound_step_shows_an_idle_gpu(tmp_path):
    events = [_x("step[DECODE bs=8]", "user_annotation", 0, 50),
              _x("sglang_patch/decode_graph.py(68): prepare", "python_function", 2, 30),
              _x("numpy/unique", "python_function", 3, 5),  # not watched
              _x("step[DECODE bs=8]", "gpu_user_annotation", 35, 40),
              _x("k1", "kernel", 36, 10), _x("k2", "kernel", 40, 10),  # overlap: 14 ms busy, 10 of them in the step
              _x("k3", "kernel", 60, 5),
              _x("step[DECODE bs=8]", "user_annotation", 50, 20)]
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    rows = step_timeline.timeline(step_timeline._events(path), min_ms=0.5)
    assert [r["wall_ms"] for r in rows] == [50, 20]
    assert rows[0]["gpu_busy_ms"] == 14 and rows[1]["gpu_busy_ms"] == 5
    assert rows[0]["gpu_step_ms"] == 19 and rows[1]["gpu_step_ms"] is None
    assert [s["name"] for s in rows[0]["host_spans"]] == ["sglang_patch/decode_graph.py(68): prepare"]
    assert rows[0]["host_spans"][0]["start_ms"] == 2
