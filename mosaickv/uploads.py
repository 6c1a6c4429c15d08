"""Host arrays to the device without waiting for it.

A plain ``tensor.to("cuda")`` from pageable host memory makes PyTorch synchronize the
stream after the copy, so every index array a sealing call uploads between its kernels
drained the GPU's queue (28 stream syncs in one call of 32 segments on an H200,
benchmarks/results/h200x2_2026-11-30d). From pinned memory the copy is queued like a
kernel, and PyTorch's host allocator keeps the pinned block until the copy is done.
"""

from __future__ import annotations

import numpy as np
import torch


def upload(a: np.ndarray | torch.Tensor | list, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``a`` (host) on ``device``, queued behind the stream's work instead of waiting for it."""
    t = torch.as_tensor(a, dtype=dtype)
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
