"""Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen
before any kernel module is imported (the SGLang plugin imports them too). Sealing workers
a test started are closed with it: each process holds a torch import's memory, and killing
only the processes would leave their result threads replacing them."""

import multiprocessing
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mosaickv.sealer import SealWorkers  # noqa: E402  (after the interpreter choice)


@pytest.fixture(autouse=True)
def _stop_sealing_workers(monkeypatch):
    started: list[SealWorkers] = []
    init = SealWorkers.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        started.append(self)

    monkeypatch.setattr(SealWorkers, "__init__", recording_init)
    yield
    for workers in started:
        workers.close()
    for child in multiprocessing.active_children():  # processes a test spawned itself
        child.kill()
        child.join(timeout=10)
