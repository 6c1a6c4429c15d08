"""Device sealing on one thread beside the scheduler (``--kv-compress-sealing device-thread``).

Inline device sealing held the scheduler for 56.9 of the 100.7 s of the eleventh run's 8B
random-8k row (41,920 segments, ``kv_compress_info.inline_seal_seconds``): SGLang
launches no forward while it seals. A sealing call mostly waits, for its kernels and for
its plan's reads back, and a thread waiting on the GPU releases the GIL; so here one
thread seals the batches in the order they come, on a CUDA stream of its own, while the
scheduler goes on. The results are whole segments' regions, installed by the scheduler at
a later drain, as the worker processes' are. In the twelfth run it did not pay: side by
side on the same 8B row, 385.3 output tok/s against inline's 384.3, and the thread sealed
for 87.0 s where inline sealing took 65.5 (h200x2_2026-11-30l/summary.json).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import torch

from mosaickv.kernels.layout import Region
from mosaickv.sealer import SegmentInputs
from mosaickv.sglang_patch.pool import SealingCounters

SealMany = Callable[[list[SegmentInputs]], list[Future]]  # the radix cache's inline sealing: finished futures


class SealThread:
    """One sealing thread; :meth:`submit` returns a future per segment at once."""

    def __init__(self, device: torch.device | str, counters: SealingCounters) -> None:
        self.device, self.counters = torch.device(device), counters
        cuda = self.device.type == "cuda"
        if cuda and self.device.index is None:  # "cuda": the scheduler's current device, resolved on its thread
            self.device = torch.device("cuda", torch.cuda.current_device())
        # A new thread's current device is the first one, not the scheduler's.
        self._executor = ThreadPoolExecutor(1, "mosaickv-seal",
                                            initializer=(lambda: torch.cuda.set_device(self.device)) if cuda else None)
        self._stream: Optional[torch.cuda.Stream] = torch.cuda.Stream(self.device) if cuda else None

    def submit(self, seal: SealMany, batch: list[SegmentInputs]) -> list[Future]:
        """Seal ``batch`` with ``seal`` on the thread, after the work the calling thread has
        queued on its current stream so far (the batch's snapshot). A future cancelled
        before the thread reaches it is skipped."""
        after = None
        if self._stream is not None:
            after = torch.cuda.Event()
            after.record()
        futures = [Future() for _ in batch]
        self._executor.submit(self._run, seal, batch, futures, after)
        return futures

    def _run(self, seal: SealMany, batch: list[SegmentInputs], futures: list[Future],
             after: Optional[torch.cuda.Event]) -> None:
        live = [future.set_running_or_notify_cancel() for future in futures]
        start = time.perf_counter()
        try:
            with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
                if after is not None:
                    self._stream.wait_event(after)
                done = seal(batch)
                if self._stream is not None:
                    self._stream.synchronize()  # the regions' bytes are written before the scheduler copies them
        except BaseException as err:  # noqa: BLE001 - each segment's future reports it
            done = [_failed(err)] * len(batch)
        finally:
            self.counters.thread_seal_seconds += time.perf_counter() - start  # this thread alone writes it
        for future, running, result in zip(futures, live, done):
            if not running:
                continue
            if result.exception() is None:
                future.set_result(result.result())
            else:
                future.set_exception(result.exception())

    def shutdown(self) -> None:
        """Wait for the batches handed over, then end the thread."""
        self._executor.shutdown(wait=True)


def _failed(err: BaseException) -> Future:
    future: Future[Region] = Future()
    future.set_exception(err)
    return future
