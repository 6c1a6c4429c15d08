"""Sealing a segment into its arena region, in worker processes.

Why processes and not threads: a compressor is hundreds of small torch operations per
segment, and each one releases the GIL and takes it back. Beside a thread that never
blocks (SGLang's scheduler loop polls without sleeping), every take waits out the
interpreter's switch interval (5 ms), and the scheduler's own operations wait on the
workers the same way. ``benchmarks/sealing/convoy.py`` measures it on the CPU: a segment
of SmolLM2's shape took 72 ms alone and 31 s beside a busy thread; on the H100 a server
sealed 4 segments in two minutes and never answered the next request. A process has its
own interpreter, so neither side waits on the other.

A job carries host tensors in (the scheduler snapshots the segment) and a
:class:`~mosaickv.kernels.layout.Region` out (bytes and table rows for the slab the
scheduler reserved), both as plain arrays, so nothing but pickles crosses the pipes.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import os
import pickle
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from mosaickv.compressor import PartFailure, compress_segment
from mosaickv.config import Policy
from mosaickv.formats import PackedBlock
from mosaickv.kernels.layout import Region, pack_region

logger = logging.getLogger(__name__)

# compress(k, v, budget_bytes, query_stats, attention) with k, v [layers, kv_heads, segment_size,
# head_dim], query_stats [layers, kv_heads, head_dim] and attention [layers, kv_heads,
# segment_size] (each None when not recorded) -> blocks[layer][kv_head] whose bytes sum to at
# most budget_bytes. A part that fails raises PartFailure. Worker processes receive it
# pickled: a module-level function or an instance of a module-level class.
CompressFn = Callable[[torch.Tensor, torch.Tensor, int, Optional[torch.Tensor], Optional[torch.Tensor]],
                      list[list[PackedBlock]]]

POLL_S = 1.0  # how often the result thread looks for workers that died


@dataclass
class PolicyCompressor:
    """:func:`~mosaickv.compressor.compress_segment` under one policy; a plan over the
    budget is the strategy's failure (a fixed strategy may ignore the budget)."""

    policy: Policy
    head_dim: int

    def __post_init__(self) -> None:
        self.policy = self.policy.bind(self.head_dim)

    def __call__(self, k: torch.Tensor, v: torch.Tensor, budget_bytes: int, query_stats: Optional[torch.Tensor],
                 attention: Optional[torch.Tensor]) -> list[list[PackedBlock]]:
        blocks = compress_segment(self.policy, k, v, budget_bytes, query_stats=query_stats, attention=attention)
        used = sum(block.nbytes() for layer in blocks for block in layer)
        if used > budget_bytes:
            raise PartFailure("strategy", self.policy.strategy, f"packed {used} bytes, over the {budget_bytes}-byte slab")
        return blocks


@dataclass
class SegmentInputs:
    """One segment as the scheduler snapshots it (host tensors) and where it will live."""

    k: torch.Tensor  # [layers, kv_heads, segment_size, head_dim]
    v: torch.Tensor
    budget_bytes: int
    query_stats: Optional[torch.Tensor]  # [layers, kv_heads, head_dim]
    attention: Optional[torch.Tensor]  # [layers, kv_heads, segment_size]
    base_bytes: int  # start of the reserved slab in the arena

    def __reduce__(self):
        return _inputs_from_host, (_to_host(self.k), _to_host(self.v), self.budget_bytes, _to_host(self.query_stats),
                                   _to_host(self.attention), self.base_bytes)


def _to_host(t: Optional[torch.Tensor]) -> Optional[tuple[np.ndarray, str]]:
    """A tensor as a numpy array and its torch dtype (bf16 travels as its int16 bits)."""
    if t is None:
        return None
    t = t.detach().cpu().contiguous()
    dtype = str(t.dtype).removeprefix("torch.")
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy(), dtype


def _from_host(x: Optional[tuple[np.ndarray, str]]) -> Optional[torch.Tensor]:
    if x is None:
        return None
    array, dtype = x
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def _inputs_from_host(k, v, budget_bytes, query_stats, attention, base_bytes) -> SegmentInputs:
    return SegmentInputs(_from_host(k), _from_host(v), budget_bytes, _from_host(query_stats), _from_host(attention),
                         base_bytes)


def seal_segment(compress: CompressFn, inputs: SegmentInputs) -> Region:
    """Compress one segment and lay it out for its slab (what a worker does per job)."""
    layers, heads, _, head_dim = inputs.k.shape
    blocks = compress(inputs.k, inputs.v, inputs.budget_bytes, inputs.query_stats, inputs.attention)
    if len(blocks) != layers or any(len(layer) != heads for layer in blocks):
        raise ValueError(f"the compressor must return blocks[{layers} layers][{heads} kv heads], got "
                         f"{len(blocks)} layers of {sorted({len(layer) for layer in blocks})} heads")
    return pack_region([b for layer in blocks for b in layer], head_dim, inputs.base_bytes)


class WorkerCrashed(RuntimeError):
    """A sealing process died (killed, out of memory, a crash in native code) with jobs in hand."""


def _portable(err: BaseException) -> BaseException:
    """``err`` if it survives pickling, else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - any exception type can refuse to pickle
        return RuntimeError(f"{type(err).__name__}: {err}")


def _worker_main(compress: CompressFn, torch_threads: int, tasks: mp.Queue, results: mp.Queue) -> None:
    torch.set_num_threads(torch_threads)
    parent = os.getppid()
    while True:
        try:
            job, inputs = tasks.get(timeout=POLL_S)
        except queue.Empty:
            if os.getppid() != parent:  # the scheduler is gone (killed): do not linger
                return
            continue
        try:
            results.put((job, True, seal_segment(compress, inputs)))
        except Exception as err:  # noqa: BLE001 - reported to the scheduler, which keeps the segment dense
            results.put((job, False, _portable(err)))


@dataclass
class _Worker:
    process: mp.Process
    tasks: mp.Queue


class SealWorkers:
    """``processes`` spawned processes, each sealing one segment at a time; ``submit``
    returns a Future resolved by a result thread. A process that dies fails the jobs it
    held with :class:`WorkerCrashed` and is replaced. Processes are daemons and leave when
    the scheduler does, even with a compressor that hangs."""

    def __init__(self, compress: CompressFn, processes: int, torch_threads: int = 1) -> None:
        if processes < 1:
            raise ValueError(f"sealing needs at least one worker process, got {processes}")
        self._ctx = mp.get_context("spawn")  # the scheduler holds CUDA: a forked child could not use torch
        self._compress, self._torch_threads = compress, torch_threads
        self._results: mp.Queue = self._ctx.Queue()
        self._lock = threading.Lock()
        self._jobs: dict[int, tuple[Future, int]] = {}  # job id -> (future, worker index)
        self._ids = itertools.count()
        self._workers = [self._spawn() for _ in range(processes)]
        self.crashes = 0
        self._closed = False
        threading.Thread(target=self._collect, name="mosaickv-seal-results", daemon=True).start()

    def _spawn(self) -> _Worker:
        tasks = self._ctx.Queue()
        process = self._ctx.Process(target=_worker_main, args=(self._compress, self._torch_threads, tasks, self._results),
                                    name="mosaickv-seal", daemon=True)
        process.start()
        return _Worker(process, tasks)

    def submit(self, inputs: SegmentInputs) -> Future:
        future: Future = Future()
        with self._lock:
            job = next(self._ids)
            load = [0] * len(self._workers)
            for _, w in self._jobs.values():
                load[w] += 1
            w = load.index(min(load))
            self._jobs[job] = (future, w)
            self._workers[w].tasks.put((job, inputs))
        return future

    def _collect(self) -> None:
        while True:
            try:
                job, ok, value = self._results.get(timeout=POLL_S)
            except queue.Empty:
                if not threading.main_thread().is_alive():
                    return  # the interpreter is exiting: nothing to seal for, nothing to respawn
                self._replace_dead()
                continue
            with self._lock:
                entry = self._jobs.pop(job, None)
            if entry is not None and entry[0].set_running_or_notify_cancel():  # False: cancelled meanwhile
                entry[0].set_result(value) if ok else entry[0].set_exception(value)

    def _replace_dead(self) -> None:
        with self._lock:
            for w, worker in enumerate(self._workers):
                if self._closed or worker.process.is_alive():
                    continue
                lost = [job for job, (_, owner) in self._jobs.items() if owner == w]
                self.crashes += 1
                logger.error("MosaicKV: sealing process %d exited with code %s holding %d segments; they stay dense, "
                             "a new process takes its place", worker.process.pid, worker.process.exitcode, len(lost))
                for job in lost:
                    future, _ = self._jobs.pop(job)
                    if future.set_running_or_notify_cancel():
                        future.set_exception(WorkerCrashed(f"sealing process exited with code {worker.process.exitcode}"))
                self._workers[w] = self._spawn()

    def close(self) -> None:
        """Stop the processes now; jobs not finished are cancelled."""
        with self._lock:
            self._closed = True
            for future, _ in self._jobs.values():
                future.cancel()
            self._jobs.clear()
            for worker in self._workers:
                worker.process.kill()
                worker.tasks.cancel_join_thread()
