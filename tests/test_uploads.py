"""upload(): host arrays reach the device with their values and dtype, queued without a
stream sync on a GPU (a pageable copy makes PyTorch wait for the stream)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mosaickv.uploads import upload


@pytest.mark.parametrize("a, dtype", [(np.arange(7, dtype=np.int64), None), (np.array([[1, 0], [0, 1]], dtype=bool), None),
                                      ([3, 1, 2], torch.int64), ([0.5, 2.0], torch.float64)])
def test_an_upload_keeps_values_and_dtype(a, dtype):
    got = upload(a, "cpu", dtype)
    want = torch.as_tensor(a, dtype=dtype)
    assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.gpu
def test_a_gpu_upload_does_not_wait_for_the_stream():
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    a = np.arange(1 << 20, dtype=np.int64)
    x = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a stream sync raises
    try:
        for _ in range(4):
            x = x @ x  # work queued ahead of the copy
        got = upload(a, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got.cpu(), torch.from_numpy(a))
