"""Sealing throughput on the host, beside a scheduler that never sleeps: segments per
second of ``seal_segment`` (what the server's sealing workers run) on N threads and on N
worker processes (``SealWorkers``, what the server uses), with the calling thread
busy-polling as SGLang's scheduler loop does (``--idle`` measures without it).

    python benchmarks/sealing/bench_seal.py --policy mosaic --layers 30 --kv-heads 3 --head-dim 64 \\
        --workers 1 2 --json benchmarks/results/sealing_convoy_cpu.json
    python benchmarks/sealing/bench_seal.py --device cuda --layers 32 --kv-heads 8 --head-dim 128 \
        --segments 256 --batch 8 32 64 128   # on the GPU: host path, packer alone, and N at a time
    python benchmarks/sealing/bench_seal.py --inline --layers 32 --kv-heads 8 --head-dim 128       # the compressor alone
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import Future

import torch

from mosaickv.config import load_policy
from mosaickv.policies.strategies import knapsack_on_gpu
from mosaickv.sealer import PolicyCompressor, SealWorkers, SegmentInputs, seal_segment


def _busy_until(done) -> None:
    """Spin in Python as SGLang's scheduler polls its sockets (or just wait, if idle)."""
    while not done():
        for _ in range(1000):
            pass


def on_threads(compress, inputs: SegmentInputs, workers: int, per_worker: int, busy: bool) -> float:
    threads = [threading.Thread(target=lambda: [seal_segment(compress, inputs) for _ in range(per_worker)])
               for _ in range(workers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    if busy:
        _busy_until(lambda: not any(t.is_alive() for t in threads))
    for t in threads:
        t.join()
    return workers * per_worker / (time.perf_counter() - start)


def on_processes(sealer: SealWorkers, inputs: SegmentInputs, workers: int, per_worker: int, busy: bool) -> float:
    start = time.perf_counter()
    futures: list[Future] = [sealer.submit(inputs) for _ in range(workers * per_worker)]
    if busy:
        _busy_until(lambda: all(f.done() for f in futures))
    for f in futures:
        f.result()
    return len(futures) / (time.perf_counter() - start)


def seal_on_device(compress, inputs: SegmentInputs, args) -> int:
    """Segments per second sealed inline on ``args.device`` (inputs moved there first), by
    the host path and, on a GPU, by the packer's one launch (what ``--kv-compress-sealing
    device`` runs), side by side."""
    dev = torch.device(args.device)
    on_dev = SegmentInputs(*(t.to(dev) for t in (inputs.k, inputs.v)), inputs.budget_bytes,
                           inputs.query_stats.to(dev), inputs.attention.to(dev), inputs.base_bytes)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda _: None)
    sealers = {"host_path": lambda n: [seal_segment(compress, on_dev) for _ in range(n)]}
    if dev.type == "cuda":  # the packer's kernel (on the CPU only under the Triton interpreter)
        from mosaickv.packed_sealing import PackedSealer

        packed = PackedSealer(compress.policy, args.head_dim)
        sealers["packed"] = lambda n: [packed(on_dev) for _ in range(n)]
        for size in args.batch:  # what --kv-compress-sealing device does with a prefill's segments
            sealers[f"packed_batch{size}"] = lambda n, size=size: [
                packed.seal_many([on_dev] * min(size, n - lo)) for lo in range(0, n, size)]
    rates, peaks = {}, {}
    for name, seal in sealers.items():
        # Warm-up at the size timed: the first call at a batch size pays its workspace's
        # allocations and any kernel specialised to it (a warm-up of one segment left that
        # in batch 32's timing: 27.4 and 37.9 segments/s on an H200, below the host path).
        seal(int(name.removeprefix("packed_batch")) if name.startswith("packed_batch") else 1)
        sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        held = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        start = time.perf_counter()
        seal(args.segments)
        sync(dev)
        rates[name] = round(args.segments / (time.perf_counter() - start), 2)
        if dev.type == "cuda":  # the workspace a server must leave free beside its KV pool
            peaks[name] = round((torch.cuda.max_memory_allocated(dev) - held) / 2**20)
    res = {"policy": args.policy, "device": str(dev), "segments": args.segments,
           "shape": {"layers": args.layers, "kv_heads": args.kv_heads, "head_dim": args.head_dim},
           "segments_per_s": rates, "peak_workspace_mib": peaks,
           "knapsack_on_gpu": knapsack_on_gpu(),  # MOSAICKV_KNAPSACK: the one-launch kernel or the PyTorch ops
           "command": "python benchmarks/sealing/bench_seal.py " + " ".join(sys.argv[1:])}
    if args.profile and dev.type == "cuda":
        res["profile"] = profile_batch(sealers[f"packed_batch{args.profile}"], args.profile, args.trace)
    print(json.dumps(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def profile_batch(seal, size: int, trace: str | None = None, top: int = 40) -> dict:
    """Where one ``seal_many`` call of ``size`` segments spends the GPU's time and the host's:
    the call's wall time beside the kernels' total (far apart: the host or its waits bound
    it), the kernels by total time, the host ops by their own time, and the host's waits on
    the device (a read-back such as ``item``/``nonzero`` stalls the launch queue)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    seal(size)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=bool(trace)) as prof:
        seal(size)
        torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(trace)
    events = prof.key_averages()
    kernels = sorted((e for e in events if e.device_type.name == "CUDA"), key=lambda e: -e.self_device_time_total)
    host = sorted((e for e in events if e.device_type.name == "CPU"), key=lambda e: -e.self_cpu_time_total)
    waits = [e for e in host if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::_local_scalar_dense",
                                          "aten::nonzero", "cudaMemcpyAsync", "aten::item")]
    row = lambda e, t: {"name": e.key[:90], "calls": e.count, "ms": round(t / 1e3, 3)}  # noqa: E731
    return {
        "segments": size,
        "wall_ms": round(wall_ms, 2),
        "kernel_launches": sum(e.count for e in kernels),
        "kernel_ms": round(sum(e.self_device_time_total for e in kernels) / 1e3, 2),
        "kernels": [row(e, e.self_device_time_total) for e in kernels[:top]],
        "host_ops_self": [row(e, e.self_cpu_time_total) for e in host[:top]],
        "host_waits": [row(e, e.cpu_time_total) for e in waits],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="mosaic")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--segments", type=int, default=8, help="segments each worker seals per measurement")
    ap.add_argument("--thread-segments", type=int, default=1,
                    help="segments each thread seals beside the busy loop (slow: seconds each)")
    ap.add_argument("--idle", action="store_true", help="no busy loop on the calling thread")
    ap.add_argument("--device", default="cpu",
                    help="seal on this device, inline on the calling thread ('cuda': the GPU sealing candidate)")
    ap.add_argument("--batch", type=int, nargs="*", default=[8, 32],
                    help="on a GPU, also seal this many segments per PackedSealer.seal_many call")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="on a GPU, also profile one seal_many call of N segments (one of --batch): kernels and host ops")
    ap.add_argument("--trace", help="with --profile, also write the profiled call's Chrome trace here")
    ap.add_argument("--inline", action="store_true",
                    help="seal inline on the calling thread of --device (the CPU too): the compressor alone, no workers")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.profile and args.profile not in args.batch:
        ap.error(f"--profile {args.profile}: profile one of the --batch sizes ({' '.join(map(str, args.batch))})")
    policy = load_policy(args.policy)
    compress = PolicyCompressor(policy, args.head_dim)
    s, shape = policy.segment_size, (args.layers, args.kv_heads)
    torch.manual_seed(0)
    k, v = (torch.randn(*shape, s, args.head_dim, dtype=torch.bfloat16) for _ in range(2))
    budget = int(s * args.layers * args.kv_heads * args.head_dim * 2 * 2 / policy.ratio)
    inputs = SegmentInputs(k, v, budget, torch.randn(*shape, args.head_dim).abs(), torch.rand(*shape, s), 0)
    busy = not args.idle
    if args.device != "cpu" or args.inline:
        return seal_on_device(compress, inputs, args)
    torch.set_num_threads(1)  # as each worker process does
    seal_segment(compress, inputs)  # warm-up
    start = time.perf_counter()
    for _ in range(args.segments):
        seal_segment(compress, inputs)
    rows = [{"mode": "one thread, alone", "workers": 1, "segments_per_s": round(args.segments / (time.perf_counter() - start), 2)}]
    for n in args.workers:
        sealer = SealWorkers(compress, n)
        on_processes(sealer, inputs, n, 1, busy=False)  # wait for the processes to start
        rows.append({"mode": "processes" + (", scheduler busy" if busy else ""), "workers": n,
                     "segments_per_s": round(on_processes(sealer, inputs, n, args.segments, busy), 2)})
        sealer.close()
        rows.append({"mode": "threads" + (", scheduler busy" if busy else ""), "workers": n,
                     "segments_per_s": round(on_threads(compress, inputs, n, args.thread_segments, busy), 3)})
        print(json.dumps(rows[-2:]), flush=True)
    res = {"policy": args.policy, "shape": {"layers": args.layers, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                                            "segment_size": s}, "cpus": os.cpu_count(), "results": rows,
           "command": "python benchmarks/sealing/bench_seal.py " + " ".join(argv or sys.argv[1:])}
    print(json.dumps(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
