"""Host time of a decode step's per-request inputs, this tree's beside another version's,
alternating in one process on the pool ``decode_step_host.py`` builds: locating (each
request's runs from the batch's ``req_to_token`` rows, as ``MosaicAttnBackend._requests``
does) or, with ``--function stat_inputs``, the query statistics' inputs.

``--against FILE`` is another ``sglang_patch/forward_inputs.py`` (``git show
REV:sglang_patch/forward_inputs.py > FILE``); its function runs with this tree's module
globals, and both must return the same result. A file without ``locate_rows`` locates
with its ``locate_many`` over each request's slice of the rows, as its backend did.

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


# Where each timed function's source starts and what follows it in forward_inputs.py.
FUNCTIONS = {"locate_rows": ("def locate_rows", "\n@dataclass"), "locate_many": ("def locate_many", "\n@dataclass"),
             "stat_inputs": ("def stat_inputs", "\ndef sealed_and_tail")}


def other_function(path: str, name: str):  # type: ignore[no-untyped-def]
    """Function ``name`` of another forward_inputs.py, defined over this tree's globals."""
    source = Path(path).read_text()
    begin, end = FUNCTIONS[name]
    start = source.index(begin)
    namespace = dict(vars(forward_inputs))
    exec(source[start : source.index(end, start)], namespace)  # noqa: S102 - a file the user named, for timing
    return namespace[name]


def same_inputs(a, b) -> bool:  # type: ignore[no-untyped-def]
    """Two StatInputs alike, field by field (tensors by value)."""
    fields = ("decode", "positions", "firsts", "rows", "device_positions")
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
               for x, y in ((getattr(a, f), getattr(b, f)) for f in fields))


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
    ap.add_argument("--function", choices=["locate", "stat_inputs"], default="locate")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    args.device = "cpu"
    torch.set_num_threads(1)
    pool, backend, length = host.build(args, args.requests)
    rows = backend.req_to_token_pool.req_to_token[torch.arange(args.requests), :length]
    lens = [length] * args.requests
    if args.function == "locate":
        same, arg = same_runs, (rows, lens)
        versions = {"this tree": forward_inputs.locate_rows}
        if args.against:
            if "def locate_rows" in Path(args.against).read_text():
                versions[args.against] = other_function(args.against, "locate_rows")
            else:
                many = other_function(args.against, "locate_many")
                versions[args.against] = lambda pool, rows, lens: many(pool, [r[:n] for r, n in zip(rows, lens)])
    else:  # over the requests as a decode step locates them
        same, arg = same_inputs, (backend._requests(torch.arange(args.requests), lens, [1] * args.requests),)
        versions = {"this tree": forward_inputs.stat_inputs}
        if args.against:
            versions[args.against] = other_function(args.against, "stat_inputs")
    if args.against and not same(versions["this tree"](pool, *arg), versions[args.against](pool, *arg)):
        raise SystemExit(f"{args.against}'s {args.function} returns another result than this tree's")
    times: dict[str, list[float]] = {name: [] for name in versions}
    for _ in range(args.rounds):
        for name, function in versions.items():
            calls = []
            for _ in range(args.calls):
                start = time.perf_counter()
                function(pool, *arg)
                calls.append(time.perf_counter() - start)
            times[name].append(round(statistics.median(calls) * 1e3, 3))
    command = " ".join(["python", "benchmarks/host/locate_host.py", *(argv or sys.argv[1:])])
    key = f"{args.function}_ms"
    text = json.dumps({"command": command, "args": vars(args), key: times}, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
