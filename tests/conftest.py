"""Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen
before any kernel module is imported (the SGLang plugin imports them too). Sealing worker
processes a test started end with it (each holds a torch import's memory)."""

import multiprocessing
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _stop_child_processes():
    yield
    for child in multiprocessing.active_children():
        child.kill()
        child.join(timeout=10)
