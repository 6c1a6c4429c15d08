"""Host time of ``locate_many`` (a decode step's runs of every request), this tree's beside
another version's, alternating in one process on the pool ``decode_step_host.py`` builds.

``--against FILE`` is another ``sglang_patch/forward_inputs.py`` (``git show
REV:sglang_patch/forward_inputs.py > FILE``); its ``locate_many`` runs with this tree's
module globals, and both must return the same runs.

    python benchmarks/host/locate_host.py --requests 240 --segments 247 --layers 30 --kv-heads 3 --head-dim 64 \
        --policy-formats benchmarks/results/eval_dense_values_2k_segment.json --policy mosaic_dense_values_3x \
        --against /tmp/forward_inputs_before.py --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import mosaickv.sglang_patch.forward_inputs as forward_inputs

HERE = Path(__file__).parent


def other_locate(path: str):  # type: ignore[no-untyped-def]
    """``locate_many`` of another forward_inputs.py, defined over this tree's globals."""
    source = Path(path).read_text()
    start = source.index("def locate_many")
    end = source.index("\n@dataclass", start)
    namespace = dict(vars(forward_inputs))
    exec(source[start:end], namespace)  # noqa: S102 - a file the user named, for timing
    return namespace["locate_many"]


def same_runs(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        len(x) == len(y) and all(u == v if isinstance(u, int) else torch.equal(u, v) for u, v in zip(x, y))
        for x, y in zip(a, b))


def main(argv: list[str] | None = None) -> int:
    spec = importlib.util.spec_from_file_location("decode_step_host", HERE / "decode_step_host.py")
    host = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=240)
    host.add_pool_args(ap)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=7, help="timed calls per round (their median)")
    ap.add_argument("--against")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    args.device = "cpu"
    torch.set_num_threads(1)
    pool, backend, length = host.build(args, args.requests)
    rows = backend.req_to_token_pool.req_to_token[torch.arange(args.requests), :length]
    slots = [row[:length] for row in rows]
    versions = {"this tree": forward_inputs.locate_many}
    if args.against:
        versions[args.against] = other_locate(args.against)
        if not same_runs(versions["this tree"](pool, slots), versions[args.against](pool, slots)):
            raise SystemExit(f"{args.against}'s locate_many finds other runs than this tree's")
    times: dict[str, list[float]] = {name: [] for name in versions}
    for _ in range(args.rounds):
        for name, locate in versions.items():
            calls = []
            for _ in range(args.calls):
                start = time.perf_counter()
                locate(pool, slots)
                calls.append(time.perf_counter() - start)
            times[name].append(round(statistics.median(calls) * 1e3, 3))
    command = " ".join(["python", "benchmarks/host/locate_host.py", *(argv or sys.argv[1:])])
    text = json.dumps({"command": command, "args": vars(args), "locate_ms": times}, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
