"""Where each decode step of a torch-profiler trace (SGLang's /start_profile) spends its
time: the step's wall time, how much of it the GPU was busy, how long the GPU worked on the step
itself (busy within its ``gpu_user_annotation``), and the longest host spans
inside it (ours and SGLang's), each with its start within the step.

    python benchmarks/serving/step_timeline.py TRACE.json.gz [--json OUT] [--min-ms 0.5]

A step whose GPU is busy for a small part of its wall time is bound by host work that
does not overlap the GPU (planning, or a copy that waits for the previous step).
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
from pathlib import Path

WATCHED = ("mosaickv", "sglang_patch", "replay", "scheduler.py", "cpu of Tensor")


def _events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def _busy(spans: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Microseconds of [lo, hi) covered by the union of ``spans``."""
    total, end = 0.0, lo
    for a, b in sorted(spans):
        a, b = max(a, end), min(b, hi)
        if b > a:
            total += b - a
            end = b
    return total


def timeline(events: list[dict], min_ms: float) -> list[dict]:
    steps = sorted((e for e in events if e["name"].startswith("step[") and e.get("cat") == "user_annotation"),
                   key=lambda e: e["ts"])
    on_gpu = sorted((e for e in events if e["name"].startswith("step[") and e.get("cat") == "gpu_user_annotation"),
                    key=lambda e: e["ts"])  # the same steps as the GPU ran them, in order
    gpu = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    host = [e for e in events if e.get("cat") in ("python_function", "cpu_op") and e["dur"] >= min_ms * 1e3]
    rows = []
    for i, s in enumerate(steps):
        lo, hi = s["ts"], s["ts"] + s["dur"]
        spans = [{"start_ms": round((e["ts"] - lo) / 1e3, 2), "ms": round(e["dur"] / 1e3, 2), "name": e["name"][:120]}
                 for e in sorted(host, key=lambda e: e["ts"])
                 if lo <= e["ts"] and e["ts"] + e["dur"] <= hi and any(w in e["name"] for w in WATCHED)]
        g = on_gpu[i] if i < len(on_gpu) and on_gpu[i]["name"] == s["name"] else None
        gpu_step = None if g is None else _busy(gpu, g["ts"], g["ts"] + g["dur"]) / 1e3
        rows.append({"step": s["name"], "wall_ms": round(s["dur"] / 1e3, 2),
                     "gpu_busy_ms": round(_busy(gpu, lo, hi) / 1e3, 2),
                     "gpu_step_ms": None if gpu_step is None else round(gpu_step, 2), "host_spans": spans})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--min-ms", type=float, default=0.5, help="host spans shorter than this are left out")
    args = ap.parse_args()
    rows = timeline(_events(args.trace), args.min_ms)
    if not rows:
        raise SystemExit(f"{args.trace}: no step[...] annotations (was the trace recorded by SGLang's profiler?)")
    for row in rows:
        print(f"{row['step']}: wall {row['wall_ms']:.1f} ms, GPU busy in it {row['gpu_busy_ms']:.1f} ms, "
              f"GPU work of the step {row['gpu_step_ms']} ms")
        for span in row["host_spans"]:
            print(f"  {span['start_ms']:7.1f} +{span['ms']:6.1f}  {span['name']}")
    summary = {"steps": len(rows), "wall_ms_median": statistics.median(r["wall_ms"] for r in rows),
               "gpu_busy_ms_median": statistics.median(r["gpu_busy_ms"] for r in rows),
               "gpu_step_ms_median": statistics.median(r["gpu_step_ms"] or 0.0 for r in rows)}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({"trace": args.trace.name, "summary": summary, "steps": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
