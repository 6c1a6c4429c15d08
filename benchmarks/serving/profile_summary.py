"""Where a profiled process spent its time: the top functions of a py-spy speedscope
file (self and inclusive time), or of a torch profiler chrome trace as SGLang's
``/start_profile`` writes it (inclusive time per Python function, CPU op and GPU kernel).

    python benchmarks/serving/profile_summary.py scheduler.speedscope.json --top 40 --json summary.json
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from pathlib import Path


def load(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)


def frame_name(frame: dict) -> str:
    where = Path(frame.get("file") or "?").name
    line = frame.get("line")
    return f"{frame['name']} ({where}{f':{line}' if line else ''})"


def speedscope(doc: dict, top: int) -> dict:
    """Sampled profiles (one per thread): a sample's weight is self time of its last frame
    and inclusive time of every distinct frame on its stack."""
    frames = doc["shared"]["frames"]
    self_w: dict[int, float] = defaultdict(float)
    total_w: dict[int, float] = defaultdict(float)
    weight_sum = 0.0
    threads = []
    for prof in doc["profiles"]:
        if prof.get("type") != "sampled":
            continue
        w_thread = 0.0
        for stack, w in zip(prof["samples"], prof["weights"]):
            if stack:
                self_w[stack[-1]] += w
            for f in set(stack):
                total_w[f] += w
            w_thread += w
        threads.append({"name": prof.get("name", "?"), "weight": w_thread})
        weight_sum += w_thread
    unit = next((p.get("unit") for p in doc["profiles"] if p.get("unit")), "none")

    def ranked(table: dict[int, float]) -> list[dict]:
        rows = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        return [{"function": frame_name(frames[f]), "weight": w, "share": w / weight_sum if weight_sum else 0.0}
                for f, w in rows]

    return {"format": "speedscope", "unit": unit, "total_weight": weight_sum, "threads": threads,
            "top_self": ranked(self_w), "top_inclusive": ranked(total_w)}


def chrome_trace(doc: dict, top: int) -> dict:
    """Complete events ("ph": "X") summed by name within each category (inclusive: nested
    Python functions each count their whole duration)."""
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    by_cat: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    count: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for ev in events:
        if ev.get("ph") == "X" and "dur" in ev:
            cat = ev.get("cat", "?")
            by_cat[cat][ev["name"]] += float(ev["dur"])
            count[cat][ev["name"]] += 1
    out = {"format": "chrome_trace", "unit": "microseconds", "categories": {}}
    for cat, table in by_cat.items():
        rows = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        out["categories"][cat] = [{"name": n, "total_us": t, "calls": count[cat][n]} for n, t in rows]
    return out


def summarize(path: Path, top: int) -> dict:
    doc = load(path)
    if isinstance(doc, dict) and "shared" in doc and "profiles" in doc:
        return speedscope(doc, top)
    if isinstance(doc, list) or "traceEvents" in doc:
        return chrome_trace(doc, top)
    raise SystemExit(f"{path}: neither a speedscope file nor a chrome trace")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile", type=Path)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--json", type=Path, help="also write the summary here")
    args = ap.parse_args(argv)
    summary = summarize(args.profile, args.top)
    if summary["format"] == "speedscope":
        for key in ("top_self", "top_inclusive"):
            print(f"== {key} ({summary['unit']}, {summary['total_weight']:.0f} in all)")
            for row in summary[key]:
                print(f"{row['share']:7.1%}  {row['function']}")
    else:
        for cat, rows in summary["categories"].items():
            print(f"== {cat}")
            for row in rows:
                print(f"{row['total_us'] / 1e3:10.1f} ms  {row['calls']:7d}  {row['name'][:120]}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
