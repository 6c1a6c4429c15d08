"""Compressors for the sealing tests, in a module light enough for sealing worker
processes to import (they unpickle the compressor by name). Cross-process signals are
spawn-context events, inherited by the workers when they start."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import torch

from mosaickv.compressor import PartFailure
from mosaickv.formats import BlockFormat, SideFormat, pack_block

SEG = 16
FMT = BlockFormat(SEG, SideFormat("sparse", 8), SideFormat("sparse", 4))
WAIT_S = 60
_ctx = mp.get_context("spawn")


class CountingCompressor:
    """pack_block with a fixed format on every block; counts the calls (in its process)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, k: torch.Tensor, v: torch.Tensor, budget_bytes: int, query_stats, attention):
        self.calls += 1
        return [[pack_block(k[layer, h].float(), v[layer, h].float(), FMT) for h in range(k.shape[1])]
                for layer in range(k.shape[0])]


class BlockingCompressor(CountingCompressor):
    """Blocks every call until ``release`` is set; ``started`` is set as a call begins,
    ``returned`` after it."""

    def __init__(self) -> None:
        super().__init__()
        self.release, self.started, self.returned = _ctx.Event(), _ctx.Event(), _ctx.Event()

    def __call__(self, *args):
        self.started.set()
        assert self.release.wait(WAIT_S), "test never released the compressor"
        blocks = super().__call__(*args)
        self.returned.set()
        return blocks


class TogetherCompressor(CountingCompressor):
    """Every call waits until ``parties`` calls are running at once."""

    def __init__(self, parties: int) -> None:
        super().__init__()
        self.together = _ctx.Barrier(parties, timeout=WAIT_S)

    def __call__(self, *args):
        self.together.wait()
        return super().__call__(*args)


class Broken:
    def __call__(self, *args):
        raise RuntimeError("compressor bug")


class FailingPart:
    """A policy part's failure, as a policy compressor raises it."""

    registered_name = "flaky_scorer"

    def __call__(self, *args):
        raise PartFailure("token_scorer", self, "returned NaN")


class ExitOnce(CountingCompressor):
    """The first call anywhere kills its process (as an OOM kill would); later calls seal."""

    def __init__(self) -> None:
        super().__init__()
        self.exited = _ctx.Event()

    def __call__(self, *args):
        if not self.exited.is_set():
            self.exited.set()
            os._exit(3)
        return super().__call__(*args)


class Hang:
    def __call__(self, *args):
        time.sleep(3600)


class RecordingCompressor(CountingCompressor):
    """Keeps what each call was given (inline sealing only: it records in its own process)."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, k, v, *args):
        self.inputs.append((k.clone(), v.clone()))
        return super().__call__(k, v, *args)


def seal_from_a_spawned_process() -> None:
    """What a scheduler process does (SGLang spawns it): start sealing workers, seal one
    segment of 2 layers x 2 heads. Exits non-zero if that fails."""
    from mosaickv.sealer import SealWorkers, SegmentInputs

    workers = SealWorkers(CountingCompressor(), 1)
    k = torch.randn(2, 2, SEG, 32, dtype=torch.bfloat16)
    region = workers.submit(SegmentInputs(k, k, 1 << 20, None, None, 0)).result(timeout=WAIT_S)
    assert region.table.shape == (4, 9) and region.data.numel() > 0
