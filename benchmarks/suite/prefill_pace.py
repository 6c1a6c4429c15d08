"""Seconds of prefill per prompt, read from an SGLang server log.

While prompts wait in the queue and none decodes, the scheduler runs prefill chunks back
to back, and ``#running-req`` counts the prompts whose prefill finished. The pace is taken
over the stretch of prompt prefill lines (``#new-token`` of at least ``--min-tokens``) with
no decode line among them in which the most prompts finished: the time from its first
line to its last over those prompts, prefill (and, for MosaicKV, sealing) alone, at the
log's one-second resolution.

    python benchmarks/suite/prefill_pace.py server_none.log server_mosaic6.log [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
from datetime import datetime
from pathlib import Path

LINE = re.compile(r"^\[(?P<ts>[\d-]+ [\d:]+)[^\]]*\] (?P<kind>Prefill|Decode) batch"
                  r"(?:, #new-seq: \d+, #new-token: (?P<new>\d+))?.*?#running-req: (?P<running>\d+)")


def prefill_pace(lines: list[str], min_tokens: int = 1024) -> dict:
    """``seconds_per_prompt`` over the stretch of prompt prefill lines, between decode
    lines, in which the most prompts finished, and what it was measured over."""
    stretches: list[list[tuple[datetime, int]]] = [[]]
    for line in lines:
        m = LINE.match(line)
        if not m:
            continue
        if m["kind"] == "Decode":
            stretches.append([])
        elif int(m["new"]) >= min_tokens:
            stretches[-1].append((datetime.strptime(m["ts"], "%Y-%m-%d %H:%M:%S"), int(m["running"])))
    stretch = max(stretches, key=lambda s: s[-1][1] - s[0][1] if s else -1)
    if not stretch or stretch[-1][1] <= stretch[0][1]:
        raise ValueError(f"no prompt of at least {min_tokens} tokens finished its prefill between two decode lines")
    (t0, r0), (t1, r1) = stretch[0], stretch[-1]
    prompts = r1 - r0
    seconds = (t1 - t0).total_seconds()
    return {"seconds_per_prompt": round(seconds / prompts, 3), "prompts": prompts, "seconds": seconds,
            "first": t0.isoformat(), "last": t1.isoformat(), "prefill_lines": len(stretch)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+", type=Path)
    ap.add_argument("--min-tokens", type=int, default=1024, help="prefill lines with fewer new tokens are not prompts' chunks")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = {str(p): prefill_pace(p.read_text(errors="replace").splitlines(), args.min_tokens) for p in args.logs}
    for path, row in rows.items():
        print(f"{path}: {row['seconds_per_prompt']} s per prompt ({row['prompts']} prompts in {row['seconds']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
