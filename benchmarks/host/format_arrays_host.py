"""Host time of ``format_arrays`` over one SmolLM2 sealing call's plan (182 segments x 30
layers x 3 KV heads), the formats as a plain list against a ``FormatChoice`` (the menu and
each block's pick). The eighth GPU run's prefill profile spent 7.4% of the scheduler's
time in it, called twice per sealing call.

    python benchmarks/host/format_arrays_host.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from mosaickv.formats import BlockFormat, FormatChoice, SideFormat, format_arrays


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return round(statistics.median(times), 3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=182 * 30 * 3)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    sides = [SideFormat("dense", 0), SideFormat("sparse", 8), SideFormat("sparse", 16), SideFormat("lowrank", 8)]
    menu = [BlockFormat(m, k, v) for m in (32, 24, 16, 8) for k in sides for v in sides[::3]] + [BlockFormat(0)]
    choice = np.random.default_rng(0).integers(0, len(menu), args.blocks)
    plain, picked = [menu[i] for i in choice.tolist()], FormatChoice(menu, choice)
    row = {"blocks": args.blocks, "menu": len(menu),
           "list_ms": median_ms(lambda: format_arrays(plain, 64), args.repeat),
           "format_choice_ms": median_ms(lambda: format_arrays(picked, 64), args.repeat)}
    print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python " + " ".join(sys.argv), "result": row}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
